"""
AEAD-2017 framing (SIP004/SIP007, wire.md §6): TCP chunk codec and UDP packets.

This is the hot path of every AEAD connection: each byte a relay forwards goes
through `AeadTcpEncryptor.encrypt` on one side and `AeadTcpDecryptor.decrypt`
on the other, so both keep Python-level work per chunk to a minimum (an AEAD
object built per call from the kept subkey, an integer nonce, memoryview
slices instead of copies, one join per call).  The decryptor's chunk loop
is `_chunks.AeadChunkDecoder`, shared with the 2022 edition.

Each method names its AEAD and its nonce width: 12 bytes, except libev's
`xchacha20-ietf-poly1305`, whose counter is 24 bytes wide (wire.md §6.2)
and whose AEAD is `_xchacha`'s, the one the 2022 edition's UDP uses too.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple, Protocol, Union

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ssx.crypto._chunks import TAG_SIZE, AeadChunkDecoder, Open
from ssx.crypto._kdf import _SHA1, SUBKEY_INFO, derive_subkey
from ssx.crypto._xchacha import XChaCha20Poly1305
from ssx.errors import AuthenticationError, ProtocolError

__all__ = [
    "AEAD_PRIMITIVES",
    "AeadAlgorithm",
    "AeadTcpEncryptor",
    "AeadTcpDecryptor",
    "aead_udp_seal",
    "aead_udp_open",
    "aead_udp_sealer",
    "aead_udp_opener",
    "UdpSeal",
    "UdpOpen",
    "MAX_PAYLOAD",
    "TAG_SIZE",
]

AeadPrimitive = Union[AESGCM, ChaCha20Poly1305, XChaCha20Poly1305]
AeadFactory = Callable[[bytes], AeadPrimitive]


class AeadAlgorithm(NamedTuple):
    """An AEAD-2017 method's cipher: its constructor from a subkey, and its nonce width."""

    factory: AeadFactory
    nonce_size: int = 12


AEAD_PRIMITIVES: dict[str, AeadAlgorithm] = {
    "aes-128-gcm": AeadAlgorithm(AESGCM),
    "aes-192-gcm": AeadAlgorithm(AESGCM),
    "aes-256-gcm": AeadAlgorithm(AESGCM),
    "chacha20-ietf-poly1305": AeadAlgorithm(ChaCha20Poly1305),
    "xchacha20-ietf-poly1305": AeadAlgorithm(XChaCha20Poly1305, 24),
}

class UdpSeal(Protocol):
    """Seals one datagram; `salt` None means a fresh one (a given salt is for tests)."""

    def __call__(self, plaintext: bytes, salt: bytes | None = None) -> bytes: ...


#: Opens one datagram: packet -> plaintext (AuthenticationError/ProtocolError).
UdpOpen = Callable[[bytes], bytes]

# The top two bits of the length are reserved (SIP004), hence 14 bits.
MAX_PAYLOAD = 0x3FFF


class AeadTcpEncryptor:
    """One direction of an AEAD TCP stream, sending side."""

    __slots__ = ("_factory", "_width", "_subkey", "_nonce", "_salt", "salt")

    def __init__(self, algorithm: AeadAlgorithm, master_key: bytes, salt: bytes) -> None:
        #: The salt this direction sends (for replay filters and tests).
        self.salt = salt
        self._salt = salt  # emptied once sent
        # Only the subkey is kept: an OpenSSL AEAD context costs about 2.5 KiB,
        # which an idle connection should not hold (building one per call,
        # that is per read, costs under a microsecond).
        self._factory = algorithm.factory
        self._width = algorithm.nonce_size
        # `derive_subkey(master_key, salt)`, written out: one call fewer per connection.
        self._subkey = HKDF(algorithm=_SHA1, length=len(master_key), salt=salt, info=SUBKEY_INFO).derive(master_key)
        self._nonce = 0

    def encrypt(self, data: bytes) -> bytes:
        """Frame `data` into chunks; the first output carries the salt."""
        # Measured faster than encrypt_into slices of one preallocated
        # bytearray: that costs a zero-fill plus a final bytes() copy, while
        # join copies once and the per-seal allocations are cheap.
        size = len(data)
        if not size:
            return b""
        seal = self._factory(self._subkey).encrypt
        width = self._width
        nonce = self._nonce
        salt = self._salt
        if salt:
            self._salt = b""
        if size <= MAX_PAYLOAD:
            # One chunk: by far the commonest write on interactive traffic.
            self._nonce = nonce + 2
            return b"".join(
                (
                    salt,
                    seal(nonce.to_bytes(width, "little"), size.to_bytes(2, "big"), None),
                    seal((nonce + 1).to_bytes(width, "little"), data, None),
                )
            )
        parts = [salt]
        append = parts.append
        source = memoryview(data)
        for start in range(0, size, MAX_PAYLOAD):
            piece = source[start : start + MAX_PAYLOAD]
            append(seal(nonce.to_bytes(width, "little"), len(piece).to_bytes(2, "big"), None))
            append(seal((nonce + 1).to_bytes(width, "little"), piece, None))
            nonce += 2
        self._nonce = nonce
        return b"".join(parts)


class AeadTcpDecryptor(AeadChunkDecoder):
    """
    One direction of an AEAD TCP stream, receiving side: the salt, then
    chunks (the loop is `AeadChunkDecoder`'s).

    Strict per the spec's recommendation: a zero or over-long length is an
    error, as is any failed tag.
    """

    __slots__ = ("_factory", "_master_key", "_salt_size", "_subkey", "salt")

    _MIN_LENGTH = 1
    _MAX_LENGTH = MAX_PAYLOAD

    def __init__(self, algorithm: AeadAlgorithm, master_key: bytes, salt_size: int) -> None:
        super().__init__(salt_size, algorithm.nonce_size)
        self._factory = algorithm.factory
        self._master_key = master_key
        self._salt_size = salt_size
        # The subkey once the salt arrived; the AEAD context is built per call
        # (see AeadTcpEncryptor) so that idle connections do not hold one.
        self._subkey: bytes | None = None
        #: The peer's salt once received (for replay filters), else None.
        self.salt: bytes | None = None

    def _opener(self) -> Open | None:
        subkey = self._subkey
        return None if subkey is None else self._factory(subkey).decrypt

    def _read_header(self, view: memoryview, parts: list[bytes]) -> int:
        size = self._salt_size
        if len(view) < size:
            self._need = size
            return 0
        salt = bytes(view[:size])
        master_key = self._master_key
        # `derive_subkey(master_key, salt)`, written out: one call fewer per connection.
        self._subkey = HKDF(algorithm=_SHA1, length=len(master_key), salt=salt, info=SUBKEY_INFO).derive(master_key)
        self.salt = salt
        return size


def aead_udp_seal(
    algorithm: AeadAlgorithm, master_key: bytes, salt: bytes, plaintext: bytes
) -> bytes:
    """`salt || seal(subkey, zero nonce, plaintext)` (wire.md §6.4)."""
    aead = algorithm.factory(derive_subkey(master_key, salt))
    return salt + aead.encrypt(bytes(algorithm.nonce_size), plaintext, None)


def aead_udp_open(
    algorithm: AeadAlgorithm, master_key: bytes, salt_size: int, packet: bytes
) -> bytes:
    """Inverse of `aead_udp_seal`."""
    if len(packet) < salt_size + TAG_SIZE:
        raise ProtocolError(f"AEAD UDP packet too short ({len(packet)} bytes)")
    view = memoryview(packet)
    aead = algorithm.factory(derive_subkey(master_key, bytes(view[:salt_size])))
    try:
        return aead.decrypt(bytes(algorithm.nonce_size), view[salt_size:], None)
    except InvalidTag:
        raise AuthenticationError("AEAD tag mismatch in UDP packet") from None


# The per-datagram path: one suite seals and opens every datagram of a port
# with the same master key, so everything but the salt is bound once here
# (the AEAD factory, the zero nonce, the key derivation), and a datagram
# costs one HKDF, one AEAD object and one seal or open.


def given_salt(salt: bytes, size: int, name: str) -> bytes:
    """A salt (or IV) a caller chose for a datagram, as bytes, after checking its size (the sealers' shared check)."""
    if len(salt) != size:
        raise ValueError(f"{name} salt must be {size} bytes, not {len(salt)}")
    return bytes(salt)


def aead_udp_sealer(algorithm: AeadAlgorithm, master_key: bytes, salt_size: int, name: str) -> UdpSeal:
    """`aead_udp_seal` with everything but the salt and plaintext bound; a fresh salt when none is given."""
    factory = algorithm.factory
    nonce = bytes(algorithm.nonce_size)
    length = len(master_key)
    urandom = os.urandom

    def seal(plaintext: bytes, salt: bytes | None = None) -> bytes:
        salt = urandom(salt_size) if salt is None else given_salt(salt, salt_size, name)
        # `derive_subkey`, written out: one call fewer per datagram.
        subkey = HKDF(algorithm=_SHA1, length=length, salt=salt, info=SUBKEY_INFO).derive(master_key)
        return salt + factory(subkey).encrypt(nonce, plaintext, None)

    return seal


def aead_udp_opener(algorithm: AeadAlgorithm, master_key: bytes, salt_size: int) -> UdpOpen:
    """`aead_udp_open` with everything but the packet bound."""
    factory = algorithm.factory
    nonce = bytes(algorithm.nonce_size)
    length = len(master_key)
    shortest = salt_size + TAG_SIZE

    def open_(packet: bytes) -> bytes:
        if len(packet) < shortest:
            raise ProtocolError(f"AEAD UDP packet too short ({len(packet)} bytes)")
        # `derive_subkey`, written out: one call fewer per datagram.
        # bytes() of a bytes object is that object: a copy only for other buffers.
        salt = bytes(packet[:salt_size])
        aead = factory(HKDF(algorithm=_SHA1, length=length, salt=salt, info=SUBKEY_INFO).derive(master_key))
        try:
            # Slicing (one copy) measured cheaper than a memoryview up to
            # MTU-sized datagrams, the common case.
            return aead.decrypt(nonce, packet[salt_size:], None)
        except InvalidTag:
            raise AuthenticationError("AEAD tag mismatch in UDP packet") from None

    return open_
