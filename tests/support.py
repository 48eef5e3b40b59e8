"""
Shared pieces of the loopback tests: an echo target, a sink that can stop
reading, a SOCKS5 client written from RFC 1928 independently of ssx.socks5,
in-process ssx chains, and child-process peers (shadowsocks-libev).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import struct
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.task import deferLater
from zope.interface import implementer

from ssx.config import local_config, server_config
from ssx.tap import local as local_tap, server as server_tap

PASSWORD = "correct horse battery staple"


def free_port(family: int = socket.AF_INET) -> int:
    """A port that was free a moment ago (for child processes that need a number)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return s.getsockname()[1]


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@implementer(IHalfCloseableProtocol)
class Echo(protocol.Protocol):
    """Echoes everything; closes after the client's half-close."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


def listen_echo(address: str = "127.0.0.1") -> Any:
    factory = protocol.Factory.forProtocol(Echo)
    return reactor.listenTCP(0, factory, interface=address)


def start_server(**values: Any) -> Any:
    """An ssx-server service listening on a free loopback port; returns (service, port)."""
    values.setdefault("password", PASSWORD)
    values.setdefault("forbidden_ip", "")
    values.setdefault("listen", "tcp:0:interface=127.0.0.1")
    service = server_tap.build_service(reactor, server_config(values))
    service.startService()
    port = service.services[0].port.getHost().port
    return service, port


def start_local(server_port: int, **values: Any) -> Any:
    """An ssx-local service on a free loopback port aimed at `server_port`; returns (service, port)."""
    values.setdefault("password", PASSWORD)
    values.setdefault("server", "127.0.0.1")
    values.setdefault("server_port", server_port)
    values.setdefault("listen", "tcp:0:interface=127.0.0.1")
    service = local_tap.build_service(reactor, local_config(values))
    service.startService()
    port = service.services[0].port.getHost().port
    return service, port


def socks5_request(host: str, port: int) -> bytes:
    """A CONNECT request built straight from RFC 1928."""
    try:
        packed = socket.inet_pton(socket.AF_INET, host)
        address = b"\x01" + packed
    except OSError:
        try:
            packed = socket.inet_pton(socket.AF_INET6, host)
            address = b"\x04" + packed
        except OSError:
            name = host.encode()
            address = b"\x03" + bytes([len(name)]) + name
    return b"\x05\x01\x00" + address + struct.pack("!H", port)


@implementer(IHalfCloseableProtocol, IPushProducer)
class SocksTransfer(protocol.Protocol):
    """
    Negotiates SOCKS5 (no auth), CONNECTs, sends `payload` under flow control,
    half-closes, and collects everything that comes back.  `done` fires with
    (reply code, bytes received).
    """

    def __init__(self, host: str, port: int, payload: bytes, piece: int = 65536) -> None:
        self.request = socks5_request(host, port)
        self.payload = memoryview(payload)
        self.piece = piece
        self.sent = 0
        self.buffer = b""
        self.stage = "greeting"
        self.reply: int | None = None
        self.received: list[bytes] = []
        self.paused = False
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"\x05\x01\x00")

    def dataReceived(self, data: bytes) -> None:
        if self.stage == "relay":
            self.received.append(data)
            return
        self.buffer += data
        if self.stage == "greeting" and len(self.buffer) >= 2:
            assert self.buffer[:2] == b"\x05\x00", self.buffer
            self.buffer = self.buffer[2:]
            self.stage = "reply"
            self.transport.write(self.request)
        if self.stage == "reply" and len(self.buffer) >= 4:
            self.reply = self.buffer[1]
            atyp = self.buffer[3]
            size = {1: 10, 4: 22}.get(atyp, 5 + (self.buffer[4] if len(self.buffer) > 4 else 255) + 2)
            if len(self.buffer) < size:
                return
            rest = self.buffer[size:]
            self.buffer = b""
            if self.reply != 0:
                self.transport.loseConnection()
                return
            self.stage = "relay"
            if rest:
                self.received.append(rest)
            self.transport.registerProducer(self, True)
            self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.sent < len(self.payload):
            end = min(self.sent + self.piece, len(self.payload))
            self.transport.write(bytes(self.payload[self.sent:end]))
            self.sent = end
        if self.sent >= len(self.payload) and self.stage == "relay":
            self.stage = "sent"
            self.transport.unregisterProducer()
            self.transport.loseWriteConnection()
            self.stage = "relay"

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback((self.reply, b"".join(self.received)))


def socks_transfer(socks_port: int, host: str, port: int, payload: bytes, socks_host: str = "127.0.0.1") -> defer.Deferred:
    """Run a SocksTransfer through the SOCKS5 proxy at socks_host:socks_port."""
    client = SocksTransfer(host, port, payload)
    endpoint_type = TCP6ClientEndpoint if ":" in socks_host else TCP4ClientEndpoint
    d = connectProtocol(endpoint_type(reactor, socks_host, socks_port), client)
    d.addCallback(lambda _: client.done)
    return d


class ChildProcess(protocol.ProcessProtocol):
    """A peer binary run for a test; `stop()` ends it (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.output: list[bytes] = []
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value)

    def text(self) -> str:
        return b"".join(self.output).decode(errors="replace")

    async def stop(self) -> None:
        if self.ended.called:
            return
        try:
            self.transport.signalProcess("TERM")
        except Exception:
            pass
        waited = defer.Deferred()
        call = reactor.callLater(5, lambda: self.ended.called or self.transport.signalProcess("KILL"))
        self.ended.addBoth(lambda r: (waited.callback(None), r)[1])
        await waited
        if call.active():
            call.cancel()


def spawn(executable: str, args: list[str], env: dict[str, str] | None = None) -> ChildProcess:
    path = shutil.which(executable)
    assert path is not None, executable
    child = ChildProcess()
    reactor.spawnProcess(child, path, [executable, *args], env=env if env is not None else dict(os.environ))
    return child


async def wait_for_port(port: int, host: str = "127.0.0.1", seconds: float = 10.0) -> None:
    """Wait until something accepts TCP connections on host:port."""
    deadline = reactor.seconds() + seconds
    while True:
        try:
            p = await connectProtocol(TCP4ClientEndpoint(reactor, host, port, timeout=1), protocol.Protocol())
            p.transport.loseConnection()
            return
        except Exception:
            if reactor.seconds() > deadline:
                raise
            await deferLater(reactor, 0.05, lambda: None)
