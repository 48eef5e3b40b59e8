"""
Accepting and connecting TCP below Twisted's `Port` and `Connector`.

Twisted's TCP port and connector do more per connection than a relay needs:
the port formats a log prefix and a repr for every accepted connection and
resizes its accept batch; the connector takes a reactor turn (`callLater(0)`)
to "resolve" an IP literal, then registers the socket for reading and
writing, calls `doConnect` twice and formats another log prefix.  This
module builds both steps on the reactor's public `IReactorFDSet`
(`addReader`, `addWriter`, `removeWriter`) with objects of its own, as
Twisted's own tcp module is built, and serves each connection on
`ssx.net.lean_transport.LeanTransport` (as `LeanServer` or `LeanClient`),
so protocols see the same `ITCPTransport` (write, writeSequence,
half-close, producers, abort) as on Twisted's path, at a fraction of
Twisted's per-connection calls.

- `LeanPort` is a listening socket whose `doRead` accepts up to
  `numberAccepts` connections per readiness event (the limit the relay
  factories' accept batch and connection limit set), builds their protocols
  and transports (`LeanServer`) directly, and backs off for a moment when the process is
  out of file descriptors.  `listen_port` makes one from an address (with
  SO_REUSEPORT, IPV6_V6ONLY, TCP_FASTOPEN as asked);
  `adopt_listening_socket` from a listening socket's file descriptor that
  another process (a supervisor of workers) handed over.
- `LeanConnector` is an `IConnector` that makes a non-blocking `connect()`
  (with the source address, device and TCP Fast Open `ssx.net.tcp.connect`
  takes) on a socket created non-blocking, waits for writability, reads
  SO_ERROR, serves the connection on a `LeanClient` (whose end it hears
  of, as Twisted's connectors do) and reports failures to
  the factory as Twisted's connectors do (`clientConnectionFailed` with a
  `ConnectError`; `TimeoutError` after `timeout` seconds; `UserError` from
  `stopConnecting`).

`ssx.net.tcp.listen` and `ssx.net.tcp.connect` use these on Twisted's POSIX
reactors for IP addresses; TLS, Unix and other endpoint kinds stay on
Twisted's own transports.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import (
    CannotListenError,
    ConnectBindError,
    ConnectError,
    NotConnectingError,
    TimeoutError,
    UserError,
    getConnectError,
)
from twisted.internet.interfaces import IConnector, IListeningPort, IProtocolFactory, IReadDescriptor
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ssx.net.lean_transport import LeanTransport
from ssx.net.outbound import bind_device, set_mark
from ssx.net import tcp

__all__ = [
    "ACCEPT_BATCH",
    "LeanClient",
    "LeanConnector",
    "LeanPort",
    "LeanServer",
    "adopt_listening_socket",
    "listen_port",
]

_log = Logger()

#: Connections a port accepts per readiness event, unless its factory sets
#: a smaller `numberAccepts` (Twisted starts at 1 and grows by 20 per full
#: batch; a fixed batch spares the bookkeeping and serves a burst at once).
ACCEPT_BATCH = 64

# How long a port stops accepting when the process is out of descriptors
# (the kernel keeps the connections in the backlog meanwhile).
OUT_OF_FILES_PAUSE = 0.1

# A stream socket created non-blocking where the system has the flag (Linux).
_SOCK_NONBLOCK: int = getattr(socket, "SOCK_NONBLOCK", 0)
_NONBLOCKING_STREAM: int = socket.SOCK_STREAM | _SOCK_NONBLOCK

_OUT_OF_RESOURCES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
_IN_PROGRESS = frozenset((0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY, errno.EISCONN))


def _no_fileno() -> int:
    return -1


def _address(family: int, pair: tuple[Any, ...]) -> IPv4Address | IPv6Address:
    if family == socket.AF_INET6:
        return IPv6Address("TCP", *pair)
    return IPv4Address("TCP", *pair)


class LeanServer(LeanTransport):
    """An accepted connection of a `LeanPort`."""

    def __init__(self, sock: socket.socket, protocol: Any, peer: IPv4Address | IPv6Address, reactor: Any) -> None:
        LeanTransport.__init__(self, sock, protocol, reactor)
        # The address the factory was given: built once per connection.
        self.peer = peer

    def getPeer(self) -> IPv4Address | IPv6Address:
        return self.peer

    def getHost(self) -> IPv4Address | IPv6Address:
        return _address(socket.AF_INET6 if isinstance(self.peer, IPv6Address) else socket.AF_INET, _sockname(self))

    def __repr__(self) -> str:
        return f"<LeanServer {self.logstr} from {self.peer.host}:{self.peer.port}>"


class LeanClient(LeanTransport):
    """An outgoing connection made by a `LeanConnector` (which hears when it ends)."""

    def __init__(
        self, sock: socket.socket, protocol: Any, connector: "LeanConnector", reactor: Any, replacing: Any = None,
    ) -> None:
        LeanTransport.__init__(self, sock, protocol, reactor, replacing)
        self.connector = connector

    def getPeer(self) -> IPv4Address | IPv6Address:
        return self.connector.getDestination()

    def getHost(self) -> IPv4Address | IPv6Address:
        return _address(self.connector.family, _sockname(self))

    def __repr__(self) -> str:
        return f"<LeanClient {self.logstr} to {self.connector.host}:{self.connector.port}>"


def _sockname(transport: LeanTransport) -> tuple[Any, ...]:
    sock = transport.socket
    if sock is None:
        raise OSError(errno.EBADF, "the connection is closed")
    return sock.getsockname()


@implementer(IListeningPort, IReadDescriptor)
class LeanPort:
    """
    A listening TCP socket, registered with the reactor as a reader: each
    readiness event accepts up to `numberAccepts` connections (a relay
    factory lowers it to its accept batch and to the room below its
    connection limit), each served by `factory` on a `LeanServer`.
    """

    numberAccepts = ACCEPT_BATCH

    def __init__(self, sock: socket.socket, factory: IProtocolFactory, reactor: Any) -> None:
        sock.setblocking(False)
        self.socket = sock
        self.fileno = sock.fileno
        self.factory = factory
        self.reactor = reactor
        self.family = int(sock.family)
        self.listening = False
        self.backlog = 0
        self._reading = False
        self._resume: Any = None

    def startListening(self) -> None:
        """Start accepting (the socket is bound and listening already)."""
        if self.listening:
            return
        self.listening = True
        self.factory.doStart()
        self.startReading()

    def startReading(self) -> None:
        self._reading = True
        if self._resume is None and self.listening:
            self.reactor.addReader(self)

    def stopReading(self) -> None:
        self._reading = False
        self.reactor.removeReader(self)

    def stopListening(self) -> defer.Deferred[None]:
        self.loseConnection()
        return defer.succeed(None)

    def loseConnection(self) -> None:
        if not self.listening:
            return
        self.listening = False
        self.reactor.removeReader(self)
        if self._resume is not None and self._resume.active():
            self._resume.cancel()
        self._resume = None
        self.socket.close()
        self.factory.doStop()

    def connectionLost(self, reason: Failure) -> None:
        # The reactor's shutdown hands every reader this.
        self.loseConnection()

    def getHost(self) -> IPv4Address | IPv6Address:
        return _address(self.family, self.socket.getsockname())

    def logPrefix(self) -> str:
        return "ssx.net.lean.LeanPort"

    def doRead(self) -> None:
        # The socket module's own accept() wraps this one in Python: it
        # reads the listening socket's family and type as enums and its
        # timeout, every time.  The port knows them already.
        accept = self.socket._accept  # type: ignore[attr-defined]
        family = self.family
        for _ in range(self.numberAccepts):
            if not self.listening:
                return  # a connection's protocol stopped the port
            try:
                fd, peer = accept()
                sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in _OUT_OF_RESOURCES:
                    self._pause_accepting(e)
                    return
                # ECONNABORTED and the like: that one connection went away.
                continue
            self._serve(sock, peer)

    def _serve(self, sock: socket.socket, peer: tuple[Any, ...]) -> None:
        # accept() makes a blocking socket (Python's accept4 passes no
        # SOCK_NONBLOCK): one ioctl, the only one a connection costs.
        sock.setblocking(False)
        if len(peer) == 4 and peer[3]:
            # An IPv6 peer with a scope: Twisted's form of its host ("fe80::1%eth0").
            host = socket.getnameinfo(peer, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)[0]
            peer = (host, *peer[1:])
        transport = None
        try:
            # The port's family: a socket's `family` is an enum conversion per call.
            address = _address(self.family, peer)
            protocol = self.factory.buildProtocol(address)
            if protocol is None:
                sock.close()
                return
            transport = LeanServer(sock, protocol, address, self.reactor)
            protocol.makeConnection(transport)
        except Exception:
            # A bug of the factory or protocol: that connection ends, the port goes on.
            _log.failure("serving a connection accepted from {peer}", peer=peer)
            if transport is None:
                sock.close()
            elif transport.connected:
                transport.abortConnection()

    def _pause_accepting(self, error: OSError) -> None:
        _log.warn(
            "cannot accept connections ({error}); they wait in the backlog for {pause} s",
            error=os.strerror(error.errno or 0),
            pause=OUT_OF_FILES_PAUSE,
        )
        self.reactor.removeReader(self)
        self._resume = self.reactor.callLater(OUT_OF_FILES_PAUSE, self._end_pause)

    def _end_pause(self) -> None:
        self._resume = None
        if self.listening and self._reading:
            self.reactor.addReader(self)

    def __repr__(self) -> str:
        return f"<LeanPort of {self.factory!r} on {self.socket.fileno()}>"


def listen_port(
    reactor: Any, port: int, factory: IProtocolFactory, backlog: int = 50, interface: str = "",
    v6only: bool = False, fast_open: int = 0, reuse_port: bool = False,
) -> LeanPort:
    """
    Bind and listen on `interface`:`port` (IPv6 if `interface` has a colon;
    SO_REUSEADDR as Twisted sets it; SO_REUSEPORT with `reuse_port`,
    IPV6_V6ONLY with `v6only`, TCP_FASTOPEN with a queue of `fast_open`)
    and start accepting with `factory` (CannotListenError if it cannot).
    """
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if v6only and family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if fast_open:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, tcp.TCP_FASTOPEN, fast_open)
            except OSError as e:
                _log.warn("TCP Fast Open is not available here, listening without it: {error}", error=e)
        sock.bind((interface, port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise CannotListenError(interface, port, e) from None
    listening = LeanPort(sock, factory, reactor)
    listening.backlog = backlog
    listening.startListening()
    return listening


def adopt_listening_socket(fd: int, factory: IProtocolFactory, reactor: Any) -> LeanPort:
    """
    Accept with `factory` on the listening TCP socket `fd` (as Twisted's
    `adoptStreamPort`, the caller keeps `fd` and may close it: the port
    works on a duplicate).  This is how a worker serves a socket its
    supervisor bound.
    """
    sock = socket.socket(fileno=os.dup(fd))
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        sock.close()
        raise ValueError(f"file descriptor {fd} is not a TCP socket")
    listening = LeanPort(sock, factory, reactor)
    listening.startListening()
    return listening


@implementer(IConnector)
class LeanConnector:
    """
    One outgoing TCP connection to an IP literal, as `IConnector`; while it
    connects it is itself the reactor's write descriptor for the socket.
    """

    def __init__(
        self, reactor: Any, host: str, port: int, factory: ClientFactory, timeout: float,
        bind_address: tuple[str, int] | None = None, device: str | None = None, fast_open: bool = False,
        mark: int | None = None,
    ) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.factory = factory
        self.timeout = timeout
        self.bind_address = bind_address
        self.device = device
        self.fast_open = fast_open
        self.mark = mark
        self.state = "disconnected"
        self.transport: LeanClient | None = None
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket: socket.socket | None = None
        self._timer: Any = None
        self._destination: IPv4Address | IPv6Address | None = None

    # IConnector

    def connect(self) -> None:
        """Start connecting (again, after a failure or a lost connection)."""
        if self.state != "disconnected":
            return
        self.state = "connecting"
        self.factory.doStart()
        self.factory.startedConnecting(self)
        try:
            sock = self._make_socket()
        except OSError as e:
            # As Twisted reports it: asynchronously, never from inside connect.
            self._timer = self.reactor.callLater(0, self._fail, Failure(ConnectBindError(e.errno, e.strerror)))
            return
        self._socket = sock
        self.fileno = sock.fileno
        try:
            result = sock.connect_ex((self.host, self.port))
        except OSError as e:  # an address the kernel cannot use at all
            result = e.errno or errno.EINVAL
        if result not in _IN_PROGRESS:
            self._timer = self.reactor.callLater(0, self._fail, Failure(getConnectError((result, os.strerror(result)))))
            return
        # Writable once connected (at once, if connect() said so already);
        # a refused or unreachable attempt shows as an error on the socket.
        self.reactor.addWriter(self)
        if self.timeout:
            self._timer = self.reactor.callLater(self.timeout, self._timed_out)

    def stopConnecting(self) -> None:
        if self.state != "connecting":
            raise NotConnectingError("we are not connecting")
        self._fail(Failure(UserError(string="stopConnecting was called")))

    def disconnect(self) -> None:
        if self.state == "connecting":
            self.stopConnecting()
        elif self.transport is not None:
            self.transport.loseConnection()

    def getDestination(self) -> IPv4Address | IPv6Address:
        destination = self._destination
        if destination is None:
            destination = self._destination = _address(self.family, (self.host, self.port))
        return destination

    # The reactor's side, while connecting: `fileno` is the socket's own
    # while there is one (the reactor asks for it at every turn).

    fileno = staticmethod(_no_fileno)

    def logPrefix(self) -> str:
        return "ssx.net.lean.LeanConnector"

    def doWrite(self) -> None:
        sock = self._socket
        if sock is None:
            return
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(Failure(getConnectError((err, os.strerror(err)))))
            return
        reactor = self.reactor
        # ssx's reactor hands the socket's registration over to the
        # transport with one system call; on another, it is removed here and
        # the transport adds its own.
        replacing = self if hasattr(reactor, "hand_over") else None
        if replacing is None:
            reactor.removeWriter(self)
        self._socket = None
        self.fileno = _no_fileno
        self._cancel_timer()
        self.state = "connected"
        transport = None
        try:
            protocol = self.factory.buildProtocol(self.getDestination())
            if protocol is None:
                # As Twisted does: a stand-in protocol on a connection closed at once.
                transport = self.transport = LeanClient(sock, Protocol(), self, reactor, replacing)
                transport.loseConnection()
                return
            transport = self.transport = LeanClient(sock, protocol, self, reactor, replacing)
            protocol.makeConnection(transport)
        except Exception:
            # A bug of the factory or protocol: that connection ends (the
            # reactor, which hands this connector the event, would not end it).
            _log.failure("starting a connection to {host}:{port}", host=self.host, port=self.port)
            if transport is None:
                if replacing is not None:
                    # Still registered as the socket's writer (found by identity).
                    reactor.removeWriter(self)
                sock.close()
                self.connection_lost(Failure())
            elif transport.connected:
                transport.abortConnection()

    doRead = doWrite

    def connectionLost(self, reason: Failure) -> None:
        # The reactor saw an error or a hang-up on the connecting socket
        # (epoll reports a refused connect so), or it is shutting down.
        sock = self._socket
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if sock is not None else 0
        self._fail(Failure(getConnectError((err, os.strerror(err))) if err else ConnectError(string=str(reason.value))))

    # Endings

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(Failure(TimeoutError()))

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _fail(self, reason: Failure) -> None:
        if self.state != "connecting":
            return
        self._cancel_timer()
        sock, self._socket = self._socket, None
        if sock is not None:
            self.reactor.removeWriter(self)
            sock.close()
        self.fileno = _no_fileno
        self.state = "disconnected"
        self.factory.clientConnectionFailed(self, reason)
        if self.state == "disconnected":
            self.factory.doStop()

    def connection_lost(self, reason: Failure) -> None:
        """The connection made has ended (its transport calls this)."""
        self.state = "disconnected"
        self.transport = None
        self.factory.clientConnectionLost(self, reason)
        if self.state == "disconnected":
            self.factory.doStop()

    def _make_socket(self) -> socket.socket:
        # Non-blocking from the start: no ioctl to make it so.
        sock = socket.socket(self.family, _NONBLOCKING_STREAM)
        try:
            if not _NONBLOCKING_STREAM & _SOCK_NONBLOCK:
                sock.setblocking(False)
            if self.fast_open:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, tcp.TCP_FASTOPEN_CONNECT, 1)
                except OSError:
                    pass  # an older kernel, or no client bit in net.ipv4.tcp_fastopen
            if self.device is not None:
                bind_device(sock, self.device)
            if self.mark is not None:
                set_mark(sock, self.mark)
            if self.bind_address is not None:
                sock.bind(self.bind_address)
        except OSError:
            sock.close()
            raise
        return sock

    def __repr__(self) -> str:
        return f"<LeanConnector to {self.host}:{self.port} {self.state}>"
