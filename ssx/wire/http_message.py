"""
What the local end's HTTP proxy does to messages, sans-IO.

Where a request goes (`connect_target` for CONNECT, `absolute_target` for
an absolute-form http:// URL, `supply_host` for the Host that a proxy
request may leave out), whether it carries the proxy credentials
(`basic_credentials_ok`), which headers travel on to the origin
(`origin_headers`: Host from the URL, hop-by-hop headers gone) and back to
the application (`end_to_end`), the response heads written without h11
(`response_head`), and the proxy's own answers (`error_response`).  Heads
are read and bodies framed by h11 in `ssx.wire.http_codec`; headers here
are h11's (name as received, value) byte pairs.  No Twisted here; a
refused request is `HttpError` carrying the status to answer with.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import re
from typing import Iterable, Sequence

from ssx.errors import ProtocolError

__all__ = [
    "HOP_BY_HOP",
    "Headers",
    "HttpError",
    "absolute_target",
    "basic_credentials_ok",
    "connect_target",
    "connection_tokens",
    "end_to_end",
    "error_response",
    "origin_headers",
    "response_head",
    "supply_host",
]

# (name as received, value) pairs, in order.
Headers = Sequence[tuple[bytes, bytes]]

# Headers that concern one hop only (RFC 9110 §7.6.1), plus the proxy's own.
# Transfer-Encoding and Content-Length stay: h11 frames each side's body by
# them, and both sides carry the same body.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-authorization", b"proxy-authenticate", b"proxy-connection", b"te",
     b"trailer", b"upgrade"}
)

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
    """A message the proxy refuses; `status` is the answer (400, 431, 502, ...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _values(headers: Headers, name: bytes) -> Iterable[bytes]:
    return (v for k, v in headers if k.lower() == name)


def _tokens(headers: Headers, name: bytes) -> set[bytes]:
    return {t.strip().lower() for v in _values(headers, name) for t in v.split(b",") if t.strip()}


def connection_tokens(headers: Headers) -> set[bytes]:
    """The lower-cased options of Connection and of the Proxy-Connection some clients send."""
    return _tokens(headers, b"connection") | _tokens(headers, b"proxy-connection")


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
    # ASCII digits only: str.isdigit() is true for "²", which int() refuses.
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 0 < int(port_text) < 65536:
        raise HttpError(400, "bad port in the request target")
    return host, int(port_text)


def connect_target(target: str) -> tuple[str, int]:
    """The host and port of a CONNECT request's target (authority form, port required)."""
    return _host_port(target, None)


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


# An HTTP/1.1 request line in the form h11 accepts (RFC 9112 §3), and the
# start of a Host field line (no space may precede the colon, and a folded
# continuation line starts with a space or tab).
_REQUEST_LINE_11 = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([\x21-\x7e]+) HTTP/1\.1\r?\n")
_HOST_FIELD = re.compile(rb"\nhost:", re.IGNORECASE)
_AUTHORITY_END = re.compile(rb"[/?#]")


def supply_host(head: bytes) -> bytes:
    """
    `head`, a whole request head, with a Host field taken from the request
    target when it is an HTTP/1.1 CONNECT or absolute-form request that has
    none; any other head as it is.  A proxy finds the target in the request
    line, so Host is redundant there and some clients leave it out; h11
    requires it of every HTTP/1.1 request and judges the rest of the head.
    The origin gets Host from the target either way (`origin_headers`).
    """
    line = _REQUEST_LINE_11.match(head)
    if line is None or _HOST_FIELD.search(head, line.end() - 1) is not None:
        return head
    method, target = line.group(1, 2)
    if method == b"CONNECT":
        authority = target
    else:
        _, sep, rest = target.partition(b"://")
        if not sep:
            # Origin form: not a proxy request; h11's 400 stands.
            return head
        authority = _AUTHORITY_END.split(rest, 1)[0]
    return head[: line.end()] + b"Host: " + authority + b"\r\n" + head[line.end() :]


def _authority(host: str, port: int) -> bytes:
    shown = f"[{host}]" if ":" in host else host
    return (shown if port == 80 else f"{shown}:{port}").encode("ascii")


def end_to_end(headers: Headers) -> list[tuple[bytes, bytes]]:
    """`headers` without the hop-by-hop ones and those that Connection names."""
    dropped = HOP_BY_HOP | connection_tokens(headers)
    return [(k, v) for k, v in headers if k.lower() not in dropped]


def origin_headers(headers: Headers, host: str, port: int, close: bool) -> list[tuple[bytes, bytes]]:
    """
    The headers of a request as the origin gets it: Host from the absolute
    URL (RFC 9112 §3.2.2), hop-by-hop headers gone, and `Connection: close`
    when the application will send nothing more.
    """
    kept = [(b"Host", _authority(host, port))]
    kept += [(k, v) for k, v in end_to_end(headers) if k.lower() != b"host"]
    if close:
        kept.append((b"Connection", b"close"))
    return kept


def basic_credentials_ok(headers: Headers, credentials: tuple[bytes, bytes]) -> bool:
    """Whether Proxy-Authorization carries Basic `credentials` (compared in constant time)."""
    value = next(iter(_values(headers, b"proxy-authorization")), b"")
    scheme, _, token = value.partition(b" ")
    if scheme.lower() != b"basic":
        return False
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    user, colon, password = decoded.partition(b":")
    user_ok = hmac.compare_digest(user, credentials[0])
    password_ok = hmac.compare_digest(password, credentials[1])
    return bool(colon) and user_ok & password_ok


def response_head(status: int, reason: bytes, headers: Headers) -> bytes:
    """An HTTP/1.1 status line and `headers` (already valid, as h11 checks them) as bytes."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    lines += [b"%s: %s\r\n" % (k, v) for k, v in headers]
    return b"".join(lines) + b"\r\n"


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
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
