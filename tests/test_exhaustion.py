"""
Unfinished handshakes bounded per source and in all, against real ssx
servers on loopback: garbage connections can hold neither every
descriptor nor every slot of max_connections, and never close a relay.
The pieces alone (grouping of sources, the handshake table, the server
factory) are tested beside them with fakes and a Clock.  Helpers come
from tests/test_hardening.py.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from ssx.address import Address
from ssx.config import server_config
from ssx.crypto import CipherSuite, make_suite
from ssx.forbidden import parse_forbidden
from ssx.handshakes import HANDSHAKE_GRACE, HandshakeTable, source_group
from ssx.server import ShadowsocksServerFactory
from ssx.tap import server as server_tap
from ssx.tap.server import Options as ServerOptions
from tests import support
from tests.test_hardening import LoopbackCase, RawClient, coroutine_test, wait_until

METHOD = "aes-256-gcm"


# -- the pieces, alone -------------------------------------------------------


class SourceGroupTests(unittest.SynchronousTestCase):
    """What the per-source bound counts a peer under."""

    def test_ipv4_by_address(self):
        """An IPv4 peer is its own group, and so is the same address seen IPv4-mapped on a dual-stack port."""
        self.assertEqual(source_group("198.51.100.7"), "198.51.100.7")
        self.assertEqual(source_group("::ffff:198.51.100.7"), "198.51.100.7")
        self.assertNotEqual(source_group("::ffff:198.51.100.7"), source_group("::ffff:198.51.100.8"))

    def test_ipv6_by_64(self):
        """IPv6 peers in one /64 share a group; the next /64 is another; a scope ID changes nothing."""
        group = source_group("2001:db8:1:2::1")
        self.assertEqual(group, "2001:db8:1:2::/64")
        self.assertEqual(source_group("2001:db8:1:2:ffff:ffff:ffff:ffff"), group)
        self.assertNotEqual(source_group("2001:db8:1:3::1"), group)
        self.assertEqual(source_group("fe80::1%eth0"), "fe80::/64")

    def test_no_address(self):
        """A peer with no IP (a Unix socket's) has no group: only the overall bound counts it."""
        self.assertIsNone(source_group(""))


class HandshakeTableTests(unittest.SynchronousTestCase):
    """The bounds' arithmetic, with time as a number."""

    def test_group_bound(self):
        """Beyond the per-source bound the oldest that had their chance go (fed bytes, or waited `grace`); unread ones only beyond twice the bound."""
        table = HandshakeTable(limit=0, per_source=3, grace=2.0)
        self.assertEqual([table.add(i, "a", 0.0) for i in range(6)], [[]] * 6)
        self.assertEqual(table.add(6, "a", 0.5), [0])
        self.assertEqual(table.fed(1), [1])
        self.assertEqual(table.add("b1", "b", 0.5), [])
        self.assertEqual(table.over(1.9), [])
        self.assertEqual(table.over(2.0), [2, 3])
        self.assertEqual((table.in_group("a"), table.in_group("b")), (3, 1))

    def test_fed_before_unread(self):
        """Over the bound, a connection that sent bytes without a valid header goes before older ones not yet read."""
        table = HandshakeTable(limit=0, per_source=2, grace=2.0)
        self.assertEqual([table.add(c, "a", 0.0) for c in ("honest 1", "honest 2", "garbage")], [[], [], []])
        self.assertEqual(table.fed("garbage"), ["garbage"])
        self.assertEqual(table.in_group("a"), 2)

    def test_overall_bound(self):
        """The overall bound counts every group, and connections without one."""
        table = HandshakeTable(limit=2, per_source=0, grace=1.0)
        self.assertEqual([table.add(c, g, 0.0) for c, g in (("x", "a"), ("y", "b"), ("z", None))], [[], [], []])
        self.assertEqual(table.over(1.0), ["x"])
        self.assertEqual(len(table), 2)

    def test_finished_handshakes_leave(self):
        """A connection removed (its header came, or it closed) is never returned, and frees its place."""
        table = HandshakeTable(limit=0, per_source=1, grace=0.0)
        table.add("old", "a", 0.0)
        table.remove("old")
        table.remove("never added")
        self.assertEqual(table.add("new", "a", 1.0), [])
        self.assertEqual(table.fed("old"), [])
        self.assertNotIn("old", table)


class HandshakeEvictionTests(unittest.SynchronousTestCase):
    """The server factory with in-memory transports: whom the bounds close, and how."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.suite = CipherSuite(METHOD, "pw")
        self.factory = ShadowsocksServerFactory(
            self.reactor, self.suite, None, parse_forbidden(""), timeout=60, handshake_timeout=30,
            max_handshakes=0, max_handshakes_per_ip=4,
        )

    def connect(self, address: Any) -> tuple[Any, StringTransport]:
        server = self.factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        server.makeConnection(transport)
        return server, transport

    def relay(self, address: Any) -> StringTransport:
        """A connection past its header, relaying to a target."""
        server, transport = self.connect(address)
        server.dataReceived(self.suite.client_codec().first(Address("192.0.2.80", 80), b"GET /"))
        _, _, target_factory, _, _ = self.reactor.tcpClients[-1]
        target_factory.buildProtocol(None).makeConnection(StringTransport())
        return transport

    def test_flood_closes_its_own_oldest(self):
        """20 garbage connections from one IPv6 /64: all but the last 4 close with a FIN and no byte; that /64's relays and other sources live on."""
        attacker = [IPv6Address("TCP", f"2001:db8:a:b::{i:x}", 4000 + i) for i in range(1, 30)]
        relays = [self.relay(attacker[0]), self.relay(attacker[1])]
        other, other_transport = self.connect(IPv4Address("TCP", "198.51.100.9", 5000))
        flood = []
        for address in attacker[2:22]:
            server, transport = self.connect(address)
            server.dataReceived(os.urandom(10))
            flood.append(transport)
        self.assertEqual([t.disconnecting for t in flood], [True] * 16 + [False] * 4)
        self.assertFalse(any(t.disconnected for t in flood), "an evicted connection was aborted, not closed")
        self.assertEqual([t.value() for t in flood], [b""] * 20)
        self.assertFalse(any(t.disconnecting for t in relays), "a relay was closed to make room")
        self.reactor.advance(HANDSHAKE_GRACE + 1)
        self.assertFalse(other_transport.disconnecting)
        self.assertEqual(self.factory.handshakes_evicted, 16)
        self.assertEqual(len(self.factory.connections), 2 + 1 + 4)

    def test_silent_connections_wait_their_grace(self):
        """10 silent connections from one source: 8 (twice the bound) are kept while new, 4 once HANDSHAKE_GRACE has passed."""
        silent = [self.connect(IPv4Address("TCP", "198.51.100.7", 4000 + i))[1] for i in range(10)]
        self.assertEqual([t.disconnecting for t in silent], [True] * 2 + [False] * 8)
        self.reactor.advance(HANDSHAKE_GRACE + 1)
        self.assertEqual([t.disconnecting for t in silent], [True] * 6 + [False] * 4)

    def test_half_of_max_connections(self):
        """With max_connections=40, unfinished handshakes keep at most 20 slots once they have had their chance, whatever their sources."""
        factory = ShadowsocksServerFactory(
            self.reactor, self.suite, None, parse_forbidden(""), timeout=60, max_connections=40,
        )
        self.factory = factory
        flood = [self.connect(IPv4Address("TCP", f"198.51.100.{i}", 4000)) for i in range(1, 31)]
        self.assertEqual(sum(not t.disconnecting for _, t in flood), 30)
        for server, _ in flood[:5]:
            server.dataReceived(os.urandom(10))
        self.assertEqual(sum(not t.disconnecting for _, t in flood), 25)
        self.reactor.advance(HANDSHAKE_GRACE + 1)
        self.assertEqual(sum(not t.disconnecting for _, t in flood), 20)
        self.assertEqual(len(factory.connections), 20)


class HandshakeOptionTests(unittest.SynchronousTestCase):
    """--max-handshakes and --max-handshakes-per-ip, as flags and config keys."""

    def test_handshake_bounds(self):
        """--max-handshakes and --max-handshakes-per-ip set the server's bounds; a bad value stops start-up naming its key."""
        parsed = ServerOptions()
        parsed.parseOptions(["-k", "pw", "--max-handshakes", "100", "--max-handshakes-per-ip", "0"])
        self.assertEqual((parsed.config.max_handshakes, parsed.config.max_handshakes_per_ip), (100, 0))
        for argv, key in ((["--max-handshakes", "-1"], "max_handshakes"), (["--max-handshakes-per-ip", "x"], "max_handshakes_per_ip")):
            with self.assertRaises(SystemExit) as caught:
                ServerOptions().parseOptions(["-k", "pw", *argv])
            self.assertIn(f"bad configuration: {key}:", str(caught.exception))

    def test_per_source_off_behind_plugin(self):
        """Behind a plugin every connection comes from the plugin's address: the per-source bound is not applied."""
        config = server_config({"plugin": "true", "server_port": 8388, "max_handshakes_per_ip": 5})
        service = server_tap.build_service(MemoryReactorClock(), config)
        self.assertEqual(service.factory.handshakes.per_source, 0)
        self.assertEqual(server_config({}).max_handshakes_per_ip, 64)


# -- on real sockets -----------------------------------------------------------


class BoundedHandshakeTests(LoopbackCase):
    """Floods of garbage connections against an in-process ssx-server: honest clients and relays are not hurt."""

    async def connect_from(self, source: str, port: int, client: RawClient) -> RawClient:
        self._clients.append(client)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0)), client)
        return client

    async def relay_from(self, source: str, port: int, echo_port: int, tag: bytes) -> tuple[RawClient, Any]:
        """A Shadowsocks client past its handshake, its first bytes echoed."""
        codec = make_suite(METHOD, support.PASSWORD).client_codec()
        client = await self.connect_from(source, port, RawClient(codec.first(Address("127.0.0.1", echo_port), tag)))
        self.assertEqual(await self.read_plain(client, codec, len(tag)), tag)
        return client, codec

    async def still_relaying(self, relays: list[tuple[RawClient, Any]]) -> None:
        for i, (client, codec) in enumerate(relays):
            self.assertFalse(client.closed.called, f"relay {i} was closed")
            before = len(client.received)
            client.transport.write(codec.encrypt(b"after the flood"))
            self.assertTrue(await wait_until(lambda: len(client.received) > before, 3), f"relay {i} stopped relaying")

    async def flood(self, port: int, sources: list[str], count: int) -> list[RawClient]:
        clients = [RawClient(os.urandom(10)) for _ in range(count)]
        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self.connect_from(sources[i % len(sources)], port, c)) for i, c in enumerate(clients)]
        )
        return clients

    def assertClosedQuietly(self, clients: list[RawClient]) -> None:
        closed = [c for c in clients if c.closed.called]
        self.assertEqual({c.ending for c in closed}, {"FIN"}, "a connection closed to make room was not closed with a FIN")
        self.assertEqual({bytes(c.received) for c in closed}, {b""}, "the server answered garbage")

    @coroutine_test
    async def test_flood_from_one_source(self):
        """300 connections of 10 random bytes from 127.0.0.2, per-source bound 20: all but 20 close (FIN, no byte); a client at 127.0.0.1 is served and 127.0.0.2's own relays live on."""
        echo, echo_port = self.counting_echo()
        service, port = self.server(method=METHOD, handshake_timeout=60, timeout=120, max_handshakes_per_ip=20)
        relays = [await self.relay_from("127.0.0.2", port, echo_port, b"relay %d" % i) for i in range(3)]
        flood = await self.flood(port, ["127.0.0.2"], 300)
        self.assertTrue(
            await wait_until(lambda: sum(not c.closed.called for c in flood) == 20, 10),
            f"{sum(not c.closed.called for c in flood)} garbage connections from one source still open",
        )
        honest = await self.relay_from("127.0.0.1", port, echo_port, b"honest")
        self.assertClosedQuietly(flood)
        await self.still_relaying(relays + [honest])
        self.assertEqual(service.factory.handshakes_evicted, 280)

    @coroutine_test
    async def test_garbage_cannot_take_every_slot(self):
        """max_connections=60: 300 garbage connections from three sources hold at most 30 slots; a client after them is served at once and the relays live on."""
        echo, echo_port = self.counting_echo()
        service, port = self.server(method=METHOD, handshake_timeout=60, timeout=120, max_connections=60)
        relays = [await self.relay_from("127.0.0.1", port, echo_port, b"relay %d" % i) for i in range(5)]
        flood = await self.flood(port, ["127.0.0.2", "127.0.0.3", "127.0.0.4"], 300)
        self.assertTrue(
            await wait_until(lambda: sum(c.closed.called for c in flood) >= 270, 10),
            f"only {sum(c.closed.called for c in flood)} of 300 garbage connections closed",
        )
        started = reactor.seconds()
        honest = await self.relay_from("127.0.0.1", port, echo_port, b"honest")
        self.assertLess(reactor.seconds() - started, 3)
        self.assertLessEqual(len(service.factory.handshakes), 30)
        self.assertClosedQuietly(flood)
        await self.still_relaying(relays + [honest])
