"""
The table of supported methods and their sizes.

This is pure data consulted at configuration time: `lookup_method` validates a
user's method name and tells `CipherSuite` which family of framing (AEAD,
stream or none) and which key/salt sizes to use.  The cipher primitives
themselves live in `_aead` and `_stream`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ssx.errors import ConfigError

__all__ = ["METHODS", "MethodSpec", "lookup_method"]


@dataclass(frozen=True)
class MethodSpec:
    """The wire-visible parameters of one method."""

    name: str
    family: str  # "aead" | "aead2022" | "stream" | "none"
    key_size: int
    salt_size: int  # AEAD salt, stream IV, 0 for none

    @property
    def insecure(self) -> bool:
        """Stream and none methods give no integrity: warn whoever picks them."""
        return self.family not in ("aead", "aead2022")


_SPECS: tuple[MethodSpec, ...] = (
    MethodSpec("aes-128-gcm", "aead", 16, 16),
    MethodSpec("aes-192-gcm", "aead", 24, 24),
    MethodSpec("aes-256-gcm", "aead", 32, 32),
    MethodSpec("chacha20-ietf-poly1305", "aead", 32, 32),
    MethodSpec("xchacha20-ietf-poly1305", "aead", 32, 32),
    MethodSpec("2022-blake3-aes-128-gcm", "aead2022", 16, 16),
    MethodSpec("2022-blake3-aes-256-gcm", "aead2022", 32, 32),
    MethodSpec("2022-blake3-chacha20-poly1305", "aead2022", 32, 32),
    MethodSpec("aes-128-cfb", "stream", 16, 16),
    MethodSpec("aes-192-cfb", "stream", 24, 16),
    MethodSpec("aes-256-cfb", "stream", 32, 16),
    MethodSpec("aes-128-ctr", "stream", 16, 16),
    MethodSpec("aes-192-ctr", "stream", 24, 16),
    MethodSpec("aes-256-ctr", "stream", 32, 16),
    MethodSpec("camellia-128-cfb", "stream", 16, 16),
    MethodSpec("camellia-192-cfb", "stream", 24, 16),
    MethodSpec("camellia-256-cfb", "stream", 32, 16),
    MethodSpec("chacha20-ietf", "stream", 32, 12),
    MethodSpec("chacha20", "stream", 32, 8),
    MethodSpec("salsa20", "stream", 32, 8),
    MethodSpec("rc4-md5", "stream", 16, 16),
    MethodSpec("bf-cfb", "stream", 16, 8),
    MethodSpec("none", "none", 0, 0),
)

# rust calls the identity method both ways; "none" is the canonical name.
_ALIASES: dict[str, str] = {"plain": "none"}

_BY_NAME: dict[str, MethodSpec] = {spec.name: spec for spec in _SPECS}

METHODS: tuple[str, ...] = tuple(spec.name for spec in _SPECS)


def lookup_method(name: str) -> MethodSpec:
    """The spec of a method name, ignoring case and resolving aliases."""
    key = name.lower()
    key = _ALIASES.get(key, key)
    try:
        return _BY_NAME[key]
    except KeyError:
        raise ConfigError(
            "method",
            f"unknown method {name!r}; choose one of: {', '.join(METHODS)}",
        ) from None
