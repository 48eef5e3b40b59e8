"""
Replay protection for the stream and AEAD-2017 editions: which salts (IVs)
the server has seen.

Two Bloom filters in turn ("ping-pong", as shadowsocks-libev and -rust do):
salts go into the active one; when it holds half the configured history it
becomes the old one and a cleared filter takes over, so the last
`capacity / 2` to `capacity` salts are always remembered in a fixed amount
of memory (about 3.6 MiB for the default million at a one-in-a-million
false-positive rate).  Bit positions come from a keyed BLAKE2b, so nobody
can aim salts at chosen bits.  The 2022 edition uses an exact pool instead
(its timestamps bound the history).  No Twisted here.
"""

from __future__ import annotations

import hashlib
import math
import os

__all__ = ["DEFAULT_HISTORY", "SaltFilter"]

DEFAULT_HISTORY = 1_000_000


class _Bloom:
    __slots__ = ("bits", "count")

    def __init__(self, size_bits: int) -> None:
        self.bits = bytearray((size_bits + 7) // 8)
        self.count = 0

    def clear(self) -> None:
        self.bits[:] = bytes(len(self.bits))
        self.count = 0


class SaltFilter:
    """Remembers between `capacity/2` and `capacity` recent salts."""

    def __init__(self, capacity: int = DEFAULT_HISTORY, false_positive_rate: float = 1e-6) -> None:
        if capacity < 2:
            raise ValueError("capacity must be at least 2")
        self.capacity = capacity
        half = capacity // 2
        size = math.ceil(-half * math.log(false_positive_rate) / (math.log(2) ** 2))
        self._size = size
        self._hashes = max(1, round(size / half * math.log(2)))
        self._half = half
        self._active = _Bloom(size)
        self._old = _Bloom(size)
        self._keys = [os.urandom(32) for _ in range((self._hashes + 15) // 16)]
        self.replays = 0

    @property
    def memory(self) -> int:
        """Bytes held by the two filters."""
        return len(self._active.bits) + len(self._old.bits)

    def _positions(self, salt: bytes) -> list[int]:
        # Independent positions (four digest bytes each) from keyed BLAKE2b:
        # as many 64-byte digests as the hash count needs, each keyed apart.
        size = self._size
        digest = b"".join(
            hashlib.blake2b(salt, key=key, digest_size=64).digest() for key in self._keys
        )
        return [int.from_bytes(digest[4 * i : 4 * i + 4], "little") % size for i in range(self._hashes)]

    @staticmethod
    def _has(bloom: _Bloom, positions: list[int]) -> bool:
        bits = bloom.bits
        for p in positions:
            if not bits[p >> 3] & (1 << (p & 7)):
                return False
        return True

    def check_and_add(self, salt: bytes) -> bool:
        """True if `salt` is new (and now remembered); False for a replay."""
        positions = self._positions(salt)
        if self._has(self._active, positions) or self._has(self._old, positions):
            self.replays += 1
            return False
        self.add_positions(positions)
        return True

    def add(self, salt: bytes) -> None:
        """Remember `salt` without checking it (the server's own outgoing salts)."""
        self.add_positions(self._positions(salt))

    def add_positions(self, positions: list[int]) -> None:
        active = self._active
        if active.count >= self._half:
            self._old, self._active = active, self._old
            self._active.clear()
            active = self._active
        bits = active.bits
        for p in positions:
            bits[p >> 3] |= 1 << (p & 7)
        active.count += 1

