"""
The Python work of one UDP round trip through ssx, without sockets or the
event loop: CPU microseconds per round trip.

    python benchmarks/udp_path.py [--method aes-256-gcm] [--count 20000] [--repeat 5]

One process holds both ends, as the suite's chain runs them, on in-memory
ports: an application's SOCKS5 datagram enters ssx-local's UDP relay
(`Socks5UdpRelay.datagramReceived`), whose sealed packet enters
ssx-server's (`ShadowsocksUdpRelay.datagramReceived`), which hands the
payload to its outgoing port for the target; the target's answer comes
back on that port (`_Upstream.datagramReceived`), is sealed, opened by
ssx-local (`LocalUdpRelay.from_server`) and written to the application.
Every hop's output is checked at the end of each repetition.  What the
suite's UDP figure adds to this is the kernel (eight socket calls per
round trip) and the reactor's dispatch.  The ports' writes are list
appends, so the figure is the relays' and the codec's own cost; it is
steadier than the suite's round trips per second on a shared machine.
Running it against another checkout (``PYTHONPATH=DIR``) compares two
versions of that path.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from typing import Any

from twisted.internet.task import Clock

from ssx.crypto import CipherSuite
from ssx.local.udp import Socks5UdpRelay
from ssx.server.forbidden import parse_forbidden
from ssx.server.udp import ShadowsocksUdpRelay
from ssx.wire.address import Address, encode_address


class _Port:
    """An in-memory UDP port: writes are kept, the last one is read back."""

    def __init__(self, protocol: Any = None) -> None:
        self.protocol = protocol
        self.sent: list[tuple[bytes, Any]] = []
        self.peer: Any = None

    def write(self, data: bytes, address: Any = None) -> None:
        self.sent.append((data, address if address is not None else self.peer))

    def connect(self, host: str, port: int) -> None:
        self.peer = (host, port)

    def stopListening(self) -> None:
        pass

    def getHost(self) -> Any:
        return None


class _Reactor(Clock):
    """A clock that opens in-memory UDP ports, remembering the last one."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[_Port] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> _Port:
        udp = _Port(protocol)
        self.ports.append(udp)
        return udp


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(method: str, count: int) -> float:
    """CPU microseconds per round trip over `count` round trips."""
    reactor = _Reactor()
    suite = CipherSuite(method, "udp-path")
    server = ShadowsocksUdpRelay(reactor, suite, None, parse_forbidden(""), salt_filter=None)  # type: ignore[arg-type]
    server_port = _Port(server)
    server.makeConnection(server_port)  # type: ignore[arg-type]
    local = Socks5UdpRelay(reactor, suite, ("127.0.0.1", 8388))
    local_port = _Port(local)
    local.makeConnection(local_port)  # type: ignore[arg-type]
    application = ("127.0.0.1", 40000)
    local.associate(application[0], application[1])
    target = Address("127.0.0.1", 9)
    payload = os.urandom(100)
    datagram = b"\x00\x00\x00" + encode_address(target) + payload
    client = ("127.0.0.1", 50000)

    # One round trip to open the ports and the NAT entries of both ends.
    local.datagramReceived(datagram, application)
    to_server_port = reactor.ports[-1]
    server.datagramReceived(to_server_port.sent[-1][0], client)
    target_port = reactor.ports[-1]
    upstream = target_port.protocol
    upstream.datagramReceived(target_port.sent[-1][0], ("127.0.0.1", 9))
    to_server_port.protocol.datagramReceived(server_port.sent[-1][0], ("127.0.0.1", 8388))
    assert local_port.sent[-1] == (datagram, application)

    local_in = local.datagramReceived
    server_in = server.datagramReceived
    answer = upstream.datagramReceived
    from_server = to_server_port.protocol.datagramReceived
    up, out, back = to_server_port.sent, target_port.sent, server_port.sent
    source = ("127.0.0.1", 9)
    server_address = ("127.0.0.1", 8388)
    start = _cpu()
    for _ in range(count):
        local_in(datagram, application)
        server_in(up[-1][0], client)
        answer(out[-1][0], source)
        from_server(back[-1][0], server_address)
    used = _cpu() - start
    assert local_port.sent[-1] == (datagram, application) and len(local_port.sent) == count + 1
    assert server.dropped == local.dropped == 0
    return used * 1e6 / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="aes-256-gcm")
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import steal

    before = steal.read()
    figures = [measure(args.method, args.count) for _ in range(args.repeat)]
    stolen = steal.percent(before, steal.read())
    print(
        f"{args.method}: {min(figures):.1f} CPU-us per round trip (best of {args.repeat}; "
        f"all: {', '.join(f'{f:.1f}' for f in figures)}); steal {stolen}%"
    )


if __name__ == "__main__":
    main()
