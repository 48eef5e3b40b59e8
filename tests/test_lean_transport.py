"""
ssx.net.lean_transport.LeanTransport (as LeanServer and LeanClient) on real
loopback sockets: its interfaces, its endings (exactly one connectionLost,
FIN or reset as asked, no shutdown() once EOF was read), half-closes,
producers, writeSequence, the reactor's books and the addresses.
"""

from __future__ import annotations

import hashlib
import os
import socket
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableDescriptor,
    IHalfCloseableProtocol,
    IPushProducer,
    IReadWriteDescriptor,
    ISystemHandle,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from ssx.net import lean, lean_transport, tcp
from tests import support


class _Recording(Protocol):
    """Keeps what it reads and every connectionLost reason; fires `made` and `lost`."""

    def __init__(self) -> None:
        self.made: defer.Deferred = defer.Deferred()
        self.lost: defer.Deferred = defer.Deferred()
        self.received = bytearray()
        self.reasons: list[Failure] = []

    def connectionMade(self) -> None:
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reasons.append(reason)
        if not self.lost.called:
            self.lost.callback(bytes(self.received))


@implementer(IHalfCloseableProtocol)
class _HalfClosing(_Recording):
    """Records its half-closes too; stays open after EOF until told."""

    def __init__(self) -> None:
        super().__init__()
        self.eof: defer.Deferred = defer.Deferred()
        self.write_closed = 0

    def readConnectionLost(self) -> None:
        self.eof.callback(bytes(self.received))

    def writeConnectionLost(self) -> None:
        self.write_closed += 1


class _ShutdownSpy(socket.socket):
    """A socket that counts its shutdown() calls."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock.family, sock.type, sock.proto, sock.detach())
        self.setblocking(False)
        self.shutdowns: list[int] = []

    def shutdown(self, how: int) -> None:
        self.shutdowns.append(how)
        super().shutdown(how)


def _spy_on(transport: Any) -> _ShutdownSpy:
    """Put a _ShutdownSpy in place of `transport`'s socket (the same descriptor)."""
    spy = _ShutdownSpy(transport.socket)
    transport.socket = spy
    transport.fileno = spy.fileno
    return spy


class _Pushing:
    """An IPushProducer that records pauses and resumes."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


def _waiting(sock: Any) -> int:
    """How many bytes wait unread in `sock` (peeked)."""
    try:
        return len(sock.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return 0


def _read_all(sock: socket.socket) -> bytes:
    """Everything until EOF (a reset raises)."""
    sock.settimeout(5)
    got = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(got)
        got += chunk


class LeanTransportTests(support.LeanTcp, unittest.TestCase):
    """LeanServer and LeanClient, against raw sockets and each other."""

    interface = "127.0.0.1"

    async def _accepted(self, build: Any = _Recording) -> tuple[Any, socket.socket]:
        """A protocol served on a LeanServer, and the raw socket at the other end."""
        protocols: list[Any] = []

        def make() -> Any:
            protocols.append(build())
            return protocols[-1]

        port = tcp.listen(reactor, 0, support.BuildingFactory(make), interface=self.interface)
        self.addCleanup(port.stopListening)
        raw = socket.socket(socket.AF_INET6 if ":" in self.interface else socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(raw.close)
        # Small buffers, so that a few MiB written are more than the kernel takes.
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        raw.connect((self.interface, port.getHost().port))
        await support.wait_for(lambda: bool(protocols), 5, "not accepted")
        server = await support.within(5, protocols[0].made, "not made")
        server.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        self.addCleanup(self._closed, server)
        self.assertIsInstance(server.transport, lean.LeanServer)
        return server, raw

    async def _pair(self) -> tuple[Any, Any, Any]:
        """A LeanServer's protocol, a LeanClient's protocol connected to it, and the port."""
        accepted = _Recording()
        port = tcp.listen(reactor, 0, support.BuildingFactory(lambda: accepted), interface=self.interface)
        self.addCleanup(port.stopListening)
        client = _Recording()
        tcp.connect(reactor, self.interface, port.getHost().port, support.BuildingFactory(lambda: client), 5)
        await support.within(5, client.made, "not connected")
        await support.within(5, accepted.made, "not accepted")
        self.addCleanup(self._closed, accepted)
        self.addCleanup(self._closed, client)
        self.assertIsInstance(client.transport, lean.LeanClient)
        return accepted, client, port

    def _closed(self, protocol: Any) -> None:
        if protocol.transport.connected:
            protocol.transport.abortConnection()

    @support.coroutine_test
    async def test_interfaces(self) -> None:
        """Both ends provide ITCPTransport, ISystemHandle, IConsumer, IPushProducer and the descriptor interfaces."""
        server, client, _ = await self._pair()
        for transport in (server.transport, client.transport):
            for interface in (
                ITCPTransport, ISystemHandle, IConsumer, IPushProducer, IReadWriteDescriptor, IHalfCloseableDescriptor,
            ):
                self.assertTrue(verifyObject(interface, transport))
            self.assertIs(transport.getHandle(), transport.socket)

    @support.coroutine_test
    async def test_addresses(self) -> None:
        """getPeer and getHost of both ends are the sockets' own addresses (IPv4Address on 127.0.0.1)."""
        server, client, port = await self._pair()
        family = IPv6Address if ":" in self.interface else IPv4Address
        listening = port.getHost().port
        client_port = client.transport.socket.getsockname()[1]
        self.assertEqual(server.transport.getHost(), family("TCP", self.interface, listening))
        self.assertEqual(server.transport.getPeer(), family("TCP", self.interface, client_port))
        self.assertEqual(client.transport.getPeer(), family("TCP", self.interface, listening))
        self.assertEqual(client.transport.getHost(), family("TCP", self.interface, client_port))

    @support.coroutine_test
    async def test_eof_then_close_sends_a_fin_without_shutdown(self) -> None:
        """After the peer's FIN was read, the close calls no shutdown(), and the peer reads the bytes and a FIN (no reset)."""
        server, raw = await self._accepted(_HalfClosing)
        spy = _spy_on(server.transport)
        raw.sendall(b"question")
        raw.shutdown(socket.SHUT_WR)
        self.assertEqual(await support.within(5, server.eof, "no EOF"), b"question")
        server.transport.write(b"answer")
        server.transport.loseConnection()
        self.assertEqual(len(server.reasons), 1)
        self.assertEqual(spy.shutdowns, [])
        self.assertEqual(_read_all(raw), b"answer")

    @support.coroutine_test
    async def test_unread_bytes_close_with_shutdown_and_a_fin(self) -> None:
        """Closed with bytes it never read, the transport shuts down first, and the peer reads a FIN (no reset)."""
        server, raw = await self._accepted()
        spy = _spy_on(server.transport)
        server.transport.pauseProducing()
        raw.sendall(b"unread")
        await support.wait_for(lambda: _waiting(spy) == 6, 5, "the bytes never arrived")
        server.transport.loseConnection()
        self.assertEqual(spy.shutdowns, [socket.SHUT_RDWR])
        self.assertEqual(_read_all(raw), b"")

    @support.coroutine_test
    async def test_connection_lost_exactly_once(self) -> None:
        """loseConnection twice, an abort and a late connectionLost: the protocol hears of one ending, ConnectionDone."""
        server, raw = await self._accepted()
        transport = server.transport
        transport.loseConnection()
        transport.loseConnection()
        transport.abortConnection()
        transport.connectionLost(Failure(ConnectionAborted()))
        self.assertEqual(len(server.reasons), 1)
        self.assertIsInstance(server.reasons[0].value, ConnectionDone)
        self.assertNotIn(transport, reactor.getReaders())
        self.assertNotIn(transport, reactor.getWriters())

    @support.coroutine_test
    async def test_abort_resets_and_reports_aborted(self) -> None:
        """abortConnection drops the buffer: connectionLost(ConnectionAborted) once, on a later turn; the peer gets a reset."""
        server, raw = await self._accepted()
        transport = server.transport
        transport.write(b"x" * (4 * 1024 * 1024))  # more than the socket takes: some is buffered
        self.assertIn(transport, reactor.getWriters())
        transport.abortConnection()
        transport.loseConnection()
        self.assertEqual(server.reasons, [])
        await support.within(5, server.lost, "no connectionLost")
        self.assertEqual(len(server.reasons), 1)
        self.assertIsInstance(server.reasons[0].value, ConnectionAborted)
        self.assertNotIn(transport, reactor.getReaders())
        self.assertNotIn(transport, reactor.getWriters())
        with self.assertRaises(ConnectionResetError):
            _read_all(raw)

    @support.coroutine_test
    async def test_eof_without_half_close_ends_the_connection(self) -> None:
        """A protocol without IHalfCloseableProtocol gets connectionLost(ConnectionDone) at the peer's FIN, after the bytes."""
        server, raw = await self._accepted()
        raw.sendall(b"bye")
        raw.shutdown(socket.SHUT_WR)
        self.assertEqual(await support.within(5, server.lost, "not closed at EOF"), b"bye")
        self.assertIsInstance(server.reasons[0].value, ConnectionDone)
        self.assertEqual(_read_all(raw), b"")

    @support.coroutine_test
    async def test_half_close_both_ways(self) -> None:
        """loseWriteConnection sends a FIN once (writeConnectionLost once), and the transport still reads until the peer's FIN."""
        server, raw = await self._accepted(_HalfClosing)
        server.transport.write(b"first")
        server.transport.loseWriteConnection()
        server.transport.loseWriteConnection()
        self.assertEqual(server.write_closed, 1)
        self.assertEqual(_read_all(raw), b"first")
        payload = os.urandom(50_000)  # within the socket buffers: sendall does not block the reactor
        raw.sendall(payload)
        raw.shutdown(socket.SHUT_WR)
        got = await support.within(5, server.eof, "no EOF")
        self.assertEqual(hashlib.sha256(got).digest(), hashlib.sha256(payload).digest())
        server.transport.loseConnection()
        self.assertEqual(len(server.reasons), 1)

    @support.coroutine_test
    async def test_write_sequence_and_buffered_writes_arrive_whole(self) -> None:
        """writeSequence and writes beyond what the socket takes at once arrive byte for byte, in order."""
        server, client, _ = await self._pair()
        parts = [os.urandom(n) for n in (1, 1000, 3_000_000, 7)]
        client.transport.writeSequence(parts[:2])
        client.transport.write(parts[2])
        client.transport.writeSequence([parts[3]])
        client.transport.loseConnection()
        got = await support.within(10, server.lost, "the connection did not end")
        self.assertEqual(support.sha256(got), support.sha256(b"".join(parts)))

    @support.coroutine_test
    async def test_writes_must_be_bytes(self) -> None:
        """Writing a str is a TypeError, as on Twisted's transports."""
        server, raw = await self._accepted()
        self.assertRaises(TypeError, server.transport.write, "text")
        self.assertRaises(TypeError, server.transport.writeSequence, [b"ok", "text"])

    @support.coroutine_test
    async def test_pull_producer_gets_everything_out(self) -> None:
        """A pull producer is resumed each time its write has gone out: many large chunks arrive whole."""
        server, raw = await self._accepted()
        chunks = [os.urandom(500_000) for _ in range(6)]
        producer = support.PullSender(server.transport, chunks)
        server.transport.registerProducer(producer, False)
        got = await support.within(10, defer.Deferred.fromCoroutine(_async_read_all(raw)), "not all read")
        self.assertEqual(support.sha256(got), support.sha256(b"".join(chunks)))
        self.assertEqual(producer.resumed, 7)

    @support.coroutine_test
    async def test_push_producer_paused_and_resumed(self) -> None:
        """A push producer is paused once more than bufferSize waits, resumed once it has drained; a close stops it."""
        server, raw = await self._accepted()
        producer = _Pushing()
        transport = server.transport
        transport.registerProducer(producer, True)
        payload = os.urandom(4 * 1024 * 1024)
        transport.write(payload)
        self.assertEqual(producer.calls, ["pause"])
        self.assertGreater(transport.buffered, transport.bufferSize)
        got = await support.within(10, defer.Deferred.fromCoroutine(_async_read_exactly(raw, len(payload))), "not read")
        self.assertEqual(support.sha256(got), support.sha256(payload))
        await support.wait_for(lambda: producer.calls == ["pause", "resume"], 5, lambda: f"calls: {producer.calls}")
        transport.loseConnection()
        self.assertEqual(producer.calls, ["pause", "resume"])  # still registered: the close waits for it
        transport.unregisterProducer()
        await support.within(5, server.lost, "not closed once unregistered")
        self.assertEqual(_read_all(raw), b"")

    @support.coroutine_test
    async def test_registered_producer_is_stopped_by_the_end(self) -> None:
        """A producer still registered when the connection ends is told to stop."""
        server, raw = await self._accepted()
        producer = _Pushing()
        server.transport.registerProducer(producer, True)
        raw.close()
        await support.within(5, server.lost, "not closed")
        self.assertEqual(producer.calls, ["stop"])

    @support.coroutine_test
    async def test_resume_after_eof_does_not_read_again(self) -> None:
        """resumeProducing after the peer's FIN registers no reader: readConnectionLost comes once."""
        eofs: list[bytes] = []
        server, raw = await self._accepted(_HalfClosing)
        server.eof.addCallback(eofs.append)
        raw.shutdown(socket.SHUT_WR)
        await support.wait_for(lambda: bool(eofs), 5, "no EOF")
        server.transport.pauseProducing()
        server.transport.resumeProducing()
        self.assertNotIn(server.transport, reactor.getReaders())
        server.transport.loseConnection()
        self.assertEqual(len(server.reasons), 1)

    @support.coroutine_test
    async def test_connector_hears_of_the_end(self) -> None:
        """A LeanClient's end reaches its connector's factory (clientConnectionLost) after the protocol's connectionLost."""
        order: list[str] = []

        class Factory(support.BuildingFactory):
            def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
                order.append(f"factory {type(reason.value).__name__}")

        server = _Recording()
        port = tcp.listen(reactor, 0, support.BuildingFactory(lambda: server), interface=self.interface)
        self.addCleanup(port.stopListening)
        client = _Recording()
        client.lost.addCallback(lambda _: order.append("protocol"))
        connector = tcp.connect(reactor, self.interface, port.getHost().port, Factory(lambda: client), 5)
        await support.within(5, client.made, "not connected")
        client.transport.loseConnection()
        self.assertEqual(order, ["protocol", "factory ConnectionDone"])
        self.assertEqual(connector.state, "disconnected")
        await support.within(5, server.lost, "the other end stayed open")


class LeanTransportIPv6Tests(LeanTransportTests):
    """The same over ::1 (IPv6Address)."""

    interface = "::1"

    def setUp(self) -> None:
        if not socket.has_ipv6:
            raise unittest.SkipTest("no IPv6 here")
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
                s.bind(("::1", 0))
        except OSError:
            raise unittest.SkipTest("no ::1 here")
        super().setUp()


async def _async_read_all(sock: socket.socket) -> bytes:
    """Everything until EOF, read without blocking the reactor."""
    sock.setblocking(False)
    got = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            await support.sleep(0.005)
            continue
        if not chunk:
            return bytes(got)
        got += chunk


async def _async_read_exactly(sock: socket.socket, size: int) -> bytes:
    """`size` bytes, read without blocking the reactor."""
    sock.setblocking(False)
    got = bytearray()
    while len(got) < size:
        try:
            chunk = sock.recv(min(1 << 20, size - len(got)))
        except BlockingIOError:
            await support.sleep(0.005)
            continue
        if not chunk:
            break
        got += chunk
    sock.setblocking(True)
    return bytes(got)


class _Lost(Protocol):
    """Keeps what it reads and every connectionLost reason (no Deferreds: for a synchronous test)."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.reasons: list[Failure] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reasons.append(reason)


class _StopRaises(_Pushing):
    """An IPushProducer whose stopProducing raises (a bug of its own)."""

    def stopProducing(self) -> None:
        super().stopProducing()
        raise RuntimeError("stopProducing failed")


class LeanTransportOnMemoryReactorTests(unittest.SynchronousTestCase):
    """LeanTransport on one end of a socket pair, its reactor a MemoryReactorClock driven by hand."""

    def _serve(self) -> tuple[Any, _Lost, socket.socket, MemoryReactorClock]:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        self.addCleanup(theirs.close)
        clock = MemoryReactorClock()
        protocol = _Lost()
        transport = lean_transport.LeanTransport(ours, protocol, clock)
        protocol.makeConnection(transport)
        self.addCleanup(lambda: transport.socket is not None and transport.socket.close())
        return transport, protocol, theirs, clock

    def test_resume_after_abort_reads_nothing(self) -> None:
        """resumeProducing (and startReading) after abortConnection register no reader, so nothing is read after the abort."""
        transport, protocol, theirs, clock = self._serve()
        transport.abortConnection()
        transport.resumeProducing()
        transport.startReading()
        self.assertNotIn(transport, clock.getReaders())
        clock.advance(0)
        self.assertEqual(len(protocol.reasons), 1)
        self.assertIsInstance(protocol.reasons[0].value, ConnectionAborted)

    def test_write_after_abort_registers_no_writer(self) -> None:
        """A write after abortConnection is dropped: the transport does not register for writability it would ignore."""
        transport, protocol, theirs, clock = self._serve()
        transport.abortConnection()
        transport.write(b"late")
        self.assertNotIn(transport, clock.getWriters())
        clock.advance(0)
        self.assertEqual(len(protocol.reasons), 1)

    def test_producer_raising_in_stop_does_not_leak_the_connection(self) -> None:
        """A producer whose stopProducing raises is logged; the socket still closes, the reactor forgets it and the protocol hears connectionLost once."""
        transport, protocol, theirs, clock = self._serve()
        producer = _StopRaises()
        transport.registerProducer(producer, True)
        fd = transport.fileno()
        theirs.shutdown(socket.SHUT_WR)  # EOF: a protocol without half-close ends there
        transport.doRead()
        self.assertEqual(producer.calls, ["stop"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(protocol.reasons), 1)
        self.assertIsInstance(protocol.reasons[0].value, ConnectionDone)
        self.assertIsNone(transport.socket)
        self.assertNotIn(transport, clock.getReaders())
        self.assertNotIn(transport, clock.getWriters())
        with self.assertRaises(OSError):
            os.fstat(fd)
