"""The health check and the server picker on a fake clock with fake server connections."""

from __future__ import annotations

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial import unittest

from ssx.address import Address, decode_address
from ssx.crypto import CipherSuite
from ssx.health import HealthCheckService
from ssx.picker import ServerPicker, Upstream
from ssx.server_entry import ServerEntry
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
