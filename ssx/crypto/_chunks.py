"""
The receiving side of an AEAD chunk stream, ``seal(u16 len) || seal(payload)``
after some header: what AEAD-2017 (wire.md §6.2, after the salt) and 2022
(§7.2, after the request or response header) have in common.

This is the hot path of every AEAD connection, so the loop keeps Python-level
work per chunk small: an integer nonce, memoryview slices instead of copies,
a copy of the caller's bytes only for a leftover tail, one join per call.
"""

from __future__ import annotations

from typing import Callable

from cryptography.exceptions import InvalidTag

from ssx.errors import AuthenticationError, ProtocolError

__all__ = ["AeadChunkDecoder", "Open", "TAG_SIZE"]

Open = Callable[[bytes, "bytes | memoryview", None], bytes]

TAG_SIZE = 16
_LENGTH_BLOCK = 2 + TAG_SIZE


class AeadChunkDecoder:
    """
    Buffering and the chunk loop; accepts any fragmentation.

    A subclass consumes what precedes the chunks in `_read_header` (which
    returns how many bytes it used and may set `_need`, `_nonce` and
    `_length`), and `_opener` returns the AEAD's open function once that
    header is complete (None before).  A chunk length outside
    `_MIN_LENGTH`..`_MAX_LENGTH` is an error, as is any failed tag; after an
    error the decoder refuses further input, since its nonce is out of step.
    """

    __slots__ = ("_nonce", "_width", "_length", "_need", "_buffer", "_dead")

    #: Names the edition in error messages.
    _EDITION = "AEAD"
    _MIN_LENGTH = 0
    _MAX_LENGTH = 0xFFFF

    def __init__(self, need: int, nonce_size: int = 12) -> None:
        self._nonce = 0
        # The nonce counter's width in bytes (24 for AEAD-2017's xchacha).
        self._width = nonce_size
        # Payload length whose length block is already opened, or -1.
        self._length = -1
        # Bytes the buffer must hold before anything can be opened, so a
        # small segment that completes nothing costs one append.
        self._need = need
        self._buffer = bytearray()
        self._dead = False

    def _opener(self) -> Open | None:
        raise NotImplementedError

    def _read_header(self, view: memoryview, parts: list[bytes]) -> int:
        """Consume header bytes from `view`; return how many."""
        raise NotImplementedError

    def decrypt(self, data: bytes) -> bytes:
        """The plaintext completed by `data` (possibly b""); ProtocolError if bad."""
        if self._dead:
            raise ProtocolError(f"{self._EDITION} stream already failed")
        buffer = self._buffer
        if len(buffer) + len(data) < self._need:
            buffer += data
            return b""
        try:
            return self._decrypt(buffer, data)
        except InvalidTag:
            self._dead = True
            raise AuthenticationError(f"{self._EDITION} tag mismatch") from None
        except BaseException:
            self._dead = True
            raise

    def _decrypt(self, buffer: bytearray, data: bytes) -> bytes:
        if buffer:
            buffer += data
            source: bytes | bytearray = buffer
        else:
            # Fast path: read the caller's bytes, copy only a leftover tail.
            source = data
        total = len(source)
        parts: list[bytes] = []
        append = parts.append
        with memoryview(source) as view:
            position = 0
            open_ = self._opener()
            if open_ is None:
                position = self._read_header(view, parts)
                open_ = self._opener()
            if open_ is not None:
                low, high = self._MIN_LENGTH, self._MAX_LENGTH
                nonce = self._nonce
                width = self._width
                length = self._length
                try:
                    while True:
                        if length < 0:
                            end = position + _LENGTH_BLOCK
                            if end > total:
                                break
                            length = int.from_bytes(
                                open_(nonce.to_bytes(width, "little"), view[position:end], None), "big"
                            )
                            nonce += 1
                            if not low <= length <= high:
                                raise ProtocolError(f"bad {self._EDITION} chunk length {length}")
                            position = end
                        end = position + length + TAG_SIZE
                        if end > total:
                            break
                        append(open_(nonce.to_bytes(width, "little"), view[position:end], None))
                        nonce += 1
                        position = end
                        length = -1
                finally:
                    self._nonce = nonce
                    self._length = length
                self._need = length + TAG_SIZE if length >= 0 else _LENGTH_BLOCK
        if source is buffer:
            del buffer[:position]
        elif position < total:
            buffer += memoryview(data)[position:]
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)
