"""
Which destination addresses the server refuses to connect to.

The server resolves a target name first, then asks `ForbiddenNetworks` about
each resulting IP, and connects only to an IP that passed: so no name, hosts
entry or address spelling (such as IPv4-mapped IPv6) can reach a network the
operator closed.  No Twisted here.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

from ssx.errors import ConfigError

__all__ = ["DEFAULT_FORBIDDEN", "ForbiddenNetworks", "is_ip_literal", "parse_forbidden"]


def is_ip_literal(host: str) -> bool:
    """Whether `host` is an IPv4 or IPv6 literal (cheaper than ipaddress)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            pass
    return False

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Loopback, private, link-local, CGNAT, unique-local, multicast, unspecified
# and broadcast: nothing a public proxy should reach on a user's behalf.
DEFAULT_FORBIDDEN = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "255.255.255.255/32",
    "::/128",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
)


@dataclass(frozen=True)
class ForbiddenNetworks:
    """A set of networks; `forbids(ip)` tells whether an IP lies in one."""

    networks: tuple[_Network, ...]
    # Answers per IP, bounded: the server asks for every connection and
    # datagram, and parsing an address costs more than the relaying around it.
    _cached: Callable[[str], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_cached", lru_cache(maxsize=4096)(self._forbids))

    def forbids(self, ip: str) -> bool:
        """
        True if `ip` (an IP literal) lies in a forbidden network.

        Anything that does not parse as an IP is forbidden: the caller is meant
        to pass resolved addresses only.
        """
        if not self.networks:
            return False
        return self._cached(ip)

    def _forbids(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return True
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def __str__(self) -> str:
        return ",".join(str(n) for n in self.networks) or "(none)"


def parse_forbidden(text: str | list[str] | tuple[str, ...] | None) -> ForbiddenNetworks:
    """
    Parse the `forbidden_ip` setting: comma-separated IPs or CIDRs.

    None means the defaults; an empty string or list turns the check off.
    """
    if text is None:
        items: list[str] = list(DEFAULT_FORBIDDEN)
    elif isinstance(text, str):
        items = [part.strip() for part in text.split(",") if part.strip()]
    elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        items = [t.strip() for t in text if t.strip()]
    else:
        raise ConfigError("forbidden_ip", "expected a comma-separated string of IPs/CIDRs")
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError("forbidden_ip", f"{item!r} is not an IP address or CIDR network") from None
    return ForbiddenNetworks(tuple(networks))
