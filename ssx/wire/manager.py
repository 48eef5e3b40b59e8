"""
The manager API's text protocol (libev's ss-manager, shadowsocks-rust's
ssmanager, the original Python ssserver's --manager-address): one request
per datagram, ``COMMAND`` or ``COMMAND: JSON``; replies are one datagram
each.  Parsing requests and building replies, no I/O; the service that
answers them is `ssx.server.manager`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "COMMANDS", "ManagerRequest", "ManagerRequestError", "OK", "STAT_PORTS_PER_DATAGRAM",
    "error_reply", "list_reply", "parse_request", "stat_reply", "stat_reports",
]

COMMANDS = frozenset({"add", "remove", "list", "ping"})
OK = b"ok"
# The original sends at most this many ports in one `stat:` datagram.
STAT_PORTS_PER_DATAGRAM = 50


class ManagerRequestError(Exception):
    """A request that cannot be carried out; its text is the `err:` reply."""


@dataclass(frozen=True)
class ManagerRequest:
    command: str
    body: Any = None

    def port(self) -> int:
        """The request's `server_port` (a number or a numeric string, as libev accepts)."""
        if not isinstance(self.body, dict) or "server_port" not in self.body:
            raise ManagerRequestError(f"{self.command}: server_port required")
        value = self.body["server_port"]
        if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 5:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
            raise ManagerRequestError(f"{self.command}: server_port must be a port number, 1-65535")
        return value


def parse_request(data: bytes) -> ManagerRequest:
    """One datagram's request; `ManagerRequestError` for anything else."""
    try:
        text = data.decode("utf-8").strip().rstrip("\x00")
    except UnicodeDecodeError:
        raise ManagerRequestError("not UTF-8 text") from None
    command, colon, rest = text.partition(":")
    command = command.strip()
    if command not in COMMANDS:
        raise ManagerRequestError(f"unknown command {command[:32]!r}; expected one of add, remove, list, ping")
    body = None
    if colon and rest.strip():
        try:
            body = json.loads(rest)
        except (ValueError, RecursionError) as e:
            # RecursionError: nesting deeper than the stack (not a ValueError).
            raise ManagerRequestError(f"{command}: bad JSON: {type(e).__name__}: {str(e)[:100]}") from None
    if command in ("add", "remove") and not isinstance(body, dict):
        raise ManagerRequestError(f'{command}: expected {command}: {{"server_port": ...}}')
    return ManagerRequest(command, body)


def error_reply(message: str) -> bytes:
    """`err: message` on one line."""
    return ("err: " + " ".join(message.split())).encode("utf-8")


def stat_reply(traffic: Mapping[int, int]) -> bytes:
    """``stat: {"8001": bytes, ...}``: ports as strings, as every implementation writes them."""
    return b"stat: " + json.dumps({str(p): n for p, n in traffic.items()}, separators=(",", ":")).encode()


def stat_reports(traffic: Mapping[int, int]) -> list[bytes]:
    """`stat_reply` datagrams of at most `STAT_PORTS_PER_DATAGRAM` ports each (none for no ports)."""
    items = list(traffic.items())
    return [stat_reply(dict(items[i:i + STAT_PORTS_PER_DATAGRAM])) for i in range(0, len(items), STAT_PORTS_PER_DATAGRAM)]


def list_reply(entries: Iterable[tuple[int, str, str, Sequence[str]]]) -> bytes:
    """
    The `list` reply: ``[{"server_port": "8001", "password": ..., "method": ...}]``
    (libev's string ports).  A port of access keys has no password of its
    own: ``""`` (panels expect a string; a key's secret is not the port's),
    its method is its first key's, and ``"keys"`` lists its key ids.
    """
    listed = []
    for port, password, method, keys in entries:
        entry: dict[str, Any] = {"server_port": str(port), "password": password or "", "method": method}
        if keys:
            entry["keys"] = list(keys)
        listed.append(entry)
    return json.dumps(listed, separators=(",", ":")).encode("utf-8")
