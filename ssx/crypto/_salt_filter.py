"""
Replay protection for the stream and AEAD-2017 editions: which salts (IVs)
the server has seen.

Two Bloom filters in turn ("ping-pong", as shadowsocks-libev and -rust do):
salts go into the active one; when it holds half the configured history it
becomes the old one and a cleared filter takes over, so the last
`capacity / 2` to `capacity` salts are always remembered in a fixed amount
of memory (about 4.2 MiB for the default million at a one-in-a-million
false-positive rate).  Bit positions come from a keyed BLAKE2b, so nobody
can aim salts at chosen bits; the same digest carries the mark of the
server's own salts (`own_salt`), so a salt costs one keyed hash.  The 2022
edition uses an exact pool instead (its timestamps bound the history).  No
Twisted here.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import sys
from contextlib import AbstractContextManager
from functools import reduce
from operator import and_, or_
from typing import Any

__all__ = ["DEFAULT_HISTORY", "MARK_SIZE", "SaltFilter"]

DEFAULT_HISTORY = 1_000_000
# The server's own salts carry a keyed mark this long (a client salt matches
# one by chance once in 2**32); only salts this long or longer are marked.
MARK_SIZE = 4
MARKED_MIN = 16
# Where a salt's digest holds its bit positions (after the mark and the block).
_POSITIONS = MARK_SIZE + 4


class _Bloom:
    __slots__ = ("bits", "count")

    def __init__(self, size_bytes: int) -> None:
        self.bits = bytearray(size_bytes)
        self.count = 0

    def clear(self) -> None:
        self.bits[:] = bytes(len(self.bits))
        self.count = 0


# A blocked Bloom filter: all of a salt's bits fall in one 1024-bit block, so
# testing and setting them is one integer mask operation, not k lookups.
_BLOCK = 128  # bytes
_BLOCK_BITS = _BLOCK * 8
_BIT = [1 << i for i in range(_BLOCK_BITS)]


class SaltFilter:
    """Remembers between `capacity/2` and `capacity` recent salts."""

    # Held around each look-up and change of the filters: one process's
    # filter needs nothing (None: no `with` on every salt); the one
    # --workers share locks its file.
    _lock: AbstractContextManager[Any] | None = None

    def __init__(self, capacity: int = DEFAULT_HISTORY, false_positive_rate: float = 1e-6, marks: bool = True) -> None:
        if capacity < 2:
            raise ValueError("capacity must be at least 2")
        self.capacity = capacity
        half = capacity // 2
        # Blocks fill unevenly, which costs a blocked filter about a tenfold
        # in false positives: size it for a tenth of the configured rate.
        bits = -half * math.log(false_positive_rate / 10) / (math.log(2) ** 2)
        self._blocks = max(1, math.ceil(bits / _BLOCK_BITS))
        self._hashes = min(28, max(1, round(bits / half * math.log(2))))
        # One keyed digest per salt: the mark of the server's own salts (its
        # first MARK_SIZE bytes), 4 bytes choosing the block, then 2 per bit
        # position (at most 64 bytes: BLAKE2b's longest).
        self._layout = f"<{self._hashes}H"
        # One 1023 per position: `map(and_, positions, _low_bits)` keeps each
        # in its block's 1024 bits without a Python-level loop.
        self._low_bits = (_BLOCK_BITS - 1,) * self._hashes
        self._half = half
        # Salts this long or longer may carry the server's mark, in their
        # last MARK_SIZE bytes, which the digest leaves out.  A filter of
        # other byte strings (`marks=False`: SessionWindows' session names)
        # hashes every byte.
        self._marked_min = MARKED_MIN if marks else sys.maxsize
        self._active = _Bloom(self._blocks * _BLOCK)
        self._old = _Bloom(self._blocks * _BLOCK)
        self._use_key(os.urandom(32))
        self.replays = 0

    @property
    def memory(self) -> int:
        """Bytes held by the two filters."""
        return len(self._active.bits) + len(self._old.bits)

    def _use_key(self, key: bytes) -> None:
        """Hash salts with `key` from now on."""
        # Copied for each salt: cheaper than keying a new hash object.
        self._hasher = hashlib.blake2b(key=key, digest_size=_POSITIONS + 2 * self._hashes)

    def _digest(self, salt: bytes) -> bytes:
        """The keyed digest of a salt: of all but its mark's place where it is long enough to carry one."""
        hasher = self._hasher.copy()
        hasher.update(salt[:-MARK_SIZE] if len(salt) >= self._marked_min else salt)
        return hasher.digest()

    def _locate(self, salt: bytes) -> tuple[int, int]:
        """The byte offset of the salt's block and the mask of its bits there."""
        digest = self._digest(salt)
        offset = (int.from_bytes(digest[MARK_SIZE:_POSITIONS], "little") % self._blocks) * _BLOCK
        positions = struct.unpack_from(self._layout, digest, _POSITIONS)
        # The OR of each position's bit, every step in C (this runs for
        # every connection and every datagram).
        return offset, reduce(or_, map(_BIT.__getitem__, map(and_, positions, self._low_bits)))

    def own_salt(self, size: int) -> bytes:
        """
        A fresh salt for this server's own stream or datagram, recognised
        if it ever comes back (a reflected response is a replay): its last
        bytes are a keyed mark of the rest, which outsiders cannot tell from
        random.  Short IVs (8 bytes) would lose too much randomness to a
        mark; those are random and remembered in the filter instead.
        """
        if size >= self._marked_min:
            head = os.urandom(size - MARK_SIZE)
            # `_digest`, inline: this runs for every connection.
            hasher = self._hasher.copy()
            hasher.update(head)
            return head + hasher.digest()[:MARK_SIZE]
        salt = os.urandom(size)
        self.add(salt)
        return salt

    def check_and_add(self, salt: bytes) -> bool:
        """True if `salt` is new (and now remembered); False for a replay."""
        # This runs for every connection and every datagram, so `_digest`,
        # the own-mark check and `_locate` are written out here, and `_lock`
        # is entered only where there is one (a filter shared by workers).
        hasher = self._hasher.copy()
        if len(salt) >= self._marked_min:
            hasher.update(salt[:-MARK_SIZE])
            digest = hasher.digest()
            if digest[:MARK_SIZE] == salt[-MARK_SIZE:]:
                self.replays += 1
                return False
        else:
            hasher.update(salt)
            digest = hasher.digest()
        offset = (int.from_bytes(digest[MARK_SIZE:_POSITIONS], "little") % self._blocks) * _BLOCK
        positions = struct.unpack_from(self._layout, digest, _POSITIONS)
        mask = reduce(or_, map(_BIT.__getitem__, map(and_, positions, self._low_bits)))
        lock = self._lock
        if lock is None:
            new = self._check_and_set(offset, mask)
        else:
            with lock:
                new = self._check_and_set(offset, mask)
        if not new:
            self.replays += 1
        return new

    def _check_and_set(self, offset: int, mask: int) -> bool:
        """Set the bits of `mask` at `offset` unless a filter holds them all (under `_lock`): whether it set them."""
        # `_holds` on this process's own two filters, written out (the
        # shared filter, whose bits live elsewhere, overrides this).
        end = offset + _BLOCK
        if (
            int.from_bytes(self._active.bits[offset:end], "little") & mask == mask
            or int.from_bytes(self._old.bits[offset:end], "little") & mask == mask
        ):
            return False
        self._set(offset, mask)
        return True

    def remembers(self, salt: bytes) -> bool:
        """Whether `salt` was added (up to the false positive rate), without adding it."""
        offset, mask = self._locate(salt)
        lock = self._lock
        if lock is None:
            return self._holds(offset, mask)
        with lock:
            return self._holds(offset, mask)

    def add(self, salt: bytes) -> None:
        """Remember `salt` without checking it (the server's own outgoing salts)."""
        offset, mask = self._locate(salt)
        lock = self._lock
        if lock is None:
            self._set(offset, mask)
            return
        with lock:
            self._set(offset, mask)

    def _filters(self) -> tuple[bytearray | memoryview, bytearray | memoryview]:
        """The active filter's bits, then the old one's (under `_lock`)."""
        return self._active.bits, self._old.bits

    def _holds(self, offset: int, mask: int) -> bool:
        end = offset + _BLOCK
        active, old = self._filters()
        # Both filters written out (not a generator over them): one call fewer per salt.
        return (
            int.from_bytes(active[offset:end], "little") & mask == mask
            or int.from_bytes(old[offset:end], "little") & mask == mask
        )

    def _set(self, offset: int, mask: int) -> None:
        active = self._active
        if active.count >= self._half:
            self._old, self._active = active, self._old
            self._active.clear()
            active = self._active
        end = offset + _BLOCK
        bits = active.bits
        bits[offset:end] = (int.from_bytes(bits[offset:end], "little") | mask).to_bytes(_BLOCK, "little")
        active.count += 1
