"""
Files that hold secrets (a TLS private key, the server's ss:// URL, a QR
code of it), written so that nobody else can read them and so that a
symbolic link planted at the path is never followed.

`write_file` creates a fresh temporary file beside the target with
O_CREAT|O_EXCL|O_NOFOLLOW and its final mode from the start (never a wider
mode that a chmod narrows later), then renames it over the target: a link
at the target is replaced, its own target left as it was.  (Where the
target must not be replaced, the target itself is created with O_EXCL.)  `read_private_file`
reads back such a file only if it is still a private regular file of ours
(root included: a file another user planted in a directory they can write
is theirs, whatever it says).
No Twisted here.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Collection

__all__ = ["NotPrivateError", "read_private_file", "write_file"]

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class NotPrivateError(OSError):
    """A file that should hold a secret is not a regular file that only its owner, us, can read."""


def write_file(path: str, data: bytes, mode: int = 0o600, replace: bool = True) -> None:
    """
    Write `data` to `path` with permissions `mode` (0600 unless said).  With
    `replace`, all or nothing, over whatever `path` was; without, an
    existing `path` (even a dangling link) is FileExistsError.
    """
    if not replace:
        # O_EXCL fails on any existing name and never follows a link.
        fd = os.open(path, _CREATE, mode)
        try:
            _fill(fd, data, mode)
        except BaseException:
            os.unlink(path)
            raise
        return
    directory, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temporary, _CREATE, mode)
    try:
        _fill(fd, data, mode)
        # rename() replaces a link at `path` itself, never what it points to.
        os.rename(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _fill(fd: int, data: bytes, mode: int) -> None:
    """Write all of `data` to the new file `fd`, flush it to disk and close it."""
    try:
        # The umask may have narrowed `mode` at creation: set it exactly,
        # which can only widen it up to what was asked (cert.pem's 0644).
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_private_file(path: str, limit: int = 65536, owners: Collection[int] = ()) -> bytes:
    """
    Up to `limit` bytes of `path`, if it is a regular file (not a link),
    owned by the effective user or one of `owners` (root is no exception)
    and closed to group and others; NotPrivateError if not, other OSErrors
    as they come.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        # The messages leave the path to the caller, which names it anyway.
        if not stat.S_ISREG(info.st_mode):
            raise NotPrivateError("not a regular file")
        if info.st_mode & 0o077 or info.st_uid not in (os.geteuid(), *owners):
            raise NotPrivateError("open to other users, or owned by another")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit)
    finally:
        os.close(fd)
