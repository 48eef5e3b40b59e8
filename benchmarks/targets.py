"""
The far end of every chain: where the proxies connect to.

One process, started once per suite run (``python targets.py --seed N``),
listens on 127.0.0.1 and prints its ports as one JSON line when ready:

* ``bulk`` (TCP, a blocking thread per connection: one bulk connection at a
  time is all the suite makes, and plain ``recv_into``/``sendmsg`` on 1 MiB
  and 256 KiB buffers is the cheapest Python can do).  An upload is read to
  its end frame while hashed, then answered with `payload.UPLOAD_REPLY`; a
  download is sent frame by frame until its duration or frame cap is spent.
  Paced modes do the same with acknowledgements (`payload.PacedSender`,
  `payload.AckingReceiver`).
* ``rr`` (TCP, asyncio on uvloop): reads one 100-byte request, answers
  `payload.reply_for` it, then closes (mode R) or holds the connection open
  until the client closes (mode H).  The target closes first so TIME_WAIT
  sockets land on listening ports, not on the ephemeral range.
* ``udp`` (a blocking thread): answers each datagram with `reply_for` it.

It stops itself after ``--lifetime`` seconds, on SIGTERM, or when its
standard input closes (its parent is gone).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time

import payload

_READ_SIZE = 256 * 1024
_IDLE_LIMIT = 60.0  # a bulk peer silent this long is dropped


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed during the request header")
        data += chunk
    return data


class BulkServer:
    """Upload sink and download source; one thread per connection."""

    def __init__(self, patterns: dict[int, payload.Pattern]) -> None:
        self._patterns = patterns
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)

    def serve_forever(self) -> None:
        while True:
            conn, _ = self.listener.accept()
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(_IDLE_LIMIT)
            try:
                mode, seconds, max_frames, seed = payload.parse_bulk_request(
                    _recv_exactly(conn, payload.BULK_REQUEST_SIZE)
                )
                if mode == payload.MODE_UPLOAD:
                    self._sink(conn)
                elif mode == payload.MODE_DOWNLOAD:
                    self._source(conn, self._pattern(seed), seconds, max_frames)
                elif mode == payload.MODE_PACED_UPLOAD:
                    receiver = payload.AckingReceiver(conn, _READ_SIZE)
                    receiver.receive()
                    conn.sendall(payload.REPLY_TAG + payload.UPLOAD_REPLY.pack(
                        receiver.digest.digest(), receiver.scanner.frames, receiver.scanner.total))
                else:
                    sender = payload.PacedSender(conn, self._pattern(seed))
                    sender.send(time.monotonic() + seconds, max_frames, time.monotonic)
                # Let the client close first, then wait for its FIN.
                while conn.recv(_READ_SIZE):
                    pass
            except (OSError, ValueError) as e:
                print(f"targets: bulk connection dropped: {e!r}", file=sys.stderr, flush=True)

    def _pattern(self, seed: int) -> payload.Pattern:
        if seed not in self._patterns:
            self._patterns[seed] = payload.Pattern(seed)
        return self._patterns[seed]

    @staticmethod
    def _sink(conn: socket.socket) -> None:
        buffer = bytearray(_READ_SIZE)
        view = memoryview(buffer)
        digest = hashlib.sha256()
        scanner = payload.FrameScanner()
        while True:
            n = conn.recv_into(buffer)
            if not n:
                raise ConnectionError("upload ended before its end frame")
            chunk = view[:n]
            digest.update(chunk)
            if scanner.feed(chunk):
                conn.sendall(payload.UPLOAD_REPLY.pack(digest.digest(), scanner.frames, scanner.total))
                return

    @staticmethod
    def _source(conn: socket.socket, pattern: payload.Pattern, seconds: float, max_frames: int) -> None:
        deadline = time.monotonic() + seconds
        frames = 0
        while frames < max_frames and time.monotonic() < deadline:
            header, body = pattern.frame(frames)
            payload.send_frame(conn, header, body)
            frames += 1
        conn.sendall(payload.END_FRAME)


class UdpEcho:
    """Answers every datagram with `payload.reply_for` it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind(("127.0.0.1", 0))

    def serve_forever(self) -> None:
        recvfrom, sendto, reply_for = self.sock.recvfrom, self.sock.sendto, payload.reply_for
        while True:
            data, peer = recvfrom(2048)
            try:
                sendto(reply_for(data), peer)
            except OSError:
                pass


class RequestReply(asyncio.Protocol):
    """One rr connection: a 100-byte request in, its reply out."""

    def __init__(self, held: set) -> None:
        self._held = held
        self._buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) < payload.REQUEST_SIZE:
            return
        request, self._buffer = self._buffer, b""
        if len(request) != payload.REQUEST_SIZE:
            self.transport.abort()
            return
        self.transport.write(payload.reply_for(request))
        if request[:1] == payload.MODE_HOLD:
            self._held.add(self)
        else:
            self.transport.close()

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, exc: Exception | None) -> None:
        self._held.discard(self)


async def _serve_rr(ready: asyncio.Future, lifetime: float) -> None:
    loop = asyncio.get_running_loop()
    held: set = set()
    server = await loop.create_server(lambda: RequestReply(held), "127.0.0.1", 0, backlog=1024)
    ready.set_result(server.sockets[0].getsockname()[1])
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, lambda: stop.done() or stop.set_result(None))
    loop.add_reader(sys.stdin.fileno(), lambda: _stdin_closed(stop))
    try:
        await asyncio.wait_for(stop, lifetime)
    except asyncio.TimeoutError:
        print("targets: lifetime over, stopping", file=sys.stderr, flush=True)
    server.close()


def _stdin_closed(stop: asyncio.Future) -> None:
    if not os.read(sys.stdin.fileno(), 4096) and not stop.done():
        stop.set_result(None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, required=True, help="seed of the bulk pattern")
    parser.add_argument("--lifetime", type=float, default=3600.0, help="stop after this many seconds")
    args = parser.parse_args()

    import uvloop

    bulk = BulkServer({args.seed: payload.Pattern(args.seed)})
    udp = UdpEcho()
    threading.Thread(target=bulk.serve_forever, daemon=True).start()
    threading.Thread(target=udp.serve_forever, daemon=True).start()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        task = asyncio.ensure_future(_serve_rr(ready, args.lifetime))
        rr_port = await ready
        ports = {"bulk": bulk.listener.getsockname()[1], "rr": rr_port, "udp": udp.sock.getsockname()[1]}
        print(json.dumps(ports), flush=True)
        await task

    uvloop.run(run())


if __name__ == "__main__":
    main()
