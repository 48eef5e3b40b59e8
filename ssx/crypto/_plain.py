"""
The `none` method (alias `plain`): no encryption, no IV, bytes pass through.

Useful behind a tunnel that already encrypts (or for debugging); it slots into
the same encryptor/decryptor seam as the real ciphers so the relays do not
special-case it.
"""

from __future__ import annotations

__all__ = ["PlainTcpEncryptor", "PlainTcpDecryptor"]


class PlainTcpEncryptor:
    """Identity "encryptor" for the none method."""

    __slots__ = ("salt",)

    def __init__(self) -> None:
        self.salt = b""

    def encrypt(self, data: bytes) -> bytes:
        """Return `data` unchanged (as bytes)."""
        return bytes(data)


class PlainTcpDecryptor:
    """Identity "decryptor" for the none method."""

    __slots__ = ("salt",)

    def __init__(self) -> None:
        self.salt: bytes | None = b""

    def decrypt(self, data: bytes) -> bytes:
        """Return `data` unchanged (as bytes)."""
        return bytes(data)
