"""
TCP transports that send at once, and the one home in ssx of the names
Twisted keeps private.

Twisted's TCP transport buffers every `write` and sends it on the reactor's
next turn: register for writability (an `epoll_ctl`), wait for the event,
send, unregister (another `epoll_ctl`).  A relay writes once per read, almost
always into an empty socket buffer, so that round costs it two system calls
and a reactor turn per chunk (measured: a fifth of the CPU per GiB
relayed).  These transports call `send()` directly while nothing is queued,
and fall back to Twisted's buffering for whatever the kernel does not take
(and for every error, which Twisted then reports as usual).

`listen` and `connect` use them on Twisted's own POSIX reactors when
SSX_TCP_PATH=twisted (by default they accept and connect with
`ssx.net.lean`, whose transport, `ssx.net.lean_transport.LeanTransport`,
also sends at once and needs none of Twisted's private names), and plain
`listenTCP`/`connectTCP` on anything else (a `MemoryReactor` in tests).
They also set TCP Fast Open when asked: TCP_FASTOPEN on a listening socket
(the server accepts data in a SYN), TCP_FASTOPEN_CONNECT on an outgoing one
(the kernel defers the SYN to the first write and carries that write in it,
once it holds the server's cookie).  `connect` also binds an outgoing
connection to a source address and a device (SO_BINDTODEVICE) when asked:
the server end's `--outbound-address` and `--interface`.

Those transports read Twisted's private state, `server_endpoint` reads the
values a parsed endpoint description keeps privately, and `on_process_exit`
hooks where Twisted's `ProcessMonitor` hears of an exit.  Every such name is
used here and nowhere else in ssx (but for the epoll reactor's own state,
which `ssx.net.reactor`'s subclass reaches through `self`), and is listed
in `TWISTED_PRIVATE_NAMES`, which tests/test_twisted_private.py checks
against the installed Twisted: a release that moves one fails that test,
naming it.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet import defer, tcp
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.interfaces import (
    IConnector,
    IListeningPort,
    IProtocolFactory,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IStreamServerEndpoint,
)
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ssx.net.lean_transport import READ_SIZE
from ssx.net.outbound import bind_device, set_mark
from ssx.wire.address import is_ip_literal

if TYPE_CHECKING:
    from twisted.runner.procmon import ProcessMonitor

__all__ = [
    "FAST_OPEN_QUEUE",
    "READ_SIZE",
    "TCP_FASTOPEN",
    "TCP_FASTOPEN_CONNECT",
    "TWISTED_PRIVATE_NAMES",
    "AdoptedEndpoint",
    "LEAN_PATH",
    "SendAtOnce",
    "ServerEndpoint",
    "adopt",
    "connect",
    "is_posix",
    "fast_open_reactor",
    "fast_open_sysctl_note",
    "listen",
    "on_process_exit",
    "server_endpoint",
    "tcp_listen_address",
]

#: The names private to Twisted that ssx relies on, by the class whose
#: instances have them (dotted path).  Only this module uses them.
TWISTED_PRIVATE_NAMES: dict[str, tuple[str, ...]] = {
    # Read by the transports' `write` to tell an idle, open connection.
    "twisted.internet.tcp.Connection": (
        "_tempDataBuffer", "_writeDisconnecting", "_writeDisconnected", "_aborting",
    ),
    # Overridden, so that connecting makes one of these transports.
    "twisted.internet.tcp.Connector": ("_makeTransport",),
    # A parsed `tcp:`/`tcp6:` description keeps its values here.
    "twisted.internet.endpoints.TCP4ServerEndpoint": ("_port", "_backlog", "_interface"),
    "twisted.internet.endpoints.TCP6ServerEndpoint": ("_port", "_backlog", "_interface"),
    # Builds a port around a listening socket made elsewhere (a worker's
    # inherited socket), with ssx's transports; `adoptStreamPort` gives Twisted's.
    "twisted.internet.tcp.Port": ("_fromListeningDescriptor",),
    # What a monitored process's protocol calls when the process ends.
    "twisted.runner.procmon.ProcessMonitor": ("_monitoredProcessExited",),
    # ssx.net.reactor.LeanEPollReactor's doPoll, in place of Twisted's, and
    # its hand_over: the poller, the descriptors by number, the readers, the
    # writers, and the endings.
    "twisted.internet.epollreactor.EPollReactor": (
        "_poller", "_selectables", "_reads", "_writes", "_disconnectSelectable",
    ),
}


# Linux's values (TCP_FASTOPEN_CONNECT: 4.11 and later, and not named by
# Python's socket module).
TCP_FASTOPEN: int = getattr(socket, "TCP_FASTOPEN", 23)
TCP_FASTOPEN_CONNECT: int = getattr(socket, "TCP_FASTOPEN_CONNECT", 30)
# Connections with data in their SYN that a listening socket holds before
# the handshake completes (shadowsocks-libev's value); beyond it, a SYN's
# data is dropped and the handshake goes on without it.
FAST_OPEN_QUEUE = 256
# Which ends may use TCP Fast Open: 1 clients, 2 servers (a bit mask).
FAST_OPEN_SYSCTL = "/proc/sys/net/ipv4/tcp_fastopen"

_log = Logger()

#: Whether `listen` and `connect` accept and connect with `ssx.net.lean`
#: (on Twisted's POSIX reactors, for IP addresses) rather than with
#: Twisted's `Port` and `Connector`.  SSX_TCP_PATH=twisted in the
#: environment turns it off: the benchmark suite's comparison, and a way
#: back should the lean path misbehave somewhere.
LEAN_PATH: bool = os.environ.get("SSX_TCP_PATH", "lean") != "twisted"


_SET_LATER = (
    "producer", "streamingProducer", "producerPaused", "dataBuffer", "offset",
    "disconnecting", "disconnected", "_writeDisconnecting", "_writeDisconnected", "_aborting",
    "doRead", "doWrite", "realAddress", "protocol", "connected", "logstr",
)


# The transport classes whose first instance has made room (`_reserve`).
_RESERVED: set[type] = set()


class _SendAtOnce(tcp.Connection):
    """The base of these transports (before Twisted's own): `write` tries `send()` first."""

    bufferSize = READ_SIZE

    def _reserve(self) -> None:
        # CPython keeps an instance's attributes compact only if their names
        # were seen on the first instances of the class; a name first set
        # later (Twisted sets these on registering a producer, on a
        # buffered write, on connecting and closing) turns every instance
        # into a full dict, about 0.4 KiB per transport (measured).  Setting
        # and deleting them on the first instance of each class makes room
        # for all later ones (their names stay in the class's shared keys;
        # measured: the same size as doing it on every instance, without
        # 64 calls per connection).
        cls = type(self)
        if cls in _RESERVED:
            return
        for name in _SET_LATER:
            setattr(self, name, None)
            delattr(self, name)
        _RESERVED.add(cls)

    def write(self, data: bytes) -> None:
        if (
            type(data) is bytes
            and data
            and not self.TLS  # after startTLS, Twisted's write encrypts
            # A pull producer is asked for more only from Twisted's write
            # path (once its buffer drains), so its writes must take it.
            and (self.producer is None or self.streamingProducer)
            and not self._tempDataBuffer
            and self.offset == len(self.dataBuffer)
            and self.connected
            and not (
                self.disconnecting
                or self._writeDisconnecting
                or self._writeDisconnected
                or self._aborting
            )
        ):
            try:
                sent = self.socket.send(data)
            except OSError:
                # Would block, or an error: Twisted's write path meets it
                # again on its next attempt and ends the connection as usual.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        tcp.Connection.write(self, data)


#: The send-at-once base.
SendAtOnce = _SendAtOnce


class Server(_SendAtOnce, tcp.Server):
    """An accepted connection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._reserve()
        tcp.Server.__init__(self, *args, **kwargs)


class Client(_SendAtOnce, tcp.Client):
    """An outgoing connection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._reserve()
        tcp.Client.__init__(self, *args, **kwargs)


class FastOpenClient(Client):
    """An outgoing connection whose first write goes in its SYN, where the kernel allows it."""

    def createInternetSocket(self) -> socket.socket:
        sock: socket.socket = Client.createInternetSocket(self)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
        except OSError:
            # An older kernel, or net.ipv4.tcp_fastopen without the client
            # bit: the connection is an ordinary one.
            pass
        return sock


class DeviceClient(Client):
    """
    An outgoing connection sent through its connector's `device`
    (SO_BINDTODEVICE), if any, and carrying its `mark` (SO_MARK), if any.
    """

    def createInternetSocket(self) -> socket.socket:
        sock: socket.socket = Client.createInternetSocket(self)
        # Twisted sets `connector` before it creates the socket; an error
        # here makes the connection fail as a bind error would.
        if self.connector.device is not None:
            bind_device(sock, self.connector.device)
        if self.connector.mark is not None:
            set_mark(sock, self.connector.mark)
        return sock


class Port(tcp.Port):
    """
    A listening port whose connections send at once; with `v6only`, an
    IPv6 socket takes IPv6 only (IPV6_V6ONLY), so that an IPv4 socket
    can bind the same port beside it; with `fast_open` (a queue length),
    it accepts data in SYNs (TCP_FASTOPEN).
    """

    transport = Server
    v6only = False
    fast_open = 0
    reuse_port = False

    def createInternetSocket(self) -> socket.socket:
        sock: socket.socket = tcp.Port.createInternetSocket(self)
        if self.v6only and self.addressFamily == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if self.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if self.fast_open:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, self.fast_open)
            except OSError as e:
                _log.warn("TCP Fast Open is not available here, listening without it: {error}", error=e)
        return sock


class Connector(tcp.Connector):
    """A connector whose connections send at once (and with `fast_open`, send their first write in the SYN)."""

    fast_open = False
    device: str | None = None
    mark: int | None = None

    def _makeTransport(self) -> Client:
        options = self.device is not None or self.mark is not None
        transport = DeviceClient if options else FastOpenClient if self.fast_open else Client
        return transport(self.host, self.port, self.bindAddress, self, self.reactor)

    def connectionLost(self, reason: Failure) -> None:
        # The ended transport keeps this connector: holding it here too would
        # leave the pair (and the protocol) to the garbage collector.
        self.transport = None
        tcp.Connector.connectionLost(self, reason)


def is_posix(reactor: Any) -> bool:
    """Whether `listen` and `connect` use ssx's ports and connectors on `reactor` (else Twisted's own)."""
    return isinstance(reactor, PosixReactorBase)


def listen(
    reactor: IReactorTCP, port: int, factory: IProtocolFactory, backlog: int = 50, interface: str = "",
    v6only: bool = False, fast_open: int = 0, reuse_port: bool = False,
) -> IListeningPort:
    """
    Like `reactor.listenTCP`, with these transports (and IPV6_V6ONLY on IPv6
    if `v6only`; TCP_FASTOPEN with a queue of `fast_open` if not 0;
    SO_REUSEPORT with `reuse_port`), accepting with `ssx.net.lean.LeanPort`
    while `LEAN_PATH` holds.
    """
    if not is_posix(reactor):
        # IReactorTCP declares a ServerFactory, but endpoints pass any
        # IProtocolFactory on, as Twisted's own TCP endpoints do.
        return reactor.listenTCP(port, factory, backlog, interface)  # type: ignore[arg-type]
    if LEAN_PATH:
        return lean.listen_port(reactor, port, factory, backlog, interface, v6only, fast_open, reuse_port)
    listening = Port(port, factory, backlog, interface, reactor)
    listening.v6only = v6only
    listening.fast_open = fast_open
    listening.reuse_port = reuse_port
    listening.startListening()
    return listening


def adopt(reactor: Any, fd: int, family: int, factory: IProtocolFactory) -> IListeningPort:
    """
    Accept on the listening socket `fd` (made by another process and
    inherited; the caller keeps and closes `fd`, the port works on a
    duplicate), with these transports on Twisted's POSIX reactors.
    """
    if not is_posix(reactor):
        return reactor.adoptStreamPort(fd, family, factory)
    if LEAN_PATH:
        return lean.adopt_listening_socket(fd, factory, reactor)
    listening: Port = Port._fromListeningDescriptor(reactor, fd, family, factory)
    listening.startListening()
    return listening


def connect(
    reactor: IReactorTCP, host: str, port: int, factory: ClientFactory, timeout: float, fast_open: bool = False,
    bind_address: tuple[str, int] | None = None, device: str | None = None, mark: int | None = None,
) -> IConnector:
    """
    Like `reactor.connectTCP`, with these transports; with `fast_open`,
    TCP_FASTOPEN_CONNECT where the kernel takes it.  The connection is then
    made at once when the kernel holds a cookie for the server (the SYN
    waits for the first write), so a server that cannot be reached shows as
    a connection lost rather than one that failed.  `bind_address` is the
    source address (Twisted's `bindAddress`); `device`, the interface sent
    through (SO_BINDTODEVICE, on Twisted's POSIX reactors; not with
    `fast_open`, which the server end does not use); `mark`, the firewall
    mark (SO_MARK) the connection carries (not with `fast_open` either).
    """
    if not is_posix(reactor):
        return reactor.connectTCP(host, port, factory, timeout=timeout, bindAddress=bind_address)
    if LEAN_PATH and is_ip_literal(host):
        lean_connector = lean.LeanConnector(reactor, host, port, factory, timeout, bind_address, device, fast_open, mark)
        lean_connector.connect()
        return lean_connector
    connector = Connector(host, port, factory, timeout, bind_address, reactor)
    connector.fast_open = fast_open
    connector.device = device
    connector.mark = mark
    connector.connect()
    return connector


# HostnameEndpoint looks for the name resolver by interface; the rest
# (callLater, seconds, connectTCP) it only calls.
@implementer(IReactorPluggableNameResolver)
class _FastOpenReactor:
    """`reactor`, except that `connectTCP` connects with TCP Fast Open (`connect`)."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reactor, name)

    def connectTCP(
        self, host: str, port: int, factory: ClientFactory, timeout: float = 30, bindAddress: Any = None,
    ) -> IConnector:
        if bindAddress is not None:
            return self.reactor.connectTCP(host, port, factory, timeout, bindAddress)
        return connect(self.reactor, host, port, factory, timeout, fast_open=True)


def fast_open_sysctl_note(server: bool) -> str | None:
    """
    A warning when this host's net.ipv4.tcp_fastopen keeps this end (a
    server's if `server`, else a client's) from TCP Fast Open: the options
    are then set but change nothing (None where it allows it, or where
    there is no such setting to read).
    """
    try:
        with open(FAST_OPEN_SYSCTL) as f:
            value = int(f.read().strip())
    except (OSError, ValueError):
        return None
    bit, side = (2, "servers") if server else (1, "clients")
    if value & bit:
        return None
    return (
        f"fast_open: net.ipv4.tcp_fastopen is {value}, which does not allow {side} ({bit}); "
        "connections go on without TCP Fast Open (sysctl -w net.ipv4.tcp_fastopen=3 allows both ends)"
    )


def fast_open_reactor(reactor: Any) -> Any:
    """
    A view of `reactor` for client endpoints (`HostnameEndpoint`): the
    connections they make go through `connect` with TCP Fast Open.
    """
    return _FastOpenReactor(reactor)


@implementer(IStreamServerEndpoint)
class ServerEndpoint:
    """A TCP server endpoint that listens with `listen`."""

    def __init__(
        self, reactor: IReactorTCP, port: int, backlog: int, interface: str, v6only: bool = False, fast_open: int = 0,
        reuse_port: bool = False,
    ) -> None:
        self.reactor = reactor
        self.port = port
        self.backlog = backlog
        self.interface = interface
        self.v6only = v6only
        self.fast_open = fast_open
        self.reuse_port = reuse_port

    def listen(self, factory: IProtocolFactory) -> defer.Deferred:
        return defer.execute(
            listen, self.reactor, self.port, factory, self.backlog, self.interface, self.v6only, self.fast_open,
            self.reuse_port,
        )


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """Listens on an inherited listening socket (`adopt`), as a worker does."""

    def __init__(self, reactor: Any, fd: int, family: int) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family

    def listen(self, factory: IProtocolFactory) -> defer.Deferred:
        return defer.execute(adopt, self.reactor, self.fd, self.family, factory)


def tcp_listen_address(description: str) -> tuple[str, int, int | None]:
    """The interface, port and backlog (None if not given) of a plain `tcp:`/`tcp6:` description."""
    endpoint = serverFromString(None, description)
    if not isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
        raise ValueError(f"not a plain TCP description: {description!r}")
    # Twisted keeps the parsed description in private attributes.
    return endpoint._interface, endpoint._port, endpoint._backlog if "backlog=" in description else None


def server_endpoint(
    reactor: IReactorTCP, description: str, backlog: int, v6only: bool = False, fast_open: int = 0,
    reuse_port: bool = False,
) -> IStreamServerEndpoint:
    """
    `serverFromString(reactor, description)`, except that plain TCP listens
    with these transports, and with `backlog` unless the description gives
    one (and an IPv6 socket with IPV6_V6ONLY if `v6only`, TCP_FASTOPEN with
    a queue of `fast_open` if not 0, SO_REUSEPORT with `reuse_port`; other
    kinds of endpoint go without).
    """
    endpoint = serverFromString(reactor, description)
    if isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
        # Twisted keeps the parsed description in private attributes.
        if "backlog=" in description:
            backlog = endpoint._backlog
        return ServerEndpoint(reactor, endpoint._port, backlog, endpoint._interface, v6only, fast_open, reuse_port)
    return endpoint


def on_process_exit(monitor: ProcessMonitor, exited: Callable[[str, Failure | None], None]) -> None:
    """
    Have `monitor` call `exited(name, reason)` each time a process it runs
    has ended, once it has handled that itself (forgotten the process,
    scheduled any restart).  Twisted has no public hook for this: the
    protocols of monitored processes call a private method, wrapped here.
    """
    handle = monitor._monitoredProcessExited

    def handled(name: str, reason: Failure | None = None) -> None:
        handle(name, reason)
        exited(name, reason)

    setattr(monitor, "_monitoredProcessExited", handled)


# Last: ssx.net.lean uses this module's constants (a cycle Python
# resolves, since nothing here uses it until called).
from ssx.net import lean  # noqa: E402
