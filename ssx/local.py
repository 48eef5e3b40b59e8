"""
The local end: one protocol per application connection.

Data path: SOCKS5 negotiation (`ssx.socks5`) — or nothing, for a tunnel
with a fixed target — then connect to the server, SOCKS5 reply, the target
address header and the application's first bytes in one encrypted write
(`ssx.crypto`), then relay (`ssx.relay`), encrypting upwards and decrypting
downwards.  A SOCKS5 UDP ASSOCIATE instead registers the application with the
UDP relay (`ssx.local_udp`) for as long as the TCP connection lives.
"""

from __future__ import annotations

import errno
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import (
    ConnectError,
    ConnectionRefusedError,
    DNSLookupError,
    NoRouteError,
    TCPTimedOutError,
    TimeoutError,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ssx import socks5
from ssx.address import Address, encode_address
from ssx.crypto import CipherSuite
from ssx.errors import Socks5Error
from ssx.local_udp import Socks5UdpRelay
from ssx.relay import InboundProtocol, OutboundProtocol, RelayFactory, RelayProtocol

__all__ = [
    "FIRST_DATA_WAIT",
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
    """What every application connection shares: keys, the way to the server, clock."""

    def __init__(
        self,
        reactor: Any,
        suite: CipherSuite,
        connect_server: Callable[[Protocol], Deferred],
        timeout: float = 300.0,
    ) -> None:
        RelayFactory.__init__(self, reactor, timeout)
        self.suite = suite
        self.connect_server = connect_server


class LocalRelayProtocol(InboundProtocol):
    """
    An application connection relayed through the server to one target:
    `open_relay(target)` connects to the server; subclasses say what the
    application hears when that succeeds (`relay_ready`) or fails
    (`relay_failed`).
    """

    factory: LocalFactory

    def __init__(self, factory: LocalFactory) -> None:
        self.factory = factory
        self._state = _WAITING
        self._early = b""
        self._header = b""
        self._target: Address | None = None
        self._connecting: Deferred | None = None
        self._header_call: Any = None
        self._encrypt: Callable[[bytes], bytes] | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._state == _RELAY:
            self.relayReceived(data)
        elif self._state == _CONNECTING:
            self._early += data

    def open_relay(self, target: Address, early: bytes = b"") -> None:
        self._state = _CONNECTING
        self._target = target
        self._early = early
        self._header = encode_address(target)
        self.transport.pauseProducing()
        d = self.factory.connect_server(OutboundProtocol(self._server_connected))
        d.addErrback(self._server_failed)
        self._connecting = d

    def relay_ready(self) -> None:
        """The server connection is up (the SOCKS5 end replies here)."""

    def relay_failed(self, failure: Failure) -> None:
        """The server could not be reached."""
        self.transport.loseConnection()

    def _server_failed(self, failure: Failure) -> None:
        self._connecting = None
        if failure.check(CancelledError) or self._closed:
            return
        _log.info(
            "cannot reach the server for {target}: {error}", target=self._target, error=failure.getErrorMessage()
        )
        self._state = _CLOSED
        self.relay_failed(failure)

    def _server_connected(self, server: OutboundProtocol) -> None:
        self._connecting = None
        if self._closed:
            server.transport.loseConnection()
            return
        suite = self.factory.suite
        self._encrypt = suite.tcp_encryptor().encrypt
        server.transform = suite.tcp_decryptor().decrypt
        self._state = _RELAY
        self.relay_ready()
        self.join(server)
        self.resetTimeout()
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
        encrypt = self._encrypt
        assert encrypt is not None
        self.transform = encrypt
        header, self._header = self._header, b""
        return encrypt(header + data)

    def _send_first(self, data: bytes) -> None:
        assert self.peer is not None
        self.peer.transport.write(self._start_stream(data))

    def _send_header_alone(self) -> None:
        self._header_call = None
        if self.peer is not None and not self.peer._closed and self._header:
            self._send_first(b"")

    def _cancel_header_call(self) -> None:
        if self._header_call is not None:
            if self._header_call.active():
                self._header_call.cancel()
            self._header_call = None

    def readConnectionLost(self) -> None:
        if self._state == _RELAY:
            if self._header:
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
        suite: CipherSuite,
        connect_server: Callable[[Protocol], Deferred],
        timeout: float = 300.0,
        credentials: tuple[bytes, bytes] | None = None,
        udp_relay: Socks5UdpRelay | None = None,
        tcp: bool = True,
    ) -> None:
        LocalFactory.__init__(self, reactor, suite, connect_server, timeout)
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
        self._associated_ip: str | None = None

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
            self._associate()
        else:
            self.open_relay(request.address, request.extra)

    def _associate(self) -> None:
        relay = self.factory.udp_relay
        assert relay is not None and relay.transport is not None
        self._state = _ASSOCIATED
        self._associated_ip = self.transport.getPeer().host
        relay.associate(self._associated_ip)
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
        if self._state == _ASSOCIATED and relay is not None and self._associated_ip is not None:
            # The control connection idles by design; the association lives
            # while its application keeps using UDP.
            if relay.active(self._associated_ip):
                self.resetTimeout()
                return
            self.transport.loseConnection()
            return
        LocalRelayProtocol.timeoutConnection(self)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._associated_ip is not None and self.factory.udp_relay is not None:
            self.factory.udp_relay.dissociate(self._associated_ip)
            self._associated_ip = None
        LocalRelayProtocol.connectionLost(self, reason)


class TunnelFactory(LocalFactory):
    """A TCP port forward: every connection goes to `target` through the server."""

    def __init__(
        self,
        reactor: Any,
        suite: CipherSuite,
        connect_server: Callable[[Protocol], Deferred],
        target: Address,
        timeout: float = 300.0,
    ) -> None:
        LocalFactory.__init__(self, reactor, suite, connect_server, timeout)
        self.target = target

    def buildProtocol(self, addr: Any) -> "TunnelProtocol":
        return TunnelProtocol(self)


class TunnelProtocol(LocalRelayProtocol):
    """A connection to a tunnel port: relayed at once to the tunnel's target."""

    factory: TunnelFactory

    def connectionMade(self) -> None:
        LocalRelayProtocol.connectionMade(self)
        self.open_relay(self.factory.target)
