"""
The server end's configuration: `server_config` checks the merged keys
(`ssx.config.file`) and returns one frozen `ServerConfig`, which
`ssx.server.tap` builds the service tree from.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Mapping

from ssx.config.known_keys import SERVER_PEER_KEYS, no_method_warning, peer_key_notes
from ssx.numbers import quoted
from ssx.config.values import (
    COMMON_KEYS,
    DEFAULT_METHOD,
    DEFAULT_SERVER_PORT,
    Limits,
    RelayModes,
    read_bind_hosts,
    read_bool,
    read_count,
    read_limits,
    read_listen,
    read_method,
    read_plugin,
    read_port,
    read_relay_modes,
    read_seconds,
    read_secret,
    read_string,
    read_verbose,
    read_workers,
    is_plain_tcp,
    read_acl,
    tcp_description,
)
from ssx.config.keys import KeyConfig, read_keys
from ssx.crypto import lookup_method, make_key_ring
from ssx.net.outbound import Outbound
from ssx.errors import ConfigError
from ssx.config.nameservers import parse_nameservers
from ssx.config.manager import MANAGER_KEYS, ManagerAddress, read_manager_address
from ssx.config.metrics import METRICS_KEYS, read_metrics
from ssx.config.ports import PORT_LIST_KEYS, PortConfig, dual_stack, port_entries
from ssx.acl import Acl
from ssx.server.forbidden import ForbiddenNetworks, parse_forbidden
from ssx.server.handshakes import DEFAULT_MAX_HANDSHAKES, DEFAULT_MAX_HANDSHAKES_PER_IP
from ssx.wire.sip003 import Plugin

__all__ = ["LOOPBACK_LOCAL_ADDRESS", "PLUGIN_BACKEND_LISTEN", "SERVER_KEYS", "PortConfig", "ServerConfig", "added_port", "read_outbound", "server_config"]

DEFAULT_REPLAY_HISTORY = 1_000_000
# About 360 MiB of filters, allocated at start.
MAX_REPLAY_HISTORY = 100_000_000
# Where ssx-server writes the ss:// URL (it carries the password), relative
# to twistd's working directory (--rundir), beside twistd.pid.
DEFAULT_URL_FILE = "ssx-server.url"
# Where ssx listens behind a server-side plugin: a loopback port the OS picks.
PLUGIN_BACKEND_LISTEN = "tcp:0:interface=127.0.0.1"

SERVER_KEYS = COMMON_KEYS | {
    "nameserver", "forbidden_ip", "hosts_file", "resolv_conf", "prefer_ipv6", "users", "replay_history",
    "url_file", "keys",
    "max_handshakes", "max_handshakes_per_ip", "dns_server", "port_password", "servers",
    # libev's name for prefer_ipv6.
    "ipv6_first",
    # Where connections to targets leave from; local_address is libev's name (`read_outbound`).
    "outbound_address", "local_address", "interface",
} | MANAGER_KEYS | METRICS_KEYS
# What a manager's `add` may set for its port; the rest comes from the config's top level.
ADD_KEYS = frozenset({
    "server_port", "password", "method", "mode", "fast_open", "no_delay", "plugin", "plugin_opts", "plugin_mode",
    "users", "timeout",
})
# Top-level keys that describe the configured ports, not the added ones.
_NOT_INHERITED = PORT_LIST_KEYS | {"server_port", "password", "key", "users", "listen"}


@dataclass(frozen=True)
class ServerConfig:
    """Everything `ssx-server` needs to start."""

    listen: tuple[str, ...]
    method: str
    password: str = field(repr=False)
    key: bytes | None = field(repr=False)
    password_generated: bool
    host: str
    port: int
    timeout: float
    nameservers: tuple[tuple[str, int], ...]
    forbidden: ForbiddenNetworks
    hosts_file: str
    resolv_conf: str
    prefer_ipv6: bool
    relays: RelayModes
    limits: Limits
    hosts: tuple[str, ...] = ()
    # 2022 methods, several users on one port: name -> base64 uPSK.
    users: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    # Salts remembered against replays (stream and AEAD-2017); 0 = off.
    replay_history: int = DEFAULT_REPLAY_HISTORY
    # With a plugin, `listen` is ssx's loopback port behind it, and the
    # plugin listens on hosts:port.
    plugin: Plugin | None = None
    ignored: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    # The 0600 file the ss:// URL goes to (None: none); without a password,
    # the one generated at an earlier start is taken back from it.
    url_file: str | None = None
    password_reused: bool = False
    # Unfinished handshakes held at once, in all and per source; 0 = no bound.
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES
    max_handshakes_per_ip: int = DEFAULT_MAX_HANDSHAKES_PER_IP
    # A log line for every event a peer can cause, destinations included.
    verbose: bool = False
    # Every port served, each with its own keys; the fields above that
    # describe a port (listen, method, password, port, ...) are the first's.
    ports: tuple[PortConfig, ...] = ()
    # Where the manager API answers (None: no manager), and the keys a
    # port it adds inherits from the top level.
    manager: ManagerAddress | None = None
    port_defaults: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # TCP Fast Open on the TCP listening sockets (data in the SYN): the
    # top-level key; a `servers` entry may set its own (`ports`).
    fast_open: bool = False
    # Processes serving the ports (1: this one, no supervisor), and
    # SO_REUSEPORT on the listening sockets (so several processes bind one port).
    workers: int = 1
    reuse_port: bool = False
    # The source addresses and interface of connections and datagrams to
    # targets (None: as the kernel chooses).
    outbound: Outbound | None = None
    # The endpoint description /metrics is served on (None: no metrics).
    metrics: str | None = None
    # The ACL file (`acl`): client black/white lists and outbound block/allow lists.
    acl: Acl | None = None
    acl_path: str | None = None

    def port_configs(self) -> tuple[PortConfig, ...]:
        """`ports`, or for a config made without them, the one port its fields describe."""
        if self.ports:
            return self.ports
        return (PortConfig(
            label="", port=self.port, hosts=self.hosts or (self.host,), listen=self.listen, method=self.method,
            password=self.password, key=self.key, password_generated=self.password_generated, relays=self.relays,
            timeout=self.timeout, users=self.users, plugin=self.plugin, v6only=dual_stack(self.hosts),
            fast_open=self.fast_open,
        ),)


def server_config(values: Mapping[str, Any]) -> ServerConfig:
    """Check the merged server settings."""
    entries, warnings = port_entries(values)
    several = entries[0][0] != ""
    ports = []
    for label, entry, own in entries:
        try:
            port, notes = _port_config(label, entry, required=several)
        except ConfigError as e:
            raise _named(label, own, e) from None
        ports.append(port)
        warnings += notes
    _check_distinct(ports)
    # A generated password's ss:// URL carries the method: only a given
    # secret, from a deployment of another implementation, may expect the
    # original's.  Access keys each name their cipher.
    if any("method" not in entry and not port.password_generated and not port.keys
           for (_, entry, _), port in zip(entries, ports)):
        warnings += (no_method_warning(DEFAULT_METHOD),)
    peer_warnings, ignored = peer_key_notes(values, SERVER_KEYS, SERVER_PEER_KEYS)
    warnings += peer_warnings
    first = ports[0]
    forbidden = parse_forbidden(values.get("forbidden_ip"))
    warnings += _forbidden_warnings(forbidden)
    dns_key = "nameserver" if values.get("nameserver") is not None else "dns_server"
    outbound, notes = read_outbound(values)
    warnings += notes
    return ServerConfig(
        listen=first.listen,
        method=first.method,
        password=first.password,
        key=first.key,
        password_generated=first.password_generated,
        host=first.hosts[0],
        port=first.port,
        timeout=first.timeout,
        nameservers=parse_nameservers(values.get(dns_key), dns_key),
        forbidden=forbidden,
        hosts_file=read_string(values, "hosts_file", "/etc/hosts"),
        resolv_conf=read_string(values, "resolv_conf", "/etc/resolv.conf"),
        prefer_ipv6=_prefer_ipv6(values),
        relays=first.relays,
        limits=read_limits(values),
        hosts=first.hosts,
        users=first.users,
        replay_history=read_count(values, "replay_history", DEFAULT_REPLAY_HISTORY, minimum=0, maximum=MAX_REPLAY_HISTORY),
        plugin=first.plugin,
        ignored=ignored,
        warnings=warnings,
        url_file=_url_file(values, first.password_generated),
        max_handshakes=read_count(values, "max_handshakes", DEFAULT_MAX_HANDSHAKES, minimum=0),
        max_handshakes_per_ip=read_count(values, "max_handshakes_per_ip", DEFAULT_MAX_HANDSHAKES_PER_IP, minimum=0),
        verbose=read_verbose(values),
        ports=tuple(ports),
        manager=read_manager_address(values),
        port_defaults={k: v for k, v in values.items() if k not in _NOT_INHERITED},
        fast_open=read_bool(values, "fast_open"),
        outbound=outbound,
        metrics=read_metrics(values),
        workers=_workers(values, ports),
        reuse_port=read_bool(values, "reuse_port"),
        acl=read_acl(values),
        acl_path=values.get("acl"),
    )


def _workers(values: Mapping[str, Any], ports: list[PortConfig]) -> int:
    """`workers`, refused with what the supervisor cannot share between processes."""
    workers = read_workers(values)
    if workers > 1:
        for port in ports:
            if port.plugin is not None:
                raise ConfigError("workers", "not with a SIP003 plugin (each worker would start its own on one port)")
            limited = [key.id for key in port.keys if key.max_connections or key.quota_bytes]
            if limited:
                raise ConfigError("workers", f"not with per-key max_connections or quota (key {limited[0]!r} on port "
                                             f"{port.port}): each worker would count them apart, allowing N times as much")
            if port.relays.tcp:
                for description in port.listen:
                    if not is_plain_tcp(description):
                        raise ConfigError("workers", f"listeners must be plain TCP (tcp:, tcp6: or an address), "
                                                     f"not {description!r}")
    return workers


# The warning for a loopback local_address, which is never meant for the server.
LOOPBACK_LOCAL_ADDRESS = (
    "config key local_address: {address} is a loopback address, ignored: in the original shadowsocks' shared "
    "config.json it is sslocal's listen address, and binding ssx-server's outgoing connections to it would "
    "reach loopback targets only (set outbound_address for a source address)"
)
# Linux's IFNAMSIZ, less the terminating NUL.
_MAX_INTERFACE_NAME = 15


def read_outbound(values: Mapping[str, Any]) -> tuple[Outbound | None, tuple[str, ...]]:
    """
    (where connections to targets leave from, warnings): outbound_address,
    or libev's server-side local_address where it is not given (without
    its loopback addresses, which the original's shared config.json sets
    for sslocal), at most one IPv4 and one IPv6 address; and interface.
    """
    key = "outbound_address" if values.get("outbound_address") is not None else "local_address"
    raw = values.get(key)
    if raw is None:
        items: list[Any] = []
    elif isinstance(raw, str):
        items = [item.strip() for item in raw.split(",") if item.strip()]
    elif isinstance(raw, list):
        items = raw
    else:
        raise ConfigError(key, "expected an IP address, or a list of one IPv4 and one IPv6 address")
    warnings: list[str] = []
    sources: dict[int, str] = {}
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(key, f"{quoted(item)} is not an IP address")
        try:
            address = ipaddress.ip_address(item.strip())
        except ValueError:
            raise ConfigError(key, f"{item!r} is not an IP address") from None
        if key == "local_address" and address.is_loopback:
            warnings.append(LOOPBACK_LOCAL_ADDRESS.format(address=address))
            continue
        if address.is_unspecified:
            continue  # 0.0.0.0 or ::, the kernel's choice: no bind needed
        if address.version in sources:
            raise ConfigError(key, f"two IPv{address.version} addresses ({sources[address.version]}, {address}): "
                                   "give at most one IPv4 and one IPv6 address")
        sources[address.version] = str(address)
    device = values.get("interface")
    if device is not None:
        if not isinstance(device, str) or not device or len(device) > _MAX_INTERFACE_NAME or "/" in device \
                or any(c.isspace() for c in device) or not device.isascii():
            raise ConfigError("interface", f"{device!r} is not an interface name")
    if not sources and device is None:
        return None, tuple(warnings)
    return Outbound(ipv4=sources.get(4), ipv6=sources.get(6), device=device), tuple(warnings)


def added_port(defaults: Mapping[str, Any], request: Mapping[str, Any]) -> PortConfig:
    """
    The port a manager's `add` asks for: `request`'s keys (`ADD_KEYS`;
    others are ignored, as libev and rust do) over the top-level
    `defaults`.  A bad value raises `ConfigError` naming its key.
    """
    own = {k: v for k, v in request.items() if k in ADD_KEYS and v is not None}
    if not isinstance(own.get("password"), str) or not own["password"]:
        raise ConfigError("password", "required: the new port's password")
    if "plugin" in own and "plugin_opts" not in own:
        defaults = {k: v for k, v in defaults.items() if k != "plugin_opts"}
    port, _ = _port_config(f"port {own.get('server_port')}", {**defaults, **own}, required=True)
    return port


def _prefer_ipv6(values: Mapping[str, Any]) -> bool:
    """prefer_ipv6, or libev's ipv6_first where it is not given."""
    if values.get("prefer_ipv6") is None and values.get("ipv6_first") is not None:
        return read_bool(values, "ipv6_first")
    return read_bool(values, "prefer_ipv6")


def _port_config(label: str, values: Mapping[str, Any], required: bool) -> tuple[PortConfig, tuple[str, ...]]:
    """One port's settings; with several ports each needs its password (or key), or its access keys."""
    keys = _keys(values.get("keys"))
    if keys:
        if values.get("users") is not None:
            raise ConfigError("users", "give a port either access keys or users, not both")
        method, password, key, generated = keys[0].method, "", None, False
    else:
        method = read_method(values)
        password, key, generated = read_secret(values, method, required=required)
    users = _users(values, method)
    hosts = read_bind_hosts(values)
    port = read_port(values, "server_port", DEFAULT_SERVER_PORT, allow_zero=True)
    listen = read_listen(values)
    relays = read_relay_modes(values)
    # Keys are checked now (decoded, lengths, user table), so a bad one
    # stops start-up naming its key.
    make_key_ring(method, password, key=key, users=dict(users), keys=[(k.id, k.method, k.secret) for k in keys])
    if not relays.tcp and values.get("listen") is not None:
        raise ConfigError("listen", "endpoint descriptions are for TCP; in udp_only mode use server and server_port")
    plugin, warnings = read_plugin(values, relays)
    if label:
        warnings = tuple(f"{label}: {line}" for line in warnings)
    config = PortConfig(
        label=label,
        port=port,
        hosts=hosts,
        listen=_tcp_listen(listen, hosts, port, plugin),
        method=method,
        password=password,
        key=key,
        password_generated=generated,
        relays=relays,
        timeout=read_seconds(values),
        users=users,
        plugin=plugin,
        v6only=dual_stack(hosts),
        fast_open=read_bool(values, "fast_open"),
        keys=keys,
    )
    return config, warnings


def _keys(raw: Any) -> tuple[KeyConfig, ...]:
    """A port's access keys: read by `ports` already (top-level keys), or a servers entry's list."""
    if raw is None:
        return ()
    if isinstance(raw, tuple):
        return raw
    return read_keys(raw, ports=False)


def _named(label: str, own: frozenset[str], error: ConfigError) -> ConfigError:
    """`error` named after the port entry, when the entry itself set the bad key."""
    # keys[2].cipher is the entry's own when the entry sets keys.
    root = error.key.split("[", 1)[0].split(".", 1)[0]
    if not label or (error.key not in own and root not in own):
        return error
    if label.startswith("servers["):
        return ConfigError(f"{label}.{error.key}", error.message)
    # port_password.8001 and server_port[1] name the port's own value.
    return ConfigError(label, error.message)


def _check_distinct(ports: list[PortConfig]) -> None:
    seen: dict[int, str] = {}
    for port in ports:
        if port.port and port.port in seen:
            raise ConfigError(port.label, f"port {port.port} is configured twice (also {seen[port.port]})")
        seen[port.port] = port.label


def _forbidden_warnings(forbidden: ForbiddenNetworks) -> tuple[str, ...]:
    if not forbidden.off and forbidden.host is None:
        return (
            "forbidden_ip leaves out 'self' (part of 'default'): clients can reach the services "
            "listening on this host's own addresses",
        )
    return ()


def _tcp_listen(listen: tuple[str, ...], hosts: tuple[str, ...], port: int, plugin: Plugin | None) -> tuple[str, ...]:
    """Where ssx listens for TCP: `listen` if given, else server:server_port, or behind a plugin a loopback port."""
    if plugin is not None:
        if listen:
            raise ConfigError(
                "listen", "with a plugin, the plugin listens on server:server_port and ssx behind it on loopback; "
                "drop --listen"
            )
        if port == 0:
            raise ConfigError("server_port", "a plugin needs a fixed port to listen on, not 0")
        return (PLUGIN_BACKEND_LISTEN,)
    if not listen:
        return tuple(tcp_description(host, port) for host in hosts)
    return listen


def _users(values: Mapping[str, Any], method: str) -> tuple[tuple[str, str], ...]:
    """
    `users` as shadowsocks-rust writes it, ``[{"name": ..., "password": uPSK}]``,
    or an object ``{name: uPSK}``.
    """
    raw = values.get("users")
    if raw is None:
        return ()
    if isinstance(raw, dict):
        items = list(raw.items())
    elif isinstance(raw, list) and all(isinstance(u, dict) for u in raw):
        items = [(u.get("name"), u.get("password")) for u in raw]
    else:
        raise ConfigError("users", 'expected [{"name": ..., "password": ...}, ...]')
    for name, psk in items:
        if not isinstance(name, str) or not name or not isinstance(psk, str) or not psk:
            raise ConfigError("users", "every user needs a non-empty name and password")
    if len({name for name, _ in items}) != len(items):
        raise ConfigError("users", "user names must be unique")
    if items and lookup_method(method).family != "aead2022":
        raise ConfigError("users", f"several users on one port need a 2022 method, not {method}")
    return tuple(items)


def _url_file(values: Mapping[str, Any], password_generated: bool) -> str | None:
    value = values.get("url_file", DEFAULT_URL_FILE)
    if not isinstance(value, str) or "\0" in value:
        raise ConfigError("url_file", "expected the path of the file for the ss:// URL, or '' for none")
    if not value and password_generated:
        raise ConfigError(
            "url_file", "without a password (-k) the generated one is kept only in the URL file: give a password or a path"
        )
    return value or None
