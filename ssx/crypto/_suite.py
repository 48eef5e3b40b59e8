"""
`CipherSuite`: one configured method plus its master key.

The relays hold one suite per configured server/port and ask it for a fresh
encryptor and decryptor per TCP connection direction, or to seal/open single
UDP datagrams.  This module only dispatches to the family modules (`_aead`,
`_stream`, `_plain`); it does no cipher work itself.
"""

from __future__ import annotations

import os
from typing import Protocol

from zope.interface import implementer

from ssx.crypto import _aead, _stream
from ssx.crypto._kdf import evp_bytes_to_key
from ssx.crypto._plain import PlainTcpDecryptor, PlainTcpEncryptor
from ssx.crypto._registry import MethodSpec, lookup_method
from ssx.errors import ConfigError
from ssx.interfaces import ICipherSuite
from ssx.crypto._codecs import LegacyClientCodec, LegacyServerCodec, LegacyUdpClientCodec

__all__ = ["CipherSuite", "TcpEncryptor", "TcpDecryptor"]


class TcpEncryptor(Protocol):
    """Sending side of one TCP direction."""

    #: The salt/IV this direction sends (b"" for the none method).
    salt: bytes

    def encrypt(self, data: bytes) -> bytes:
        """Ciphertext for `data`; the first non-empty result starts with the salt."""


class TcpDecryptor(Protocol):
    """Receiving side of one TCP direction."""

    #: The peer's salt/IV once it has arrived, else None.
    salt: bytes | None

    def decrypt(self, data: bytes) -> bytes:
        """Plaintext completed by `data` (possibly b""); ProtocolError on bad input."""


@implementer(ICipherSuite)
class CipherSuite:
    """One configured method and password; the master key is derived once here."""

    __slots__ = ("spec", "_key")

    spec: MethodSpec

    def __init__(self, method: str, password: str | bytes) -> None:
        spec = lookup_method(method)
        if spec.family == "aead2022":
            raise ConfigError("method", f"{spec.name} is a 2022 method: use make_suite")
        secret = password.encode("utf-8") if isinstance(password, str) else password
        self.spec = spec
        self._key = evp_bytes_to_key(secret, spec.key_size)

    @classmethod
    def from_key(cls, method: str, key: bytes) -> CipherSuite:
        """A suite from a raw master key (libev's `--key`, already decoded)."""
        spec = lookup_method(method)
        if spec.family == "aead2022":
            raise ConfigError("key", f"{spec.name} takes its base64 key as the password (-k), not --key")
        if len(key) != spec.key_size:
            raise ConfigError(
                "key",
                f"{spec.name} needs a {spec.key_size}-byte key, got {len(key)} bytes",
            )
        suite = cls.__new__(cls)
        suite.spec = spec
        suite._key = bytes(key)
        return suite

    def __repr__(self) -> str:
        # Never show the key: suites end up in logs and tracebacks.
        return f"<CipherSuite method={self.spec.name!r}>"

    def _fresh_salt(self, salt: bytes | None) -> bytes:
        size = self.spec.salt_size
        if salt is None:
            return os.urandom(size)
        if len(salt) != size:
            raise ValueError(f"{self.spec.name} salt must be {size} bytes, not {len(salt)}")
        return bytes(salt)

    def tcp_encryptor(self, salt: bytes | None = None) -> TcpEncryptor:
        """A new sending direction; `salt` fixes the salt/IV (tests only)."""
        spec = self.spec
        salt = self._fresh_salt(salt)
        if spec.family == "aead":
            return _aead.AeadTcpEncryptor(_aead.AEAD_PRIMITIVES[spec.name], self._key, salt)
        if spec.family == "stream":
            return _stream.StreamTcpEncryptor(_stream.STREAM_CIPHERS[spec.name], self._key, salt)
        return PlainTcpEncryptor()

    def tcp_decryptor(self) -> TcpDecryptor:
        """A new receiving direction."""
        spec = self.spec
        if spec.family == "aead":
            return _aead.AeadTcpDecryptor(
                _aead.AEAD_PRIMITIVES[spec.name], self._key, spec.salt_size
            )
        if spec.family == "stream":
            return _stream.StreamTcpDecryptor(
                _stream.STREAM_CIPHERS[spec.name], self._key, spec.salt_size
            )
        return PlainTcpDecryptor()

    def client_codec(self) -> "LegacyClientCodec":
        """The local end's codec for one new TCP connection."""
        return LegacyClientCodec(self)

    def server_codec(self, salt_filter: object = None) -> "LegacyServerCodec":
        """The server's codec for one new TCP connection; `salt_filter` refuses replayed salts."""
        return LegacyServerCodec(self, salt_filter)

    def udp_client_codec(self) -> "LegacyUdpClientCodec":
        """The local end's codec for one application's datagrams."""
        return LegacyUdpClientCodec(self)

    def udp_seal(self, plaintext: bytes, salt: bytes | None = None) -> bytes:
        """One encrypted datagram; `salt` fixes the salt/IV (tests only)."""
        spec = self.spec
        salt = self._fresh_salt(salt)
        if spec.family == "aead":
            return _aead.aead_udp_seal(
                _aead.AEAD_PRIMITIVES[spec.name], self._key, salt, plaintext
            )
        if spec.family == "stream":
            return _stream.stream_udp_seal(
                _stream.STREAM_CIPHERS[spec.name], self._key, salt, plaintext
            )
        return bytes(plaintext)

    def udp_open(self, packet: bytes) -> bytes:
        """The plaintext of one datagram; AuthenticationError/ProtocolError if bad."""
        spec = self.spec
        if spec.family == "aead":
            return _aead.aead_udp_open(
                _aead.AEAD_PRIMITIVES[spec.name], self._key, spec.salt_size, packet
            )
        if spec.family == "stream":
            return _stream.stream_udp_open(
                _stream.STREAM_CIPHERS[spec.name], self._key, spec.salt_size, packet
            )
        return bytes(packet)
