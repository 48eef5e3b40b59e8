"""
The one exception hierarchy of ssx.

Wire codecs raise `ProtocolError` (or a subclass) for a peer's bad bytes, and
the Twisted protocols catch exactly that family to end the one connection
quietly.  `ConfigError` is a user's bad configuration: it names the key.
"""

from __future__ import annotations

__all__ = [
    "SSXError",
    "ProtocolError",
    "AuthenticationError",
    "ReplayError",
    "AddressError",
    "UnsupportedAddressType",
    "Socks5Error",
    "ConfigError",
]


class SSXError(Exception):
    """Base of every error ssx raises on purpose."""


class ProtocolError(SSXError):
    """A peer sent bytes that do not follow the protocol."""


class AuthenticationError(ProtocolError):
    """An AEAD tag did not verify: wrong key, tampering or garbage."""


class ReplayError(ProtocolError):
    """A salt (or 2022 packet ID) seen before: a replayed capture."""


class AddressError(ProtocolError):
    """A Shadowsocks/SOCKS5 address header is malformed."""


class UnsupportedAddressType(AddressError):
    """The ATYP byte is not 1, 3 or 4."""


class Socks5Error(ProtocolError):
    """
    A SOCKS5 negotiation failed.

    `reply` holds the bytes to send to the client before closing (possibly
    empty: some failures, such as a wrong version byte, get no answer).
    """

    def __init__(self, message: str, reply: bytes = b"") -> None:
        super().__init__(message)
        self.reply = reply


class ConfigError(SSXError):
    """A configuration value is unusable; `key` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message
