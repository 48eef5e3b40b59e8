"""
SIP003 plugins, the part without I/O: the plugin option string, the
environment a plugin is started with, and the plugin parameter of SIP002
`ss://` URLs.

A plugin is a child process that tunnels Shadowsocks TCP between loopback
and the network (see `ssx.net.plugin` for the service that runs it).  Its
options travel as one string in `SS_PLUGIN_OPTIONS`, in the Tor pluggable
transport format `key=value;key2=value2;flag`, with `\\` escaping `\\`, `;`,
`=` (and `:`, which SIP002 lists for URLs).  The parser follows
v2ray-plugin's (goptlib): an empty key or a trailing backslash is an error.
No Twisted here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

__all__ = [
    "Plugin",
    "PluginOptionsError",
    "escape_option",
    "format_plugin_options",
    "join_plugin_parameter",
    "parse_plugin_options",
    "plugin_environment",
    "split_plugin_parameter",
]

_SPECIAL = "\\;=:"


class PluginOptionsError(ValueError):
    """A plugin option string does not follow SIP003's format."""


@dataclass(frozen=True)
class Plugin:
    """A SIP003 plugin as configured: executable, option string, extra argv."""

    name: str
    # Some plugins take secrets here (kcptun's key=): kept out of reprs and logs.
    options: str = field(default="", repr=False)
    args: tuple[str, ...] = ()


def escape_option(text: str) -> str:
    """Backslash-escape the characters that delimit keys and values."""
    return "".join("\\" + c if c in _SPECIAL else c for c in text)


def _scan(text: str, start: int, stops: str) -> tuple[int, str]:
    """Unescape from `start` up to the first unescaped char in `stops`; returns (index of it or len, text)."""
    out = []
    i = start
    while i < len(text):
        c = text[i]
        if c == "\\":
            if i + 1 >= len(text):
                raise PluginOptionsError(f"trailing backslash in {text!r}")
            out.append(text[i + 1])
            i += 2
            continue
        if c in stops:
            break
        out.append(c)
        i += 1
    return i, "".join(out)


def parse_plugin_options(text: str) -> list[tuple[str, str | None]]:
    """
    `key=value;flag` -> [("key", "value"), ("flag", None)], in order,
    unescaped.  A flag has no value (v2ray-plugin reads it as "1").
    """
    options: list[tuple[str, str | None]] = []
    i = 0
    while i < len(text):
        begin = i
        i, key = _scan(text, i, "=;")
        if not key:
            raise PluginOptionsError(f"empty key at offset {begin} of {text!r}")
        if i >= len(text) or text[i] == ";":
            options.append((key, None))
            i += 1
            continue
        i, value = _scan(text, i + 1, ";")
        options.append((key, value))
        i += 1
    return options


def format_plugin_options(options: Iterable[tuple[str, str | None]]) -> str:
    """The option string for `options`, escaped; the inverse of `parse_plugin_options`."""
    parts = []
    for key, value in options:
        if not key:
            raise PluginOptionsError("an option needs a non-empty key")
        parts.append(escape_option(key) if value is None else f"{escape_option(key)}={escape_option(value)}")
    return ";".join(parts)


def plugin_environment(
    base: Mapping[str, str],
    remote: tuple[str, int],
    local: tuple[str, int],
    options: str,
) -> dict[str, str]:
    """
    The plugin's environment: `base` plus the SS_* variables.  REMOTE is
    the network side, LOCAL the Shadowsocks side, whichever end listens.
    SS_PLUGIN_OPTIONS is set only when there are options, as libev does.
    """
    env = dict(base)
    env.pop("SS_PLUGIN_OPTIONS", None)
    env.update(
        SS_REMOTE_HOST=remote[0],
        SS_REMOTE_PORT=str(remote[1]),
        SS_LOCAL_HOST=local[0],
        SS_LOCAL_PORT=str(local[1]),
    )
    if options:
        env["SS_PLUGIN_OPTIONS"] = options
    return env


def split_plugin_parameter(value: str) -> Plugin:
    """
    The `plugin` query parameter of a SIP002 URL (already percent-decoded),
    `name;options`, split at the first `;`.
    """
    name, _, options = value.partition(";")
    if not name:
        raise PluginOptionsError(f"no plugin name in {value!r}")
    parse_plugin_options(options)
    return Plugin(name, options)


def join_plugin_parameter(plugin: Plugin) -> str:
    """The SIP002 `plugin` parameter for `plugin` (percent-encode it before putting it in a URL)."""
    return f"{plugin.name};{plugin.options}" if plugin.options else plugin.name
