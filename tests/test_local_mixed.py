"""
The mixed port on in-memory transports: protocol sniffing, SOCKS4/4a, HTTP
CONNECT and plain forwarding (framing, keep-alive across hosts), proxy
authentication, and failover to the next server before anything was relayed.
"""

from __future__ import annotations

import base64
import time

from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from ssx.wire import socks4

from ssx.wire import socks5
from ssx.wire.address import Address, decode_address
from ssx.crypto import CipherSuite
from ssx.interfaces import IServerPicker, IUpstream
from ssx.local.front import MixedLocalFactory
from ssx.local.picker import ServerPicker
from ssx.local.upstream import Upstream, make_upstream
from ssx.config.upstreams import ServerEntry
from tests.support import FakeServer, HalfCloseTransport as Transport, Link


class MixedTestCase(unittest.SynchronousTestCase):
    credentials: tuple[bytes, bytes] | None = None

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        # Each server has its own password: the bytes show which one was used.
        self.servers = [FakeServer(CipherSuite("aes-128-gcm", f"pw{i}")) for i in range(3)]
        self.picker = ServerPicker(
            Upstream(ServerEntry(f"192.0.2.{i + 1}", 8388, "aes-128-gcm", f"pw{i}"), s.suite, s)
            for i, s in enumerate(self.servers)
        )
        self.factory = MixedLocalFactory(self.clock, self.picker, 300, self.credentials)
        self.app = Transport()
        self.protocol = self.factory.buildProtocol(None)
        self.protocol.makeConnection(self.app)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def take(self) -> bytes:
        out = self.app.value()
        self.app.clear()
        return out


class SniffTests(MixedTestCase):
    """The first byte picks the protocol."""

    def test_socks5(self):
        """0x05: SOCKS5, replied only once the server connection is up."""
        self.send(b"\x05\x01\x00\x05\x01\x00\x03\x0bexample.com\x01\xbb")
        self.assertEqual(self.take(), b"\x05\x00")
        link = self.servers[0].succeed()
        self.assertEqual(self.take(), socks5.build_reply(socks5.REP_SUCCEEDED))
        self.send(b"hello")
        self.assertEqual(link.target_and_data(), (Address("example.com", 443), b"hello"))

    def test_unknown_first_byte(self):
        """A first byte that is no proxy protocol closes the connection without any server attempt."""
        self.send(b"\x16\x03\x01\x00")
        self.assertTrue(self.app.disconnecting)
        self.assertEqual([s.attempts for s in self.servers], [[], [], []])

    def test_silent_client_times_out(self):
        """A client that sends nothing is closed at the idle timeout."""
        self.clock.advance(299)
        self.assertFalse(self.app.disconnecting)
        self.clock.advance(2)
        self.assertTrue(self.app.disconnecting)

    def test_picker_interface(self):
        """ServerPicker provides IServerPicker."""
        self.assertTrue(verifyObject(IServerPicker, self.picker))

    def test_upstream_interface(self):
        """Upstream provides IUpstream, as given here and as built from a configured server."""
        self.assertTrue(verifyObject(IUpstream, self.picker.upstreams()[0]))
        built = make_upstream(self.clock, ServerEntry("192.0.2.9", 8388, "aes-128-gcm", "pw"))
        self.assertTrue(verifyObject(IUpstream, built))


class Socks4Tests(MixedTestCase):
    """SOCKS4 and 4a on the mixed port."""

    def test_socks4_ip(self):
        """SOCKS4: granted (90) after the server connects; header and first data leave in one write."""
        self.send(b"\x04\x01\x00\x50\xc0\x00\x02\x63user\x00GET / HTTP/1.0\r\n\r\n")
        self.assertEqual(self.take(), b"")
        link = self.servers[0].succeed()
        self.assertEqual(self.take(), socks4.build_reply(socks4.REP_GRANTED))
        self.assertEqual(link.target_and_data(), (Address("192.0.2.99", 80), b"GET / HTTP/1.0\r\n\r\n"))

    def test_socks4a_name(self):
        """SOCKS4a: the host name goes to the server for it to resolve."""
        self.send(b"\x04\x01\x01\xbb\x00\x00\x00\x01\x00example.org\x00")
        link = self.servers[0].succeed()
        self.assertEqual(self.take(), socks4.build_reply(socks4.REP_GRANTED))
        self.clock.advance(1)
        self.assertEqual(link.target_and_data(), (Address("example.org", 443), b""))

    def test_socks4_failure(self):
        """When no server can be reached the answer is 91 (rejected)."""
        self.send(b"\x04\x01\x00\x50\xc0\x00\x02\x63\x00")
        for server in self.servers:
            server.fail(ConnectionRefusedError())
        self.assertEqual(self.take(), socks4.build_reply(socks4.REP_REJECTED))
        self.assertTrue(self.app.disconnecting)


class Socks4WithCredentialsTests(MixedTestCase):
    """SOCKS4 cannot carry a password."""

    credentials = (b"alice", b"s3cret")

    def test_refused(self):
        """With credentials required, SOCKS4 is rejected (91) and no server is contacted."""
        self.send(b"\x04\x01\x00\x50\xc0\x00\x02\x63alice\x00")
        self.assertEqual(self.take(), socks4.build_reply(socks4.REP_REJECTED))
        self.assertTrue(self.app.disconnecting)
        self.assertEqual(self.servers[0].attempts, [])


class FailoverTests(MixedTestCase):
    """A server that cannot be reached before anything was relayed is replaced by the next, unseen by the application."""

    def test_next_server(self):
        """Server 1 refuses: server 2 carries the connection with its own keys; the app sees one success."""
        self.send(b"\x05\x01\x00\x05\x01\x00\x01\xc0\x00\x02\x01\x00\x16early")
        self.take()
        self.servers[0].fail(ConnectionRefusedError())
        self.assertEqual(self.take(), b"")
        self.assertFalse(self.app.disconnecting)
        link = self.servers[1].succeed()
        self.assertEqual(self.take(), socks5.build_reply(socks5.REP_SUCCEEDED))
        self.assertEqual(link.target_and_data(), (Address("192.0.2.1", 22), b"early"))
        up, _, failures = self.picker.health(self.picker.upstreams()[0])
        self.assertEqual((up, failures), (False, 1))

    def test_down_server_tried_last(self):
        """Once a server failed, new connections start with the others."""
        first = self.picker.upstreams()[0]
        self.picker.failed(first, "test")
        self.send(b"\x05\x01\x00\x05\x01\x00\x01\xc0\x00\x02\x01\x00\x16")
        self.assertEqual(self.servers[0].attempts, [])
        self.assertEqual(len(self.servers[1].attempts), 1)

    def test_all_fail(self):
        """When every server fails, the application gets the SOCKS5 code of the last failure."""
        self.send(b"\x05\x01\x00\x05\x01\x00\x01\xc0\x00\x02\x01\x00\x16")
        self.take()
        for server in self.servers:
            server.fail(ConnectionRefusedError())
        self.assertEqual(self.take(), socks5.build_reply(socks5.REP_CONNECTION_REFUSED))
        self.assertTrue(self.app.disconnecting)

    def test_latency_ranks(self):
        """The health check's latencies order the servers: the fastest up server first."""
        ups = self.picker.upstreams()
        self.picker.checked(ups[0], 0.300)
        self.picker.checked(ups[1], 0.010)
        self.picker.checked(ups[2], None)
        self.assertEqual(self.picker.candidates(), [ups[1], ups[0], ups[2]])
        self.picker.checked(ups[2], 0.001)
        self.assertEqual(self.picker.candidates()[0], ups[2])

    def test_no_server(self):
        """With no server known (an online config not yet fetched) the application is refused at once."""
        empty = MixedLocalFactory(self.clock, ServerPicker(), 300)
        protocol = empty.buildProtocol(None)
        app = Transport()
        protocol.makeConnection(app)
        protocol.dataReceived(b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n")
        self.assertTrue(app.value().startswith(b"HTTP/1.1 502 "))
        self.assertTrue(app.disconnecting)


def response(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    head = f"HTTP/1.1 {status}\r\n" + "".join(h + "\r\n" for h in headers)
    return head.encode() + b"\r\n" + body


class HttpConnectTests(MixedTestCase):
    """HTTP CONNECT tunnels."""

    def test_connect(self):
        """CONNECT answers 200 once the server connection is up, then relays bytes untouched both ways."""
        self.send(b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n\x16\x03\x01")
        self.assertEqual(self.take(), b"")
        link = self.servers[0].succeed()
        self.assertEqual(self.take(), b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.assertEqual(link.target_and_data(), (Address("example.org", 443), b"\x16\x03\x01"))
        link.answer(b"\x16\x03\x03server hello")
        self.assertEqual(self.take(), b"\x16\x03\x03server hello")

    def test_connect_without_host(self):
        """CONNECT without Host (as some clients send it) tunnels to the target of its request line."""
        self.send(b"CONNECT example.org:443 HTTP/1.1\r\nUser-Agent: t\r\n\r\n\x16\x03\x01")
        link = self.servers[0].succeed()
        self.assertEqual(self.take(), b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.assertEqual(link.target_and_data(), (Address("example.org", 443), b"\x16\x03\x01"))

    def test_connect_failure(self):
        """When no server can be reached, CONNECT gets 502 and the connection closes."""
        self.send(b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n")
        for server in self.servers:
            server.fail(ConnectionRefusedError())
        self.assertTrue(self.take().startswith(b"HTTP/1.1 502 Bad Gateway\r\n"))
        self.assertTrue(self.app.disconnecting)

    def test_connect_to_no_host_name(self):
        """CONNECT to a target no server acts on (not a host name) gets 400 at once, with no server attempt."""
        self.send(b"CONNECT a..b:443 HTTP/1.1\r\nHost: a..b:443\r\n\r\n")
        self.assertTrue(self.take().startswith(b"HTTP/1.1 400 "))
        self.assertTrue(self.app.disconnecting)
        self.assertEqual([server.attempts for server in self.servers], [[] for _ in self.servers])

    def test_head_too_large(self):
        """A request head over 64 KiB gets 431 and the connection closes, with no server attempt."""
        self.send(b"GET http://h/ HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * (65 * 1024))
        self.assertTrue(self.take().startswith(b"HTTP/1.1 431 "))
        self.assertTrue(self.app.disconnecting)
        self.assertEqual(self.servers[0].attempts, [])

    def test_origin_form_refused(self):
        """A request that is not for a proxy (origin form) gets 400, with Host or without, and no server attempt."""
        for request in (b"GET /index.html HTTP/1.1\r\nHost: h\r\n\r\n", b"GET /index.html HTTP/1.1\r\n\r\n"):
            app = Transport()
            protocol = self.factory.buildProtocol(None)
            protocol.makeConnection(app)
            protocol.dataReceived(request)
            self.assertTrue(app.value().startswith(b"HTTP/1.1 400 "), request)
            self.assertTrue(app.disconnecting)
        self.assertEqual(self.servers[0].attempts, [])


class HttpAuthTests(MixedTestCase):
    """Basic proxy authentication with the shared credentials."""

    credentials = (b"alice", b"s3cret")

    def auth(self, user: str, password: str) -> str:
        return "Proxy-Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def test_missing(self):
        """Without credentials: 407 with a Basic challenge, and no server attempt."""
        self.send(b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n")
        out = self.take()
        self.assertTrue(out.startswith(b"HTTP/1.1 407 "))
        self.assertIn(b'Proxy-Authenticate: Basic realm="ssx"', out)
        self.assertEqual(self.servers[0].attempts, [])

    def test_wrong(self):
        """Wrong credentials on CONNECT: 407."""
        self.send(f"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n{self.auth('alice', 'nope')}\r\n\r\n".encode())
        self.assertTrue(self.take().startswith(b"HTTP/1.1 407 "))

    def test_right(self):
        """Right credentials: the request goes on, without its Proxy-Authorization header."""
        self.send(f"GET http://h/ HTTP/1.1\r\nHost: h\r\n{self.auth('alice', 's3cret')}\r\n\r\n".encode())
        link = self.servers[0].succeed()
        self.assertEqual(link.target_and_data(), (Address("h", 80), b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"))


class HttpForwardTests(MixedTestCase):
    """Plain absolute-form HTTP: rewriting, framing and keep-alive across hosts."""

    def test_get_rewritten(self):
        """The request reaches the origin in origin form with Host set, in the first encrypted write."""
        self.send(b"GET http://a.example:8080/x?y HTTP/1.1\r\nHost: a.example:8080\r\nProxy-Connection: keep-alive\r\nAccept: */*\r\n\r\n")
        link = self.servers[0].succeed()
        self.assertEqual(
            link.target_and_data(),
            (Address("a.example", 8080), b"GET /x?y HTTP/1.1\r\nHost: a.example:8080\r\nAccept: */*\r\n\r\n"),
        )

    def test_keep_alive_same_host_then_other_host(self):
        """Same host: the server connection is reused; another host: it is closed and a new one opened; all answers arrive."""
        self.send(b"GET http://a.example/1 HTTP/1.1\r\nHost: a.example\r\n\r\n")
        first = self.servers[0].succeed()
        first.answer(response(b"one", "Content-Length: 3"))
        self.assertEqual(self.take(), response(b"one", "Content-Length: 3"))
        self.send(b"GET http://a.example/2 HTTP/1.1\r\nHost: a.example\r\n\r\n")
        self.assertEqual(len(self.servers[0].attempts), 1)
        first.answer(response(b"two", "Content-Length: 3"))
        self.assertEqual(self.take(), response(b"two", "Content-Length: 3"))
        self.assertEqual(
            first.target_and_data()[1],
            b"GET /1 HTTP/1.1\r\nHost: a.example\r\n\r\nGET /2 HTTP/1.1\r\nHost: a.example\r\n\r\n",
        )
        self.send(b"GET http://b.example/3 HTTP/1.1\r\nHost: b.example\r\n\r\n")
        self.assertTrue(first.transport.disconnecting)
        second = self.servers[0].succeed()
        self.assertEqual(second.target_and_data(), (Address("b.example", 80), b"GET /3 HTTP/1.1\r\nHost: b.example\r\n\r\n"))
        first.close()  # the old connection's end must not end the client's
        self.assertFalse(self.app.disconnecting)
        second.answer(response(b"three", "Content-Length: 5"))
        self.assertEqual(self.take(), response(b"three", "Content-Length: 5"))
        self.assertFalse(self.app.disconnecting)

    def test_pipelined_request_waits(self):
        """A second request sent before the first response is held until that response is complete."""
        self.send(b"GET http://a/1 HTTP/1.1\r\nHost: a\r\n\r\nGET http://b/2 HTTP/1.1\r\nHost: b\r\n\r\n")
        first = self.servers[0].succeed()
        self.assertEqual(first.target_and_data()[1], b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(len(self.servers[0].attempts), 1)
        first.answer(response(b"abc", "Content-Length: 3")[:-1])
        self.assertEqual(len(self.servers[0].attempts), 1)
        first.answer(b"c")
        self.assertEqual(len(self.servers[0].attempts), 2)
        second = self.servers[0].succeed()
        self.assertEqual(second.target_and_data(), (Address("b", 80), b"GET /2 HTTP/1.1\r\nHost: b\r\n\r\n"))

    def test_chunked_response_then_next(self):
        """A chunked response ends at its last chunk; the next request then goes out on the same connection."""
        self.send(b"GET http://a/1 HTTP/1.1\r\nHost: a\r\n\r\n")
        link = self.servers[0].succeed()
        body = b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"
        link.answer(response(body[:9], "Transfer-Encoding: chunked"))
        link.answer(body[9:])
        self.assertEqual(self.take(), response(body, "Transfer-Encoding: chunked"))
        self.send(b"HEAD http://a/2 HTTP/1.1\r\nHost: a\r\n\r\n")
        link.answer(response(b"", "Content-Length: 100"))
        self.assertEqual(self.take(), response(b"", "Content-Length: 100"))
        self.send(b"GET http://a/3 HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertIn(b"GET /3 HTTP/1.1", link.sent())
        self.assertEqual(len(self.servers[0].attempts), 1)

    def test_upload_bodies(self):
        """Content-Length and chunked request bodies pass through whole, and the next request is found after them."""
        self.send(b"POST http://a/u HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n01234")
        link = self.servers[0].succeed()
        self.send(b"56789")
        link.answer(response(b"", "Content-Length: 0"))
        self.send(b"PUT http://a/v HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        link.answer(response(b"", "Content-Length: 0"))
        self.assertEqual(
            link.target_and_data()[1],
            b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123456789"
            b"PUT /v HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        )
        self.assertEqual(self.take(), 2 * response(b"", "Content-Length: 0"))

    def test_continue_forwarded(self):
        """100 Continue reaches the client before the final response."""
        self.send(b"POST http://a/u HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        link = self.servers[0].succeed()
        link.answer(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(self.take(), b"HTTP/1.1 100 Continue\r\n\r\n")
        self.send(b"ok")
        link.answer(response(b"", "Content-Length: 0", status="201 Created"))
        self.assertEqual(self.take(), response(b"", "Content-Length: 0", status="201 Created"))
        self.assertIn(b"\r\n\r\nok", link.sent())

    def test_until_close_response(self):
        """A response without length ends when the origin closes; an HTTP/1.1 client gets it chunked and keeps its connection."""
        self.send(b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n")
        link = self.servers[0].succeed()
        link.answer(b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\nsome data")
        link.answer(b" and more")
        self.assertEqual(
            self.take(), b"HTTP/1.1 200 OK\r\nServer: old\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nsome data\r\n9\r\n and more\r\n"
        )
        link.protocol.readConnectionLost()
        self.assertEqual(self.take(), b"0\r\n\r\n")
        self.assertFalse(self.app.disconnecting)
        self.assertTrue(link.transport.disconnecting)
        self.send(b"GET http://a/2 HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(self.servers[0].succeed().target_and_data()[1], b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")

    def test_until_close_response_http10_client(self):
        """An HTTP/1.0 client gets a response without length as it came, ended by closing its connection."""
        self.send(b"GET http://a/ HTTP/1.0\r\n\r\n")
        link = self.servers[0].succeed()
        self.assertEqual(link.target_and_data()[1], b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        link.answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nsome data")
        self.assertEqual(self.take(), b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nsome data")
        self.assertFalse(self.app.disconnecting)
        link.protocol.readConnectionLost()
        self.assertTrue(self.app.disconnecting)

    def test_http10_keep_alive(self):
        """HTTP/1.0 with Connection or Proxy-Connection: keep-alive keeps both connections across responses of known length; without it, the next closes."""
        self.send(b"GET http://a/1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        link = self.servers[0].succeed()
        self.assertEqual(link.target_and_data()[1], b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
        link.answer(response(b"one", "Content-Length: 3"))
        self.assertEqual(self.take(), response(b"one", "Content-Length: 3", "Connection: keep-alive"))
        self.send(b"GET http://a/2 HTTP/1.0\r\nProxy-Connection: Keep-Alive\r\n\r\n")
        link.answer(response(b"", "Content-Length: 0", status="204 No Content"))
        self.assertEqual(self.take(), response(b"", "Content-Length: 0", "Connection: keep-alive", status="204 No Content"))
        self.assertFalse(self.app.disconnecting)
        self.send(b"GET http://a/3 HTTP/1.0\r\n\r\n")
        link.answer(response(b"3", "Content-Length: 1"))
        self.assertEqual(self.take(), response(b"3", "Content-Length: 1", "Connection: close"))
        self.assertTrue(self.app.disconnecting)
        self.assertEqual(len(self.servers[0].attempts), 1)
        self.assertEqual(
            link.target_and_data()[1],
            b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\nGET /3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )

    def test_http10_keep_alive_unknown_length(self):
        """An HTTP/1.0 client that asked for keep-alive gets a response without length as it came, ended by closing."""
        self.send(b"GET http://a/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        link = self.servers[0].succeed()
        link.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nsome\r\n")
        self.assertEqual(self.take(), b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nsome")
        link.answer(b"0\r\n\r\n")
        self.assertTrue(self.app.disconnecting)

    def test_missing_host(self):
        """An HTTP/1.1 absolute-form request without Host goes on, with Host from its URL."""
        self.send(b"GET http://a.example:8080/x HTTP/1.1\r\nAccept: */*\r\n\r\n")
        link = self.servers[0].succeed()
        self.assertEqual(
            link.target_and_data(),
            (Address("a.example", 8080), b"GET /x HTTP/1.1\r\nHost: a.example:8080\r\nAccept: */*\r\n\r\n"),
        )
        link.answer(response(b"x", "Content-Length: 1"))
        self.assertEqual(self.take(), response(b"x", "Content-Length: 1"))
        self.assertFalse(self.app.disconnecting)

    def test_client_close_request(self):
        """Connection: close from the client is passed on and the client connection closes after the response."""
        self.send(b"GET http://a/ HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        link = self.servers[0].succeed()
        self.assertIn(b"Connection: close\r\n", link.sent())
        link.answer(response(b"x", "Content-Length: 1"))
        self.assertEqual(self.take(), response(b"x", "Content-Length: 1", "Connection: close"))
        self.assertTrue(self.app.disconnecting)

    def test_origin_closes_without_answer(self):
        """A fresh server connection that ends before any response gives 502."""
        self.send(b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n")
        link = self.servers[0].succeed()
        link.close()
        self.assertTrue(self.take().startswith(b"HTTP/1.1 502 "))
        self.assertTrue(self.app.disconnecting)

    def test_kept_connection_dies(self):
        """A kept server connection that ends under the next request closes the client without an answer (clients retry)."""
        self.send(b"GET http://a/1 HTTP/1.1\r\nHost: a\r\n\r\n")
        link = self.servers[0].succeed()
        link.answer(response(b"", "Content-Length: 0"))
        self.take()
        self.send(b"GET http://a/2 HTTP/1.1\r\nHost: a\r\n\r\n")
        link.close()
        self.assertEqual(self.take(), b"")
        self.assertTrue(self.app.disconnecting)

    def test_idle_kept_connection_closed_by_origin(self):
        """When the origin closes an idle kept connection the client stays, and its next request opens a new one."""
        self.send(b"GET http://a/1 HTTP/1.1\r\nHost: a\r\n\r\n")
        link = self.servers[0].succeed()
        link.answer(response(b"", "Content-Length: 0"))
        link.protocol.readConnectionLost()
        self.assertFalse(self.app.disconnecting)
        self.send(b"GET http://a/2 HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(len(self.servers[0].attempts), 2)

    def test_bad_response(self):
        """A malformed response head gives 502."""
        self.send(b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n")
        link = self.servers[0].succeed()
        link.answer(b"garbage\r\n\r\n")
        self.assertTrue(self.take().startswith(b"HTTP/1.1 502 "))
        self.assertTrue(self.app.disconnecting)


class HttpHardeningTests(MixedTestCase):
    """Hostile heads: slow delivery, bad Content-Length, and what the log says."""

    def head_cost(self, size: int) -> float:
        """CPU seconds to take a `size`-byte request head one byte per read (the best of two runs)."""
        head = b"GET http://h/ HTTP/1.1\r\nHost: h\r\nX-Pad: "
        head += b"a" * (size - len(head) - 4) + b"\r\n\r\n"
        pieces = [head[i : i + 1] for i in range(len(head))]
        best = float("inf")
        for _ in range(2):
            attempts = len(self.servers[0].attempts)
            protocol = self.factory.buildProtocol(None)
            protocol.makeConnection(Transport())
            start = time.process_time()
            for piece in pieces:
                protocol.dataReceived(piece)
            best = min(best, time.process_time() - start)
            self.assertEqual(len(self.servers[0].attempts), attempts + 1, "the request did not go out")
        return best

    def test_head_one_byte_per_read_is_linear(self):
        """A head read one byte at a time costs CPU in proportion to its size: 63 KiB at most 50x 4 KiB (a rescan per read: 160x)."""
        self.head_cost(4096)  # warm up
        small = self.head_cost(4096)
        big = self.head_cost(63 * 1024)
        self.assertLess(big / small, 50, f"4 KiB: {small:.4f} s, 63 KiB: {big:.4f} s")

    def response_head_cost(self, size: int) -> float:
        """CPU seconds to take an origin's `size`-byte response head one byte per read (the best of two runs)."""
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Pad: "
        head += b"a" * (size - len(head) - 4) + b"\r\n\r\n"
        best = float("inf")
        for _ in range(2):
            app = Transport()
            protocol = self.factory.buildProtocol(None)
            protocol.makeConnection(app)
            protocol.dataReceived(b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n")
            link = self.servers[0].succeed()
            encrypt = link.suite.tcp_encryptor().encrypt
            pieces = [encrypt(head[i : i + 1]) for i in range(len(head))]
            start = time.process_time()
            for piece in pieces:
                link.protocol.dataReceived(piece)
            best = min(best, time.process_time() - start)
            self.assertTrue(app.value().startswith(b"HTTP/1.1 200 OK\r\n"), "the response did not go out")
        return best

    def test_response_head_one_byte_per_read_is_linear(self):
        """An origin's response head read one byte at a time costs CPU in proportion to its size: 63 KiB at most 40x 4 KiB (a rescan: 85x)."""
        self.response_head_cost(4096)  # warm up
        small = self.response_head_cost(4096)
        big = self.response_head_cost(63 * 1024)
        # Each read is also decrypted, which dilutes the ratio of a rescan.
        self.assertLess(big / small, 40, f"4 KiB: {small:.4f} s, 63 KiB: {big:.4f} s")

    def test_bad_request_content_length(self):
        """Content-Length other than at most 20 ASCII digits gets 400 and the connection closes, with no server attempt."""
        for value in ("\u00b2", "\u0661", "9" * 5000, "9" * 21, "+5", "0x5", "5 5", "1,2"):
            with self.subTest(value=value):
                app = Transport()
                protocol = self.factory.buildProtocol(None)
                protocol.makeConnection(app)
                protocol.dataReceived(f"POST http://h/ HTTP/1.1\r\nHost: h\r\nContent-Length: {value}\r\n\r\n".encode())
                self.assertTrue(app.value().startswith(b"HTTP/1.1 400 "), app.value()[:40])
                self.assertTrue(app.disconnecting)
        self.assertEqual(self.servers[0].attempts, [])

    def test_bad_response_content_length(self):
        """An origin's Content-Length other than at most 20 ASCII digits gets 502 and the connection closes."""
        for value in ("\u00b2", "9" * 5000, "9" * 21, "-1"):
            with self.subTest(value=value):
                app = Transport()
                protocol = self.factory.buildProtocol(None)
                protocol.makeConnection(app)
                protocol.dataReceived(b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n")
                link = self.servers[0].succeed()
                link.answer(f"HTTP/1.1 200 OK\r\nContent-Length: {value}\r\n\r\nbody".encode())
                self.assertTrue(app.value().startswith(b"HTTP/1.1 502 "), app.value()[:40])
                self.assertTrue(app.disconnecting)
                self.assertTrue(link.transport.disconnecting)

    def test_host_checks(self):
        """Host is not needed in a proxy request (the target names the host) but two are 400, with no server attempt."""
        self.send(b"GET http://h/ HTTP/1.1\r\nHost: h\r\nHost: evil\r\n\r\n")
        self.assertTrue(self.take().startswith(b"HTTP/1.1 400 "))
        self.assertEqual(self.servers[0].attempts, [])
        for request in (b"GET http://h/ HTTP/1.0\r\n\r\n", b"GET http://h/ HTTP/1.1\r\n\r\n"):
            protocol = self.factory.buildProtocol(None)
            protocol.makeConnection(Transport())
            protocol.dataReceived(request)
        self.assertEqual(len(self.servers[0].attempts), 2)

    def test_blank_lines_before_request(self):
        """Blank lines before a request line are skipped (RFC 9112 §2.2), also after a body."""
        self.send(b"POST http://a/u HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok\r\n")
        link = self.servers[0].succeed()
        link.answer(response(b"", "Content-Length: 0"))
        self.send(b"\r\nGET http://a/2 HTTP/1.1\r\nHost: a\r\n\r\n")
        link.answer(response(b"", "Content-Length: 0"))
        self.assertEqual(self.take(), 2 * response(b"", "Content-Length: 0"))
        self.assertIn(b"\r\n\r\nokGET /2 HTTP/1.1\r\n", link.sent())

    def test_nothing_logged_at_info(self):
        """Forwarding, refusals, bad responses and origins that close early log nothing at info level or above, even with verbose."""
        # Without verbose they log nothing at all (tests/test_exhaustion.py LocalProbeLogTests).
        self.factory.verbose = True
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.send(b"GET http://secret.example/1 HTTP/1.1\r\nHost: secret.example\r\n\r\n")
        link = self.servers[0].succeed()
        link.answer(response(b"x", "Content-Length: 1"))
        link.answer(b"HTTP/1.1 200 OK\r\n\r\n")  # out of turn
        for answer in (b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", None):
            app = Transport()
            protocol = self.factory.buildProtocol(None)
            protocol.makeConnection(app)
            protocol.dataReceived(b"GET http://secret.example/2 HTTP/1.1\r\nHost: secret.example\r\n\r\n")
            link = self.servers[0].succeed()
            if answer is not None:
                link.answer(answer)
            link.close()
            self.assertTrue(app.disconnecting)
        protocol = self.factory.buildProtocol(None)
        protocol.makeConnection(Transport())
        protocol.dataReceived(b"GET /secret HTTP/1.1\r\nHost: secret.example\r\n\r\n")
        loud = [e for e in events if e.get("log_namespace") == "ssx.local.http" and e["log_level"] >= LogLevel.info]
        self.assertEqual(loud, [])
        self.assertTrue(any(e.get("log_namespace") == "ssx.local.http" for e in events), "nothing logged at all")
