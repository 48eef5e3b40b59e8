"""
The metrics of the features beside them: many keys on one port (each
key's bytes, TCP and UDP, the key search of both, refusals at a key's
limits and its quota use), the ACL on both ends (the local end's
decisions, the server's refused targets and clients), the local DNS
server and the transparent ports.  In-process ssx-server and ssx-local
services on loopback, scraped over HTTP and parsed with prometheus-client's
parser; the bytes moved checked byte for byte at both ends.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.trial import unittest

from ssx.config import local_config
from ssx.crypto import make_suite
from ssx.local import tap as local_tap
from ssx.server.key_limits import KeyLimit, KeyReport, KeyUsage
from ssx.wire.address import Address, encode_address
from tests import support
from tests.support import forged
from tests.support.dns_servers import RecordingZone, ask, listen_dns

# Three keys on one port, two AEAD-2017 ciphers among them.
KEYS = [
    {"id": "alice", "cipher": "aes-128-gcm", "secret": "alice's secret"},
    {"id": "bob", "cipher": "chacha20-ietf-poly1305", "secret": "bob's secret"},
    {"id": "carol", "cipher": "aes-256-gcm", "secret": "carol's secret"},
]
METHOD = "aes-256-gcm"
METRICS = "tcp:0:interface=127.0.0.1"
LOCAL_ADDRESS = "192.0.2.1"
REMOTE_ADDRESS = "198.51.100.2"


def port_label(server: Any) -> str:
    """The `port` label of an in-process server's one port: its configured number (the listener here is port 0's)."""
    (number,) = server.ports
    return str(number)


class _MetricsCase(support.LoopbackCase):
    """In-process ends with metrics on, hashing echoes on loopback."""

    def setUp(self) -> None:
        super().setUp()
        self.echo = support.HashingEchoFactory()
        self.echo_port = self.listen(reactor.listenTCP(0, self.echo, interface="127.0.0.1")).getHost().port

    def key_local(self, port: int, key: dict, **values: Any) -> int:
        """An in-process ssx-local with `key`'s cipher and secret, no health checks; returns its SOCKS port."""
        _, socks = self.local(port, method=key["cipher"], password=key["secret"], health_check_interval=0, **values)
        return socks

    async def relay_through(self, socks_port: int, size: int, echo: Any = None, host: str = "127.0.0.1",
                            echo_port: int | None = None) -> None:
        """`size` random bytes to an echo through `socks_port` and back, checked byte for byte at both ends."""
        echo = echo if echo is not None else self.echo
        payload = os.urandom(size)
        before = len(echo.inbound)
        reply, received = await support.whole_echo_transfer(
            socks_port, host, echo_port if echo_port is not None else self.echo_port, payload,
        )
        self.assertEqual(reply, 0)
        self.assertEqual(len(echo.inbound), before + 1)
        self.assertEqual((echo.inbound[-1].size, echo.inbound[-1].digest.hexdigest()), (size, support.sha256(payload)))
        self.assertEqual(support.sha256(received), support.sha256(payload))

    async def udp_round_trips(self, socks_port: int, host: str, port: int, sizes: tuple[int, ...]) -> tuple[int, int]:
        """SOCKS5 UDP datagrams of `sizes` to an echo at host:port, each echoed byte for byte; (payload bytes, resent)."""
        client = support.Socks5UdpClient()
        self._udp_clients.append(client)
        self.assertEqual(await client.open(socks_port), 0)
        payloads = [os.urandom(n) for n in sizes]
        resent = await client.exchange(host, port, payloads)
        return sum(sizes), resent


class ManyKeysTests(_MetricsCase):
    """A port of three AEAD-2017 keys: every per-key series under its key's id."""

    @support.coroutine_test
    async def test_tcp_bytes_per_key(self) -> None:
        """Two of three keys relay: each one's p>t and t>p are exactly its payload, the third has none, two keys found."""
        server, port = self.server(keys=KEYS, timeout=30, metrics=METRICS)
        alice, _, carol = KEYS
        await self.relay_through(self.key_local(port, alice), 300_000)
        await self.relay_through(self.key_local(port, carol), 100_000)
        labels = {"port": port_label(server)}
        samples = await support.scrape_until(
            support.metrics_port(server),
            lambda s: s.get("ssx_server_connections_closed_total", status="relayed", **labels) == 2,
        )
        for key, size in (("alice", 300_000), ("carol", 100_000)):
            for direction in ("p>t", "t>p"):
                self.assertEqual(samples.value("ssx_server_payload_bytes_total", key=key, proto="tcp", dir=direction,
                                               **labels), size, (key, direction))
        self.assertEqual([s for s in samples.labels_of("ssx_server_payload_bytes_total") if s["key"] not in
                          ("alice", "carol")], [])
        self.assertEqual(samples.value("ssx_server_keys", **labels), 3)
        self.assertEqual(samples.value("ssx_server_key_search_seconds_count", proto="tcp", found_key="true", **labels), 2)
        self.assertEqual(samples.value("ssx_server_key_search_seconds_count", proto="tcp", found_key="false", **labels), 0)
        # No key has limits, no ACL: nothing of their series.
        self.assertEqual(samples.labels_of("ssx_server_key_refused_total"), [])
        self.assertEqual(samples.labels_of("ssx_server_udp_clients_refused_total"), [])
        self.assertIsNone(samples.get("ssx_server_refused_total", proto="tcp", reason="acl", **labels))
        self.assertIsNone(samples.get("ssx_server_probes_total", reason="acl", **labels))

    @support.coroutine_test
    async def test_udp_bytes_and_key_search_per_key(self) -> None:
        """UDP of two of three keys: each one's payload bytes both ways under its id; each datagram's key search timed as udp."""
        udp_port, _ = support.listen_udp_echo()
        self.listen(udp_port)
        echo_port = udp_port.getHost().port
        server, port = self.server(keys=KEYS, mode="tcp_and_udp", metrics=METRICS)
        sent: dict[str, int] = {}
        datagrams = resent = 0
        for key, sizes in ((KEYS[0], (1, 100, 1400)), (KEYS[2], (10, 2000))):
            socks = self.key_local(port, key, mode="tcp_and_udp")
            sent[key["id"]], again = await self.udp_round_trips(socks, "127.0.0.1", echo_port, sizes)
            datagrams += len(sizes)
            resent += again
        # A datagram no key opens: a failed search, dropped without an answer.
        stranger = make_suite("aes-256-gcm", "nobody's secret")
        garbage = stranger.udp_seal(encode_address(Address("127.0.0.1", echo_port)) + b"x" * 50)
        sender = reactor.listenUDP(0, protocol.DatagramProtocol(), interface="127.0.0.1")
        self.listen(sender)
        sender.write(garbage, ("127.0.0.1", port))
        labels = {"port": port_label(server)}
        samples = await support.scrape_until(
            support.metrics_port(server),
            lambda s: s.get("ssx_server_key_search_seconds_count", proto="udp", found_key="false", **labels) == 1,
        )
        self.assertEqual(samples.value("ssx_server_key_search_seconds_count", proto="udp", found_key="false", **labels), 1)
        found = samples.value("ssx_server_key_search_seconds_count", proto="udp", found_key="true", **labels)
        for key, size in sent.items():
            for direction in ("p>t", "t>p"):
                counted = samples.value("ssx_server_payload_bytes_total", key=key, proto="udp", dir=direction, **labels)
                if resent:
                    self.assertGreaterEqual(counted, size, (key, direction))
                else:
                    self.assertEqual(counted, size, (key, direction))
        if resent:
            self.assertGreaterEqual(found, datagrams)
        else:
            self.assertEqual(found, datagrams)
        self.assertIsNone(samples.get("ssx_server_payload_bytes_total", key="bob", proto="udp", dir="p>t", **labels))

    @support.coroutine_test
    async def test_udp_key_search_2022(self) -> None:
        """A 2022 port's datagrams: each one's search (identity and opening) timed as udp, found or not; TCP's apart."""
        udp_port, _ = support.listen_udp_echo()
        self.listen(udp_port)
        method = "2022-blake3-aes-128-gcm"
        password = forged.password_for(method)
        server, port = self.server(method=method, password=password, mode="tcp_and_udp", metrics=METRICS)
        _, socks = self.local(port, method=method, password=password, mode="tcp_and_udp", health_check_interval=0)
        _, resent = await self.udp_round_trips(socks, "127.0.0.1", udp_port.getHost().port, (1, 100, 1400))
        sender = self.listen(reactor.listenUDP(0, protocol.DatagramProtocol(), interface="127.0.0.1"))
        sender.write(os.urandom(100), ("127.0.0.1", port))
        labels = {"port": port_label(server)}
        samples = await support.scrape_until(
            support.metrics_port(server),
            lambda s: s.get("ssx_server_key_search_seconds_count", proto="udp", found_key="false", **labels) == 1,
        )
        self.assertEqual(samples.value("ssx_server_key_search_seconds_count", proto="udp", found_key="false", **labels), 1)
        found = samples.value("ssx_server_key_search_seconds_count", proto="udp", found_key="true", **labels)
        if resent:
            self.assertGreaterEqual(found, 3)
        else:
            self.assertEqual(found, 3)
        self.assertEqual(samples.value("ssx_server_key_search_seconds_count", proto="tcp", found_key="true", **labels), 0)

    async def silenced(self, server: Any, port: int, key: dict, refusals: int) -> None:
        """A request under `key` that its limits refuse: silence, nothing at the echo; closed by us after."""
        suite = make_suite(key["cipher"], key["secret"])
        before = len(self.echo.inbound)
        client = await self.connect(
            port, support.RawClient(suite.client_codec().first(Address("127.0.0.1", self.echo_port), b"x" * 10)),
        )
        await support.wait_for(lambda: server.factory.key_usage.refused == refusals, 5,
                               lambda: "the connection was not refused")
        self.assertEqual((bytes(client.received), len(self.echo.inbound)), (b"", before))
        client.transport.loseConnection()
        await client.closed

    @support.coroutine_test
    async def test_key_limits(self) -> None:
        """Refusals by max_connections and by quota counted per key and reason; the quota's use is the bytes relayed."""
        keys = [{**KEYS[0], "max_connections": 1}, {**KEYS[1], "quota": {"bytes": "100K", "period": "1d"}}, KEYS[2]]
        server, port = self.server(keys=keys, timeout=30, metrics=METRICS)
        alice = make_suite(keys[0]["cipher"], keys[0]["secret"])
        first = await self.connect(
            port, support.RawClient(alice.client_codec().first(Address("127.0.0.1", self.echo_port), b"x")),
        )
        await support.wait_for(lambda: len(self.echo.inbound) == 1, 5, lambda: "alice's first connection never relayed")
        await self.silenced(server, port, keys[0], 1)
        # 60 KB both ways: 120,000 bytes against bob's 100 KiB, so his next connection is refused.
        await self.relay_through(self.key_local(port, keys[1]), 60_000)
        await self.silenced(server, port, keys[1], 2)
        labels = {"port": port_label(server)}
        samples = await support.scrape(support.metrics_port(server))
        self.assertEqual(samples.value("ssx_server_key_refused_total", key="alice", reason="max_connections", **labels), 1)
        self.assertEqual(samples.value("ssx_server_key_refused_total", key="alice", reason="quota", **labels), 0)
        self.assertEqual(samples.value("ssx_server_key_refused_total", key="bob", reason="quota", **labels), 1)
        self.assertEqual(samples.value("ssx_server_key_refused_total", key="bob", reason="max_connections", **labels), 0)
        self.assertEqual(samples.value("ssx_server_key_quota_used_bytes", key="bob", **labels), 120_000)
        # Alice has no quota, carol no limits: no quota gauge for either.
        self.assertEqual(samples.labels_of("ssx_server_key_quota_used_bytes"), [{"key": "bob", **labels}])
        self.assertEqual(samples.types["ssx_server_key_quota_used_bytes"], "gauge")
        first.transport.loseConnection()
        await first.closed


class KeyReportTests(unittest.SynchronousTestCase):
    """What `KeyUsage.report` gives the metrics, on a `Clock`."""

    def test_refusals_and_quota_period(self) -> None:
        """Refusals by reason per key; the quota's use reads 0 once its period ended, before any new connection."""
        clock = Clock()
        usage = KeyUsage(clock.seconds)
        connections, quota = KeyLimit(max_connections=1), KeyLimit(quota_bytes=10, quota_period=60.0)
        limits = {"a": connections, "b": quota}
        self.assertTrue(usage.admit("a", connections))
        self.assertFalse(usage.admit("a", connections))
        self.assertTrue(usage.admit("b", quota))
        usage.counted_against("b", _Sink()).add_up(12)
        self.assertFalse(usage.admit("b", quota))
        self.assertEqual(sorted(usage.report(limits)), [KeyReport("a", 1, 0, None), KeyReport("b", 0, 1, 12)])
        clock.advance(60)
        self.assertEqual(sorted(usage.report(limits)), [KeyReport("a", 1, 0, None), KeyReport("b", 0, 1, 0)])


class _Sink:
    """A traffic counter that forgets."""

    def add_up(self, count: int) -> None:
        pass

    def add_down(self, count: int) -> None:
        pass


class AclTests(_MetricsCase):
    """The ACL's decisions and refusals in the metrics of both ends."""

    def acl_file(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    @support.coroutine_test
    async def test_local_decisions(self) -> None:
        """[proxy_all] + [bypass_list] 127.0.0.2: each TCP connection and UDP datagram counted by route and protocol."""
        direct_echo = support.HashingEchoFactory()
        direct_port = self.listen(reactor.listenTCP(0, direct_echo, interface="127.0.0.2")).getHost().port
        udp = {}
        for address in ("127.0.0.1", "127.0.0.2"):
            udp_port, _ = support.listen_udp_echo(address)
            udp[address] = self.listen(udp_port).getHost().port
        _, port = self.server(mode="tcp_and_udp")
        local, socks = self.local(
            port, mode="tcp_and_udp", health_check_interval=0, metrics=METRICS,
            acl=self.acl_file("[proxy_all]\n[bypass_list]\n127.0.0.2\n"),
        )
        await self.relay_through(socks, 50_000)
        await self.relay_through(socks, 40_000, direct_echo, "127.0.0.2", direct_port)
        _, proxied_resent = await self.udp_round_trips(socks, "127.0.0.1", udp["127.0.0.1"], (1, 100, 1400))
        _, direct_resent = await self.udp_round_trips(socks, "127.0.0.2", udp["127.0.0.2"], (10, 2000))
        samples = await support.scrape(support.metrics_port(local))
        self.assertEqual(samples.value("ssx_local_acl_decisions_total", route="proxy", proto="tcp"), 1)
        self.assertEqual(samples.value("ssx_local_acl_decisions_total", route="direct", proto="tcp"), 1)
        # One decision per datagram sent (a resent one is decided again).
        self.assertEqual(samples.value("ssx_local_acl_decisions_total", route="proxy", proto="udp"), 3 + proxied_resent)
        self.assertEqual(samples.value("ssx_local_acl_decisions_total", route="direct", proto="udp"), 2 + direct_resent)

    @support.coroutine_test
    async def test_server_refusals(self) -> None:
        """A blocked target (TCP, UDP) counts as refused reason acl; a black-listed client as a probe (TCP) and a refused client (UDP)."""
        server, port = self.server(
            method=METHOD, password=forged.password_for(METHOD), mode="tcp_and_udp", metrics=METRICS,
            acl=self.acl_file("[accept_all]\n[black_list]\n127.0.0.2\n[outbound_block_list]\n||blocked.test\n"),
        )
        clients = []
        for host, source in (("www.blocked.test", "127.0.0.1"), ("127.0.0.1", "127.0.0.2")):
            stream = forged.tcp_request(METHOD, encode_address(Address(host, self.echo_port)), b"x" * 10, reactor.seconds)
            client = support.RawClient(stream)
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0)), client)
            clients.append(client)
        for client in clients:
            await support.within(10, client.closed, "the server kept a refused connection open")
            self.assertEqual(client.received, b"")
        for source in ("127.0.0.1", "127.0.0.2"):
            sender = self.listen(reactor.listenUDP(0, protocol.DatagramProtocol(), interface=source))
            host = "www.blocked.test" if source == "127.0.0.1" else "127.0.0.1"
            sender.write(forged.udp_datagram(METHOD, encode_address(Address(host, 9)), b"x", reactor.seconds),
                         ("127.0.0.1", port))
        labels = {"port": port_label(server)}
        samples = await support.scrape_until(
            support.metrics_port(server),
            lambda s: s.get("ssx_server_udp_clients_refused_total", reason="acl", **labels) == 1
            and s.get("ssx_server_refused_total", proto="udp", reason="acl", **labels) == 1,
        )
        self.assertEqual(samples.value("ssx_server_refused_total", proto="tcp", reason="acl", **labels), 1)
        self.assertEqual(samples.value("ssx_server_refused_total", proto="udp", reason="acl", **labels), 1)
        self.assertEqual(samples.value("ssx_server_probes_total", reason="acl", **labels), 1)
        self.assertEqual(samples.value("ssx_server_udp_clients_refused_total", reason="acl", **labels), 1)
        self.assertEqual(samples.value("ssx_server_refused_total", proto="tcp", reason="forbidden", **labels), 0)
        self.assertEqual(self.echo.inbound, [])


class DnsTests(_MetricsCase):
    """The local DNS server's counters."""

    @support.coroutine_test
    async def test_queries_by_route(self) -> None:
        """A direct name asked twice (once from the cache), a proxied one through the server, a bad name: each counted."""
        zones = {"local": RecordingZone(LOCAL_ADDRESS), "remote": RecordingZone(REMOTE_ADDRESS)}
        upstreams = {}
        for which, zone in zones.items():
            upstreams[which] = listen_dns(zone)
            for listening in upstreams[which].listening:
                self.listen(listening)
        _, server_port = self.server(mode="tcp_and_udp")
        values = {
            "password": support.PASSWORD, "server": "127.0.0.1", "server_port": server_port,
            "listen": "tcp:0:interface=127.0.0.1", "mode": "tcp_and_udp", "dns_listen": "127.0.0.1:0",
            "dns_local": f"127.0.0.1:{upstreams['local'].port}", "dns_remote": f"127.0.0.1:{upstreams['remote'].port}",
            "health_check_interval": 0, "metrics": METRICS,
        }
        local = local_tap.build_service(reactor, local_config(values), should_proxy=lambda name: name != "direct.test")
        local.startService()
        self._services.append(local)
        dns_port = local.dns_listener.port.getHost().port
        for name in ("direct.test", "direct.test", "proxied.test"):
            answer = await ask(dns_port, name)
            expected = LOCAL_ADDRESS if name == "direct.test" else REMOTE_ADDRESS
            self.assertEqual([rr.payload.dottedQuad() for rr in answer.answers if rr.type == dns.A], [expected])
        bad = await ask(dns_port, "bad_name!.test")
        self.assertNotEqual(bad.rCode, dns.OK)
        self.assertEqual((zones["local"].names, zones["remote"].names), (["direct.test"], ["proxied.test"]))
        samples = await support.scrape(support.metrics_port(local))
        self.assertEqual(samples.value("ssx_local_dns_queries_total", route="direct"), 1)
        self.assertEqual(samples.value("ssx_local_dns_queries_total", route="proxied"), 1)
        self.assertEqual(samples.value("ssx_local_dns_cache_hits_total"), 1)
        self.assertEqual(samples.value("ssx_local_dns_failures_total"), 1)
        self.assertEqual(samples.value("ssx_local_dns_cache_entries"), 2)


class TransparentTests(_MetricsCase):
    """A --redir port's connections in the local end's metrics."""

    @support.coroutine_test
    async def test_redir_front_and_no_destination(self) -> None:
        """A connection made to a --redir port itself (not redirected) counts under front redir, and as without destination; no ACL or DNS series."""
        _, server_port = self.server()
        redir_port = support.free_port()
        local, _ = self.local(server_port, health_check_interval=0, metrics=METRICS, redir=[f"127.0.0.1:{redir_port}"])
        client = support.RawClient(b"GET / HTTP/1.0\r\n\r\n")
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", redir_port), client)
        await support.within(10, client.closed, "the redir port kept a connection without a destination open")
        self.assertEqual(client.received, b"")
        samples = await support.scrape(support.metrics_port(local))
        self.assertEqual(samples.value("ssx_local_connections_total", front="redir"), 1)
        self.assertEqual(samples.value("ssx_local_transparent_no_destination_total", front="redir"), 1)
        self.assertIsNone(samples.get("ssx_local_connections_total", front="socks5"))
        # No --acl, no --dns-listen: none of their series.
        self.assertEqual(samples.labels_of("ssx_local_acl_decisions_total"), [])
        self.assertIsNone(samples.get("ssx_local_dns_cache_hits_total"))
