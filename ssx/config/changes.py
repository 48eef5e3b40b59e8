"""
What changed between two checked configurations of one end, for a
reload (SIGHUP): `server_changes` compares two `ServerConfig`s,
`local_changes` two `LocalConfig`s, and each says what can be applied to
the running services (and how: in place, or by stopping and starting one
port or listener) and what only a restart takes.  Nothing here touches a
service, and nothing it returns to be logged carries a secret.  No
Twisted here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ssx.config.local import LocalConfig, Tunnel
from ssx.config.ports import PortConfig
from ssx.config.server import ServerConfig
from ssx.config.upstreams import ServerEntry

__all__ = [
    "KEEP",
    "IN_PLACE",
    "RESTART",
    "LocalChanges",
    "PortUpdate",
    "ServerChanges",
    "local_changes",
    "port_update",
    "server_changes",
    "wanted_port",
]

# What a port's change takes: nothing, new credentials or limits on the
# running port, or its listeners stopped and started again.
KEEP, IN_PLACE, RESTART = "keep", "in place", "restart"

# A port's fields that its running listeners, plugin and UDP relays were
# built from (the method too: it decides the UDP relay's edition), with
# the config keys the log names them by (v6only follows from `server`).
_PORT_RESTART_FIELDS = (
    ("hosts", "server"), ("listen", "listen"), ("plugin", "plugin"), ("v6only", "server"),
    ("fast_open", "fast_open"), ("method", "method"),
)
# The server's settings that only a restart changes, by config key, with
# the `ServerConfig` fields they are read into.
_SERVER_FIXED = (
    ("nameserver", ("nameservers",)),
    ("hosts_file", ("hosts_file",)),
    ("resolv_conf", ("resolv_conf",)),
    ("prefer_ipv6", ("prefer_ipv6",)),
    ("replay_history", ("replay_history",)),
    ("manager_address", ("manager",)),
    ("outbound_address/interface", ("outbound",)),
    ("url_file", ("url_file",)),
    ("metrics", ("metrics",)),
    ("workers", ("workers",)),
    ("reuse_port", ("reuse_port",)),
)


@dataclass(frozen=True)
class PortUpdate:
    """What one port's change takes (`KEEP`, `IN_PLACE` or `RESTART`), and the names of what changed."""

    action: str
    changed: tuple[str, ...] = ()


def _users_changed(running: PortConfig, wanted: PortConfig) -> tuple[str, ...]:
    """The users added, removed or given a new key, by name (e.g. ``user alice added``)."""
    before, after = dict(running.users), dict(wanted.users)
    notes = [f"user {name} added" for name in after if name not in before]
    notes += [f"user {name} removed" for name in before if name not in after]
    notes += [f"user {name} key changed" for name in after if name in before and before[name] != after[name]]
    return tuple(notes)


def _keys_changed(running: PortConfig, wanted: PortConfig) -> tuple[str, ...]:
    """The access keys added, removed, given another cipher or secret, or other limits, by id."""
    before = {key.id: key for key in running.keys}
    after = {key.id: key for key in wanted.keys}
    notes = [f"key {name} added" for name in after if name not in before]
    notes += [f"key {name} removed" for name in before if name not in after]
    for name, key in after.items():
        old = before.get(name)
        if old is None:
            continue
        if (old.method, old.secret) != (key.method, key.secret):
            notes.append(f"key {name} changed")
        elif (old.max_connections, old.quota_bytes, old.quota_period) != (
            key.max_connections, key.quota_bytes, key.quota_period,
        ):
            notes.append(f"key {name} limits changed")
    return tuple(notes)


def port_update(running: PortConfig, wanted: PortConfig) -> PortUpdate:
    """
    What turning the port `running` into `wanted` takes.  A password
    generated for both (none configured) is the running one: a reload does
    not change it.
    """
    wanted = wanted_port(running, wanted)
    restart = [key for name, key in _PORT_RESTART_FIELDS if getattr(running, name) != getattr(wanted, name)]
    before, after = running.relays, wanted.relays
    if (before.tcp, before.udp) != (after.tcp, after.udp):
        restart.append("mode")
    if after.udp and before.timeout != after.timeout:
        restart.append("udp_timeout")
    if after.udp and before.capacity != after.capacity:
        restart.append("udp_max_associations")
    changed: list[str] = list(dict.fromkeys(restart))
    if running.password != wanted.password or running.key != wanted.key:
        changed.append("password" if wanted.key is None and running.key is None else "key")
    changed += _users_changed(running, wanted)
    changed += _keys_changed(running, wanted)
    if running.timeout != wanted.timeout:
        changed.append("timeout")
    if restart:
        return PortUpdate(RESTART, tuple(changed))
    if changed:
        return PortUpdate(IN_PLACE, tuple(changed))
    return PortUpdate(KEEP)


def wanted_port(running: PortConfig, wanted: PortConfig) -> PortConfig:
    """`wanted`, keeping `running`'s password when neither configures one (both generated)."""
    if running.password_generated and wanted.password_generated:
        return dataclasses.replace(wanted, password=running.password)
    return wanted


@dataclass(frozen=True)
class ServerChanges:
    """
    How a server's file changed between two reads: the ports `added`,
    `removed` (by number) and `changed` (present in both, different), the
    shared settings applied in place (`settings`, by config key) and those
    only a restart applies (`fixed`).
    """

    added: tuple[PortConfig, ...] = ()
    removed: tuple[int, ...] = ()
    changed: tuple[PortConfig, ...] = ()
    settings: tuple[str, ...] = ()
    fixed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.settings or self.fixed)


def server_changes(old: ServerConfig, new: ServerConfig) -> ServerChanges:
    """What differs between the server configurations `old` and `new` (the ports by number)."""
    before = {port.port: port for port in old.port_configs()}
    after = {port.port: port for port in new.port_configs()}
    added = tuple(port for number, port in after.items() if number not in before)
    removed = tuple(number for number in before if number not in after)
    changed = tuple(
        port for number, port in after.items()
        if number in before and port_update(before[number], port).action != KEEP
    )
    settings = []
    if old.forbidden.entries != new.forbidden.entries:
        settings.append("forbidden_ip")
    for name in ("handshake_timeout", "max_connections", "shutdown_grace"):
        if getattr(old.limits, name) != getattr(new.limits, name):
            settings.append(name)
    for name in ("max_handshakes", "max_handshakes_per_ip", "verbose"):
        if getattr(old, name) != getattr(new, name):
            settings.append(name)
    fixed = tuple(key for key, fields in _SERVER_FIXED if any(getattr(old, f) != getattr(new, f) for f in fields))
    return ServerChanges(added, removed, changed, tuple(settings), fixed)


@dataclass(frozen=True)
class LocalChanges:
    """
    How a local end's configuration changed: servers added and removed
    (a server whose address, method, secret or plugin changed is both),
    proxy listeners and tunnels added and removed, the settings applied
    in place to every listener (`settings`) and those only a restart
    applies (`fixed`).
    """

    servers_added: tuple[ServerEntry, ...] = ()
    servers_removed: tuple[ServerEntry, ...] = ()
    listen_added: tuple[str, ...] = ()
    listen_removed: tuple[str, ...] = ()
    tunnels_added: tuple[Tunnel, ...] = ()
    tunnels_removed: tuple[Tunnel, ...] = ()
    settings: tuple[str, ...] = ()
    fixed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return any(bool(getattr(self, f.name)) for f in dataclasses.fields(self))


def _gone(before: tuple[Any, ...], after: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(item for item in before if item not in after)


def local_changes(old: LocalConfig, new: LocalConfig) -> LocalChanges:
    """What differs between the local configurations `old` and `new`."""
    settings = []
    if old.timeout != new.timeout:
        settings.append("timeout")
    for name in ("handshake_timeout", "max_connections", "shutdown_grace"):
        if getattr(old.limits, name) != getattr(new.limits, name):
            settings.append(name)
    if old.verbose != new.verbose:
        settings.append("verbose")
    if old.socks_credentials != new.socks_credentials:
        settings.append("socks_user/socks_password")
    fixed = tuple(
        key for key, name in (
            ("mode", "relays"), ("online_config", "online"), ("health_check", "health_check"),
            ("fast_open", "fast_open"), ("redir/tproxy", "transparent"), ("outbound_fwmark", "outbound_fwmark"),
            ("dns", "dns"), ("metrics", "metrics"), ("workers", "workers"),
            ("reuse_port", "reuse_port"),
        )
        if getattr(old, name) != getattr(new, name)
    )
    return LocalChanges(
        servers_added=_gone(new.servers, old.servers),
        servers_removed=_gone(old.servers, new.servers),
        listen_added=_gone(new.listen, old.listen),
        listen_removed=_gone(old.listen, new.listen),
        tunnels_added=_gone(new.tunnels, old.tunnels),
        tunnels_removed=_gone(old.tunnels, new.tunnels),
        settings=tuple(settings),
        fixed=fixed,
    )
