"""
config.json and the flags over it: the file is read into a mapping of the
keys shadowsocks users already have (or, from a .yml/.yaml file or one
that is not JSON, from YAML: outline-ss-server's `keys` list comes over
as it is), the flags given on the command line
replace its values, and the keys neither end reads are named so that a
misspelt one does not go unnoticed.  No Twisted here.
"""

from __future__ import annotations

import json
from typing import AbstractSet, Any, Mapping

import yaml

from ssx.errors import ConfigError

__all__ = ["merge", "read_config_file", "unused_keys"]


_YAML_SUFFIXES = (".yml", ".yaml")


def read_config_file(path: str) -> dict[str, Any]:
    """
    Load a config.json, or a YAML file (by its name, or when its text is
    not JSON); any problem is a ConfigError naming `config`.
    """
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise ConfigError("config", f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError("config", f"{path} is not UTF-8 text: {e}") from None
    as_yaml = path.lower().endswith(_YAML_SUFFIXES)
    if not as_yaml:
        try:
            data = json.loads(text)
        except ValueError as e:
            # ValueError beside JSONDecodeError: a number of more than 4300 digits.
            if text.lstrip().startswith(("{", "[")):
                raise ConfigError("config", f"{path} is not valid JSON: {e}") from None
            as_yaml = True
    if as_yaml:
        data = _read_yaml(path, text)
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a {'YAML mapping' if as_yaml else 'JSON object'}")
    return data


def _read_yaml(path: str, text: str) -> Any:
    # safe_load builds plain data only (no tags that construct objects).
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise ConfigError("config", f"{path} is neither JSON nor valid YAML{at}: {problem}") from None
    except RecursionError:
        raise ConfigError("config", f"{path}: YAML nested too deeply") from None


def merge(file_values: Mapping[str, Any], flags: Mapping[str, Any]) -> dict[str, Any]:
    """File values overridden by the flags that were given (None = not given)."""
    merged = dict(file_values)
    merged.update({k: v for k, v in flags.items() if v is not None})
    return merged


def unused_keys(values: Mapping[str, Any], known: AbstractSet[str]) -> tuple[str, ...]:
    """The keys of `values` that are not `known`, sorted: what the start-up notes name as not used."""
    return tuple(sorted(set(values) - known))
