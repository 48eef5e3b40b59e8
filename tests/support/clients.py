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
from ssx.listener import ListenerService
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
    if service.plugin is not None:
        # Clients reach the plugin, on the public port.
        return service, service.plugin.remote[1]
    return service, first_listener(service).port.getHost().port


def start_local(server_port: int, **values: Any) -> Any:
    """An ssx-local service on a free loopback port aimed at `server_port`; returns (service, port)."""
    values.setdefault("password", PASSWORD)
    values.setdefault("server", "127.0.0.1")
    values.setdefault("server_port", server_port)
    values.setdefault("listen", "tcp:0:interface=127.0.0.1")
    service = local_tap.build_service(reactor, local_config(values))
    service.startService()
    return service, first_listener(service).port.getHost().port


def first_listener(service: Any) -> ListenerService:
    """The first TCP listener in a service tree."""
    return next(child for child in service if isinstance(child, ListenerService))


def drained(*services: Any, seconds: float = 5.0) -> defer.Deferred:
    """A Deferred for `_drained` (so it can be a trial cleanup as it is)."""
    return defer.Deferred.fromCoroutine(_drained(*services, seconds=seconds))


async def _drained(*services: Any, seconds: float = 5.0) -> None:
    """
    Wait until the relays of ssx services hold no connection: a client
    process (curl) may exit before the proxy has read its close.  Connections
    still open after `seconds` are aborted and reported as a failure.
    """
    def live() -> list:
        return [p for s in services for f in getattr(s, "factories", [s.factory]) if f is not None for p in f.connections]

    deadline = reactor.seconds() + seconds
    while live() and reactor.seconds() < deadline:
        await deferLater(reactor, 0.02, lambda: None)
    left = live()
    for p in left:
        p.transport.abortConnection()
    if left:
        await deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(f"{len(left)} relayed connections still open {seconds:g} s after the test")


def make_certificate(directory: str, name: str = "localhost") -> tuple[str, str]:
    """
    A self-signed certificate for `name` (also valid for 127.0.0.1), made by
    ssx.cert: returns the paths of its key and of the certificate, the
    latter alone in a directory of its own (Twisted's trustRoots loads every
    file there).
    """
    from ssx.cert import make_self_signed

    key_pem, cert_pem, _ = make_self_signed(name, days=1, also=("127.0.0.1",))
    roots = os.path.join(directory, "roots")
    os.makedirs(roots, exist_ok=True)
    key_path, cert_path = os.path.join(directory, "key.pem"), os.path.join(roots, "cert.pem")
    for path, data in ((key_path, key_pem), (cert_path, cert_pem)):
        with open(path, "wb") as f:
            f.write(data)
    return key_path, cert_path


def listen_web(site: Any, key_path: str | None = None, cert_path: str | None = None) -> Any:
    """A twisted.web site on a free loopback port, over TLS when given a key and certificate."""
    if key_path is None:
        return reactor.listenTCP(0, site, interface="127.0.0.1")
    from twisted.internet import ssl

    with open(key_path, "rb") as f:
        key = f.read()
    with open(cert_path, "rb") as f:  # type: ignore[arg-type]
        cert = f.read()
    options = ssl.PrivateCertificate.loadPEM(key + cert).options()
    return reactor.listenSSL(0, site, options, interface="127.0.0.1")


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


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TWISTD = ["-c", "from twisted.scripts.twistd import run; run()"]


def twistd_env() -> dict[str, str]:
    """The environment for twistd children: this checkout first on the path, no proxies."""
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=ROOT + (os.pathsep + path if path else ""), no_proxy="", NO_PROXY="")


async def start_twistd(testcase: Any, *args: str, ready: bytes, seconds: float = 10.0) -> ChildProcess:
    """Run `twistd ARGS` as a child until its output shows `ready`; stopped at the test's end."""
    import sys
    import tempfile

    child = ChildProcess()
    reactor.spawnProcess(child, sys.executable, [sys.executable, *TWISTD, *args], env=twistd_env(), path=tempfile.gettempdir())
    testcase.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
    deadline = reactor.seconds() + seconds
    while reactor.seconds() < deadline:
        if ready in b"".join(child.output):
            return child
        if child.ended.called:
            break
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"twistd did not get ready: {child.text()}")


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


class UdpEcho(protocol.DatagramProtocol):
    """Echoes every datagram to where it came from; counts them."""

    def __init__(self) -> None:
        self.count = 0

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.count += 1
        self.transport.write(data, addr)


def listen_udp_echo(address: str = "127.0.0.1") -> tuple[Any, UdpEcho]:
    echo = UdpEcho()
    return reactor.listenUDP(0, echo, interface=address, maxPacketSize=65535), echo


def socks5_udp_header(host: str, port: int) -> bytes:
    """RSV FRAG ATYP ADDR PORT, built straight from RFC 1928 §7."""
    return b"\x00\x00\x00" + socks5_request(host, port)[3:]


class _Collector(protocol.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: defer.DeferredQueue = defer.DeferredQueue()

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.queue.put((data, addr))


class Socks5UdpClient:
    """
    An application using SOCKS5 UDP ASSOCIATE: a TCP control connection and
    a UDP socket.  `exchange` sends datagrams through the proxy (a window at
    a time, resending what got no answer) and checks every reply.
    """

    def __init__(self) -> None:
        self.control: protocol.Protocol | None = None
        self.relay: tuple[str, int] | None = None
        self.udp = _Collector()
        self.port: Any = None
        self.reply = b""

    async def open(self, socks_port: int, host: str = "127.0.0.1") -> int:
        """Associate; returns the SOCKS5 reply code."""
        got: defer.Deferred = defer.Deferred()
        client = self

        class Control(protocol.Protocol):
            def connectionMade(self):
                self.buffer = b""
                self.transport.write(b"\x05\x01\x00")

            def dataReceived(self, data):
                self.buffer += data
                if self.buffer[:2] == b"\x05\x00" and len(self.buffer) == 2:
                    self.transport.write(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
                elif len(self.buffer) >= 12 and not got.called:
                    client.reply = self.buffer[2:]
                    got.callback(self.buffer[2:])

            def connectionLost(self, reason=None):
                if not got.called:
                    got.callback(self.buffer[2:])

        endpoint_type = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        self.control = await connectProtocol(endpoint_type(reactor, host, socks_port), Control())
        reply = await got
        if len(reply) < 10 or reply[1] != 0:
            return reply[1] if len(reply) > 1 else -1
        if reply[3] == 1:
            self.relay = (socket.inet_ntop(socket.AF_INET, reply[4:8]), struct.unpack("!H", reply[8:10])[0])
        else:
            self.relay = (socket.inet_ntop(socket.AF_INET6, reply[4:20]), struct.unpack("!H", reply[20:22])[0])
        self.port = reactor.listenUDP(0, self.udp, interface="::1" if ":" in self.relay[0] else "127.0.0.1", maxPacketSize=65535)
        return 0

    def send(self, host: str, port: int, payload: bytes) -> None:
        assert self.relay is not None
        self.port.write(socks5_udp_header(host, port) + payload, self.relay)

    async def exchange(self, host: str, port: int, payloads: list[bytes], window: int = 16, reply_host: str | None = None) -> int:
        """
        Send every payload to host:port and wait for each echo (checked byte
        for byte, with the SOCKS5 header naming the echo's address); returns
        how many had to be sent again.
        """
        header = socks5_udp_header(reply_host or host, port)
        waiting = {p: 0 for p in payloads}
        resent = 0
        todo = list(payloads)
        while waiting:
            batch, todo = todo[:window], todo[window:]
            for payload in batch:
                self.send(host, port, payload)
            deadline = reactor.seconds() + 2
            while any(p in waiting for p in batch) and reactor.seconds() < deadline:
                d = self.udp.queue.get()
                timer = reactor.callLater(max(0.01, deadline - reactor.seconds()), d.cancel)
                try:
                    data, _ = await d
                except defer.CancelledError:
                    break
                finally:
                    if timer.active():
                        timer.cancel()
                assert data.startswith(header), (data[:30], header)
                waiting.pop(data[len(header):], None)
            missing = [p for p in batch if p in waiting]
            for payload in missing:
                waiting[payload] += 1
                assert waiting[payload] <= 3, f"no echo for a {len(payload)}-byte datagram after 3 tries"
            resent += len(missing)
            todo = missing + todo
        return resent

    def close(self) -> None:
        if self.control is not None and self.control.transport is not None:
            self.control.transport.loseConnection()
        if self.port is not None:
            self.port.stopListening()
            self.port = None
