"""
How two worker processes share accepting on one port: one listening
socket inherited by both (every worker's epoll wakes for it) against one
SO_REUSEPORT socket per worker (the kernel hashes each connection to one).
Each worker is a bare Twisted (epoll) process that adopts its socket,
answers each connection with its index byte and closes it; the client
opens a bounded number of connections, `--concurrency` at a time, and
counts which worker answered.  Prints per-worker accepts, conn/s and the
hypervisor steal over the run (from /proc/stat).  Bounded: at most
`--connections` connections per mode, a few seconds each.

    python benchmarks/accept_balance.py [--connections 4000] [--concurrency 32]

The result decided `ssx.workers.sockets` (see RESULTS.md, "--workers").
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import subprocess
import sys
import time

WORKER = r"""
import os, socket, sys
from twisted.internet import reactor, protocol
index, fd = int(sys.argv[1]), int(sys.argv[2])
class Answer(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(bytes([index]))
        self.transport.loseConnection()
factory = protocol.Factory.forProtocol(Answer)
reactor.adoptStreamPort(fd, socket.AF_INET, factory)
os.close(fd)
sys.stdout.write("ready\n"); sys.stdout.flush()
reactor.run()
"""


def steal() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return fields[7], sum(fields)


def listening(port: int, reuse: bool) -> socket.socket:
    sock = socket.socket()
    if reuse:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def run(mode: str, connections: int, concurrency: int) -> dict:
    first = listening(0, mode == "reuseport")
    port = first.getsockname()[1]
    sockets = [first, listening(port, True) if mode == "reuseport" else first]
    workers = []
    for index, sock in enumerate(sockets):
        workers.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, str(index), str(sock.fileno())], pass_fds=[sock.fileno()],
            stdout=subprocess.PIPE, text=True,
        ))
    for worker in workers:
        assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
    counts = [0, 0]
    selector = selectors.DefaultSelector()
    started = opened = done = 0
    steal0, total0 = steal()
    begin = time.perf_counter()
    while done < connections:
        while opened - done < concurrency and opened < connections:
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
            selector.register(client, selectors.EVENT_READ)
            opened += 1
        for key, _ in selector.select(timeout=5):
            client = key.fileobj  # type: ignore[assignment]
            data = client.recv(1)
            if data:
                counts[data[0]] += 1
            selector.unregister(client)
            client.close()
            done += 1
    elapsed = time.perf_counter() - begin
    steal1, total1 = steal()
    for worker in workers:
        worker.terminate()
        worker.wait()
    for sock in set(sockets):
        sock.close()
    del started
    return {
        "mode": mode, "connections": connections, "per_worker": counts,
        "conn_per_s": round(connections / elapsed), "steal_percent": round(100 * (steal1 - steal0) / max(1, total1 - total0), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    for _ in range(args.rounds):
        for mode in ("shared", "reuseport"):
            print(json.dumps(run(mode, min(args.connections, 20000), args.concurrency)), flush=True)


if __name__ == "__main__":
    main()
