"""
HTTP/1.x message heads for the local end's HTTP proxy, sans-IO.

The HTTP side of the mixed port reads a request head (`find_head_end`,
`parse_request_head`, at most `MAX_HEAD` bytes), checks the proxy
credentials (`basic_credentials_ok`), finds the target (`connect_target`
for CONNECT, `absolute_target` for plain forwarding) and, when forwarding,
rewrites the request to origin form without hop-by-hop headers
(`forward_request`); the origin's response head is read the same way
(`parse_response_head`) and rewritten for the client (`forward_response`).
Body framing lives in `ssx.wire.http_framing`.  No Twisted here; bad input is
`HttpError` carrying the status to answer with.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import re
from dataclasses import dataclass

from ssx.errors import ProtocolError

__all__ = [
    "HOP_BY_HOP",
    "MAX_HEAD",
    "HttpError",
    "RequestHead",
    "ResponseHead",
    "absolute_target",
    "basic_credentials_ok",
    "connect_target",
    "error_response",
    "find_head_end",
    "forward_request",
    "forward_response",
    "parse_request_head",
    "parse_response_head",
]

# The most a head (request or status line and all header lines) may take.
MAX_HEAD = 64 * 1024

# Headers that concern one hop only (RFC 9110 §7.6.1), plus the proxy's own;
# Transfer-Encoding is not here because bodies pass through unchanged.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authorization", "proxy-authenticate", "proxy-connection", "te", "trailer", "upgrade"}
)

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/1\.[01]")
_STATUS = re.compile(rb"HTTP/1\.[01] [0-9]{3}(?: .*)?")
_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    504: "Gateway Timeout",
}


class HttpError(ProtocolError):
    """A request the proxy refuses; `status` is the answer (400, 431, ...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class _Head:
    version: str
    headers: tuple[tuple[str, str], ...]

    def get_all(self, name: str) -> list[str]:
        """Every value of a header, by case-insensitive name."""
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def tokens(self, name: str) -> set[str]:
        """The lower-cased comma-separated tokens of every value of a header."""
        return {t.strip().lower() for v in self.get_all(name) for t in v.split(",") if t.strip()}

    def connection_tokens(self) -> set[str]:
        return self.tokens("connection") | self.tokens("proxy-connection")

    def wants_close(self) -> bool:
        """Whether the sender will not use the connection after this message."""
        tokens = self.connection_tokens()
        if self.version == "HTTP/1.0":
            return "keep-alive" not in tokens
        return "close" in tokens


@dataclass(frozen=True)
class RequestHead(_Head):
    """A parsed request line and its headers (latin-1 text, order kept)."""

    method: str
    target: str


@dataclass(frozen=True)
class ResponseHead(_Head):
    """A parsed status line and its headers."""

    status: int
    reason: str


def find_head_end(buffer: bytes | bytearray, start: int = 0) -> int | None:
    """
    The offset just past the blank line that ends a head starting at
    `start`, or None while it is incomplete; HttpError 431 once more than
    MAX_HEAD bytes arrived without one.  Bare LF line ends are accepted.
    """
    positions = [p for p in (buffer.find(b"\n\r\n", start), buffer.find(b"\n\n", start)) if p >= 0]
    if positions:
        end = min(positions)
        end += 3 if buffer[end + 1 : end + 2] == b"\r" else 2
        if end - start > MAX_HEAD:
            raise HttpError(431, "request head larger than 64 KiB")
        return end
    if len(buffer) - start > MAX_HEAD:
        raise HttpError(431, "request head larger than 64 KiB")
    return None


def skip_blank_lines(buffer: bytes | bytearray) -> int:
    """How many leading CR/LF bytes to drop (RFC 9112 §2.2: before a request line)."""
    count = 0
    while count < len(buffer) and buffer[count] in b"\r\n":
        count += 1
    return count


def _lines(head: bytes) -> list[bytes]:
    lines = head.split(b"\n")
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def _headers(lines: list[bytes], status: int) -> tuple[tuple[str, str], ...]:
    headers = []
    for line in lines:
        if not line:
            continue
        if line[:1] in b" \t":
            raise HttpError(status, "obsolete header line folding")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise HttpError(status, "malformed header line")
        value = value.strip(b" \t")
        if b"\r" in value or b"\0" in value:
            raise HttpError(status, "control characters in a header value")
        headers.append((name.decode("latin-1"), value.decode("latin-1")))
    return tuple(headers)


def _check_framing(head: _Head, status: int) -> None:
    lengths = {v.strip() for v in head.get_all("content-length") for v in v.split(",")}
    if len(lengths) > 1:
        raise HttpError(status, "conflicting Content-Length values")
    if lengths and not next(iter(lengths)).isdigit():
        raise HttpError(status, "Content-Length is not a number")
    if head.get_all("transfer-encoding") and lengths:
        # Both at once is how requests are smuggled past a proxy.
        raise HttpError(status, "both Transfer-Encoding and Content-Length")


def parse_request_head(head: bytes) -> RequestHead:
    """A request head (from its request line to the blank line); HttpError 400 if malformed."""
    lines = _lines(head)
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1] or not _VERSION.fullmatch(parts[2]):
        raise HttpError(400, "malformed request line")
    method, target, version = (p.decode("latin-1") for p in parts)
    if any(ord(ch) < 0x21 or ord(ch) > 0x7E for ch in target):
        raise HttpError(400, "control characters in the request target")
    request = RequestHead(version, _headers(lines[1:], 400), method, target)
    _check_framing(request, 400)
    encodings = request.tokens("transfer-encoding")
    if encodings and encodings != {"chunked"}:
        raise HttpError(501, "transfer codings other than chunked are not supported")
    return request


def parse_response_head(head: bytes) -> ResponseHead:
    """A response head; HttpError 502 if malformed."""
    lines = _lines(head)
    if not _STATUS.fullmatch(lines[0]):
        raise HttpError(502, "malformed status line from the origin")
    version, code, reason = (lines[0].decode("latin-1") + " ").split(" ", 2)
    response = ResponseHead(version, _headers(lines[1:], 502), int(code), reason.rstrip(" "))
    _check_framing(response, 502)
    return response


def _host_port(authority: str, default_port: int | None) -> tuple[str, int]:
    """host:port or [v6]:port, port optional when `default_port` is given."""
    if authority.startswith("["):
        end = authority.find("]")
        host, rest = authority[1:end], authority[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            raise HttpError(400, "bad authority in the request target")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise HttpError(400, "bad IPv6 address in the request target") from None
        port_text = rest[1:] if rest else ""
    else:
        host, colon, port_text = authority.partition(":")
        if not colon:
            port_text = ""
        if not host or not re.fullmatch(r"[A-Za-z0-9._~!$&'()*+,;=%-]+", host):
            raise HttpError(400, "bad host in the request target")
    if not port_text:
        if default_port is None:
            raise HttpError(400, "the request target has no port")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise HttpError(400, "bad port in the request target")
    return host, int(port_text)


def connect_target(request: RequestHead) -> tuple[str, int]:
    """The host and port of a CONNECT request (authority form, port required)."""
    return _host_port(request.target, None)


def absolute_target(target: str) -> tuple[str, int, str]:
    """
    Host, port and origin-form path of an absolute-form `http://` target.
    Anything else (origin form, https:// without CONNECT) is HttpError 400.
    """
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() != "http":
        raise HttpError(400, "a proxy request needs an absolute http:// URL (use CONNECT for https)")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if "@" in authority:
        raise HttpError(400, "userinfo in the request target")
    if "#" in path:
        path = path[: path.index("#")]
    if not path.startswith("/"):
        path = "/" + path
    host, port = _host_port(authority, 80)
    return host, port, path


def _authority(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port == 80 else f"{shown}:{port}"


def _kept_headers(head: _Head) -> list[tuple[str, str]]:
    dropped = HOP_BY_HOP | head.tokens("connection") | head.tokens("proxy-connection")
    return [(k, v) for k, v in head.headers if k.lower() not in dropped]


def _serialise(first_line: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [first_line] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def forward_request(request: RequestHead, host: str, port: int, path: str) -> bytes:
    """
    The request as the origin gets it: origin-form target, Host from the
    absolute URL (RFC 9112 §3.2.2), hop-by-hop headers gone, and
    `Connection: close` when the client will send nothing more.
    """
    headers = [(k, v) for k, v in _kept_headers(request) if k.lower() != "host"]
    headers.insert(0, ("Host", _authority(host, port)))
    if request.wants_close() and request.version == "HTTP/1.1":
        headers.append(("Connection", "close"))
    return _serialise(f"{request.method} {path} {request.version}", headers)


def forward_response(response: ResponseHead, close: bool) -> bytes:
    """The response as the client gets it: hop-by-hop headers gone, and whether the connection stays."""
    headers = _kept_headers(response)
    if close:
        headers.append(("Connection", "close"))
    elif response.version == "HTTP/1.0" and response.status >= 200:
        # Without it a 1.0 response means the connection ends after it.
        headers.append(("Connection", "keep-alive"))
    return _serialise(f"{response.version} {response.status} {response.reason}".rstrip(" "), headers)


def basic_credentials_ok(request: RequestHead, credentials: tuple[bytes, bytes]) -> bool:
    """Whether Proxy-Authorization carries Basic `credentials` (compared in constant time)."""
    value = request.get("proxy-authorization") or ""
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    user, colon, password = decoded.partition(b":")
    user_ok = hmac.compare_digest(user, credentials[0])
    password_ok = hmac.compare_digest(password, credentials[1])
    return bool(colon) and user_ok & password_ok


def error_response(status: int, message: str = "", extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete response the proxy itself gives, after which it closes."""
    reason = _REASONS.get(status, "Error")
    body = f"{status} {reason}{': ' + message if message else ''}\n".encode("utf-8", "replace")
    headers = [
        *extra,
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    return _serialise(f"HTTP/1.1 {status} {reason}", headers) + body
