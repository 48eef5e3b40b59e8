"""
One server as the local end knows it, from whichever source named it: the
top-level config keys, a rust-style `servers[]` entry, an `ss://` URL or a
SIP008 online config document.

`server_entry` checks one JSON object with shadowsocks-rust's keys and
aliases (server/address, server_port/port, remarks/name, disabled), and
`server_list` a config's list of them; `entry_from_url` and `entry_url`
convert from and to `ss://` URLs, and `config_entries` lists every server a
config names, for `python -m ssx url`.  Every bad value is a `ConfigError`
naming where it was (`servers[2].method`).  No Twisted here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ssx.crypto import lookup_method
from ssx.errors import ConfigError
from ssx.numbers import parse_port
from ssx.config.ports import port_entries
from ssx.config.values import DEFAULT_SERVER_PORT, read_bind_hosts, read_method, read_port, read_secret
from ssx.wire.sip002 import format_url, parse_url

__all__ = ["ServerEntry", "config_entries", "entry_from_url", "entry_url", "server_entry", "server_list", "url_entries"]


@dataclass(frozen=True)
class ServerEntry:
    """
    A server: where it is, its method and secret, its SIP003 plugin (name
    and raw option string) and a display name.  Equal entries are the same
    server, which is how an online config refresh keeps a server's health.
    """

    host: str
    port: int
    method: str
    password: str = field(repr=False)
    key: bytes | None = field(default=None, repr=False)
    plugin: str = ""
    plugin_opts: str = ""
    name: str = ""
    # A Twisted client endpoint description used instead of host:port.
    endpoint: str | None = None

    @property
    def label(self) -> str:
        """How the log names this server (never with its secret)."""
        where = self.endpoint or (f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}")
        return f"{self.name} ({where})" if self.name else where


def server_entry(values: Mapping[str, Any], where: str) -> ServerEntry | None:
    """
    The entry for one `servers[]` object (rust keys), or None when it says
    `"disabled": true`.  `where` prefixes the key in errors.
    """
    if not isinstance(values, Mapping):
        raise ConfigError(where, "expected a JSON object with server, server_port, password and method")
    disabled = values.get("disabled", False)
    if not isinstance(disabled, bool):
        raise ConfigError(f"{where}.disabled", "expected true or false")
    host = _first(values, "server", "address")
    if not isinstance(host, str) or not host:
        raise ConfigError(f"{where}.server", "required: the server's host name or IP address")
    port = parse_port(_first(values, "server_port", "port"), f"{where}.server_port")
    method = values.get("method")
    if not isinstance(method, str) or not method:
        raise ConfigError(f"{where}.method", "required: the encryption method")
    try:
        method = lookup_method(method).name
    except ConfigError as e:
        raise ConfigError(f"{where}.method", e.message) from None
    password = values.get("password")
    if not isinstance(password, str) or not password:
        raise ConfigError(f"{where}.password", "required: a non-empty string")
    if "\0" in password:
        raise ConfigError(f"{where}.password", "must not contain NUL characters")
    plugin = values.get("plugin") or ""
    plugin_opts = values.get("plugin_opts") or ""
    name = _first(values, "remarks", "name") or ""
    for key, value in (("plugin", plugin), ("plugin_opts", plugin_opts), ("remarks", name)):
        if not isinstance(value, str):
            raise ConfigError(f"{where}.{key}", "expected a string")
    if disabled:
        return None
    return ServerEntry(host, port, method, password, None, plugin, plugin_opts, name)


def server_list(values: Mapping[str, Any]) -> list[ServerEntry]:
    """The rust-style "servers" array (alias "shadowsocks"); disabled entries left out."""
    key = _list_key(values)
    items = values.get(key)
    if items is None:
        return []
    return _listed(items, key)


def _list_key(values: Mapping[str, Any]) -> str:
    return "servers" if values.get("servers") is not None else "shadowsocks"


def _listed(items: Any, key: str) -> list[ServerEntry]:
    if not isinstance(items, list):
        raise ConfigError(key, "expected a list of server objects")
    entries = [server_entry(item, f"{key}[{i}]") for i, item in enumerate(items)]
    return [e for e in entries if e is not None]


def url_entries(values: Mapping[str, Any]) -> list[ServerEntry]:
    """The servers of `url`: one ss:// URL or a list of them."""
    items = values.get("url")
    if items is None:
        return []
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list):
        raise ConfigError("url", "expected an ss:// URL or a list of them")
    return [entry_from_url(item) for item in items]


def config_entries(values: Mapping[str, Any]) -> list[ServerEntry]:
    """
    Every server a config names, as `python -m ssx url` prints them: the
    top-level server (a server's own config: its bind address, for which
    the caller substitutes a host name) and the servers list, plugins
    included.
    """
    if values.get("port_password") is not None or isinstance(values.get("server_port"), list):
        # A server's several ports (the original's forms): one URL each.
        return [e for _, port, _ in port_entries(values)[0] for e in config_entries(port)]
    entries: list[ServerEntry] = []
    if values.get("password") is not None or values.get("key") is not None:
        if values.get("key") is not None and values.get("password") is None:
            raise ConfigError("key", "an ss:// URL carries a password, not a raw key")
        method = read_method(values)
        password, _, _ = read_secret(values, method, required=True)
        hosts = read_bind_hosts(values)
        port = read_port(values, "server_port", DEFAULT_SERVER_PORT, allow_zero=False)
        plugin, plugin_opts = values.get("plugin") or "", values.get("plugin_opts") or ""
        if not isinstance(plugin, str) or not isinstance(plugin_opts, str):
            raise ConfigError("plugin", "expected strings for plugin and plugin_opts")
        entries.append(ServerEntry(hosts[0], port, method, password, None, plugin, plugin_opts))
    key = _list_key(values)
    # An empty value of any kind is no list here (a local end's config refuses it).
    entries += _listed(values.get(key) or [], key)
    if not entries:
        raise ConfigError("password", "required: an ss:// URL carries the server's password")
    return entries


def entry_from_url(text: str) -> ServerEntry:
    """The entry an `ss://` URL describes; its method must be one ssx knows."""
    url = parse_url(text)
    try:
        method = lookup_method(url.method).name
    except ConfigError as e:
        raise ConfigError("url", e.message) from None
    return ServerEntry(url.host, url.port, method, url.password, None, url.plugin, url.plugin_opts, url.tag)


def entry_url(entry: ServerEntry, host: str | None = None) -> str:
    """The SIP002 URL of an entry (with `host` in place of its own, if given)."""
    return format_url(
        entry.method, entry.password, host or entry.host, entry.port, entry.name or None, entry.plugin or None, entry.plugin_opts or None
    )


def _first(values: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if values.get(key) is not None:
            return values[key]
    return None
