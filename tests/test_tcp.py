"""
ssx.net.tcp: transports that send at once, on real loopback sockets, on
both connection paths (ssx.net.lean's port and connector, and Twisted's);
and what only the lean path does (ssx.net.lean).
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.error import (
    CannotListenError,
    ConnectBindError,
    ConnectionRefusedError,
    NotConnectingError,
    TimeoutError,
    UserError,
)
from twisted.internet.testing import MemoryReactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.python.failure import Failure
from twisted.trial import unittest

from zope.interface import implementer

from ssx.net import lean, tcp
from tests import support
from tests.support import sha256


class SendAtOnceTests(support.LeanTcp, unittest.TestCase):
    def _listen(self, build) -> int:  # type: ignore[no-untyped-def]
        port = tcp.listen(reactor, 0, support.BuildingFactory(build), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.assertIsInstance(port, self.port_type)
        return port.getHost().port

    @defer.inlineCallbacks
    def test_write_is_sent_before_the_reactor_turns(self):
        """A write into an empty buffer reaches the peer's socket during the call itself."""
        made: defer.Deferred = defer.Deferred()
        number = self._listen(lambda: support.KeepingProtocol(made))
        raw = socket.create_connection(("127.0.0.1", number))
        self.addCleanup(raw.close)
        server = yield made
        self.assertIsInstance(server.transport, self.server_type)
        server.transport.write(b"at once")
        # No reactor turn between the write and this read.
        raw.settimeout(0)
        self.assertEqual(raw.recv(100), b"at once")

    @defer.inlineCallbacks
    def test_large_and_interleaved_writes_arrive_whole_and_in_order(self):
        """What the kernel does not take is buffered; later writes queue behind it, none is lost."""
        made: defer.Deferred = defer.Deferred()
        number = self._listen(lambda: support.KeepingProtocol(made))
        client = support.KeepingProtocol()
        connected: defer.Deferred = defer.Deferred()
        client.made = connected
        connector = tcp.connect(reactor, "127.0.0.1", number, support.BuildingFactory(lambda: client), 5)
        self.assertIsInstance(connector, self.connector_type)
        yield connected
        self.assertIsInstance(client.transport, self.client_type)
        server = yield made
        pieces = [os.urandom(n) for n in (1, 8 << 20, 100, 3 << 20, 7)]
        for piece in pieces:
            client.transport.write(piece)
        client.transport.loseConnection()
        got = yield server.lost
        self.assertEqual(len(got), sum(map(len, pieces)))
        self.assertEqual(sha256(got), sha256(b"".join(pieces)))

    @defer.inlineCallbacks
    def test_nothing_is_sent_after_an_abort(self):
        """After abortConnection a write goes nowhere: the peer sees a reset, not the bytes."""
        made: defer.Deferred = defer.Deferred()
        number = self._listen(lambda: support.KeepingProtocol(made))
        raw = socket.create_connection(("127.0.0.1", number))
        self.addCleanup(raw.close)
        server = yield made
        server.transport.abortConnection()
        server.transport.write(b"late")
        yield server.lost
        raw.settimeout(5)
        try:
            data = raw.recv(100)
        except ConnectionResetError:
            data = b""
        self.assertEqual(data, b"")

    @defer.inlineCallbacks
    def test_after_start_tls_writes_are_encrypted(self):
        """startTLS on Twisted's path still encrypts what is written (the send-at-once path steps aside); the lean path refuses it."""
        from twisted.internet import ssl

        key_path, cert_path = support.make_certificate(self.mktemp())
        with open(key_path, "rb") as f, open(cert_path, "rb") as g:
            server_options = ssl.PrivateCertificate.loadPEM(f.read() + g.read()).options()
        with open(cert_path, "rb") as g:
            client_options = ssl.optionsForClientTLS("localhost", ssl.Certificate.loadPEM(g.read()))
        made: defer.Deferred = defer.Deferred()
        number = self._listen(lambda: support.KeepingProtocol(made))
        client = support.KeepingProtocol()
        connected: defer.Deferred = defer.Deferred()
        client.made = connected
        tcp.connect(reactor, "127.0.0.1", number, support.BuildingFactory(lambda: client), 5)
        yield connected
        server = yield made
        if self.lean_path:
            # TLS listeners and servers stay on Twisted's transports: the lean ones refuse, rather than send clear text.
            self.assertRaises(NotImplementedError, server.transport.startTLS, server_options)
            client.transport.loseConnection()
            yield client.lost
            return
        server.transport.startTLS(server_options)
        client.transport.startTLS(client_options)
        secret = os.urandom(5000)
        server.transport.write(secret)
        server.transport.loseConnection()
        got = yield client.lost
        self.assertEqual(got, secret)

    def test_a_taken_port_is_refused(self):
        """Binding a port in use fails with CannotListenError, as with listenTCP."""
        first = tcp.listen(reactor, 0, support.BuildingFactory(support.KeepingProtocol), interface="127.0.0.1")
        self.addCleanup(first.stopListening)
        with self.assertRaises(CannotListenError):
            tcp.listen(reactor, first.getHost().port, support.BuildingFactory(support.KeepingProtocol), interface="127.0.0.1")


class SendAtOnceOnTwistedTcpTests(support.TwistedTcp, SendAtOnceTests):
    """The same, on Twisted's Port and Connector."""


class EndpointTests(support.LeanTcp, unittest.TestCase):
    def test_plain_tcp_gets_these_transports_and_the_backlog(self):
        """A tcp: description becomes an endpoint that listens with ssx.net.tcp's port and the given backlog."""
        endpoint = tcp.server_endpoint(reactor, "tcp:0:interface=127.0.0.1", 4096)
        port = self.successResultOf(endpoint.listen(support.BuildingFactory(support.KeepingProtocol)))
        self.addCleanup(port.stopListening)
        self.assertIsInstance(port, self.port_type)
        self.assertEqual((port.getHost().host, port.backlog), ("127.0.0.1", 4096))

    def test_a_backlog_in_the_description_wins(self):
        """backlog= in the description overrides the default backlog."""
        endpoint = tcp.server_endpoint(reactor, "tcp:0:backlog=7", 4096)
        self.assertEqual(endpoint.backlog, 7)

    def test_other_kinds_stay_twisteds(self):
        """Other endpoint kinds (here unix:) are Twisted's own."""
        endpoint = tcp.server_endpoint(reactor, "unix:/tmp/ssx-test.sock", 4096)
        self.assertIsInstance(endpoint, UNIXServerEndpoint)

    def test_other_reactors_get_twisteds_tcp(self):
        """On a reactor that is not Twisted's POSIX one, listen and connect fall back to listenTCP/connectTCP."""
        memory = MemoryReactor()
        tcp.listen(memory, 1080, support.BuildingFactory(support.KeepingProtocol), 50, "127.0.0.1")
        tcp.connect(memory, "127.0.0.1", 8388, support.BuildingFactory(support.KeepingProtocol), 5)
        self.assertEqual(memory.tcpServers[0][:1], (1080,))
        self.assertEqual(memory.tcpClients[0][:2], ("127.0.0.1", 8388))


class PullProducerTests(support.LeanTcp, unittest.TestCase):
    """IConsumer's contract: a pull producer is asked for more whenever its last write has gone out."""

    @defer.inlineCallbacks
    def test_pull_producer_is_resumed_after_an_immediate_send(self):
        """A pull producer gets every chunk out, not only the first."""
        made: defer.Deferred = defer.Deferred()
        port = tcp.listen(reactor, 0, support.BuildingFactory(lambda: support.KeepingProtocol(made)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = support.KeepingProtocol()
        connected: defer.Deferred = defer.Deferred()
        client.made = connected
        tcp.connect(reactor, "127.0.0.1", port.getHost().port, support.BuildingFactory(lambda: client), 5)
        yield connected
        server = yield made
        chunks = [b"a" * 100, b"b" * 100, b"c" * 100]
        server.transport.registerProducer(support.PullSender(server.transport, chunks), False)
        timeout = reactor.callLater(3, client.transport.abortConnection)
        got = yield client.lost
        if timeout.active():
            timeout.cancel()
        self.assertEqual(got, b"".join(chunks))


class PullProducerOnTwistedTcpTests(support.TwistedTcp, PullProducerTests):
    """The same, on Twisted's Port and Connector."""


class LeanPathTests(support.LeanTcp, unittest.TestCase):
    """What ssx.net.lean's port and connector do beyond the shared transport tests."""

    def _echo_port(self, **kwargs) -> tuple[lean.LeanPort, support.HashingEchoFactory]:  # type: ignore[no-untyped-def]
        factory = support.HashingEchoFactory()
        port = tcp.listen(reactor, 0, factory, interface="127.0.0.1", **kwargs)
        self.addCleanup(port.stopListening)
        self.assertIsInstance(port, lean.LeanPort)
        return port, factory

    async def _connect_failure(self, host: str, number: int, timeout: float, **kwargs) -> Failure:  # type: ignore[no-untyped-def]
        failed: defer.Deferred = defer.Deferred()

        class Failing(support.BuildingFactory):
            def clientConnectionFailed(self, connector, reason):  # type: ignore[no-untyped-def]
                failed.callback([reason])  # a bare Failure would errback

        built: list = []
        connector = tcp.connect(reactor, host, number, Failing(lambda: built.append(1)), timeout, **kwargs)
        self.assertIsInstance(connector, lean.LeanConnector)
        [reason] = await support.within(10, failed, "the connect attempt neither failed nor connected")
        self.assertEqual(built, [], "a protocol was built for a failed connection")
        self.assertEqual(connector.state, "disconnected")
        return reason

    @support.coroutine_test
    async def test_burst_of_connections_all_served(self) -> None:
        """200 connections opened at once (within the backlog) are all accepted and each echoes its own 4 KiB intact."""
        port, factory = self._echo_port(backlog=512)
        payloads = [os.urandom(4096) for _ in range(200)]
        clients = [support.HalfClosingExchange(p) for p in payloads]
        for client in clients:
            tcp.connect(reactor, "127.0.0.1", port.getHost().port, support.BuildingFactory(lambda c=client: c), 10)
        got = await support.within(30, defer.gatherResults([c.done for c in clients]), "the burst was not served")
        self.assertEqual([sha256(g) for g in got], [sha256(p) for p in payloads])
        self.assertEqual(sorted(e.digest.hexdigest() for e in factory.inbound), sorted(sha256(p) for p in payloads))

    @support.coroutine_test
    async def test_accept_batch_bounds_one_event(self) -> None:
        """With numberAccepts at 2, one readiness event accepts two of five waiting connections, and later events the rest."""
        port, factory = self._echo_port()
        port.numberAccepts = 2
        port.stopReading()
        raws = [socket.create_connection(("127.0.0.1", port.getHost().port)) for _ in range(5)]
        for raw in raws:
            self.addCleanup(raw.close)
        port.doRead()
        self.assertEqual(len(factory.inbound), 2)
        port.startReading()
        await support.wait_for(lambda: len(factory.inbound) == 5, 10, lambda: f"{len(factory.inbound)} accepted")

    @support.coroutine_test
    async def test_connect_to_closed_port_fails(self) -> None:
        """Connecting to a port nobody listens on fails with ConnectionRefusedError to the factory."""
        number = support.free_port()
        reason = await self._connect_failure("127.0.0.1", number, 5)
        self.assertTrue(reason.check(ConnectionRefusedError), reason)

    @support.coroutine_test
    async def test_connect_timeout(self) -> None:
        """A connect the listener never completes (its accept queue full) fails with TimeoutError after the timeout."""
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen(0)
        number = holder.getsockname()[1]
        fillers = []
        for _ in range(4):  # more than the queue holds: the last SYNs are dropped
            raw = socket.socket()
            raw.setblocking(False)
            raw.connect_ex(("127.0.0.1", number))
            fillers.append(raw)
            self.addCleanup(raw.close)
        # Linux drops a SYN to a listener whose accept queue is full (the
        # client retries it), so this attempt neither connects nor fails.
        reason = await self._connect_failure("127.0.0.1", number, 0.5)
        self.assertTrue(reason.check(TimeoutError), reason)

    @support.coroutine_test
    async def test_stop_connecting(self) -> None:
        """stopConnecting ends an attempt with UserError and closes its socket."""
        failed: defer.Deferred = defer.Deferred()

        class Failing(support.BuildingFactory):
            def clientConnectionFailed(self, connector, reason):  # type: ignore[no-untyped-def]
                failed.callback([reason])  # a bare Failure would errback

        connector = lean.LeanConnector(reactor, "127.0.0.1", support.free_port(), Failing(support.KeepingProtocol), 5)
        connector.connect()
        connector.stopConnecting()
        [reason] = self.successResultOf(failed)
        self.assertTrue(reason.check(UserError), reason)
        with self.assertRaises(NotConnectingError):
            connector.stopConnecting()

    @support.coroutine_test
    async def test_source_address(self) -> None:
        """A connection with a source address (127.0.0.2) is seen coming from it, and getHost says so."""
        made: defer.Deferred = defer.Deferred()
        port = tcp.listen(reactor, 0, support.BuildingFactory(lambda: support.KeepingProtocol(made)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = support.KeepingProtocol()
        client.made = defer.Deferred()
        tcp.connect(
            reactor, "127.0.0.1", port.getHost().port, support.BuildingFactory(lambda: client), 5,
            bind_address=("127.0.0.2", 0),
        )
        await support.within(5, client.made, "not connected")
        server = await support.within(5, made, "not accepted")
        self.addCleanup(client.transport.loseConnection)
        self.assertEqual(server.transport.getPeer().host, "127.0.0.2")
        self.assertEqual(client.transport.getHost().host, "127.0.0.2")
        self.assertEqual(client.transport.getPeer().port, port.getHost().port)

    @support.coroutine_test
    async def test_source_address_not_ours_fails(self) -> None:
        """A source address this host does not have fails the connection with ConnectBindError, not a traceback."""
        reason = await self._connect_failure("127.0.0.1", support.free_port(), 5, bind_address=("192.0.2.1", 0))
        self.assertTrue(reason.check(ConnectBindError), reason)

    @support.coroutine_test
    async def test_adopted_listening_socket(self) -> None:
        """A listening socket's fd handed over is served like a bound port, and the caller may close its fd."""
        bound = socket.socket()
        bound.bind(("127.0.0.1", 0))
        bound.listen(50)
        factory = support.HashingEchoFactory()
        port = lean.adopt_listening_socket(bound.fileno(), factory, reactor)
        self.addCleanup(port.stopListening)
        bound.close()
        payload = os.urandom(10000)
        client = support.HalfClosingExchange(payload)
        tcp.connect(reactor, "127.0.0.1", port.getHost().port, support.BuildingFactory(lambda: client), 5)
        got = await support.within(10, client.done, "no echo")
        self.assertEqual(sha256(got), sha256(payload))

    def test_adopting_a_datagram_socket_is_refused(self) -> None:
        """A file descriptor that is not a TCP socket is refused with ValueError."""
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(udp.close)
        with self.assertRaises(ValueError):
            lean.adopt_listening_socket(udp.fileno(), support.HashingEchoFactory(), reactor)

    @support.coroutine_test
    async def test_reuse_port(self) -> None:
        """With reuse_port, two ports bind the same address, and connections reach both."""
        first, first_factory = self._echo_port(reuse_port=True)
        number = first.getHost().port
        second_factory = support.HashingEchoFactory()
        second = tcp.listen(reactor, number, second_factory, interface="127.0.0.1", reuse_port=True)
        self.addCleanup(second.stopListening)
        clients = [support.HalfClosingExchange(b"x" * 100) for _ in range(64)]
        for client in clients:
            tcp.connect(reactor, "127.0.0.1", number, support.BuildingFactory(lambda c=client: c), 5)
        await support.within(20, defer.gatherResults([c.done for c in clients]), "not all served")
        # The kernel spreads by a hash of the 4-tuple: 64 sources reach both.
        self.assertTrue(first_factory.inbound and second_factory.inbound)
        self.assertEqual(len(first_factory.inbound) + len(second_factory.inbound), 64)

    def test_without_reuse_port_the_address_is_taken(self) -> None:
        """Without reuse_port, a second port on the same address is refused (CannotListenError)."""
        first, _ = self._echo_port()
        with self.assertRaises(CannotListenError):
            tcp.listen(reactor, first.getHost().port, support.HashingEchoFactory(), interface="127.0.0.1")


def _unread(sock: socket.socket) -> int:
    """Bytes waiting in `sock`'s receive buffer."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


@implementer(IHalfCloseableProtocol)
class _Closing(support.KeepingProtocol):
    """Records, in order, the calls it makes on its transport and the callbacks it gets."""

    def __init__(self, made: defer.Deferred) -> None:
        super().__init__(made)
        self.calls: list[str] = []

    def readConnectionLost(self) -> None:
        self.calls.append("readConnectionLost")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.calls.append("writeConnectionLost")

    def connectionLost(self, reason: object = None) -> None:
        self.calls.append("connectionLost")
        super().connectionLost(reason)


class CloseAtOnceTests(support.LeanTcp, unittest.TestCase):
    """ssx.net.lean's transports close in the call when nothing is left to send, and the peer sees the same stream."""

    async def _pair(self) -> tuple[_Closing, socket.socket]:
        made: defer.Deferred = defer.Deferred()
        port = tcp.listen(reactor, 0, support.BuildingFactory(lambda: _Closing(made)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        raw = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(raw.close)
        server = await support.within(5, made, "not accepted")
        self.assertIsInstance(server.transport, lean.LeanServer)
        return server, raw

    @support.coroutine_test
    async def test_close_in_the_call(self) -> None:
        """write then loseConnection: connectionLost has run when it returns, and the peer reads the bytes, then a FIN."""
        server, raw = await self._pair()
        server.transport.write(b"last words")
        server.transport.loseConnection()
        self.assertEqual(server.calls, ["connectionLost"])
        raw.settimeout(5)
        got = b""
        while True:
            chunk = raw.recv(100)
            if not chunk:
                break
            got += chunk
        self.assertEqual(got, b"last words")

    @support.coroutine_test
    async def test_half_close_in_the_call(self) -> None:
        """loseWriteConnection: writeConnectionLost has run when it returns; the peer reads EOF and can still send."""
        server, raw = await self._pair()
        server.transport.write(b"done")
        server.transport.loseWriteConnection()
        self.assertEqual(server.calls, ["writeConnectionLost"])
        raw.settimeout(5)
        self.assertEqual(raw.recv(100), b"done")
        self.assertEqual(raw.recv(100), b"")
        raw.sendall(b"still open")
        raw.shutdown(socket.SHUT_WR)
        got = await support.within(5, server.lost, "the connection did not end")
        self.assertEqual(got, b"still open")
        self.assertEqual(server.calls, ["writeConnectionLost", "readConnectionLost", "connectionLost"])

    @support.coroutine_test
    async def test_unread_bytes_still_end_with_a_fin(self) -> None:
        """Closed with bytes it never read, the connection still ends with a FIN, not a reset (a prober sees no difference)."""
        server, raw = await self._pair()
        server.transport.pauseProducing()
        raw.sendall(b"unread")
        await support.wait_for(lambda: _unread(server.transport.socket) == 6, 5, lambda: "the bytes never arrived")
        server.transport.loseConnection()
        raw.settimeout(5)
        self.assertEqual(raw.recv(100), b"")


class _Broken(support.KeepingProtocol):
    """A protocol whose connectionMade raises (a bug)."""

    def connectionMade(self) -> None:
        raise ZeroDivisionError("a bug in the protocol")


class LeanPortFaultTests(support.LeanTcp, unittest.TestCase):
    """A protocol's bug ends its connection, not the port."""

    @support.coroutine_test
    async def test_failing_protocol_closes_its_connection_only(self) -> None:
        """connectionMade raising: that connection is aborted and the failure logged; the next one is served (echoed intact)."""
        broken = [True]

        def build() -> Any:
            if broken[0]:
                broken[0] = False
                return _Broken()
            return support.HashingEcho()

        factory = support.HashingEchoFactory()
        factory.buildProtocol = lambda addr: _with_factory(build(), factory)  # type: ignore[method-assign]
        port = tcp.listen(reactor, 0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        first = support.KeepingProtocol()
        tcp.connect(reactor, "127.0.0.1", port.getHost().port, support.BuildingFactory(lambda: first), 5)
        self.assertEqual(await support.within(5, first.lost, "the broken connection stayed open"), b"")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        client = support.HalfClosingExchange(b"after the bug")
        tcp.connect(reactor, "127.0.0.1", port.getHost().port, support.BuildingFactory(lambda: client), 5)
        self.assertEqual(await support.within(5, client.done, "no echo"), b"after the bug")


class LeanConnectorFaultTests(support.LeanTcp, unittest.TestCase):
    """A protocol's bug in connectionMade ends the connection it was made for."""

    @support.coroutine_test
    async def test_failing_protocol_closes_its_connection(self) -> None:
        """connectionMade of an outgoing connection raising: the connection is aborted (the far end sees it end) and the failure logged once."""
        accepted = support.KeepingProtocol()
        listening = tcp.listen(reactor, 0, support.BuildingFactory(lambda: accepted), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        tcp.connect(reactor, "127.0.0.1", listening.getHost().port, support.BuildingFactory(_Broken), 5)
        await support.within(5, accepted.lost, "the connection whose protocol failed stayed open")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


def _with_factory(protocol: Any, factory: Any) -> Any:
    protocol.factory = factory
    return protocol


class ReusePortEndpointTests(support.LeanTcp, unittest.TestCase):
    def test_reuse_port_through_a_description(self) -> None:
        """server_endpoint(reuse_port=True) lets two listeners bind one tcp: description's port."""
        first = self.successResultOf(
            tcp.server_endpoint(reactor, "tcp:0:interface=127.0.0.1", 50, reuse_port=True).listen(support.HashingEchoFactory())
        )
        self.addCleanup(first.stopListening)
        description = f"tcp:{first.getHost().port}:interface=127.0.0.1"
        second = self.successResultOf(
            tcp.server_endpoint(reactor, description, 50, reuse_port=True).listen(support.HashingEchoFactory())
        )
        self.addCleanup(second.stopListening)
        self.assertEqual(second.getHost().port, first.getHost().port)
        self.assertIsInstance(second, self.port_type)
