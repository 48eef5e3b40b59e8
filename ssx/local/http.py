"""
The HTTP side of the local end's mixed port: CONNECT tunnels and plain
(absolute-form) HTTP forwarding, through the Shadowsocks server.

Data path.  CONNECT: the request head is read (`ssx.wire.http_codec`), the
server connection opened (`LocalRelayProtocol.open_relay`), ``200
Connection established`` answered, then bytes are relayed untouched.  Plain
HTTP: each request goes on in origin form without hop-by-hop headers
(`ssx.wire.http_message`) through a server connection to its host:port, and its
response comes back the same way.  h11 reads and writes both sides
(`ssx.wire.http_codec`), so the proxy knows where every message ends; this
module only moves its events between the two connections.

One request at a time per client connection: pipelined requests wait (at
most 64 KiB of them is read) until the response before them is complete.
The server connection is kept for the next request to the same host:port,
and closed and replaced when the next request goes elsewhere, so a
keep-alive client may switch hosts freely.  Per-connection events are
logged at debug level, and name no destination.
"""

from __future__ import annotations

from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from ssx.wire.address import Address
from ssx.errors import AddressError, ProtocolError
from ssx.wire.http_codec import MAX_HEAD, ClientSide, Data, EndOfMessage, OriginSide, Request
from ssx.wire.http_message import HttpError, absolute_target, basic_credentials_ok, connect_target, error_response
from ssx.local.relay import CLOSED, CONNECTING, RELAYING, WAITING, LocalRelayProtocol
from ssx.local.socks import ProxyPortFactory
from ssx.net.relay import OutboundProtocol

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

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self.owner.origin_closed(self)
        # Then as any outbound connection: `ready` fails if the connection
        # ended before it was ready (a TLS handshake refused, say), or lets
        # go of this protocol if it was.
        OutboundProtocol.connectionLost(self, reason)


class HttpProxyProtocol(LocalRelayProtocol):
    """An application speaking HTTP to the local end as to a proxy."""

    factory: ProxyPortFactory

    def __init__(self, factory: ProxyPortFactory) -> None:
        LocalRelayProtocol.__init__(self, factory)
        self._tunnel = False
        # h11 on the application's side, dropped once a CONNECT tunnel starts.
        self._client: ClientSide | None = ClientSide()
        # The request in flight (forwarding), and whether its response began.
        self._request: Request | None = None
        self._response_started = False
        # The current server connection: its codec, the host:port it leads
        # to, whether it may carry another request, and whether it was
        # opened for this one.
        self._origin_codec: OriginSide | None = None
        self._origin: tuple[str, int] | None = None
        self._origin_reusable = False
        self._origin_fresh = False
        self._client_eof = False

    # Client side.

    def dataReceived(self, data: bytes) -> None:
        if self._tunnel:
            LocalRelayProtocol.dataReceived(self, data)
            return
        if self._state == CLOSED:
            return
        assert self._client is not None
        self._client.receive(data)
        self._process()

    def _process(self) -> None:
        client = self._client
        assert client is not None
        while self._state != CLOSED and not self._tunnel:
            try:
                event = client.next_event()
                if event is None:
                    if client.held > MAX_HEAD:
                        # The next request waits for this response; don't
                        # read without bound meanwhile.
                        self.transport.pauseProducing()
                    return
                if isinstance(event, Request):
                    self._start(client, event)
                    continue
                origin = self._origin_codec
                assert origin is not None
                if isinstance(event, Data):
                    self._to_origin(origin.send_data(event.data))
                else:
                    self._to_origin(origin.send_end(event.headers.raw_items()))
            except HttpError as e:
                if self._request is None:
                    if self.factory.verbose:
                        _log.debug("HTTP proxy: refused a request: {error}", error=e)
                    self._refuse(e.status, str(e))
                else:
                    # Part of it went on already: no answer of ours can follow.
                    if self.factory.verbose:
                        _log.debug("HTTP proxy: bad request body: {error}", error=e)
                    self._end(abort=True)
                return

    def _start(self, client: ClientSide, request: Request) -> None:
        credentials = self.factory.credentials
        if credentials is not None and not basic_credentials_ok(request.headers.raw_items(), credentials):
            self._refuse(407, "proxy credentials required", _CHALLENGE)
            return
        target = request.target.decode("ascii")  # h11 admits only visible ASCII there
        if request.method == b"CONNECT":
            host, port = connect_target(target)
            if self._state != WAITING:
                self.detach_relay()
            self._tunnel = True
            early, self._client = client.rest(), None
            self.open_relay(Address(host, port), early)
            return
        host, port, path = absolute_target(target)
        close = self._client_eof or client.closing
        reuse = self._state == RELAYING and self.peer is not None and self._origin == (host, port) and self._origin_reusable
        origin = self._origin_codec if reuse and self._origin_codec is not None else OriginSide()
        payload = origin.request(request, host, port, path, close)
        self._request = request
        self._response_started = False
        if reuse:
            self._origin_fresh = False
            self._to_origin(payload)
            return
        if self._state != WAITING:
            self.detach_relay()
        self._origin_codec = origin
        self._origin = (host, port)
        self._origin_reusable = True
        self._origin_fresh = True
        self.open_relay(Address(host, port), payload)

    def _to_origin(self, data: bytes) -> None:
        if self._state == RELAYING:
            self.relayReceived(data)
        elif self._state == CONNECTING:
            self.keep_early(data)

    def _refuse(self, status: int, message: str, extra: tuple[tuple[str, str], ...] = ()) -> None:
        """Answer with an error of the proxy's own and close (only if no response has begun)."""
        if not self._response_started:
            self.transport.write(error_response(status, message, extra))
        self._end()

    def _end(self, abort: bool = False) -> None:
        self._request = None
        if self.peer is not None or self._connecting is not None:
            self.detach_relay()
        self._state = CLOSED
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        if self._tunnel:
            LocalRelayProtocol.readConnectionLost(self)
            return
        self._client_eof = True
        if self._request is None or self._client is None or not self._client.request_complete:
            # Nothing more can come of this connection.
            self._end()

    # Server side.

    def relay_ready(self) -> None:
        if self._tunnel:
            self.transport.write(_ESTABLISHED)

    def relay_failed(self, failure: Failure) -> None:
        if failure.check(AddressError):
            self._refuse(400, "the target is not a host name and port a server can reach")
            return
        status = 504 if "timeout" in failure.getErrorMessage().lower() else 502
        self._refuse(status, "the proxy server cannot be reached")

    def origin_data(self, origin: _OriginConnection, data: bytes) -> None:
        """Bytes from the server connection of a forwarded request."""
        if origin is not self.peer or self._state == CLOSED:
            return
        assert origin.transform is not None
        try:
            plain = origin.transform(data)
        except ProtocolError as e:
            if self.factory.verbose:
                _log.debug("HTTP proxy: bad stream from the server: {error}", error=e)
            self._end(abort=True)
            return
        self.activity()
        if not plain:
            return
        if self._request is None:
            # The origin speaks out of turn: this connection carries no more.
            self._origin_reusable = False
            self.detach_relay()
            return
        assert self._origin_codec is not None
        try:
            self._origin_codec.receive(plain)
            self._response_events()
        except HttpError as e:
            if self.factory.verbose:
                _log.debug("HTTP proxy: bad response from the origin: {error}", error=e)
            if self._response_started:
                self._end(abort=True)
            else:
                self._refuse(502, "bad response from the origin server")

    def _response_events(self) -> None:
        """Pass on what the origin's bytes so far make of the response."""
        origin, client = self._origin_codec, self._client
        assert origin is not None and client is not None
        while self._request is not None and self._state != CLOSED:
            event = origin.next_event()
            if event is None:
                return
            if isinstance(event, Data):
                self.transport.write(client.respond_data(event.data))
            elif isinstance(event, EndOfMessage):
                self.transport.write(client.respond_end(event.headers.raw_items()))
                self._response_done()
                return
            else:
                # A head: 1xx, or the final one.  A response that comes
                # before the request body was all read ends the client
                # connection: it says so.
                close = self._client_eof or not client.request_complete
                self._response_started = True
                self.transport.write(client.respond(event, close))

    def _response_done(self) -> None:
        origin, client = self._origin_codec, self._client
        assert origin is not None and client is not None
        self._request = None
        self._response_started = False
        self._origin_reusable = origin.next_request()
        if self._client_eof or not client.next_request():
            self._end()
            return
        if not self._origin_reusable:
            self.detach_relay()
        self.transport.resumeProducing()
        self._process()

    def origin_closed(self, origin: _OriginConnection) -> None:
        """The server connection of a forwarded request ended."""
        if origin is not self.peer or self._state == CLOSED:
            return
        request = self._request
        if request is None:
            # An idle kept connection closed by the origin: forget it.
            self.detach_relay()
            return
        assert self._origin_codec is not None
        try:
            # A response without a length ends here.
            self._origin_codec.receive(b"")
            self._response_events()
        except HttpError:
            pass
        if self._request is not request or self._state == CLOSED:
            return
        if not self._response_started and not self._origin_fresh:
            # A kept connection that died under a new request: close
            # without an answer, as a dead keep-alive connection does, so
            # that the client retries on a new one.
            self._end()
            return
        if self.factory.verbose:
            _log.debug("HTTP proxy: the origin closed the connection before the response ended")
        self._refuse(502, "the origin server closed the connection without a complete response")

    def make_outbound(self) -> OutboundProtocol:
        if self._tunnel:
            return LocalRelayProtocol.make_outbound(self)
        return _OriginConnection(self)
