"""
The chunk stream of Shadowsocks 2022 TCP (wire.md §7.2): what follows the
headers in both directions, ``seal(u16 len) || seal(payload)``.

`_2022_tcp` builds its four header-aware codecs on the two bases here.  This
is the hot path of every 2022 connection, so it keeps Python-level work per
chunk small: one AEAD object per direction, an integer nonce that continues
from the header chunks, payloads up to 0xFFFF bytes, memoryview slices
instead of copies and one join per call.
"""

from __future__ import annotations

from typing import Callable

from cryptography.exceptions import InvalidTag

from ssx.errors import AuthenticationError, ProtocolError

__all__ = [
    "ChunkEncoder",
    "ChunkDecoder",
    "seal_chunks",
    "nonce_bytes",
    "MAX_CHUNK",
    "TAG_SIZE",
]

_Open = Callable[[bytes, "bytes | memoryview", None], bytes]
_Seal = Callable[[bytes, "bytes | memoryview", None], bytes]

TAG_SIZE = 16
#: Largest payload of one chunk (the 0x3FFF cap of AEAD-2017 does not apply).
MAX_CHUNK = 0xFFFF

_LENGTH_BLOCK = 2 + TAG_SIZE


def nonce_bytes(counter: int) -> bytes:
    """The 12-byte little-endian AEAD nonce for `counter`."""
    return counter.to_bytes(12, "little")


def seal_chunks(
    seal: _Seal, nonce: int, data: bytes | memoryview, parts: list[bytes]
) -> int:
    """Append the chunks of `data` to `parts`; return the next nonce."""
    size = len(data)
    if size <= MAX_CHUNK:
        parts.append(seal(nonce_bytes(nonce), size.to_bytes(2, "big"), None))
        parts.append(seal(nonce_bytes(nonce + 1), data, None))
        return nonce + 2
    source = memoryview(data)
    for start in range(0, size, MAX_CHUNK):
        piece = source[start : start + MAX_CHUNK]
        parts.append(seal(nonce_bytes(nonce), len(piece).to_bytes(2, "big"), None))
        parts.append(seal(nonce_bytes(nonce + 1), piece, None))
        nonce += 2
    return nonce


class ChunkEncoder:
    """The chunk stream after a header; shared by both encoders."""

    __slots__ = ("_seal", "_nonce")

    _seal: _Seal | None
    _nonce: int

    def encrypt(self, data: bytes) -> bytes:
        """Frame `data` as chunks of at most 0xFFFF bytes (b"" for b"")."""
        if not data:
            return b""
        seal = self._seal
        if seal is None:
            raise RuntimeError("the 2022 header has not been sent yet")
        parts: list[bytes] = []
        self._nonce = seal_chunks(seal, self._nonce, data, parts)
        return b"".join(parts)


class ChunkDecoder:
    """
    Buffering and the chunk loop shared by both decoders.

    Subclasses parse their header in `_read_header`; once it sets `_open`
    the rest of the stream is length/payload chunks.  Any error kills the
    decoder: its nonce is out of step and the peer must be dropped.
    """

    __slots__ = ("_open", "_nonce", "_length", "_need", "_buffer", "_dead")

    def __init__(self, need: int) -> None:
        self._open: _Open | None = None
        self._nonce = 0
        # Payload length whose length block is already opened, or -1.
        self._length = -1
        # Bytes the buffer must hold before anything can be opened, so a
        # small segment that completes nothing costs one append.
        self._need = need
        self._buffer = bytearray()
        self._dead = False

    def decrypt(self, data: bytes) -> bytes:
        """The plaintext completed by `data` (possibly b""); ProtocolError if bad."""
        if self._dead:
            raise ProtocolError("2022 stream already failed")
        buffer = self._buffer
        if len(buffer) + len(data) < self._need:
            buffer += data
            return b""
        try:
            return self._decrypt(buffer, data)
        except InvalidTag:
            self._dead = True
            raise AuthenticationError("2022 AEAD tag mismatch") from None
        except BaseException:
            self._dead = True
            raise

    def _read_header(self, view: memoryview, parts: list[bytes]) -> int:
        """Consume header bytes from `view`; return how many; set `_need`."""
        raise NotImplementedError

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
            if self._open is None:
                position = self._read_header(view, parts)
            open_ = self._open
            if open_ is not None:
                nonce = self._nonce
                length = self._length
                try:
                    while True:
                        if length < 0:
                            end = position + _LENGTH_BLOCK
                            if end > total:
                                break
                            length = int.from_bytes(
                                open_(nonce_bytes(nonce), view[position:end], None), "big"
                            )
                            nonce += 1
                            position = end
                        end = position + length + TAG_SIZE
                        if end > total:
                            break
                        append(open_(nonce_bytes(nonce), view[position:end], None))
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


