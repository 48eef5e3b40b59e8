"""
The server protocol alone: in-memory transports and a fake clock for the
handshake logic, and one real socket for the silence a prober sees.
"""

from __future__ import annotations

import os
import socket

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet import defer, threads
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from ssx.wire.address import Address, encode_address
from ssx.crypto import CipherSuite, make_suite
from ssx.interfaces import ITrafficCounter, IUserTrafficSink
from ssx.server.accounting import UserTrafficTable, counted
from ssx.server.forbidden import parse_forbidden
from ssx.server.protocol import ShadowsocksServerFactory
from tests import support
from tests.support import forged


class FakeResolver:
    """Answers every name with fixed addresses, recording what was asked."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.asked: list[str] = []

    def resolve(self, name: str) -> defer.Deferred:
        self.asked.append(name)
        return defer.succeed(self.addresses)


class ServerHandshakeTests(unittest.SynchronousTestCase):
    """The server's handshake, driven byte by byte on a fake reactor."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.suite = CipherSuite("aes-256-gcm", "pw")
        self.resolver = FakeResolver(["93.184.216.34"])
        self.factory = ShadowsocksServerFactory(
            self.reactor, self.suite, self.resolver, parse_forbidden(None), timeout=60
        )
        self.protocol = self.factory.buildProtocol(IPv4Address("TCP", "198.51.100.1", 40000))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "198.51.100.1", 40000))
        self.protocol.makeConnection(self.transport)

    def test_garbage_gets_silence_until_timeout(self):
        """Random bytes get no reply and no close until the timeout, then a graceful close (FIN, not abort)."""
        for _ in range(20):
            self.protocol.dataReceived(os.urandom(100))
        self.reactor.advance(59)
        self.assertEqual(self.transport.value(), b"")
        self.assertFalse(self.transport.disconnecting)
        self.reactor.advance(1)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.factory.handshake_failures, 1)

    def test_data_after_failure_does_not_extend_deadline(self):
        """A prober that keeps sending after a failure is still closed at the original deadline."""
        self.protocol.dataReceived(os.urandom(64))
        for _ in range(6):
            self.reactor.advance(10)
            self.protocol.dataReceived(os.urandom(64))
        self.assertTrue(self.transport.disconnecting)

    def test_header_split_byte_by_byte(self):
        """A request fed one byte at a time resolves the name, connects to the port, and forwards the first payload."""
        stream = self.suite.tcp_encryptor().encrypt(encode_address(Address("example.com", 443)) + b"hello")
        for i in range(len(stream)):
            self.protocol.dataReceived(stream[i : i + 1])
        self.assertEqual(self.resolver.asked, ["example.com"])
        [(host, port, factory, _, _)] = self.reactor.tcpClients
        self.assertEqual((host, port), ("93.184.216.34", 443))
        target = StringTransport()
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(target)
        self.assertEqual(target.value(), b"hello")
        # The reply direction is encrypted back to the client.
        protocol.dataReceived(b"world")
        self.assertEqual(self.suite.tcp_decryptor().decrypt(self.transport.value()), b"world")

    def test_forbidden_target_not_connected(self):
        """A name resolving to a forbidden address (loopback) is never connected to."""
        self.resolver.addresses = ["127.0.0.1"]
        stream = self.suite.tcp_encryptor().encrypt(encode_address(Address("evil.example", 22)) + b"x")
        self.protocol.dataReceived(stream)
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.factory.connections_refused, 1)

    def test_bytes_after_a_refused_header_are_ignored(self):
        """More bytes after a refused target neither pause nor reopen anything: the connection just closes."""
        self.resolver.addresses = ["127.0.0.1"]
        encryptor = self.suite.tcp_encryptor()
        self.protocol.dataReceived(encryptor.encrypt(encode_address(Address("evil.example", 22)) + b"x"))
        self.protocol.dataReceived(encryptor.encrypt(b"more"))
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(self.reactor.tcpClients, [])

    def test_reads_held_only_when_data_comes_during_connect(self):
        """The header alone leaves reads running; bytes before the target answers pause them; the answer resumes them."""
        encryptor = self.suite.tcp_encryptor()
        self.protocol.dataReceived(encryptor.encrypt(encode_address(Address("93.184.216.34", 443)) + b"first"))
        self.assertEqual(self.transport.producerState, "producing")
        self.protocol.dataReceived(encryptor.encrypt(b"second"))
        self.assertEqual(self.transport.producerState, "paused")
        [(_, _, factory, _, _)] = self.reactor.tcpClients
        target = StringTransport()
        factory.buildProtocol(None).makeConnection(target)
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(target.value(), b"firstsecond")

    def test_ipv4_mapped_loopback_forbidden(self):
        """An IPv6 literal that maps IPv4 loopback (::ffff:127.0.0.1) is refused too."""
        self.resolver.addresses = ["::ffff:127.0.0.1"]
        stream = self.suite.tcp_encryptor().encrypt(encode_address(Address("::ffff:127.0.0.1", 22)) + b"x")
        self.protocol.dataReceived(stream)
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.factory.connections_refused, 1)

    def test_bad_address_type_is_silent(self):
        """A correctly encrypted stream with a bad address type gets the same silence as garbage."""
        stream = self.suite.tcp_encryptor().encrypt(b"\x07\x00\x00\x00\x00\x00\x50")
        self.protocol.dataReceived(stream)
        self.assertEqual(self.transport.value(), b"")
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.factory.handshake_failures, 1)

    def test_idle_relay_times_out(self):
        """A relayed connection with no traffic for the timeout is aborted on both sides (a stalled reader cannot hold it)."""
        stream = self.suite.tcp_encryptor().encrypt(encode_address(Address("example.com", 80)) + b"GET")
        self.protocol.dataReceived(stream)
        [(_, _, factory, _, _)] = self.reactor.tcpClients
        target = StringTransport()
        factory.buildProtocol(None).makeConnection(target)
        self.reactor.advance(59)
        self.assertFalse(self.transport.disconnecting)
        self.reactor.advance(1)
        self.assertTrue(self.transport.disconnected)
        self.assertTrue(target.disconnected)

    def test_one_timer_for_all_connections(self):
        """Idle timeouts take one timer per factory, however many connections, and none once they are gone."""
        others = []
        for n in range(50):
            protocol = self.factory.buildProtocol(IPv4Address("TCP", "198.51.100.2", 40001 + n))
            transport = StringTransport()
            protocol.makeConnection(transport)
            others.append((protocol, transport))
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.reactor.advance(60)
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(all(t.disconnecting for _, t in others))
        for protocol, _ in [(self.protocol, self.transport)] + others:
            protocol.connectionLost(None)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_scoped_address_is_silent(self):
        """A name that is a scoped IPv6 address is no host name: nothing resolved or connected, silence until the timeout, nothing logged as an error."""
        from twisted.logger import globalLogPublisher

        errors: list = []
        observer = lambda event: errors.append(event) if event.get("log_failure") or event.get("isError") else None
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        transports = []
        for name in ("2001:db8::1%foo", "::1%lo"):
            protocol = self.factory.buildProtocol(None)
            transport = StringTransport(peerAddress=IPv4Address("TCP", "198.51.100.1", 40001))
            protocol.makeConnection(transport)
            # As a peer would send it: ATYP 3 with the scoped literal as the name.
            header = b"\x03" + bytes([len(name)]) + name.encode() + b"\x00\x50"
            protocol.dataReceived(self.suite.tcp_encryptor().encrypt(header + b"x"))
            transports.append(transport)
        self.reactor.advance(59)
        self.assertEqual([t.disconnecting for t in transports], [False, False])
        self.reactor.advance(1)
        self.assertEqual([(t.disconnecting, t.disconnected, t.value()) for t in transports], [(True, False, b"")] * 2)
        self.assertEqual((self.resolver.asked, self.reactor.tcpClients), ([], []))
        self.assertEqual(self.factory.handshake_failures, 2)
        self.assertEqual(errors, [])


class UserTrafficSinkTests(unittest.SynchronousTestCase):
    """The per-user accounting sink the server feeds, and the data path that feeds it."""

    def test_table_provides_the_sink(self) -> None:
        """UserTrafficTable is an IUserTrafficSink whose counters are ITrafficCounters; a factory keeps one by default."""
        table = UserTrafficTable()
        self.assertTrue(verifyObject(IUserTrafficSink, table))
        self.assertTrue(verifyObject(ITrafficCounter, table.counter("alice")))
        factory = ShadowsocksServerFactory(MemoryReactorClock(), make_suite("aes-128-gcm", "pw"), None, parse_forbidden(None))
        self.assertTrue(verifyObject(IUserTrafficSink, factory.user_traffic))

    def test_counted_data_path(self) -> None:
        """`counted` adds the plaintext each way to the user's counter; a user's connections share it."""
        table = UserTrafficTable()
        decrypt, encrypt = counted(table.counter("alice"), lambda data: data[1:], lambda data: b"#" + data)
        self.assertEqual(decrypt(b"xhello"), b"hello")
        self.assertEqual(encrypt(b"hi"), b"#hi")
        table.counter("alice").add_up(3)
        self.assertEqual((table["alice"].up, table["alice"].down), (8, 2))
        self.assertEqual(list(table), ["alice"])


class InvalidTargetTests(unittest.SynchronousTestCase):
    """
    Every method family: an authentic request whose target cannot be valid
    is closed exactly like garbage (no byte, no lookup, no connection, a FIN
    at the handshake timeout), while a valid one is acted on.
    """

    def _server(self, method: str) -> tuple[MemoryReactorClock, FakeResolver, ShadowsocksServerFactory]:
        reactor = MemoryReactorClock()
        resolver = FakeResolver(["93.184.216.34"])
        suite = make_suite(method, forged.password_for(method), now=reactor.seconds)
        return reactor, resolver, ShadowsocksServerFactory(reactor, suite, resolver, parse_forbidden(None), timeout=60)

    def _connect(self, factory: ShadowsocksServerFactory, stream: bytes) -> StringTransport:
        protocol = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "198.51.100.1", 40000))
        protocol.makeConnection(transport)
        protocol.dataReceived(stream)
        return transport

    def test_invalid_targets_silent(self):
        """stream, AEAD-2017 and 2022: each invalid header gets no byte, no lookup and no connection, and a FIN only at the timeout."""
        for family, method in forged.FAMILIES.items():
            reactor, resolver, factory = self._server(method)
            transports = {}
            for name, header in forged.INVALID_HEADERS.items():
                self.assertEqual(forged.reference_check(header), "invalid", name)
                transports[name] = self._connect(factory, forged.tcp_request(method, header, b"GET / HTTP/1.0\r\n\r\n", reactor.seconds))
            reactor.advance(59)
            self.assertEqual({n for n, t in transports.items() if t.disconnecting}, set(), family)
            reactor.advance(1)
            for name, transport in transports.items():
                self.assertEqual((transport.value(), transport.disconnecting, transport.disconnected), (b"", True, False), f"{family}: {name}")
            self.assertEqual((resolver.asked, reactor.tcpClients), ([], []), family)
            self.assertEqual(factory.handshake_failures, len(forged.INVALID_HEADERS), family)

    def test_valid_targets_acted_on(self):
        """stream, AEAD-2017 and 2022: the forged requests themselves are sound: a valid name is resolved and connected to."""
        for family, method in forged.FAMILIES.items():
            reactor, resolver, factory = self._server(method)
            for name in (b"example.com", b"_sip._tcp.example.com.", b"a-.b_c.example"):
                header = b"\x03" + bytes([len(name)]) + name + b"\x01\xbb"
                self._connect(factory, forged.tcp_request(method, header, b"x", reactor.seconds))
            self.assertEqual(resolver.asked, ["example.com", "_sip._tcp.example.com.", "a-.b_c.example"], family)
            self.assertEqual([c[:2] for c in reactor.tcpClients], [("93.184.216.34", 443)] * 3, family)
            self.assertEqual(factory.handshake_failures, 0, family)


class SilenceOnRealSocketTests(unittest.TestCase):
    """What a prober sees on a real socket: nothing at all, then a FIN at the timeout."""

    def _probe(self, port: int, garbage: bytes) -> tuple[bytes, float, str]:
        import time

        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(garbage)
            start = time.monotonic()
            s.settimeout(5)
            try:
                data = s.recv(4096)
                how = "fin" if data == b"" else "data"
            except ConnectionResetError:
                data, how = b"", "rst"
            return data, time.monotonic() - start, how

    @defer.inlineCallbacks
    def test_random_bytes_get_no_answer(self):
        """Random bytes get no byte back; the server closes with FIN only when its timeout has passed."""
        service, port = support.start_server(method="chacha20-ietf-poly1305", timeout=1.5)
        self.addCleanup(service.stopService)
        data, waited, how = yield threads.deferToThread(self._probe, port, os.urandom(77))
        self.assertEqual((data, how), (b"", "fin"))
        self.assertGreater(waited, 1.0)


class ServerFuzzTests(unittest.SynchronousTestCase):
    """Whatever a client sends, the server protocol never raises or logs an error."""

    def _feed(self, method: str, stream: bytes, cuts: list[int], addresses: list[str]) -> StringTransport:
        from twisted.logger import globalLogPublisher

        errors: list[dict] = []

        def observe(event: dict) -> None:
            if event.get("log_failure") is not None or event.get("isError"):
                errors.append(event)

        globalLogPublisher.addObserver(observe)
        try:
            reactor = MemoryReactorClock()
            factory = ShadowsocksServerFactory(
                reactor, CipherSuite(method, "pw"), FakeResolver(addresses), parse_forbidden(None), timeout=30
            )
            protocol = factory.buildProtocol(None)
            transport = StringTransport(peerAddress=IPv4Address("TCP", "198.51.100.1", 1))
            protocol.makeConnection(transport)
            start = 0
            for cut in sorted(set(c % (len(stream) + 1) for c in cuts)) + [len(stream)]:
                protocol.dataReceived(stream[start:cut])
                start = cut
            for _, _, client_factory, _, _ in reactor.tcpClients:
                target = client_factory.buildProtocol(None)
                target.makeConnection(StringTransport())
                target.dataReceived(b"reply")
            reactor.advance(31)
            protocol.connectionLost(None)
        finally:
            globalLogPublisher.removeObserver(observe)
        self.assertEqual(errors, [])
        return transport

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        plaintext=st.binary(max_size=300) | st.builds(lambda a, b: a + b, st.sampled_from([b"\x01", b"\x03", b"\x04"]), st.binary(max_size=300)),
        cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
        addresses=st.lists(st.sampled_from(["8.8.8.8", "127.0.0.1", "::1", "2001:db8::1", "::ffff:10.0.0.1"]), max_size=3),
    )
    def test_any_authenticated_plaintext(self, plaintext, cuts, addresses):
        """Arbitrary plaintext behind a valid AEAD encryption, cut anywhere, never raises or logs an error."""
        stream = CipherSuite("aes-128-gcm", "pw").tcp_encryptor().encrypt(plaintext) if plaintext else b""
        self._feed("aes-128-gcm", stream, cuts, addresses)

    @settings(max_examples=100, deadline=None)
    @given(garbage=st.binary(max_size=400), cuts=st.lists(st.integers(min_value=0, max_value=500), max_size=6))
    def test_stream_cipher_garbage(self, garbage, cuts):
        """Under a stream cipher garbage decrypts to anything; still nothing raises or logs an error."""
        self._feed("aes-256-cfb", garbage, cuts, ["8.8.8.8"])

    @settings(max_examples=100, deadline=None)
    @given(garbage=st.binary(max_size=400), cuts=st.lists(st.integers(min_value=0, max_value=500), max_size=6))
    def test_aead_garbage_silent(self, garbage, cuts):
        """Raw garbage to an AEAD server gets no byte back at all."""
        transport = self._feed("chacha20-ietf-poly1305", garbage, cuts, ["8.8.8.8"])
        self.assertEqual(transport.value(), b"")

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        family=st.sampled_from(sorted(forged.FAMILIES)),
        header=forged.header_bytes,
        payload=st.binary(max_size=40),
        cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=4),
    )
    def test_acts_only_on_valid_headers(self, family, header, payload, cuts):
        """stream, AEAD-2017, 2022: an authentic request with any header, cut anywhere, is looked up or connected only if its header passes the check; otherwise silence, then a FIN at the timeout."""
        from twisted.logger import globalLogPublisher

        method = forged.FAMILIES[family]
        errors: list[dict] = []
        observe = lambda event: errors.append(event) if event.get("log_failure") is not None or event.get("isError") else None
        reactor = MemoryReactorClock()
        resolver = FakeResolver(["93.184.216.34"])
        suite = make_suite(method, forged.password_for(method), now=reactor.seconds)
        factory = ShadowsocksServerFactory(reactor, suite, resolver, parse_forbidden(None), timeout=30)
        protocol = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "198.51.100.1", 1))
        stream = forged.tcp_request(method, header, payload, reactor.seconds)
        globalLogPublisher.addObserver(observe)
        try:
            protocol.makeConnection(transport)
            start = 0
            for cut in sorted(set(c % (len(stream) + 1) for c in cuts)) + [len(stream)]:
                protocol.dataReceived(stream[start:cut])
                start = cut
        finally:
            globalLogPublisher.removeObserver(observe)

        verdict = forged.reference_check(forged.request_plaintext(method, header, payload))
        acted = bool(resolver.asked or reactor.tcpClients or factory.connections_refused)
        self.assertEqual(errors, [])
        self.assertTrue(all(forged.reference_name(name.encode()) for name in resolver.asked), resolver.asked)
        if acted:
            self.assertEqual(verdict, "valid", "acted on a header that fails the check")
        elif verdict == "valid" and family != "aead2022":
            self.fail("a valid header was not acted on")
        if verdict != "valid":
            self.assertEqual(transport.value(), b"")
            reactor.advance(29)
            self.assertFalse(transport.disconnecting, "closed before the timeout")
            reactor.advance(1)
            self.assertEqual((transport.value(), transport.disconnecting, transport.disconnected), (b"", True, False))
        protocol.connectionLost(None)
