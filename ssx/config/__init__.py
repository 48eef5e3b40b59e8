"""
Configuration of both ends: defaults < config.json < command-line flags.

`read_config_file` loads a shadowsocks-style config.json; `server_config` and
`local_config` check a merged mapping of keys (the names users already have in
their files: server, server_port, password, method, ...) and return one frozen
value.  Every bad value raises `ConfigError` naming its key.  No Twisted here.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from dataclasses import dataclass, field
from typing import Any, Mapping

from ssx.wire.address import Address
from ssx.crypto import generate_psk, lookup_method, make_suite
from ssx.errors import ConfigError
from ssx.server.forbidden import ForbiddenNetworks, parse_forbidden
from ssx.wire.http_message import HttpError, absolute_target
from ssx.wire.numbers import MAX_COUNT, parse_count, parse_number, parse_port, parse_seconds
from ssx.net.resolver import parse_nameservers
from ssx.config.upstreams import ServerEntry, entry_from_url, server_entry
from ssx.wire.sip003 import Plugin, PluginOptionsError, parse_plugin_options
from ssx.server.handshakes import DEFAULT_MAX_HANDSHAKES, DEFAULT_MAX_HANDSHAKES_PER_IP

__all__ = [
    "DEFAULT_CHECK_URL",
    "DEFAULT_METHOD",
    "HealthCheck",
    "PLUGIN_BACKEND_LISTEN",
    "LocalConfig",
    "OnlineConfig",
    "config_entries",
    "ServerConfig",
    "Limits",
    "Tunnel",
    "UdpSettings",
    "local_config",
    "merge",
    "read_config_file",
    "server_config",
]

DEFAULT_METHOD = "chacha20-ietf-poly1305"
DEFAULT_SERVER_PORT = 8388
DEFAULT_LOCAL_PORT = 1080
DEFAULT_TIMEOUT = 300.0
DEFAULT_UDP_TIMEOUT = 60.0
DEFAULT_UDP_CAPACITY = 1024
DEFAULT_REPLAY_HISTORY = 1_000_000
# About 360 MiB of filters, allocated at start.
MAX_REPLAY_HISTORY = 100_000_000
DEFAULT_HANDSHAKE_TIMEOUT = 30.0
DEFAULT_SHUTDOWN_GRACE = 10.0
# What the health check fetches through each server (as shadowsocks-rust and
# Clash do): small, fast and answered everywhere.
DEFAULT_CHECK_URL = "http://www.gstatic.com/generate_204"
DEFAULT_CHECK_INTERVAL = 60.0
DEFAULT_ONLINE_INTERVAL = 3600.0
# Where ssx-server writes the ss:// URL (it carries the password), relative
# to twistd's working directory (--rundir), beside twistd.pid.
DEFAULT_URL_FILE = "ssx-server.url"
# Where ssx listens behind a server-side plugin: a loopback port the OS picks.
PLUGIN_BACKEND_LISTEN = "tcp:0:interface=127.0.0.1"

_COMMON_KEYS = {
    "server", "server_port", "password", "key", "method", "timeout", "listen", "mode", "plugin", "plugin_opts",
    "plugin_args", "udp_timeout", "udp_max_associations", "handshake_timeout", "max_connections", "shutdown_grace",
    "verbose",
}
SERVER_KEYS = _COMMON_KEYS | {
    "nameserver", "forbidden_ip", "hosts_file", "resolv_conf", "prefer_ipv6", "users", "replay_history",
    "url_file",
    "max_handshakes", "max_handshakes_per_ip",
}
LOCAL_KEYS = _COMMON_KEYS | {
    "local_address", "local_port", "server_endpoint", "socks_user", "socks_password", "tunnel_address", "tunnels",
    "servers", "shadowsocks", "url", "online_config", "online_config_interval", "online_config_ca",
    "health_check_interval", "health_check_url",
}


@dataclass(frozen=True)
class UdpSettings:
    """Which relays run, and the UDP NAT's bounds."""

    tcp: bool
    udp: bool
    timeout: float
    capacity: int


@dataclass(frozen=True)
class Limits:
    """Bounds on connections, the same for both ends."""

    handshake_timeout: float
    max_connections: int  # 0 = no limit
    shutdown_grace: float

    def factory_arguments(self) -> dict[str, Any]:
        return {"handshake_timeout": self.handshake_timeout, "max_connections": self.max_connections}


@dataclass(frozen=True)
class Tunnel:
    """A local port forwarded through the server to a fixed target."""

    listen: str
    target: Address
    # Where a UDP-only tunnel binds (TCP tunnels put UDP beside `listen`).
    address: tuple[str, int] | None = None


@dataclass(frozen=True)
class HealthCheck:
    """
    The local end's check of its servers: every `interval` seconds (0: never)
    `request` is sent through each server to `target`, and the time to the
    first byte of the answer is the server's latency.
    """

    interval: float
    target: Address
    request: bytes
    timeout: float


@dataclass(frozen=True)
class OnlineConfig:
    """Where a SIP008 server list is fetched from, how often, and which CAs to trust (None: the system's)."""

    url: str = field(repr=False)  # SIP008 URLs carry a secret
    interval: float
    ca_file: str | None = None


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
    relays: UdpSettings
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


@dataclass(frozen=True)
class LocalConfig:
    """Everything `ssx-local` needs to start."""

    listen: tuple[str, ...]
    server: str | None
    server_port: int
    server_endpoint: str | None
    method: str
    password: str = field(repr=False)
    key: bytes | None = field(repr=False)
    timeout: float
    socks_credentials: tuple[bytes, bytes] | None = field(repr=False)
    relays: UdpSettings
    limits: Limits
    # The main listener offers SOCKS5, unless -L/tunnel_address makes it a tunnel.
    tunnels: tuple[Tunnel, ...] = ()
    # With a plugin, TCP goes to the plugin's loopback port; it reaches server:server_port.
    plugin: Plugin | None = None
    ignored: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    # Every server known at start, in order: -s/-p (or each of a "server"
    # list), then the servers list, then the ss:// URLs.
    servers: tuple[ServerEntry, ...] = ()
    online: OnlineConfig | None = None
    health_check: HealthCheck | None = None
    # A log line for every connection's failure, its destination included.
    verbose: bool = False


def read_config_file(path: str) -> dict[str, Any]:
    """Load a config.json; any problem is a ConfigError naming `config`."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise ConfigError("config", f"cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError) as e:
        # ValueError beside JSONDecodeError: a number of more than 4300 digits.
        raise ConfigError("config", f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a JSON object")
    return data


def merge(file_values: Mapping[str, Any], flags: Mapping[str, Any]) -> dict[str, Any]:
    """File values overridden by the flags that were given (None = not given)."""
    merged = dict(file_values)
    merged.update({k: v for k, v in flags.items() if v is not None})
    return merged


def server_config(values: Mapping[str, Any]) -> ServerConfig:
    """Check the merged server settings."""
    method = _method(values)
    password, key, generated = _secret(values, method, required=False)
    users = _users(values, method)
    hosts = _hosts(values.get("server", "0.0.0.0"))
    port = _port(values, "server_port", DEFAULT_SERVER_PORT, allow_zero=True)
    listen = _listen(values)
    relays = _relays(values)
    # Keys are checked now (decoded, lengths, user table), so a bad one
    # stops start-up naming its key.
    make_suite(method, password, key=key, users=dict(users))
    if not relays.tcp and values.get("listen") is not None:
        raise ConfigError("listen", "endpoint descriptions are for TCP; in udp_only mode use server and server_port")
    plugin, warnings = _plugin(values, relays)
    forbidden = parse_forbidden(values.get("forbidden_ip"))
    if not forbidden.off and forbidden.host is None:
        warnings += (
            "forbidden_ip leaves out 'self' (part of 'default'): clients can reach the services "
            "listening on this host's own addresses",
        )
    if plugin is not None:
        if listen:
            raise ConfigError(
                "listen", "with a plugin, the plugin listens on server:server_port and ssx behind it on loopback; "
                "drop --listen"
            )
        if port == 0:
            raise ConfigError("server_port", "a plugin needs a fixed port to listen on, not 0")
        listen = (PLUGIN_BACKEND_LISTEN,)
    elif not listen:
        listen = tuple(_tcp_listen(host, port) for host in hosts)
    return ServerConfig(
        listen=listen,
        method=method,
        password=password,
        key=key,
        password_generated=generated,
        host=hosts[0],
        port=port,
        timeout=_timeout(values),
        nameservers=parse_nameservers(values.get("nameserver")),
        forbidden=forbidden,
        hosts_file=_string(values, "hosts_file", "/etc/hosts"),
        resolv_conf=_string(values, "resolv_conf", "/etc/resolv.conf"),
        prefer_ipv6=_bool(values, "prefer_ipv6"),
        relays=relays,
        limits=_limits(values),
        hosts=hosts,
        users=users,
        replay_history=_count(values, "replay_history", DEFAULT_REPLAY_HISTORY, minimum=0, maximum=MAX_REPLAY_HISTORY),
        plugin=plugin,
        ignored=tuple(sorted(set(values) - SERVER_KEYS)),
        warnings=warnings,
        url_file=_url_file(values, generated),
        max_handshakes=_count(values, "max_handshakes", DEFAULT_MAX_HANDSHAKES, minimum=0),
        max_handshakes_per_ip=_count(values, "max_handshakes_per_ip", DEFAULT_MAX_HANDSHAKES_PER_IP, minimum=0),
        verbose=_verbose(values),
    )


def local_config(values: Mapping[str, Any]) -> LocalConfig:
    """Check the merged local settings."""
    method = _method(values)
    endpoint = values.get("server_endpoint")
    if endpoint is not None and (not isinstance(endpoint, str) or not endpoint):
        raise ConfigError("server_endpoint", "expected a Twisted client endpoint description, e.g. tcp:host=1.2.3.4:port=8388")
    raw_server = values.get("server")
    hosts = raw_server if isinstance(raw_server, list) else [] if raw_server is None else [raw_server]
    if not all(isinstance(h, str) and h for h in hosts):
        raise ConfigError("server", "expected the server's host name or IP address")
    server = hosts[0] if hosts else None
    servers: list[ServerEntry] = []
    password, key = "", None
    server_port = _port(values, "server_port", DEFAULT_SERVER_PORT, allow_zero=False)
    if hosts or endpoint is not None:
        password, key, _ = _secret(values, method, required=True)
        if endpoint is not None:
            servers.append(ServerEntry(server or "", server_port, method, password, key, endpoint=endpoint))
        else:
            servers += [ServerEntry(host, server_port, method, password, key) for host in hosts]
    servers += _server_list(values)
    servers += _urls(values)
    online = _online_config(values)
    if not servers and online is None:
        raise ConfigError(
            "server", "required: the server's address (-s HOST), an ss:// URL (--url), a servers list or --online-config"
        )
    listen = _listen(values)
    address = _string(values, "local_address", "127.0.0.1")
    if not listen:
        listen = (_tcp_listen(address, _port(values, "local_port", DEFAULT_LOCAL_PORT, allow_zero=True)),)
    relays = _relays(values)
    for entry in servers:
        # Keys checked now (2022 PSK lengths and form), so a bad one stops start-up.
        make_suite(entry.method, entry.password, key=entry.key)
    if relays.udp and (not servers or not servers[0].host):
        raise ConfigError(
            "server", "the UDP relay needs the first server's address (-s HOST, a servers list or --url), "
            "not only --server-endpoint or --online-config"
        )
    plugin, warnings = _plugin(values, relays)
    named = [entry for entry in servers if entry.plugin]
    if plugin is None and named and relays.tcp:
        # A single server's URL or entry may name the plugin (SIP002 ?plugin=).
        plugin, more = _plugin({"plugin": named[0].plugin, "plugin_opts": named[0].plugin_opts or None}, relays)
        warnings += more
    if plugin is not None:
        if endpoint is not None:
            raise ConfigError(
                "plugin", "a plugin connects to the server itself: give the server with -s/-p, not --server-endpoint"
            )
        if len(servers) != 1 or online is not None:
            raise ConfigError(
                "plugin", "a plugin works with one server (-s/-p or one URL); plugins per server in a servers "
                "list, or with an online config, are not supported yet"
            )
    tunnels = []
    if values.get("tunnel_address"):
        target = _target(values["tunnel_address"], "tunnel_address")
        if values.get("listen") is None:
            local_port = _port(values, "local_port", DEFAULT_LOCAL_PORT, allow_zero=True)
            tunnels = [Tunnel(listen[0], target, (address, local_port))]
        elif not relays.tcp:
            raise ConfigError("listen", "endpoint descriptions are for TCP; a udp_only tunnel uses local_address and local_port")
        else:
            tunnels = [Tunnel(description, target) for description in listen]
    socks_listen = () if tunnels else listen
    raw = values.get("tunnels") or []
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise ConfigError("tunnels", "expected a list of [ADDRESS:]PORT=HOST:PORT")
    tunnels += [_tunnel(item, address) for item in raw]
    user = values.get("socks_user")
    secret = values.get("socks_password")
    credentials = None
    if user is not None or secret is not None:
        for name, value in (("socks_user", user), ("socks_password", secret)):
            if not isinstance(value, str) or not value:
                raise ConfigError(name, "socks_user and socks_password must be set together, non-empty")
            if len(value.encode()) > 255:
                raise ConfigError(name, "at most 255 bytes (RFC 1929)")
        credentials = (user.encode(), secret.encode())  # type: ignore[union-attr]
    return LocalConfig(
        listen=socks_listen,
        server=server,
        server_port=server_port,
        server_endpoint=endpoint,
        method=method,
        password=password,
        key=key,
        timeout=_timeout(values),
        socks_credentials=credentials,
        relays=relays,
        limits=_limits(values),
        tunnels=tuple(tunnels),
        plugin=plugin,
        ignored=tuple(sorted(set(values) - LOCAL_KEYS)),
        warnings=warnings,
        servers=tuple(servers),
        online=online,
        health_check=_health_check(values),
        verbose=_verbose(values),
    )


def config_entries(values: Mapping[str, Any]) -> list[ServerEntry]:
    """
    Every server a config names, as `python -m ssx url` prints them: the
    top-level server (a server's own config: its bind address, for which
    the caller substitutes a host name) and the servers list, plugins
    included.
    """
    entries: list[ServerEntry] = []
    if values.get("password") is not None or values.get("key") is not None:
        if values.get("key") is not None and values.get("password") is None:
            raise ConfigError("key", "an ss:// URL carries a password, not a raw key")
        method = _method(values)
        password, _, _ = _secret(values, method, required=True)
        hosts = _hosts(values.get("server", "0.0.0.0"))
        port = _port(values, "server_port", DEFAULT_SERVER_PORT, allow_zero=False)
        plugin, plugin_opts = values.get("plugin") or "", values.get("plugin_opts") or ""
        if not isinstance(plugin, str) or not isinstance(plugin_opts, str):
            raise ConfigError("plugin", "expected strings for plugin and plugin_opts")
        entries.append(ServerEntry(hosts[0], port, method, password, None, plugin, plugin_opts))
    key = "servers" if values.get("servers") is not None else "shadowsocks"
    items = values.get(key) or []
    if not isinstance(items, list):
        raise ConfigError(key, "expected a list of server objects")
    for i, item in enumerate(items):
        entry = server_entry(item, f"{key}[{i}]")
        if entry is not None:
            entries.append(entry)
    if not entries:
        raise ConfigError("password", "required: an ss:// URL carries the server's password")
    return entries


def _server_list(values: Mapping[str, Any]) -> list[ServerEntry]:
    """The rust-style "servers" array (alias "shadowsocks"); disabled entries left out."""
    key = "servers" if values.get("servers") is not None else "shadowsocks"
    items = values.get(key)
    if items is None:
        return []
    if not isinstance(items, list):
        raise ConfigError(key, "expected a list of server objects")
    entries = [server_entry(item, f"{key}[{i}]") for i, item in enumerate(items)]
    return [e for e in entries if e is not None]


def _urls(values: Mapping[str, Any]) -> list[ServerEntry]:
    items = values.get("url")
    if items is None:
        return []
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list):
        raise ConfigError("url", "expected an ss:// URL or a list of them")
    return [entry_from_url(item) for item in items]


def _online_config(values: Mapping[str, Any]) -> OnlineConfig | None:
    """--online-config URL, or rust's {"config_url": ..., "update_interval": ...}."""
    raw = values.get("online_config")
    interval = values.get("online_config_interval")
    if raw is None:
        if interval is not None:
            _timeout(values, "online_config_interval")  # a bad value is an error even where unused
        return None
    if isinstance(raw, Mapping):
        if interval is None:
            interval = raw.get("update_interval")
        raw = raw.get("config_url")
    if not isinstance(raw, str) or not raw.lower().startswith("https://") or len(raw) <= len("https://"):
        raise ConfigError("online_config", "expected an https:// URL (SIP008 lists are fetched over TLS only)")
    _url_port(raw, "online_config")
    ca_file = values.get("online_config_ca")
    if ca_file is not None and (not isinstance(ca_file, str) or not ca_file):
        raise ConfigError("online_config_ca", "expected the path of a PEM file of CA certificates")
    seconds = _timeout({"online_config_interval": DEFAULT_ONLINE_INTERVAL if interval is None else interval}, "online_config_interval")
    return OnlineConfig(raw, seconds, ca_file)


def _health_check(values: Mapping[str, Any]) -> HealthCheck:
    interval = parse_seconds(
        values.get("health_check_interval", DEFAULT_CHECK_INTERVAL), "health_check_interval", allow_zero=True,
        meaning_of_zero=" (0 turns the check off)",
    )
    url = values.get("health_check_url", DEFAULT_CHECK_URL)
    if not isinstance(url, str):
        raise ConfigError("health_check_url", "expected an http:// URL")
    _url_port(url, "health_check_url")
    try:
        host, port, path = absolute_target(url)
    except HttpError as e:
        raise ConfigError("health_check_url", f"expected an http:// URL: {e}") from None
    authority = (f"[{host}]" if ":" in host else host) + ("" if port == 80 else f":{port}")
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: ssx-health-check\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")
    # A check slower than this counts as failed.
    timeout = min(10.0, max(interval, 1.0))
    return HealthCheck(interval, Address(host, port), request, timeout)


def _url_port(url: str, key: str) -> None:
    """Check the port of an http(s) URL, if it names one (the URL itself may hold a secret: not quoted)."""
    authority = url.partition("://")[2]
    for end in "/?#":
        authority = authority.partition(end)[0]
    authority = authority.rpartition("@")[2]
    if authority.startswith("["):
        after = authority.partition("]")[2]
        port = after[1:] if after.startswith(":") else ""
    else:
        port = authority.rpartition(":")[2] if ":" in authority else ""
    if port:
        parse_number(port, key, "a URL whose port is a number from 1 to 65535", minimum=1, maximum=65535, show=False)


def _method(values: Mapping[str, Any]) -> str:
    method = values.get("method", DEFAULT_METHOD)
    if not isinstance(method, str):
        raise ConfigError("method", "expected a method name such as aes-256-gcm")
    return lookup_method(method).name


def _secret(values: Mapping[str, Any], method: str, required: bool) -> tuple[str, bytes | None, bool]:
    key_text = values.get("key")
    if key_text is not None:
        if not isinstance(key_text, str) or not key_text:
            raise ConfigError("key", "expected the master key in URL-safe base64")
        try:
            key = base64.urlsafe_b64decode(key_text + "=" * (-len(key_text) % 4))
        except (binascii.Error, ValueError):
            raise ConfigError("key", "not valid URL-safe base64") from None
        size = lookup_method(method).key_size
        if len(key) != size:
            raise ConfigError("key", f"{method} needs a {size}-byte key; this one has {len(key)} bytes")
        return "", key, False
    password = values.get("password")
    if password is None or password == "":
        if required:
            raise ConfigError("password", "required: the server's password (-k)")
        if lookup_method(method).family == "aead2022":
            return generate_psk(method), None, True
        return secrets.token_urlsafe(24), None, True
    if not isinstance(password, str):
        raise ConfigError("password", "expected a string")
    if "\0" in password:
        raise ConfigError("password", "must not contain NUL characters")
    return password, None, False


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


def _hosts(value: Any) -> tuple[str, ...]:
    hosts = value if isinstance(value, list) else [value]
    if not hosts or not all(isinstance(h, str) and h for h in hosts):
        raise ConfigError("server", "expected a bind address or a list of them")
    return tuple(hosts)


def _port(values: Mapping[str, Any], key: str, default: int, allow_zero: bool) -> int:
    return parse_port(values.get(key, default), key, allow_zero=allow_zero)


def _timeout(values: Mapping[str, Any], key: str = "timeout", default: float = DEFAULT_TIMEOUT) -> float:
    return parse_seconds(values.get(key, default), key)


def _string(values: Mapping[str, Any], key: str, default: str) -> str:
    value = values.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(key, "expected a non-empty string")
    return value


def _bool(values: Mapping[str, Any], key: str) -> bool:
    value = values.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(key, "expected true or false")
    return value


def _verbose(values: Mapping[str, Any]) -> bool:
    """true/false, or the Python shadowsocks' level (-v is 1, -q is -1): above 0 is verbose."""
    value = values.get("verbose", False)
    if isinstance(value, bool):
        return value
    # A level may be signed: "-1" is the Python shadowsocks' -q.
    quiet = isinstance(value, str) and value[:1] == "-"
    level = parse_number(value[1:] if quiet else value, "verbose", "true or false (or a verbosity level)",
                         minimum=-MAX_COUNT, maximum=MAX_COUNT, show=not quiet)
    return not quiet and level > 0


def _listen(values: Mapping[str, Any]) -> tuple[str, ...]:
    value = values.get("listen")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(i, str) and i for i in items):
        raise ConfigError("listen", "expected a Twisted endpoint description such as tcp:8388 or a list of them")
    return tuple(items)


def _tcp_listen(host: str, port: int) -> str:
    # Endpoint descriptions use ':' as separator; IPv6 colons must be escaped.
    return f"tcp:{port}:interface={host.replace(':', chr(92) + ':')}"


def _url_file(values: Mapping[str, Any], password_generated: bool) -> str | None:
    value = values.get("url_file", DEFAULT_URL_FILE)
    if not isinstance(value, str) or "\0" in value:
        raise ConfigError("url_file", "expected the path of the file for the ss:// URL, or '' for none")
    if not value and password_generated:
        raise ConfigError(
            "url_file", "without a password (-k) the generated one is kept only in the URL file: give a password or a path"
        )
    return value or None


def _plugin(values: Mapping[str, Any], relays: UdpSettings) -> tuple[Plugin | None, tuple[str, ...]]:
    """The SIP003 plugin, if one is set (libev configs often carry "plugin": ""), and warnings."""
    name = values.get("plugin")
    options = values.get("plugin_opts")
    args = values.get("plugin_args")
    if name is not None and not isinstance(name, str):
        raise ConfigError("plugin", "expected the plugin's executable: a name on PATH or a path")
    if options is not None:
        if not isinstance(options, str):
            raise ConfigError("plugin_opts", "expected a string such as obfs=http;obfs-host=example.com")
        try:
            parse_plugin_options(options)
        except PluginOptionsError as e:
            raise ConfigError("plugin_opts", f"not a SIP003 option string: {e}") from None
    if args is not None and (not isinstance(args, list) or not all(isinstance(a, str) for a in args)):
        raise ConfigError("plugin_args", "expected a list of strings (extra command-line arguments)")
    if not name:
        if options or args:
            return None, ("plugin_opts/plugin_args set without plugin: ignored",)
        return None, ()
    if not relays.tcp:
        return None, (f"plugin {name} not started: plugins carry TCP, and mode is udp_only",)
    return Plugin(name, options or "", tuple(args or ())), ()


def _relays(values: Mapping[str, Any]) -> UdpSettings:
    mode = values.get("mode", "tcp_only")
    if mode not in ("tcp_only", "tcp_and_udp", "udp_only"):
        raise ConfigError("mode", "expected tcp_only, tcp_and_udp or udp_only")
    capacity = _count(values, "udp_max_associations", DEFAULT_UDP_CAPACITY, minimum=1)
    return UdpSettings(
        tcp=mode != "udp_only",
        udp=mode != "tcp_only",
        timeout=_timeout(values, "udp_timeout", DEFAULT_UDP_TIMEOUT),
        capacity=capacity,
    )


def _limits(values: Mapping[str, Any]) -> Limits:
    grace = parse_seconds(values.get("shutdown_grace", DEFAULT_SHUTDOWN_GRACE), "shutdown_grace", allow_zero=True)
    return Limits(
        handshake_timeout=_timeout(values, "handshake_timeout", DEFAULT_HANDSHAKE_TIMEOUT),
        max_connections=_count(values, "max_connections", 0, minimum=0),
        shutdown_grace=grace,
    )


def _count(values: Mapping[str, Any], key: str, default: int, minimum: int, maximum: int = MAX_COUNT) -> int:
    return parse_count(values.get(key, default), key, minimum=minimum, maximum=maximum)


def _target(text: Any, key: str) -> Address:
    """HOST:PORT or [IPv6]:PORT."""
    if not isinstance(text, str):
        raise ConfigError(key, "expected HOST:PORT")
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host:
        raise ConfigError(key, f"expected HOST:PORT, not {text!r}")
    return Address(host, parse_port(port, key))


def _tunnel(text: Any, default_address: str) -> Tunnel:
    """[ADDRESS:]PORT=HOST:PORT, e.g. 5353=8.8.8.8:53."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError("tunnels", f"expected [ADDRESS:]PORT=HOST:PORT, not {text!r}")
    local, _, target = text.partition("=")
    address, sep, port = local.rpartition(":")
    if not sep:
        address = default_address
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    if not address:
        raise ConfigError("tunnels", f"no local address in {text!r}")
    number = parse_port(port, "tunnels", allow_zero=True)
    return Tunnel(_tcp_listen(address, number), _target(target, "tunnels"), (address, number))
