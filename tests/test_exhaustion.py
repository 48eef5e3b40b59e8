"""
Resource exhaustion and the log, against real ssx servers on loopback:
unfinished handshakes bounded per source and in all (garbage can hold
neither every descriptor nor every slot of max_connections), UDP target
look-ups bounded and shared, and a log that a flood of probes cannot grow
(one summary line, per-event lines only with --verbose).  The pieces
alone (grouping of sources, the handshake table, the look-up table) are
tested beside them with fakes and a Clock.  Helpers come from
tests/test_hardening.py.
"""

from __future__ import annotations

import os
import socket
import tempfile
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher, textFileLogObserver
from twisted.names import dns
from twisted.python.failure import Failure
from twisted.trial import unittest

from ssx.wire.address import Address, encode_address
from ssx.config import server_config
from ssx.crypto import CipherSuite, make_suite
from ssx.server.forbidden import parse_forbidden
from ssx.server.handshakes import HANDSHAKE_GRACE, HandshakeTable, source_group
from ssx.net.quiet_udp import listen_udp
from ssx.server.protocol import ShadowsocksServerFactory
from ssx.server.udp import MAX_LOOKUPS, MAX_WAITING_PER_ASSOCIATION, ShadowsocksUdpRelay, UdpLookups
import ssx.server.tap as server_tap
from ssx.local.tap import Options as LocalOptions
from ssx.server.tap import Options as ServerOptions
from tests import support
from tests.support import FakeDns, LoopbackCase, RawClient, SocksClient, coroutine_test, open_fds, sleep, wait_until

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

    def test_add_closes_as_a_bound_is_passed(self):
        """add returns nothing up to each bound, and the oldest that had its chance the moment one is passed, by either bound."""
        table = HandshakeTable(limit=3, per_source=2, grace=2.0)
        self.assertEqual([table.add(c, "a", 0.0) for c in ("a1", "a2")], [[], []])
        self.assertEqual(table.fed("a1"), [])
        self.assertEqual(table.add("a3", "a", 0.0), ["a1"])
        self.assertEqual(table.add("b1", "b", 0.0), [])
        self.assertEqual(table.fed("b1"), [])
        self.assertEqual(table.add("c1", None, 0.0), ["b1"])
        self.assertEqual(len(table), 3)

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
        self.assertEqual(server_config({}).max_handshakes_per_ip, 128)


class FakeResolver:
    """A resolver whose look-ups end when the test says; `known` names answer at once."""

    def __init__(self, known: dict[str, list[str]] | None = None) -> None:
        self.known_names = known or {}
        self.asked: list[str] = []
        self.pending: dict[str, defer.Deferred] = {}

    def known(self, name: str) -> list[str] | None:
        return self.known_names.get(name)

    def resolve(self, name: str) -> defer.Deferred:
        self.asked.append(name)
        d = self.pending[name] = defer.Deferred()
        return d


class UdpLookupTests(unittest.SynchronousTestCase):
    """The server's UDP relay with a resolver under the test's control; every target is refused, so no socket opens."""

    def setUp(self) -> None:
        self.suite = CipherSuite(METHOD, "pw")
        self.resolver = FakeResolver({"cached.example": ["192.0.2.1"]})
        self.relay = ShadowsocksUdpRelay(Clock(), self.suite, self.resolver, parse_forbidden("0.0.0.0/0"))

    def send(self, name: str, client: tuple[str, int] = ("198.51.100.1", 5000)) -> None:
        self.relay.datagramReceived(self.suite.udp_seal(encode_address(Address(name, 53)) + b"q"), client)

    def test_one_lookup_per_name(self):
        """Ten datagrams naming one name, from two clients, wait on one look-up and all go on when it ends."""
        for i in range(10):
            self.send("Same.Example", ("198.51.100.1", 5000 + i % 2))
        self.assertEqual(self.resolver.asked, ["Same.Example"])
        self.resolver.pending["Same.Example"].callback(["192.0.2.7"])
        self.assertEqual((self.relay.refused, self.relay.dropped), (10, 0))
        self.assertEqual((len(self.relay.lookups), self.relay.lookups.waiting), (0, 0))

    def test_names_in_flight_bounded(self):
        """Beyond MAX_LOOKUPS names in flight, datagrams naming new names are dropped and counted; known names still pass."""
        for i in range(MAX_LOOKUPS + 10):
            self.send(f"n{i}.example", ("198.51.100.1", 1000 + i))
        self.assertEqual(len(self.resolver.asked), MAX_LOOKUPS)
        self.assertEqual(self.relay.dropped, 10)
        self.send("cached.example")
        self.assertEqual(self.relay.refused, 1)
        for d in self.resolver.pending.values():
            d.errback(Exception("no answer"))
        self.assertEqual(self.relay.dropped, 10 + MAX_LOOKUPS)
        self.send("again.example")
        self.assertEqual(self.resolver.asked[-1], "again.example")

    def test_per_association_bounded(self):
        """One client gets at most MAX_WAITING_PER_ASSOCIATION datagrams waiting; another client is not held back by it."""
        for i in range(MAX_WAITING_PER_ASSOCIATION + 5):
            self.send(f"m{i}.example")
        self.assertEqual(self.relay.dropped, 5)
        self.send("m0.example", ("198.51.100.2", 5000))
        self.send("other.example", ("198.51.100.2", 5000))
        self.assertEqual(self.relay.dropped, 5)
        self.assertEqual(self.relay.lookups.waiting, MAX_WAITING_PER_ASSOCIATION + 2)

    def test_shared_by_relays(self):
        """Relays given one UdpLookups share its bound on names in flight."""
        lookups = UdpLookups(self.resolver, limit=2)
        first = ShadowsocksUdpRelay(Clock(), self.suite, self.resolver, parse_forbidden(""), lookups=lookups)
        second = ShadowsocksUdpRelay(Clock(), self.suite, self.resolver, parse_forbidden(""), lookups=lookups)
        for relay, name in ((first, "a.example"), (second, "b.example"), (second, "c.example")):
            relay.datagramReceived(self.suite.udp_seal(encode_address(Address(name, 53)) + b"q"), ("198.51.100.1", 1))
        self.assertEqual((first.dropped, second.dropped), (0, 1))


class QuietUdpPortTests(unittest.TestCase):
    """The UDP sockets the server opens per association and per DNS query."""

    def test_round_trip_without_log_lines(self):
        """A quiet port sends and receives as listenUDP's does, and opening and closing it logs nothing."""
        echo_port, _ = support.listen_udp_echo()
        self.addCleanup(echo_port.stopListening)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        got: defer.Deferred = defer.Deferred()

        class Client(protocol.DatagramProtocol):
            noisy = False  # as ssx's own protocols: the port is what is tested

            def datagramReceived(self, data: bytes, addr: Any) -> None:
                got.callback((data, addr))

        client = Client()
        port = listen_udp(reactor, 0, client, interface="127.0.0.1", maxPacketSize=65535)
        self.assertIs(client.transport, port)
        port.write(b"ping", ("127.0.0.1", echo_port.getHost().port))

        def check(result: tuple[bytes, Any]) -> defer.Deferred:
            self.assertEqual(result, (b"ping", ("127.0.0.1", echo_port.getHost().port)))
            return port.stopListening()

        def closed(_: Any) -> None:
            self.assertIsNone(client.transport)
            self.assertEqual([formatEvent(e) for e in events], [])

        return got.addCallback(check).addCallback(closed)

    def test_port_in_use(self):
        """A port already taken raises CannotListenError, as listenUDP does."""
        taken = reactor.listenUDP(0, protocol.DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        with self.assertRaises(CannotListenError):
            listen_udp(reactor, taken.getHost().port, protocol.DatagramProtocol(), interface="127.0.0.1")


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
    async def test_honest_burst_from_one_source(self):
        """100 clients from one address, all waiting in the listen backlog with their headers before the server accepts any, per-source bound 20: every one is served, none closed to make room."""
        echo, echo_port = self.counting_echo()
        service, port = self.server(method=METHOD, handshake_timeout=60, timeout=120, max_handshakes_per_ip=20)
        suite = make_suite(METHOD, support.PASSWORD)
        for i in range(100):
            # Blocking: the reactor accepts none of them meanwhile.
            sock = socket.create_connection(("127.0.0.1", port))
            self.addCleanup(sock.close)
            sock.sendall(suite.client_codec().first(Address("127.0.0.1", echo_port), b"%03d" % i))
        self.assertTrue(await wait_until(lambda: echo.connections == 100, 10), echo.connections)
        self.assertEqual(service.factory.handshakes_evicted, 0)

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


class HeldDns(FakeDns):
    """A FakeDns that answers only when released (all held queries, or those for one name)."""

    def __init__(self, records: dict[str, list[tuple[int, str]]]) -> None:
        FakeDns.__init__(self, records)
        self.held: list[tuple[bytes, Any]] = []
        self.asked: list[tuple[str, int]] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        query = dns.Message()
        query.fromStr(data)
        self.asked.append((query.queries[0].name.name.decode(), query.queries[0].type))
        self.held.append((data, addr))

    def release(self, name: str) -> None:
        held, self.held = self.held, []
        for data, addr in held:
            query = dns.Message()
            query.fromStr(data)
            if query.queries[0].name.name.decode() == name:
                FakeDns.datagramReceived(self, data, addr)
            else:
                self.held.append((data, addr))


class BoundedLookupTests(LoopbackCase):
    """UDP datagrams naming domains, against an in-process ssx-server whose DNS server is slow or silent."""

    def udp_server(self, nameserver: str) -> tuple[Any, Any, int]:
        service, port = self.server(
            method=METHOD, mode="tcp_and_udp", nameserver=nameserver, hosts_file=self.hosts_file("# empty\n")
        )
        return service, service.udp_relays[0], port

    def udp_clients(self, count: int) -> list[tuple[Any, list[bytes]]]:
        clients = []
        for _ in range(count):
            got: list[bytes] = []

            class Client(protocol.DatagramProtocol):
                def datagramReceived(self, data: bytes, addr: Any, got: list[bytes] = got) -> None:
                    got.append(data)

            clients.append((self.listen(reactor.listenUDP(0, Client(), interface="127.0.0.1")), got))
        return clients

    @coroutine_test
    async def test_unique_names_bounded(self):
        """300 datagrams naming 300 names, DNS silent: at most MAX_LOOKUPS names asked, 2 sockets each, the rest dropped; a datagram to an IP and a TCP relay are still served."""
        silent, nameserver = self.fake_dns(silent=True)
        echo_port, echo = support.listen_udp_echo()
        self.listen(echo_port)
        tcp_echo, tcp_echo_port = self.counting_echo()
        service, relay, port = self.udp_server(nameserver)
        suite = make_suite(METHOD, support.PASSWORD)
        clients = self.udp_clients(31)
        await sleep(0)  # the reactor runs (and trial's pipes open) from the first wait on
        baseline = open_fds()
        # In tens, so that the server's receive buffer never overflows.
        for batch in range(30):
            for i in range(batch * 10, batch * 10 + 10):
                packet = suite.udp_seal(encode_address(Address(f"n{i}.flood.ssx.test", 53)) + b"q")
                clients[i % 30][0].write(packet, ("127.0.0.1", port))
            self.assertTrue(await wait_until(lambda: relay.received == batch * 10 + 10, 3), relay.received)
        self.assertTrue(
            await wait_until(lambda: len(silent.queries) >= 2 * MAX_LOOKUPS, 3),
            (relay.dropped, len(silent.queries), len(relay.lookups)),
        )
        grown = open_fds() - baseline
        self.assertLessEqual(grown, 2 * MAX_LOOKUPS + 5, f"{grown} descriptors for 300 look-ups")
        self.assertEqual(len({name for name, _ in silent.queries}), MAX_LOOKUPS)
        self.assertEqual(relay.dropped, 300 - MAX_LOOKUPS)

        honest, replies = clients[30]
        honest.write(suite.udp_seal(encode_address(Address("127.0.0.1", echo_port.getHost().port)) + b"ip"), ("127.0.0.1", port))
        self.assertTrue(await wait_until(lambda: len(replies) == 1, 3), "a datagram to an IP was not relayed")
        codec = suite.client_codec()
        tcp = await self.connect(port, RawClient(codec.first(Address("127.0.0.1", tcp_echo_port), b"tcp")))
        self.assertEqual(await self.read_plain(tcp, codec, 3), b"tcp")

    @coroutine_test
    async def test_same_name_one_lookup(self):
        """40 datagrams from 4 clients naming one name wait on one A and one AAAA query and all reach the target when DNS answers."""
        echo_port, echo = support.listen_udp_echo()
        self.listen(echo_port)
        held = HeldDns({"same.ssx.test": [(dns.A, "127.0.0.1")]})
        nameserver = f"127.0.0.1:{self.listen(reactor.listenUDP(0, held, interface='127.0.0.1')).getHost().port}"
        service, relay, port = self.udp_server(nameserver)
        suite = make_suite(METHOD, support.PASSWORD)
        clients = self.udp_clients(4)
        target = Address("same.ssx.test", echo_port.getHost().port)
        for i in range(40):
            clients[i % 4][0].write(suite.udp_seal(encode_address(target) + b"%d" % i), ("127.0.0.1", port))
        self.assertTrue(await wait_until(lambda: relay.received == 40 and len(held.asked) >= 2, 3))
        self.assertEqual(sorted(held.asked), [("same.ssx.test", dns.A), ("same.ssx.test", dns.AAAA)])
        self.assertEqual((len(relay.lookups), relay.lookups.waiting), (1, 40))
        held.release("same.ssx.test")
        self.assertTrue(await wait_until(lambda: sum(len(got) for _, got in clients) == 40, 3), echo.count)
        self.assertEqual((echo.count, relay.dropped), (40, 0))


# -- the log -------------------------------------------------------------------

N = 12


class SummaryLogTests(LoopbackCase):
    """
    N probes of every kind a remote party can send, against an in-process
    ssx-server writing every log event to a file (as twistd's file log
    does, whatever the level); the summary is driven by a Clock.
    """

    def log_file(self) -> tuple[str, Any]:
        fd, path = tempfile.mkstemp(suffix=".log")
        os.close(fd)
        self.addCleanup(os.unlink, path)
        f = open(path, "w", encoding="utf-8")
        observer = textFileLogObserver(f)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(f.close)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return path, f

    async def probe(self, verbose: bool) -> tuple[list[str], int]:
        """
        The lines logged while N probes of each kind were served and one
        summary was written (the test's own clients' lines left out); and
        the TCP echo's port.
        """
        path, f = self.log_file()
        echo, echo_port = self.counting_echo()
        udp_echo, _ = support.listen_udp_echo()
        self.listen(udp_echo)
        nxdomain, nameserver = self.fake_dns({})
        values = {
            "password": support.PASSWORD, "method": METHOD, "listen": "tcp:0:interface=127.0.0.1",
            "handshake_timeout": 1, "timeout": 30, "mode": "tcp_and_udp", "forbidden_ip": "127.0.0.2/32",
            "nameserver": nameserver, "hosts_file": self.hosts_file("# empty\n"), "verbose": verbose,
        }
        service = server_tap.build_service(reactor, server_config(values))
        clock = Clock()
        service.counter_report.clock = clock
        service.startService()
        self._services.append(service)
        port = service.listeners[0].port.getHost().port
        factory, relay = service.factory, service.udp_relays[0]
        suite = make_suite(METHOD, support.PASSWORD)
        udp_clients = [
            self.listen(reactor.listenUDP(0, protocol.DatagramProtocol(), interface="127.0.0.1")) for _ in range(N + 1)
        ]
        # What start-up logs (the configuration, forbidden list included)
        # is not the probes' doing, nor are the test's own sockets.
        f.flush()
        started = os.path.getsize(path)

        def first(host: str, target_port: int, data: bytes) -> bytes:
            return suite.client_codec().first(Address(host, target_port), data)

        probes = [RawClient(os.urandom(80)) for _ in range(N)]  # fail authentication
        probes += [RawClient(os.urandom(10)) for _ in range(N)]  # never a whole header
        probes += [RawClient(first("127.0.0.2", echo_port, b"x")) for _ in range(N)]  # forbidden
        probes += [RawClient(first(f"missing{i}.ssx.test", 80, b"x")) for i in range(N)]  # no such name
        # Relays whose stream breaks after the header: a chunk that fails its
        # tag, sent once the echo's answer shows the relay runs (sent sooner,
        # it could arrive with the header and fail the handshake instead).
        broken = [RawClient(first("127.0.0.1", echo_port, b"x")) for _ in range(N)]
        probes += broken
        for probe in probes:
            await self.connect(port, probe)
        self.assertTrue(await wait_until(lambda: all(p.received for p in broken), 10))
        for probe in broken:
            probe.transport.write(os.urandom(40))
        # Over UDP: garbage, names that do not exist, forbidden targets, and
        # N clients each with an association of its own (a socket each on
        # the server).
        names = udp_clients[N]
        forbidden = Address("127.0.0.2", udp_echo.getHost().port)
        for i in range(N):
            names.write(os.urandom(60), ("127.0.0.1", port))
            names.write(suite.udp_seal(encode_address(Address(f"nx{i}.ssx.test", 53)) + b"q"), ("127.0.0.1", port))
            names.write(suite.udp_seal(encode_address(forbidden) + b"q"), ("127.0.0.1", port))
            target = Address("127.0.0.1", udp_echo.getHost().port)
            udp_clients[i].write(suite.udp_seal(encode_address(target) + b"q"), ("127.0.0.1", port))
        await defer.gatherResults([p.closed for p in probes])
        self.assertTrue(
            await wait_until(
                lambda: relay.received == 4 * N and relay.dropped == 2 * N and relay.refused == N and len(relay.nat) == N + 1, 5
            ),
            (relay.received, relay.dropped, relay.refused, len(relay.nat)),
        )
        counters = (
            factory.handshake_failures, factory.handshakes_timed_out, factory.connections_refused,
            factory.targets_unreachable, factory.relays_broken,
        )
        self.assertEqual(counters, (N,) * 5)
        clock.advance(service.counter_report.interval)
        f.flush()
        with open(path, encoding="utf-8") as log:
            log.seek(started)
            lines = log.read().splitlines()
        return [line for line in lines if "OneShotFactory" not in line], echo_port

    @coroutine_test
    async def test_one_summary_no_line_per_probe(self):
        """N probes of each kind (TCP and UDP) write no line of their own, not even Twisted's for the sockets they cost; one summary line counts each kind."""
        lines, echo_port = await self.probe(verbose=False)
        [summary] = [line for line in lines if "ssx-server, last 10 min:" in line]
        self.assertEqual(lines, [summary])
        for what in (
            "connections failed authentication, replayed or sent a bad header",
            "connections sent no whole header before the handshake timeout",
            "forbidden targets refused",
            "targets unreachable",
            "relays closed on a broken stream",
        ):
            self.assertIn(f"{N} {what}", summary)
        self.assertIn(f"{2 * N} UDP datagrams dropped", summary)
        self.assertIn(f"{N} UDP datagrams to forbidden targets", summary)
        for destination in ("127.0.0.2", "missing", "nx0", f":{echo_port}"):
            self.assertNotIn(destination, summary)

    @coroutine_test
    async def test_verbose_restores_lines(self):
        """With verbose, each failed handshake, refused or unreachable target (TCP and UDP) and broken relay has its line, destinations named."""
        lines, echo_port = await self.probe(verbose=True)

        def count(marker: str) -> int:
            return sum(marker in line for line in lines)

        self.assertEqual(count("discarding until the timeout"), N)
        self.assertEqual(count(f"refused 127.0.0.2:{echo_port}: forbidden address"), N)
        self.assertEqual(count("cannot reach missing"), N)
        self.assertEqual(count("relay closed:"), N)
        self.assertEqual(count("UDP: refused 127.0.0.2:"), N)


class LimitLineTests(unittest.SynchronousTestCase):
    """The connection limit's line, which clients can bring about over and over."""

    def test_logged_once_then_counted(self):
        """Reaching max_connections three times logs one line; the factory counts all three for the summary."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        factory = ShadowsocksServerFactory(
            MemoryReactorClock(), CipherSuite(METHOD, "pw"), None, parse_forbidden(""), max_connections=2
        )
        for _ in range(3):
            opened = []
            for port in (4000, 4001):
                server = factory.buildProtocol(None)
                server.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "198.51.100.1", port)))
                opened.append(server)
            for server in opened:
                server.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(factory.limit_reached, 3)
        self.assertEqual(sum("at the limit" in formatEvent(e) for e in events), 1)


class LocalLogTests(LoopbackCase):
    """ssx-local's per-connection lines name no destination unless verbose."""

    async def failed_connect(self, verbose: bool) -> str:
        texts: list[str] = []

        def observe(event: dict) -> None:
            texts.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        dead = support.free_port()
        local, socks_port = self.local(dead, method=METHOD, verbose=verbose)
        reply, _ = await support.socks_transfer(socks_port, "secret-destination.ssx.test", 443, b"x")
        self.assertNotEqual(reply, 0)
        self.assertTrue(any("cannot reach server" in t for t in texts), texts)
        return "\n".join(texts)

    @coroutine_test
    async def test_no_destination_by_default(self):
        """A connection that cannot reach the server is logged without its destination."""
        self.assertNotIn("secret-destination", await self.failed_connect(verbose=False))

    @coroutine_test
    async def test_destination_when_verbose(self):
        """With verbose, the line names the destination."""
        self.assertIn("secret-destination.ssx.test:443", await self.failed_connect(verbose=True))


class _Origin(protocol.Protocol):
    """Answers the first bytes it gets with its factory's `answer` and closes; holds if that is None."""

    factory: "_OriginFactory"

    def dataReceived(self, data: bytes) -> None:
        if self.factory.answer is not None:
            self.transport.write(self.factory.answer)
            self.transport.loseConnection()


class _OriginFactory(protocol.Factory):
    """A TCP origin (or server) for the probes of ssx-local, answering every connection the same."""

    noisy = False
    protocol = _Origin

    def __init__(self, answer: bytes | None) -> None:
        self.answer = answer


class LocalProbeLogTests(LoopbackCase):
    """
    What applications, origins and the server can make ssx-local log: K
    probes of each kind, a line each only with verbose.
    """

    K = 2
    # A marker of each kind's verbose line.
    MARKERS = (
        "speaks no known proxy protocol",
        "SOCKS5 negotiation failed",
        "SOCKS4 request refused",
        "HTTP proxy: refused a request",
        "HTTP proxy: bad request body",
        "HTTP proxy: bad response from the origin",
        "HTTP proxy: the origin closed the connection before the response ended",
        "HTTP proxy: bad stream from the server",
        "UDP ASSOCIATE from 127.0.0.1 refused",
    )

    async def probe(self, verbose: bool) -> list[str]:
        """The lines logged while K probes of each kind were served (the test's own sockets' lines left out)."""
        _, server_port = self.server(method=METHOD)
        local, local_port = self.local(server_port, method=METHOD, mode="tcp_and_udp", verbose=verbose)
        # A "server" whose answer to any request is random bytes.
        garbage_server = self.listen(reactor.listenTCP(0, _OriginFactory(os.urandom(80)), interface="127.0.0.1"))
        broken, broken_port = self.local(garbage_server.getHost().port, method=METHOD, verbose=verbose)
        origins = {
            answer: self.listen(reactor.listenTCP(0, _OriginFactory(answer), interface="127.0.0.1")).getHost().port
            for answer in (None, b"garbage\r\n\r\n", b"")
        }
        events = support.log_events(self)

        def get(origin_port: int, extra: bytes = b"") -> bytes:
            host = f"127.0.0.1:{origin_port}".encode()
            return b"GET http://" + host + b"/ HTTP/1.1\r\nHost: " + host + b"\r\n" + extra + b"\r\n"

        probes = []
        for _ in range(self.K):
            for data in (
                b"\x00\xff",  # no proxy protocol at all
                b"\x05\x00",  # a SOCKS5 greeting without methods
                b"\x04\x02\x00\x50\x7f\x00\x00\x01\x00",  # SOCKS4 BIND
                get(origins[None], b"Content-Length: x\r\n"),
                get(origins[None], b"Transfer-Encoding: chunked\r\n") + b"zz\r\n",
                get(origins[b"garbage\r\n\r\n"]),
                get(origins[b""]),
            ):
                probes.append(await self.connect(local_port, RawClient(data)))
            probes.append(await self.connect(broken_port, RawClient(get(origins[None]))))
        # UDP associations that name a port another association owns.
        associate = b"\x05\x03\x00\x01\x7f\x00\x00\x01" + support.free_port().to_bytes(2, "big")
        owner = await self.connect(local_port, SocksClient("", 0, request=associate))
        self.assertEqual(await owner.replied, 0)
        for _ in range(self.K):
            probes.append(await self.connect(local_port, SocksClient("", 0, request=associate)))
        await defer.gatherResults([p.closed for p in probes])
        owner.transport.loseConnection()
        await owner.closed
        return [text for text in support.event_texts(events) if "OneShotFactory" not in text]

    @coroutine_test
    async def test_no_line_per_probe(self):
        """Without verbose, none of the probes writes a line."""
        self.assertEqual(await self.probe(verbose=False), [])

    @coroutine_test
    async def test_verbose_restores_lines(self):
        """With verbose, each probe has its line."""
        lines = await self.probe(verbose=True)
        for marker in self.MARKERS:
            self.assertEqual(sum(marker in line for line in lines), self.K, (marker, lines))


class VerboseOptionTests(unittest.SynchronousTestCase):
    """-v/--verbose, as a flag and a config key."""

    def test_verbose_flag_and_key(self):
        """-v and --verbose set verbose on both commands; the Python shadowsocks' levels work in the file; off by default."""
        for options, argv in ((ServerOptions, ["-k", "pw"]), (LocalOptions, ["-s", "192.0.2.1", "-k", "pw"])):
            for flag in ("-v", "--verbose"):
                parsed = options()
                parsed.parseOptions([*argv, flag])
                self.assertTrue(parsed.config.verbose, (options, flag))
            parsed = options()
            parsed.parseOptions(argv)
            self.assertFalse(parsed.config.verbose)
        for value, expected in ((True, True), (False, False), (1, True), (2, True), (0, False), (-1, False)):
            self.assertEqual(server_config({"verbose": value}).verbose, expected, value)
