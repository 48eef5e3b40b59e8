"""
Legacy stream-cipher framing (wire.md §5): `IV || E(stream)`, no integrity.

Used only when a user explicitly picks a stream method for compatibility with
old peers.  Each TCP direction is one continuous cipher context; each UDP
packet gets its own IV and context.  The cipher contexts come from
`cryptography` (the CFB modes, Camellia, Blowfish and ARC4 from its
`decrepit` package, which is where they now live without warnings), except
Salsa20, which `cryptography` lacks: that one is pycryptodome's, behind the
same encryptor()/decryptor() face.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Protocol

from Crypto.Cipher import Salsa20
from cryptography.hazmat.decrepit.ciphers.algorithms import ARC4, Blowfish, Camellia
from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers.algorithms import AES, ChaCha20
from cryptography.hazmat.primitives.ciphers.modes import CTR

from ssx.crypto._aead import UdpSeal, given_salt
from ssx.errors import ProtocolError

__all__ = [
    "STREAM_CIPHERS",
    "StreamTcpEncryptor",
    "StreamTcpDecryptor",
    "stream_udp_seal",
    "stream_udp_open",
    "stream_udp_sealer",
    "stream_udp_opener",
]



class StreamContext(Protocol):
    """One running keystream: cryptography's CipherContext, as far as we use it."""

    def update(self, data: bytes | memoryview) -> bytes: ...


class StreamCipher(Protocol):
    """A keyed stream cipher with its IV: cryptography's Cipher, as far as we use it."""

    def encryptor(self) -> StreamContext: ...

    def decryptor(self) -> StreamContext: ...


StreamCipherFactory = Callable[[bytes, bytes], StreamCipher]


def _aes_cfb(key: bytes, iv: bytes) -> Cipher:
    return Cipher(AES(key), CFB(iv))


def _aes_ctr(key: bytes, iv: bytes) -> Cipher:
    return Cipher(AES(key), CTR(iv))


def _camellia_cfb(key: bytes, iv: bytes) -> Cipher:
    return Cipher(Camellia(key), CFB(iv))


def _blowfish_cfb(key: bytes, iv: bytes) -> Cipher:
    return Cipher(Blowfish(key), CFB(iv))


def _chacha20_ietf(key: bytes, iv: bytes) -> Cipher:
    # cryptography takes state words 12..15: a 32-bit counter, then the IV.
    return Cipher(ChaCha20(key, bytes(4) + iv), None)


def _chacha20_djb(key: bytes, iv: bytes) -> Cipher:
    # DJB layout: a 64-bit counter in words 12..13, then the 8-byte IV.
    return Cipher(ChaCha20(key, bytes(8) + iv), None)


class _Salsa20:
    """pycryptodome's Salsa20/20 (64-bit nonce and counter) as a `StreamCipher`."""

    __slots__ = ("_encrypt",)

    def __init__(self, key: bytes, iv: bytes) -> None:
        # Encryption and decryption are the same keystream XOR.
        self._encrypt = Salsa20.new(key=key, nonce=iv).encrypt

    def update(self, data: bytes | memoryview) -> bytes:
        return self._encrypt(data)

    def encryptor(self) -> _Salsa20:
        return self

    def decryptor(self) -> _Salsa20:
        return self


def _rc4_md5(key: bytes, iv: bytes) -> Cipher:
    # Mixing the IV into the key is what gives each connection its own keystream.
    return Cipher(ARC4(hashlib.md5(key + iv).digest()), None)


STREAM_CIPHERS: dict[str, StreamCipherFactory] = {
    "aes-128-cfb": _aes_cfb,
    "aes-192-cfb": _aes_cfb,
    "aes-256-cfb": _aes_cfb,
    "aes-128-ctr": _aes_ctr,
    "aes-192-ctr": _aes_ctr,
    "aes-256-ctr": _aes_ctr,
    "camellia-128-cfb": _camellia_cfb,
    "camellia-192-cfb": _camellia_cfb,
    "camellia-256-cfb": _camellia_cfb,
    "chacha20-ietf": _chacha20_ietf,
    "chacha20": _chacha20_djb,
    "salsa20": _Salsa20,
    "rc4-md5": _rc4_md5,
    "bf-cfb": _blowfish_cfb,
}


class StreamTcpEncryptor:
    """One direction of a stream-cipher TCP connection, sending side."""

    __slots__ = ("_update", "_iv", "salt")

    def __init__(self, factory: StreamCipherFactory, key: bytes, iv: bytes) -> None:
        self.salt = iv
        self._iv = iv  # emptied once sent
        self._update = factory(key, iv).encryptor().update

    def encrypt(self, data: bytes) -> bytes:
        """Encrypt `data`; the first non-empty output starts with the IV."""
        if not data:
            return b""
        iv = self._iv
        if iv:
            self._iv = b""
            return iv + self._update(data)
        return self._update(data)


class StreamTcpDecryptor:
    """One direction of a stream-cipher TCP connection, receiving side."""

    __slots__ = ("_factory", "_key", "_iv_size", "_update", "_pending_iv", "salt")

    def __init__(self, factory: StreamCipherFactory, key: bytes, iv_size: int) -> None:
        self._factory = factory
        self._key = key
        self._iv_size = iv_size
        self._update: Callable[[bytes], bytes] | None = None
        self._pending_iv = bytearray()
        #: The peer's IV once received (for replay filters), else None.
        self.salt: bytes | None = None

    def decrypt(self, data: bytes) -> bytes:
        """Decrypt `data`, holding bytes back until the whole IV is in."""
        update = self._update
        if update is not None:
            return update(data)
        pending = self._pending_iv
        pending += data
        if len(pending) < self._iv_size:
            return b""
        iv = bytes(pending[: self._iv_size])
        rest = bytes(pending[self._iv_size :])
        del pending[:]
        self.salt = iv
        self._update = update = self._factory(self._key, iv).decryptor().update
        return update(rest) if rest else b""


def stream_udp_seal(
    factory: StreamCipherFactory, key: bytes, iv: bytes, plaintext: bytes
) -> bytes:
    """`IV || E(plaintext)` with a context of its own (wire.md §5.1)."""
    return iv + factory(key, iv).encryptor().update(plaintext)


def stream_udp_open(
    factory: StreamCipherFactory, key: bytes, iv_size: int, packet: bytes
) -> bytes:
    """Inverse of `stream_udp_seal`."""
    if len(packet) < iv_size:
        raise ProtocolError(f"stream UDP packet too short ({len(packet)} bytes)")
    view = memoryview(packet)
    return factory(key, bytes(view[:iv_size])).decryptor().update(view[iv_size:])


def stream_udp_sealer(factory: StreamCipherFactory, key: bytes, iv_size: int, name: str) -> UdpSeal:
    """`stream_udp_seal` with the cipher and key bound; a fresh IV when none is given."""
    urandom = os.urandom

    def seal(plaintext: bytes, salt: bytes | None = None) -> bytes:
        salt = urandom(iv_size) if salt is None else given_salt(salt, iv_size, name)
        return salt + factory(key, salt).encryptor().update(plaintext)

    return seal


def stream_udp_opener(factory: StreamCipherFactory, key: bytes, iv_size: int) -> Callable[[bytes], bytes]:
    """`stream_udp_open` with the cipher and key bound."""

    def open_(packet: bytes) -> bytes:
        if len(packet) < iv_size:
            raise ProtocolError(f"stream UDP packet too short ({len(packet)} bytes)")
        return factory(key, bytes(packet[:iv_size])).decryptor().update(packet[iv_size:])

    return open_
