"""Which destinations the server refuses."""

from __future__ import annotations

from hypothesis import given, strategies as st
from twisted.trial import unittest

from ssx.errors import ConfigError
from ssx.forbidden import parse_forbidden


class DefaultForbiddenTests(unittest.SynchronousTestCase):
    """The default list closes every non-public range the issue names."""

    def setUp(self) -> None:
        self.forbidden = parse_forbidden(None)

    def test_refused(self):
        """Loopback, private, link-local, CGNAT, unique-local, multicast, unspecified, broadcast, all spellings."""
        for ip in ("127.0.0.1", "127.8.9.10", "10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1",
                   "169.254.169.254", "100.64.0.1", "100.127.255.254", "224.0.0.1", "239.255.255.250",
                   "0.0.0.0", "0.1.2.3", "255.255.255.255", "::1", "::", "fd00::1", "fc00::1", "fe80::1",
                   "fe80::1%eth0", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254"):
            self.assertTrue(self.forbidden.forbids(ip), ip)

    def test_allowed(self):
        """Public addresses pass, including neighbours of the closed ranges."""
        for ip in ("8.8.8.8", "1.1.1.1", "172.32.0.1", "100.128.0.1", "11.0.0.1", "192.169.0.1",
                   "2001:4860:4860::8888", "::ffff:8.8.8.8", "93.184.216.34"):
            self.assertFalse(self.forbidden.forbids(ip), ip)

    def test_not_an_ip_is_forbidden(self):
        """Anything that is not an IP literal is refused, failing closed."""
        self.assertTrue(self.forbidden.forbids("localhost"))
        self.assertTrue(self.forbidden.forbids(""))

    @given(st.ip_addresses(v=4))
    def test_mapped_same_as_ipv4(self, ip):
        """An IPv4-mapped IPv6 address gets the same answer as its IPv4 address."""
        self.assertEqual(self.forbidden.forbids(f"::ffff:{ip}"), self.forbidden.forbids(str(ip)))


class ParseTests(unittest.SynchronousTestCase):
    """The forbidden_ip setting."""

    def test_custom_list(self):
        """A custom list replaces the defaults."""
        forbidden = parse_forbidden("203.0.113.0/24, 2001:db8::/32,198.51.100.7")
        self.assertTrue(forbidden.forbids("203.0.113.9"))
        self.assertTrue(forbidden.forbids("2001:db8::1"))
        self.assertTrue(forbidden.forbids("198.51.100.7"))
        self.assertFalse(forbidden.forbids("127.0.0.1"))

    def test_empty_allows_all(self):
        """An empty setting turns the check off."""
        self.assertFalse(parse_forbidden("").forbids("127.0.0.1"))
        self.assertFalse(parse_forbidden([]).forbids("10.0.0.1"))

    def test_bad_entries(self):
        """A bad entry names the forbidden_ip key."""
        for value in ("10.0.0.0/33", "localhost", 42, ["1.2.3.4", 5]):
            with self.assertRaises(ConfigError) as caught:
                parse_forbidden(value)
            self.assertEqual(caught.exception.key, "forbidden_ip")
