"""
`ss://` URLs (SIP002): what a client imports to reach a server.

Non-2022 methods put `base64url(method:password)` (no padding) in the
userinfo; the host is bracketed when it is IPv6; the tag is percent-encoded.
No Twisted here.
"""

from __future__ import annotations

import base64
import ipaddress
from urllib.parse import quote

__all__ = ["format_url"]


def format_url(method: str, password: str, host: str, port: int, tag: str | None = None) -> str:
    """The SIP002 URL for a server."""
    if method.startswith("2022-"):
        userinfo = f"{quote(method, safe='')}:{quote(password, safe='')}"
    else:
        raw = f"{method}:{password}".encode()
        userinfo = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    url = f"ss://{userinfo}@{host}:{port}"
    if tag:
        url += "#" + quote(tag, safe="")
    return url
