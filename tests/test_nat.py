"""The UDP NAT table: expiry on the reactor clock, the size bound, reuse."""

from __future__ import annotations

import os
import socket

from twisted.internet.task import Clock
from twisted.trial import unittest

from ssx.net.nat import NatTable, datagram_sender, send_datagram


class NatTableTests(unittest.SynchronousTestCase):
    """NatTable driven by task.Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.evicted: list[tuple] = []
        self.table = NatTable(self.clock.seconds, timeout=60, capacity=3, on_evict=lambda k, v: self.evicted.append((k, v)))

    def test_expiry(self):
        """An entry idle for the timeout is swept; one used meanwhile survives."""
        self.table.add("a", 1)
        self.table.add("b", 2)
        self.clock.advance(30)
        self.assertEqual(self.table.get("b"), 2)
        self.clock.advance(29)
        self.assertEqual(self.table.sweep(), 0)
        self.clock.advance(1)
        self.assertEqual(self.table.sweep(), 1)
        self.assertEqual(self.evicted, [("a", 1)])
        self.assertNotIn("a", self.table)
        self.assertIn("b", self.table)
        self.clock.advance(30)
        self.table.sweep()
        self.assertEqual(len(self.table), 0)
        self.assertEqual(self.table.expired, 2)

    def test_bound(self):
        """Adding past capacity evicts the least recently used, never growing beyond the bound."""
        for i in range(3):
            self.table.add(i, str(i))
        self.table.touch(0)
        self.table.add(3, "3")
        self.assertEqual(self.evicted, [(1, "1")])
        for i in range(4, 1000):
            self.table.add(i, str(i))
            self.assertLessEqual(len(self.table), 3)
        self.assertEqual(sorted(self.table), [997, 998, 999])
        self.assertEqual(self.table.evicted, 997)

    def test_reuse(self):
        """get() returns the same entry for the same key and refreshes it; peek() does not."""
        self.table.add("client", object())
        value = self.table.get("client")
        self.assertIs(self.table.get("client"), value)
        self.clock.advance(59)
        self.assertIs(self.table.peek("client"), value)
        self.clock.advance(1)
        self.table.sweep()
        self.assertIsNone(self.table.get("client"))

    def test_touch(self):
        """touch() refreshes an entry's time and LRU place as get() does; a missing key is left missing."""
        self.table.add("a", 1)
        self.table.add("b", 2)
        self.clock.advance(59)
        self.table.touch("a")
        self.table.touch("missing")
        self.assertNotIn("missing", self.table)
        self.assertEqual(list(self.table), ["b", "a"])
        self.clock.advance(1)
        self.assertEqual(self.table.sweep(), 1)
        self.assertEqual(list(self.table), ["a"])

    def test_replace_and_remove(self):
        """Replacing an entry evicts the old value; remove() and clear() run the callback too."""
        self.table.add("k", 1)
        self.table.add("k", 2)
        self.assertEqual(self.evicted, [("k", 1)])
        self.assertEqual(self.table.remove("k"), 2)
        self.assertIsNone(self.table.remove("k"))
        self.table.add("x", 9)
        self.table.clear()
        self.assertEqual(self.evicted, [("k", 1), ("k", 2), ("x", 9)])


class SendDatagramTests(unittest.TestCase):
    """send_datagram on a real Twisted UDP port."""

    def test_sends_through_the_ports_socket(self):
        """The datagram leaves from the port's own address, whole."""
        from twisted.internet import protocol, reactor

        port = reactor.listenUDP(0, protocol.DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
            receiver.bind(("127.0.0.1", 0))
            receiver.settimeout(5)
            payload = os.urandom(1200)
            send_datagram(port, payload, receiver.getsockname())
            data, source = receiver.recvfrom(2048)
        self.assertEqual(data, payload)
        self.assertEqual(source, ("127.0.0.1", port.getHost().port))

    def test_errors_are_oserrors(self):
        """An oversized datagram raises OSError (Twisted's write raised its own MessageLengthError)."""
        from twisted.internet import protocol, reactor

        port = reactor.listenUDP(0, protocol.DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        with self.assertRaises(OSError):
            send_datagram(port, b"x" * 70000, ("127.0.0.1", 9))

    def test_ports_without_a_socket_get_write(self):
        """A port with no socket (a test fake) gets its write() called."""
        written = []

        class FakePort:
            def write(self, data, address):
                written.append((data, address))

        send_datagram(FakePort(), b"d", ("192.0.2.1", 53))
        self.assertEqual(written, [(b"d", ("192.0.2.1", 53))])

    def test_bound_sender_is_the_sockets_sendto(self):
        """datagram_sender binds the port's socket's sendto, and the datagram arrives whole from the port."""
        from twisted.internet import protocol, reactor

        port = reactor.listenUDP(0, protocol.DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        sendto = datagram_sender(port)
        self.assertEqual(sendto, port.socket.sendto)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
            receiver.bind(("127.0.0.1", 0))
            receiver.settimeout(5)
            payload = os.urandom(1200)
            sendto(payload, receiver.getsockname())
            data, source = receiver.recvfrom(2048)
        self.assertEqual(data, payload)
        self.assertEqual(source, ("127.0.0.1", port.getHost().port))

    def test_bound_sender_of_a_fake_is_its_write(self):
        """datagram_sender of a port with no socket (a test fake) is its write()."""
        written = []

        class FakePort:
            def write(self, data, address):
                written.append((data, address))

        datagram_sender(FakePort())(b"d", ("192.0.2.1", 53))
        self.assertEqual(written, [(b"d", ("192.0.2.1", 53))])
