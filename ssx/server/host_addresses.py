"""
This host's own addresses, read from the kernel: what the `self` entry of
`forbidden_ip` refuses (see `ssx.server.forbidden`).

A server that binds services to 0.0.0.0 (databases, admin panels, metrics)
and relies on a firewall to hide them from outside is reachable through the
proxy at its own public address: the kernel delivers such a connection
locally, the firewall never sees it come from outside.  So the server refuses
every address of every local interface, whatever it is.

How the addresses are read: on Linux, one rtnetlink RTM_GETADDR dump
(RFC 3549; `linux/rtnetlink.h`, `linux/if_addr.h`) over an AF_NETLINK socket,
parsed here with `struct`.  It lists every address of every interface, IPv4
and IPv6, in this network namespace, the same list `ip addr` shows.  Kept:

* each interface's own address (IFA_LOCAL, or IFA_ADDRESS where there is no
  IFA_LOCAL: on a point-to-point link IFA_ADDRESS is the peer's);
* IPv4 broadcast addresses (IFA_BROADCAST), which reach the host too;
* for IPv4 addresses on the loopback device (ifindex 1 in every namespace),
  the whole prefix: the kernel makes all of it local (`local 127.0.0.0/8 dev
  lo` in the local routing table), so 198.51.100.0/24 added on lo answers at
  every address in it.

Why a dump rather than asking the route for each destination (a connected
UDP socket's source address, or RTM_GETROUTE): the answer is one small set
checked in memory for every connection, with no system call on the data
path, and the same set can be logged so the operator sees what is refused.
Changes are followed by `ssx.server.host_address_watch`, which subscribes to the
kernel's address notifications and calls `HostAddresses.refresh`.  Not seen:
destinations made local by hand-written `local` routes (`ip route add local
PREFIX`, "AnyIP") that no interface address covers.

Where there is no netlink (not Linux), the addresses the host's name
resolves to are used, with a warning, and re-read periodically.

Whatever the interfaces say, `ALWAYS_LOCAL` reaches this host too: the
"this host" addresses and loopback.  `self` refuses them as well.

No Twisted here.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

__all__ = [
    "ALWAYS_LOCAL",
    "HostAddresses",
    "InterfaceAddress",
    "NetlinkError",
    "RTMGRP_IPV4_IFADDR",
    "RTMGRP_IPV6_IFADDR",
    "address_change_socket",
    "address_dump_request",
    "addresses_of_host_name",
    "host_networks",
    "netlink_available",
    "parse_address_messages",
    "read_host_networks",
    "read_interface_addresses",
]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Destinations that reach this host whatever addresses its interfaces
# have.  "This host on this network", 0.0.0.0/8 (RFC 1122 §3.2.1.3), and
# the unspecified address :: (RFC 4291 §2.5.2) are no interface's address,
# yet Linux takes a connection or datagram to 0.0.0.0 or :: as one to
# itself and delivers it over loopback, to every service bound to 0.0.0.0,
# ::, 127.0.0.1 or ::1.  Loopback (127.0.0.0/8, ::1) is listed too, so that
# it is refused even where the read misses it (lo down, no netlink).
ALWAYS_LOCAL: tuple[_Network, ...] = tuple(
    ipaddress.ip_network(n) for n in ("0.0.0.0/8", "127.0.0.0/8", "::/128", "::1/128")
)

# linux/netlink.h
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x100 | 0x200  # NLM_F_ROOT | NLM_F_MATCH
# linux/rtnetlink.h
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
# linux/if_addr.h
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_BROADCAST = 4
# The loopback device has this index in every network namespace (LOOPBACK_IFINDEX).
LOOPBACK_IFINDEX = 1

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface index
_RTATTR = struct.Struct("=HH")  # length, type
_FAMILIES = {socket.AF_INET: 4, socket.AF_INET6: 16}
# Enough for any dump message the kernel sends (it fills at most 32 KiB per read).
_RECEIVE_SIZE = 1 << 16
_DUMP_ATTEMPTS = 5


class NetlinkError(OSError):
    """The kernel answered a netlink request with an error, or not at all sensibly."""


@dataclass(frozen=True)
class InterfaceAddress:
    """One address of one interface, as the kernel lists it."""

    index: int
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    prefix_length: int
    broadcast: ipaddress.IPv4Address | None = None


def _align(length: int) -> int:
    return (length + 3) & ~3


def address_dump_request(sequence: int) -> bytes:
    """An RTM_GETADDR dump request for every address of both families."""
    body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, sequence, 0) + body


def _messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, flags, payload) of each netlink message in one read."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, flags, _, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise NetlinkError(f"malformed netlink message (length {length})")
        yield kind, flags, data[offset + _NLMSGHDR.size : offset + length]
        offset += _align(length)


def _attributes(data: bytes) -> dict[int, bytes]:
    """The route attributes (rtattr) in `data`, by type; the first of each type wins."""
    found: dict[int, bytes] = {}
    offset = 0
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > len(data):
            break
        found.setdefault(kind, data[offset + _RTATTR.size : offset + length])
        offset += _align(length)
    return found


def _address_message(payload: bytes) -> InterfaceAddress | None:
    """The address an RTM_NEWADDR payload describes, or None for another family or a short message."""
    if len(payload) < _IFADDRMSG.size:
        return None
    family, prefix_length, _, _, index = _IFADDRMSG.unpack_from(payload)
    size = _FAMILIES.get(family)
    if size is None:
        return None
    attributes = _attributes(payload[_IFADDRMSG.size :])
    raw = attributes.get(IFA_LOCAL) or attributes.get(IFA_ADDRESS)
    if raw is None or len(raw) != size:
        return None
    address = ipaddress.ip_address(raw)
    broadcast = attributes.get(IFA_BROADCAST)
    return InterfaceAddress(
        index,
        address,
        prefix_length,
        ipaddress.IPv4Address(broadcast) if family == socket.AF_INET and broadcast and len(broadcast) == 4 else None,
    )


def parse_address_messages(data: bytes) -> tuple[list[InterfaceAddress], bool, bool]:
    """
    Parse one read of an address dump: (addresses, finished, interrupted).

    `finished` is True at NLMSG_DONE; `interrupted` when the kernel flags
    that the addresses changed during the dump (NLM_F_DUMP_INTR), which then
    has to be started again.  An NLMSG_ERROR raises NetlinkError.
    """
    found: list[InterfaceAddress] = []
    finished = interrupted = False
    for kind, flags, payload in _messages(data):
        interrupted = interrupted or bool(flags & NLM_F_DUMP_INTR)
        if kind == NLMSG_DONE:
            finished = True
            break
        if kind == NLMSG_ERROR:
            code = struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else -1
            if code == 0:  # an acknowledgement
                continue
            raise NetlinkError(-code, f"netlink error {-code}")
        if kind == RTM_NEWADDR:
            parsed = _address_message(payload)
            if parsed is not None:
                found.append(parsed)
    return found, finished, interrupted


def netlink_available() -> bool:
    """Whether this system has rtnetlink sockets (Linux)."""
    return hasattr(socket, "AF_NETLINK") and hasattr(socket, "NETLINK_ROUTE")


def read_interface_addresses() -> list[InterfaceAddress]:
    """Every address of every interface in this network namespace (Linux; OSError elsewhere)."""
    if not netlink_available():
        raise OSError("no rtnetlink on this system")
    for sequence in range(1, _DUMP_ATTEMPTS + 1):
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as s:
            s.settimeout(5.0)
            s.bind((0, 0))
            s.sendto(address_dump_request(sequence), (0, 0))
            found: list[InterfaceAddress] = []
            interrupted = False
            while True:
                addresses, finished, cut = parse_address_messages(s.recv(_RECEIVE_SIZE))
                found.extend(addresses)
                interrupted = interrupted or cut
                if finished:
                    break
        if not interrupted:
            return found
    raise NetlinkError("the interface addresses kept changing during the dump")


def address_change_socket() -> socket.socket:
    """
    A non-blocking rtnetlink socket that receives a message whenever an
    IPv4 or IPv6 address is added or removed (Linux; OSError elsewhere).
    """
    if not netlink_available():
        raise OSError("no rtnetlink on this system")
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    try:
        s.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def host_networks(addresses: Iterable[InterfaceAddress]) -> tuple[_Network, ...]:
    """The destinations `addresses` make local: each address, IPv4 broadcasts, whole IPv4 prefixes on lo."""
    networks: set[_Network] = set()
    for entry in addresses:
        if entry.index == LOOPBACK_IFINDEX and entry.address.version == 4:
            networks.add(ipaddress.ip_network(f"{entry.address}/{entry.prefix_length}", strict=False))
        else:
            networks.add(ipaddress.ip_network(entry.address))
        if entry.broadcast is not None:
            networks.add(ipaddress.ip_network(entry.broadcast))
    return tuple(sorted(networks, key=lambda n: (n.version, n.network_address, n.prefixlen)))


def addresses_of_host_name() -> tuple[_Network, ...]:
    """Without netlink: what the host's own name resolves to, plus loopback."""
    networks: set[_Network] = {ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")}
    try:
        answers = socket.getaddrinfo(socket.gethostname(), None)
    except OSError:
        answers = []
    for _, _, _, _, sockaddr in answers:
        try:
            networks.add(ipaddress.ip_network(str(sockaddr[0]).split("%", 1)[0]))
        except ValueError:
            pass
    return tuple(sorted(networks, key=lambda n: (n.version, n.network_address, n.prefixlen)))


def read_host_networks() -> tuple[_Network, ...]:
    """This host's local destinations, read by netlink (OSError where that fails)."""
    return host_networks(read_interface_addresses())


class HostAddresses:
    """
    The current set of this host's addresses, shared by the forbidden check
    and the watcher that keeps it up to date.

    Read on first use if nobody has refreshed it yet, so that a check never
    runs against an empty set; `refresh()` reads again (the watcher calls it
    on every change), `listeners` are told of every new set.
    """

    def __init__(self, reader: Callable[[], tuple[_Network, ...]] = read_host_networks) -> None:
        self.reader = reader
        self._networks: tuple[_Network, ...] | None = None
        self._read = False  # whether `reader` ever succeeded
        # Why the last read failed, if it did (the watcher logs it).
        self.problem: str | None = None
        self.listeners: list[Callable[[tuple[_Network, ...]], None]] = []

    @property
    def networks(self) -> tuple[_Network, ...]:
        if self._networks is None:
            self.refresh()
        assert self._networks is not None
        return self._networks

    def refresh(self) -> tuple[_Network, ...]:
        """
        Read the addresses again; returns the new set.

        If the reader fails, the last set it gave stays, or, if it never
        gave one, the addresses of the host's name are used; `problem` then
        says why.
        """
        try:
            networks = tuple(self.reader())
            self.problem = None
            self._read = True
        except OSError as e:
            self.problem = str(e) or type(e).__name__
            if self._read and self._networks is not None:
                return self._networks
            networks = addresses_of_host_name()
        changed = networks != self._networks
        self._networks = networks
        if changed:
            for listener in list(self.listeners):
                listener(networks)
        return networks

    @property
    def known(self) -> bool:
        """Whether the addresses have been read at least once."""
        return self._networks is not None
