"""
What the benchmark sends, and how what comes back is checked.

Every figure of the suite moves bytes whose content both ends can predict, so
a chain that corrupts, truncates or short-circuits them fails its figure
instead of reporting a fast number:

* Bulk streams are a request header followed by frames (a 4-byte big-endian
  length, then that many bytes) and a zero-length end frame.  Frame ``i``
  carries a 1 MiB window of a seeded random pattern at an offset that moves
  with ``i``, so no two neighbouring frames are alike and the sender takes
  each one as a zero-copy slice.  The receiver hashes (SHA-256, hardware
  accelerated here) every byte after the header; `StreamDigests` computes
  the digest the sender's ``k`` frames must have, so a transfer of any
  length can be checked after it ends.
* Request/reply exchanges (connection rate, idle connections, UDP) send a
  100-byte request; the reply is `reply_for(request)`, a byte-wise
  substitution read backwards, so an echo or a proxy that answers itself
  does not pass.

* Paced bulk streams carry the same frames, but the sender keeps at most
  `PACED_WINDOW` bytes beyond what the receiver has acknowledged (the
  receiver sends an `ACK` every `PACED_ACK_EVERY` bytes it has read), so the
  chain relays a stream that its receiver drains as it arrives instead of a
  saturated one (`PacedSender`, `AckingReceiver`).

`targets.py` (the far end) and `load.py` (the clients) share this module,
and `run.py` checks digests with it.  Its only I/O is on blocking sockets
handed to it: `send_frame`, `PacedSender` and `AckingReceiver`.
"""

from __future__ import annotations

import hashlib
import random
import socket
import struct
from typing import Callable

__all__ = [
    "BULK_MAGIC",
    "BULK_REQUEST_SIZE",
    "BLOCK_SIZE",
    "END_FRAME",
    "FrameScanner",
    "MODE_DOWNLOAD",
    "MODE_HOLD",
    "MODE_PACED_DOWNLOAD",
    "MODE_PACED_UPLOAD",
    "MODE_REPLY",
    "MODE_UPLOAD",
    "AckingReceiver",
    "PACED_ACK_EVERY",
    "PACED_WINDOW",
    "PacedSender",
    "Pattern",
    "REQUEST_SIZE",
    "StreamDigests",
    "UPLOAD_REPLY",
    "bulk_request",
    "make_request",
    "parse_bulk_request",
    "recv_exactly",
    "reply_for",
    "request_from_reply",
    "send_frame",
]

BULK_MAGIC = b"SXB1"
MODE_UPLOAD = b"U"
MODE_DOWNLOAD = b"D"
# The same, paced by the receiver's acknowledgements.
MODE_PACED_UPLOAD = b"u"
MODE_PACED_DOWNLOAD = b"d"
_BULK_MODES = (MODE_UPLOAD, MODE_DOWNLOAD, MODE_PACED_UPLOAD, MODE_PACED_DOWNLOAD)
# magic, mode, duration in ms, frame cap, pattern seed
_BULK_REQUEST = struct.Struct("!4scIII")
BULK_REQUEST_SIZE = _BULK_REQUEST.size

BLOCK_SIZE = 1 << 20
# An odd pattern length and stride keep frames from lining up with any
# power-of-two buffer size in the chain.
_PATTERN_SIZE = 4 * BLOCK_SIZE + 61
_STRIDE = BLOCK_SIZE + 7
_FRAME_HEADER = struct.Struct("!I")
END_FRAME = _FRAME_HEADER.pack(0)
# What the bulk sink answers after the end frame: SHA-256 of everything it
# read after the request header, the number of data frames, the byte count.
UPLOAD_REPLY = struct.Struct("!32sQQ")

# Paced streams: the sender keeps at most PACED_WINDOW bytes unacknowledged
# and writes PACED_SLICE bytes at a time; the receiver acknowledges every
# PACED_ACK_EVERY bytes with ACK_TAG + the count of stream bytes read so far.
# A paced upload's final answer is REPLY_TAG + UPLOAD_REPLY.
PACED_WINDOW = 512 * 1024
PACED_SLICE = 64 * 1024
PACED_ACK_EVERY = 64 * 1024
ACK_TAG, REPLY_TAG = b"A", b"R"
_ACK = struct.Struct("!cQ")

REQUEST_SIZE = 100
MODE_REPLY = b"R"  # answer, then close (the connection-rate exchange)
MODE_HOLD = b"H"  # answer, then stay open until the client closes (idle memory)

_FORWARD = bytes((b * 7 + 3) & 0xFF for b in range(256))
_BACKWARD = bytes(_FORWARD.index(b) for b in range(256))


class Pattern:
    """The seeded random bytes the bulk frames are cut from."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        data = random.Random(seed).randbytes(_PATTERN_SIZE)
        # Doubled so that every window is one contiguous slice.
        self._view = memoryview(data + data)

    def frame(self, index: int) -> tuple[bytes, memoryview]:
        """The header and payload of data frame `index` (no copy)."""
        start = (index * _STRIDE) % _PATTERN_SIZE
        return _FRAME_HEADER.pack(BLOCK_SIZE), self._view[start : start + BLOCK_SIZE]

    @staticmethod
    def stream_size(frames: int) -> int:
        """Bytes after the request header for `frames` data frames and the end frame."""
        return frames * (_FRAME_HEADER.size + BLOCK_SIZE) + len(END_FRAME)


class FrameScanner:
    """
    Follows frame boundaries in a bulk stream read in arbitrary pieces.

    `feed` returns True once the end frame has been read; bytes after it, or
    a frame longer than `BLOCK_SIZE`, raise ValueError.
    """

    def __init__(self) -> None:
        self.frames = 0  # data frames seen
        self.total = 0  # bytes fed
        self._remaining = 0  # bytes left in the current frame's body
        self._header = b""  # a frame header split across reads
        self.ended = False

    def feed(self, chunk: memoryview) -> bool:
        if self.ended:
            raise ValueError("bytes after the end frame")
        size = len(chunk)
        self.total += size
        position = 0
        while position < size:
            if self._remaining:
                step = min(self._remaining, size - position)
                self._remaining -= step
                position += step
                continue
            take = min(4 - len(self._header), size - position)
            self._header += chunk[position : position + take]
            position += take
            if len(self._header) < 4:
                break
            length = int.from_bytes(self._header, "big")
            self._header = b""
            if length == 0:
                if position != size:
                    raise ValueError("bytes after the end frame")
                self.ended = True
                return True
            if length > BLOCK_SIZE:
                raise ValueError(f"frame of {length} bytes")
            self.frames += 1
            self._remaining = length
        return False


def send_frame(sock: socket.socket, header: bytes, body: memoryview) -> None:
    """One frame onto a blocking socket, in one system call where it fits."""
    sent = sock.sendmsg([header, body])
    if sent < len(header):
        sock.sendall(header[sent:])
        sent = len(header)
    sent -= len(header)
    if sent < len(body):
        sock.sendall(body[sent:])


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Exactly `size` bytes from a blocking socket; ConnectionError if it closes first."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


class PacedSender:
    """
    Sends frames of `pattern` in `PACED_SLICE` pieces onto a blocking socket,
    never more than `PACED_WINDOW` bytes past the receiver's last `ACK`.
    """

    def __init__(self, sock: socket.socket, pattern: Pattern) -> None:
        self._sock = sock
        self._pattern = pattern
        self.sent = 0  # stream bytes sent (after the request header)
        self.acked = 0  # stream bytes the receiver said it has read
        self.frames = 0

    def send(self, deadline: float, max_frames: int, clock: Callable[[], float]) -> None:
        """Frames until `deadline` or `max_frames`, then the end frame."""
        while self.frames < max_frames and clock() < deadline:
            header, body = self._pattern.frame(self.frames)
            self._send_piece(header + bytes(body[: PACED_SLICE - len(header)]))
            for start in range(PACED_SLICE - len(header), len(body), PACED_SLICE):
                self._send_piece(body[start : start + PACED_SLICE])
            self.frames += 1
        self._send_piece(END_FRAME)

    def _send_piece(self, piece: bytes | memoryview) -> None:
        while self.sent + len(piece) - self.acked > PACED_WINDOW:
            self.read_answer()
        self._sock.sendall(piece)
        self.sent += len(piece)

    def read_answer(self) -> bytes | None:
        """Reads one acknowledgement (None) or the final reply (its body)."""
        tag = recv_exactly(self._sock, 1)
        if tag == ACK_TAG:
            self.acked = _ACK.unpack(tag + recv_exactly(self._sock, _ACK.size - 1))[1]
            return None
        if tag == REPLY_TAG:
            return recv_exactly(self._sock, UPLOAD_REPLY.size)
        raise ValueError(f"unexpected answer {tag!r} in a paced stream")


class AckingReceiver:
    """Reads a bulk stream, hashing it, and acknowledges every `PACED_ACK_EVERY` bytes."""

    def __init__(self, sock: socket.socket, read_size: int) -> None:
        self._sock = sock
        self._buffer = bytearray(read_size)
        self.digest = hashlib.sha256()
        self.scanner = FrameScanner()

    def receive(self) -> None:
        """Until the end frame; ConnectionError if the stream ends before it."""
        view = memoryview(self._buffer)
        acked = 0
        while True:
            n = self._sock.recv_into(self._buffer)
            if not n:
                raise ConnectionError(f"paced stream ended before its end frame, after {self.scanner.total} bytes")
            chunk = view[:n]
            self.digest.update(chunk)
            if self.scanner.feed(chunk):
                return
            if self.scanner.total - acked >= PACED_ACK_EVERY:
                acked = self.scanner.total
                self._sock.sendall(_ACK.pack(ACK_TAG, acked))


class StreamDigests:
    """
    SHA-256 of the first ``k`` frames plus the end frame, for any ``k``.

    Digests are computed once, incrementally, and kept: a suite run hashes
    the pattern stream only as far as its longest transfer.
    """

    def __init__(self, pattern: Pattern) -> None:
        self._pattern = pattern
        self._running = hashlib.sha256()
        self._digests = [self._closed(self._running)]

    @staticmethod
    def _closed(running: "hashlib._Hash") -> bytes:
        final = running.copy()
        final.update(END_FRAME)
        return final.digest()

    def digest(self, frames: int) -> bytes:
        """The digest a receiver must report after `frames` data frames."""
        while len(self._digests) <= frames:
            header, payload = self._pattern.frame(len(self._digests) - 1)
            self._running.update(header)
            self._running.update(payload)
            self._digests.append(self._closed(self._running))
        return self._digests[frames]


def bulk_request(mode: bytes, seconds: float, max_frames: int, seed: int) -> bytes:
    """The header a bulk client sends first."""
    return _BULK_REQUEST.pack(BULK_MAGIC, mode, int(seconds * 1000), max_frames, seed)


def parse_bulk_request(header: bytes) -> tuple[bytes, float, int, int]:
    """(mode, seconds, max_frames, seed) from a bulk header; ValueError if bad."""
    magic, mode, millis, max_frames, seed = _BULK_REQUEST.unpack(header)
    if magic != BULK_MAGIC or mode not in _BULK_MODES:
        raise ValueError("not a bulk request")
    return mode, millis / 1000, max_frames, seed


def make_request(mode: bytes, serial: int, salt: int = 0) -> bytes:
    """A 100-byte request: mode byte, serial number, filler that varies with both."""
    head = mode + serial.to_bytes(8, "big") + salt.to_bytes(4, "big")
    filler_seed = (serial * 2654435761 + salt) & 0xFFFFFFFF
    filler = filler_seed.to_bytes(4, "big") * ((REQUEST_SIZE - len(head)) // 4 + 1)
    return (head + filler)[:REQUEST_SIZE]


def reply_for(request: bytes) -> bytes:
    """What the far end answers to `request`."""
    return request.translate(_FORWARD)[::-1]


def request_from_reply(reply: bytes) -> bytes:
    """Inverse of `reply_for` (to read the serial number out of a UDP reply)."""
    return reply[::-1].translate(_BACKWARD)
