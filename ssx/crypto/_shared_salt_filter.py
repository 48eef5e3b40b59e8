"""
The replay filter of `SaltFilter`, shared by the worker processes of one
server (`--workers`): its two Bloom filters, their key and the count of
the active one live in a file every worker maps, and each check-and-add
holds an exclusive `fcntl.lockf` lock on it (the base class's checks,
under its `_lock`), so a salt seen by one worker
is refused by all, whichever the kernel hands a replay to.

The supervisor makes the file (`create`: in /dev/shm where there is one,
unlinked at once, so nothing is left behind whatever ends the processes)
and passes its descriptor to each worker; the file lives while any of them
holds it.  So a worker's restart forgets nothing; the supervisor's
(a new server) forgets every salt, as a single process's restart does.
No Twisted here.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import tempfile

from ssx.crypto._salt_filter import _BLOCK, DEFAULT_HISTORY, SaltFilter

__all__ = ["SharedSaltFilter"]

# active index, active count, the 32-byte key salts are hashed with, then
# the layout's name: a worker of another ssx version (code upgraded on disk
# under a running supervisor) must not read the filters another way.
_HEADER = struct.Struct("<QQ32s8s")
_LAYOUT = b"ssxslt02"

_HEADER_SIZE = 128


class _SharedBloom:
    """One Bloom filter's bits, a view into the shared mapping."""

    __slots__ = ("bits",)

    def __init__(self, bits: memoryview) -> None:
        self.bits = bits


class _FileLock:
    """An exclusive `fcntl.lockf` lock on the shared file while held (`with`)."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)


class SharedSaltFilter(SaltFilter):
    """`SaltFilter` over a shared file (`create` makes it; each worker maps it from its descriptor)."""

    def __init__(self, fd: int, capacity: int = DEFAULT_HISTORY, false_positive_rate: float = 1e-6) -> None:
        # The base class sizes the filters; its own memory is let go at once.
        super().__init__(capacity, false_positive_rate)
        size = self._blocks * _BLOCK
        self._fd = fd
        self._map = mmap.mmap(fd, _HEADER_SIZE + 2 * size)
        _, _, key, layout = _HEADER.unpack_from(self._map, 0)
        if layout != _LAYOUT:
            self._map.close()
            raise ValueError("the shared replay filter was made by another version of ssx: restart the server")
        self._use_key(key)
        view = memoryview(self._map)
        self._views = (view[_HEADER_SIZE:_HEADER_SIZE + size], view[_HEADER_SIZE + size:])
        self._active = self._old = _SharedBloom(self._views[0])  # type: ignore[assignment]
        self._lock = _FileLock(fd)

    @classmethod
    def create(cls, capacity: int = DEFAULT_HISTORY, false_positive_rate: float = 1e-6) -> int:
        """A new, empty, unlinked shared file for `capacity` salts, with a fresh key: its descriptor."""
        sizing = SaltFilter(capacity, false_positive_rate)
        size = sizing._blocks * _BLOCK
        directory = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
        fd, path = tempfile.mkstemp(prefix="ssx-salts-", dir=directory)
        os.unlink(path)
        os.ftruncate(fd, _HEADER_SIZE + 2 * size)
        os.pwrite(fd, _HEADER.pack(0, 0, os.urandom(32), _LAYOUT), 0)
        return fd

    def _check_and_set(self, offset: int, mask: int) -> bool:
        # The base class's, through `_filters` (the active one is named in the file).
        if self._holds(offset, mask):
            return False
        self._set(offset, mask)
        return True

    def _filters(self) -> tuple[memoryview, memoryview]:
        active = struct.unpack_from("<Q", self._map, 0)[0]
        return self._views[active], self._views[1 - active]

    def _set(self, offset: int, mask: int) -> None:
        active, count = struct.unpack_from("<QQ", self._map, 0)
        if count >= self._half:
            active, count = 1 - active, 0
            self._views[active][:] = bytes(len(self._views[active]))
        bits = self._views[active]
        end = offset + _BLOCK
        bits[offset:end] = (int.from_bytes(bits[offset:end], "little") | mask).to_bytes(_BLOCK, "little")
        struct.pack_into("<QQ", self._map, 0, active, count + 1)

    @property
    def memory(self) -> int:
        return len(self._views[0]) + len(self._views[1])
