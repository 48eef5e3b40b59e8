"""
The kernel's socket addresses as transparent proxying reads them: a
`sockaddr_in`/`sockaddr_in6` (from getsockopt `SO_ORIGINAL_DST` after a NAT
redirect, or inside the `IP_ORIGDSTADDR`/`IPV6_ORIGDSTADDR` control message
`recvmsg` returns under TPROXY) to (IP, port).  `ssx.net.transparent` owns
the sockets; these are the bytes.  No Twisted here.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Iterable

__all__ = [
    "IPV6_ORIGDSTADDR",
    "IP_ORIGDSTADDR",
    "SOCKADDR_IN6_SIZE",
    "SOCKADDR_IN_SIZE",
    "SOL_IP",
    "SOL_IPV6",
    "original_destination",
    "parse_sockaddr",
    "plain_ip",
]

# Linux's values (<linux/in.h>, <linux/in6.h>).
SOL_IP = 0
SOL_IPV6 = 41
IP_ORIGDSTADDR = 20  # the control message's type (IP_RECVORIGDSTADDR asks for it)
IPV6_ORIGDSTADDR = 74
SOCKADDR_IN_SIZE = 16
SOCKADDR_IN6_SIZE = 28


def parse_sockaddr(data: bytes) -> tuple[str, int]:
    """
    (IP, port) of a kernel `sockaddr_in` or `sockaddr_in6`; ValueError for
    anything else.  The family field is in host byte order, the port in
    network order (so each is unpacked apart: struct takes one order per format).
    IPv4-mapped IPv6 addresses come back as IPv4.
    """
    if len(data) < 2:
        raise ValueError("no address family in a socket address of %d bytes" % len(data))
    family = struct.unpack_from("=H", data)[0]
    if family == socket.AF_INET and len(data) >= SOCKADDR_IN_SIZE:
        port = struct.unpack_from("!H", data, 2)[0]
        return socket.inet_ntop(socket.AF_INET, data[4:8]), port
    if family == socket.AF_INET6 and len(data) >= SOCKADDR_IN6_SIZE:
        port = struct.unpack_from("!H", data, 2)[0]
        return plain_ip(socket.inet_ntop(socket.AF_INET6, data[8:24])), port
    raise ValueError(f"not a sockaddr_in or sockaddr_in6: family {family}, {len(data)} bytes")


def plain_ip(ip: str) -> str:
    """An IPv4-mapped IPv6 address as IPv4; any other address as given."""
    try:
        mapped = getattr(ipaddress.ip_address(ip), "ipv4_mapped", None)
    except ValueError:
        return ip
    return str(mapped) if mapped is not None else ip


def original_destination(ancillary: Iterable[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    """A datagram's destination before TPROXY, from `recvmsg`'s control messages (None: none there)."""
    for level, kind, data in ancillary:
        if (level, kind) in ((SOL_IP, IP_ORIGDSTADDR), (SOL_IPV6, IPV6_ORIGDSTADDR)):
            try:
                return parse_sockaddr(data)
            except ValueError:
                return None
    return None
