"""
Key derivation for the stream and AEAD-2017 methods (wire.md §4).

`CipherSuite` turns the configured password into the master key once with
`evp_bytes_to_key`; every AEAD TCP direction and every AEAD UDP packet then
derives its own subkey from that master key and its salt with `derive_subkey`.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["evp_bytes_to_key", "hkdf_sha1", "derive_subkey", "SUBKEY_INFO"]

SUBKEY_INFO = b"ss-subkey"


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
    return HKDF(
        algorithm=hashes.SHA1(), length=length, salt=salt, info=info
    ).derive(ikm)


def derive_subkey(master_key: bytes, salt: bytes) -> bytes:
    """The AEAD-2017 session subkey: as long as the master key (SIP007)."""
    return hkdf_sha1(master_key, salt, SUBKEY_INFO, len(master_key))
