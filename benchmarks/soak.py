"""
Soak test: many concurrent relayed connections, in waves, for minutes.

Starts ssx-server and ssx-local (twistd child processes) and an echo server
(a child process of this script), then for `--seconds` opens waves of
`--connections` concurrent SOCKS5 connections through the chain, each sending
a random payload and checking every byte of the echo.  Reports waves,
connections, errors, the peak resident memory of both ssx processes, and
their open file descriptors before and after.  Loopback only; bounded in
count (waves x connections) and time; stops everything it started.

    python benchmarks/soak.py                      # 10,000 at once, 3 minutes
    python benchmarks/soak.py --connections 2000 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import resource
import signal
import socket
import struct
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]
PASSWORD = "soak-" + os.urandom(6).hex()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_fd_limit(need: int) -> None:
    """Children inherit it: each ssx process holds two descriptors per connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, need)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, PermissionError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(f"fd limit: {limit}")
    per_process = 2 * (need - 1024) // 3 + 64  # ssx-local: two descriptors per connection
    if limit[0] < per_process:
        print(f"warning: ssx-local needs about {per_process} descriptors for this many connections; "
              f"the limit is {limit[0]} and cannot be raised here")


def wait_port(port: int, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def peak_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


# -- the echo server (runs as `soak.py --echo PORT` in its own process) -------

async def serve_echo(port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


# -- the clients -------------------------------------------------------------

async def one(socks_port: int, echo_port: int, payload: bytes, timeout: float) -> str | None:
    """One relayed connection; None when every byte came back, else what went wrong."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", socks_port), timeout)
        writer.write(b"\x05\x01\x00" + b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", echo_port))
        head = await asyncio.wait_for(reader.readexactly(12), timeout)
        if head[:2] != b"\x05\x00" or head[3] != 0:
            writer.close()
            return f"SOCKS5 reply {head[2:4].hex()}"
        writer.write(payload)
        await writer.drain()
        back = await asyncio.wait_for(reader.readexactly(len(payload)), timeout)
        writer.close()
        if hashlib.sha256(back).digest() != hashlib.sha256(payload).digest():
            return "payload mismatch"
        return None
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError) as e:
        return type(e).__name__


async def wave(socks_port: int, echo_port: int, count: int, timeout: float) -> list[str]:
    sizes = [random.randint(1, 16384) for _ in range(count)]
    results = await asyncio.gather(*(one(socks_port, echo_port, os.urandom(n), timeout) for n in sizes))
    return [r for r in results if r is not None]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=10_000, help="concurrent connections per wave")
    parser.add_argument("--seconds", type=float, default=180.0, help="how long to keep starting waves")
    parser.add_argument("--max-waves", type=int, default=100, help="upper bound on waves")
    parser.add_argument("--method", default="aes-256-gcm")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-connection step timeout")
    parser.add_argument("--json", help="write the report here too")
    parser.add_argument("--echo", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo:
        asyncio.run(serve_echo(args.echo))
        return 0

    # SIGTERM (a timeout, a user) still runs the cleanup below: no orphans.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    raise_fd_limit(3 * args.connections + 1024)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    server_port, socks_port, echo_port = free_port(), free_port(), free_port()
    children = []
    try:
        children.append(subprocess.Popen([sys.executable, __file__, "--echo", str(echo_port)]))
        server = subprocess.Popen(
            [*TWISTD, "ssx-server", "-s", "127.0.0.1", "-p", str(server_port), "-k", PASSWORD, "-m", args.method,
             "--forbidden-ip=", "-t", "120"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        children.append(server)
        local = subprocess.Popen(
            [*TWISTD, "ssx-local", "-s", "127.0.0.1", "-p", str(server_port), "-l", str(socks_port), "-k", PASSWORD,
             "-m", args.method, "-t", "120"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        children.append(local)
        for port in (echo_port, server_port, socks_port):
            wait_port(port)
        time.sleep(0.5)
        before = {"server": fds(server.pid), "local": fds(local.pid)}
        started = time.monotonic()
        waves = total = 0
        errors: dict[str, int] = {}
        while time.monotonic() - started < args.seconds and waves < args.max_waves:
            t = time.monotonic()
            failed = asyncio.run(wave(socks_port, echo_port, args.connections, args.timeout))
            waves += 1
            total += args.connections
            for e in failed:
                errors[e] = errors.get(e, 0) + 1
            print(f"wave {waves}: {args.connections} connections, {len(failed)} errors, {time.monotonic() - t:.1f} s",
                  flush=True)
        time.sleep(2)  # let the last closes reach both processes
        report = {
            "method": args.method,
            "connections_per_wave": args.connections,
            "waves": waves,
            "connections": total,
            "errors": errors,
            "seconds": round(time.monotonic() - started, 1),
            "peak_rss_kib": {"server": peak_kib(server.pid), "local": peak_kib(local.pid)},
            "fds_before": before,
            "fds_after": {"server": fds(server.pid), "local": fds(local.pid)},
        }
        print(json.dumps(report, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        clean = not errors and report["fds_after"] == before
        return 0 if clean else 1
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()


if __name__ == "__main__":
    sys.exit(main())
