"""
The HTTP side of the local end's mixed port: CONNECT tunnels and plain
(absolute-form) HTTP forwarding, through the Shadowsocks server.

Data path.  CONNECT: the request head is read (`ssx.wire.http_message`), the
server connection opened (`LocalRelayProtocol.open_relay`), ``200
Connection established`` answered, then bytes are relayed untouched.  Plain
HTTP: each request is rewritten to origin form without hop-by-hop headers
and sent through a server connection to its host:port; the response head is
rewritten for the client and the body passed on as it is.  Both bodies are
framed (`ssx.wire.http_framing`) so the proxy knows where each message ends.

One request at a time per client connection: pipelined requests wait (at
most 64 KiB of them is read) until the response before them is complete.
The server connection is kept for the next request to the same host:port,
and closed and replaced when the next request goes elsewhere, so a
keep-alive client may switch hosts freely.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.python.failure import Failure

from ssx.wire.address import Address
from ssx.errors import ProtocolError
from ssx.wire.http_framing import BodyFramer, UntilClose, request_body, response_body
from ssx.wire.http_message import (
    MAX_HEAD,
    HttpError,
    RequestHead,
    absolute_target,
    basic_credentials_ok,
    connect_target,
    error_response,
    find_head_end,
    forward_request,
    forward_response,
    parse_request_head,
    parse_response_head,
    skip_blank_lines,
)
from ssx.local.protocol import _CLOSED, _CONNECTING, _RELAY, _WAITING, LocalRelayProtocol, Socks5LocalFactory
from ssx.net.relay import OutboundProtocol, RelayProtocol

__all__ = ["HttpProxyProtocol"]

_log = Logger()

_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
_CHALLENGE = (("Proxy-Authenticate", 'Basic realm="ssx"'),)


class _OriginConnection(OutboundProtocol):
    """
    The server connection carrying forwarded requests to one host:port: its
    bytes and its end go to the `HttpProxyProtocol`, which decides whether
    the client connection ends too.
    """

    def __init__(self, owner: "HttpProxyProtocol") -> None:
        OutboundProtocol.__init__(self, owner._server_connected)
        self.owner = owner

    def dataReceived(self, data: bytes) -> None:
        self.owner.origin_data(self, data)

    def readConnectionLost(self) -> None:
        self.owner.origin_closed(self)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._closed = True
        self.owner.origin_closed(self)
        RelayProtocol.connectionLost(self, reason)


class HttpProxyProtocol(LocalRelayProtocol):
    """An application speaking HTTP to the local end as to a proxy."""

    factory: Socks5LocalFactory

    def __init__(self, factory: Socks5LocalFactory) -> None:
        LocalRelayProtocol.__init__(self, factory)
        self._tunnel = False
        self._buffer = bytearray()
        # The request in flight (forwarding), and the framing of both bodies.
        self._request: RequestHead | None = None
        self._request_body: BodyFramer | None = None
        self._response_head = bytearray()
        self._response_body: BodyFramer | None = None
        self._response_started = False
        # The host:port the current server connection leads to, whether it
        # may carry another request, and whether it was opened for this one.
        self._origin: tuple[str, int] | None = None
        self._origin_reusable = False
        self._origin_fresh = False
        self._close_after = False
        self._client_eof = False

    # Client side.

    def dataReceived(self, data: bytes) -> None:
        if self._tunnel:
            LocalRelayProtocol.dataReceived(self, data)
            return
        if self._state == _CLOSED:
            return
        if self._request_body is not None and not self._buffer:
            # An upload: pass the body on without copying it into the buffer.
            taken = self._body_bytes(data)
            if taken is None or taken == len(data):
                return
            data = data[taken:]
        self._buffer += data
        self._process()

    def _body_bytes(self, data: bytes) -> int | None:
        """Send the request body's share of `data`; None if the body is malformed (connection ended)."""
        framer = self._request_body
        assert framer is not None
        try:
            taken = framer.feed(data)
        except ProtocolError as e:
            _log.info("HTTP proxy: bad request body: {error}", error=e)
            self._end(abort=True)
            return None
        if taken:
            self._to_origin(data[:taken] if taken < len(data) else data)
        if framer.done:
            self._request_body = None
        return taken

    def _process(self) -> None:
        buffer = self._buffer
        while self._state != _CLOSED and not self._tunnel:
            if self._request_body is not None:
                taken = self._body_bytes(bytes(buffer))
                if taken is None:
                    return
                del buffer[:taken]
                if self._request_body is not None:
                    return
                continue
            if self._request is not None:
                # The next request waits for this response; don't read
                # without bound meanwhile.
                if len(buffer) > MAX_HEAD:
                    self.transport.pauseProducing()
                return
            del buffer[: skip_blank_lines(buffer)]
            if not buffer:
                return
            try:
                end = find_head_end(buffer)
                if end is None:
                    return
                head = bytes(buffer[:end])
                del buffer[:end]
                self._start(parse_request_head(head))
            except HttpError as e:
                _log.info("HTTP proxy: refused a request: {error}", error=e)
                self._refuse(e.status, str(e))
                return

    def _start(self, request: RequestHead) -> None:
        credentials = self.factory.credentials
        if credentials is not None and not basic_credentials_ok(request, credentials):
            self._refuse(407, "proxy credentials required", _CHALLENGE)
            return
        if request.method == "CONNECT":
            host, port = connect_target(request)
            if self._state != _WAITING:
                self.detach_relay()
            self._tunnel = True
            early, self._buffer = bytes(self._buffer), bytearray()
            self.open_relay(Address(host, port), early)
            return
        host, port, path = absolute_target(request.target)
        framer = request_body(request)
        payload = forward_request(request, host, port, path)
        self._request = request
        self._request_body = None if framer.done else framer
        self._response_head = bytearray()
        self._response_body = None
        self._response_started = False
        self._close_after = self._client_eof or request.wants_close()
        if self._state == _RELAY and self.peer is not None and self._origin == (host, port) and self._origin_reusable:
            self._origin_fresh = False
            self._to_origin(payload)
            return
        if self._state != _WAITING:
            self.detach_relay()
        self._origin = (host, port)
        self._origin_reusable = True
        self._origin_fresh = True
        self.open_relay(Address(host, port), payload)

    def _to_origin(self, data: bytes) -> None:
        if self._state == _RELAY:
            self.relayReceived(data)
        elif self._state == _CONNECTING:
            self._early += data

    def _refuse(self, status: int, message: str, extra: tuple[tuple[str, str], ...] = ()) -> None:
        """Answer with an error of the proxy's own and close (only if no response has begun)."""
        if not self._response_started:
            self.transport.write(error_response(status, message, extra))
        self._end()

    def _end(self, abort: bool = False) -> None:
        self._request = None
        self._request_body = None
        if self.peer is not None or self._connecting is not None:
            self.detach_relay()
        self._state = _CLOSED
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        if self._tunnel:
            LocalRelayProtocol.readConnectionLost(self)
            return
        self._client_eof = True
        if self._request is None or self._request_body is not None:
            # Nothing more can come of this connection.
            self._end()
        else:
            self._close_after = True

    # Server side.

    def relay_ready(self) -> None:
        if self._tunnel:
            self.transport.write(_ESTABLISHED)

    def relay_failed(self, failure: Failure) -> None:
        status = 504 if "timeout" in failure.getErrorMessage().lower() else 502
        self._refuse(status, "the proxy server cannot be reached")

    def origin_data(self, origin: _OriginConnection, data: bytes) -> None:
        """Bytes from the server connection of a forwarded request."""
        if origin is not self.peer or self._state == _CLOSED:
            return
        assert origin.transform is not None
        try:
            plain = origin.transform(data)
        except ProtocolError as e:
            _log.info("HTTP proxy: bad stream from the server: {error}", error=e)
            self._end(abort=True)
            return
        self.activity()
        if plain:
            try:
                self._response_bytes(plain)
            except (HttpError, ProtocolError) as e:
                _log.info("HTTP proxy: bad response from {origin}: {error}", origin=self._target, error=e)
                if self._response_started:
                    self._end(abort=True)
                else:
                    self._refuse(502, "bad response from the origin server")

    def _response_bytes(self, plain: bytes) -> None:
        request = self._request
        if request is None:
            # The origin speaks out of turn: this connection carries no more.
            self._origin_reusable = False
            self.detach_relay()
            return
        while True:
            framer = self._response_body
            if framer is None:
                self._response_head += plain
                end = find_head_end(self._response_head)
                if end is None:
                    return
                response = parse_response_head(bytes(self._response_head[:end]))
                plain = bytes(self._response_head[end:])
                self._response_head = bytearray()
                interim = 100 <= response.status < 200 and response.status != 101
                if interim:
                    # 100 Continue, 103 Early Hints: the final response follows.
                    self._response_started = True
                    self.transport.write(forward_response(response, close=False))
                    continue
                framer = UntilClose() if response.status == 101 else response_body(request.method, response)
                if isinstance(framer, UntilClose) or self._request_body is not None:
                    # Ends with the connection, or answered before the
                    # request body was all sent: the client connection cannot
                    # be used again.
                    self._close_after = True
                if response.wants_close():
                    self._origin_reusable = False
                self._response_started = True
                self._response_body = framer
                self.transport.write(forward_response(response, close=self._close_after))
            else:
                taken = framer.feed(plain)
                if taken:
                    self.transport.write(plain[:taken] if taken < len(plain) else plain)
                plain = plain[taken:]
            if framer.done:
                if plain:
                    self._origin_reusable = False
                self._response_done()
                return
            if not plain:
                return

    def _response_done(self) -> None:
        self._request = None
        self._response_body = None
        self._response_started = False
        if self._close_after:
            self._end()
            return
        if not self._origin_reusable:
            self.detach_relay()
        self.transport.resumeProducing()
        self._process()

    def origin_closed(self, origin: _OriginConnection) -> None:
        """The server connection of a forwarded request ended."""
        if origin is not self.peer or self._state == _CLOSED:
            return
        framer = self._response_body
        if self._request is None:
            # An idle kept connection closed by the origin: forget it.
            self.detach_relay()
        elif framer is not None and framer.complete_at_eof():
            self._close_after = True
            self._response_done()
        elif not self._response_started and not self._origin_fresh:
            # A kept connection that died under a new request: close
            # without an answer, as a dead keep-alive connection does, so
            # that the client retries on a new one.
            self._end()
        else:
            _log.info("HTTP proxy: the connection to {origin} ended before the response did", origin=self._target)
            self._refuse(502, "the origin server closed the connection without a complete response")

    def make_outbound(self) -> OutboundProtocol:
        if self._tunnel:
            return LocalRelayProtocol.make_outbound(self)
        return _OriginConnection(self)
