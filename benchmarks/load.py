"""
Load generators: the client side of every figure.

Each load runs in a process of its own (``python load.py LOAD ...``) so it
never shares a core's interpreter lock with the suite or the far end, and
prints one JSON object with what it measured and what it checked:

* ``bulk``: one connection, upload or download, frames sent with
  ``sendmsg`` from a 1 MiB zero-copy window and read with ``recv_into`` into
  a 256 KiB buffer, hashed on the receiving side (`payload`).  Bounded by
  ``--seconds`` and ``--max-frames``.
* ``paced``: the same transfer, upload or download, with the sender
  never more than `payload.PACED_WINDOW` bytes ahead of what the receiver
  has acknowledged: the regime of a receiver that drains as data arrives,
  where a saturating sender lets the chain read in large batches.
* ``rr``: connection rate.  ``--concurrency`` connections at a time, each
  SOCKS5 CONNECT + 100-byte request + 100-byte reply + the far end's close,
  on asyncio with uvloop and bare protocols (no streams) to keep the client
  cheap.  Bounded by ``--seconds`` and ``--max``.
* ``udp``: round trips through SOCKS5 UDP ASSOCIATE (or, for a chain without
  it, straight to a SOCKS5 UDP port, or to the echo itself for the floor)
  with ``--window`` datagrams in flight.  Reports ``n/a`` when the local end
  answers the association with 07 (command not supported).
* ``idle``: opens ``--count`` relayed connections, each checked with one
  request/reply, prints a ``ready`` line, holds them until a line arrives on
  standard input (or ``--hold`` seconds pass), then closes them and reports
  how many stayed open.

A connection through a chain goes to ``--socks`` (the local end); without it
the load talks to the far end directly (the floor).
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
import time
from typing import Any, Callable

import payload

__all__ = ["Socks5Refused", "socks5_handshake", "main"]

_READ_SIZE = 256 * 1024
_CONNECT_TIMEOUT = 10.0

_GREETING = b"\x05\x01\x00"
CMD_CONNECT, CMD_UDP_ASSOCIATE = 1, 3
REP_COMMAND_NOT_SUPPORTED = 7


class Socks5Refused(ConnectionError):
    """The SOCKS5 server answered a request with a non-zero reply code."""

    def __init__(self, code: int) -> None:
        super().__init__(f"SOCKS5 reply {code:#04x}")
        self.code = code


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _socks5_request(command: int, host: str, port: int) -> bytes:
    return b"\x05" + bytes((command, 0, 1)) + socket.inet_aton(host) + port.to_bytes(2, "big")


def socks5_handshake(sock: socket.socket, command: int, host: str, port: int) -> tuple[str, int]:
    """Greeting and one request on a blocking socket; the bound address, or Socks5Refused."""
    sock.sendall(_GREETING)
    if payload.recv_exactly(sock, 2) != b"\x05\x00":
        raise ConnectionError("SOCKS5 server refused the no-authentication method")
    sock.sendall(_socks5_request(command, host, port))
    head = payload.recv_exactly(sock, 4)
    if head[0] != 5:
        raise ConnectionError(f"not a SOCKS5 reply: {head!r}")
    if head[1] != 0:
        raise Socks5Refused(head[1])
    atyp = head[3]
    if atyp == 1:
        bound = socket.inet_ntoa(payload.recv_exactly(sock, 4))
    elif atyp == 4:
        bound = socket.inet_ntop(socket.AF_INET6, payload.recv_exactly(sock, 16))
    elif atyp == 3:
        bound = payload.recv_exactly(sock, payload.recv_exactly(sock, 1)[0]).decode()
    else:
        raise ConnectionError(f"bad address type {atyp} in the SOCKS5 reply")
    return bound, int.from_bytes(payload.recv_exactly(sock, 2), "big")


def _open(socks: tuple[str, int] | None, target: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(socks or target, timeout=_CONNECT_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if socks:
        socks5_handshake(sock, CMD_CONNECT, *target)
    sock.settimeout(None)  # truly blocking: whole-buffer sends; SIGALRM bounds the time
    return sock


# -- bulk -------------------------------------------------------------------


def run_bulk(args: argparse.Namespace) -> dict[str, Any]:
    signal.alarm(int(args.seconds) + 60)
    pattern = payload.Pattern(args.seed)
    sock = _open(args.socks, args.target)
    request = payload.bulk_request(
        payload.MODE_UPLOAD if args.direction == "up" else payload.MODE_DOWNLOAD,
        args.seconds,
        args.max_frames,
        args.seed,
    )
    with sock:
        started = time.perf_counter()
        sock.sendall(request)
        if args.direction == "up":
            deadline = started + args.seconds
            frames = 0
            while frames < args.max_frames and time.perf_counter() < deadline:
                payload.send_frame(sock, *pattern.frame(frames))
                frames += 1
            sock.sendall(payload.END_FRAME)
            digest, received, total = payload.UPLOAD_REPLY.unpack(payload.recv_exactly(sock, payload.UPLOAD_REPLY.size))
            elapsed = time.perf_counter() - started
            return {
                "frames": frames,
                "frames_received": received,
                "bytes": total,
                "bytes_sent": payload.Pattern.stream_size(frames),
                "seconds": elapsed,
                "digest": digest.hex(),
            }
        buffer = bytearray(_READ_SIZE)
        view = memoryview(buffer)
        digest_ = hashlib.sha256()
        scanner = payload.FrameScanner()
        while True:
            n = sock.recv_into(buffer)
            if not n:
                raise ConnectionError(f"download ended before its end frame, after {scanner.total} bytes")
            chunk = view[:n]
            digest_.update(chunk)
            if scanner.feed(chunk):
                break
        elapsed = time.perf_counter() - started
    return {
        "frames": scanner.frames,
        "frames_received": scanner.frames,
        "bytes": scanner.total,
        "bytes_sent": payload.Pattern.stream_size(scanner.frames),
        "seconds": elapsed,
        "digest": digest_.hexdigest(),
    }


def run_paced(args: argparse.Namespace) -> dict[str, Any]:
    signal.alarm(int(args.seconds) + 60)
    upload = args.direction == "up"
    sock = _open(args.socks, args.target)
    request = payload.bulk_request(
        payload.MODE_PACED_UPLOAD if upload else payload.MODE_PACED_DOWNLOAD,
        args.seconds,
        args.max_frames,
        args.seed,
    )
    with sock:
        started = time.perf_counter()
        sock.sendall(request)
        if upload:
            sender = payload.PacedSender(sock, payload.Pattern(args.seed))
            sender.send(started + args.seconds, args.max_frames, time.perf_counter)
            reply = None
            while reply is None:
                reply = sender.read_answer()
            digest, received, total = payload.UPLOAD_REPLY.unpack(reply)
            return {
                "frames": sender.frames,
                "frames_received": received,
                "bytes": total,
                "bytes_sent": payload.Pattern.stream_size(sender.frames),
                "seconds": time.perf_counter() - started,
                "digest": digest.hex(),
            }
        receiver = payload.AckingReceiver(sock, _READ_SIZE)
        receiver.receive()
        elapsed = time.perf_counter() - started
    frames = receiver.scanner.frames
    return {
        "frames": frames,
        "frames_received": frames,
        "bytes": receiver.scanner.total,
        "bytes_sent": payload.Pattern.stream_size(frames),
        "seconds": elapsed,
        "digest": receiver.digest.hexdigest(),
    }


# -- request/reply over asyncio ---------------------------------------------

_GREET, _CONNECT_REPLY, _REPLY, _EOF, _HELD, _DONE = range(6)


class Exchange(asyncio.Protocol):
    """
    One connection: optional SOCKS5 CONNECT, the request, its checked reply.

    `finished` is called once with None on success or a short error string;
    in hold mode success comes with the reply and the connection stays open
    (a later loss of it is reported through `on_drop`).
    """

    def __init__(
        self,
        connect_request: bytes | None,
        request: bytes,
        finished: Callable[[str | None], None],
        on_drop: Callable[[], None] | None = None,
    ) -> None:
        self._connect_request = connect_request
        self._request = request
        self._expected = payload.reply_for(request)
        self._hold = request[:1] == payload.MODE_HOLD
        self._finished: Callable[[str | None], None] | None = finished
        self._on_drop = on_drop
        self._buffer = b""
        self._stage = _GREET
        self.transport: asyncio.Transport | None = None
        self.replied_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self._connect_request is not None:
            transport.write(_GREETING)  # type: ignore[attr-defined]
        else:
            self._stage = _REPLY
            transport.write(self._request)  # type: ignore[attr-defined]

    def _finish(self, error: str | None) -> None:
        callback, self._finished = self._finished, None
        if error is not None:
            self._stage = _DONE
            if self.transport is not None:
                self.transport.abort()
        if callback is not None:
            callback(error)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        stage = self._stage
        if stage == _GREET:
            if len(buffer) < 2:
                self._buffer = buffer
                return
            if buffer[:2] != b"\x05\x00":
                self._finish("socks greeting refused")
                return
            buffer = buffer[2:]
            self.transport.write(self._connect_request)
            stage = self._stage = _CONNECT_REPLY
        if stage == _CONNECT_REPLY:
            if len(buffer) < 5:
                self._buffer = buffer
                return
            atyp = buffer[3]
            size = 4 + (4 if atyp == 1 else 16 if atyp == 4 else 1 + buffer[4]) + 2
            if len(buffer) < size:
                self._buffer = buffer
                return
            if buffer[1] != 0:
                self._finish(f"socks reply {buffer[1]}")
                return
            buffer = buffer[size:]
            self.transport.write(self._request)
            stage = self._stage = _REPLY
        if stage == _REPLY:
            if len(buffer) < payload.REQUEST_SIZE:
                self._buffer = buffer
                return
            if buffer[: payload.REQUEST_SIZE] != self._expected:
                self._finish("mismatch")
                return
            self.replied_at = time.perf_counter()
            buffer = buffer[payload.REQUEST_SIZE :]
            if self._hold:
                self._stage = _HELD
                self._finish(None)
            else:
                stage = self._stage = _EOF
        if buffer and stage in (_EOF, _HELD):
            self._finish("mismatch")  # bytes past the reply
            return
        self._buffer = b""

    def eof_received(self) -> bool:
        if self._stage == _EOF:
            self._stage = _DONE
            self._finish(None)
        elif self._stage == _HELD:
            self._dropped()
        else:
            self._finish("closed early")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._stage == _HELD:
            self._dropped()
        elif self._stage != _DONE:
            self._finish(f"lost: {exc!r}" if exc else "closed early")

    def _dropped(self) -> None:
        self._stage = _DONE
        if self._on_drop is not None:
            self._on_drop()


class _Tally:
    def __init__(self) -> None:
        self.completed = 0
        self.in_window = 0
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.mismatches = 0

    def error(self, what: str) -> None:
        if what == "mismatch":
            self.mismatches += 1
        key = what.split(":")[0]
        self.errors[key] = self.errors.get(key, 0) + 1


async def _one_exchange(
    loop: asyncio.AbstractEventLoop,
    args: argparse.Namespace,
    request: bytes,
    on_drop: Callable[[], None] | None = None,
) -> tuple[str | None, Exchange | None, float]:
    """Runs one exchange; (error or None, protocol, seconds to the reply)."""
    done = loop.create_future()

    def finished(error: str | None) -> None:
        if not done.done():
            done.set_result(error)

    connect_request = _socks5_request(CMD_CONNECT, *args.target) if args.socks else None
    started = time.perf_counter()
    try:
        _, protocol = await asyncio.wait_for(
            loop.create_connection(
                lambda: Exchange(connect_request, request, finished, on_drop), *(args.socks or args.target)
            ),
            _CONNECT_TIMEOUT,
        )
    except (OSError, asyncio.TimeoutError) as e:
        return f"connect: {type(e).__name__}", None, 0.0
    timer = loop.call_later(_CONNECT_TIMEOUT, finished, "timeout")
    error = await done
    timer.cancel()
    if error is not None:
        protocol.transport.abort()
    return error, protocol, protocol.replied_at - started


async def _rr(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    tally = _Tally()
    salt = int.from_bytes(os.urandom(4), "big")
    serial = 0
    started = time.perf_counter()
    deadline = started + args.seconds

    async def worker() -> None:
        nonlocal serial
        while time.perf_counter() < deadline and serial < args.max:
            serial += 1
            error, _, latency = await _one_exchange(loop, args, payload.make_request(payload.MODE_REPLY, serial, salt))
            if error is not None:
                tally.error(error)
                if error.startswith("connect"):
                    await asyncio.sleep(0.01)  # do not spin on a dead chain
                continue
            tally.completed += 1
            if time.perf_counter() <= deadline:
                tally.in_window += 1
            tally.latencies.append(latency)

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = min(time.perf_counter(), deadline) - started
    latencies = sorted(tally.latencies)

    def percentile(p: float) -> float | None:
        if not latencies:
            return None
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return {
        "attempts": serial,
        "completed": tally.completed,
        "seconds": elapsed,
        "rate": tally.in_window / elapsed if elapsed > 0 else 0.0,
        "p50_ms": percentile(0.50),
        "p99_ms": percentile(0.99),
        "errors": tally.errors,
        "mismatches": tally.mismatches,
    }


async def _idle(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    tally = _Tally()
    salt = int.from_bytes(os.urandom(4), "big")
    held: list[Exchange] = []
    dropped = 0
    serial = 0

    def drop() -> None:
        nonlocal dropped
        dropped += 1

    async def opener() -> None:
        nonlocal serial
        while serial < args.count:
            serial += 1
            error, protocol, _ = await _one_exchange(
                loop, args, payload.make_request(payload.MODE_HOLD, serial, salt), drop
            )
            if error is not None:
                tally.error(error)
            else:
                held.append(protocol)

    await asyncio.wait_for(asyncio.gather(*(opener() for _ in range(args.concurrency))), args.hold)
    print(json.dumps({"ready": True, "open": len(held)}), flush=True)
    released = loop.create_future()
    loop.add_reader(sys.stdin.fileno(), lambda: released.done() or released.set_result(None))
    try:
        await asyncio.wait_for(released, args.hold)
    except asyncio.TimeoutError:
        pass
    loop.remove_reader(sys.stdin.fileno())
    still_open = len(held) - dropped
    for protocol in held:
        protocol._on_drop = None
        protocol.transport.close()
    await asyncio.sleep(0.2)
    return {"opened": len(held), "open_at_release": still_open, "errors": tally.errors, "mismatches": tally.mismatches}


# -- UDP --------------------------------------------------------------------


def run_udp(args: argparse.Namespace) -> dict[str, Any]:
    signal.alarm(int(args.seconds) + 30)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind(("127.0.0.1", 0))
    control = None
    prefix = b""
    if args.socks and not args.udp_direct:
        control = socket.create_connection(args.socks, timeout=_CONNECT_TIMEOUT)
        try:
            host, port = socks5_handshake(control, CMD_UDP_ASSOCIATE, *sock.getsockname())
        except Socks5Refused as e:
            if e.code == REP_COMMAND_NOT_SUPPORTED:
                return {"status": "n/a", "reason": "UDP ASSOCIATE answered 07 (command not supported)"}
            raise
        relay = ("127.0.0.1" if host in ("0.0.0.0", "::") else host, port)
    elif args.udp_direct:
        relay = args.udp_direct
    else:
        relay = args.target
    if args.socks or args.udp_direct:
        prefix = b"\x00\x00\x00\x01" + socket.inet_aton(args.target[0]) + args.target[1].to_bytes(2, "big")
    salt = int.from_bytes(os.urandom(4), "big")
    make = payload.make_request
    mode = b"U"
    sendto, recv = sock.sendto, sock.recv
    # pproxy answers its SOCKS5 UDP datagrams without the SOCKS5 header.
    expected_prefix = b"" if args.bare_replies else prefix
    cut = len(expected_prefix)

    # One answered datagram first: associations are set up on the first one.
    sock.settimeout(0.5)
    for attempt in range(10):
        sendto(prefix + make(mode, 0, salt), relay)
        try:
            recv(2048)
            break
        except socket.timeout:
            continue
    else:
        raise ConnectionError("no UDP answer through the chain")
    try:
        while True:  # drain duplicate answers of the warm-up
            sock.settimeout(0.05)
            recv(2048)
    except socket.timeout:
        pass

    sock.settimeout(0.1)
    outstanding: dict[int, float] = {}
    serial = 0
    done = lost = late = mismatches = 0
    started = time.perf_counter()
    deadline = started + args.seconds
    next_sweep = started + 0.1

    def send_one() -> None:
        nonlocal serial
        serial += 1
        outstanding[serial] = time.perf_counter()
        sendto(prefix + make(mode, serial, salt), relay)

    for _ in range(args.window):
        send_one()
    while serial < args.max:
        try:
            data = recv(2048)
        except socket.timeout:
            data = None
        now = time.perf_counter()
        if now >= deadline:
            break
        if data is not None:
            if data[:cut] != expected_prefix:
                mismatches += 1
                continue
            request = payload.request_from_reply(data[cut:])
            number = int.from_bytes(request[1:9], "big")
            sent_at = outstanding.pop(number, None)
            if sent_at is None:
                if 0 < number <= serial and request == make(mode, number, salt):
                    late += 1
                else:
                    mismatches += 1
                continue
            if request != make(mode, number, salt):
                mismatches += 1
                continue
            done += 1
            send_one()
        if now >= next_sweep:
            next_sweep = now + 0.1
            for number, sent_at in list(outstanding.items()):
                if now - sent_at > 0.5:
                    del outstanding[number]
                    lost += 1
                    send_one()
    elapsed = time.perf_counter() - started
    if control is not None:
        control.close()
    return {
        "status": "ok",
        "round_trips": done,
        "seconds": elapsed,
        "rate": done / elapsed,
        "lost": lost,
        "late": late,
        "mismatches": mismatches,
        "window": args.window,
    }


# -- entry point ------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="load", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--socks", type=_address, help="SOCKS5 address of the chain's local end")
        p.add_argument("--target", type=_address, required=True, help="the far end's address")
        p.add_argument("--seconds", type=float, default=3.0)

    bulk = sub.add_parser("bulk", help="one bulk transfer")
    common(bulk)
    bulk.add_argument("--direction", choices=("up", "down"), required=True)
    bulk.add_argument("--max-frames", type=int, default=4096)
    bulk.add_argument("--seed", type=int, required=True)

    paced = sub.add_parser("paced", help="one bulk transfer paced by the receiver's acknowledgements")
    common(paced)
    paced.add_argument("--direction", choices=("up", "down"), required=True)
    paced.add_argument("--max-frames", type=int, default=4096)
    paced.add_argument("--seed", type=int, required=True)

    rr = sub.add_parser("rr", help="connection rate")
    common(rr)
    rr.add_argument("--concurrency", type=int, default=32)
    rr.add_argument("--max", type=int, default=200_000)

    udp = sub.add_parser("udp", help="UDP round trips")
    common(udp)
    udp.add_argument("--udp-direct", type=_address, help="send SOCKS5 UDP datagrams here, without ASSOCIATE")
    udp.add_argument("--bare-replies", action="store_true", help="replies come without the SOCKS5 UDP header")
    udp.add_argument("--window", type=int, default=32)
    udp.add_argument("--max", type=int, default=2_000_000)

    idle = sub.add_parser("idle", help="hold idle relayed connections")
    common(idle)
    idle.add_argument("--count", type=int, default=1000)
    idle.add_argument("--concurrency", type=int, default=50)
    idle.add_argument("--hold", type=float, default=60.0, help="longest time to open, and to hold")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.load == "bulk":
            result = run_bulk(args)
        elif args.load == "paced":
            result = run_paced(args)
        elif args.load == "udp":
            result = run_udp(args)
        else:
            import uvloop

            result = uvloop.run(_rr(args) if args.load == "rr" else _idle(args))
    except (OSError, ValueError, asyncio.TimeoutError) as e:
        result = {"status": "error", "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
