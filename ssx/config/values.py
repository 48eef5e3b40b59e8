"""
The settings both ends read, one checked value at a time.

Each `read_*` takes the merged mapping of config keys (config.json under
the command-line flags, `ssx.config.file`) and returns one setting, its
default where the key is absent; a bad value raises `ConfigError` naming
the key.  `ssx.config.server` and `ssx.config.local` build each end's
configuration from these.  No Twisted here.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from dataclasses import dataclass
from typing import Any, Mapping

from ssx.acl import Acl, load_acl
from ssx.numbers import MAX_COUNT, parse_count, parse_number, parse_port, parse_seconds
from ssx.crypto import generate_psk, lookup_method
from ssx.errors import ConfigError
from ssx.wire.sip003 import Plugin, PluginOptionsError, parse_plugin_options

__all__ = [
    "COMMON_KEYS",
    "DEFAULT_METHOD",
    "DEFAULT_SERVER_PORT",
    "DEFAULT_TIMEOUT",
    "Limits",
    "RelayModes",
    "read_bind_hosts",
    "read_acl",
    "read_bool",
    "read_count",
    "read_limits",
    "read_listen",
    "read_method",
    "read_plugin",
    "read_port",
    "read_relay_modes",
    "read_seconds",
    "read_secret",
    "read_string",
    "read_verbose",
    "read_workers",
    "is_plain_tcp",
    "tcp_description",
]

DEFAULT_METHOD = "chacha20-ietf-poly1305"
DEFAULT_SERVER_PORT = 8388
DEFAULT_TIMEOUT = 300.0
DEFAULT_UDP_TIMEOUT = 60.0
DEFAULT_UDP_CAPACITY = 1024
DEFAULT_HANDSHAKE_TIMEOUT = 30.0
DEFAULT_SHUTDOWN_GRACE = 10.0

# The keys both ends read; each end adds its own.
COMMON_KEYS = frozenset({
    "server", "server_port", "password", "key", "method", "timeout", "listen", "mode", "plugin", "plugin_opts",
    "plugin_args", "udp_timeout", "udp_max_associations", "handshake_timeout", "max_connections", "shutdown_grace",
    "verbose", "fast_open", "workers", "reuse_port",
    "verbose", "fast_open", "acl",
})
# `workers` beyond this is refused as a typo (one process per core is the aim).
MAX_WORKERS = 256


@dataclass(frozen=True)
class RelayModes:
    """
    The `mode` setting (tcp_only, udp_only or tcp_and_udp: which relays
    run) and the bounds of the UDP relays' NAT.
    """

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


def read_method(values: Mapping[str, Any]) -> str:
    """`method`, by its canonical name."""
    method = values.get("method", DEFAULT_METHOD)
    if not isinstance(method, str):
        raise ConfigError("method", "expected a method name such as aes-256-gcm")
    return lookup_method(method).name


def read_secret(values: Mapping[str, Any], method: str, required: bool) -> tuple[str, bytes | None, bool]:
    """
    (password, key, generated): `key` (a raw master key in URL-safe
    base64) if given, else `password`; without either, a fresh password
    (generated: True), unless one is `required`.
    """
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


def read_bind_hosts(values: Mapping[str, Any]) -> tuple[str, ...]:
    """`server` as a server's bind addresses: one or a list [default: 0.0.0.0]."""
    value = values.get("server", "0.0.0.0")
    hosts = value if isinstance(value, list) else [value]
    if not hosts or not all(isinstance(h, str) and h for h in hosts):
        raise ConfigError("server", "expected a bind address or a list of them")
    return tuple(hosts)


def read_port(values: Mapping[str, Any], key: str, default: int, allow_zero: bool) -> int:
    return parse_port(values.get(key, default), key, allow_zero=allow_zero)


def read_seconds(values: Mapping[str, Any], key: str = "timeout", default: float = DEFAULT_TIMEOUT) -> float:
    """A positive number of seconds; by default the idle `timeout`."""
    return parse_seconds(values.get(key, default), key)


def read_count(values: Mapping[str, Any], key: str, default: int, minimum: int, maximum: int = MAX_COUNT) -> int:
    return parse_count(values.get(key, default), key, minimum=minimum, maximum=maximum)


def read_string(values: Mapping[str, Any], key: str, default: str) -> str:
    value = values.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(key, "expected a non-empty string")
    return value


def read_bool(values: Mapping[str, Any], key: str) -> bool:
    value = values.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(key, "expected true or false")
    return value


def read_workers(values: Mapping[str, Any]) -> int:
    """
    `workers`: how many processes serve the ports [default: 1, no
    supervisor]; 0 or "auto", one per core this process may run on.
    """
    import os

    value = values.get("workers", 1)
    if value == "auto" or value == "0" or value == 0:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return max(1, os.cpu_count() or 1)
    if isinstance(value, str) and not value.isdigit():
        raise ConfigError("workers", "expected a number of processes, or 0 or auto for one per core")
    return parse_count(value, "workers", minimum=1, maximum=MAX_WORKERS)


def is_plain_tcp(description: str) -> bool:
    """Whether a listen description is a plain TCP one (what several processes can share)."""
    kind = description.split(":", 1)[0]
    return kind in ("tcp", "tcp6")
def read_acl(values: Mapping[str, Any]) -> Acl | None:
    """The ACL file named by `acl`, loaded (a bad line stops start-up), or None."""
    if values.get("acl") is None:
        return None
    return load_acl(read_string(values, "acl", ""))


def read_verbose(values: Mapping[str, Any]) -> bool:
    """true/false, or the Python shadowsocks' level (-v is 1, -q is -1): above 0 is verbose."""
    value = values.get("verbose", False)
    if isinstance(value, bool):
        return value
    # A level may be signed: "-1" is the Python shadowsocks' -q.
    quiet = isinstance(value, str) and value[:1] == "-"
    level = parse_number(value[1:] if quiet else value, "verbose", "true or false (or a verbosity level)",
                         minimum=-MAX_COUNT, maximum=MAX_COUNT, show=not quiet)
    return not quiet and level > 0


def read_listen(values: Mapping[str, Any]) -> tuple[str, ...]:
    """`listen`: Twisted endpoint descriptions, one or a list (none if absent)."""
    value = values.get("listen")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(i, str) and i for i in items):
        raise ConfigError("listen", "expected a Twisted endpoint description such as tcp:8388 or a list of them")
    return tuple(items)


def tcp_description(host: str, port: int) -> str:
    """The endpoint description of a TCP listener on `host`:`port`."""
    # Endpoint descriptions use ':' as separator; IPv6 colons must be escaped.
    return f"tcp:{port}:interface={host.replace(':', chr(92) + ':')}"


def read_plugin(values: Mapping[str, Any], relays: RelayModes) -> tuple[Plugin | None, tuple[str, ...]]:
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


def read_relay_modes(values: Mapping[str, Any]) -> RelayModes:
    """`mode` [default: tcp_only], `udp_timeout` and `udp_max_associations`."""
    mode = values.get("mode", "tcp_only")
    if mode not in ("tcp_only", "tcp_and_udp", "udp_only"):
        raise ConfigError("mode", "expected tcp_only, tcp_and_udp or udp_only")
    capacity = read_count(values, "udp_max_associations", DEFAULT_UDP_CAPACITY, minimum=1)
    return RelayModes(
        tcp=mode != "udp_only",
        udp=mode != "tcp_only",
        timeout=read_seconds(values, "udp_timeout", DEFAULT_UDP_TIMEOUT),
        capacity=capacity,
    )


def read_limits(values: Mapping[str, Any]) -> Limits:
    grace = parse_seconds(values.get("shutdown_grace", DEFAULT_SHUTDOWN_GRACE), "shutdown_grace", allow_zero=True)
    return Limits(
        handshake_timeout=read_seconds(values, "handshake_timeout", DEFAULT_HANDSHAKE_TIMEOUT),
        max_connections=read_count(values, "max_connections", 0, minimum=0),
        shutdown_grace=grace,
    )
