"""
A listening endpoint as a service.

Like Twisted's `StreamServerEndpointService`, but it binds in
`privilegedStartService` and stops start-up with one clear line when it cannot
bind, and it keeps the listening port so callers (logs, tests) can see the
address actually bound (port 0 picks a free one).
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet import udp
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from ssx.net import tcp
from ssx.net.inherited import datagram_key, inherited, stream_key
__all__ = ["DatagramListenerService", "DrainService", "ListenerService", "serve"]

_log = Logger()

LISTEN_BACKLOG = 4096


class ListenerService(Service):
    """Listens on `endpoint` with `factory` while running."""

    def __init__(self, endpoint: IStreamServerEndpoint, factory: Factory, description: str, label: str) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.description = description
        self.label = label
        self.port: IListeningPort | None = None
        # The key of the socket inherited from a supervisor, if it took one.
        self.inherited_key: str | None = None

    def privilegedStartService(self) -> None:
        self._listen()
        Service.privilegedStartService(self)

    def startService(self) -> None:
        if self.port is None:
            self._listen()
        Service.startService(self)

    def _listen(self) -> None:
        outcome: list[Any] = []
        self.endpoint.listen(self.factory).addBoth(outcome.append)
        if not outcome:
            raise SystemExit(f"{self.label}: listening on {self.description} did not complete at start-up")
        result = outcome[0]
        if isinstance(result, Failure):
            raise SystemExit(f"{self.label}: cannot listen on {self.description}: {result.getErrorMessage()}")
        self.port = result
        sock = getattr(result, "socket", None)
        if sock is not None and "backlog=" not in self.description:
            # Twisted listens with a backlog of 50, which drops connections
            # in the bursts a proxy sees; listen() again raises it (the
            # kernel caps it at net.core.somaxconn).
            try:
                sock.listen(LISTEN_BACKLOG)
            except OSError:
                pass
        ports = getattr(self.factory, "ports", None)
        if ports is not None:
            ports.append(result)  # the factory pauses accepting at its connection limit
            limit = getattr(self.factory, "_limit_accepts", None)
            bounded = getattr(self.factory, "max_connections", 0) or getattr(self.factory, "accept_batch", 0)
            if limit is not None and bounded and hasattr(result, "numberAccepts"):
                limit()
                # Twisted resizes the accept batch after every accept loop:
                # cap it again before each one, so no burst overshoots.
                accept = result.doRead

                def doRead() -> Any:
                    limit()
                    return accept()

                result.doRead = doRead
        _log.info("{label} listening on {address}", label=self.label, address=_describe(result.getHost()))

    def stopService(self) -> Any:
        Service.stopService(self)
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None


def _describe(address: Any) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    return str(name if name is not None else address)


class DatagramListenerService(Service):
    """
    A UDP port: at a fixed address, or beside a TCP `ListenerService` on the
    very address and port it bound (so port 0 works, and the UDP relay
    shares the TCP port as Shadowsocks peers expect).
    """

    def __init__(
        self,
        reactor: Any,
        protocol: Any,
        label: str,
        address: tuple[str, int] | None = None,
        beside: ListenerService | None = None,
        v6only: bool = False,
        reuse_port: bool = False,
    ) -> None:
        self.reactor = reactor
        self.v6only = v6only
        self.reuse_port = reuse_port
        self.protocol = protocol
        self.label = label
        self.address = address
        self.beside = beside
        self.port: Any = None
        # The key of the socket inherited from a supervisor, if it took one.
        self.inherited_key: str | None = None

    def privilegedStartService(self) -> None:
        self._listen()
        Service.privilegedStartService(self)

    def startService(self) -> None:
        if self.port is None:
            self._listen()
        Service.startService(self)

    def _listen(self) -> None:
        address = self.address
        if address is None:
            assert self.beside is not None and self.beside.port is not None
            bound = self.beside.port.getHost()
            if not isinstance(bound, (IPv4Address, IPv6Address)):
                _log.warn("{label}: no UDP beside {where}: not an IP listener", label=self.label, where=self.beside.description)
                return
            address = (bound.host, bound.port)
        key = datagram_key(*address)
        adopted = inherited(key)
        if adopted is not None:
            self.inherited_key = key
        try:
            # 65535: Twisted's default read size (8192) would truncate larger datagrams.
            if adopted is not None:
                self.port = self.reactor.adoptDatagramPort(adopted[0], adopted[1], self.protocol, 65535)
            elif (self.v6only and ":" in address[0] or self.reuse_port) and isinstance(self.reactor, PosixReactorBase):
                self.port = _UdpPort(address[1], self.protocol, address[0], 65535, self.reactor)
                self.port.v6only = self.v6only
                self.port.reuse_port = self.reuse_port
                self.port.startListening()
            else:
                self.port = self.reactor.listenUDP(address[1], self.protocol, interface=address[0], maxPacketSize=65535)
        except Exception as e:  # CannotListenError, or a bad address
            raise SystemExit(f"{self.label}: cannot listen for UDP on {_describe_pair(address)}: {e}") from None
        _log.info("{label} relaying UDP on {address}", label=self.label, address=_describe(self.port.getHost()))

    def stopService(self) -> Any:
        Service.stopService(self)
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None


class _UdpPort(udp.Port):
    """
    A UDP port whose IPv6 socket takes IPv6 only with `v6only` (so an IPv4
    one binds the same port beside it), and that shares its port with
    `reuse_port` (SO_REUSEPORT: the kernel hashes each client's address to
    one socket, so a client's datagrams keep reaching one process).
    """

    v6only = False
    reuse_port = False

    def createInternetSocket(self) -> socket.socket:
        sock: socket.socket = udp.Port.createInternetSocket(self)
        if self.v6only and self.addressFamily == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if self.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return sock


class _V6OnlyUdpPort(_UdpPort):
    """A UDP port whose IPv6 socket takes IPv6 only, so an IPv4 one binds the same port beside it."""

    v6only = True


def serve(
    top: MultiService, reactor: Any, description: str, factory: Factory, label: str, udp: Any = None,
    v6only: bool = False, fast_open: int = 0, reuse_port: bool = False,
) -> ListenerService:
    """
    Listen with `factory` on `description` under `top`, with the UDP
    protocol `udp` beside it if given; with `v6only`, an IPv6 socket sets
    IPV6_V6ONLY; with `fast_open`, a TCP socket accepts data in SYNs
    (TCP_FASTOPEN, that queue length); with `reuse_port`, SO_REUSEPORT.
    A worker takes the socket its supervisor opened for `description`
    (`ssx.net.inherited`) instead.
    """
    adopted = inherited(stream_key(description))
    endpoint: Any
    if adopted is not None:
        endpoint = tcp.AdoptedEndpoint(reactor, *adopted)
    else:
        endpoint = tcp.server_endpoint(reactor, description, LISTEN_BACKLOG, v6only, fast_open, reuse_port)
    listener = ListenerService(endpoint, factory, description, label)
    if adopted is not None:
        listener.inherited_key = stream_key(description)
    listener.setServiceParent(top)
    if udp is not None:
        DatagramListenerService(reactor, udp, label, beside=listener, reuse_port=reuse_port).setServiceParent(top)
    return listener


def _describe_pair(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class DrainService(Service):
    """
    Graceful shutdown: when the service tree stops (SIGTERM), the listeners
    stop at once while this waits for the running connections of
    `factories` to finish, for at most `grace` seconds, then aborts the rest.
    """

    def __init__(self, reactor: Any, factories: list[Any], grace: float, label: str) -> None:
        self.reactor = reactor
        self.factories = factories
        self.grace = grace
        self.label = label

    def _live(self) -> list[Any]:
        return [p for f in self.factories for p in list(f.connections)]

    def stopService(self) -> Any:
        Service.stopService(self)
        from twisted.internet.defer import Deferred

        if not self._live():
            return None
        _log.info("{label}: letting {count} connections finish (at most {grace:g} s)",
                  label=self.label, count=len(self._live()), grace=self.grace)
        done: Deferred = Deferred()
        deadline = self.reactor.seconds() + self.grace

        def check() -> None:
            live = self._live()
            if not live:
                done.callback(None)
            elif self.reactor.seconds() >= deadline:
                _log.info("{label}: closing {count} connections still running", label=self.label, count=len(live))
                for protocol in live:
                    protocol.close_both(abort=True)
                done.callback(None)
            else:
                self.reactor.callLater(0.1, check)

        check()
        return done
