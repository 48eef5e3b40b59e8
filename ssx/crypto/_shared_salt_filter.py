"""
The replay filter of `SaltFilter`, shared by the worker processes of one
server (`--workers`): its two Bloom filters, their keys and the count of
the active one live in a file every worker maps, and each check-and-add
holds an exclusive `fcntl.lockf` lock on it, so a salt seen by one worker
is refused by all, whichever the kernel hands a replay to.

The supervisor makes the file (`create`: in /dev/shm where there is one,
unlinked at once, so nothing is left behind whatever ends the processes)
and passes its descriptor to each worker; the file lives while any of them
holds it.  So a worker's restart forgets nothing; the supervisor's
(a new server) forgets every salt, as a single process's restart does.
No Twisted here.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import tempfile
from typing import Iterator

from ssx.crypto._salt_filter import _BLOCK, DEFAULT_HISTORY, SaltFilter

__all__ = ["SharedSaltFilter"]

# active index, active count, then the two 32-byte keys.
_HEADER = struct.Struct("<QQ32s32s")
_HEADER_SIZE = 128


class _SharedBloom:
    """One Bloom filter's bits, a view into the shared mapping."""

    __slots__ = ("bits",)

    def __init__(self, bits: memoryview) -> None:
        self.bits = bits


class SharedSaltFilter(SaltFilter):
    """`SaltFilter` over a shared file (`create` makes it; each worker maps it from its descriptor)."""

    def __init__(self, fd: int, capacity: int = DEFAULT_HISTORY, false_positive_rate: float = 1e-6) -> None:
        # The base class sizes the filters; its own memory is let go at once.
        super().__init__(capacity, false_positive_rate)
        size = self._blocks * _BLOCK
        self._fd = fd
        self._map = mmap.mmap(fd, _HEADER_SIZE + 2 * size)
        view = memoryview(self._map)
        self._views = (view[_HEADER_SIZE:_HEADER_SIZE + size], view[_HEADER_SIZE + size:])
        _, _, self._key, self._mark_key = _HEADER.unpack_from(self._map, 0)
        self._active = self._old = _SharedBloom(self._views[0])  # type: ignore[assignment]

    @classmethod
    def create(cls, capacity: int = DEFAULT_HISTORY, false_positive_rate: float = 1e-6) -> int:
        """A new, empty, unlinked shared file for `capacity` salts, with fresh keys: its descriptor."""
        sizing = SaltFilter(capacity, false_positive_rate)
        size = sizing._blocks * _BLOCK
        directory = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
        fd, path = tempfile.mkstemp(prefix="ssx-salts-", dir=directory)
        os.unlink(path)
        os.ftruncate(fd, _HEADER_SIZE + 2 * size)
        os.pwrite(fd, _HEADER.pack(0, 0, os.urandom(32), os.urandom(32)), 0)
        return fd

    @contextlib.contextmanager
    def _locked(self) -> Iterator[tuple[memoryview, memoryview]]:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            active = struct.unpack_from("<Q", self._map, 0)[0]
            yield self._views[active], self._views[1 - active]
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def check_and_add(self, salt: bytes) -> bool:
        if self._is_own(salt):
            self.replays += 1
            return False
        offset, mask = self._locate(salt)
        end = offset + _BLOCK
        with self._locked() as blooms:
            for bits in blooms:
                if int.from_bytes(bits[offset:end], "little") & mask == mask:
                    self.replays += 1
                    return False
            self._set_locked(blooms[0], offset, mask)
        return True

    def remembers(self, salt: bytes) -> bool:
        offset, mask = self._locate(salt)
        end = offset + _BLOCK
        with self._locked() as blooms:
            return any(int.from_bytes(bits[offset:end], "little") & mask == mask for bits in blooms)

    def add(self, salt: bytes) -> None:
        offset, mask = self._locate(salt)
        with self._locked() as blooms:
            self._set_locked(blooms[0], offset, mask)

    def _set_locked(self, bits: memoryview, offset: int, mask: int) -> None:
        active, count = struct.unpack_from("<QQ", self._map, 0)
        if count >= self._half:
            active, count = 1 - active, 0
            bits = self._views[active]
            bits[:] = bytes(len(bits))
        end = offset + _BLOCK
        bits[offset:end] = (int.from_bytes(bits[offset:end], "little") | mask).to_bytes(_BLOCK, "little")
        struct.pack_into("<QQ", self._map, 0, active, count + 1)

    @property
    def memory(self) -> int:
        return len(self._views[0]) + len(self._views[1])
