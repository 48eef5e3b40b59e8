"""
The local end: one `Socks5LocalProtocol` per application connection.

Data path: SOCKS5 negotiation (`ssx.socks5`) -> connect to the server ->
SOCKS5 reply -> the target address header and the application's first bytes
in one encrypted write (`ssx.crypto`) -> relay (`ssx.relay`), encrypting
upwards and decrypting downwards.
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
from ssx.address import encode_address
from ssx.crypto import CipherSuite
from ssx.errors import Socks5Error
from ssx.relay import InboundProtocol, OutboundProtocol, RelayFactory, RelayProtocol

__all__ = ["Socks5LocalFactory", "Socks5LocalProtocol", "reply_code_for"]

_log = Logger()

_NEGOTIATING, _CONNECTING, _RELAY, _CLOSED = range(4)

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


class Socks5LocalFactory(RelayFactory):
    """What every application connection shares: keys, the way to the server, policy, clock."""

    def __init__(
        self,
        reactor: Any,
        suite: CipherSuite,
        connect_server: Callable[[Protocol], Deferred],
        timeout: float = 300.0,
        credentials: tuple[bytes, bytes] | None = None,
    ) -> None:
        RelayFactory.__init__(self, reactor, timeout)
        self.suite = suite
        self.connect_server = connect_server
        self.credentials = credentials
        self.commands = frozenset({socks5.CMD_CONNECT})

    def buildProtocol(self, addr: Any) -> "Socks5LocalProtocol":
        return Socks5LocalProtocol(self)


class Socks5LocalProtocol(InboundProtocol):
    """An application's connection to the local end."""

    def __init__(self, factory: Socks5LocalFactory) -> None:
        self.factory = factory
        self._state = _NEGOTIATING
        self._negotiation = socks5.Socks5Negotiation(factory.credentials, factory.commands)
        self._early = b""
        self._header = b""
        self._connecting: Deferred | None = None
        self._header_call: Any = None
        self._encrypt: Callable[[bytes], bytes] | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._state == _RELAY:
            self.relayReceived(data)
        elif self._state == _NEGOTIATING:
            self._negotiate(data)
        elif self._state == _CONNECTING:
            self._early += data

    def _negotiate(self, data: bytes) -> None:
        try:
            out, request = self._negotiation.feed(data)
        except Socks5Error as e:
            _log.debug("SOCKS5 negotiation failed: {error}", error=e)
            if e.reply:
                self.transport.write(e.reply)
            self._state = _CLOSED
            self.transport.loseConnection()
            return
        if out:
            self.transport.write(out)
        if request is not None:
            self._state = _CONNECTING
            self._early = request.extra
            self._header = encode_address(request.address)
            self._target = request.address
            self.transport.pauseProducing()
            d = self.factory.connect_server(OutboundProtocol(self._server_connected))
            d.addErrback(self._server_failed)
            self._connecting = d

    def _server_failed(self, failure: Failure) -> None:
        self._connecting = None
        if failure.check(CancelledError) or self._closed:
            return
        code = reply_code_for(failure)
        _log.info(
            "cannot reach the server for {target}: {error}",
            target=self._target,
            error=failure.getErrorMessage(),
        )
        self._state = _CLOSED
        self.transport.write(socks5.build_reply(code))
        self.transport.loseConnection()

    def _server_connected(self, server: OutboundProtocol) -> None:
        self._connecting = None
        if self._closed:
            server.transport.loseConnection()
            return
        suite = self.factory.suite
        self._encrypt = suite.tcp_encryptor().encrypt
        server.transform = suite.tcp_decryptor().decrypt
        self._state = _RELAY
        self.transport.write(socks5.build_reply(socks5.REP_SUCCEEDED))
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

    def timeoutConnection(self) -> None:
        self.close_both()

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
