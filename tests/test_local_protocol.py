"""
The local protocol alone: SOCKS5 in, one encrypted first write out, on
in-memory transports and a fake clock.
"""

from __future__ import annotations

import errno

from twisted.internet import defer
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError, NoRouteError, TimeoutError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from ssx.wire import socks5
from ssx.wire.address import Address, decode_address, encode_address
from ssx.crypto import CipherSuite
from ssx.local.picker import ServerPicker
from ssx.local.upstream import Upstream
from ssx.local.relay import FIRST_DATA_WAIT
from ssx.local.socks import ProxyPortFactory, reply_code_for
from ssx.config.upstreams import ServerEntry

GREETING = b"\x05\x01\x00"
CONNECT_EXAMPLE = b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"


class FakeServerConnector:
    """Stands in for the server endpoint: records each connection attempt."""

    def __init__(self) -> None:
        self.attempts: list[tuple[object, defer.Deferred]] = []

    def __call__(self, protocol: object) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.attempts.append((protocol, d))
        return d

    def succeed(self) -> StringTransport:
        protocol, d = self.attempts[-1]
        transport = StringTransport()
        protocol.makeConnection(transport)  # type: ignore[attr-defined]
        d.callback(protocol)
        return transport

    def fail(self, error: Exception) -> None:
        self.attempts[-1][1].errback(Failure(error))


class LocalProtocolTests(unittest.SynchronousTestCase):
    """SOCKS5 negotiation, reply timing and the first encrypted write."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.suite = CipherSuite("chacha20-ietf-poly1305", "pw")
        self.server = FakeServerConnector()
        entry = ServerEntry("192.0.2.1", 8388, "chacha20-ietf-poly1305", "pw")
        self.factory = ProxyPortFactory(self.clock, ServerPicker([Upstream(entry, self.suite, self.server)]), timeout=300)
        self.protocol = self.factory.buildProtocol(None)
        self.app = StringTransport()
        self.protocol.makeConnection(self.app)

    def negotiate(self) -> None:
        self.protocol.dataReceived(GREETING + CONNECT_EXAMPLE)
        self.assertEqual(self.app.value(), b"\x05\x00")
        self.app.clear()

    def decrypt_upstream(self, upstream: StringTransport) -> bytes:
        return self.suite.tcp_decryptor().decrypt(upstream.value())

    def test_reply_after_server_connects(self):
        """Success is replied only once the server connection is up, with the full 10-byte reply."""
        self.negotiate()
        self.assertEqual(self.app.value(), b"")
        self.server.succeed()
        self.assertEqual(self.app.value(), socks5.build_reply(socks5.REP_SUCCEEDED))
        self.assertEqual(len(self.app.value()), 10)

    def test_header_and_first_data_in_one_write(self):
        """The address header and the application's first bytes leave in one encrypted write."""
        self.negotiate()
        upstream = self.server.succeed()
        self.assertEqual(upstream.value(), b"")
        self.protocol.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        plain = self.decrypt_upstream(upstream)
        address, end = decode_address(plain)
        self.assertEqual(address, Address("example.com", 443))
        self.assertEqual(plain[end:], b"GET / HTTP/1.1\r\n\r\n")
        # One AEAD chunk: salt + length chunk + payload chunk.
        self.assertEqual(len(upstream.value()), 32 + 18 + len(plain) + 16)

    def test_pipelined_data_sent_with_header(self):
        """Data pipelined right after the CONNECT request goes with the header."""
        self.protocol.dataReceived(GREETING + CONNECT_EXAMPLE + b"early")
        upstream = self.server.succeed()
        plain = self.decrypt_upstream(upstream)
        self.assertEqual(plain, encode_address(Address("example.com", 443)) + b"early")

    def test_header_alone_after_wait(self):
        """A server-speaks-first protocol still works: the header goes alone after a short wait."""
        self.negotiate()
        upstream = self.server.succeed()
        self.clock.advance(FIRST_DATA_WAIT)
        self.assertEqual(self.decrypt_upstream(upstream), encode_address(Address("example.com", 443)))
        self.protocol.dataReceived(b"later")
        self.assertEqual(self.decrypt_upstream(upstream), encode_address(Address("example.com", 443)) + b"later")

    def test_downstream_decrypted(self):
        """The server's encrypted reply reaches the application as plaintext."""
        self.negotiate()
        upstream_protocol = self.server.attempts[-1][0]
        self.server.succeed()
        self.app.clear()
        upstream_protocol.dataReceived(self.suite.tcp_encryptor().encrypt(b"response bytes"))
        self.assertEqual(self.app.value(), b"response bytes")

    def test_bad_server_stream_closes_both(self):
        """A server stream that fails authentication (wrong password) closes both connections."""
        self.negotiate()
        upstream_protocol = self.server.attempts[-1][0]
        upstream = self.server.succeed()
        upstream_protocol.dataReceived(CipherSuite("chacha20-ietf-poly1305", "other").tcp_encryptor().encrypt(b"x" * 50))
        self.assertTrue(self.app.disconnecting)
        self.assertTrue(upstream.disconnecting)

    def test_server_refused(self):
        """A refused server connection gives reply 05 and closes."""
        self.negotiate()
        self.server.fail(ConnectionRefusedError())
        self.assertEqual(self.app.value(), socks5.build_reply(socks5.REP_CONNECTION_REFUSED))
        self.assertTrue(self.app.disconnecting)

    def test_target_no_server_acts_on(self):
        """A target no server would act on (not a host name, port 0) gets reply 01 at once, with no server connection."""
        for host, port in ((b"a..b", 80), (b"bad host", 80), (b"example.com", 0)):
            self.setUp()
            request = b"\x05\x01\x00\x03" + bytes([len(host)]) + host + port.to_bytes(2, "big")
            self.protocol.dataReceived(GREETING + request)
            self.assertEqual(self.app.value(), b"\x05\x00" + socks5.build_reply(socks5.REP_GENERAL_FAILURE), host)
            self.assertTrue(self.app.disconnecting)
            self.assertEqual(self.server.attempts, [])

    def test_bind_not_supported(self):
        """BIND gets reply 07 (command not supported) and no server connection."""
        self.protocol.dataReceived(GREETING + b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50")
        self.assertEqual(self.app.value(), b"\x05\x00" + socks5.build_reply(socks5.REP_COMMAND_NOT_SUPPORTED))
        self.assertTrue(self.app.disconnecting)
        self.assertEqual(self.server.attempts, [])

    def test_udp_associate_not_supported_yet(self):
        """UDP ASSOCIATE gets reply 07 until the UDP relay exists."""
        self.protocol.dataReceived(GREETING + b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
        self.assertEqual(self.app.value(), b"\x05\x00" + socks5.build_reply(socks5.REP_COMMAND_NOT_SUPPORTED))

    def test_app_closing_cancels_connect(self):
        """An application that leaves while the server connection is pending cancels it."""
        self.negotiate()
        self.protocol.connectionLost(Failure(ConnectionRefusedError()))
        self.assertTrue(self.server.attempts[-1][1].called)


class ReplyCodeTests(unittest.SynchronousTestCase):
    """Failures to reach the server map to the SOCKS5 reply codes of RFC 1928."""

    def test_mapping(self):
        """Refused -> 05, no route -> 03, DNS failure -> 04, timeout -> 06, EHOSTUNREACH -> 04, other -> 01."""
        cases = [
            (ConnectionRefusedError(), 5),
            (NoRouteError(), 3),
            (DNSLookupError(), 4),
            (TimeoutError(), 6),
            (ConnectError(osError=errno.EHOSTUNREACH), 4),
            (ValueError(), 1),
        ]
        for error, code in cases:
            self.assertEqual(reply_code_for(Failure(error)), code, error)


class BrokenRelayLogTests(unittest.SynchronousTestCase):
    """What ssx-local logs when a server's stream fails to decrypt, which anything on the path can cause."""

    def test_first_warns_then_counts(self):
        """The first broken stream is one warning; later ones are counted, with a line each only with verbose."""
        from twisted.logger import LogLevel, globalLogPublisher

        from ssx.errors import AuthenticationError
        from ssx.local.relay import LocalFactory

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for verbose, expected in ((False, [LogLevel.warn]), (True, [LogLevel.warn, LogLevel.debug, LogLevel.debug])):
            del events[:]
            factory = LocalFactory(MemoryReactorClock(), ServerPicker([]), verbose=verbose)
            for _ in range(3):
                factory.relay_broken(AuthenticationError("bad tag"))
            mine = [e for e in events if e.get("log_namespace") == "ssx.local.relay"]
            self.assertEqual([e["log_level"] for e in mine], expected)
            self.assertEqual(factory.relays_broken, 3)
