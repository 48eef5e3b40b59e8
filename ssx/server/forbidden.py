"""
Which destination addresses the server refuses to connect to.

The server resolves a target name first, then asks `ForbiddenNetworks` about
each resulting IP, and connects only to an IP that passed: so no name, hosts
entry or address spelling can reach a network the operator closed.  No
Twisted here.

The `forbidden_ip` setting is a comma-separated list of IPs, CIDR networks
and three words:

* ``special``: the ranges below that are not globally reachable, from the
  IANA IPv4 and IPv6 Special-Purpose Address Registries (RFC 6890, RFC 8190),
  plus multicast and the IPv6 space IANA keeps outside global unicast;
* ``self``: every address of this host's interfaces, followed as they change
  (`ssx.server.host_addresses`), and the addresses that reach this host
  whatever its interfaces: 0.0.0.0/8 and :: (a connection to 0.0.0.0 or ::
  goes to this host's loopback services) and loopback;
* ``default``: both, which is also what an absent setting means.

A list replaces the default, as in the original shadowsocks: write
``default,203.0.113.0/24`` to add to it; a list without ``self`` lets
clients reach the host's own addresses; an empty list turns the check off.

IPv6 addresses that carry an IPv4 address are judged by that IPv4 address as
well as by their own range: a relay, tunnel or translator on the way turns
them into it (behind a NAT64 gateway 64:ff9b::a00:1 is 10.0.0.1).  See
`embedded_ipv4` for the forms.  Python's `ipaddress.is_global` is not used:
its tables differ between patch releases.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterable

from ssx.errors import ConfigError
from ssx.server.host_addresses import ALWAYS_LOCAL, HostAddresses

__all__ = [
    "DEFAULT_FORBIDDEN",
    "JUDGED_BY_CONTENT",
    "SPECIAL_PURPOSE",
    "ForbiddenNetworks",
    "embedded_ipv4",
    "parse_forbidden",
]


_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# (network, name, where it is defined).  Entries inside a larger one are
# listed for the reader: the larger one already refuses them.
SPECIAL_PURPOSE: tuple[tuple[str, str, str], ...] = (
    # IANA IPv4 Special-Purpose Address Registry, Globally Reachable = False.
    ("0.0.0.0/8", '"This network"', "RFC 791 §3.2; 0.0.0.0/32: RFC 1122 §3.2.1.3"),
    ("10.0.0.0/8", "Private-Use", "RFC 1918"),
    ("100.64.0.0/10", "Shared Address Space (CGNAT)", "RFC 6598"),
    ("127.0.0.0/8", "Loopback", "RFC 1122 §3.2.1.3"),
    ("169.254.0.0/16", "Link Local", "RFC 3927"),
    ("172.16.0.0/12", "Private-Use", "RFC 1918"),
    ("192.0.0.0/24", "IETF Protocol Assignments", "RFC 6890 §2.1"),
    ("192.0.0.0/29", "IPv4 Service Continuity Prefix", "RFC 7335"),
    ("192.0.0.8/32", "IPv4 dummy address", "RFC 7600"),
    ("192.0.0.170/31", "NAT64/DNS64 Discovery", "RFC 8880, RFC 7050 §2.2"),
    ("192.0.2.0/24", "Documentation (TEST-NET-1)", "RFC 5737"),
    ("192.168.0.0/16", "Private-Use", "RFC 1918"),
    ("198.18.0.0/15", "Benchmarking", "RFC 2544"),
    ("198.51.100.0/24", "Documentation (TEST-NET-2)", "RFC 5737"),
    ("203.0.113.0/24", "Documentation (TEST-NET-3)", "RFC 5737"),
    ("240.0.0.0/4", "Reserved", "RFC 1112 §4"),
    ("255.255.255.255/32", "Limited Broadcast", "RFC 8190, RFC 919 §7"),
    # IANA IPv4 Multicast Address Space Registry.
    ("224.0.0.0/4", "Multicast", "RFC 5771"),
    # IANA IPv6 Special-Purpose Address Registry, Globally Reachable = False.
    ("::1/128", "Loopback Address", "RFC 4291"),
    ("::/128", "Unspecified Address", "RFC 4291"),
    ("64:ff9b:1::/48", "IPv4-IPv6 Translation, local use", "RFC 8215"),
    ("100::/64", "Discard-Only Address Block", "RFC 6666"),
    ("100:0:0:1::/64", "Dummy IPv6 Prefix", "RFC 9780"),
    ("2001::/23", "IETF Protocol Assignments", "RFC 2928"),
    ("2001::/32", "TEREDO", "RFC 4380, RFC 8190"),
    ("2001:2::/48", "Benchmarking", "RFC 5180, RFC Errata 1752"),
    ("2001:10::/28", "ORCHID (deprecated)", "RFC 4843"),
    # Globally reachable in the registry, but identifiers rather than
    # locators: a host running HIP resolves them itself.
    ("2001:20::/28", "ORCHIDv2", "RFC 7343"),
    ("2001:30::/28", "Drone Remote ID Protocol Entity Tags (DETs)", "RFC 9374"),
    ("2001:db8::/32", "Documentation", "RFC 3849"),
    ("3fff::/20", "Documentation", "RFC 9637"),
    ("5f00::/16", "Segment Routing (SRv6) SIDs", "RFC 9602"),
    ("fc00::/7", "Unique-Local", "RFC 4193, RFC 8190"),
    ("fe80::/10", "Link-Local Unicast", "RFC 4291"),
    # IANA IPv6 Address Space Registry: all but 2000::/3 (global unicast) is
    # reserved, unique-local, link-local or multicast.
    ("::/8", "Reserved by IETF (IPv4-compatible ::/96 deprecated by RFC 4291 §2.5.5.1)", "RFC 4291"),
    ("100::/8", "Reserved by IETF", "RFC 4291"),
    ("200::/7", "Reserved by IETF", "RFC 4048"),
    ("400::/6", "Reserved by IETF", "RFC 4291"),
    ("800::/5", "Reserved by IETF", "RFC 4291"),
    ("1000::/4", "Reserved by IETF", "RFC 4291"),
    ("4000::/3", "Reserved by IETF", "RFC 4291"),
    ("6000::/3", "Reserved by IETF", "RFC 4291"),
    ("8000::/3", "Reserved by IETF", "RFC 4291"),
    ("a000::/3", "Reserved by IETF", "RFC 4291"),
    ("c000::/3", "Reserved by IETF", "RFC 4291"),
    ("e000::/4", "Reserved by IETF", "RFC 4291"),
    ("f000::/5", "Reserved by IETF", "RFC 4291"),
    ("f800::/6", "Reserved by IETF", "RFC 4291"),
    ("fe00::/9", "Reserved by IETF", "RFC 4291"),
    ("fec0::/10", "Reserved by IETF, formerly Site-Local", "RFC 3879"),
    ("ff00::/8", "Multicast", "RFC 4291"),
)

# Inside the ranges above, but globally reachable (the registries say so) or
# carrying an IPv4 address by which they are judged instead: `special` does
# not refuse these by range.  An explicit entry in the list still does.
JUDGED_BY_CONTENT: tuple[tuple[str, str, str], ...] = (
    ("192.0.0.9/32", "Port Control Protocol Anycast", "RFC 7723"),
    ("192.0.0.10/32", "Traversal Using Relays around NAT Anycast", "RFC 8155"),
    ("::ffff:0:0/96", "IPv4-mapped Address: judged by its IPv4 address", "RFC 4291"),
    ("64:ff9b::/96", "IPv4-IPv6 Translation: judged by its IPv4 address", "RFC 6052"),
    ("2001:1::1/128", "Port Control Protocol Anycast", "RFC 7723"),
    ("2001:1::2/128", "Traversal Using Relays around NAT Anycast", "RFC 8155"),
    ("2001:1::3/128", "DNS-SD Service Registration Protocol Anycast", "RFC 9665"),
    ("2001:3::/32", "AMT", "RFC 7450"),
    ("2001:4:112::/48", "AS112-v6", "RFC 7535"),
)

SPECIAL = "special"
SELF = "self"
DEFAULT = "default"
DEFAULT_FORBIDDEN = (DEFAULT,)
_WORDS = {SPECIAL: (SPECIAL,), SELF: (SELF,), DEFAULT: (SPECIAL, SELF)}

# IPv4 and IPv6 addresses as one integer line: IPv4 above all of IPv6.
_V4_BASE = 1 << 128
_V4_MASK = 0xFFFFFFFF


def _key(address: _Address) -> int:
    return int(address) + (_V4_BASE if address.version == 4 else 0)


def _span(network: _Network) -> tuple[int, int]:
    base = _V4_BASE if network.version == 4 else 0
    return base + int(network.network_address), base + int(network.broadcast_address)


class _Ranges:
    """Disjoint integer ranges, looked up by bisection."""

    def __init__(self, spans: Iterable[tuple[int, int]]) -> None:
        merged: list[list[int]] = []
        for start, end in sorted(spans):
            if merged and start <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.spans = [(start, end) for start, end in merged]
        self._starts = [start for start, _ in merged]

    def __contains__(self, value: int) -> bool:
        i = bisect_right(self._starts, value) - 1
        return i >= 0 and value <= self.spans[i][1]

    def __bool__(self) -> bool:
        return bool(self.spans)

    def without(self, holes: _Ranges) -> _Ranges:
        """These ranges with every value of `holes` taken out."""
        kept: list[tuple[int, int]] = []
        for start, end in self.spans:
            for hole_start, hole_end in holes.spans:
                if hole_end < start or hole_start > end:
                    continue
                if hole_start > start:
                    kept.append((start, hole_start - 1))
                start = hole_end + 1
                if start > end:
                    break
            if start <= end:
                kept.append((start, end))
        return _Ranges(kept)


def _table_ranges(table: Iterable[tuple[str, str, str]]) -> _Ranges:
    return _Ranges(_span(ipaddress.ip_network(network)) for network, _, _ in table)


_SPECIAL_RANGES = _table_ranges(SPECIAL_PURPOSE).without(_table_ranges(JUDGED_BY_CONTENT))


def _bits(value: int, start: int, length: int) -> int:
    """`length` bits of a 128-bit value from bit `start` (0 = the most significant)."""
    return (value >> (128 - start - length)) & ((1 << length) - 1)


def embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    """
    The IPv4 addresses an IPv6 address carries, for the forms a host, relay
    or translator may turn into IPv4:

    * IPv4-mapped ``::ffff:a.b.c.d`` and IPv4-compatible ``::a.b.c.d`` (RFC 4291 §2.5.5);
    * SIIT IPv4-translated ``::ffff:0:a.b.c.d`` (RFC 2765 §2.1);
    * NAT64 ``64:ff9b::/96`` (RFC 6052) and the local-use ``64:ff9b:1::/48``
      (RFC 8215), read at each RFC 6052 §2.2 position a prefix inside that
      /48 may use (/48, /56, /64, /96), since the operator's length is unknown;
    * 6to4 ``2002:AABB:CCDD::/48`` (RFC 3056 §2);
    * Teredo ``2001:0::/32``: the server, and the client stored inverted (RFC 4380 §4);
    * ISATAP interface identifiers ``::0:5efe:a.b.c.d`` and ``::200:5efe:a.b.c.d`` (RFC 5214 §6.1).
    """
    x = int(address)
    high96 = x >> 32
    found: list[int] = []
    if high96 in (0, 0xFFFF, 0xFFFF0000, 0x0064FF9B << 64):
        found.append(x & _V4_MASK)
    elif x >> 80 == 0x0064FF9B0001:
        found += [
            _bits(x, 48, 16) << 16 | _bits(x, 72, 16),
            _bits(x, 56, 8) << 24 | _bits(x, 72, 24),
            _bits(x, 72, 32),
            x & _V4_MASK,
        ]
    elif x >> 112 == 0x2002:
        found.append(_bits(x, 16, 32))
    elif x >> 96 == 0x20010000:
        found += [_bits(x, 32, 32), ~x & _V4_MASK]
    if _bits(x, 64, 32) & 0xFCFFFFFF == 0x00005EFE:
        found.append(x & _V4_MASK)
    return tuple(ipaddress.IPv4Address(v) for v in dict.fromkeys(found))


def _keys(ip: str) -> tuple[int, ...] | None:
    """The points to look up for `ip`: itself and any IPv4 address it carries; None if not an IP."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        return (_key(address), *(_key(v4) for v4 in embedded_ipv4(address)))
    return (_key(address),)


@dataclass(frozen=True)
class ForbiddenNetworks:
    """
    The parsed `forbidden_ip` setting; `forbids(ip)` tells whether an IP is refused.

    `entries` is the setting, normalised (``special``, ``self``, CIDRs);
    `host` the live set of this host's addresses when ``self`` is among them.
    """

    entries: tuple[str, ...]
    host: HostAddresses | None = field(default=None, compare=False)
    # Answers per IP, bounded: the server asks for every connection and
    # datagram, and parsing an address costs more than the relaying around
    # it.  The cache is replaced whenever the host's addresses change, so no
    # answer outlives them.
    _ranges: _Ranges = field(init=False, repr=False, compare=False)
    _state: list = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        spans: list[tuple[int, int]] = []
        for entry in self.entries:
            if entry == SPECIAL:
                spans += _SPECIAL_RANGES.spans
            elif entry == SELF:
                # Fixed, unlike the interfaces' addresses: no read can lose them.
                spans += [_span(network) for network in ALWAYS_LOCAL]
            else:
                spans.append(_span(ipaddress.ip_network(entry)))
        object.__setattr__(self, "_ranges", _Ranges(spans))
        # [the host networks the cache was made for, the cached judge]
        object.__setattr__(self, "_state", [None, self._judge_for(_Ranges(()))])

    @property
    def off(self) -> bool:
        """Whether nothing at all is refused."""
        return not self.entries

    def forbids(self, ip: str) -> bool:
        """
        True if `ip` (an IP literal) is refused.

        Anything that does not parse as an IP is refused: the caller is meant
        to pass resolved addresses only.
        """
        if not self.entries:
            return False
        state = self._state
        if self.host is not None:
            networks = self.host.networks
            if networks is not state[0]:
                state[1] = self._judge_for(_Ranges(_span(n) for n in networks))
                state[0] = networks
        return state[1](ip)

    def _judge_for(self, host: _Ranges) -> Callable[[str], bool]:
        fixed = self._ranges

        def judge(ip: str) -> bool:
            keys = _keys(ip)
            if keys is None:
                return True
            return any(key in fixed or key in host for key in keys)

        return lru_cache(maxsize=4096)(judge)

    def __str__(self) -> str:
        return ",".join(self.entries) or "(none)"


def parse_forbidden(
    text: str | list[str] | tuple[str, ...] | None, host: HostAddresses | None = None
) -> ForbiddenNetworks:
    """
    Parse the `forbidden_ip` setting: comma-separated IPs, CIDRs, ``special``,
    ``self`` and ``default``.

    None means ``default``; an empty string or list turns the check off.
    `host` is the set of this host's addresses that ``self`` uses (by default
    one read from the kernel on first use).
    """
    if text is None:
        items: list[str] = list(DEFAULT_FORBIDDEN)
    elif isinstance(text, str):
        items = [part.strip() for part in text.split(",") if part.strip()]
    elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        items = [t.strip() for t in text if t.strip()]
    else:
        raise ConfigError("forbidden_ip", "expected a comma-separated string of IPs/CIDRs, 'default', 'special' or 'self'")
    entries: list[str] = []
    for item in items:
        word = _WORDS.get(item.lower())
        if word is not None:
            entries += word
            continue
        try:
            entries.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ConfigError(
                "forbidden_ip", f"{item!r} is not an IP address, a CIDR network, 'default', 'special' or 'self'"
            ) from None
    unique = tuple(dict.fromkeys(entries))
    if SELF in unique and host is None:
        host = HostAddresses()
    return ForbiddenNetworks(unique, host if SELF in unique else None)
