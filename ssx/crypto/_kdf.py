"""
Key derivation for the stream and AEAD-2017 methods (wire.md §4).

`CipherSuite` turns the configured password into the master key once with
`evp_bytes_to_key`; every AEAD TCP direction and every AEAD UDP packet then
derives its own subkey from that master key and its salt with `derive_subkey`.

Every AEAD datagram has a salt of its own, so the UDP path runs one HKDF
per datagram: `subkey_deriver` binds the master key and the hash object
once, leaving one `HKDF(...).derive` per salt (`_aead`'s datagram
sealer and opener write that call out, one Python call fewer).  cryptography's HKDF
(implemented in Rust) measured faster here than HKDF composed from its
`hmac.HMAC` (three HMAC objects per 32-byte subkey): about 3.4 against
7 microseconds per subkey (the standard library's `hmac.digest`: 7.7).
It stays the largest single cost of a datagram's Python work
(`benchmarks/udp_path.py`), and it is inherent: every datagram has a
salt, so a subkey, of its own.
"""

from __future__ import annotations

import hashlib
from typing import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["evp_bytes_to_key", "hkdf_sha1", "derive_subkey", "subkey_deriver", "SUBKEY_INFO"]

SUBKEY_INFO = b"ss-subkey"

# One hash description for every derivation, not one per datagram.
_SHA1 = hashes.SHA1()


def evp_bytes_to_key(password: bytes, key_len: int) -> bytes:
    """
    OpenSSL's EVP_BytesToKey with MD5, one iteration and no salt.

    Only the key part is produced: py computes the OpenSSL IV too but never
    uses it, so peers agree on these bytes alone.
    """
    material = b""
    block = b""
    while len(material) < key_len:
        block = hashlib.md5(block + password).digest()
        material += block
    return material[:key_len]


def hkdf_sha1(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF with SHA-1."""
    return HKDF(algorithm=_SHA1, length=length, salt=salt, info=info).derive(ikm)


def derive_subkey(master_key: bytes, salt: bytes) -> bytes:
    """The AEAD-2017 session subkey: as long as the master key (SIP007)."""
    # `hkdf_sha1(master_key, salt, SUBKEY_INFO, len(master_key))`, one call
    # fewer: every TCP connection derives two.
    return HKDF(algorithm=_SHA1, length=len(master_key), salt=salt, info=SUBKEY_INFO).derive(master_key)


def subkey_deriver(master_key: bytes) -> Callable[[bytes], bytes]:
    """`derive_subkey` with `master_key` bound: salt -> subkey, for the per-datagram path."""
    length = len(master_key)

    def derive(salt: bytes) -> bytes:
        return HKDF(algorithm=_SHA1, length=length, salt=salt, info=SUBKEY_INFO).derive(master_key)

    return derive
