"""
The sockets of transparent proxying (the local end's `--redir` and
`--tproxy`), which Twisted has no endpoint for: built here, then adopted
by the reactor (TCP) or read here with `recvmsg` (UDP, whose ancillary data
Twisted's datagram ports do not pass on).

Where each connection or datagram was going before the firewall diverted
it to us:

- TCP, NAT redirect (`REDIRECT`): the kernel's conntrack entry, read with
  getsockopt `SO_ORIGINAL_DST` (IPv4) / `IP6T_SO_ORIGINAL_DST` (IPv6) on
  the accepted socket;
- TCP, TPROXY: the accepted socket's own local address (the listener has
  `IP_TRANSPARENT`, so it accepts connections to any address);
- UDP, TPROXY: each datagram's `IP_ORIGDSTADDR` / `IPV6_ORIGDSTADDR`
  control message (asked for with `IP_RECVORIGDSTADDR`); replies leave from
  a socket bound transparently to that address (`reply_socket`), so the
  client sees an answer from the address it sent to.

The kernel's bytes (`sockaddr_in`/`sockaddr_in6`, control messages) are
parsed by `ssx.wire.sockaddr`; `set_mark` (SO_MARK) marks the local end's
own connections so the firewall does not divert them again;
`is_local_address` tells the host's own addresses, for the loop guard.  Setting
`IP_TRANSPARENT` and `SO_MARK` needs CAP_NET_ADMIN: `transparent_problem`
and `mark_problem` say so in one line, for start-up.
"""

from __future__ import annotations

import errno
import socket
from typing import Any, Callable

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IConnector, IReactorPluggableNameResolver
from twisted.logger import Logger
from zope.interface import implementer

from ssx.net import tcp
from ssx.net.outbound import SO_MARK, set_mark
from ssx.wire.sockaddr import (
    IP_ORIGDSTADDR,
    IPV6_ORIGDSTADDR,
    SOCKADDR_IN6_SIZE,
    SOCKADDR_IN_SIZE,
    SOL_IP,
    SOL_IPV6,
    original_destination,
    parse_sockaddr,
)

__all__ = [
    "IP6T_SO_ORIGINAL_DST",
    "IPV6_TRANSPARENT",
    "IP_TRANSPARENT",
    "SO_MARK",
    "SO_ORIGINAL_DST",
    "TransparentDatagramReader",
    "MarkingReactor",
    "is_local_address",
    "mark_problem",
    "redirected_destination",
    "reply_socket",
    "set_mark",
    "tcp_listener",
    "transparent_problem",
    "udp_listener",
]

_log = Logger()

# Linux's values (<linux/in.h>, <linux/in6.h>, <linux/netfilter_ipv4.h>);
# Python's socket module names only some of them, and only on some builds.
IP_TRANSPARENT: int = getattr(socket, "IP_TRANSPARENT", 19)
IP_RECVORIGDSTADDR = IP_ORIGDSTADDR
IPV6_TRANSPARENT = 75
IPV6_RECVORIGDSTADDR = IPV6_ORIGDSTADDR
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80

# Room for one control message carrying a sockaddr_in6 (the larger).
ANCILLARY_SIZE = socket.CMSG_SPACE(SOCKADDR_IN6_SIZE)
READ_SIZE = 65535
# Datagrams read per readable event, so one busy socket cannot starve the reactor.
_READS_PER_EVENT = 64


def redirected_destination(sock: socket.socket) -> tuple[str, int]:
    """An accepted connection's destination before NAT redirect (OSError where there was none)."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, SOCKADDR_IN6_SIZE)
    else:
        raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_SIZE)
    try:
        return parse_sockaddr(raw)
    except ValueError as e:
        raise OSError(errno.EINVAL, str(e)) from None


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _make_transparent(sock: socket.socket) -> None:
    if sock.family == socket.AF_INET6:
        sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
        # Our IPv6 sockets take IPv6 only: an IPv4 one binds the same port
        # beside them, and each family's control messages stay its own.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    else:
        sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)


def tcp_listener(
    host: str, port: int, transparent: bool, backlog: int = 1024, reuse_port: bool = False,
) -> socket.socket:
    """
    A listening TCP socket on host:port, non-blocking; `transparent` for
    TPROXY (IP_TRANSPARENT); `reuse_port` shares the port (SO_REUSEPORT:
    --reuse-port, and every --workers worker binding its own).
    """
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if transparent:
            _make_transparent(sock)
        elif sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def udp_listener(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A TPROXY UDP socket on host:port that reports each datagram's original destination (`reuse_port`: as TCP's)."""
    sock = socket.socket(_family(host), socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        _make_transparent(sock)
        if sock.family == socket.AF_INET6:
            sock.setsockopt(SOL_IPV6, IPV6_RECVORIGDSTADDR, 1)
        else:
            sock.setsockopt(SOL_IP, IP_RECVORIGDSTADDR, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def reply_socket(source: tuple[str, int], mark: int | None = None) -> socket.socket:
    """
    A UDP socket bound transparently to `source`, a diverted datagram's
    destination (an address not necessarily ours), to answer from it;
    its packets carry `mark` (SO_MARK) if given.
    """
    sock = socket.socket(_family(source[0]), socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _make_transparent(sock)
        if mark is not None:
            set_mark(sock, mark)
        sock.bind(source)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def is_local_address(ip: str) -> bool:
    """
    Whether `ip` is one of this host's own addresses: a plain socket (not
    transparent) can bind it.  (With the `ip_nonlocal_bind` sysctl on, any
    address binds and counts as ours.)
    """
    try:
        with socket.socket(_family(ip), socket.SOCK_DGRAM) as sock:
            sock.bind((ip, 0))
    except (OSError, ValueError):
        return False
    return True


def _refused(e: OSError) -> bool:
    return e.errno in (errno.EPERM, errno.EACCES)


def transparent_problem() -> str | None:
    """Why transparent sockets (IP_TRANSPARENT) cannot be made here, or None if they can."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
        except OSError as e:
            if _refused(e):
                return "TPROXY needs CAP_NET_ADMIN (IP_TRANSPARENT not permitted): run as root or grant the capability"
            return f"IP_TRANSPARENT is not available here: {e.strerror or e}"
    return None


def mark_problem(mark: int) -> str | None:
    """Why sockets cannot be marked (SO_MARK) here, or None if they can."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            set_mark(sock, mark)
        except OSError as e:
            if _refused(e):
                return "marking sockets needs CAP_NET_ADMIN (SO_MARK not permitted): run as root or grant the capability"
            return f"SO_MARK is not available here: {e.strerror or e}"
    return None


class TransparentDatagramReader(FileDescriptor):
    """
    Reads a TPROXY UDP socket (`udp_listener`) on the reactor and hands
    each datagram to `deliver(data, client, destination)`; datagrams
    without their original destination are dropped.
    """

    def __init__(
        self, reactor: Any, sock: socket.socket, deliver: Callable[[bytes, tuple, tuple[str, int]], None],
    ) -> None:
        FileDescriptor.__init__(self, reactor)
        self.socket = sock
        self.deliver = deliver
        self.dropped = 0

    def fileno(self) -> int:
        return self.socket.fileno()

    def doRead(self) -> None:
        for _ in range(_READS_PER_EVENT):
            try:
                data, ancillary, flags, client = self.socket.recvmsg(READ_SIZE, ANCILLARY_SIZE)
            except BlockingIOError:
                return
            except OSError:
                # An ICMP error queued on the socket, or similar: next one.
                continue
            destination = original_destination(ancillary)
            if destination is None or flags & socket.MSG_TRUNC:
                self.dropped += 1
                continue
            self.deliver(data, client, destination)

    def getHost(self) -> tuple[str, int]:
        host, port = self.socket.getsockname()[:2]
        return host, port

    def close(self) -> None:
        """Stop reading and close the socket."""
        self.stopReading()
        self.socket.close()


@implementer(IReactorPluggableNameResolver)
class MarkingReactor:
    """
    `reactor`, except that the TCP connections it makes carry `mark`
    (SO_MARK), for the local end's connections to its servers and direct
    targets.  On a POSIX reactor they are `ssx.net.tcp.connect`'s, as every
    other connection (the lean connector, or ssx's transports on Twisted's),
    with the mark set on the socket before it connects; a socket the kernel
    refuses to mark fails the connection rather than go unmarked.
    Elsewhere, Twisted's connector: it creates a client's socket at once and
    connects it on a later turn of the reactor, so the mark is on the socket
    before its SYN leaves.  (HostnameEndpoint looks for the name resolver by
    interface; the rest it only calls.)
    """

    def __init__(self, reactor: Any, mark: int) -> None:
        self.reactor = reactor
        self.mark = mark

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reactor, name)

    def connectTCP(
        self, host: str, port: int, factory: Any, timeout: float = 30, bindAddress: Any = None,
    ) -> IConnector:
        if tcp.is_posix(self.reactor):
            return tcp.connect(self.reactor, host, port, factory, timeout, bind_address=bindAddress, mark=self.mark)
        connector = self.reactor.connectTCP(host, port, factory, timeout, bindAddress)
        sock = getattr(getattr(connector, "transport", None), "socket", None)
        if sock is not None:
            try:
                set_mark(sock, self.mark)
            except OSError as e:
                # Checked at start-up (`mark_problem`); a connection unmarked
                # now would be diverted again, so it must not be made.
                connector.stopConnecting()
                _log.warn("cannot mark a connection to {host}: {error}", host=host, error=e)
        return connector
