"""
UDP: SOCKS5 UDP ASSOCIATE and tunnels through ssx-local -> ssx-server, on
loopback; the server's NAT under bad input and floods.
"""

from __future__ import annotations

import os
import random
import socket
import tempfile

from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.names import client as dns_client, dns, server as dns_server
from twisted.trial import unittest

from ssx.address import Address, encode_address
from ssx.crypto import CipherSuite
from ssx.forbidden import parse_forbidden
from ssx.server_udp import ShadowsocksUdpRelay
from tests import support
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
        from ssx.local import TunnelFactory

        [tunnel_port] = [s.port.getHost().port for s in local if isinstance(getattr(s, "factory", None), TunnelFactory)]
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
