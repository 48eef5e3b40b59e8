"""
Where the server's outgoing traffic leaves from (`ssx.net.outbound`): the
outbound_address / local_address / interface keys and their options, and
the source address handed to Twisted for connections to targets.  The
addresses a target really sees are shown in tests/test_outbound_netns.py.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

import ssx.server.tap as server_tap
from ssx.config import server_config
from ssx.config.server import LOOPBACK_LOCAL_ADDRESS
from ssx.errors import ConfigError
from ssx.net.outbound import Outbound, device_problem
from ssx.net.relay import connect_tcp

SERVER = {"password": "pw", "method": "aes-256-gcm", "server_port": 0}


def outbound(**values: Any) -> Outbound | None:
    return server_config({**SERVER, **values}).outbound


class OutboundConfigTests(unittest.SynchronousTestCase):
    """outbound_address, libev's local_address and interface become the config's `outbound`."""

    def test_none(self):
        """Without the keys there is nothing to apply (the connect path stays as it was)."""
        self.assertIsNone(outbound())

    def test_one_address(self):
        """One address applies to its own family only."""
        self.assertEqual(outbound(outbound_address="192.0.2.7"), Outbound(ipv4="192.0.2.7"))
        self.assertEqual(outbound(outbound_address="2001:db8::7"), Outbound(ipv6="2001:db8::7"))

    def test_both_families(self):
        """A list (or a comma-separated string, as the option gives) of one IPv4 and one IPv6 address."""
        both = Outbound(ipv4="192.0.2.7", ipv6="2001:db8::7")
        self.assertEqual(outbound(outbound_address=["192.0.2.7", "2001:db8::7"]), both)
        self.assertEqual(outbound(outbound_address="2001:db8::7,192.0.2.7"), both)
        self.assertEqual(both.bind_address("198.51.100.1"), ("192.0.2.7", 0))
        self.assertEqual(both.bind_address("2001:db8::1"), ("2001:db8::7", 0))
        self.assertIsNone(Outbound(ipv4="192.0.2.7").bind_address("2001:db8::1"))

    def test_libev_local_address(self):
        """libev's server-side local_address is the source address, unless outbound_address is given."""
        self.assertEqual(outbound(local_address="192.0.2.7"), Outbound(ipv4="192.0.2.7"))
        self.assertEqual(outbound(local_address="192.0.2.7", outbound_address="192.0.2.8"), Outbound(ipv4="192.0.2.8"))

    def test_loopback_local_address(self):
        """The original's shared config.json's local_address 127.0.0.1 is ignored, with one warning saying why."""
        config = server_config({**SERVER, "local_address": "127.0.0.1"})
        self.assertIsNone(config.outbound)
        self.assertIn(LOOPBACK_LOCAL_ADDRESS.format(address="127.0.0.1"), config.warnings)
        self.assertNotIn("local_address", config.ignored)
        # Given as outbound_address, a loopback address is meant.
        self.assertEqual(outbound(outbound_address="127.0.0.2"), Outbound(ipv4="127.0.0.2"))

    def test_interface(self):
        """interface alone, or with an address."""
        self.assertEqual(outbound(interface="eth0"), Outbound(device="eth0"))
        self.assertEqual(outbound(interface="eth0", outbound_address="192.0.2.7"), Outbound("192.0.2.7", None, "eth0"))

    def test_bad_values(self):
        """A bad value stops start-up naming its key."""
        cases = [
            ("outbound_address", "not-an-ip"),
            ("outbound_address", ["192.0.2.7", "192.0.2.8"]),
            ("outbound_address", "2001:db8::1,2001:db8::2"),
            ("outbound_address", 7),
            ("outbound_address", [7]),
            ("local_address", "example.com"),
            ("interface", ""),
            ("interface", "a-name-far-too-long"),
            ("interface", 3),
            ("interface", "\udcff"),  # not encodable: a name from undecodable argv bytes
        ]
        for key, value in cases:
            with self.assertRaises(ConfigError) as caught:
                server_config({**SERVER, key: value})
            self.assertEqual(caught.exception.key, key, (key, value))

    def test_options(self):
        """--outbound-address and --interface set the keys."""
        options = server_tap.Options()
        options.parseOptions(["-k", "pw", "--outbound-address", "192.0.2.7,2001:db8::7", "--interface", "lo"])
        self.assertEqual(options.config.outbound, Outbound("192.0.2.7", "2001:db8::7", "lo"))

    def test_missing_interface(self):
        """An interface the host lacks stops start-up with one line naming the key."""
        options = server_tap.Options()
        with self.assertRaises(SystemExit) as caught:
            options.parseOptions(["-k", "pw", "--interface", "ssxmissing0"])
        message = str(caught.exception.code)
        self.assertEqual(len(message.splitlines()), 1)
        self.assertIn("interface", message)
        self.assertIn("ssxmissing0", message)

    def test_device_problem(self):
        """SO_BINDTODEVICE on lo is allowed as root; a missing interface is named."""
        self.assertIn("ssxmissing0", device_problem("ssxmissing0") or "")
        if os.geteuid() == 0:
            self.assertIsNone(device_problem("lo"))


class ConnectTests(unittest.SynchronousTestCase):
    """connect_tcp hands the source address to the reactor's connectTCP."""

    def test_bind_address(self):
        """With a source address it is the connection's bindAddress; without, there is none."""
        reactor = MemoryReactorClock()
        connect_tcp(reactor, "192.0.2.1", 80, Protocol(), 10)
        connect_tcp(reactor, "192.0.2.1", 80, Protocol(), 10, bind_address=("192.0.2.7", 0))
        self.assertEqual([call[4] for call in reactor.tcpClients], [None, ("192.0.2.7", 0)])
