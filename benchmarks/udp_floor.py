"""
The CPU of one UDP hop with no Shadowsocks work: what a Python relay
pays per datagram before it does anything, on Twisted and on raw epoll.

    python benchmarks/udp_floor.py [--count 20000] [--window 32]

A client process keeps `--window` datagrams of 100 bytes in flight to an
echo server on 127.0.0.1 (each answer releases the next datagram) until
`--count` have come back; the figure is the echo process's CPU per
datagram, in microseconds (it receives and sends each one once).  Echo
servers: Twisted's epoll reactor with a `DatagramProtocol` on
`listenUDP` (what ssx's UDP ports run on), and a bare `select.epoll`
loop reading until EAGAIN.  A round trip through the suite's chain
crosses four such hops (two in ssx-local, two in ssx-server), so four
times the Twisted figure is the part of ssx's CPU per round trip that
the event loop and the kernel take before any relaying.  Everything
stays on 127.0.0.1 and ends by itself.
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import steal  # noqa: E402


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _twisted_echo(sock: socket.socket, count: int, report: int) -> None:
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor
    from twisted.internet.protocol import DatagramProtocol

    class Echo(DatagramProtocol):
        seen = 0

        def datagramReceived(self, data: bytes, addr: tuple) -> None:
            self.transport.write(data, addr)
            Echo.seen += 1
            if Echo.seen == count:
                os.write(report, f"{(_cpu() - start) * 1e6 / count}\n".encode())
                reactor.stop()

    port = reactor.adoptDatagramPort(sock.fileno(), socket.AF_INET, Echo())
    sock.close()
    start = _cpu()
    reactor.run()
    port.stopListening()


def _epoll_echo(sock: socket.socket, count: int, report: int) -> None:
    sock.setblocking(False)
    poller = select.epoll()
    poller.register(sock.fileno(), select.EPOLLIN)
    seen = 0
    start = _cpu()
    while seen < count:
        for _ in poller.poll():
            while True:
                try:
                    data, addr = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                sock.sendto(data, addr)
                seen += 1
    os.write(report, f"{(_cpu() - start) * 1e6 / count}\n".encode())


def measure(kind: str, count: int, window: int) -> float:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setblocking(False)
    address = server.getsockname()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        try:
            (_twisted_echo if kind == "twisted" else _epoll_echo)(server, count, write_end)
        finally:
            os._exit(0)
    os.close(write_end)
    server.close()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(5)
    payload = bytes(100)
    time.sleep(0.3)  # the child's loop starts; a datagram sent earlier waits in the socket anyway
    sent = received = 0
    for _ in range(min(window, count)):
        client.sendto(payload, address)
        sent += 1
    while received < count:
        client.recv(2048)
        received += 1
        if sent < count:
            client.sendto(payload, address)
            sent += 1
    figure = float(os.read(read_end, 100).decode())
    os.waitpid(child, 0)
    os.close(read_end)
    client.close()
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    before = steal.read()
    for kind in ("twisted", "epoll"):
        figures = [measure(kind, args.count, args.window) for _ in range(args.repeat)]
        print(f"{kind:8} echo: {min(figures):.1f} CPU-us per datagram (best of {args.repeat}; "
              f"all: {', '.join(f'{f:.1f}' for f in figures)})")
    print(f"hypervisor steal: {steal.percent(before, steal.read())}%")


if __name__ == "__main__":
    main()
