"""
The clients the loopback tests drive, written from the RFCs independently of
ssx's own codecs: a raw TCP client that records how its connection ended,
SOCKS5 CONNECT clients (one that half-closes, one that waits for the whole
echo, one that holds the connection open), a SOCKS5 UDP ASSOCIATE client,
a manager API client and an HTTP CONNECT client.
"""

from __future__ import annotations

import hashlib
import socket
import struct
from typing import Any

from twisted.internet import defer, error, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from zope.interface import implementer

from tests.support.waiting import wait_for, wait_until

__all__ = [
    "HalfClosingExchange",
    "TRANSFER_SECONDS",
    "socks5_request",
    "SocksTransfer",
    "socks_transfer",
    "WholeEchoTransfer",
    "whole_echo_transfer",
    "RawClient",
    "SocksClient",
    "socks5_udp_header",
    "Socks5UdpClient",
    "ManagerClient",
]

# How long a whole-echo transfer may take before it is aborted.
TRANSFER_SECONDS = 20.0


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


class WholeEchoTransfer(SocksTransfer):
    """
    A `SocksTransfer` that never half-closes: after sending the payload it
    waits for the whole echo, then closes.  Peers without TCP half-close
    (shadowsocks-libev, sing-box's client) would treat a half-close as the
    end of both directions.
    """

    def __init__(self, host: str, port: int, payload: bytes) -> None:
        SocksTransfer.__init__(self, host, port, payload)
        self.received_size = 0

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.sent < len(self.payload):
            end = min(self.sent + self.piece, len(self.payload))
            self.transport.write(bytes(self.payload[self.sent:end]))
            self.sent = end
        if self.sent >= len(self.payload) and self.stage == "relay":
            self.stage = "sent"
            self.transport.unregisterProducer()
            self._close_if_echoed()

    def dataReceived(self, data: bytes) -> None:
        if self.stage in ("relay", "sent"):
            self.received.append(data)
            self.received_size += len(data)
        else:
            # Negotiation; the SOCKS reply may carry the first relayed bytes.
            SocksTransfer.dataReceived(self, data)
            self.received_size = sum(len(piece) for piece in self.received)
        self._close_if_echoed()

    def _close_if_echoed(self) -> None:
        if self.stage == "sent" and self.received_size >= len(self.payload):
            self.transport.loseConnection()


async def run_transfer(client: Any, endpoint: Any) -> tuple[int | None, bytes]:
    """Connect `client` (a SOCKS transfer) through `endpoint`; its result, or an abort after TRANSFER_SECONDS."""
    await connectProtocol(endpoint, client)
    watchdog = reactor.callLater(TRANSFER_SECONDS, client.transport.abortConnection)
    try:
        return await client.done
    finally:
        if watchdog.active():
            watchdog.cancel()


async def whole_echo_transfer(socks_port: int, host: str, port: int, payload: bytes) -> tuple[int | None, bytes]:
    """Run a WholeEchoTransfer through the SOCKS5 port; abort it after TRANSFER_SECONDS."""
    return await run_transfer(WholeEchoTransfer(host, port, payload), TCP4ClientEndpoint(reactor, "127.0.0.1", socks_port))


class RawClient(protocol.Protocol):
    """
    A plain TCP client: writes `first` on connecting and each `(delay, data)`
    of `later` after that long; records the bytes that come back, and when
    and how the connection ended ("FIN" for an orderly close, else the error:
    a reset shows as ConnectionLost).
    """

    def __init__(self, first: bytes = b"", later: tuple[tuple[float, bytes], ...] = ()) -> None:
        self.first = first
        self.later = later
        self.received = bytearray()
        self.opened_at: float | None = None
        self.closed_at: float | None = None
        self.ending: str | None = None
        self.closed: defer.Deferred = defer.Deferred()
        self._calls: list[Any] = []

    def connectionMade(self) -> None:
        self.opened_at = reactor.seconds()
        if self.first:
            self.transport.write(self.first)
        for delay, data in self.later:
            self._calls.append(reactor.callLater(delay, self.transport.write, data))

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed_at = reactor.seconds()
        self.ending = "FIN" if reason.check(error.ConnectionDone) else repr(reason.value)
        for call in self._calls:
            if call.active():
                call.cancel()
        self.closed.callback(self)

    @property
    def lifetime(self) -> float:
        assert self.opened_at is not None and self.closed_at is not None
        return self.closed_at - self.opened_at


class DecryptingClient(RawClient):
    """
    A `RawClient` that sends a ready-made Shadowsocks request and decrypts
    what comes back with `codec` (a client codec): `plain` holds the
    plaintext, `wire` counts the encrypted bytes as they came.
    """

    def __init__(self, request: bytes, codec: Any) -> None:
        RawClient.__init__(self, request)
        self.codec = codec
        self.plain = bytearray()
        self.wire = 0

    def dataReceived(self, data: bytes) -> None:
        self.wire += len(data)
        self.plain += self.codec.decrypt(data)


class SocksClient(RawClient):
    """
    Speaks SOCKS5 (no authentication) to CONNECT to host:port, then sends
    `payload` and holds the connection open: it never half-closes.  Relayed
    bytes are counted and hashed (and kept unless `keep` is false);
    `echoed` fires once as many bytes came back as `payload` has.
    """

    def __init__(self, host: str, port: int, payload: bytes = b"", keep: bool = True, request: bytes | None = None) -> None:
        RawClient.__init__(self)
        self.request = request if request is not None else socks5_request(host, port)
        self.payload = payload
        self.keep = keep
        self.reply: int | None = None
        self.replied: defer.Deferred = defer.Deferred()
        self.echoed: defer.Deferred = defer.Deferred()
        self.count = 0
        self.digest = hashlib.sha256()
        self._buffer = b""
        self._stage = "greeting"

    def connectionMade(self) -> None:
        RawClient.connectionMade(self)
        self.transport.write(b"\x05\x01\x00")

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        if self._stage == "relay":
            self.count += len(data)
            self.digest.update(data)
            if self.keep:
                self.received += data
            if self.payload and self.count >= len(self.payload) and not self.echoed.called:
                self.echoed.callback(self)
            return
        self._buffer += data
        if self._stage == "greeting" and len(self._buffer) >= 2:
            assert self._buffer[:2] == b"\x05\x00", self._buffer
            self._buffer = self._buffer[2:]
            self._stage = "reply"
            self.transport.write(self.request)
        if self._stage == "reply" and len(self._buffer) >= 5:
            size = {1: 10, 4: 22, 3: 7 + self._buffer[4]}.get(self._buffer[3], 10)
            if len(self._buffer) < size:
                return
            self.reply = self._buffer[1]
            rest, self._buffer = self._buffer[size:], b""
            self._stage = "relay"
            self.replied.callback(self.reply)
            if self.reply == 0 and self.payload:
                self.transport.write(self.payload)
            if rest:
                self.dataReceived(rest)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.replied.called:
            self.replied.callback(self.reply)
        RawClient.connectionLost(self, reason)


def socks5_udp_header(host: str, port: int) -> bytes:
    """RSV FRAG ATYP ADDR PORT, built straight from RFC 1928 §7."""
    return b"\x00\x00\x00" + socks5_request(host, port)[3:]


class DatagramCollector(protocol.DatagramProtocol):
    """A UDP socket's protocol that queues every (datagram, source) it receives."""

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
        self.udp = DatagramCollector()
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


async def http_connect_echo(proxy_port: int, host: str, port: int, payload: bytes, seconds: float = 10.0) -> tuple[bytes, bytes]:
    """
    CONNECT to host:port through the HTTP proxy on 127.0.0.1:proxy_port,
    send `payload` with the request, and collect the answer until as many
    bytes as `payload` follow the proxy's response head: (head, the rest).
    """
    request = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    client = RawClient(request + payload)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy_port), client)

    def split() -> tuple[bytes, bytes]:
        data = bytes(client.received)
        end = data.find(b"\r\n\r\n")
        return (data, b"") if end < 0 else (data[:end + 4], data[end + 4:])

    await wait_until(lambda: len(split()[1]) >= len(payload) or client.closed.called, seconds)
    client.transport.loseConnection()
    await client.closed
    return split()


class PullSender:
    """An IPullProducer writing `chunks` one per resumeProducing (as FileSender does), then closing; counts its resumes."""

    def __init__(self, transport: Any, chunks: list[bytes]) -> None:
        self.transport = transport
        self.chunks = list(chunks)
        self.resumed = 0

    def resumeProducing(self) -> None:
        self.resumed += 1
        if not self.chunks:
            self.transport.unregisterProducer()
            self.transport.loseConnection()
            return
        self.transport.write(self.chunks.pop(0))

    def stopProducing(self) -> None:
        self.chunks = []


class KeepingProtocol(protocol.Protocol):
    """Hands its connection to `made`, collects what it reads, fires `lost` at the end."""

    def __init__(self, made: defer.Deferred | None = None) -> None:
        self.made = made
        self.lost: defer.Deferred = defer.Deferred()
        self.received = bytearray()

    def connectionMade(self) -> None:
        if self.made is not None:
            self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(bytes(self.received))


class HalfClosingExchange(protocol.Protocol):
    """Sends `payload`, half-closes, and fires `done` with all it read once the connection ends."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = bytearray()
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)
        self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        self.done.callback(bytes(self.received))


class BuildingFactory(protocol.ClientFactory):
    """A client factory whose protocols come from `build()`."""

    def __init__(self, build) -> None:  # type: ignore[no-untyped-def]
        self.build = build

    def buildProtocol(self, addr: object) -> protocol.Protocol:
        return self.build()


class ManagerClient:
    """A manager panel's side, from the spec: text datagrams on a plain socket."""

    def __init__(self, family: int = socket.AF_INET, bind: Any = ("127.0.0.1", 0)) -> None:
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind(bind)
        self.sock.setblocking(False)
        self.received: list[bytes] = []

    def _poll(self) -> bool:
        try:
            self.received.append(self.sock.recv(65535))
        except BlockingIOError:
            return False
        return True

    async def next(self, seconds: float = 5.0) -> bytes:
        if not self.received:
            await wait_for(self._poll, seconds, "no datagram from the manager")
        return self.received.pop(0)

    async def ask(self, address: Any, request: bytes) -> bytes:
        self.sock.sendto(request, address)
        return await self.next()
