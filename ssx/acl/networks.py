"""
The address rules of an ACL list: IPv4 and IPv6 networks as sorted,
merged integer ranges, one table per family, searched with bisect
(O(log n) in the number of rules).  An IPv4-mapped IPv6 address is also
looked up as the IPv4 address it carries, and an IPv4 address also as its
mapped form, as shadowsocks-rust does.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
import socket
from typing import Tuple

__all__ = ["AddressRanges", "IpValue", "parse_ip"]

# (IP version, the address as an integer).
IpValue = Tuple[int, int]
_MAPPED = 0xFFFF << 32


def parse_ip(text: str) -> IpValue | None:
    """(4 or 6, the address as an integer) for an IP literal, or None for anything else (a name)."""
    # inet_pton: strict literals, and several times faster than ipaddress.
    if ":" in text:
        try:
            return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
        except (OSError, ValueError):
            return None
    if not text[-1:].isdigit():
        return None
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except (OSError, ValueError):
        return None


class _Family:
    __slots__ = ("pending", "starts", "ends")

    def __init__(self) -> None:
        self.pending: list[tuple[int, int]] = []
        self.starts: list[int] = []
        self.ends: list[int] = []

    def merge(self) -> None:
        ranges = sorted(self.pending + list(zip(self.starts, self.ends)))
        self.pending = []
        starts: list[int] = []
        ends: list[int] = []
        for start, end in ranges:
            if ends and start <= ends[-1] + 1:
                if end > ends[-1]:
                    ends[-1] = end
            else:
                starts.append(start)
                ends.append(end)
        self.starts, self.ends = starts, ends

    def contains(self, value: int) -> bool:
        i = bisect_right(self.starts, value) - 1
        return i >= 0 and value <= self.ends[i]


class AddressRanges:
    """Networks of both families; `add` them all, `freeze`, then ask `contains`."""

    __slots__ = ("_v4", "_v6")

    def __init__(self) -> None:
        self._v4 = _Family()
        self._v6 = _Family()

    def __bool__(self) -> bool:
        return bool(self._v4.starts or self._v6.starts or self._v4.pending or self._v6.pending)

    def __len__(self) -> int:
        """Merged ranges (after `freeze`)."""
        return len(self._v4.starts) + len(self._v6.starts)

    def add(self, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
        family = self._v4 if network.version == 4 else self._v6
        first = int(network.network_address)
        family.pending.append((first, first + network.num_addresses - 1))

    def freeze(self) -> None:
        """Sort and merge what was added."""
        self._v4.merge()
        self._v6.merge()

    def contains(self, address: IpValue) -> bool:
        version, value = address
        if version == 4:
            return self._v4.contains(value) or (bool(self._v6.starts) and self._v6.contains(_MAPPED | value))
        if self._v6.contains(value):
            return True
        return value >> 32 == 0xFFFF and self._v4.contains(value & 0xFFFFFFFF)
