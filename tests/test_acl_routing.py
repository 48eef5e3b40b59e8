"""
The local end's ACL decision inside the relay (`ssx.local.routing` and
`LocalRelayProtocol.open_relay`), on in-memory transports and a
`MemoryReactorClock`, with a look-up the test answers: what waits for a
name's addresses, where the connection then goes, and what an application
that leaves meanwhile leaves behind.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from ssx.acl import parse_acl
from ssx.config.upstreams import ServerEntry
from ssx.crypto import CipherSuite
from ssx.local.picker import ServerPicker
from ssx.local.routing import AclRouter
from ssx.local.socks import ProxyPortFactory
from ssx.local.upstream import Upstream
from ssx.net.acl_holder import AclHolder
from ssx.wire import socks5
from tests.support import FakeServer, socks5_request

GREETING = b"\x05\x01\x00"
CONNECT_EXAMPLE = b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"
CONNECT_DIRECT_IP = b"\x05\x01\x00\x01\xc0\x00\x02\x07\x00\x50"  # 192.0.2.7:80
ACL = "[proxy_all]\n[bypass_list]\n192.0.2.0/24\n||lan.test\n"


class FakeLookup:
    """Answers look-ups when the test says; records each."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, int, defer.Deferred]] = []

    def __call__(self, host: str, port: int) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.asked.append((host, port, d))
        return d


class RelayRoutingTests(unittest.SynchronousTestCase):
    """SOCKS5 through a factory with a router."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        suite = CipherSuite("chacha20-ietf-poly1305", "pw")
        self.server = FakeServer(suite)
        entry = ServerEntry("198.51.100.1", 8388, "chacha20-ietf-poly1305", "pw")
        self.lookup = FakeLookup()
        holder = AclHolder("unused.acl", parse_acl(ACL))
        self.router = AclRouter(self.clock, holder, resolve=True, lookup=self.lookup)
        self.factory = ProxyPortFactory(
            self.clock, ServerPicker([Upstream(entry, suite, self.server)]), timeout=300, router=self.router,
        )
        self.protocol = self.factory.buildProtocol(None)
        self.app = StringTransport()
        self.protocol.makeConnection(self.app)

    def test_address_rule_goes_direct_at_once(self) -> None:
        """An IP literal in [bypass_list] connects to the target itself, with no look-up and no server."""
        self.protocol.dataReceived(GREETING + CONNECT_DIRECT_IP)
        self.assertEqual(self.lookup.asked, [])
        self.assertEqual(self.server.attempts, [])
        self.assertEqual([(host, port) for host, port, *_ in self.clock.tcpClients], [("192.0.2.7", 80)])
        self.assertEqual((self.factory.acl_direct, self.factory.acl_proxied), (1, 0))

    def test_name_rule_needs_no_look_up(self) -> None:
        """A name a name rule matches is decided without resolving it."""
        self.protocol.dataReceived(GREETING + socks5_request("nas.lan.test", 80))
        self.assertEqual(self.lookup.asked, [])
        self.assertEqual(self.server.attempts, [])
        self.assertEqual(self.factory.acl_direct, 1)

    def test_resolved_into_bypass_list_goes_direct(self) -> None:
        """A name no rule names waits for its addresses; one in [bypass_list] sends it direct, to that address."""
        self.protocol.dataReceived(GREETING + CONNECT_EXAMPLE + b"early bytes")
        self.assertEqual([(h, p) for h, p, _ in self.lookup.asked], [("example.com", 443)])
        self.assertEqual(self.server.attempts, [])
        self.assertEqual(self.clock.tcpClients, [])
        self.lookup.asked[0][2].callback(["203.0.113.9", "192.0.2.44"])
        self.assertEqual([(host, port) for host, port, *_ in self.clock.tcpClients], [("203.0.113.9", 443)])
        self.assertEqual(self.server.attempts, [])
        self.assertEqual(self.factory.acl_direct, 1)

    def test_resolved_elsewhere_goes_through_the_server(self) -> None:
        """A name whose addresses are in no list takes the default: the server, with the name in the header."""
        self.protocol.dataReceived(GREETING + CONNECT_EXAMPLE)
        self.lookup.asked[0][2].callback(["203.0.113.9"])
        self.assertEqual(len(self.server.attempts), 1)
        self.assertEqual(self.clock.tcpClients, [])
        self.server.succeed()
        self.assertEqual(self.app.value(), b"\x05\x00" + socks5.build_reply(socks5.REP_SUCCEEDED))
        self.assertEqual(self.factory.acl_proxied, 1)

    def test_unresolvable_name_takes_the_default(self) -> None:
        """A name that does not resolve here goes the default way (the server may still resolve it)."""
        self.protocol.dataReceived(GREETING + CONNECT_EXAMPLE)
        self.lookup.asked[0][2].errback(OSError("no such name"))
        self.assertEqual(len(self.server.attempts), 1)

    def test_application_leaves_during_look_up(self) -> None:
        """An application that closes while its name resolves: the look-up is cancelled, nothing is connected."""
        self.protocol.dataReceived(GREETING + CONNECT_EXAMPLE)
        d = self.lookup.asked[0][2]
        self.protocol.connectionLost(None)
        self.assertTrue(d.called)  # cancelled
        self.assertEqual(self.server.attempts, [])
        self.assertEqual(self.clock.tcpClients, [])
        self.assertEqual((self.factory.acl_direct, self.factory.acl_proxied), (0, 0))

    def test_reload_applies_to_the_next_connection(self) -> None:
        """The router reads the holder at each decision: a swapped ACL decides the next target."""
        self.router.holder.acl = parse_acl("[bypass_all]\n")
        self.protocol.dataReceived(GREETING + CONNECT_EXAMPLE)
        self.assertEqual(self.lookup.asked, [])
        self.assertEqual(self.factory.acl_direct, 1)
