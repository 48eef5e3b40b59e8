"""
The server's unfinished handshakes, bounded: how many connections that
have not yet presented a valid header it keeps, in all and per source.

A flood of garbage connections (random bytes, or nothing) would otherwise
hold a descriptor each until the handshake timeout, and every slot of
max_connections.  `ShadowsocksServerFactory` (`ssx.server.protocol`) tracks each
accepted connection here until its header is valid, and closes those that
`HandshakeTable` returns exactly as a handshake timeout closes them.  No
Twisted here: connections are any hashable objects and time is a number.
"""

from __future__ import annotations

import socket
from typing import Any, Hashable

__all__ = [
    "DEFAULT_MAX_HANDSHAKES",
    "DEFAULT_MAX_HANDSHAKES_PER_IP",
    "HANDSHAKE_GRACE",
    "IPV6_SOURCE_PREFIX",
    "HandshakeTable",
    "source_group",
]

# Unfinished handshakes kept at once: in all, and from one source (an
# IPv4 address or an IPv6 /64).  An honest handshake lasts about a round
# trip (a client's first write carries its header), so even a NATed
# office opening hundreds of connections a second has a few dozen
# unfinished at any moment, and none that sent bytes without a valid
# header; a flood of garbage from one source holds at most the per-source
# number of descriptors (twice that, for HANDSHAKE_GRACE, if it sends
# nothing).
DEFAULT_MAX_HANDSHAKES = 512
DEFAULT_MAX_HANDSHAKES_PER_IP = 128

# IPv6 sources count by their /64: it is the smallest prefix a network
# hands out (SLAAC needs it), so one host may hold every address in it;
# counted one by one, a single attacker would meet no bound at all.
# Wider (a /56 or /48) would start to lump different customers of one
# provider together.
IPV6_SOURCE_PREFIX = 64


def source_group(host: str) -> Hashable | None:
    """
    What the per-source bound counts a peer address under: the IPv4
    address itself (IPv4-mapped IPv6 included: a dual-stack listener sees
    IPv4 clients that way), or the IPv6 /64; None for anything else (a
    Unix socket's peer), which only the overall bound counts.
    """
    if ":" not in host:
        return host or None
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    try:
        packed = socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
    except OSError:
        return None
    prefix = IPV6_SOURCE_PREFIX // 8
    return socket.inet_ntop(socket.AF_INET6, packed[:prefix] + bytes(16 - prefix)) + f"/{IPV6_SOURCE_PREFIX}"


# How long a connection that has sent nothing yet keeps its place
# whatever the bounds say: an honest handshake takes about a round trip,
# and a burst of connections is accepted before any of them is read.
HANDSHAKE_GRACE = 2.0


class HandshakeTable:
    """
    Connections still in their handshake, oldest first, bounded in all
    (`limit`) and per source group (`per_source`); 0 is no bound.

    Beyond a bound the oldest connection that has had its chance goes:
    one that sent bytes and still has no valid header, or that has been
    waiting `grace` seconds.  One accepted a moment ago and not yet read
    (an honest client's first bytes may be waiting in its socket) is kept,
    unless there are twice the bound.  `add`, `fed` and `over` return the
    connections to close, already forgotten here.
    """

    def __init__(
        self,
        limit: int = DEFAULT_MAX_HANDSHAKES,
        per_source: int = DEFAULT_MAX_HANDSHAKES_PER_IP,
        grace: float = HANDSHAKE_GRACE,
    ) -> None:
        self.limit = limit
        self.per_source = per_source
        self.grace = grace
        # Dicts keep insertion order: the first key is the oldest.
        self._all: dict[Any, Hashable | None] = {}
        self._groups: dict[Hashable, dict[Any, None]] = {}
        # Those that have had their chance, in the order they got it.
        self._ready: dict[Any, None] = {}
        self._ready_groups: dict[Hashable, dict[Any, None]] = {}
        # Those that have not, with when they were accepted.
        self._new: dict[Any, float] = {}

    def __len__(self) -> int:
        return len(self._all)

    def __contains__(self, connection: object) -> bool:
        return connection in self._all

    def in_group(self, group: Hashable) -> int:
        """How many connections of `group` are in their handshake."""
        return len(self._groups.get(group, ()))

    def add(self, connection: Any, group: Hashable | None, now: float) -> list[Any]:
        """Track `connection` from `group`, accepted at `now`; returns the ones to close."""
        self._all[connection] = group
        self._new[connection] = now
        per_source = self.per_source
        members = None
        if group is not None and per_source:
            members = self._groups.setdefault(group, {})
            members[connection] = None
        # Within both bounds (nearly always): nothing to close, and no
        # call to `_trim` to find that out.
        if (members is None or len(members) <= per_source) and (not self.limit or len(self._all) <= self.limit):
            return []
        return self._trim(group)

    def fed(self, connection: Any) -> list[Any]:
        """`connection` sent bytes and still has no valid header; returns the ones to close."""
        if self._new.pop(connection, None) is None:
            return []
        return self._trim(self._make_ready(connection))

    def over(self, now: float) -> list[Any]:
        """Those waiting `grace` seconds have had their chance; returns the ones beyond the bounds at `now`."""
        new = self._new
        while new:
            connection, accepted = next(iter(new.items()))
            if now - accepted < self.grace:
                break
            del new[connection]
            self._make_ready(connection)
        out: list[Any] = []
        if self.per_source:
            for group in [g for g, m in self._groups.items() if len(m) > self.per_source]:
                out += self._trim(group, overall=False)
        return out + self._trim(None)

    def remove(self, connection: Any) -> None:
        """Forget `connection` (its handshake is over, or it closed); no matter if unknown."""
        if connection in self._all:
            self._pop(connection)

    def _make_ready(self, connection: Any) -> Hashable | None:
        group = self._all[connection]
        self._ready[connection] = None
        if group is not None and self.per_source:
            self._ready_groups.setdefault(group, {})[connection] = None
        return group

    def _trim(self, group: Hashable | None, overall: bool = True) -> list[Any]:
        out: list[Any] = []
        bounded: list[tuple[Any, Any, Hashable | None, int]] = []
        if group is not None and self.per_source:
            bounded.append((self._groups, self._ready_groups, group, self.per_source))
        if overall and self.limit:
            bounded.append((None, None, None, self.limit))
        for groups, ready_groups, name, bound in bounded:
            while True:
                members = self._all if groups is None else groups.get(name, {})
                if len(members) <= bound:
                    break
                ready = self._ready if ready_groups is None else ready_groups.get(name)
                if ready:
                    out.append(self._pop(next(iter(ready))))
                elif len(members) > 2 * bound:
                    out.append(self._pop(next(iter(members))))
                else:
                    break
        return out

    def _pop(self, connection: Any) -> Any:
        group = self._all.pop(connection)
        self._new.pop(connection, None)
        self._ready.pop(connection, None)
        for table in (self._groups, self._ready_groups):
            members = table.get(group) if group is not None else None
            if members is not None:
                members.pop(connection, None)
                if not members:
                    del table[group]
        return connection
