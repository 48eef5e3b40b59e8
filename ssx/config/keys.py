"""
Access keys: many keys on one port, as outline-ss-server has them.

A key is ``{"id": ..., "cipher": ..., "secret": ...}`` (Outline's names),
optionally with its limits, ``"max_connections": 5`` and
``"quota": {"bytes": "10G", "period": "30d"}`` (`ssx.server.key_limits`).
Two places hold keys:

- the top level's ``"keys"``, each key with its ``"port"`` (Outline's
  config, YAML or JSON): one port per distinct port, each with its keys
  (a key without ``port`` is on ``server_port``);
- a `servers` entry's ``"keys"``, without ``port``: the entry's port.

`read_keys` checks one list; a bad key is one `ConfigError` naming it
(``keys[2].cipher``).  No Twisted here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ssx.crypto import lookup_method, make_suite
from ssx.errors import ConfigError
from ssx.numbers import parse_count, parse_duration, parse_port, parse_size

__all__ = ["KEY_FIELDS", "KeyConfig", "read_keys"]

KEY_FIELDS = frozenset({"id", "port", "cipher", "secret", "max_connections", "quota"})
_QUOTA_FIELDS = frozenset({"bytes", "period"})
_EXAMPLE = '{"id": "alice", "cipher": "chacha20-ietf-poly1305", "secret": "..."}'


@dataclass(frozen=True)
class KeyConfig:
    """One access key: what `ssx.server.ports.port_credentials` builds its suite and limit from."""

    id: str
    method: str
    secret: str = field(repr=False)
    # The port it is on, where the list gave one (top-level keys).
    port: int | None = None
    max_connections: int = 0
    quota_bytes: int = 0
    quota_period: float = 0.0


def read_keys(raw: Any, label: str = "keys", ports: bool = True) -> tuple[KeyConfig, ...]:
    """
    The keys of a `keys` list named `label`; each may give its `port`
    only if `ports`.  Ids are unique per port.
    """
    if not isinstance(raw, list) or not raw:
        raise ConfigError(label, f"expected a list of keys such as [{_EXAMPLE}]")
    keys = []
    seen: dict[tuple[int | None, str], int] = {}
    for index, entry in enumerate(raw):
        key = _read_key(entry, f"{label}[{index}]", ports)
        where = (key.port, key.id)
        if where in seen:
            on = f" on port {key.port}" if key.port is not None else ""
            raise ConfigError(f"{label}[{index}].id", f"id {key.id!r} is used twice{on} (also {label}[{seen[where]}])")
        seen[where] = index
        keys.append(key)
    return tuple(keys)


def _read_key(entry: Any, label: str, ports: bool) -> KeyConfig:
    if not isinstance(entry, dict):
        raise ConfigError(label, f"expected a key such as {_EXAMPLE}")
    unknown = sorted(str(name) for name in set(entry) - KEY_FIELDS)
    if unknown:
        raise ConfigError(f"{label}.{unknown[0]}", f"not a key setting; a key has {', '.join(sorted(KEY_FIELDS))}")
    key_id = entry.get("id")
    # YAML reads `id: 1` as a number: Outline's ids are numbers in text.
    if isinstance(key_id, int) and not isinstance(key_id, bool):
        key_id = str(key_id)
    if not isinstance(key_id, str) or not key_id or not key_id.isprintable() or len(key_id) > 200:
        raise ConfigError(f"{label}.id", "required: the key's name (printable text, up to 200 characters)")
    cipher = entry.get("cipher")
    if not isinstance(cipher, str):
        raise ConfigError(f"{label}.cipher", "required: the key's method, such as chacha20-ietf-poly1305")
    try:
        spec = lookup_method(cipher)
    except ConfigError:
        raise ConfigError(f"{label}.cipher", f"unknown method {cipher!r}") from None
    if spec.family not in ("aead", "aead2022"):
        raise ConfigError(f"{label}.cipher", f"{spec.name} has no tag to find a key by: keys need AEAD methods")
    secret = entry.get("secret")
    if not isinstance(secret, str) or not secret or "\0" in secret:
        raise ConfigError(f"{label}.secret", "required: the key's password (a non-empty string)")
    try:
        make_suite(spec.name, secret)
    except ConfigError as e:
        # Never the secret itself in the message.
        raise ConfigError(f"{label}.secret", e.message) from None
    port = None
    if "port" in entry:
        if not ports:
            raise ConfigError(f"{label}.port", "a server entry's keys are on its server_port: leave port out")
        port = parse_port(entry["port"], f"{label}.port")
    max_connections = parse_count(entry.get("max_connections", 0), f"{label}.max_connections", minimum=0)
    quota_bytes, quota_period = _read_quota(entry.get("quota"), f"{label}.quota")
    return KeyConfig(key_id, spec.name, secret, port, max_connections, quota_bytes, quota_period)


def _read_quota(raw: Any, label: str) -> tuple[int, float]:
    if raw is None:
        return 0, 0.0
    if not isinstance(raw, dict) or "bytes" not in raw or "period" not in raw or set(raw) - _QUOTA_FIELDS:
        raise ConfigError(label, 'expected {"bytes": "10G", "period": "30d"}')
    return parse_size(raw["bytes"], f"{label}.bytes"), parse_duration(raw["period"], f"{label}.period")
