"""
Transparent proxying on the local end (`--redir`, `--tproxy`; ss-redir,
rust's `redir` locals): the firewall diverts a LAN's connections and
datagrams to these ports, with no proxy settings in any application.

TCP: each accepted connection is a tunnel (`ssx.local.tunnel`) whose target
comes from the socket (`ssx.net.transparent`: `SO_ORIGINAL_DST` after a NAT
redirect, the local address under TPROXY); from there on it is the same
relay as SOCKS5 CONNECT (`ssx.local.relay`): server picking, plugins, 2022.

UDP (TPROXY only): `TproxyUdpRelay` is a local UDP relay (`ssx.local.udp`,
one server socket per LAN client in the NAT) whose datagrams carry their
original destination as the Shadowsocks address; the server's answers are
sent to the client from a socket bound to the address they came from, one
per such address, kept in a `NatTable` of their own with the same idle
timeout and bound; with --outbound-fwmark they carry the mark too, so the
firewall's exception for ssx-local's own traffic covers them.

With an ACL, both follow it as the SOCKS5 relays do: a bypassed
destination is connected (or sent to) directly, and under TPROXY the
direct targets' UDP answers go back from their address, as the server's do.

Loops: a connection or datagram whose destination is one of ssx-local's
own listening addresses (made straight to a transparent port, or diverted
back to one) would be relayed to ssx-local again; `OwnListeners` knows
those addresses, and such connections are closed and datagrams dropped
quietly, and counted (`loops_refused`).

The listening sockets are made in `privilegedStartService` (before twistd
drops root) and adopted by the reactor.
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Iterable

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ssx.errors import ConfigError, ProtocolError
from ssx.interfaces import ICipherSuite
from ssx.local.relay import LocalFactory, LocalRelayProtocol
from ssx.local.udp import LocalUdpRelay
from ssx.net import transparent
from ssx.net.nat import NatTable
from ssx.wire.address import Address, decode_address, encode_address, is_ip_literal
from ssx.wire.sockaddr import plain_ip

__all__ = [
    "REDIRECT",
    "TPROXY",
    "OwnListeners",
    "RedirFactory",
    "RedirProtocol",
    "TproxyUdpRelay",
    "TransparentTcpService",
    "TransparentUdpService",
    "add_transparent_ports",
    "check_transparent",
]

_log = Logger()

# How a TCP listener learns each connection's destination.
REDIRECT = "redirect"
TPROXY = "tproxy"

# Addresses a listener bound that stand for all of the host's.
_WILDCARDS = frozenset({"0.0.0.0", "::"})

# Where ssx-local listens: (host, port) pairs, as bound.
Listening = Callable[[], Iterable[tuple[str, int]]]


class OwnListeners:
    """
    ssx-local's own listening addresses (`tcp()` and `udp()` list them as
    they are at each call, so listeners a reload adds or removes count),
    to recognise a destination that would bring a connection or datagram
    back to ssx-local.  A listener on a wildcard address owns that port
    on every address of the host (`is_local`).
    """

    def __init__(
        self, tcp: Listening, udp: Listening, is_local: Callable[[str], bool] = transparent.is_local_address,
    ) -> None:
        self.tcp = tcp
        self.udp = udp
        self.is_local = is_local

    def includes(self, destination: tuple[str, int], udp: bool = False) -> bool:
        """Whether `destination` (an IP and port) is one of our own listening addresses."""
        host, port = plain_ip(destination[0]), destination[1]
        for own_host, own_port in (self.udp if udp else self.tcp)():
            if own_port != port:
                continue
            own_host = plain_ip(own_host)
            if own_host == host or (own_host in _WILDCARDS and self.is_local(host)):
                return True
        return False


class RedirFactory(LocalFactory):
    """The connections of one transparent TCP port (`mode`: REDIRECT or TPROXY)."""

    def __init__(self, reactor: Any, servers: Any, mode: str, timeout: float = 300.0, **limits: Any) -> None:
        LocalFactory.__init__(self, reactor, servers, timeout, **limits)
        self.mode = mode
        self.unknown_destinations = 0
        # With `own`: connections whose destination is ssx-local itself are refused.
        self.own: OwnListeners | None = None
        self.loops_refused = 0

    def buildProtocol(self, addr: Any) -> "RedirProtocol":
        return RedirProtocol(self)


class RedirProtocol(LocalRelayProtocol):
    """A diverted connection: relayed at once to where it was going."""

    factory: RedirFactory

    def connectionMade(self) -> None:
        LocalRelayProtocol.connectionMade(self)
        destination = self.destination()
        if destination is None:
            self.factory.unknown_destinations += 1
            if self.factory.verbose:
                _log.debug("transparent connection without an original destination: closed")
            self.transport.abortConnection()
            return
        own = self.factory.own
        if own is not None and own.includes(destination):
            self.factory.loops_refused += 1
            if self.factory.verbose:
                _log.debug("transparent connection to ssx-local's own {address}: closed",
                           address=_describe(*destination))
            self.transport.abortConnection()
            return
        self.open_relay(Address(*destination))

    def destination(self) -> tuple[str, int] | None:
        """Where the connection was going before the firewall diverted it (None: unknown)."""
        if self.factory.mode == TPROXY:
            host = self.transport.getHost()
            if not isinstance(host, (IPv4Address, IPv6Address)):
                return None
            return plain_ip(host.host), host.port
        try:
            found = transparent.redirected_destination(self.transport.getHandle())
        except OSError:
            # Not redirected: a connection made to the port itself.
            return None
        local = self.transport.getHost()
        if (found[0], found[1]) == (getattr(local, "host", None), getattr(local, "port", None)):
            return None  # would relay to ourselves
        return found


class _ReplySocket:
    """A socket bound to a diverted datagram's destination, to answer from it."""

    __slots__ = ("socket",)

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock

    def close(self) -> None:
        self.socket.close()


class TproxyUdpRelay(LocalUdpRelay):
    """
    UDP under TPROXY: each LAN client's datagrams go through the server to
    their original destinations; answers come back from those addresses.
    """

    def __init__(
        self, reactor: Any, suite: ICipherSuite, server: tuple[str, int], timeout: float = 60.0,
        capacity: int = 1024, picker: Any = None, router: Any = None,
    ) -> None:
        super().__init__(reactor, suite, server, timeout, capacity, picker, router)
        # The TPROXY socket read for this relay, while it listens.
        self.reader: transparent.TransparentDatagramReader | None = None
        # With `own`: datagrams whose destination is ssx-local itself are dropped.
        self.own: OwnListeners | None = None
        self.loops_refused = 0
        self.replies: NatTable[tuple[str, int], _ReplySocket] = NatTable(
            reactor.seconds, timeout, capacity, on_evict=lambda key, value: value.close()
        )
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = reactor

    def _sweep(self) -> None:
        self.nat.sweep()
        self.replies.sweep()

    def stopProtocol(self) -> None:
        super().stopProtocol()
        self.replies.clear()

    def diverted(self, data: bytes, client: tuple, destination: tuple[str, int]) -> None:
        """A datagram from `client` that was going to `destination`."""
        if self.own is not None and self.own.includes(destination, udp=True):
            self.received += 1
            self.dropped += 1
            self.loops_refused += 1
            return
        # The whole address as the socket gave it: an IPv6 link-local
        # client's answers need its scope.
        self.datagramReceived(encode_address(Address(*destination)) + data, client)

    def to_server(self, datagram: bytes) -> bytes:
        return datagram  # `diverted` put the address in front already

    def from_server(self, client: tuple, packet: bytes) -> None:
        sock = self.nat.peek(client)
        if sock is None:
            return
        try:
            plaintext = sock.codec.open(packet)
            parsed = decode_address(plaintext)
            if parsed is None:
                raise ProtocolError("server datagram truncated inside its address")
        except ProtocolError:
            self.dropped += 1
            return
        source, offset = parsed
        if not is_ip_literal(source.host) or (":" in source.host) != (":" in client[0]):
            # An answer from a name, or from the other family, cannot be
            # sent as if from where the client sent.
            self.dropped += 1
            return
        self.nat.touch(client)
        self._answer(client, (plain_ip(source.host), source.port), plaintext[offset:])

    def from_direct(self, client: tuple, source: Address, data: bytes) -> None:
        """A direct target's answer (the ACL bypassed it): from its address too, as the server's are."""
        if self.direct.peek(client) is None:
            return
        if (":" in source.host) != (":" in client[0]):
            self.dropped += 1
            return
        self.direct.touch(client)
        self._answer(client, (plain_ip(source.host), source.port), data)

    def _answer(self, client: tuple, source: tuple[str, int], data: bytes) -> None:
        """Send `data` to `client` from `source`, through that address's reply socket."""
        reply = self.replies.get(source)
        try:
            if reply is None:
                reply = _ReplySocket(transparent.reply_socket(source, self.mark))
                self.replies.add(source, reply)
            reply.socket.sendto(data, client)
        except OSError as e:
            self.dropped += 1
            _log.debug("UDP: cannot answer from {source}: {error}", source=source, error=e)


def _describe(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class TransparentTcpService(Service):
    """A transparent TCP port (REDIRECT or TPROXY) listening with `factory` while running."""

    def __init__(
        self, reactor: Any, host: str, port: int, factory: RedirFactory, label: str, reuse_port: bool = False,
    ) -> None:
        self.reactor = reactor
        self.host = host
        self.bind_port = port
        self.factory = factory
        self.label = label
        self.reuse_port = reuse_port
        self.port: Any = None

    def privilegedStartService(self) -> None:
        self._listen()
        Service.privilegedStartService(self)

    def startService(self) -> None:
        if self.port is None:
            self._listen()
        Service.startService(self)

    def _listen(self) -> None:
        where = _describe(self.host, self.bind_port)
        try:
            sock = transparent.tcp_listener(self.host, self.bind_port, self.factory.mode == TPROXY,
                                            reuse_port=self.reuse_port)
        except OSError as e:
            raise SystemExit(f"{self.label}: cannot listen on {where}: {e.strerror or e}") from None
        try:
            self.port = self.reactor.adoptStreamPort(sock.fileno(), sock.family, self.factory)
        finally:
            sock.close()  # the reactor holds its own duplicate
        self.factory.ports.append(self.port)
        bound = self.port.getHost()
        _log.info("{label} listening on {address}", label=self.label, address=_describe(bound.host, bound.port))

    def stopService(self) -> Any:
        Service.stopService(self)
        port, self.port = self.port, None
        if port is not None:
            if port in self.factory.ports:
                self.factory.ports.remove(port)
            return port.stopListening()
        return None


class TransparentUdpService(Service):
    """A TPROXY UDP port feeding `relay` while running."""

    def __init__(
        self, reactor: Any, host: str, port: int, relay: TproxyUdpRelay, label: str, reuse_port: bool = False,
    ) -> None:
        self.reactor = reactor
        self.host = host
        self.bind_port = port
        self.relay = relay
        self.label = label
        self.reuse_port = reuse_port
        self.reader: transparent.TransparentDatagramReader | None = None

    def privilegedStartService(self) -> None:
        self._listen()
        Service.privilegedStartService(self)

    def startService(self) -> None:
        if self.reader is None:
            self._listen()
        Service.startService(self)

    def _listen(self) -> None:
        where = _describe(self.host, self.bind_port)
        try:
            sock = transparent.udp_listener(self.host, self.bind_port, self.reuse_port)
        except OSError as e:
            raise SystemExit(f"{self.label}: cannot listen for UDP on {where}: {e.strerror or e}") from None
        self.reader = transparent.TransparentDatagramReader(self.reactor, sock, self.relay.diverted)
        self.relay.reader = self.reader
        # The relay answers through its reply sockets: it has no transport of its own.
        self.relay.doStart()
        self.reader.startReading()
        host, port = self.reader.getHost()
        _log.info("{label} relaying UDP on {address}", label=self.label, address=_describe(host, port))

    def stopService(self) -> Any:
        Service.stopService(self)
        reader, self.reader = self.reader, None
        if reader is not None:
            self.relay.reader = None
            reader.close()
            self.relay.doStop()
        return None


def check_transparent(config: Any) -> None:
    """
    Stop start-up, naming the capability and the option, where the
    transparent ports or the outbound mark need a privilege we lack
    (REDIRECT needs none: only TPROXY's IP_TRANSPARENT and SO_MARK do).
    """
    tproxy = [port for port in config.transparent if port.tcp == TPROXY or port.udp]
    if tproxy:
        option = "tproxy" if any(port.tcp == TPROXY for port in tproxy) else "redir"
        problem = transparent.transparent_problem()
        if problem is not None:
            raise ConfigError(option, problem if option == "tproxy" else f"UDP (-u) is by TPROXY: {problem}")
    if config.outbound_fwmark is not None:
        problem = transparent.mark_problem(config.outbound_fwmark)
        if problem is not None:
            raise ConfigError("outbound_fwmark", problem)


def add_transparent_ports(top: Any, reactor: Any, config: Any) -> None:
    """
    The transparent ports of `config` under `top` (an
    `ssx.local.tap.LocalService`), following its ACL (`top.router`) and
    refusing destinations among its own listeners.
    """
    relays = config.relays
    udp_upstream = top.picker.upstreams()[0] if any(port.udp for port in config.transparent) else None
    own = OwnListeners(lambda: _tcp_listening(top), lambda: _udp_listening(top))
    for port in config.transparent:
        if port.tcp is not None:
            factory = RedirFactory(
                reactor, top.picker, port.tcp, config.timeout, verbose=config.verbose, router=top.router,
                **config.limits.factory_arguments(),
            )
            factory.own = own
            top.factories.append(factory)
            service: Service = TransparentTcpService(reactor, port.host, port.port, factory, port.label, top.reuse_port)
            service.setServiceParent(top)
        if port.udp and udp_upstream is not None:
            entry = udp_upstream.entry
            relay = TproxyUdpRelay(
                reactor, udp_upstream.suite, (entry.host, entry.port), relays.timeout, relays.capacity, picker=top.picker,
                router=top.router,
            )
            relay.own = own
            top.udp_relays.append(relay)
            service = TransparentUdpService(reactor, port.host, port.port, relay, port.label, top.reuse_port)
            service.setServiceParent(top)


def _bound(port: Any) -> list[tuple[str, int]]:
    """Where a listening port (TCP) or UDP transport is bound: one (host, port), or none (not IP, or closed)."""
    try:
        address = port.getHost()
    except (AttributeError, OSError):  # closed: Twisted drops its socket
        return []
    if isinstance(address, (IPv4Address, IPv6Address)):
        return [(address.host, address.port)]
    return []


def _tcp_listening(top: Any) -> list[tuple[str, int]]:
    """Where `top`'s TCP listeners (proxy ports, tunnels, transparent ports) are bound."""
    return [found for factory in top.factories for port in factory.ports for found in _bound(port)]


def _udp_listening(top: Any) -> list[tuple[str, int]]:
    """Where `top`'s UDP relays (SOCKS5, tunnels, TPROXY) are bound."""
    found: list[tuple[str, int]] = []
    for relay in top.udp_relays:
        reader = getattr(relay, "reader", None)
        if reader is not None:
            found.append(reader.getHost())
        elif relay.transport is not None:
            found += _bound(relay.transport)
    return found
