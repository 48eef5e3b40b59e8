"""
Several servers: two ssx-server processes, one stopped mid-test.  Running
downloads through the survivor finish, the one through the stopped server
ends at once with what it had (curl reports the short transfer), new
connections get through without the application noticing, and the health
check marks the stopped server down.
"""

from __future__ import annotations

import os

from twisted.internet import defer, reactor
from twisted.internet.task import LoopingCall
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from twisted.web import resource, server as web_server

from ssx.config import local_config
import ssx.local.tap as local_tap
from tests import support

PASSWORD = "failover-test-password"
METHOD = "aes-256-gcm"


class _Slow(resource.Resource):
    """A body of known length sent 64 KiB every 20 ms (8 MiB take about 2.6 s)."""

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body
        self.positions: list[list[int]] = []  # how far each download has got

    def render_GET(self, request):
        request.setHeader(b"content-length", str(len(self.body)).encode())
        position = [0]
        self.positions.append(position)

        def step() -> None:
            piece = self.body[position[0]:position[0] + 65536]
            position[0] += len(piece)
            request.write(piece)
            if position[0] >= len(self.body):
                loop.stop()
                request.finish()

        loop = LoopingCall(step)
        loop.clock = reactor
        request.notifyFinish().addErrback(lambda _: loop.running and loop.stop())
        loop.start(0.02)
        return web_server.NOT_DONE_YET


class _Blob(resource.Resource):
    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render_GET(self, request):
        return self.body


@support.requires("curl", package="curl")
class FailoverTests(unittest.TestCase):
    """ssx-local with two ssx-server processes."""

    def setUp(self) -> None:
        self.slow_body = os.urandom(8 * 1024 * 1024)
        self.body = os.urandom(1024 * 1024)
        root = resource.Resource()
        self.slow = _Slow(self.slow_body)
        root.putChild(b"slow", self.slow)
        root.putChild(b"blob", _Blob(self.body))
        root.putChild(b"check", _Blob(b""))
        web = support.listen_web(web_server.Site(root))
        self.addCleanup(web.stopListening)
        self.web_port = web.getHost().port

    async def server(self) -> tuple[support.ChildProcess, int]:
        port = support.free_port()
        child = await support.start_twistd(
            self, "-n", "--pidfile=", "ssx-server", "-s", "127.0.0.1", "-p", str(port), "-k", PASSWORD, "-m", METHOD,
            # Stopped means gone at once here, not after a graceful drain.
            "--shutdown-grace", "0",
            "--forbidden-ip=", ready=b"listening on",
        )
        return child, port

    def local(self, ports: list[int], interval: float = 0) -> tuple[object, int]:
        """An ssx-local with the servers on `ports`, in that order; returns (service, proxy port)."""
        values = {
            "servers": [{"server": "127.0.0.1", "server_port": p, "password": PASSWORD, "method": METHOD, "remarks": f"s{p}"}
                        for p in ports],
            "listen": "tcp:0:interface=127.0.0.1",
            "health_check_interval": interval,
            "health_check_url": f"http://127.0.0.1:{self.web_port}/check",
            "timeout": 10,
        }
        service = local_tap.build_service(reactor, local_config(values))
        service.startService()
        self.addCleanup(service.stopService)
        self.addCleanup(support.drained, service)
        return service, service.listeners[0].port.getHost().port

    def curl(self, proxy: list[str], path: str) -> defer.Deferred:
        return getProcessOutputAndValue(
            "curl", ["-sS", "--max-time", "30", *proxy, f"http://localhost:{self.web_port}/{path}"],
            env=dict(os.environ, no_proxy="", NO_PROXY=""),
        )

    async def _stop_one(self) -> None:
        (a, port_a), (b, port_b) = await self.server(), await self.server()
        ab, proxy_ab = self.local([port_a, port_b])
        ba, proxy_ba = self.local([port_b, port_a])
        checked, proxy_checked = self.local([port_a, port_b], interval=0.3)
        picker = checked.picker
        first, second = picker.upstreams()
        await support.wait_until(lambda: all(picker.health(u)[1] is not None for u in (first, second)), 5)
        self.assertTrue(all(picker.health(u)[0] and picker.health(u)[1] is not None for u in (first, second)),
                        "the health check did not measure both servers")

        # Two slow downloads: one through each server (each local tries its first server first).
        through_a = self.curl(["--socks5-hostname", f"127.0.0.1:{proxy_ab}"], "slow")
        through_b = self.curl(["-x", f"http://127.0.0.1:{proxy_ba}"], "slow")
        # Both under way: 512 KiB of the 8 MiB sent to each.
        await support.wait_for(
            lambda: len(self.slow.positions) == 2 and all(p[0] >= 512 * 1024 for p in self.slow.positions), 10,
            lambda: f"downloads not under way: {self.slow.positions}",
        )
        started = reactor.seconds()
        await a.stop()

        out, err, code = await through_a
        self.assertLess(reactor.seconds() - started, 5, "the download through the stopped server hung")
        self.assertEqual(code, 18, err)  # curl: "transfer closed with outstanding data"
        self.assertLess(len(out), len(self.slow_body))
        self.assertEqual(out, self.slow_body[:len(out)])

        out, err, code = await through_b
        self.assertEqual(code, 0, err)
        self.assertEqual(support.sha256(out), support.sha256(self.slow_body))

        # A new connection whose first choice is the stopped server: retried
        # on the other one, unseen by the application, in either protocol.
        for proxy in (["--socks5-hostname", f"127.0.0.1:{proxy_ab}"], ["-x", f"http://127.0.0.1:{proxy_ab}"]):
            out, err, code = await self.curl(proxy, "blob")
            self.assertEqual(code, 0, (proxy, err))
            self.assertEqual(support.sha256(out), support.sha256(self.body))
        self.assertFalse(ab.picker.health(ab.picker.upstreams()[0])[0], "the stopped server is not marked down")

        # The health check notices on its own, without a client connection.
        await support.wait_until(lambda: not picker.health(first)[0], 3)
        self.assertFalse(picker.health(first)[0], "the health check did not mark the stopped server down")
        self.assertEqual(picker.candidates()[0], second)
        accepted = checked.factory.accepted
        out, err, code = await self.curl(["--socks4a", f"127.0.0.1:{proxy_checked}"], "blob")
        self.assertEqual(code, 0, err)
        self.assertEqual(support.sha256(out), support.sha256(self.body))
        self.assertEqual(checked.factory.accepted, accepted + 1)
        await b.stop()

    def test_one_server_stopped(self):
        """Stopping one of two servers: its running download ends cleanly and short, the other's completes, new connections fail over."""
        return defer.Deferred.fromCoroutine(self._stop_one())

    async def _all_down(self) -> None:
        a, port_a = await self.server()
        service, proxy = self.local([port_a, support.free_port()])
        await a.stop()
        out, err, code = await self.curl(["-x", f"http://127.0.0.1:{proxy}", "-o", os.devnull, "-w", "%{http_code}"], "blob")
        self.assertEqual(out, b"502")
        out, err, code = await self.curl(["--socks5-hostname", f"127.0.0.1:{proxy}"], "blob")
        self.assertEqual(code, 97, err)  # curl: the SOCKS5 proxy refused the connection
        self.assertEqual(out, b"")

    def test_all_servers_down(self):
        """With every server down, HTTP clients get 502 and SOCKS5 clients a refusal, at once."""
        return defer.Deferred.fromCoroutine(self._all_down())


class UdpFailoverTests(unittest.TestCase):
    """SOCKS5 UDP through ssx-local with two ssx-server processes: UDP follows the picker when a server is down."""

    async def server(self) -> tuple[support.ChildProcess, int]:
        port = support.free_port()
        child = await support.start_twistd(
            self, "-n", "--pidfile=", "ssx-server", "-s", "127.0.0.1", "-p", str(port), "-k", PASSWORD, "-m", METHOD,
            "-u", "--shutdown-grace", "0", "--forbidden-ip=", ready=b"listening on",
        )
        return child, port

    async def _udp(self) -> None:
        (a, port_a), (b, port_b) = await self.server(), await self.server()
        values = {
            "servers": [{"server": "127.0.0.1", "server_port": p, "password": PASSWORD, "method": METHOD, "remarks": f"s{p}"}
                        for p in (port_a, port_b)],
            "listen": "tcp:0:interface=127.0.0.1",
            "mode": "tcp_and_udp",
            "health_check_interval": 0,
            "timeout": 10,
        }
        local = local_tap.build_service(reactor, local_config(values))
        local.startService()
        self.addCleanup(local.stopService)
        socks_port = local.listeners[0].port.getHost().port
        first, second = local.picker.upstreams()
        udp_port, echo = support.listen_udp_echo()
        self.addCleanup(udp_port.stopListening)
        target = udp_port.getHost().port
        tcp_echo = support.listen_echo()
        self.addCleanup(tcp_echo.stopListening)

        old = support.Socks5UdpClient()
        self.addCleanup(old.close)
        self.assertEqual(await old.open(socks_port), 0)
        await old.exchange("127.0.0.1", target, [os.urandom(n) for n in (1, 500, 1400)])

        await a.stop()
        # A TCP connection finds the first server gone: it is marked down and the connection goes to the second.
        payload = os.urandom(100_000)
        reply, received = await support.whole_echo_transfer(socks_port, "127.0.0.1", tcp_echo.getHost().port, payload)
        self.assertEqual(reply, 0)
        self.assertEqual(support.sha256(received), support.sha256(payload))
        self.assertFalse(local.picker.health(first)[0], "the stopped server is not marked down")
        self.assertIs(local.picker.candidates()[0], second)

        # The existing association's next datagrams, and a new association's, reach the target through the second.
        before = echo.count
        await old.exchange("127.0.0.1", target, [os.urandom(n) for n in (2, 600, 1300)])
        new = support.Socks5UdpClient()
        self.addCleanup(new.close)
        self.assertEqual(await new.open(socks_port), 0)
        await new.exchange("127.0.0.1", target, [os.urandom(n) for n in (3, 700, 1200)])
        self.assertGreaterEqual(echo.count, before + 6)
        await b.stop()

    def test_udp_follows_tcp_failover(self):
        """The first server stopped and marked down by a failing TCP connection: UDP datagrams, old association and new, go through the second."""
        return defer.Deferred.fromCoroutine(self._udp())
