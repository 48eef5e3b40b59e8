"""
UDP sockets that write nothing to the log.

Twisted's UDP port logs a line when it opens ("... starting on 41234") and
one when it closes ("(UDP Port 41234 Closed)"), whatever its protocol's
`noisy` says.  The server opens such a socket for every UDP association a
client starts and twisted.names one for every DNS query, so each datagram
or connection naming a new target would write two to four lines: clients
could grow the log at will, which the server's summary line exists to
prevent.  `QuietUdpPort` is a UDP socket on the reactor's public
file-descriptor interface (`IReactorFDSet`) that logs nothing;
`listen_udp` opens one on Twisted's own POSIX reactors and falls back to
`listenUDP` on anything else (fakes in tests), as `ssx.net.tcp` does for TCP.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorUDP, IReadDescriptor
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import DatagramProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ssx.net.outbound import bind_device

__all__ = ["QuietUdpPort", "QuietUdpReactor", "listen_udp"]

# As Twisted's port: bytes read per readiness event before the reactor
# moves on to other sockets.
_READ_PER_EVENT = 256 * 1024


@implementer(IReadDescriptor, IListeningPort)
class QuietUdpPort:
    """An unconnected UDP socket bound to `interface`:`port`, feeding `protocol`."""

    def __init__(
        self,
        reactor: PosixReactorBase,
        port: int,
        protocol: DatagramProtocol,
        interface: str = "",
        max_packet_size: int = 8192,
        device: str | None = None,
    ) -> None:
        self.reactor = reactor
        # The interface sent through (SO_BINDTODEVICE), if any.
        self.device = device
        self.port = port
        self.protocol = protocol
        self.interface = interface
        self.max_packet_size = max_packet_size
        self.socket: socket.socket | None = None

    def startListening(self) -> None:
        family = socket.AF_INET6 if ":" in self.interface else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError as e:
            raise CannotListenError(self.interface, self.port, e) from None
        try:
            sock.setblocking(False)
            if self.device is not None:
                bind_device(sock, self.device)
            sock.bind((self.interface, self.port))
        except OSError as e:
            sock.close()
            raise CannotListenError(self.interface, self.port, e) from None
        self.socket = sock
        # This port is the part of IUDPTransport datagram protocols use
        # (write, getHost, stopListening), not connect or broadcast.
        self.protocol.makeConnection(self)  # type: ignore[arg-type]
        self.reactor.addReader(self)

    # IReadDescriptor

    def fileno(self) -> int:
        return self.socket.fileno() if self.socket is not None else -1

    def logPrefix(self) -> str:
        return "UDP"

    def doRead(self) -> None:
        sock, protocol = self.socket, self.protocol
        read = 0
        while sock is not None and read < _READ_PER_EVENT:
            try:
                data, addr = sock.recvfrom(self.max_packet_size)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                # ICMP port unreachable for something we sent.
                protocol.connectionRefused()
                return
            except OSError:
                return
            read += len(data)
            protocol.datagramReceived(data, addr)
            sock = self.socket  # the protocol may have stopped listening

    def connectionLost(self, reason: Failure) -> None:
        self._close()

    # IUDPTransport

    def write(self, packet: bytes, addr: tuple[str, int] | None = None) -> None:
        assert self.socket is not None and addr is not None
        try:
            self.socket.sendto(packet, addr)
        except BlockingIOError:
            pass  # dropped, as UDP may drop it anywhere on the way
        except ConnectionRefusedError:
            self.protocol.connectionRefused()
        except OSError as e:
            if e.errno not in (errno.ENOBUFS, errno.EAGAIN):
                raise

    def getHost(self) -> IPv4Address | IPv6Address:
        assert self.socket is not None
        host, port = self.socket.getsockname()[:2]
        return (IPv6Address if ":" in host else IPv4Address)("UDP", host, port)

    def stopListening(self) -> defer.Deferred:
        self._close()
        return defer.succeed(None)

    loseConnection = stopListening

    def _close(self) -> None:
        sock, self.socket = self.socket, None
        if sock is None:
            return
        self.reactor.removeReader(self)
        sock.close()
        self.protocol.doStop()

    def __repr__(self) -> str:
        return f"<QuietUdpPort {self.interface}:{self.port} for {self.protocol!r}>"


def listen_udp(
    reactor: IReactorUDP, port: int, protocol: DatagramProtocol, interface: str = "", maxPacketSize: int = 8192,
    device: str | None = None,
) -> IListeningPort:
    """
    `reactor.listenUDP`, without its log lines where the reactor allows
    (and there, through `device` if given: SO_BINDTODEVICE).
    """
    if not isinstance(reactor, PosixReactorBase):
        return reactor.listenUDP(port, protocol, interface=interface, maxPacketSize=maxPacketSize)
    udp = QuietUdpPort(reactor, port, protocol, interface, maxPacketSize, device)
    udp.startListening()
    return udp


class QuietUdpReactor:
    """
    A reactor as twisted.names' client sees it: its UDP sockets (one per
    query) are quiet ones and their protocols are not noisy either;
    everything else is the reactor's own.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def listenUDP(
        self, port: int, protocol: DatagramProtocol, interface: str = "", maxPacketSize: int = 8192
    ) -> IListeningPort:
        protocol.noisy = False
        return listen_udp(self._reactor, port, protocol, interface, maxPacketSize)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)
