"""
Where `ssx-server` answers the manager API (`manager_address`,
``--manager-address``): ``host:port`` for UDP, or a filesystem path for a
Unix datagram socket, as the original and libev read it.  Anyone who can
send it a datagram can add ports and read their passwords, so a UDP
address must be a loopback one unless `manager_allow_remote` says
otherwise.  No Twisted here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Mapping

from ssx.config.values import read_bool
from ssx.errors import ConfigError

__all__ = ["MANAGER_KEYS", "ManagerAddress", "read_manager_address"]

MANAGER_KEYS = frozenset({"manager_address", "manager_allow_remote"})


@dataclass(frozen=True)
class ManagerAddress:
    """A UDP `host` and `port`, or (`path`) a Unix datagram socket."""

    host: str = ""
    port: int = 0
    path: str | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return self.path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_manager_address(values: Mapping[str, Any]) -> ManagerAddress | None:
    """The manager's address, or None when none is set."""
    raw = values.get("manager_address")
    allow_remote = read_bool(values, "manager_allow_remote")
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str) or "\0" in raw:
        raise ConfigError("manager_address", "expected host:port (UDP) or the path of a Unix datagram socket")
    if raw.startswith(("/", ".", "~")) or ":" not in raw:
        return ManagerAddress(path=raw)
    host, _, port_text = raw.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError("manager_address", f"expected host:port (UDP) or a path, not {raw!r}")
    if not _loopback(host) and not allow_remote:
        raise ConfigError(
            "manager_address",
            f"{host} is not a loopback address: whoever can reach the manager controls the server; "
            "use 127.0.0.1, ::1 or a Unix socket path, or give --manager-allow-remote",
        )
    return ManagerAddress(host=host, port=int(port_text))
