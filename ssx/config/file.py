"""
config.json and the flags over it: the file is read into a mapping of the
keys shadowsocks users already have, the flags given on the command line
replace its values, and the keys neither end reads are named so that a
misspelt one does not go unnoticed.  No Twisted here.
"""

from __future__ import annotations

import json
from typing import AbstractSet, Any, Mapping

from ssx.errors import ConfigError

__all__ = ["merge", "read_config_file", "unused_keys"]


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


def unused_keys(values: Mapping[str, Any], known: AbstractSet[str]) -> tuple[str, ...]:
    """The keys of `values` that are not `known`, sorted: what the start-up notes name as not used."""
    return tuple(sorted(set(values) - known))
