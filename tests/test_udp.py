"""
UDP: SOCKS5 UDP ASSOCIATE and tunnels through ssx-local -> ssx-server, on
loopback; the server's NAT under bad input and floods.
"""

from __future__ import annotations

import collections
import os
import random
import socket
import tempfile
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.names import client as dns_client, dns, server as dns_server
from twisted.python.failure import Failure
from twisted.trial import unittest

from ssx.wire import socks5
from ssx.wire.address import Address, encode_address
from ssx.crypto import CipherSuite, generate_psk, make_suite
from ssx.crypto.edition2022 import UdpClientSession, parse_password
from ssx.server.forbidden import parse_forbidden
from ssx.local.socks import ProxyPortFactory
from ssx.local.udp import Socks5UdpRelay
from ssx.local.picker import ServerPicker
from ssx.local.upstream import make_upstream
from ssx.config.upstreams import ServerEntry
from ssx.errors import ReplayError
from ssx.server.session_windows import SessionWindows
from ssx.server.udp import Shadowsocks2022UdpRelay, ShadowsocksUdpRelay
from tests import support
from tests.support import chains
from tests.support import Zone, mixed_payloads


class UdpChainTestCase(unittest.TestCase):
    """ssx-server and ssx-local with UDP, and UDP echo targets."""

    method = "aes-256-gcm"

    def chain(self, **values) -> int:
        server, server_port = support.start_server(method=self.method, mode="tcp_and_udp", **values)
        self.addCleanup(server.stopService)
        local_values = {k: v for k, v in values.items() if k not in ("hosts_file", "nameserver")}
        local, local_port = support.start_local(server_port, method=self.method, mode="tcp_and_udp", **local_values)
        self.addCleanup(local.stopService)
        self.server_service, self.local_service = server, local
        return local_port

    async def associate(self, socks_port: int) -> support.Socks5UdpClient:
        client = support.Socks5UdpClient()
        self.addCleanup(client.close)
        self.assertEqual(await client.open(socks_port), 0)
        return client

    def echo(self, address: str = "127.0.0.1") -> tuple[int, support.UdpEcho]:
        port, echo = support.listen_udp_echo(address)
        self.addCleanup(port.stopListening)
        return port.getHost().port, echo


class SocksUdpTests(UdpChainTestCase):
    """SOCKS5 UDP ASSOCIATE end to end."""

    async def _thousand(self) -> None:
        echo_port, echo = self.echo()
        socks_port = self.chain()
        client = await self.associate(socks_port)
        # salt 32 + tag 16 + IPv4 address 7: the largest payload that fits in one datagram.
        payloads = mixed_payloads(1000, 65507 - 55)
        resent = await client.exchange("127.0.0.1", echo_port, payloads)
        self.assertGreaterEqual(echo.count, 1000)
        self.assertLess(resent, 20)
        too_big = os.urandom(65507 - 54)
        relay, echoed = self.local_service.udp_relays[0], echo.count
        client.send("127.0.0.1", echo_port, too_big)
        # Dropped (counted at once) or relayed to the echo.
        await support.wait_for(lambda: relay.dropped + echo.count - echoed >= 1, 3, "the datagram was neither dropped nor relayed")
        self.assertEqual(self.local_service.udp_relays[0].dropped, 1)

    def test_thousand_datagrams(self):
        """1,000 datagrams of mixed sizes (1 byte to the largest that fits) come back intact; one too large is dropped."""
        return defer.Deferred.fromCoroutine(self._thousand())

    def test_chain_port_taken_for_udp(self):
        """A chain whose first TCP port has its UDP twin held elsewhere starts on another port, UDP relaying."""
        # A number free for TCP (another test's connection may use any
        # ephemeral number for TCP), whose UDP twin this test holds.
        for _ in range(20):
            with socket.socket() as tcp:
                tcp.bind(("127.0.0.1", 0))
                held = tcp.getsockname()[1]
                taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                try:
                    taken.bind(("127.0.0.1", held))
                except OSError:
                    taken.close()
                    continue
            break
        else:
            self.fail("no port number free for TCP and UDP at once")
        self.addCleanup(taken.close)
        self.patch(chains, "_loopback_ports", lambda: iter([held, 0]))
        server, port = support.start_server(method=self.method, mode="tcp_and_udp")
        self.addCleanup(server.stopService)
        self.assertNotEqual(port, held)
        self.assertEqual(server.datagram_listeners[0].port.getHost().port, port)

    def test_free_port_free_for_udp(self):
        """The number support.free_port hands out for a child or a manager binds for UDP and TCP at once."""
        for _ in range(20):
            number = support.free_port()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
                udp.bind(("127.0.0.1", number))
                tcp.bind(("127.0.0.1", number))

    async def _targets(self) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".hosts", delete=False) as f:
            f.write("127.0.0.1 udp.ssx.test\n")
        self.addCleanup(os.unlink, f.name)
        v4_port, _ = self.echo()
        socks_port = self.chain(hosts_file=f.name, nameserver="127.0.0.1:9")
        client = await self.associate(socks_port)
        payloads = mixed_payloads(50, 1400, seed=2)
        await client.exchange("127.0.0.1", v4_port, payloads[:25])
        # A domain target: resolved by the server; the reply names the IP it came from.
        await client.exchange("udp.ssx.test", v4_port, payloads[25:], reply_host="127.0.0.1")
        if support.ipv6_loopback():
            v6_port, _ = self.echo("::1")
            await client.exchange("::1", v6_port, mixed_payloads(25, 1400, seed=3))

    def test_ipv4_ipv6_and_domain_targets(self):
        """IPv4, IPv6 and domain destinations all work, each reply naming its true source."""
        return defer.Deferred.fromCoroutine(self._targets())

    async def _association_ends(self) -> None:
        echo_port, echo = self.echo()
        socks_port = self.chain()
        client = await self.associate(socks_port)
        await client.exchange("127.0.0.1", echo_port, [b"before"])
        relay = self.local_service.udp_relays[0]
        self.assertEqual(len(relay.nat), 1)
        client.control.transport.loseConnection()
        await support.wait_until(lambda: len(relay.nat) == 0, 3)
        self.assertEqual(len(relay.nat), 0)
        dropped = relay.dropped
        client.send("127.0.0.1", echo_port, b"after")
        # Dropped (counted at once) or relayed to the echo.
        await support.wait_for(lambda: relay.dropped - dropped + echo.count - 1 >= 1, 3, "the datagram was neither dropped nor relayed")
        self.assertEqual(relay.dropped, dropped + 1)
        self.assertEqual(echo.count, 1)

    def test_association_ends_with_control_connection(self):
        """Closing the TCP control connection ends the association: later datagrams are dropped."""
        return defer.Deferred.fromCoroutine(self._association_ends())

    async def _fragments(self) -> None:
        echo_port, echo = self.echo()
        socks_port = self.chain()
        client = await self.associate(socks_port)
        client.port.write(b"\x00\x00\x01" + support.socks5_udp_header("127.0.0.1", echo_port)[3:] + b"frag", client.relay)
        relay = self.local_service.udp_relays[0]
        # Dropped (counted at once) or relayed to the echo.
        await support.wait_for(lambda: relay.dropped + echo.count >= 1, 3, "the datagram was neither dropped nor relayed")
        self.assertEqual(echo.count, 0)
        self.assertEqual(self.local_service.udp_relays[0].dropped, 1)

    def test_fragments_dropped(self):
        """A datagram with FRAG != 0 is dropped, not relayed."""
        return defer.Deferred.fromCoroutine(self._fragments())

    async def _udp_not_enabled(self) -> None:
        server, server_port = support.start_server(method=self.method)
        self.addCleanup(server.stopService)
        local, socks_port = support.start_local(server_port, method=self.method)
        self.addCleanup(local.stopService)
        client = support.Socks5UdpClient()
        self.addCleanup(client.close)
        self.assertEqual(await client.open(socks_port), 7)

    def test_udp_associate_refused_without_udp(self):
        """Without -u, UDP ASSOCIATE gets reply 07 (command not supported)."""
        return defer.Deferred.fromCoroutine(self._udp_not_enabled())


class StreamMethodUdpTests(SocksUdpTests):
    """The same with a stream method (IV per datagram)."""

    method = "chacha20-ietf"

    async def _thousand(self) -> None:
        echo_port, _ = self.echo()
        socks_port = self.chain()
        client = await self.associate(socks_port)
        # IV 12 + IPv4 address 7.
        await client.exchange("127.0.0.1", echo_port, mixed_payloads(200, 65507 - 19))


class TunnelTests(UdpChainTestCase):
    """Tunnel (port-forward) mode, TCP and UDP, to a DNS server."""

    async def _dns(self) -> None:
        zone = Zone()
        factory = dns_server.DNSServerFactory(authorities=[zone])
        # TCP and UDP on one port number: retry if the number is taken for TCP.
        from twisted.internet.error import CannotListenError

        for _ in range(10):
            udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
            try:
                tcp = reactor.listenTCP(udp.getHost().port, factory, interface="127.0.0.1")
            except CannotListenError:
                await udp.stopListening()
                continue
            break
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)
        dns_port = udp.getHost().port
        server, server_port = support.start_server(method=self.method, mode="tcp_and_udp")
        self.addCleanup(server.stopService)
        # Port 0: the tunnel binds a free port (TCP, and UDP beside it on the same number).
        local, _ = support.start_local(
            server_port, method=self.method, mode="tcp_and_udp", tunnels=[f"127.0.0.1:0=127.0.0.1:{dns_port}"]
        )
        self.addCleanup(local.stopService)
        from ssx.local.tunnel import TunnelFactory

        [tunnel_port] = [s.port.getHost().port for s in local.listeners if isinstance(s.factory, TunnelFactory)]
        resolver = dns_client.Resolver(servers=[("127.0.0.1", tunnel_port)], reactor=reactor)
        # Over UDP, as dig would ask.
        answers, _, _ = await resolver.lookupAddress("www.ssx.test", timeout=[2])
        self.assertEqual([a.payload.dottedQuad() for a in answers], ["192.0.2.10"])
        # Over TCP.
        result = await resolver.queryTCP([dns.Query("dual.ssx.test", dns.AAAA)], timeout=5)
        self.assertEqual([socket.inet_ntop(socket.AF_INET6, a.payload.address) for a in result.answers], ["2001:db8::20"])
        self.assertIn((b"www.ssx.test", dns.A), zone.queries)
        self.assertIn((b"dual.ssx.test", dns.AAAA), zone.queries)
        for connection in resolver.connections:
            connection.transport.loseConnection()
        await support.wait_until(lambda: not local.factory.connections and not server.factory.connections, 2)

    def test_dns_through_tunnel(self):
        """A DNS query to a tunnel port is answered by a twisted.names server behind the chain, over UDP and TCP."""
        return defer.Deferred.fromCoroutine(self._dns())

    async def _tcp_tunnel_echo(self) -> None:
        echo = support.listen_echo()
        self.addCleanup(echo.stopListening)
        server, server_port = support.start_server(method=self.method)
        self.addCleanup(server.stopService)
        tunnel_port = support.free_port()
        local, _ = support.start_local(
            server_port, method=self.method, tunnel_address=f"127.0.0.1:{echo.getHost().port}",
            listen=None, local_address="127.0.0.1", local_port=tunnel_port,
        )
        self.addCleanup(local.stopService)
        payload = os.urandom(2 * 1024 * 1024)
        received = await threads_echo(tunnel_port, payload)
        self.assertEqual(support.sha256(received), support.sha256(payload))

    def test_tcp_tunnel(self):
        """-L HOST:PORT turns the listener into a TCP tunnel: 2 MiB echoed through it intact."""
        return defer.Deferred.fromCoroutine(self._tcp_tunnel_echo())


def threads_echo(port: int, payload: bytes) -> defer.Deferred:
    """Send `payload` to 127.0.0.1:port from a thread, half-close, read to EOF."""
    from twisted.internet import threads

    def run() -> bytes:
        import threading

        with socket.create_connection(("127.0.0.1", port)) as s:
            def send():
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send)
            sender.start()
            chunks = []
            while True:
                data = s.recv(262144)
                if not data:
                    break
                chunks.append(data)
            sender.join()
            return b"".join(chunks)

    return threads.deferToThread(run)


class _FakePort:
    def __init__(self) -> None:
        self.written: list = []
        self.closed = False

    def write(self, data, addr=None):
        self.written.append((data, addr))

    def stopListening(self):
        self.closed = True

    def getHost(self):
        return None


class _FakeUdpReactor(Clock):
    """A clock that also hands out fake UDP ports, for the NAT's own logic."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[_FakePort] = []

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        fake = _FakePort()
        self.ports.append(fake)
        return fake


class ServerUdpRelayTests(unittest.SynchronousTestCase):
    """The server's UDP relay alone, on a fake reactor."""

    def setUp(self) -> None:
        self.reactor = _FakeUdpReactor()
        self.suite = CipherSuite("chacha20-ietf-poly1305", "pw")
        self.relay = ShadowsocksUdpRelay(self.reactor, self.suite, None, parse_forbidden(None), timeout=60, capacity=100)
        self.relay.transport = _FakePort()
        self.relay.startProtocol()
        self.addCleanup(self.relay.stopProtocol)

    def packet(self, host: str, port: int, payload: bytes) -> bytes:
        return self.suite.udp_seal(encode_address(Address(host, port)) + payload)

    def test_flood_bounded(self):
        """5,000 distinct client addresses never make the NAT hold more than its capacity (sockets closed as evicted)."""
        for i in range(5000):
            self.relay.datagramReceived(self.packet("93.184.216.34", 53, b"q"), ("198.51.100.1", 1024 + i))
            self.assertLessEqual(len(self.relay.nat), 100)
        self.assertEqual(sum(not p.closed for p in self.reactor.ports), 100)

    def test_expiry_on_clock(self):
        """An idle client's entry and socket go after udp_timeout, swept on the reactor clock."""
        self.relay.datagramReceived(self.packet("93.184.216.34", 53, b"q"), ("198.51.100.1", 5000))
        self.assertEqual(len(self.relay.nat), 1)
        self.reactor.advance(75)
        self.assertEqual(len(self.relay.nat), 0)
        self.assertTrue(self.reactor.ports[0].closed)

    def test_bad_datagrams_dropped(self):
        """Garbage, truncated and forbidden-target datagrams are dropped and counted, never answered."""
        self.relay.datagramReceived(os.urandom(100), ("198.51.100.1", 1))
        self.relay.datagramReceived(self.packet("93.184.216.34", 53, b"q")[:40], ("198.51.100.1", 2))
        self.relay.datagramReceived(self.suite.udp_seal(b"\x01\x08\x08"), ("198.51.100.1", 3))
        self.relay.datagramReceived(self.packet("127.0.0.1", 53, b"q"), ("198.51.100.1", 4))
        self.assertEqual(self.relay.dropped, 3)
        self.assertEqual(self.relay.refused, 1)
        self.assertEqual(self.relay.transport.written, [])
        self.assertEqual([w for p in self.reactor.ports for w in p.written], [])

    def test_reply_carries_source(self):
        """A target's reply goes back to its client sealed with the target's own address (full cone)."""
        client = ("198.51.100.1", 7000)
        self.relay.datagramReceived(self.packet("93.184.216.34", 53, b"q"), client)
        [port] = self.reactor.ports
        self.assertEqual(port.written, [(b"q", ("93.184.216.34", 53))])
        upstream = self.relay.nat.peek(client)._ports[4]
        protocol = [p for p in [upstream]][0]
        self.relay.reply(client, Address("203.0.113.9", 5353), b"answer")
        [(packet, to)] = self.relay.transport.written
        self.assertEqual(to, client)
        self.assertEqual(self.suite.udp_open(packet), encode_address(Address("203.0.113.9", 5353)) + b"answer")
        del protocol


class Server2022SessionTests(unittest.SynchronousTestCase):
    """The 2022 server relay's sessions on a fake reactor: each belongs to the user a packet authenticated as."""

    method = "2022-blake3-aes-256-gcm"

    def setUp(self) -> None:
        self.reactor = _FakeUdpReactor()
        self.reactor.advance(1_700_000_000)
        psk, alice, bob = (generate_psk(self.method) for _ in range(3))
        self.passwords = {"alice": f"{psk}:{alice}", "bob": f"{psk}:{bob}"}
        suite = make_suite(self.method, psk, users={"alice": alice, "bob": bob}, now=self.reactor.seconds)
        self.relay = Shadowsocks2022UdpRelay(self.reactor, suite, None, parse_forbidden(None), timeout=60, capacity=100)
        self.relay.transport = _FakePort()
        self.relay.startProtocol()
        self.addCleanup(self.relay.stopProtocol)

    def client(self, user: str, session_id: bytes | None = None) -> UdpClientSession:
        keys = parse_password(self.method, self.passwords[user])
        return UdpClientSession(self.method, keys, now=self.reactor.seconds, session_id=session_id)

    def session_of(self, user: str):
        [key] = [key for key in self.relay.nat if key[0].name == user]
        return key, self.relay.nat.peek(key)

    def test_other_user_cannot_take_a_session(self):
        """A packet of user B under user A's session ID neither moves A's replies nor advances A's window."""
        target = Address("93.184.216.34", 53)
        alice_address, bob_address = ("198.51.100.1", 4000), ("198.51.100.2", 5000)
        alice = self.client("alice")
        for _ in range(3):
            self.relay.datagramReceived(alice.encode(target, b"a"), alice_address)
        bob = self.client("bob", session_id=alice.session_id)
        bob.packet_id = 20_000
        self.relay.datagramReceived(bob.encode(target, b"b"), bob_address)
        self.assertEqual(len(self.relay.nat), 2)
        alice_key, alice_session = self.session_of("alice")
        bob_key, bob_session = self.session_of("bob")
        self.assertEqual((alice_session.client, bob_session.client), (alice_address, bob_address))
        # Alice's window did not move: her next packet ID is still fresh.
        self.relay.datagramReceived(alice.encode(target, b"a"), alice_address)
        self.assertEqual(self.relay.dropped, 0)
        # Each session's replies go to its own user, sealed with that user's key.
        self.relay.reply(alice_key, Address("93.184.216.34", 53), b"for alice")
        self.relay.reply(bob_key, Address("93.184.216.34", 53), b"for bob")
        [(to_alice, address_a), (to_bob, address_b)] = self.relay.transport.written
        self.assertEqual((address_a, address_b), (alice_address, bob_address))
        self.assertEqual(alice.decode(to_alice).payload, b"for alice")
        self.assertEqual(bob.decode(to_bob).payload, b"for bob")

    def test_same_user_moves_its_session(self):
        """A session's own user sending from a new address moves its replies there (the client roamed)."""
        alice = self.client("alice")
        target = Address("93.184.216.34", 53)
        self.relay.datagramReceived(alice.encode(target, b"a"), ("198.51.100.1", 4000))
        self.relay.datagramReceived(alice.encode(target, b"a"), ("198.51.100.9", 4001))
        key, session = self.session_of("alice")
        self.assertEqual((len(self.relay.nat), session.client), (1, ("198.51.100.9", 4001)))

    def small_relay(self, capacity: int, timeout: float = 60) -> Shadowsocks2022UdpRelay:
        suite = self.relay.suite
        relay = Shadowsocks2022UdpRelay(self.reactor, suite, None, parse_forbidden(None), timeout=timeout, capacity=capacity)
        relay.transport = _FakePort()
        relay.startProtocol()
        self.addCleanup(relay.stopProtocol)
        return relay

    def test_replay_after_eviction(self):
        """A session pushed out of the NAT table keeps its window: its captured packet replayed is dropped."""
        relay = self.small_relay(capacity=2)
        target = Address("93.184.216.34", 53)
        alice = self.client("alice")
        captured = alice.encode(target, b"a")
        relay.datagramReceived(captured, ("198.51.100.1", 4000))
        for _ in range(2):  # Bob's sessions push Alice's out
            relay.datagramReceived(self.client("bob").encode(target, b"b"), ("198.51.100.2", 5000))
        self.assertNotIn("alice", [key[0].name for key in relay.nat])
        relay.datagramReceived(captured, ("198.51.100.66", 6666))
        self.assertEqual(relay.dropped, 1)
        self.assertNotIn(("198.51.100.66", 6666), [relay.nat.peek(key).client for key in relay.nat])
        # Alice's own next packet still goes through, in the session she had.
        relay.datagramReceived(alice.encode(target, b"a"), ("198.51.100.1", 4000))
        self.assertEqual(relay.dropped, 1)
        self.assertIn("alice", [key[0].name for key in relay.nat])

    def test_replay_after_idle_expiry(self):
        """With a NAT timeout shorter than the timestamp window, an expired session's packet replayed is dropped."""
        relay = self.small_relay(capacity=10, timeout=5)
        target = Address("93.184.216.34", 53)
        captured = self.client("alice").encode(target, b"a")
        relay.datagramReceived(captured, ("198.51.100.1", 4000))
        self.reactor.advance(10)
        relay.nat.sweep()
        self.assertEqual(len(relay.nat), 0)
        relay.datagramReceived(captured, ("198.51.100.66", 6666))
        self.assertEqual(relay.dropped, 1)
        self.assertNotIn(("198.51.100.66", 6666), [relay.nat.peek(key).client for key in relay.nat])

    def test_replayed_twice_after_eviction(self):
        """A replay that was dropped leaves the kept window as it was: the same packet replayed later is dropped too."""
        relay = self.small_relay(capacity=2)
        target = Address("93.184.216.34", 53)
        captured = self.client("alice").encode(target, b"a")
        relay.datagramReceived(captured, ("198.51.100.1", 4000))
        for round in range(2):
            for _ in range(2):  # honest sessions push Alice's out (again)
                relay.datagramReceived(self.client("bob").encode(target, b"b"), ("198.51.100.2", 5000))
            relay.datagramReceived(captured, ("198.51.100.66", 6666))
            self.assertEqual(relay.dropped, round + 1)
            self.assertNotIn(("198.51.100.66", 6666), [relay.nat.peek(key).client for key in relay.nat])

    def test_window_kept_while_the_timestamp_passes(self):
        """A packet stamped T passes until int(now) - T = 30: its session's window is kept that long after expiry."""
        relay = self.small_relay(capacity=10, timeout=5)
        target = Address("93.184.216.34", 53)
        captured = self.client("alice").encode(target, b"a")  # stamped now, a whole second
        relay.datagramReceived(captured, ("198.51.100.1", 4000))
        self.reactor.advance(30.5)
        relay.nat.sweep()
        relay.datagramReceived(captured, ("198.51.100.66", 6666))
        self.assertEqual(relay.dropped, 1)
        self.assertEqual(len(relay.nat), 0)

    def test_window_forgotten_early_refuses_that_session_only(self):
        """Past the bound of kept windows, a forgotten session's packets are refused; other new sessions are not."""
        relay = self.small_relay(capacity=2)
        target = Address("93.184.216.34", 53)
        captured = self.client("alice").encode(target, b"a")
        relay.datagramReceived(captured, ("198.51.100.1", 4000))
        for _ in range(6):  # more sessions than the NAT table and the kept windows hold
            relay.datagramReceived(self.client("bob").encode(target, b"b"), ("198.51.100.2", 5000))
        self.assertGreater(relay.sessions.forgotten_early, 0)
        dropped = relay.dropped
        relay.datagramReceived(captured, ("198.51.100.66", 6666))
        self.assertEqual(relay.dropped, dropped + 1)
        # A client whose clock is ahead does not stop the others' new sessions.
        ahead = self.client("bob")
        ahead._now = lambda: self.reactor.seconds() + 25
        relay.datagramReceived(ahead.encode(target, b"b"), ("198.51.100.3", 5001))
        relay.datagramReceived(self.client("alice").encode(target, b"a"), ("198.51.100.1", 4001))
        self.assertEqual(relay.dropped, dropped + 1)

    def test_forgotten_session_spares_its_users_next_session(self):
        """A session forgotten early refuses only its own ID: the next session of the same user (a long name, IDs one apart) passes."""
        windows = SessionWindows(lambda: object(), retired_capacity=0)
        user = collections.namedtuple("User", "name")("alice01")
        first, second = (user, (1).to_bytes(8, "big")), (user, (2).to_bytes(8, "big"))
        state = windows.open(first, 1.0, lambda: None)
        state.newest = 1  # a packet stamped now was accepted: the window is fresh
        windows.close(first, state, 1.0)
        self.assertEqual(windows.forgotten_early, 1)
        with self.assertRaises(ReplayError):
            windows.open(first, 1.0, lambda: None)
        windows.open(second, 1.0, lambda: None)

    def test_server_session_kept_across_nat_entries(self):
        """A session that comes back after its NAT entry expired answers under the same server session ID."""
        relay = self.small_relay(capacity=10, timeout=5)
        target = Address("93.184.216.34", 53)
        alice = self.client("alice")
        relay.datagramReceived(alice.encode(target, b"a"), ("198.51.100.1", 4000))
        [key] = list(relay.nat)
        relay.reply(key, target, b"one")
        self.reactor.advance(10)
        relay.nat.sweep()
        relay.datagramReceived(alice.encode(target, b"a"), ("198.51.100.1", 4000))
        relay.reply(key, target, b"two")
        first, second = (alice.decode(packet) for packet, _ in relay.transport.written)
        self.assertEqual((first.payload, second.payload), (b"one", b"two"))
        self.assertEqual(first.session_id, second.session_id)

    def test_replay_on_another_address(self):
        """A server's relays on two addresses share their windows: a packet captured on one is refused on the other."""
        first = self.small_relay(capacity=10)
        second = Shadowsocks2022UdpRelay(
            self.reactor, first.suite, None, parse_forbidden(None), timeout=60, capacity=10, sessions=first.sessions
        )
        second.transport = _FakePort()
        second.startProtocol()
        self.addCleanup(second.stopProtocol)
        target = Address("93.184.216.34", 53)
        captured = self.client("alice").encode(target, b"a")
        first.datagramReceived(captured, ("198.51.100.1", 4000))
        second.datagramReceived(captured, ("198.51.100.66", 6666))
        self.assertEqual((first.dropped, second.dropped), (0, 1))


class Server2022ServiceTests(unittest.TestCase):
    """The 2022 relays of one ssx-server service, as build_service makes them."""

    def test_relays_of_one_server_share_their_windows(self):
        """A server listening on two addresses gives both 2022 UDP relays one store of session windows."""
        service, _ = support.start_server(
            method="2022-blake3-aes-128-gcm", password=generate_psk("2022-blake3-aes-128-gcm"), mode="tcp_and_udp",
            listen=["tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.2"],
        )
        self.addCleanup(service.stopService)
        first, second = service.udp_relays
        self.assertIsInstance(first, Shadowsocks2022UdpRelay)
        self.assertIs(first.sessions, second.sessions)


# -- SOCKS5 UDP associations belong to their application ----------------------


async def wait_for(condition, seconds: float = 5.0) -> None:
    """Poll `condition` on the reactor until it holds; AssertionError after `seconds`."""
    deadline = reactor.seconds() + seconds
    while not condition():
        if reactor.seconds() >= deadline:
            raise AssertionError(f"condition not met within {seconds:g} s")
        await deferLater(reactor, 0.01, lambda: None)


class AuthenticatingUdpClient(support.Socks5UdpClient):
    """
    A SOCKS5 UDP client that logs in (RFC 1929) and may name, in its
    request, the UDP port it will send from (RFC 1928 §6) instead of zeros.
    """

    def __init__(self, credentials: tuple[bytes, bytes]) -> None:
        super().__init__()
        self.credentials = credentials

    def bind(self) -> int:
        """Open the UDP socket before associating; returns its port."""
        self.port = reactor.listenUDP(0, self.udp, interface="127.0.0.1", maxPacketSize=65535)
        return self.port.getHost().port

    async def open(self, socks_port: int, host: str = "127.0.0.1", name: int = 0) -> int:
        """Log in and associate naming 0.0.0.0:`name`; returns the SOCKS5 reply code (-1 if the login failed)."""
        user, password = self.credentials
        steps = [
            (b"\x05\x01\x02", b"\x05\x02"),
            (bytes((1, len(user))) + user + bytes((len(password),)) + password, b"\x01\x00"),
            (b"\x05\x03\x00\x01\x00\x00\x00\x00" + name.to_bytes(2, "big"), None),
        ]
        got: defer.Deferred = defer.Deferred()

        class Control(protocol.Protocol):
            def connectionMade(self):
                self.buffer = b""
                self.transport.write(steps[0][0])

            def dataReceived(self, data):
                self.buffer += data
                while steps[0][1] is not None and len(self.buffer) >= len(steps[0][1]):
                    expected = steps.pop(0)[1]
                    answer, self.buffer = self.buffer[: len(expected)], self.buffer[len(expected) :]
                    if answer != expected:
                        got.callback(-1)
                        return
                    self.transport.write(steps[0][0])
                if len(self.buffer) >= 10 and not got.called:
                    got.callback(self.buffer[1])

            def connectionLost(self, reason=None):
                if not got.called:
                    got.callback(-1)

        self.control = await connectProtocol(TCP4ClientEndpoint(reactor, host, socks_port), Control())
        code = await got
        if code != 0:
            return code
        reply = self.control.buffer
        self.relay = (socket.inet_ntop(socket.AF_INET, reply[4:8]), int.from_bytes(reply[8:10], "big"))
        if self.port is None:
            self.bind()
        return 0


class AssociationOwnerTests(UdpChainTestCase):
    """With SOCKS5 credentials, an association's UDP relay serves the application that opened it, not its neighbours on the IP."""

    credentials = (b"alice", b"s3cret")

    def chain_with_login(self) -> int:
        server, server_port = support.start_server(method=self.method, mode="tcp_and_udp")
        self.addCleanup(server.stopService)
        local, local_port = support.start_local(
            server_port, method=self.method, mode="tcp_and_udp", socks_user="alice", socks_password="s3cret"
        )
        self.addCleanup(local.stopService)
        self.local_service = local
        return local_port

    async def login(self, socks_port: int, name_port: bool = False) -> AuthenticatingUdpClient:
        client = AuthenticatingUdpClient(self.credentials)
        self.addCleanup(client.close)
        name = client.bind() if name_port else 0
        self.assertEqual(await client.open(socks_port, name=name), 0)
        return client

    def intruder(self) -> Any:
        """Another process's UDP socket on the same IP, which never logged in."""
        port = reactor.listenUDP(0, protocol.DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port

    async def _first_datagram(self) -> None:
        echo_port, echo = self.echo()
        socks_port = self.chain_with_login()
        relay = self.local_service.udp_relays[0]
        owner = await self.login(socks_port)
        await owner.exchange("127.0.0.1", echo_port, [b"owner 1"])
        # The association now belongs to the owner's UDP port.
        received, echoed = relay.received, echo.count
        intruder = self.intruder()
        intruder.write(support.socks5_udp_header("127.0.0.1", echo_port) + b"intruder", owner.relay)
        await wait_for(lambda: relay.received == received + 1)
        self.assertEqual(relay.dropped, 1)
        self.assertEqual(relay.unassociated, 1)
        # The owner's next datagram is the only one the target sees.
        await owner.exchange("127.0.0.1", echo_port, [b"owner 2"])
        self.assertEqual(echo.count, echoed + 1)

    def test_association_bound_by_first_datagram(self):
        """An association requested with a zero address belongs to the port of its first datagram; another socket's datagram is dropped and counted."""
        return defer.Deferred.fromCoroutine(self._first_datagram())

    async def _named_port(self) -> None:
        echo_port, echo = self.echo()
        socks_port = self.chain_with_login()
        relay = self.local_service.udp_relays[0]
        owner = await self.login(socks_port, name_port=True)
        # The intruder is first to send, and still gets nowhere.
        intruder = self.intruder()
        intruder.write(support.socks5_udp_header("127.0.0.1", echo_port) + b"intruder", owner.relay)
        await wait_for(lambda: relay.received == 1)
        self.assertEqual(relay.dropped, 1)
        self.assertEqual(relay.unassociated, 1)
        await owner.exchange("127.0.0.1", echo_port, [b"owner"])
        self.assertEqual(echo.count, 1)
        # A second login naming the owner's port is refused (REP 02).
        second = AuthenticatingUdpClient(self.credentials)
        self.addCleanup(second.close)
        self.assertEqual(await second.open(socks_port, name=owner.port.getHost().port), 2)

    def test_association_bound_to_named_port(self):
        """An association whose request names its UDP port takes datagrams from that port only, even before the first one; nobody else can claim the port."""
        return defer.Deferred.fromCoroutine(self._named_port())

    async def _side_by_side(self) -> None:
        echo_port, echo = self.echo()
        socks_port = self.chain_with_login()
        relay = self.local_service.udp_relays[0]
        first = await self.login(socks_port)
        second = await self.login(socks_port)
        for round in range(3):
            await first.exchange("127.0.0.1", echo_port, [b"first %d" % round])
            await second.exchange("127.0.0.1", echo_port, [b"second %d" % round])
        self.assertEqual(len(relay.nat), 2)
        first.control.transport.loseConnection()
        await wait_for(lambda: len(relay.nat) == 1)
        # The first application's association is gone with its control
        # connection; the second one's goes on.
        received, echoed = relay.received, echo.count
        first.send("127.0.0.1", echo_port, b"too late")
        await wait_for(lambda: relay.received == received + 1)
        self.assertEqual(relay.unassociated, 1)
        await second.exchange("127.0.0.1", echo_port, [b"second 3"])
        self.assertEqual(echo.count, echoed + 1)

    def test_associations_side_by_side(self):
        """Two applications on one IP each keep their own association; closing one's control connection ends only that one."""
        return defer.Deferred.fromCoroutine(self._side_by_side())


class AssociateSourcePortTests(unittest.SynchronousTestCase):
    """Which UDP port an ASSOCIATE request commits its application to (RFC 1928 §6)."""

    def test_named_ports(self):
        """A non-zero port counts with an unspecified address or the control connection's own IP, in either spelling."""
        for host, peer in [
            ("0.0.0.0", "127.0.0.1"),
            ("::", "127.0.0.1"),
            ("127.0.0.1", "127.0.0.1"),
            ("127.0.0.1", "::ffff:127.0.0.1"),
            ("::ffff:127.0.0.1", "127.0.0.1"),
            ("::1", "::1"),
        ]:
            self.assertEqual(socks5.associate_source_port(Address(host, 5000), peer), 5000, (host, peer))

    def test_nothing_named(self):
        """Port zero, a domain or another host's IP (a target, a NATed address) name nothing: the first datagram will."""
        for host, port in [("0.0.0.0", 0), ("127.0.0.1", 0), ("example.com", 5000), ("192.0.2.1", 53), ("::2", 5000)]:
            self.assertIsNone(socks5.associate_source_port(Address(host, port), "127.0.0.1"), (host, port))


class _FakeServerPort(_FakePort):
    def connect(self, host, port):
        self.connected = (host, port)


class _FakeLocalReactor(_FakeUdpReactor):
    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        fake = _FakeServerPort()
        self.ports.append(fake)
        return fake


class Socks5RelayOwnershipTests(unittest.SynchronousTestCase):
    """The local SOCKS5 UDP relay's associations on a fake reactor."""

    def setUp(self) -> None:
        self.reactor = _FakeLocalReactor()
        suite = CipherSuite("chacha20-ietf-poly1305", "pw")
        self.relay = Socks5UdpRelay(self.reactor, suite, ("192.0.2.1", 8388), timeout=60, capacity=100)
        self.relay.transport = _FakePort()
        self.relay.startProtocol()
        self.addCleanup(self.relay.stopProtocol)
        self.datagram = support.socks5_udp_header("93.184.216.34", 53) + b"q"

    def sent(self) -> int:
        """Datagrams that went towards the server."""
        return sum(len(port.written) for port in self.reactor.ports)

    def test_waiting_associations_claimed_in_order(self):
        """Associations without a port are claimed oldest first by new source ports; a known port never claims a second one."""
        first = self.relay.associate("127.0.0.1")
        second = self.relay.associate("::ffff:127.0.0.1")
        self.relay.datagramReceived(self.datagram, ("127.0.0.1", 4000))
        self.relay.datagramReceived(self.datagram, ("127.0.0.1", 4000))
        self.assertEqual((first.port, second.port), (4000, None))
        self.relay.datagramReceived(self.datagram, ("127.0.0.1", 4001))
        self.assertEqual(second.port, 4001)
        self.relay.datagramReceived(self.datagram, ("127.0.0.1", 4002))
        self.assertEqual((self.sent(), self.relay.unassociated, self.relay.dropped), (3, 1, 1))

    def test_garbage_claims_nothing(self):
        """A malformed datagram is dropped without claiming the waiting association."""
        association = self.relay.associate("127.0.0.1")
        self.relay.datagramReceived(b"\x00\x00\x01junk", ("127.0.0.1", 4000))
        self.assertIsNone(association.port)
        self.relay.datagramReceived(self.datagram, ("127.0.0.1", 4001))
        self.assertEqual((association.port, self.sent()), (4001, 1))

    def test_named_port_owned_once(self):
        """A port named by one association cannot be named by another until the first ends."""
        owner = self.relay.associate("127.0.0.1", 4000)
        self.assertIsNone(self.relay.associate("127.0.0.1", 4000))
        self.relay.datagramReceived(self.datagram, ("127.0.0.1", 4000))
        self.assertTrue(self.relay.active(owner))
        self.relay.dissociate(owner)
        self.assertFalse(self.relay.active(owner))
        self.assertEqual(len(self.relay.nat), 0)
        self.assertIsNotNone(self.relay.associate("127.0.0.1", 4000))

    def test_ended_waiting_association(self):
        """An association that ends before its first datagram leaves nothing for a later datagram to claim."""
        association = self.relay.associate("127.0.0.1")
        self.relay.dissociate(association)
        self.relay.datagramReceived(self.datagram, ("127.0.0.1", 4000))
        self.assertEqual((self.sent(), self.relay.unassociated), (0, 1))
        self.assertFalse(self.relay.active(association))


class PickerFollowingRelayTests(unittest.SynchronousTestCase):
    """The local UDP relay with a picker, on a fake reactor: which server each application's socket goes to."""

    def setUp(self) -> None:
        self.reactor = _FakeLocalReactor()
        entries = [ServerEntry(f"192.0.2.{i}", 8388, "chacha20-ietf-poly1305", "pw") for i in (1, 2)]
        self.picker = ServerPicker([make_upstream(self.reactor, entry) for entry in entries])
        self.first, self.second = self.picker.upstreams()
        self.relay = Socks5UdpRelay(self.reactor, self.first.suite, ("192.0.2.1", 8388), timeout=60, capacity=100,
                                    picker=self.picker)
        self.relay.transport = _FakePort()
        self.relay.startProtocol()
        self.addCleanup(self.relay.stopProtocol)
        self.datagram = support.socks5_udp_header("93.184.216.34", 53) + b"q"

    def send(self, port: int) -> None:
        self.relay.associate("127.0.0.1", port)
        self.relay.datagramReceived(self.datagram, ("127.0.0.1", port))

    def servers(self) -> list[tuple[str, int]]:
        """Where each socket towards a server is connected, and whether it is still open."""
        return [(port.connected[0], len(port.written)) for port in self.reactor.ports]

    def test_follows_the_picker(self):
        """A server marked down: the next datagram of its application moves to the preferred one; an up server keeps its sockets."""
        self.send(4000)
        self.assertEqual(self.servers(), [("192.0.2.1", 1)])
        self.picker.failed(self.first, "test")
        self.relay.datagramReceived(self.datagram, ("127.0.0.1", 4000))
        self.send(4001)
        self.assertEqual(self.servers(), [("192.0.2.1", 1), ("192.0.2.2", 1), ("192.0.2.2", 1)])
        self.assertEqual(len(self.relay.nat), 2)
        # The first server up again: sockets on the second (up) stay where they are.
        self.picker.succeeded(self.first)
        self.relay.datagramReceived(self.datagram, ("127.0.0.1", 4000))
        self.assertEqual(len(self.reactor.ports), 3)

    def test_all_down_stays(self):
        """With every server down there is nothing better: the socket is kept, not reopened per datagram."""
        self.send(4000)
        self.picker.failed(self.first, "test")
        self.picker.failed(self.second, "test")
        self.picker.failed(self.second, "test again")  # ranked after the first
        self.relay.datagramReceived(self.datagram, ("127.0.0.1", 4000))
        self.assertEqual(self.servers(), [("192.0.2.1", 2)])

    def test_server_dropped(self):
        """A server that left the picker (an online config refresh) loses its sockets at their next datagram."""
        picker = ServerPicker()
        picker.replace_dynamic([ServerEntry("192.0.2.3", 8388, "chacha20-ietf-poly1305", "pw")],
                               lambda entry: make_upstream(self.reactor, entry))
        self.relay.picker = picker
        self.send(4000)
        picker.replace_dynamic([ServerEntry("192.0.2.4", 8388, "chacha20-ietf-poly1305", "pw")],
                               lambda entry: make_upstream(self.reactor, entry))
        self.relay.datagramReceived(self.datagram, ("127.0.0.1", 4000))
        self.assertEqual(self.servers(), [("192.0.2.3", 1), ("192.0.2.4", 1)])


class _ListeningPort(_FakePort):
    def getHost(self):
        return IPv4Address("UDP", "127.0.0.1", 1080)


class AssociateProtocolTests(unittest.SynchronousTestCase):
    """The SOCKS5 control connection's side of an association, on in-memory transports."""

    def setUp(self) -> None:
        self.reactor = _FakeLocalReactor()
        suite = CipherSuite("chacha20-ietf-poly1305", "pw")
        self.relay = Socks5UdpRelay(self.reactor, suite, ("192.0.2.1", 8388), timeout=60, capacity=100)
        self.relay.transport = _ListeningPort()
        picker = ServerPicker([])
        self.factory = ProxyPortFactory(self.reactor, picker, timeout=300, udp_relay=self.relay)

    def connect(self) -> tuple[Any, StringTransport]:
        control = self.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        control.makeConnection(transport)
        return control, transport

    def test_named_port_and_refusal(self):
        """A request naming its port owns it until its control connection closes; a second one naming it meanwhile gets REP 02."""
        request = b"\x05\x01\x00" + b"\x05\x03\x00\x01\x00\x00\x00\x00\x0f\xa0"
        first, first_transport = self.connect()
        first.dataReceived(request)
        self.assertEqual(first_transport.value()[2:4], b"\x05\x00")
        second, second_transport = self.connect()
        second.dataReceived(request)
        self.assertEqual(second_transport.value()[2:], socks5.build_reply(socks5.REP_NOT_ALLOWED))
        self.assertTrue(second_transport.disconnecting)
        second.connectionLost(Failure(ConnectionDone()))
        self.relay.datagramReceived(support.socks5_udp_header("93.184.216.34", 53) + b"q", ("127.0.0.1", 4000))
        self.assertEqual(self.relay.unassociated, 0)
        first.connectionLost(Failure(ConnectionDone()))
        self.relay.datagramReceived(support.socks5_udp_header("93.184.216.34", 53) + b"q", ("127.0.0.1", 4000))
        self.assertEqual(self.relay.unassociated, 1)
