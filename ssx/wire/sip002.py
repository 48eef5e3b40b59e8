"""
`ss://` URLs: what a user imports (pasted, or scanned from a QR code) to
reach a server, and what `ssx-server` and `python -m ssx url` print.

Both forms are read (ecosystem.md §1): SIP002 (`ss://userinfo@host:port/
?plugin=...#tag`, the userinfo base64url or, for 2022 methods, plain
percent-encoded) and the legacy whole-base64 form
(`ss://BASE64(method:password@host:port)#tag`).  SIP002 is written.  The
plugin's option string is kept raw: SIP003 parses it.  No Twisted here; a
malformed URL is one `ConfigError("url", ...)` whose message never repeats
the URL (it carries the password).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from ssx.errors import ConfigError
from ssx.numbers import parse_number

__all__ = ["ServerUrl", "format_url", "parse_url"]

_SCHEME = "ss://"
# What a host name may hold here: enough for DNS names, IDNs and IPv4.
_HOST = re.compile(r"[^\s/?#@\[\]:%]+")


@dataclass(frozen=True)
class ServerUrl:
    """One server as an `ss://` URL describes it."""

    method: str
    password: str = field(repr=False)
    host: str
    port: int
    plugin: str = ""
    plugin_opts: str = ""
    tag: str = ""


def format_url(
    method: str,
    password: str,
    host: str,
    port: int,
    tag: str | None = None,
    plugin: str | None = None,
    plugin_opts: str | None = None,
) -> str:
    """
    The SIP002 URL for a server: base64url userinfo without padding, or
    plain percent-encoded userinfo for 2022 methods (which must not be
    base64-wrapped); `/?plugin=` with `name;opts` percent-encoded; the tag
    percent-encoded.
    """
    if _is_2022(method):
        userinfo = f"{quote(method, safe='')}:{quote(password, safe='')}"
    else:
        raw = f"{method}:{password}".encode()
        userinfo = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
    url = f"{_SCHEME}{userinfo}@{_bracket(host)}:{port}"
    if plugin:
        value = plugin + (";" + plugin_opts if plugin_opts else "")
        url += "/?plugin=" + quote(value, safe="")
    if tag:
        url += "#" + quote(tag, safe="")
    return url


def parse_url(text: str) -> ServerUrl:
    """Read an `ss://` URL of either form; ConfigError("url", ...) if malformed."""
    if not isinstance(text, str):
        raise ConfigError("url", "expected an ss:// URL")
    text = text.strip()
    if text[: len(_SCHEME)].lower() != _SCHEME:
        raise ConfigError("url", "an ss:// URL must start with ss://")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        raise ConfigError("url", "the ss:// URL contains spaces or control characters")
    rest, _, fragment = text[len(_SCHEME):].partition("#")
    tag = _decode_component(fragment, "tag")
    rest, _, query = rest.partition("?")
    if rest.endswith("/"):
        rest = rest[:-1]
    if "/" in rest:
        raise ConfigError("url", "an ss:// URL has no path")
    if "@" in rest:
        userinfo, _, hostport = rest.rpartition("@")
        method, password = _userinfo(userinfo)
    else:
        # Legacy: the whole authority is base64 and not percent-encoded
        # inside; the password may hold '@' and ':'.
        inner = _b64decode(unquote(rest), "the legacy ss:// body")
        credentials, at, hostport = inner.rpartition("@")
        if not at:
            raise ConfigError("url", "the legacy ss:// body has no '@' between password and host")
        method, colon, password = credentials.partition(":")
        if not colon:
            raise ConfigError("url", "the userinfo has no ':' between method and password")
    host, port = _hostport(hostport)
    if not method:
        raise ConfigError("url", "the ss:// URL names no method")
    if not password:
        raise ConfigError("url", "the ss:// URL has an empty password")
    plugin, plugin_opts = _plugin(query)
    return ServerUrl(method, password, host, port, plugin, plugin_opts, tag)


def _is_2022(method: str) -> bool:
    return method.lower().startswith("2022-")


def _bracket(host: str) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]"
    except ValueError:
        pass
    return host


def _decode_component(text: str, what: str) -> str:
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ConfigError("url", f"the {what} is not percent-encoded UTF-8") from None


def _b64decode(text: str, what: str) -> str:
    # Either alphabet, padding optional (py tools and outline pad, rust and
    # the SIP002 generator do not).
    body = text.rstrip("=").replace("+", "-").replace("/", "_")
    if not body or not re.fullmatch(r"[A-Za-z0-9_-]+", body):
        raise ConfigError("url", f"{what} is not base64")
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise ConfigError("url", f"{what} is not base64") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("url", f"{what} does not decode to UTF-8 text") from None


def _userinfo(userinfo: str) -> tuple[str, str]:
    if ":" in userinfo:
        method, _, password = userinfo.partition(":")
        return _decode_component(method, "method"), _decode_component(password, "password")
    # '%3D' padding is common: undo percent-encoding before base64.
    decoded = _b64decode(unquote(userinfo), "the userinfo")
    method, colon, password = decoded.partition(":")
    if not colon:
        raise ConfigError("url", "the userinfo has no ':' between method and password")
    if _is_2022(method):
        raise ConfigError("url", f"{method} userinfo must be plain method:password, not base64 (SIP002)")
    return method, password


def _hostport(text: str) -> tuple[str, int]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError("url", "an IPv6 host opened with '[' is not closed")
        host, after = text[1:end], text[end + 1:]
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError(host)
        except ValueError:
            raise ConfigError("url", "the host in brackets is not an IPv6 address") from None
        if not after.startswith(":"):
            raise ConfigError("url", "the ss:// URL has no port")
        port_text = after[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ConfigError("url", "the ss:// URL has no port")
        if not _HOST.fullmatch(host):
            if ":" in host:
                raise ConfigError("url", "an IPv6 host must be written in brackets")
            raise ConfigError("url", "the ss:// URL has no valid host")
    port = parse_number(port_text, "url", "a port number from 1 to 65535 after the host", minimum=1, maximum=65535, show=False)
    return host, int(port)


def _plugin(query: str) -> tuple[str, str]:
    for item in query.split("&") if query else ():
        name, _, value = item.partition("=")
        if name == "plugin":
            # '+' is a plus here, not a space: SIP002 percent-encodes.
            plugin, _, opts = _decode_component(value, "plugin parameter").partition(";")
            return plugin, opts
    return "", ""
