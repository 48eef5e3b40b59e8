"""
Where an end serves its Prometheus metrics (`metrics`, ``--metrics``):
a Twisted server endpoint description such as
``tcp:9090:interface=127.0.0.1``, or for short a bare ``PORT`` (on
127.0.0.1) or ``IP:PORT`` / ``[IPv6]:PORT``.  None (the default) serves
none.  The description is parsed with the real endpoint parser at start
(`ssx.config.options.check_endpoint`), so a bad one stops start-up naming
the key.  No Twisted here.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Mapping

from ssx.errors import ConfigError

__all__ = ["METRICS_KEYS", "read_metrics"]

METRICS_KEYS = frozenset({"metrics"})


def _escaped(host: str) -> str:
    """`host` as an endpoint description's interface= value (its colons escaped)."""
    return host.replace(":", "\\:")


def read_metrics(values: Mapping[str, Any]) -> str | None:
    """The endpoint description to serve /metrics on, or None for no metrics."""
    raw = values.get("metrics")
    if raw is None or raw == "":
        return None
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    if not isinstance(raw, str) or "\0" in raw or not raw.strip():
        raise ConfigError("metrics", "expected an endpoint description (tcp:9090:interface=127.0.0.1), PORT or IP:PORT")
    raw = raw.strip()
    if raw.isdigit():
        return _tcp(raw, "127.0.0.1")
    host, sep, port = raw.rpartition(":")
    if sep and port.isdigit():
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if bare == "localhost":
            return _tcp(port, "127.0.0.1")
        try:
            address = ipaddress.ip_address(bare)
        except ValueError:
            pass  # an endpoint description: tcp:9090, unix:/run/x:mode=600, ...
        else:
            return _tcp(port, str(address))
    return raw


def _tcp(port: str, host: str) -> str:
    if not 0 <= int(port) < 65536:
        raise ConfigError("metrics", f"port {port} is out of range")
    return f"tcp:{int(port)}:interface={_escaped(host)}"
