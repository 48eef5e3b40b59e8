"""
ssx.relay.connect_tcp on a real reactor, and what the two ends do when the
application or client leaves while the next hop is still being connected:
cancelling must fail the attempt with CancelledError (Twisted's
stopConnecting alone reports a UserError), so that it counts as nobody's
failure.
"""

from __future__ import annotations

import gc
import os
from typing import Awaitable, Callable

from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import server as web_server

from ssx.wire.address import Address, encode_address
from ssx.crypto import CipherSuite
from ssx.server.forbidden import parse_forbidden
from ssx.local.picker import ServerPicker
from ssx.local.upstream import Upstream
from ssx.local.socks import ProxyPortFactory
from ssx.net import tcp as ssx_tcp
from ssx.net.lean_transport import LeanTransport
from ssx.net.relay import OutboundProtocol, RelayFactory, RelayProtocol, connect_tcp
from ssx.server.protocol import ShadowsocksServerFactory
from ssx.config.upstreams import ServerEntry
from tests import support


class _NoResolver:
    def resolve(self, name: str) -> defer.Deferred:
        raise AssertionError("IP literals are not resolved")


class LeavingWhileConnectingTests(unittest.TestCase):
    def setUp(self) -> None:
        self.listening = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1")
        self.addCleanup(self.listening.stopListening)
        self.port = self.listening.getHost().port

    def test_cancelled_connect_fails_with_cancelled_error(self):
        """Cancelling a real connect attempt fails it with CancelledError, not Twisted's UserError."""
        d = connect_tcp(reactor, "127.0.0.1", self.port, OutboundProtocol(lambda p: None), 5)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)

    @defer.inlineCallbacks
    def test_server_client_leaving_during_connect_is_not_unreachable(self):
        """A client that hangs up while the server connects to its target is not a target unreachable."""
        suite = CipherSuite("aes-256-gcm", "pw")
        factory = ShadowsocksServerFactory(reactor, suite, _NoResolver(), parse_forbidden(""), timeout=60)
        server = factory.buildProtocol(IPv4Address("TCP", "198.51.100.1", 40000))
        server.makeConnection(StringTransport())
        server.dataReceived(suite.tcp_encryptor().encrypt(encode_address(Address("127.0.0.1", self.port)) + b"x"))
        server.connectionLost(Failure(ConnectionDone()))
        yield defer.Deferred.fromCoroutine(support.wait_for(lambda: not support.outgoing_connections(), 5, "the connect attempt went on"))
        self.assertEqual(factory.targets_unreachable, 0)

    @defer.inlineCallbacks
    def test_local_client_leaving_during_connect_does_not_fail_the_server(self):
        """A client that hangs up while the local end connects to a server neither marks it down nor tries another."""
        attempts = []
        results: list[defer.Deferred] = []

        def connect(p):  # type: ignore[no-untyped-def]
            attempts.append(p)
            results.append(connect_tcp(reactor, "127.0.0.1", self.port, p, 5))
            return results[-1]

        suite = CipherSuite("chacha20-ietf-poly1305", "pw")
        upstreams = [
            Upstream(ServerEntry("127.0.0.1", self.port, "chacha20-ietf-poly1305", "pw"), suite, connect),
            Upstream(ServerEntry("127.0.0.2", self.port, "chacha20-ietf-poly1305", "pw"), suite, connect),
        ]
        picker = ServerPicker(upstreams)
        factory = ProxyPortFactory(reactor, picker, timeout=300)
        app = factory.buildProtocol(None)
        app.makeConnection(StringTransport())
        app.dataReceived(b"\x05\x01\x00" + b"\x05\x01\x00\x03\x0bexample.com\x01\xbb")
        self.assertEqual(len(attempts), 1)
        app.connectionLost(Failure(ConnectionDone()))
        # Another attempt would start when one ends: wait until all have.
        yield defer.Deferred.fromCoroutine(
            support.wait_for(lambda: all(d.called for d in results), 5, "a connect attempt never ended")
        )
        self.assertEqual(len(attempts), 1)
        self.assertTrue(picker.health(upstreams[0])[0])
        for p in attempts:
            if p.transport is not None:
                p.transport.abortConnection()
        yield defer.Deferred.fromCoroutine(support.wait_for(lambda: not support.outgoing_connections(), 5, "a connection stayed open"))


class _Idle:
    """The part of a connection the factory's sweep uses."""

    def __init__(self, factory: RelayFactory, limit: float, fail: bool = False) -> None:
        self.factory = factory
        self.idle_limit: float | None = limit
        self.last_activity = factory.reactor.seconds()
        self.fail = fail
        self.timed_out = 0

    def timeoutConnection(self) -> None:
        self.timed_out += 1
        if self.fail:
            raise RuntimeError("broken timeout handler")


class IdleSweepTests(unittest.SynchronousTestCase):
    def test_a_failing_timeout_spares_no_other_connection(self):
        """One timeoutConnection that raises is logged; the others still time out and the sweep goes on."""
        clock = MemoryReactorClock()
        factory = RelayFactory(clock, timeout=10)
        broken = _Idle(factory, 5, fail=True)
        healthy = [_Idle(factory, 5) for _ in range(3)]
        later = _Idle(factory, 20)
        for connection in [broken, *healthy, later]:
            factory.connection_opened(connection)
        clock.advance(5)
        self.assertEqual([c.timed_out for c in [broken, *healthy]], [1, 1, 1, 1])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(later.timed_out, 0)
        clock.advance(15)
        self.assertEqual(later.timed_out, 1)
        # Timed out once each: no second call unless a handler asks again.
        self.assertEqual([c.timed_out for c in healthy], [1, 1, 1])


def _live_connection_objects() -> list[object]:
    """ssx's protocols and transports of relayed connections that the interpreter still holds (garbage included)."""
    kinds = (RelayProtocol, LeanTransport, ssx_tcp.Server, ssx_tcp.Client)
    return [o for o in gc.get_objects() if isinstance(o, kinds)]


class ConnectionsFreedTests(support.LeanTcp, support.ChainTestCase):
    """
    A relayed connection's objects on both ends are freed by reference
    counting once it has closed, not left in reference cycles for the
    garbage collector (which would then walk every object of every
    connection, and hold their memory until it ran).
    """

    async def _freed(self, exchange: Callable[[], Awaitable[None]]) -> None:
        """Run `exchange` once to warm up, then twice with the collector off: nothing of theirs may stay held."""
        await exchange()
        await support.drained(self.server_service, self.local_service)
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        # Only what the two exchanges make counts (a failed test's traceback
        # may hold an earlier test's connections).
        earlier = {id(o) for o in _live_connection_objects()}

        def left() -> list[str]:
            return sorted(type(o).__name__ for o in _live_connection_objects() if id(o) not in earlier)

        for _ in range(2):
            await exchange()
        await support.drained(self.server_service, self.local_service)
        freed = await support.wait_until(lambda: not left(), 5)
        self.assertTrue(freed, f"still held after their close: {left()}")

    @support.coroutine_test
    async def test_closed_connections_leave_no_cycles(self) -> None:
        """With the collector off, nothing of a relayed SOCKS5 connection outlives its close, on either end."""
        port = self.chain()
        await self._freed(lambda: self.echo_through(port, 100_000))

    @support.requires("curl", package="curl")
    @support.coroutine_test
    async def test_forwarded_http_leaves_no_cycles(self) -> None:
        """Nor of a forwarded HTTP request (curl through the HTTP proxy, the origin connection opened for it)."""
        body = os.urandom(10_000)
        web = support.listen_web(web_server.Site(support.Blob(body)))
        self.addCleanup(web.stopListening)
        port = self.chain()

        async def fetch() -> None:
            out, err, code = await getProcessOutputAndValue(
                "curl", ["-sS", "--max-time", "20", "-x", f"http://127.0.0.1:{port}",
                         f"http://127.0.0.1:{web.getHost().port}/blob"],
                env=dict(os.environ, no_proxy="", NO_PROXY=""),
            )
            self.assertEqual((code, support.sha256(out)), (0, support.sha256(body)), err)

        await self._freed(fetch)


class ConnectionsFreedOnTwistedTcpTests(support.TwistedTcp, ConnectionsFreedTests):
    """The same on Twisted's port, connector and transports."""
