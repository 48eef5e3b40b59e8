"""
The local end: one protocol per application connection.

Data path: the application's proxy handshake — SOCKS5 (`ssx.wire.socks5`) here,
SOCKS4/4a and HTTP on the mixed port (`ssx.local.front`, `ssx.local.http`),
or nothing, for a tunnel with a fixed target — then a server chosen by the
picker (`ssx.local.picker`; the next one is tried if it cannot be reached), the
handshake's success reply, the target address header and the application's
first bytes in one encrypted write (`ssx.crypto`), then relay
(`ssx.net.relay`), encrypting upwards and decrypting downwards.  A SOCKS5 UDP
ASSOCIATE instead registers the application with the UDP relay
(`ssx.local.udp`) for as long as the TCP connection lives.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import (
    ConnectError,
    ConnectionRefusedError,
    DNSLookupError,
    NoRouteError,
    TCPTimedOutError,
    TimeoutError,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from ssx.wire import socks5
from ssx.wire.address import Address, encode_address
from ssx.errors import AddressError, Socks5Error
from ssx.interfaces import IServerPicker, ITcpClientCodec
from ssx.local.udp import Socks5Association, Socks5UdpRelay
from ssx.local.picker import Upstream
from ssx.net.relay import InboundProtocol, OutboundProtocol, RelayFactory, RelayProtocol

__all__ = [
    "FIRST_DATA_WAIT",
    "MAX_ATTEMPTS",
    "LocalFactory",
    "LocalRelayProtocol",
    "NoServerAvailable",
    "Socks5LocalFactory",
    "Socks5LocalProtocol",
    "TunnelFactory",
    "TunnelProtocol",
    "reply_code_for",
]

_log = Logger()

_WAITING, _CONNECTING, _RELAY, _ASSOCIATED, _CLOSED = range(5)

# How long to wait for the application's first bytes before sending the
# address header alone: short enough for server-speaks-first protocols, long
# enough that clients which speak first (nearly all) get one combined write.
FIRST_DATA_WAIT = 0.2

# Servers tried for one connection before the application is told it failed
# (each may take the connect timeout when it does not answer at all).
MAX_ATTEMPTS = 3


class NoServerAvailable(ConnectError):
    """No server is configured (yet: an online config may still be on its way)."""


def reply_code_for(failure: Failure) -> int:
    """The SOCKS5 reply code for a failure to reach the server."""
    error = failure.value
    if isinstance(error, ConnectionRefusedError):
        return socks5.REP_CONNECTION_REFUSED
    if isinstance(error, NoRouteError):
        return socks5.REP_NETWORK_UNREACHABLE
    if isinstance(error, DNSLookupError):
        return socks5.REP_HOST_UNREACHABLE
    if isinstance(error, (TimeoutError, TCPTimedOutError)):
        return socks5.REP_TTL_EXPIRED
    if isinstance(error, ConnectError) and getattr(error, "osError", None) == errno.EHOSTUNREACH:
        return socks5.REP_HOST_UNREACHABLE
    return socks5.REP_GENERAL_FAILURE


class LocalFactory(RelayFactory):
    """What every application connection shares: the servers (and their keys), clock, timeout."""

    def __init__(self, reactor: Any, servers: IServerPicker, timeout: float = 300.0, **limits: Any) -> None:
        RelayFactory.__init__(self, reactor, timeout, **limits)
        self.servers = servers


class LocalRelayProtocol(InboundProtocol):
    """
    An application connection relayed through the server to one target:
    `open_relay(target)` connects to the best server, or to the next when
    one cannot be reached (nothing was sent yet, so the application never
    knows); subclasses say what the application hears when that succeeds
    (`relay_ready`) or fails (`relay_failed`).
    """

    factory: LocalFactory

    def __init__(self, factory: LocalFactory) -> None:
        InboundProtocol.__init__(self, factory)
        self._state = _WAITING
        self._early = b""
        self._target: Address | None = None
        self._connecting: Deferred | None = None
        self._header_call: Any = None
        self._codec: ITcpClientCodec | None = None
        self._opened = False  # the stream's first write (target + first data) went out
        self._upstream: Upstream | None = None
        self._candidates: list[Upstream] = []

    def dataReceived(self, data: bytes) -> None:
        if self._state == _RELAY:
            self.relayReceived(data)
        elif self._state == _CONNECTING:
            self._early += data

    def open_relay(self, target: Address, early: bytes = b"") -> None:
        """Connect through a server to `target`; `early` is the application's first data."""
        self._state = _CONNECTING
        self._target = target
        self._early = early
        # Destinations are named in the log only with --verbose.
        try:
            encode_address(target)  # refuse, here, what cannot be sent
        except AddressError as e:
            if self.factory.verbose:
                _log.debug("cannot relay to {target!r}: {error}", target=target.host, error=e)
            self._state = _CLOSED
            self.relay_failed(Failure(e))
            return
        self._candidates = self.factory.servers.candidates()[:MAX_ATTEMPTS]
        if not self._candidates:
            _log.warn("no server to relay a connection through")
            self._state = _CLOSED
            self.relay_failed(Failure(NoServerAvailable("no server configured")))
            return
        self.transport.pauseProducing()
        self._try_next_server()

    def make_outbound(self) -> OutboundProtocol:
        """The protocol for the server connection (the HTTP proxy uses its own)."""
        return OutboundProtocol(self._server_connected)

    def _try_next_server(self) -> None:
        self._upstream = upstream = self._candidates.pop(0)
        d = upstream.connect(self.make_outbound())
        d.addErrback(self._server_failed)
        self._connecting = d

    def detach_relay(self) -> None:
        """
        End the server connection (or the attempt) but not the application's,
        so that `open_relay` may be called again: the HTTP proxy does this
        when a keep-alive client's next request goes to another host.
        """
        self._cancel_header_call()
        if self._connecting is not None:
            d, self._connecting = self._connecting, None
            d.cancel()
        peer = self.peer
        if peer is not None:
            self.release_producer()
            peer.release_producer()
            peer.peer = None
            self.peer = None
            if not peer._closed:
                peer.transport.loseConnection()
        self._state = _WAITING
        self._codec = None
        self._opened = False
        self.transform = None
        self._early = b""
        self._upstream = None
        self._candidates = []
        # Unregistering a producer does not resume it: reads may be paused
        # by the old server connection's full buffer.
        self.transport.resumeProducing()

    def relay_ready(self) -> None:
        """The server connection is up (the SOCKS5 end replies here)."""

    def relay_failed(self, failure: Failure) -> None:
        """The server could not be reached."""
        self.transport.loseConnection()

    def _server_failed(self, failure: Failure) -> None:
        self._connecting = None
        if failure.check(CancelledError) or self._closed:
            return
        upstream = self._upstream
        assert upstream is not None
        self.factory.servers.failed(upstream, failure.getErrorMessage())
        verbose = self.factory.verbose
        if self._candidates:
            if verbose:
                _log.debug(
                    "cannot reach server {server} for {target} ({error}); trying {next}",
                    server=upstream.label, target=self._target, error=failure.getErrorMessage(),
                    next=self._candidates[0].label,
                )
            self._try_next_server()
            return
        if verbose:
            _log.debug(
                "cannot reach server {server} for {target}: {error}",
                server=upstream.label, target=self._target, error=failure.getErrorMessage(),
            )
        else:
            _log.info("cannot reach server {server}: {error}", server=upstream.label, error=failure.getErrorMessage())
        self._state = _CLOSED
        self.relay_failed(failure)

    def _server_connected(self, server: OutboundProtocol) -> None:
        self._connecting = None
        if self._closed:
            server.transport.loseConnection()
            return
        assert self._upstream is not None
        self.factory.servers.succeeded(self._upstream)
        self._codec = codec = self._upstream.suite.client_codec()
        server.transform = codec.decrypt
        self._state = _RELAY
        self.relay_ready()
        self.join(server)
        if self._early:
            early, self._early = self._early, b""
            self._send_first(early)
        else:
            self.transform = self._first_transform
            self._header_call = self.factory.reactor.callLater(FIRST_DATA_WAIT, self._send_header_alone)
        self.transport.resumeProducing()

    def _first_transform(self, data: bytes) -> bytes:
        self._cancel_header_call()
        return self._start_stream(data)

    def _start_stream(self, data: bytes) -> bytes:
        codec = self._codec
        assert codec is not None and self._target is not None
        self.transform = codec.encrypt
        self._opened = True
        return codec.first(self._target, data)

    def _send_first(self, data: bytes) -> None:
        assert self.peer is not None
        self.peer.transport.write(self._start_stream(data))

    def _send_header_alone(self) -> None:
        self._header_call = None
        if self.peer is not None and not self.peer._closed and not self._opened:
            self._send_first(b"")

    def _cancel_header_call(self) -> None:
        if self._header_call is not None:
            if self._header_call.active():
                self._header_call.cancel()
            self._header_call = None

    def readConnectionLost(self) -> None:
        if self._state == _RELAY:
            if not self._opened:
                # Half-closed before sending anything: the server still needs
                # the address to open the target.
                self._cancel_header_call()
                self._send_first(b"")
            RelayProtocol.readConnectionLost(self)
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._cancel_header_call()
        if self._connecting is not None:
            self._connecting.cancel()
        InboundProtocol.connectionLost(self, reason)


class Socks5LocalFactory(LocalFactory):
    """The SOCKS5 listener's factory; `udp_relay` is set when UDP is relayed."""

    def __init__(
        self,
        reactor: Any,
        servers: IServerPicker,
        timeout: float = 300.0,
        credentials: tuple[bytes, bytes] | None = None,
        udp_relay: Socks5UdpRelay | None = None,
        tcp: bool = True,
        **limits: Any,
    ) -> None:
        LocalFactory.__init__(self, reactor, servers, timeout, **limits)
        self.credentials = credentials
        self.udp_relay = udp_relay
        self.tcp = tcp

    @property
    def commands(self) -> frozenset[int]:
        """The SOCKS5 commands offered to the next application."""
        commands = {socks5.CMD_CONNECT} if self.tcp else set()
        # A relay with no port (none beside a Unix-socket listener) cannot associate.
        if self.udp_relay is not None and self.udp_relay.transport is not None:
            commands.add(socks5.CMD_UDP_ASSOCIATE)
        return frozenset(commands)

    def buildProtocol(self, addr: Any) -> "Socks5LocalProtocol":
        return Socks5LocalProtocol(self)


class Socks5LocalProtocol(LocalRelayProtocol):
    """An application speaking SOCKS5 to the local end."""

    factory: Socks5LocalFactory

    def __init__(self, factory: Socks5LocalFactory) -> None:
        LocalRelayProtocol.__init__(self, factory)
        self._negotiation: socks5.Socks5Negotiation | None = socks5.Socks5Negotiation(
            factory.credentials, factory.commands
        )
        self._association: Socks5Association | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._negotiation is not None:
            self._negotiate(data)
        elif self._state != _ASSOCIATED:  # the control connection's bytes mean nothing
            LocalRelayProtocol.dataReceived(self, data)

    def _negotiate(self, data: bytes) -> None:
        assert self._negotiation is not None
        try:
            out, request = self._negotiation.feed(data)
        except Socks5Error as e:
            _log.debug("SOCKS5 negotiation failed: {error}", error=e)
            if e.reply:
                self.transport.write(e.reply)
            self._negotiation = None
            self._state = _CLOSED
            self.transport.loseConnection()
            return
        if out:
            self.transport.write(out)
        if request is None:
            return
        self._negotiation = None
        if request.command == socks5.CMD_UDP_ASSOCIATE:
            self._associate(request.address)
        else:
            self.open_relay(request.address, request.extra)

    def _associate(self, requested: Address) -> None:
        relay = self.factory.udp_relay
        assert relay is not None and relay.transport is not None
        # The association is this application's alone: its IP, and the port
        # it named or else the one its first datagram comes from.
        peer = self.transport.getPeer().host
        port = socks5.associate_source_port(requested, peer)
        association = relay.associate(peer, port)
        if association is None:
            _log.info("UDP ASSOCIATE from {peer} refused: another association sends from port {port}", peer=peer, port=port)
            self._state = _CLOSED
            self.transport.write(socks5.build_reply(socks5.REP_NOT_ALLOWED))
            self.transport.loseConnection()
            return
        self._state = _ASSOCIATED
        self._association = association
        self.set_idle_timeout(self.factory.timeout)
        # The address the application reached us on, with the UDP port.
        bind = Address(self.transport.getHost().host, relay.transport.getHost().port)
        self.transport.write(socks5.build_reply(socks5.REP_SUCCEEDED, bind))

    def relay_ready(self) -> None:
        self.transport.write(socks5.build_reply(socks5.REP_SUCCEEDED))

    def relay_failed(self, failure: Failure) -> None:
        self.transport.write(socks5.build_reply(reply_code_for(failure)))
        self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        if self._state == _ASSOCIATED:
            self.transport.loseConnection()
        else:
            LocalRelayProtocol.readConnectionLost(self)

    def timeoutConnection(self) -> None:
        relay = self.factory.udp_relay
        if self._state == _ASSOCIATED and relay is not None and self._association is not None:
            # The control connection idles by design; the association lives
            # while its application keeps using UDP.
            if relay.active(self._association):
                self.set_idle_timeout(self.factory.timeout)
                return
            self.transport.loseConnection()
            return
        LocalRelayProtocol.timeoutConnection(self)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._association is not None and self.factory.udp_relay is not None:
            self.factory.udp_relay.dissociate(self._association)
            self._association = None
        LocalRelayProtocol.connectionLost(self, reason)


class TunnelFactory(LocalFactory):
    """A TCP port forward: every connection goes to `target` through the server."""

    def __init__(self, reactor: Any, servers: IServerPicker, target: Address, timeout: float = 300.0, **limits: Any) -> None:
        LocalFactory.__init__(self, reactor, servers, timeout, **limits)
        self.target = target

    def buildProtocol(self, addr: Any) -> "TunnelProtocol":
        return TunnelProtocol(self)


class TunnelProtocol(LocalRelayProtocol):
    """A connection to a tunnel port: relayed at once to the tunnel's target."""

    factory: TunnelFactory

    def connectionMade(self) -> None:
        LocalRelayProtocol.connectionMade(self)
        self.open_relay(self.factory.target)
