"""
The `nameserver` setting of the server: which DNS servers
`ssx.net.resolver.TargetResolver` asks, as comma-separated `IP`, `IP:port`
or `[IPv6]:port`.  A bad entry is a `ConfigError` naming the key.  No
Twisted here.
"""

from __future__ import annotations

import ipaddress

from ssx.numbers import parse_number
from ssx.errors import ConfigError

__all__ = ["parse_nameservers"]


def parse_nameservers(value: str | list[str] | None, key: str = "nameserver") -> tuple[tuple[str, int], ...]:
    """
    Parse the `nameserver` setting (or the original's `dns_server`, named
    by `key`): comma-separated `IP`, `IP:port` or `[IPv6]:port`, or a list.
    """
    if value is None:
        return ()
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value if v.strip()]
    else:
        raise ConfigError(key, "expected a comma-separated string of IP addresses")
    servers = []
    for item in items:
        host, port = item, 53
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            if rest:
                if not rest.startswith(":"):
                    raise ConfigError(key, f"{item!r} is not IP, IP:port or [IPv6]:port")
                port = _port(key, item, rest[1:])
        elif item.count(":") == 1:
            host, _, text = item.partition(":")
            port = _port(key, item, text)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(key, f"{item!r} is not an IP address") from None
        servers.append((host, port))
    return tuple(servers)


def _port(key: str, item: str, text: str) -> int:
    return int(parse_number(text, key, f"IP:port with a port from 1 to 65535 in {item!r}", minimum=1, maximum=65535))
