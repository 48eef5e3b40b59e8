"""
The health check and the server picker on a fake clock with fake server
connections, and the health check end to end for each method family:
ssx-local checking real ssx-server processes on loopback, with a local HTTP
origin as the check target.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web import resource, server as web_server

import ssx.local.tap as local_tap
from ssx.config import local_config
from ssx.config.upstreams import ServerEntry
from ssx.crypto import CipherSuite, generate_psk, lookup_method
from ssx.local.health import HealthCheckService
from ssx.local.picker import ServerPicker
from ssx.local.upstream import Upstream
from ssx.wire.address import Address, decode_address
from tests import support
from tests.support import FakeServer

REQUEST = b"GET /generate_204 HTTP/1.1\r\nHost: check.example\r\n\r\n"
TARGET = Address("check.example", 80)


class HealthCheckTests(unittest.SynchronousTestCase):
    """Each round probes every server; results rank and mark them."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.servers = [FakeServer(CipherSuite("chacha20-ietf-poly1305", f"pw{i}")) for i in range(2)]
        self.picker = ServerPicker(
            Upstream(ServerEntry(f"192.0.2.{i + 1}", 8388, "chacha20-ietf-poly1305", f"pw{i}"), s.suite, s)
            for i, s in enumerate(self.servers)
        )
        self.ups = self.picker.upstreams()
        self.service = HealthCheckService(self.clock, self.picker, TARGET, REQUEST, interval=30, timeout=5)

    def tearDown(self) -> None:
        if self.service.running:
            self.service.stopService()

    def answer(self, link, data: bytes = b"HTTP/1.1 204 No Content\r\n\r\n") -> None:
        link.answer(data)

    def test_latency_and_timeout(self):
        """A server answering after 40 ms gets that latency; one that never answers is down after the timeout."""
        self.service.startService()
        fast = self.servers[0].succeed()
        self.servers[1].succeed()
        plain = fast.sent()
        address, end = decode_address(plain)
        self.assertEqual((address, plain[end:]), (TARGET, REQUEST))
        self.clock.advance(0.04)
        self.answer(fast)
        self.assertTrue(fast.transport.disconnecting)
        up, latency, failures = self.picker.health(self.ups[0])
        self.assertEqual((up, failures), (True, 0))
        self.assertAlmostEqual(latency, 0.04)
        self.clock.advance(5)
        self.assertEqual(self.picker.health(self.ups[1]), (False, None, 1))
        self.assertEqual(self.picker.candidates(), self.ups)

    def test_refused_and_bad_stream(self):
        """A refused connection and an answer under another key both mark the server down."""
        self.service.startService()
        self.servers[0].fail(ConnectionRefusedError())
        link = self.servers[1].succeed()
        link.protocol.dataReceived(CipherSuite("chacha20-ietf-poly1305", "other").tcp_encryptor().encrypt(b"x" * 40))
        self.assertEqual([self.picker.health(u)[0] for u in self.ups], [False, False])

    def test_rounds_and_recovery(self):
        """Later rounds average the latency and bring a down server back up."""
        self.service.startService()
        self.servers[0].succeed()
        link = self.servers[1].succeed()
        self.clock.advance(0.1)
        self.answer(link)
        self.clock.advance(5)  # server 0 never answered in round one
        self.assertFalse(self.picker.health(self.ups[0])[0])
        self.clock.advance(25)  # round two
        self.assertEqual([len(s.attempts) for s in self.servers], [2, 2])
        first, second = self.servers[0].succeed(), self.servers[1].succeed()
        self.clock.advance(0.2)
        self.answer(first)
        self.answer(second)
        self.assertTrue(self.picker.health(self.ups[0])[0])
        self.assertAlmostEqual(self.picker.health(self.ups[0])[1], 0.2)
        self.assertAlmostEqual(self.picker.health(self.ups[1])[1], 0.7 * 0.1 + 0.3 * 0.2)
        self.assertEqual(self.picker.candidates()[0], self.ups[1])

    def test_single_server_not_checked(self):
        """With one server there is nothing to choose: no check connection is made."""
        picker = ServerPicker([self.ups[0]])
        service = HealthCheckService(self.clock, picker, TARGET, REQUEST, interval=30, timeout=5)
        service.startService()
        self.clock.advance(100)
        service.stopService()
        self.assertEqual(self.servers[0].attempts, [])

    def test_stop_mid_round(self):
        """Stopping during a round cancels its probes without marking anyone down."""
        self.service.startService()
        self.service.stopService()
        self.assertTrue(all(d.called for s in self.servers for _, d in s.attempts))
        self.assertEqual([self.picker.health(u)[0] for u in self.ups], [True, True])


class PickerTests(unittest.SynchronousTestCase):
    """Online config refreshes keep what the picker learnt about servers that stay."""

    def test_replace_dynamic(self):
        """Unchanged servers keep their Upstream and health; new ones are built; gone ones are dropped; static ones stay."""
        built: list[ServerEntry] = []

        def build(entry: ServerEntry) -> Upstream:
            built.append(entry)
            return Upstream(entry, CipherSuite(entry.method, entry.password), lambda p: None)

        static = build(ServerEntry("192.0.2.1", 1, "aes-128-gcm", "s"))
        picker = ServerPicker([static])
        a, b, c = (ServerEntry(f"198.51.100.{i}", 1, "aes-128-gcm", "x") for i in (1, 2, 3))
        picker.replace_dynamic([a, b, static.entry], build)
        kept = picker.upstreams()[1]
        picker.failed(kept, "test")
        picker.replace_dynamic([c, a], build)
        self.assertEqual([u.entry for u in picker.upstreams()], [static.entry, c, a])
        self.assertIs(picker.upstreams()[2], kept)
        self.assertFalse(picker.health(kept)[0])
        self.assertEqual(built, [static.entry, a, b, c])
        picker.succeeded(picker.upstreams()[1])
        self.assertEqual(picker.candidates()[-1], kept)


class _Check(resource.Resource):
    """The check target: 204 No Content, counting the requests that reached it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.hits = 0

    def render_GET(self, request: Any) -> bytes:
        self.hits += 1
        request.setResponseCode(204)
        return b""


class HealthCheckEndToEndTests(unittest.TestCase):
    """
    For each method family, ssx-local's health check through two real
    ssx-server processes to a local HTTP origin: both measured and up, then
    one stopped and marked down while the other stays up.
    """

    INTERVAL = 0.3

    def setUp(self) -> None:
        self.check = _Check()
        web = support.listen_web(web_server.Site(self.check))
        self.addCleanup(web.stopListening)
        self.web_port = web.getHost().port

    async def server(self, method: str, password: str) -> tuple[support.ChildProcess, int]:
        port = support.free_port()
        child = await support.start_twistd(
            self, "-n", "--pidfile=", "ssx-server", "-s", "127.0.0.1", "-p", str(port), "-k", password, "-m", method,
            "--shutdown-grace", "0", "--forbidden-ip=", ready=b"listening on",
        )
        return child, port

    async def _check(self, method: str) -> None:
        password = generate_psk(method) if lookup_method(method).family == "aead2022" else "health-check-password"
        (healthy, port_a), (stopped, port_b) = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self.server(method, password)) for _ in range(2)]
        )
        values = {
            "servers": [{"server": "127.0.0.1", "server_port": p, "password": password, "method": method} for p in (port_a, port_b)],
            "listen": "tcp:0:interface=127.0.0.1",
            "health_check_interval": self.INTERVAL,
            "health_check_url": f"http://127.0.0.1:{self.web_port}/check",
        }
        service = local_tap.build_service(reactor, local_config(values))
        service.startService()
        self.addCleanup(service.stopService)
        picker = service.picker
        a, b = picker.upstreams()

        measured = await support.wait_until(lambda: all(picker.health(u)[0] and picker.health(u)[1] is not None for u in (a, b)), 10)
        self.assertTrue(measured, f"{method}: not both servers measured and up: {[picker.health(u) for u in (a, b)]}")
        self.assertGreaterEqual(self.check.hits, 2)

        await stopped.stop()
        self.assertTrue(await support.wait_until(lambda: not picker.health(b)[0], 10), f"{method}: the stopped server is still up")
        # The healthy one goes on being checked, through to the origin, and stays up.
        hits = self.check.hits
        still_up = await support.wait_until(lambda: self.check.hits >= hits + 2 and picker.health(a)[0], 10)
        self.assertTrue(still_up, f"{method}: the running server: {picker.health(a)}, {self.check.hits - hits} checks reached the origin")
        self.assertFalse(picker.health(b)[0], method)
        self.assertEqual(picker.candidates()[0], a)

    def test_stream_method(self):
        """aes-256-cfb (stream): a running server is measured and up; a stopped one is marked down."""
        return defer.Deferred.fromCoroutine(self._check("aes-256-cfb"))

    def test_aead_2017_method(self):
        """chacha20-ietf-poly1305 (AEAD-2017): a running server is measured and up; a stopped one is marked down."""
        return defer.Deferred.fromCoroutine(self._check("chacha20-ietf-poly1305"))

    def test_2022_method(self):
        """2022-blake3-aes-128-gcm: a running server is measured and up; a stopped one is marked down."""
        return defer.Deferred.fromCoroutine(self._check("2022-blake3-aes-128-gcm"))
