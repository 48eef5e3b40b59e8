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

from ssx.address import Address
from ssx.crypto import lookup_method
from ssx.errors import ConfigError
from ssx.forbidden import ForbiddenNetworks, parse_forbidden
from ssx.resolver import parse_nameservers
from ssx.sip003 import Plugin, PluginOptionsError, parse_plugin_options

__all__ = [
    "DEFAULT_METHOD",
    "PLUGIN_BACKEND_LISTEN",
    "LocalConfig",
    "ServerConfig",
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
# Where ssx listens behind a server-side plugin: a loopback port the OS picks.
PLUGIN_BACKEND_LISTEN = "tcp:0:interface=127.0.0.1"

_COMMON_KEYS = {
    "server", "server_port", "password", "key", "method", "timeout", "listen", "mode", "plugin", "plugin_opts",
    "plugin_args", "udp_timeout", "udp_max_associations",
}
SERVER_KEYS = _COMMON_KEYS | {"nameserver", "forbidden_ip", "hosts_file", "resolv_conf", "prefer_ipv6"}
LOCAL_KEYS = _COMMON_KEYS | {
    "local_address", "local_port", "server_endpoint", "socks_user", "socks_password", "tunnel_address", "tunnels",
}


@dataclass(frozen=True)
class UdpSettings:
    """Which relays run, and the UDP NAT's bounds."""

    tcp: bool
    udp: bool
    timeout: float
    capacity: int


@dataclass(frozen=True)
class Tunnel:
    """A local port forwarded through the server to a fixed target."""

    listen: str
    target: Address
    # Where a UDP-only tunnel binds (TCP tunnels put UDP beside `listen`).
    address: tuple[str, int] | None = None


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
    hosts: tuple[str, ...] = ()
    # With a plugin, `listen` is ssx's loopback port behind it, and the
    # plugin listens on hosts:port.
    plugin: Plugin | None = None
    ignored: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


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
    # The main listener offers SOCKS5, unless -L/tunnel_address makes it a tunnel.
    tunnels: tuple[Tunnel, ...] = ()
    # With a plugin, TCP goes to the plugin's loopback port; it reaches server:server_port.
    plugin: Plugin | None = None
    ignored: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def read_config_file(path: str) -> dict[str, Any]:
    """Load a config.json; any problem is a ConfigError naming `config`."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise ConfigError("config", f"cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
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
    hosts = _hosts(values.get("server", "0.0.0.0"))
    port = _port(values, "server_port", DEFAULT_SERVER_PORT, allow_zero=True)
    listen = _listen(values)
    relays = _relays(values)
    if not relays.tcp and values.get("listen") is not None:
        raise ConfigError("listen", "endpoint descriptions are for TCP; in udp_only mode use server and server_port")
    plugin, warnings = _plugin(values, relays)
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
        forbidden=parse_forbidden(values.get("forbidden_ip")),
        hosts_file=_string(values, "hosts_file", "/etc/hosts"),
        resolv_conf=_string(values, "resolv_conf", "/etc/resolv.conf"),
        prefer_ipv6=_bool(values, "prefer_ipv6"),
        relays=relays,
        hosts=hosts,
        plugin=plugin,
        ignored=tuple(sorted(set(values) - SERVER_KEYS)),
        warnings=warnings,
    )


def local_config(values: Mapping[str, Any]) -> LocalConfig:
    """Check the merged local settings."""
    method = _method(values)
    password, key, _ = _secret(values, method, required=True)
    endpoint = values.get("server_endpoint")
    if endpoint is not None and (not isinstance(endpoint, str) or not endpoint):
        raise ConfigError("server_endpoint", "expected a Twisted client endpoint description, e.g. tcp:host=1.2.3.4:port=8388")
    server = values.get("server")
    if isinstance(server, list) and server:
        server = server[0]
    if server is not None and (not isinstance(server, str) or not server):
        raise ConfigError("server", "expected the server's host name or IP address")
    if server is None and endpoint is None:
        raise ConfigError("server", "required: the server's address (-s HOST) or --server-endpoint")
    server_port = _port(values, "server_port", DEFAULT_SERVER_PORT, allow_zero=False)
    listen = _listen(values)
    address = _string(values, "local_address", "127.0.0.1")
    if not listen:
        listen = (_tcp_listen(address, _port(values, "local_port", DEFAULT_LOCAL_PORT, allow_zero=True)),)
    relays = _relays(values)
    if relays.udp and server is None:
        raise ConfigError("server", "the UDP relay needs the server's address (-s HOST), not only --server-endpoint")
    plugin, warnings = _plugin(values, relays)
    if plugin is not None and endpoint is not None:
        raise ConfigError(
            "plugin", "a plugin connects to the server itself: give the server with -s/-p, not --server-endpoint"
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
        tunnels=tuple(tunnels),
        plugin=plugin,
        ignored=tuple(sorted(set(values) - LOCAL_KEYS)),
        warnings=warnings,
    )


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
        return secrets.token_urlsafe(24), None, True
    if not isinstance(password, str):
        raise ConfigError("password", "expected a string")
    if "\0" in password:
        raise ConfigError("password", "must not contain NUL characters")
    return password, None, False


def _hosts(value: Any) -> tuple[str, ...]:
    hosts = value if isinstance(value, list) else [value]
    if not hosts or not all(isinstance(h, str) and h for h in hosts):
        raise ConfigError("server", "expected a bind address or a list of them")
    return tuple(hosts)


def _port(values: Mapping[str, Any], key: str, default: int, allow_zero: bool) -> int:
    value = values.get(key, default)
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not (0 if allow_zero else 1) <= value <= 65535:
        raise ConfigError(key, f"expected a port number from 1 to 65535, not {value!r}")
    return value


def _timeout(values: Mapping[str, Any], key: str = "timeout", default: float = DEFAULT_TIMEOUT) -> float:
    value = values.get(key, default)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(key, f"expected a positive number of seconds, not {value!r}")
    return float(value)


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
    capacity = values.get("udp_max_associations", DEFAULT_UDP_CAPACITY)
    if isinstance(capacity, str) and capacity.isdigit():
        capacity = int(capacity)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ConfigError("udp_max_associations", f"expected a positive whole number, not {capacity!r}")
    return UdpSettings(
        tcp=mode != "udp_only",
        udp=mode != "tcp_only",
        timeout=_timeout(values, "udp_timeout", DEFAULT_UDP_TIMEOUT),
        capacity=capacity,
    )


def _target(text: Any, key: str) -> Address:
    """HOST:PORT or [IPv6]:PORT."""
    if not isinstance(text, str):
        raise ConfigError(key, "expected HOST:PORT")
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(key, f"expected HOST:PORT, not {text!r}")
    return Address(host, int(port))


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
    if not port.isdigit() or not int(port) < 65536 or not address:
        raise ConfigError("tunnels", f"bad local port in {text!r}")
    return Tunnel(_tcp_listen(address, int(port)), _target(target, "tunnels"), (address, int(port)))
