"""
What a `--workers` supervisor and its workers say to each other, one line
per message, over the pipes the supervisor opens for each worker (the
worker reads its fd 3 and writes its fd 4).  No Twisted here.

- supervisor -> worker: first a `hello` (JSON: the command line to read
  the configuration from, the inherited sockets by listener, the shared
  replay filter's descriptor, the values the supervisor settled), then
  manager requests in the manager protocol's own form (`add: {json}`,
  `remove: {json}`), forwarded to every worker, and `reload: {json}`
  (a SIGHUP's reload, the supervisor having checked the file: the
  inherited sockets of listeners gone from it to close once applied);
- worker -> supervisor: `stat: {json}`, the manager protocol's report:
  each port's bytes since the worker started serving it; `reloaded:
  {json}`, how its reload ended (`ok`, and the refusal's line if not).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from ssx.wire.manager import stat_reply

# A worker's descriptors: it reads the supervisor's lines on one, writes its own on the other.
CONTROL_IN, CONTROL_OUT = 3, 4

__all__ = [
    "CONTROL_IN", "CONTROL_OUT", "hello_line", "parse_hello", "parse_reload", "parse_reloaded", "reload_line",
    "reloaded_line", "parse_stat", "request_line", "stat_line",
]


def hello_line(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode() + b"\n"


def parse_hello(line: bytes) -> dict[str, Any]:
    value = json.loads(line)
    if not isinstance(value, dict):
        raise ValueError("hello: expected a JSON object")
    return value


def request_line(command: str, body: Any) -> bytes:
    """A manager request as one line (the JSON re-encoded without newlines)."""
    return f"{command}: {json.dumps(body, separators=(',', ':'))}".encode() + b"\n"


def stat_line(totals: Mapping[int, int]) -> bytes:
    return stat_reply(totals) + b"\n"


def parse_stat(line: bytes) -> dict[int, int] | None:
    """The totals of a `stat:` line, or None for any other line."""
    if not line.startswith(b"stat:"):
        return None
    try:
        table = json.loads(line[len(b"stat:"):])
        return {int(port): int(total) for port, total in table.items()}
    except (ValueError, AttributeError, TypeError):
        return None


def reload_line(release: list[str]) -> bytes:
    """The supervisor's reload request: reload, then close the inherited sockets keyed `release`."""
    return b"reload: " + json.dumps({"release": release}, separators=(",", ":")).encode() + b"\n"


def parse_reload(line: bytes) -> list[str] | None:
    """The keys to release of a `reload:` line, or None for any other line."""
    if not line.startswith(b"reload:"):
        return None
    try:
        body = json.loads(line[len(b"reload:"):])
        return [str(key) for key in body.get("release", [])]
    except (ValueError, AttributeError, TypeError):
        return None


def reloaded_line(ok: bool, error: str = "") -> bytes:
    """A worker's report of its reload: applied (`ok`), or refused or failed with `error`."""
    return b"reloaded: " + json.dumps({"ok": ok, "error": error}, separators=(",", ":")).encode() + b"\n"


def parse_reloaded(line: bytes) -> tuple[bool, str] | None:
    """(ok, error) of a `reloaded:` line, or None for any other line."""
    if not line.startswith(b"reloaded:"):
        return None
    try:
        body = json.loads(line[len(b"reloaded:"):])
        return bool(body["ok"]), str(body.get("error", ""))
    except (ValueError, KeyError, TypeError):
        return None
