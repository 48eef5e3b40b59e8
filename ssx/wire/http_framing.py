"""
Where an HTTP/1.x body ends (RFC 9112 §6), sans-IO.

The forwarding HTTP proxy passes bodies through unchanged but must know
where each ends: the end of a request body is where the client's next
request head starts, and the end of a response is when the client
connection is free for the next request (possibly to another host).  A
framer is fed the bytes that follow a head and says how many of them belong
to the body; `done` turns true at its last byte.  No Twisted here.
"""

from __future__ import annotations

from ssx.errors import ProtocolError
from ssx.wire.http_message import MAX_HEAD, RequestHead, ResponseHead

__all__ = [
    "BodyFramer",
    "ChunkedBody",
    "LengthBody",
    "NoBody",
    "UntilClose",
    "request_body",
    "response_body",
]

# A chunk-size line (with extensions) longer than this is refused.
_MAX_LINE = 4096


class BodyFramer:
    """Counts a body's bytes; `done` once the last one went by."""

    done = False

    def feed(self, data: bytes | memoryview) -> int:
        """How many leading bytes of `data` belong to the body."""
        raise NotImplementedError

    def complete_at_eof(self) -> bool:
        """Whether the body is whole if the stream ends now."""
        return self.done


class NoBody(BodyFramer):
    """HEAD responses, 1xx/204/304, and requests without a body."""

    done = True

    def feed(self, data: bytes | memoryview) -> int:
        return 0


class LengthBody(BodyFramer):
    """`Content-Length: n`."""

    def __init__(self, length: int) -> None:
        self.remaining = length
        self.done = length == 0

    def feed(self, data: bytes | memoryview) -> int:
        take = min(self.remaining, len(data))
        self.remaining -= take
        self.done = self.remaining == 0
        return take


class UntilClose(BodyFramer):
    """A response without a length: it ends when the origin closes."""

    def feed(self, data: bytes | memoryview) -> int:
        return len(data)

    def complete_at_eof(self) -> bool:
        return True


_SIZE, _DATA, _DATA_END, _TRAILER = range(4)


class ChunkedBody(BodyFramer):
    """`Transfer-Encoding: chunked`: chunks, the zero chunk, trailers, blank line."""

    def __init__(self) -> None:
        self._state = _SIZE
        self._remaining = 0
        self._line = b""
        self._trailer_bytes = 0

    def feed(self, data: bytes | memoryview) -> int:
        data = bytes(data) if isinstance(data, memoryview) else data
        pos, end = 0, len(data)
        while pos < end and not self.done:
            if self._state == _DATA:
                take = min(self._remaining, end - pos)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _DATA_END
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._line += data[pos:]
                self._check_length(len(self._line))
                return end
            line = self._line + data[pos:newline]
            self._line = b""
            pos = newline + 1
            self._check_length(len(line))
            self._line_done(line[:-1] if line.endswith(b"\r") else line)
        return pos

    def _check_length(self, length: int) -> None:
        limit = MAX_HEAD - self._trailer_bytes if self._state == _TRAILER else _MAX_LINE
        if length > limit:
            raise ProtocolError("chunked body: line too long")

    def _line_done(self, line: bytes) -> None:
        if self._state == _SIZE:
            size_text = line.split(b";", 1)[0].strip(b" \t")
            if not size_text or len(size_text) > 16 or not all(c in b"0123456789abcdefABCDEF" for c in size_text):
                raise ProtocolError("chunked body: bad chunk size")
            size = int(size_text, 16)
            if size == 0:
                self._state = _TRAILER
            else:
                self._remaining = size
                self._state = _DATA
        elif self._state == _DATA_END:
            if line:
                raise ProtocolError("chunked body: chunk data longer than its size")
            self._state = _SIZE
        else:
            if not line:
                self.done = True
                return
            self._trailer_bytes += len(line) + 2
            if self._trailer_bytes > MAX_HEAD:
                raise ProtocolError("chunked body: trailers too large")


def request_body(request: RequestHead) -> BodyFramer:
    """How a request's body is framed (RFC 9112 §6.3: chunked, length, or none)."""
    if request.tokens("transfer-encoding"):
        return ChunkedBody()
    length = request.get("content-length")
    if length is not None:
        return LengthBody(int(length.split(",")[0].strip()))
    return NoBody()


def response_body(method: str, response: ResponseHead) -> BodyFramer:
    """How a response to `method` is framed (RFC 9112 §6.3)."""
    if method == "HEAD" or response.status < 200 or response.status in (204, 304):
        return NoBody()
    encodings = [t.strip().lower() for v in response.get_all("transfer-encoding") for t in v.split(",") if t.strip()]
    if encodings:
        return ChunkedBody() if encodings[-1] == "chunked" else UntilClose()
    length = response.get("content-length")
    if length is not None:
        return LengthBody(int(length.split(",")[0].strip()))
    return UntilClose()
