"""
ssx.net.tcp: transports that send at once, on real loopback sockets.
"""

from __future__ import annotations

import os
import socket

from twisted.internet import defer, reactor
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactor
from twisted.trial import unittest

from ssx.net import tcp
from tests import support
from tests.support import sha256


class SendAtOnceTests(unittest.TestCase):
    def _listen(self, build) -> int:  # type: ignore[no-untyped-def]
        port = tcp.listen(reactor, 0, support.BuildingFactory(build), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.assertIsInstance(port, tcp.Port)
        return port.getHost().port

    @defer.inlineCallbacks
    def test_write_is_sent_before_the_reactor_turns(self):
        """A write into an empty buffer reaches the peer's socket during the call itself."""
        made: defer.Deferred = defer.Deferred()
        number = self._listen(lambda: support.KeepingProtocol(made))
        raw = socket.create_connection(("127.0.0.1", number))
        self.addCleanup(raw.close)
        server = yield made
        self.assertIsInstance(server.transport, tcp.Server)
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
        self.assertIsInstance(connector, tcp.Connector)
        yield connected
        self.assertIsInstance(client.transport, tcp.Client)
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
        """startTLS on these transports still encrypts what is written (the send-at-once path steps aside)."""
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


class EndpointTests(unittest.TestCase):
    def test_plain_tcp_gets_these_transports_and_the_backlog(self):
        """A tcp: description becomes an endpoint that listens with ssx.net.tcp's port and the given backlog."""
        endpoint = tcp.server_endpoint(reactor, "tcp:0:interface=127.0.0.1", 4096)
        port = self.successResultOf(endpoint.listen(support.BuildingFactory(support.KeepingProtocol)))
        self.addCleanup(port.stopListening)
        self.assertIsInstance(port, tcp.Port)
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


class _PullSender:
    """An IPullProducer writing `chunks` one per resumeProducing (as FileSender does)."""

    def __init__(self, transport, chunks) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport
        self.chunks = list(chunks)

    def resumeProducing(self) -> None:
        if not self.chunks:
            self.transport.unregisterProducer()
            self.transport.loseConnection()
            return
        self.transport.write(self.chunks.pop(0))

    def stopProducing(self) -> None:
        self.chunks = []


class PullProducerTests(unittest.TestCase):
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
        server.transport.registerProducer(_PullSender(server.transport, chunks), False)
        timeout = reactor.callLater(3, client.transport.abortConnection)
        got = yield client.lost
        if timeout.active():
            timeout.cancel()
        self.assertEqual(got, b"".join(chunks))
