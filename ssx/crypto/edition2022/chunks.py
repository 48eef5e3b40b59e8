"""
The chunk stream of Shadowsocks 2022 TCP (wire.md §7.2): what follows the
headers in both directions, ``seal(u16 len) || seal(payload)``.

`tcp` builds its four header-aware codecs on the two bases here (the
decoding loop itself is `ssx.crypto._chunks`, shared with AEAD-2017).  This is the hot
path of every 2022 connection, so it keeps Python-level work per chunk
small: one AEAD object per direction, an integer nonce that continues from
the header chunks, payloads up to 0xFFFF bytes, one join per call.
"""

from __future__ import annotations

from typing import Callable

from ssx.crypto._chunks import TAG_SIZE, AeadChunkDecoder, Open

__all__ = [
    "Aead2022ChunkEncoder",
    "Aead2022ChunkDecoder",
    "seal_chunks",
    "nonce_bytes",
    "MAX_CHUNK",
    "TAG_SIZE",
]

_Seal = Callable[[bytes, "bytes | memoryview", None], bytes]

#: Largest payload of one chunk (the 0x3FFF cap of AEAD-2017 does not apply).
MAX_CHUNK = 0xFFFF


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


class Aead2022ChunkEncoder:
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


class Aead2022ChunkDecoder(AeadChunkDecoder):
    """
    The chunk stream after a 2022 header; the base of both decoders.

    Subclasses parse their header in `_read_header`; once it sets `_open`
    the rest of the stream is length/payload chunks of up to 0xFFFF bytes.
    """

    __slots__ = ("_open",)

    _EDITION = "2022 AEAD"

    def __init__(self, need: int) -> None:
        super().__init__(need)
        self._open: Open | None = None

    def _opener(self) -> Open | None:
        return self._open
