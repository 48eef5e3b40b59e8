"""
SIP008 online configuration documents (ecosystem.md §3), sans-IO.

`ssx.local.online` fetches the document over HTTPS and hands the body here;
`parse_online_config` checks it (version 1, a non-empty `servers` list,
each server with its host, port, password and a method ssx knows; rust's
aliases accepted) and returns the server entries for the picker.  A bad
document is one `ConfigError("online_config", ...)` that names the first
problem; the caller then keeps its last good list.  No Twisted here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ssx.errors import ConfigError
from ssx.config.upstreams import ServerEntry, server_entry
from ssx.wire.sip003 import PluginOptionsError, parse_plugin_options

__all__ = ["MAX_DOCUMENT", "OnlineServers", "parse_online_config"]

# The largest document read: thousands of servers fit in far less.
MAX_DOCUMENT = 1024 * 1024


@dataclass(frozen=True)
class OnlineServers:
    """The usable servers of a document, what was left out and why, and the usage figures."""

    servers: tuple[ServerEntry, ...]
    skipped: tuple[str, ...] = ()
    bytes_used: int | None = None
    bytes_remaining: int | None = None


def _reject(reason: str) -> ConfigError:
    return ConfigError("online_config", reason)


def parse_online_config(body: bytes) -> OnlineServers:
    """The servers of a SIP008 document; ConfigError("online_config", why) if it is malformed."""
    if len(body) > MAX_DOCUMENT:
        raise _reject(f"document larger than {MAX_DOCUMENT} bytes")
    try:
        document = json.loads(body.decode("utf-8-sig"))
    except (ValueError, RecursionError) as e:
        # JSONDecodeError and UnicodeDecodeError are ValueErrors; so is a number
        # past Python's digit limit, and nesting past the stack is a RecursionError.
        raise _reject(f"not JSON: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(document, dict):
        raise _reject("not a JSON object")
    version = document.get("version")
    if version != 1 or isinstance(version, bool):
        raise _reject(f"version must be 1, not {version!r}")
    items = document.get("servers")
    if not isinstance(items, list):
        raise _reject("no servers list")
    servers: list[ServerEntry] = []
    skipped: list[str] = []
    for i, item in enumerate(items):
        try:
            entry = server_entry(item, f"servers[{i}]")
        except ConfigError as e:
            raise _reject(str(e)) from None
        if entry is None:
            continue
        if entry.plugin_opts:
            try:
                parse_plugin_options(entry.plugin_opts)
            except PluginOptionsError as e:
                skipped.append(f"servers[{i}] ({entry.name or entry.host}): plugin_opts not a SIP003 option string: {e}")
                continue
        servers.append(entry)
    if not servers:
        raise _reject("no usable server in the list" + (f" ({'; '.join(skipped)})" if skipped else ""))
    used, remaining = document.get("bytes_used"), document.get("bytes_remaining")
    return OnlineServers(
        tuple(servers),
        tuple(skipped),
        used if isinstance(used, int) and not isinstance(used, bool) else None,
        remaining if isinstance(remaining, int) and not isinstance(remaining, bool) else None,
    )
