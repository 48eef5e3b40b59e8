"""
Prometheus metrics (``--metrics``) of ssx-server and ssx-local: scraped
over HTTP from real twistd processes during and after traffic through
them, parsed with prometheus-client's parser, the byte counters checked
against the bytes sent; probes, forbidden targets, a server marked down
and a failover show up; without --metrics nothing is built, and a bad
endpoint stops start-up with one line naming the key.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import sys

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from twisted.web import resource, server as web_server, static

from ssx.config import local_config, server_config
from ssx.config.metrics import read_metrics
from ssx.crypto import CipherSuite, make_suite
from ssx.net.resolver import NameResolutionError
from ssx.server.forbidden import parse_forbidden
from ssx.server.protocol import ShadowsocksServerFactory
from ssx.errors import ConfigError
from ssx.server.tap import Options as ServerOptions
from ssx.wire.address import Address, encode_address
from ssx.wire.sip002 import format_url
from tests import support
from tests.support.forged import password_for, tcp_request, udp_datagram
from tests.support.waiting import coroutine_test, within

METHOD = "aes-128-gcm"
SALT = 16
# An AEAD-2017 chunk: a sealed length (2 + 16) and the payload's tag (16).
CHUNK_OVERHEAD = 34
CHUNK_MAX = 0x3FFF


def make_url(port: int, tag: str | None = None) -> str:
    return format_url(METHOD, password_for(METHOD), "127.0.0.1", port, tag)


def server_label(port: int) -> str:
    """How ssx-local labels the server of `make_url(port, f"s{port}")`: its tag and address."""
    return f"s{port} (127.0.0.1:{port})"


def aead_overhead_ok(wire: float, payload: int) -> bool:
    """Whether `wire` encrypted bytes are `payload` bytes in one salt and whole AEAD chunks, no more chunks than bytes."""
    extra = int(wire) - payload - SALT
    chunks, rest = divmod(extra, CHUNK_OVERHEAD)
    return rest == 0 and max(1, math.ceil(payload / CHUNK_MAX)) <= chunks <= max(1, payload)


class ScrapeTests(unittest.TestCase):
    """twistd ssx-server and ssx-local with --metrics, scraped with a real HTTP GET."""

    async def server(self, *extra: str) -> tuple[int, int]:
        """A twistd ssx-server with metrics on; returns (its port, its metrics port)."""
        port, metrics_port = support.free_port(), support.free_port()
        await support.start_twistd(
            self, "-n", "--pidfile=", "ssx-server", "-s", "127.0.0.1", "-p", str(port), "-k", password_for(METHOD),
            "-m", METHOD, "--url-file=", "--metrics", f"tcp:{metrics_port}:interface=127.0.0.1", *extra,
            ready=b"metrics listening on",
        )
        return port, metrics_port

    async def local(self, *servers: int) -> tuple[int, int]:
        """A twistd ssx-local with metrics on (a bare port), through `servers` in that order; (SOCKS port, metrics port)."""
        socks_port, metrics_port = support.free_port(), support.free_port()
        urls = []
        for port in servers:
            urls += ["--url", make_url(port, f"s{port}")]
        await support.start_twistd(
            self, "-n", "--pidfile=", "ssx-local", *urls, "-l", str(socks_port), "--metrics", str(metrics_port),
            "--health-check-interval", "0", ready=b"metrics listening on",
        )
        return socks_port, metrics_port

    def echo(self) -> tuple[support.HashingEchoFactory, int]:
        factory = support.HashingEchoFactory()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return factory, port.getHost().port

    async def raw_client(self, port: int, request: bytes) -> support.RawClient:
        client = support.RawClient(request)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        return client

    @coroutine_test
    async def test_server_bytes_exact(self) -> None:
        """A raw Shadowsocks client's bytes: c>p and p>c are exactly what it sent and got, p>t and t>p its payload."""
        echo, echo_port = self.echo()
        port, metrics_port = await self.server("--forbidden-ip=")
        payload = os.urandom(100_000)
        request = tcp_request(METHOD, encode_address(Address("127.0.0.1", echo_port)), payload, reactor.seconds)
        client = support.DecryptingClient(request, make_suite(METHOD, password_for(METHOD)).client_codec())
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        self.assertTrue(await support.wait_until(lambda: len(client.plain) >= len(payload), 10), len(client.plain))
        self.assertEqual(hashlib.sha256(client.plain).digest(), hashlib.sha256(payload).digest())
        self.assertEqual(echo.inbound[0].digest.digest(), hashlib.sha256(payload).digest())
        client.transport.loseConnection()
        await client.closed
        labels = {"port": str(port)}
        samples = await support.scrape_until(
            metrics_port, lambda s: s.get("ssx_server_connections_closed_total", status="relayed", **labels) == 1
        )
        self.assertEqual(samples.value("ssx_server_data_bytes_total", dir="c>p", proto="tcp", **labels), len(request))
        self.assertEqual(samples.value("ssx_server_data_bytes_total", dir="p>c", proto="tcp", **labels), client.wire)
        for direction in ("p>t", "t>p"):
            self.assertEqual(
                samples.value("ssx_server_payload_bytes_total", key="", dir=direction, proto="tcp", **labels), len(payload)
            )
        self.assertEqual(samples.value("ssx_server_connections_opened_total", **labels), 1)
        self.assertEqual(samples.value("ssx_server_connections_active", **labels), 0)
        self.assertEqual(samples.value("ssx_server_handshake_seconds_count", **labels), 1)
        self.assertEqual(samples.value("ssx_server_connect_seconds_count", **labels), 1)
        self.assertEqual(samples.value("ssx_server_key_search_seconds_count", proto="tcp", found_key="true", **labels), 1)
        self.assertEqual(samples.value("ssx_server_key_search_seconds_count", proto="tcp", found_key="false", **labels), 0)
        self.assertEqual(samples.value("ssx_server_ports"), 1)
        self.assertEqual(samples.value("ssx_server_keys", **labels), 1)
        self.assertEqual(samples.types["ssx_server_data_bytes"], "counter")

    @coroutine_test
    async def test_server_keys_of_a_keys_port(self) -> None:
        """ssx_server_keys counts a port's access keys, and follows a reload that adds one."""
        port, metrics_port = support.free_port(), support.free_port()
        path = os.path.abspath(self.mktemp())
        keys = [{"id": f"k{i}", "port": port, "cipher": METHOD, "secret": f"secret {i}"} for i in range(4)]

        def write(count: int) -> None:
            with open(path, "w") as f:
                json.dump({"server": "127.0.0.1", "url_file": "", "keys": keys[:count]}, f)

        write(3)
        child = await support.start_twistd(
            self, "-n", "--pidfile=", "ssx-server", "-c", path, "--metrics", f"tcp:{metrics_port}:interface=127.0.0.1",
            ready=b"metrics listening on",
        )
        samples = await support.scrape(metrics_port)
        self.assertEqual(samples.value("ssx_server_keys", port=str(port)), 3)
        write(4)
        await support.sighup(child)
        samples = await support.scrape(metrics_port)
        self.assertEqual(samples.value("ssx_server_keys", port=str(port)), 4)

    @coroutine_test
    async def test_removed_port_leaves_no_series(self) -> None:
        """A port a reload removes is in no series of the next scrape (histograms included); the kept port still is."""
        kept, removed, metrics_port = support.free_port(), support.free_port(), support.free_port()
        path = os.path.abspath(self.mktemp())

        def write(*ports: int) -> None:
            with open(path, "w") as f:
                json.dump({"server": "127.0.0.1", "url_file": "", "method": METHOD,
                           "servers": [{"server_port": n, "password": f"pw {n}"} for n in ports]}, f)

        write(kept, removed)
        child = await support.start_twistd(
            self, "-n", "--pidfile=", "ssx-server", "-c", path, "--metrics", f"tcp:{metrics_port}:interface=127.0.0.1",
            ready=b"metrics listening on",
        )
        before = await support.scrape(metrics_port)
        self.assertIn(str(removed), {dict(labels)["port"] for _, labels in before.samples if "port" in dict(labels)})
        write(kept)
        self.assertIn(f"port {removed} removed", await support.sighup(child))
        after = await support.scrape(metrics_port)
        ports = {dict(labels)["port"] for _, labels in after.samples if "port" in dict(labels)}
        self.assertEqual(ports, {str(kept)})
        self.assertEqual(after.value("ssx_server_handshake_seconds_count", port=str(kept)), 0)

    @coroutine_test
    async def test_local_and_server_during_traffic(self) -> None:
        """Through twistd ssx-local and ssx-server: payload counters exact at both ends, encrypted ones whole AEAD chunks."""
        echo, echo_port = self.echo()
        port, server_metrics = await self.server("--forbidden-ip=")
        socks_port, local_metrics = await self.local(port)
        payload = os.urandom(300_000)
        client = support.SocksClient("127.0.0.1", echo_port, payload)  # holds the connection open
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", socks_port), client)
        await within(10, client.echoed, "the echo through ssx-local and ssx-server")
        self.assertEqual(client.count, len(payload))
        self.assertEqual(client.digest.digest(), hashlib.sha256(payload).digest())
        self.assertEqual(echo.inbound[0].digest.digest(), hashlib.sha256(payload).digest())
        # During the relay: the connection is still open at both ends.
        server = await support.scrape(server_metrics)
        labels = {"port": str(port)}
        self.assertEqual(server.value("ssx_server_connections_active", **labels), 1)
        for direction in ("p>t", "t>p"):
            self.assertEqual(
                server.value("ssx_server_payload_bytes_total", key="", dir=direction, proto="tcp", **labels), len(payload)
            )
        header = len(encode_address(Address("127.0.0.1", echo_port)))
        up = server.value("ssx_server_data_bytes_total", dir="c>p", proto="tcp", **labels)
        down = server.value("ssx_server_data_bytes_total", dir="p>c", proto="tcp", **labels)
        self.assertTrue(aead_overhead_ok(up, len(payload) + header), up)
        self.assertTrue(aead_overhead_ok(down, len(payload)), down)
        local = await support.scrape(local_metrics)
        label = server_label(port)
        self.assertEqual(local.value("ssx_local_data_bytes_total", server=label, proto="tcp", dir="c>p"), len(payload))
        self.assertEqual(local.value("ssx_local_data_bytes_total", server=label, proto="tcp", dir="p>c"), len(payload))
        self.assertEqual(local.value("ssx_local_connections_total", front="socks5"), 1)
        self.assertEqual(local.value("ssx_local_connections_active"), 1)
        self.assertEqual(local.value("ssx_local_server_up", server=label), 1)
        client.transport.loseConnection()

    @coroutine_test
    async def test_probe_and_forbidden(self) -> None:
        """Garbage counts as a bad_data probe, a loopback target (forbidden by default) as refused forbidden."""
        port, metrics_port = await self.server()
        labels = {"port": str(port)}
        garbage = await self.raw_client(port, os.urandom(200))
        samples = await support.scrape_until(
            metrics_port, lambda s: s.get("ssx_server_probes_total", reason="bad_data", **labels) == 1
        )
        self.assertEqual(samples.value("ssx_server_probes_total", reason="bad_data", **labels), 1)
        self.assertEqual(samples.value("ssx_server_key_search_seconds_count", proto="tcp", found_key="false", **labels), 1)
        self.assertEqual(samples.value("ssx_server_refused_total", proto="tcp", reason="forbidden", **labels), 0)
        # The prober hears nothing: the connection stays open, silent.
        self.assertEqual(bytes(garbage.received), b"")
        self.assertFalse(garbage.closed.called)
        garbage.transport.abortConnection()
        request = tcp_request(METHOD, encode_address(Address("127.0.0.1", 9)), b"hello", reactor.seconds)
        refused = await self.raw_client(port, request)
        await refused.closed
        samples = await support.scrape_until(
            metrics_port, lambda s: s.get("ssx_server_refused_total", proto="tcp", reason="forbidden", **labels) == 1
        )
        self.assertEqual(samples.value("ssx_server_refused_total", proto="tcp", reason="forbidden", **labels), 1)
        self.assertEqual(samples.value("ssx_server_connections_closed_total", status="not_connected", **labels), 1)
        self.assertEqual(samples.value("ssx_server_probes_total", reason="bad_data", **labels), 1)
        self.assertEqual(bytes(refused.received), b"")

    @coroutine_test
    async def test_local_server_down_and_failover(self) -> None:
        """A server that refuses connections shows up=0 and one failover; the next server carries the relay."""
        echo, echo_port = self.echo()
        dead = support.free_port()
        port, _ = await self.server("--forbidden-ip=")
        socks_port, metrics_port = await self.local(dead, port)
        payload = os.urandom(50_000)
        reply, echoed = await support.socks_transfer(socks_port, "127.0.0.1", echo_port, payload)
        self.assertEqual(reply, 0)
        self.assertEqual(hashlib.sha256(echoed).digest(), hashlib.sha256(payload).digest())
        samples = await support.scrape(metrics_port)
        self.assertEqual(samples.value("ssx_local_servers"), 2)
        self.assertEqual(samples.value("ssx_local_server_up", server=server_label(dead)), 0)
        self.assertEqual(samples.value("ssx_local_server_up", server=server_label(port)), 1)
        self.assertEqual(samples.value("ssx_local_server_failures", server=server_label(dead)), 1)
        self.assertEqual(samples.value("ssx_local_failovers_total", server=server_label(dead)), 1)
        self.assertIsNone(samples.get("ssx_local_failovers_total", server=server_label(port)))
        self.assertEqual(samples.value("ssx_local_data_bytes_total", server=server_label(port), proto="tcp", dir="c>p"),
                         len(payload))
        self.assertIsNone(samples.get("ssx_local_data_bytes_total", server=server_label(dead), proto="tcp", dir="c>p"))

    @coroutine_test
    async def test_udp_bytes_and_nat(self) -> None:
        """A UDP round trip: c>p and p>c are the datagrams' sizes, one NAT entry added and held."""
        port, metrics_port = await self.server("--forbidden-ip=", "-u")
        echo_port, echo = support.listen_udp_echo()
        self.addCleanup(echo_port.stopListening)
        collector = support.DatagramCollector()
        client = reactor.listenUDP(0, collector, interface="127.0.0.1")
        self.addCleanup(client.stopListening)
        payload = os.urandom(1000)
        header = encode_address(Address("127.0.0.1", echo_port.getHost().port))
        datagram = udp_datagram(METHOD, header, payload, reactor.seconds)
        client.write(datagram, ("127.0.0.1", port))
        reply, _ = await within(10, collector.queue.get(), "the UDP echo through ssx-server")
        self.assertEqual(make_suite(METHOD, password_for(METHOD)).udp_open(reply), header + payload)
        labels = {"port": str(port)}
        samples = await support.scrape(metrics_port)
        self.assertEqual(samples.value("ssx_server_data_bytes_total", dir="c>p", proto="udp", **labels), len(datagram))
        self.assertEqual(samples.value("ssx_server_data_bytes_total", dir="p>c", proto="udp", **labels), len(reply))
        self.assertEqual(samples.value("ssx_server_data_bytes_total", dir="c>p", proto="tcp", **labels), 0)
        self.assertEqual(samples.value("ssx_server_udp_datagrams_total", **labels), 1)
        self.assertEqual(samples.value("ssx_server_udp_nat_entries", **labels), 1)
        self.assertEqual(samples.value("ssx_server_udp_nat_added_total", **labels), 1)
        self.assertEqual(samples.value("ssx_server_udp_nat_removed_total", **labels), 0)
        self.assertEqual(samples.value("ssx_server_udp_dropped_total", **labels), 0)
        for direction in ("p>t", "t>p"):
            self.assertEqual(
                samples.value("ssx_server_payload_bytes_total", key="", dir=direction, proto="udp", **labels), len(payload)
            )

    @coroutine_test
    async def test_local_udp_bytes(self) -> None:
        """SOCKS5 UDP through twistd ssx-local and ssx-server: each datagram's address and payload counted per server."""
        port, _ = await self.server("--forbidden-ip=", "-u")
        socks_port, metrics_port = support.free_port(), support.free_port()
        await support.start_twistd(
            self, "-n", "--pidfile=", "ssx-local", "--url", make_url(port, f"s{port}"), "-l", str(socks_port), "-u",
            "--metrics", str(metrics_port), ready=b"metrics listening on",
        )
        echo_port, echo = support.listen_udp_echo()
        self.addCleanup(echo_port.stopListening)
        client = support.Socks5UdpClient()
        self.assertEqual(await client.open(socks_port), 0)
        self.addCleanup(client.close)
        payload = os.urandom(700)
        resent = await client.exchange("127.0.0.1", echo_port.getHost().port, [payload])
        size = len(encode_address(Address("127.0.0.1", echo_port.getHost().port))) + len(payload)
        label = server_label(port)
        samples = await support.scrape_until(metrics_port, lambda s: s.get(
            "ssx_local_data_bytes_total", server=label, proto="udp", dir="p>c") == echo.count * size)
        self.assertEqual(samples.value("ssx_local_data_bytes_total", server=label, proto="udp", dir="c>p"),
                         (1 + resent) * size)
        self.assertEqual(samples.value("ssx_local_data_bytes_total", server=label, proto="udp", dir="p>c"),
                         echo.count * size)

    @coroutine_test
    async def test_local_health_checks(self) -> None:
        """Health checks through twistd ssx-local: the live server's latency and checks, the dead one down."""
        root = resource.Resource()
        root.putChild(b"check", static.Data(b"", "text/plain"))
        web = support.listen_web(web_server.Site(root))
        self.addCleanup(web.stopListening)
        dead = support.free_port()
        port, _ = await self.server("--forbidden-ip=")
        socks_port, metrics_port = support.free_port(), support.free_port()
        await support.start_twistd(
            self, "-n", "--pidfile=", "ssx-local", "--url", make_url(port, f"s{port}"), "--url", make_url(dead, f"s{dead}"),
            "-l", str(socks_port), "--metrics", str(metrics_port), "--health-check-interval", "0.2",
            "--health-check-url", f"http://127.0.0.1:{web.getHost().port}/check", ready=b"metrics listening on",
        )
        live, gone = server_label(port), server_label(dead)
        samples = await support.scrape_until(metrics_port, lambda s: (s.get("ssx_local_health_check_seconds_count",
                                                                            server=live) or 0) >= 2
                                             and s.get("ssx_local_server_up", server=gone) == 0)
        self.assertGreaterEqual(samples.value("ssx_local_health_check_seconds_count", server=live), 2)
        latency = samples.value("ssx_local_server_latency_seconds", server=live)
        # A moving average of the checks' latencies: above 0, below their sum.
        self.assertTrue(0 < latency <= samples.value("ssx_local_health_check_seconds_sum", server=live), latency)
        self.assertEqual(samples.value("ssx_local_server_up", server=live), 1)
        self.assertEqual(samples.value("ssx_local_server_up", server=gone), 0)
        self.assertGreaterEqual(samples.value("ssx_local_server_failures", server=gone), 1)
        self.assertIsNone(samples.get("ssx_local_server_latency_seconds", server=gone))
        self.assertIsNone(samples.get("ssx_local_health_check_seconds_count", server=gone))

    @coroutine_test
    async def test_bad_endpoint(self) -> None:
        """A --metrics that no endpoint parser takes stops start-up with one line naming the key."""
        out, err, code = await getProcessOutputAndValue(
            sys.executable, [*support.TWISTD, "-n", "--pidfile=", "ssx-server", "-k", "pw", "--url-file=",
                             "--metrics", "tcp:notaport"],
            env=support.twistd_env(), path=self.mktemp_dir(),
        )
        lines = (out + err).decode().strip().splitlines()
        self.assertNotEqual(code, 0)
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("ssx-server: bad configuration: metrics: "), lines[0])

    def mktemp_dir(self) -> str:
        path = self.mktemp()
        os.makedirs(path)
        return path

    @coroutine_test
    async def test_local_port_replaced_at_reload(self) -> None:
        """A reload that moves the proxy port: the new port's connection and bytes are counted, the old port's stay counted."""
        echo, echo_port = self.echo()
        port, _ = await self.server("--forbidden-ip=")
        metrics_port = support.free_port()
        path = os.path.abspath(self.mktemp())

        def write(socks_port: int) -> None:
            with open(path, "w") as f:
                json.dump({"server": "127.0.0.1", "server_port": port, "password": password_for(METHOD), "method": METHOD,
                           "local_address": "127.0.0.1", "local_port": socks_port, "health_check_interval": 0,
                           "metrics": str(metrics_port), "shutdown_grace": 0}, f)

        first_port, second_port = support.free_port(), support.free_port()
        write(first_port)
        child = await support.start_twistd(self, "-n", "--pidfile=", "ssx-local", "-c", path, ready=b"metrics listening on")
        payloads = [os.urandom(100_000), os.urandom(50_000)]
        reply, received = await support.whole_echo_transfer(first_port, "127.0.0.1", echo_port, payloads[0])
        self.assertEqual((reply, support.sha256(received)), (0, support.sha256(payloads[0])))

        write(second_port)
        line = await support.sighup(child)
        self.assertIn(f"listening on tcp:{second_port}", line)
        reply, received = await support.whole_echo_transfer(second_port, "127.0.0.1", echo_port, payloads[1])
        self.assertEqual((reply, support.sha256(received)), (0, support.sha256(payloads[1])))

        label = f"127.0.0.1:{port}"
        total = sum(map(len, payloads))
        samples = await support.scrape_until(metrics_port, lambda s: s.get(
            "ssx_local_data_bytes_total", server=label, proto="tcp", dir="p>c") == total)
        self.assertEqual(samples.value("ssx_local_data_bytes_total", server=label, proto="tcp", dir="c>p"), total)
        self.assertEqual(samples.value("ssx_local_connections_total", front="socks5"), 2)


class OffTests(unittest.TestCase):
    """Without --metrics nothing of the metrics is built."""

    def test_server_without_metrics(self) -> None:
        """No registry, no listener, no observer, no counting of bytes or closed connections."""
        service, _ = support.start_server(method=METHOD, mode="tcp_and_udp")
        self.addCleanup(service.stopService)
        self.assertIsNone(service.metrics)
        self.assertIsNone(service.metrics_listener)
        factory = service.factory
        self.assertIsNone(factory.observer)
        self.assertIsNone(factory.closed_by_status)
        self.assertIsNone(factory.default_user)
        port = next(iter(service.ports.values()))
        self.assertIsNone(port.traffic)
        self.assertIsNone(port.udp_traffic)
        self.assertEqual(len(service.listeners), 1)

    def test_local_without_metrics(self) -> None:
        """No registry, no listener, no byte counting, no per-protocol count."""
        service, _ = support.start_local(support.free_port(), method=METHOD)
        self.addCleanup(service.stopService)
        self.assertIsNone(service.metrics)
        self.assertIsNone(service.metrics_listener)
        self.assertEqual(len(service.listeners), 1)
        for factory in service.factories:
            self.assertIsNone(factory.server_traffic)
            self.assertIsNone(factory.fronts)

    def test_with_metrics_separate_registries(self) -> None:
        """Two servers in one process each get a registry of their own, not the library's global one."""
        import prometheus_client

        first, _ = support.start_server(method=METHOD, metrics="tcp:0:interface=127.0.0.1")
        self.addCleanup(first.stopService)
        second, _ = support.start_server(method=METHOD, metrics="tcp:0:interface=127.0.0.1")
        self.addCleanup(second.stopService)
        self.assertIsNot(first.metrics.registry, second.metrics.registry)
        self.assertIsNot(first.metrics.registry, prometheus_client.REGISTRY)
        self.assertIsNone(prometheus_client.REGISTRY.get_sample_value("ssx_server_ports"))
        self.assertEqual(first.metrics.registry.get_sample_value("ssx_server_ports"), 1)


class ConfigTests(unittest.TestCase):
    """The metrics key: its short forms, and one line naming it when it cannot work."""

    def test_forms(self) -> None:
        """A bare port means loopback; IP:PORT that address; anything else is an endpoint description."""
        cases = {
            "9090": "tcp:9090:interface=127.0.0.1",
            9090: "tcp:9090:interface=127.0.0.1",
            "localhost:9090": "tcp:9090:interface=127.0.0.1",
            "0.0.0.0:9090": "tcp:9090:interface=0.0.0.0",
            "[::1]:9090": "tcp:9090:interface=\\:\\:1",
            "tcp:9090:interface=127.0.0.1": "tcp:9090:interface=127.0.0.1",
            "unix:/run/ssx-metrics.sock": "unix:/run/ssx-metrics.sock",
        }
        for given, wanted in cases.items():
            self.assertEqual(read_metrics({"metrics": given}), wanted, given)
        self.assertIsNone(read_metrics({}))
        self.assertIsNone(read_metrics({"metrics": ""}))

    def test_bad_values(self) -> None:
        """A port out of range or a value of the wrong type names the key."""
        for bad in ("70000", "127.0.0.1:70000", ["9090"], True):
            with self.assertRaises(ConfigError) as caught:
                read_metrics({"metrics": bad})
            self.assertEqual(caught.exception.key, "metrics", bad)
        with self.assertRaises(ConfigError) as caught:
            local_config({"server": "127.0.0.1", "password": "pw", "metrics": "70000"})
        self.assertEqual(caught.exception.key, "metrics")
        self.assertEqual(server_config({"password": "pw", "metrics": "9090"}).metrics, "tcp:9090:interface=127.0.0.1")

    def test_missing_library(self) -> None:
        """Without prometheus-client, --metrics stops start-up with one line naming the key and the library."""
        real = importlib.util.find_spec
        self.patch(importlib.util, "find_spec", lambda name, *a: None if name == "prometheus_client" else real(name, *a))
        options = ServerOptions()
        with self.assertRaises(SystemExit) as caught:
            options.parseOptions(["-k", "pw", "--url-file=", "--metrics", "9090"])
        message = str(caught.exception.code)
        self.assertIn("bad configuration: metrics: ", message)
        self.assertIn("prometheus-client", message)
        self.assertNotIn("\n", message)


class _Recorder:
    """A port observer that keeps what it is told."""

    def __init__(self) -> None:
        self.handshakes: list[float] = []
        self.connects: list[float] = []
        self.searches: list[bool] = []

    def handshake(self, seconds: float) -> None:
        self.handshakes.append(seconds)

    def connect(self, seconds: float) -> None:
        self.connects.append(seconds)

    def key_search(self, seconds: float, found: bool) -> None:
        self.searches.append(found)


class _Resolver:
    """Resolves names after `delay` seconds of `clock`, or fails them when `addresses` is empty."""

    def __init__(self, clock: MemoryReactorClock, addresses: list[str], delay: float = 0.0) -> None:
        self.clock, self.addresses, self.delay = clock, addresses, delay

    def resolve(self, name: str) -> defer.Deferred:
        if not self.addresses:
            return defer.fail(NameResolutionError(name))
        d: defer.Deferred = defer.Deferred()
        self.clock.callLater(self.delay, d.callback, self.addresses)
        return d


class ObserverTests(unittest.SynchronousTestCase):
    """What the server's connections report to the metrics, on a fake reactor."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.suite = CipherSuite(METHOD, "pw")
        self.resolver = _Resolver(self.reactor, ["93.184.216.34"], delay=0.25)
        self.factory = ShadowsocksServerFactory(self.reactor, self.suite, self.resolver, parse_forbidden(None),
                                                timeout=60)
        self.recorder = _Recorder()
        self.factory.observer = self.recorder
        self.factory.closed_by_status = {}

    def connect(self) -> tuple[object, StringTransport]:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "198.51.100.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "198.51.100.1", 40000))
        protocol.makeConnection(transport)
        return protocol, transport

    def test_handshake_and_connect_times(self) -> None:
        """Handshake time runs from accept to the header, connect time from the header to the target, on the clock."""
        protocol, transport = self.connect()
        self.reactor.advance(1.5)
        protocol.dataReceived(self.suite.tcp_encryptor().encrypt(encode_address(Address("example.com", 443)) + b"hi"))
        self.assertEqual(self.recorder.handshakes, [1.5])
        self.assertEqual(self.recorder.searches, [True])
        self.reactor.advance(0.25)
        [(_, _, target_factory, _, _)] = self.reactor.tcpClients
        self.reactor.advance(0.5)
        target = target_factory.buildProtocol(None)
        target.makeConnection(StringTransport())
        self.assertEqual(self.recorder.connects, [0.75])
        protocol.connectionLost(None)
        self.assertEqual(self.factory.closed_by_status, {"relayed": 1})

    def test_bad_data_and_no_header(self) -> None:
        """Garbage is a failed key search and closes as bad_data; a silent client closes as no_header."""
        garbage, _ = self.connect()
        garbage.dataReceived(os.urandom(100))
        silent, _ = self.connect()
        self.assertEqual(self.recorder.searches, [False])
        self.assertEqual(self.recorder.handshakes, [])
        garbage.connectionLost(None)
        silent.connectionLost(None)
        self.assertEqual(self.factory.closed_by_status, {"bad_data": 1, "no_header": 1})

    def test_unresolvable_counted_apart(self) -> None:
        """A name that does not resolve counts as unresolvable (and unreachable, as the summary logs it)."""
        self.resolver.addresses = []
        protocol, transport = self.connect()
        protocol.dataReceived(self.suite.tcp_encryptor().encrypt(encode_address(Address("nx.example", 80)) + b"x"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual((self.factory.targets_unresolvable, self.factory.targets_unreachable), (1, 1))
        protocol.connectionLost(None)
        self.assertEqual(self.factory.closed_by_status, {"not_connected": 1})
        self.assertEqual(self.recorder.connects, [])
