"""
XChaCha20-Poly1305, built from `cryptography`'s ChaCha20 and ChaCha20-Poly1305.

Both editions use it: AEAD-2017's `xchacha20-ietf-poly1305` method (libev's;
wire.md §6.1, a 24-byte nonce counter) through `_aead`, and the 2022 edition
to seal `2022-blake3-chacha20-poly1305` UDP packets (§7.7).
XChaCha20-Poly1305 is ChaCha20-Poly1305 under the subkey
HChaCha20(key, nonce[0:16]) with the nonce ``00000000 || nonce[16:24]``.
HChaCha20 is the ChaCha20 block function without the final addition of the
input state; a ChaCha20 keystream block is that function plus the input, so
subtracting the known input words from the library's block gives HChaCha20:
no cipher rounds are written here.  Checked against the published vectors
(draft-irtf-cfrg-xchacha-03, test-vectors.md §3.4).  No Twisted here.
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

__all__ = ["XChaCha20Poly1305", "hchacha20"]

_CONSTANTS = struct.unpack("<4I", b"expand 32-byte k")
_ZEROS = bytes(64)


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """The 32-byte HChaCha20 subkey of `key` for the first 16 nonce bytes."""
    # cryptography's 16-byte ChaCha20 nonce is state words 12..15, as
    # HChaCha20's input is; one block of keystream is rounds(state) + state.
    block = Cipher(algorithms.ChaCha20(key, nonce16), mode=None).encryptor().update(_ZEROS)
    out = struct.unpack("<16I", block)
    state = _CONSTANTS + struct.unpack("<8I", key) + struct.unpack("<4I", nonce16)
    words = [(out[i] - state[i]) & 0xFFFFFFFF for i in (0, 1, 2, 3, 12, 13, 14, 15)]
    return struct.pack("<8I", *words)


class XChaCha20Poly1305:
    """The AEAD with a 24-byte nonce; same interface as cryptography's AEAD classes."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("XChaCha20-Poly1305 keys are 32 bytes")
        self._key = bytes(key)

    def _aead(self, nonce: bytes) -> tuple[ChaCha20Poly1305, bytes]:
        if len(nonce) != 24:
            raise ValueError("XChaCha20-Poly1305 nonces are 24 bytes")
        return ChaCha20Poly1305(hchacha20(self._key, bytes(nonce[:16]))), b"\x00\x00\x00\x00" + bytes(nonce[16:])

    def encrypt(self, nonce: bytes, data: bytes | memoryview, associated_data: bytes | None) -> bytes:
        aead, inner = self._aead(nonce)
        return aead.encrypt(inner, data, associated_data)

    def decrypt(self, nonce: bytes, data: bytes | memoryview, associated_data: bytes | None) -> bytes:
        """Raises cryptography's InvalidTag on a bad tag."""
        aead, inner = self._aead(nonce)
        return aead.decrypt(inner, data, associated_data)
