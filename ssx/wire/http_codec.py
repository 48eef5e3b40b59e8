"""
HTTP/1.1 on both sides of the local end's HTTP proxy, on h11, sans-IO.

`ClientSide` is the application's connection: h11 in the server role reads
its requests one at a time (head, body pieces, end) and writes the responses
the proxy passes back.  `OriginSide` is one connection through the
Shadowsocks server to an origin: h11 in the client role writes the request
in origin form and reads the response, and says at its end whether the
connection may carry another.  h11 validates heads (Content-Length must be
ASCII digits, at most 20 of them), frames every body (Content-Length,
chunked, or until close for responses, which go on chunked to HTTP/1.1
applications) and parses incrementally, scanning each byte once.  Two
things h11 does not do for a proxy are done in `ClientSide`: a Host for
CONNECT and absolute-form requests that leave it out, and keep-alive for
HTTP/1.0 clients that ask for it.  Bad input from the application is
`HttpError` with the status to answer (400, 431, 501); from the origin,
`HttpError` 502.  No Twisted here.
"""

from __future__ import annotations

import re
from typing import Union

import h11
from h11 import Data, EndOfMessage, InformationalResponse, Request, Response

from ssx.wire.http_message import (
    Headers,
    HttpError,
    connection_tokens,
    end_to_end,
    origin_headers,
    response_head,
    supply_host,
)

__all__ = [
    "MAX_HEAD",
    "ClientSide",
    "Data",
    "EndOfMessage",
    "InformationalResponse",
    "OriginSide",
    "Request",
    "Response",
]

# The most an incomplete head may take (h11 answers 431 beyond it); it also
# bounds a chunk-size line and the trailers.
MAX_HEAD = 64 * 1024

_VERSIONS = (b"1.0", b"1.1")

# Where h11 finds the end of a head.
_HEAD_END = re.compile(rb"\n\r?\n")

RequestEvent = Union[Request, Data, EndOfMessage]
ResponseEvent = Union[InformationalResponse, Response, Data, EndOfMessage]


def _next(connection: h11.Connection, status: int | None) -> object:
    """
    h11's next event; every way its input can be refused is HttpError
    `status` (None: the status h11 suggests, 400, 431 or 501).
    """
    try:
        return connection.next_event()
    except h11.RemoteProtocolError as e:
        raise HttpError(status or e.error_status_hint, str(e)) from None
    except ValueError:
        # h11 before 0.15 let int() refuse a Content-Length of more than
        # 4,300 digits escape from here; setup.cfg asks for a later one.
        raise HttpError(status or 400, "bad Content-Length") from None


def _length_known(method: bytes, response: Response) -> bool:
    """Whether the application can tell where `response` ends without the connection ending (RFC 9112 §6.3)."""
    if method == b"HEAD" or response.status_code in (204, 304):
        return True
    names = {k.lower() for k, _ in response.headers.raw_items()}
    return b"content-length" in names and b"transfer-encoding" not in names


def _check_framing(headers: Headers, status: int) -> None:
    names = {k.lower() for k, _ in headers}
    if b"transfer-encoding" in names and b"content-length" in names:
        # h11 would let Transfer-Encoding win; both at once is how requests
        # are smuggled past a proxy (RFC 9112 §6.3).
        raise HttpError(status, "both Transfer-Encoding and Content-Length")


class ClientSide:
    """
    The application's connection: requests in, responses out.

    Two things differ from h11's server role, both for what proxy clients
    do.  A request head is gathered here before h11 reads it, so that an
    HTTP/1.1 CONNECT or absolute-form request without Host gets one from
    its target (`supply_host`).  And an HTTP/1.0 client that asks for
    keep-alive (``Connection`` or ``Proxy-Connection: keep-alive``), which
    h11 never grants, keeps its connection when the response's end shows in
    its head: that head is written here with ``Connection: keep-alive``,
    its body passes on as the origin side read it, and the next request is
    read by a new h11 connection.
    """

    def __init__(self) -> None:
        self._begin(b"")

    def _begin(self, rest: bytes) -> None:
        """Read the next request with a new h11 connection, starting with `rest`."""
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        # Bytes read after a complete request, before its response ended
        # (h11 refuses them in some states, and they must stay bounded).
        self._held = bytearray()
        # The request head read so far, until h11 gets it (None after).
        self._head: bytearray | None = bytearray()
        self._complete = False
        self._closing = False
        self._method = b""
        # An HTTP/1.0 request that asked for keep-alive; whether its
        # response is written here (not by h11), and whether it ended.
        self._keep_alive_10 = False
        self._passthrough = False
        self._response_ended = False
        self.receive(rest)

    @property
    def held(self) -> int:
        """How many bytes wait behind the current request."""
        return len(self._held)

    @property
    def request_complete(self) -> bool:
        """Whether the current request was read to its end (body included)."""
        return self._complete

    def receive(self, data: bytes) -> None:
        """Bytes read from the application (not its EOF, which the proxy handles itself)."""
        if not data:
            return
        if self._complete:
            self._held += data
            return
        if self._head is None:
            self._h11.receive_data(data)
            return
        if not self._head:
            # RFC 9112 §2.2: blank lines before a request line are ignored
            # (some clients send CRLF after a body).
            data = data.lstrip(b"\r\n")
            if not data:
                return
        self._gather(self._head, data)

    def _gather(self, head: bytearray, data: bytes) -> None:
        """Hold `data` until the head is whole, then give h11 the head (with Host where due) and what follows."""
        buffer: bytes | bytearray = data
        start = 0
        if head:
            start = max(0, len(head) - 2)  # the blank line may have begun in the last read
            head += data
            buffer = head
        end = _HEAD_END.search(buffer, start)
        if end is None and len(buffer) <= MAX_HEAD and buffer[0] > 0x20:
            if buffer is data:
                head += data
            return
        self._head = None
        if end is None:
            # For h11 to refuse: 431 beyond MAX_HEAD, 400 for a first byte
            # that starts no request line (as a TLS ClientHello does).
            self._h11.receive_data(bytes(buffer))
            return
        whole = bytes(buffer[: end.end()])
        supplied = supply_host(whole)
        if supplied is whole and buffer is data:
            self._h11.receive_data(data)  # the usual case: a whole head in one read, nothing to supply
        else:
            self._h11.receive_data(supplied)
            if len(buffer) > end.end():  # (b"" would tell h11 the application closed)
                self._h11.receive_data(bytes(buffer[end.end() :]))

    def next_event(self) -> RequestEvent | None:
        """
        The next piece of the current request, or None until more bytes come;
        None too once the request is complete, until `next_request`.
        """
        if self._complete or self._head is not None:
            return None
        event = _next(self._h11, None)
        if type(event) is Request:
            if event.http_version not in _VERSIONS:
                raise HttpError(400, "only HTTP/1.0 and HTTP/1.1 are spoken here")
            _check_framing(event.headers.raw_items(), 400)
            tokens = connection_tokens(event.headers.raw_items())
            self._method = event.method
            self._keep_alive_10 = event.http_version == b"1.0" and b"keep-alive" in tokens and b"close" not in tokens
            self._closing = b"close" in tokens or (event.http_version != b"1.1" and not self._keep_alive_10)
        elif type(event) is EndOfMessage:
            self._complete = True
        elif type(event) is not Data:
            return None  # NEED_DATA, or PAUSED on a CONNECT or Upgrade request
        return event

    @property
    def closing(self) -> bool:
        """Whether the application closes after the current request's response (HTTP/1.0 without keep-alive, or close)."""
        return self._closing

    def rest(self) -> bytes:
        """Every byte read after the current request's head: a CONNECT tunnel's first data."""
        return self._h11.trailing_data[0] + bytes(self._held)

    def respond(self, head: InformationalResponse | Response, close: bool = False) -> bytes:
        """The head of the origin's response (or an interim one) for the application; `close` announces the end."""
        headers = end_to_end(head.headers.raw_items())
        if (close or self._closing) and type(head) is Response:
            headers.append((b"Connection", b"close"))
        # h11 ends every exchange with an HTTP/1.0 client (it adds
        # Connection: close); this head is written here instead when the
        # client may keep the connection: it asked to, and can tell where
        # the body ends without a close.
        keep = isinstance(head, Response) and self._keep_alive_10 and not close and _length_known(self._method, head)
        if keep:
            headers.append((b"Connection", b"keep-alive"))
        try:
            event = type(head)(status_code=head.status_code, reason=head.reason, headers=headers)
        except h11.LocalProtocolError as e:
            raise HttpError(502, str(e)) from None
        if keep:
            self._passthrough = True
            return response_head(event.status_code, event.reason, event.headers.raw_items())
        return self._send(event)

    def respond_data(self, data: bytes) -> bytes:
        if self._passthrough:
            # A body of a known length goes on as the origin side framed it
            # (as bytes: h11 reads into bytearrays).
            return bytes(data)
        return self._send(Data(data=data))

    def respond_end(self, trailers: Headers) -> bytes:
        if self._passthrough:
            self._response_ended = True
            return b""  # a length-delimited body has no trailers
        # Trailers exist only in chunked bodies, which HTTP/1.0 cannot read.
        return self._send(EndOfMessage(headers=list(trailers) if self._h11.their_http_version == b"1.1" else []))

    def _send(self, event: InformationalResponse | Response | Data | EndOfMessage) -> bytes:
        try:
            return self._h11.send(event)
        except h11.LocalProtocolError as e:
            raise HttpError(502, str(e)) from None

    def next_request(self) -> bool:
        """
        After a response's end: get ready for the next request and say True,
        or False when the connection must close (HTTP/1.0 without
        keep-alive or a response of known length, `close`, or a request
        body not yet read to its end).
        """
        if self._passthrough:
            ready = self._complete and self._response_ended
        else:
            states = self._h11.states
            ready = self._complete and states[h11.SERVER] is h11.DONE and states[h11.CLIENT] is h11.DONE
        if not ready:
            return False
        # A new h11 connection rather than start_next_cycle, so that blank
        # lines before the next request line are skipped as at the start
        # (and because h11 ends HTTP/1.0 connections).
        self._begin(self.rest())
        return True


class OriginSide:
    """One connection to an origin: requests out, responses in."""

    def __init__(self) -> None:
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)

    def request(self, request: Request, host: str, port: int, path: str, close: bool) -> bytes:
        """`request` as the origin gets it: origin-form `path`, Host from the URL, hop-by-hop headers gone."""
        headers = origin_headers(request.headers.raw_items(), host, port, close)
        try:
            return self._h11.send(Request(method=request.method, target=path.encode("ascii"), headers=headers))
        except (h11.LocalProtocolError, UnicodeEncodeError) as e:
            raise HttpError(400, str(e)) from None

    def send_data(self, data: bytes) -> bytes:
        return self._send(Data(data=data))

    def send_end(self, trailers: Headers) -> bytes:
        return self._send(EndOfMessage(headers=list(trailers)))

    def _send(self, event: Data | EndOfMessage) -> bytes:
        try:
            return self._h11.send(event)
        except h11.LocalProtocolError as e:
            raise HttpError(400, str(e)) from None

    def receive(self, data: bytes) -> None:
        """Bytes of the response; b"" when the origin closed."""
        self._h11.receive_data(data)

    def next_event(self) -> ResponseEvent | None:
        """The next piece of the response, or None until more bytes come."""
        event = _next(self._h11, 502)
        if type(event) in (Response, InformationalResponse):
            if event.http_version not in _VERSIONS:  # type: ignore[attr-defined]
                raise HttpError(502, "the origin speaks neither HTTP/1.0 nor HTTP/1.1")
            _check_framing(event.headers.raw_items(), 502)  # type: ignore[attr-defined]
        elif type(event) not in (Data, EndOfMessage):
            return None
        return event  # type: ignore[return-value]

    def next_request(self) -> bool:
        """After a response's end: whether this connection may carry another request (and get ready for it)."""
        connection = self._h11
        if connection.our_state is h11.DONE and connection.their_state is h11.DONE and not connection.trailing_data[0]:
            connection.start_next_cycle()
            return True
        return False
