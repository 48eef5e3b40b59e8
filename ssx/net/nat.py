"""
A bounded, time-expiring LRU table: the NAT of the UDP relays.

Each end keeps one entry per client (address, or 2022 session later) with the
socket that talks upstream for it.  `touch` on every packet keeps an entry
alive and most recent; `sweep` (called periodically with the reactor's
clock by the owner) expires idle entries from the old end; adding beyond
`capacity` evicts the least recently used.  So a flood of distinct clients
costs at most `capacity` entries.  No Twisted here: time is a callable.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Generic, Hashable, Iterator, TypeVar

__all__ = ["MAX_DATAGRAM", "READ_SIZE", "NatTable", "SweptNatProtocol", "datagram_sender", "send_datagram"]

# The largest UDP payload an IPv4 datagram can carry.
MAX_DATAGRAM = 65507
# What every UDP socket of ours reads at once: Twisted's default (8192)
# would silently truncate larger datagrams.
READ_SIZE = 65535

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class NatTable(Generic[K, V]):
    """Key -> value with LRU order, idle expiry and a size bound."""

    def __init__(
        self,
        now: Callable[[], float],
        timeout: float,
        capacity: int,
        on_evict: Callable[[K, V], None] = lambda key, value: None,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._now = now
        self.timeout = timeout
        self.capacity = capacity
        self._on_evict = on_evict
        # key -> [value, last_seen]; insertion order = least recently used first.
        self._entries: OrderedDict[K, list] = OrderedDict()
        self.evicted = 0
        self.expired = 0
        # Keys added in all (those removed since: `added - len(self)`).
        self.added = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._entries))

    def get(self, key: K) -> V | None:
        """The value for `key` (refreshed as just used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        entry[1] = self._now()
        self._entries.move_to_end(key)
        return entry[0]

    def peek(self, key: K) -> V | None:
        """The value for `key` without refreshing it."""
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def touch(self, key: K) -> None:
        """Mark `key` as just used."""
        # `get`'s body, not a call to it: the UDP relays touch on every datagram.
        entry = self._entries.get(key)
        if entry is not None:
            entry[1] = self._now()
            self._entries.move_to_end(key)

    def add(self, key: K, value: V) -> None:
        """Insert (or replace) `key`; evicts the least recently used entry when full."""
        old = self._entries.pop(key, None)
        if old is not None:
            self._on_evict(key, old[0])
        else:
            self.added += 1
        while len(self._entries) >= self.capacity:
            lru_key, (lru_value, _) = self._entries.popitem(last=False)
            self.evicted += 1
            self._on_evict(lru_key, lru_value)
        self._entries[key] = [value, self._now()]

    def remove(self, key: K) -> V | None:
        """Remove `key` (its eviction callback runs); returns its value."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self._on_evict(key, entry[0])
        return entry[0]

    def sweep(self) -> int:
        """Expire entries idle for `timeout` or longer; returns how many."""
        deadline = self._now() - self.timeout
        count = 0
        entries = self._entries
        while entries:
            key, entry = next(iter(entries.items()))
            if entry[1] > deadline:
                break
            del entries[key]
            count += 1
            self._on_evict(key, entry[0])
        self.expired += count
        return count

    def clear(self) -> None:
        """Remove everything (eviction callbacks run)."""
        while self._entries:
            key, (value, _) = self._entries.popitem(last=False)
            self._on_evict(key, value)


def send_datagram(port: Any, data: bytes, address: tuple) -> None:
    """
    `port.write(data, address)` on a Twisted UDP port, without the checks
    Twisted makes of the address text on every datagram (a third of the cost
    of a write, measured): the relays send only to addresses their sockets
    reported or that passed `is_ip_literal`.  Raises OSError as `write`
    does, also for a refused or oversized datagram.
    """
    sock = getattr(port, "socket", None)
    if sock is None:  # not a socket-backed port (tests' fakes)
        port.write(data, address)
    else:
        sock.sendto(data, address)


def datagram_sender(port: Any) -> Callable[[bytes, tuple], Any]:
    """
    `send_datagram` bound to `port` once: its socket's own `sendto`, so a
    datagram costs one call.  Valid while the port listens (its socket
    does not change); raises OSError as `send_datagram` does.
    """
    sock = getattr(port, "socket", None)
    return port.write if sock is None else sock.sendto


class SweptNatProtocol:
    """
    Mixin for a UDP relay protocol (a twisted DatagramProtocol) that keeps
    a `NatTable` whose values have a `close()`: the table is swept on the
    reactor's clock while the protocol runs, and emptied when it stops.
    (The reactor is used only through `seconds` and `callLater`.)
    """

    def setup_nat(self, reactor: Any, timeout: float, capacity: int) -> None:
        from twisted.internet.task import LoopingCall

        self.reactor = reactor
        self.nat: NatTable[Any, Any] = NatTable(
            reactor.seconds, timeout, capacity, on_evict=lambda key, value: value.close()
        )
        self._sweeper = LoopingCall(self.nat.sweep)
        self._sweeper.clock = reactor
        # Counters for logs and tests now, for stats and metrics later.
        self.received = 0
        self.dropped = 0
        # `datagram_sender` of this protocol's port, bound at first use.
        self._sendto: Callable[[bytes, tuple], Any] | None = None

    def bind_sender(self) -> Callable[[bytes, tuple], Any]:
        """
        `datagram_sender` of this protocol's port, kept in `_sendto` until
        the protocol stops: the hot paths call
        ``(self._sendto or self.bind_sender())(data, client)``.
        """
        sendto = self._sendto = datagram_sender(self.transport)  # type: ignore[attr-defined]
        return sendto

    def startProtocol(self) -> None:
        self._sweeper.start(max(1.0, min(self.nat.timeout / 4, 15.0)), now=False)

    def stopProtocol(self) -> None:
        self._sendto = None
        if self._sweeper.running:
            self._sweeper.stop()
        self.nat.clear()
