"""
The ports one `ssx-server` serves, each with its own keys: `PortConfig`,
and `port_entries`, which reads the forms existing deployments have:

- one port: `server_port` and `password` (every implementation);
- `port_password`, ``{"8001": "pw1", "8002": "pw2"}`` (the original
  Python shadowsocks and libev's ss-manager: port string -> password;
  `server_port` and `password` are then ignored, with a warning);
- `server_port` as a list of ports sharing `password` (the original);
- `servers`, shadowsocks-rust's list of entries, each with its own
  `server`, `server_port`, `password`/`key`, `method`, `mode`,
  `plugin`/`plugin_opts`, `timeout`, `fast_open`, 2022 `users` and
  access `keys` (`ssx.config.keys`);
- `keys`, outline-ss-server's list of access keys, each with its `port`:
  one port per distinct port, with its keys (UDP too, as Outline relays
  it, unless `mode` says otherwise).

Each entry is the top-level keys overridden by the entry's own, checked
by `ssx.config.server` as a single port would be; a bad entry's
`ConfigError` names it (``servers[1].method``, ``port_password.8001``).
No Twisted here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Mapping

from ssx.config.keys import KeyConfig, read_keys
from ssx.config.known_keys import SERVER_PEER_KEYS, peer_key_notes
from ssx.config.values import RelayModes
from ssx.errors import ConfigError
from ssx.wire.sip003 import Plugin

__all__ = ["ENTRY_KEYS", "Entry", "PORT_LIST_KEYS", "PortConfig", "dual_stack", "port_entries"]

# The keys a `servers` entry may set for its own port.
ENTRY_KEYS = frozenset({
    "server", "server_port", "password", "key", "method", "mode", "plugin", "plugin_opts", "plugin_args",
    "timeout", "users", "udp_timeout", "udp_max_associations", "fast_open", "keys",
})
# The keys that list several ports.
PORT_LIST_KEYS = frozenset({"port_password", "servers", "keys"})
_OWN_PORT = frozenset({"server_port"})
_OWN_PORT_PASSWORD = frozenset({"server_port", "password"})


@dataclass(frozen=True)
class PortConfig:
    """One port's settings: what `ssx.server.ports.build_port` starts a port from."""

    # What a bad value of this port is named by: "" for the only port,
    # else "port_password.8001", "server_port[0]" or "servers[1]".
    label: str
    port: int
    hosts: tuple[str, ...]
    # Where ssx listens for TCP (behind a plugin, its loopback port).
    listen: tuple[str, ...]
    method: str
    password: str = field(repr=False)
    key: bytes | None = field(repr=False)
    password_generated: bool
    relays: RelayModes
    timeout: float
    users: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    plugin: Plugin | None = None
    # IPv6 sockets set IPV6_V6ONLY: `hosts` has an IPv4 address too, which
    # binds the same port beside them (libev's ["::0", "0.0.0.0"]).
    v6only: bool = False
    # TCP Fast Open on the port's TCP listening sockets.
    fast_open: bool = False
    # Access keys (several on one port, found by trial decryption); when
    # given, method is the first key's and password is empty.
    keys: tuple[KeyConfig, ...] = field(default=(), repr=False)


def dual_stack(hosts: tuple[str, ...]) -> bool:
    """Whether `hosts` holds IPv6 and IPv4 addresses both (names count as neither)."""
    versions = set()
    for host in hosts:
        try:
            versions.add(ipaddress.ip_address(host.split("%", 1)[0]).version)
        except ValueError:
            pass
    return versions == {4, 6}


Entry = tuple[str, dict[str, Any], frozenset[str]]


def port_entries(values: Mapping[str, Any]) -> tuple[list[Entry], tuple[str, ...]]:
    """
    ([(label, that port's merged keys, the keys the entry sets itself)],
    warnings): one entry with label "" when no key lists several ports.
    """
    servers = values.get("servers")
    port_password = values.get("port_password")
    server_port = values.get("server_port")
    keys = values.get("keys")
    if servers is not None and port_password is not None:
        raise ConfigError("servers", "give either servers or port_password, not both")
    if keys is not None and (servers is not None or port_password is not None):
        raise ConfigError("keys", "top-level keys name their own ports: not with servers or port_password "
                                  "(a servers entry may have its own keys)")
    if keys is not None:
        return _key_ports(values, read_keys(keys)), ()
    if servers is not None:
        return _servers(values, servers)
    if port_password is not None:
        return _port_password(values, port_password)
    if isinstance(server_port, list):
        return _port_list(values, server_port), ()
    return [("", dict(values), frozenset(values))], ()


def _base(values: Mapping[str, Any]) -> dict[str, Any]:
    base = {k: v for k, v in values.items() if k not in PORT_LIST_KEYS}
    if base.get("listen") is not None:
        raise ConfigError("listen", "with several ports, give each its server and server_port instead of --listen")
    return base


def _original_mode(base: dict[str, Any]) -> dict[str, Any]:
    # The original Python server relays UDP as well as TCP on every port:
    # its own forms keep that unless a mode is given.
    base.setdefault("mode", "tcp_and_udp")
    return base


def _port_password(values: Mapping[str, Any], table: Any) -> tuple[list[Entry], tuple[str, ...]]:
    if not isinstance(table, dict) or not table:
        raise ConfigError("port_password", 'expected an object of port -> password, e.g. {"8001": "secret"}')
    base = _original_mode(_base(values))
    ignored = [k for k in ("server_port", "password", "key") if base.pop(k, None) is not None]
    warnings = (f"{' and '.join(ignored)} ignored: port_password is set",) if ignored else ()
    entries = []
    for port, password in table.items():
        label = f"port_password.{port}"
        if not isinstance(password, str) or not password:
            raise ConfigError(label, "expected the port's password (a non-empty string)")
        entries.append((label, {**base, "server_port": port, "password": password}, _OWN_PORT_PASSWORD))
    return entries, warnings


def _port_list(values: Mapping[str, Any], ports: list[Any]) -> list[Entry]:
    if not ports:
        raise ConfigError("server_port", "expected a port or a non-empty list of ports")
    base = _original_mode(_base(values))
    return [(f"server_port[{i}]", {**base, "server_port": port}, _OWN_PORT) for i, port in enumerate(ports)]


def _key_ports(values: Mapping[str, Any], keys: tuple[KeyConfig, ...]) -> list[Entry]:
    _no_secret_beside_keys(values, "")
    if all(key.port is None for key in keys):
        # One port, the configured one, as any single port.
        return [("", {**values, "keys": keys}, frozenset(values))]
    if isinstance(values.get("server_port"), list):
        raise ConfigError("server_port", "with keys, give each key its port (or one server_port)")
    base = _original_mode(_base(values))
    by_port: dict[Any, list[KeyConfig]] = {}
    for key in keys:
        by_port.setdefault(key.port if key.port is not None else base.get("server_port"), []).append(key)
    return [
        (f"keys (port {port})", {**base, "server_port": port, "keys": tuple(port_keys)}, _OWN_PORT)
        for port, port_keys in by_port.items()
    ]


def _no_secret_beside_keys(values: Mapping[str, Any], prefix: str) -> None:
    """A port of access keys takes only its keys: a password or key given beside them would go unused."""
    for name in ("password", "key"):
        if values.get(name) is not None:
            raise ConfigError(f"{prefix}{name}", "not used beside keys (a port of access keys takes only its keys): "
                                                 "give it as one more key, or on a port of its own")


def _servers(values: Mapping[str, Any], servers: Any) -> tuple[list[Entry], tuple[str, ...]]:
    if not isinstance(servers, list) or not servers:
        raise ConfigError("servers", 'expected a list of {"server_port": ..., "password": ..., "method": ...}')
    base = _base(values)
    entries = []
    warnings: list[str] = []
    for i, entry in enumerate(servers):
        label = f"servers[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(label, 'expected an object such as {"server_port": 8001, "password": "..."}')
        # shadowsocks-rust reads more per server (acl, no_delay, ...).
        advice, unknown = peer_key_notes(entry, ENTRY_KEYS, SERVER_PEER_KEYS, prefix=f"{label}.")
        warnings += advice
        if unknown:
            warnings.append(f"{label}: keys not used: {', '.join(unknown)}")
        if "server_port" not in entry:
            raise ConfigError(f"{label}.server_port", "required: the port this server listens on")
        if "keys" in entry:
            _no_secret_beside_keys(entry, f"{label}.")
        merged = {**base, **entry}
        if "key" in entry:
            merged.pop("password", None)
        elif "password" in entry:
            merged.pop("key", None)
        if "plugin" in entry and "plugin_opts" not in entry:
            merged.pop("plugin_opts", None)
        # A key missing from both is the entry's to give.
        entries.append((label, merged, frozenset(entry) | (ENTRY_KEYS - set(base))))
    return entries, tuple(warnings)
