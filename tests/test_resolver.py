"""
The server's resolver against a real twisted.names DNS server on loopback,
and the parsing of its settings.
"""

from __future__ import annotations

import os
import socket
import tempfile

from twisted.internet import defer, reactor
from twisted.names import dns, server as dns_server
from twisted.trial import unittest

from ssx.errors import ConfigError
from ssx.config.nameservers import parse_nameservers
from ssx.net.resolver import (
    FALLBACK_NAMESERVERS,
    NameResolutionError,
    TargetResolver,
    nameservers_from_resolv_conf,
)
from tests import support
from tests.support import Zone


class ResolverTests(unittest.TestCase):
    """Look-ups through hosts file, cache and a live upstream server."""

    def setUp(self) -> None:
        self.zone = Zone()
        factory = dns_server.DNSServerFactory(authorities=[self.zone])
        self.udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        self.addCleanup(self.udp.stopListening)
        fd, self.hosts = tempfile.mkstemp(suffix=".hosts")
        with os.fdopen(fd, "w") as f:
            f.write("# test hosts\n127.0.0.1 both.ssx.test\n::1 six.ssx.test\n")
        self.addCleanup(os.unlink, self.hosts)

    def resolver(self, **kw) -> TargetResolver:
        resolver = TargetResolver(reactor, [("127.0.0.1", self.udp.getHost().port)], hosts_file=self.hosts, **kw)
        self.addCleanup(resolver.close)
        return resolver

    @defer.inlineCallbacks
    def test_upstream_then_cache(self):
        """A name is asked of the upstream server once; the second look-up is answered from the cache."""
        resolver = self.resolver()
        first = yield resolver.resolve("www.ssx.test")
        asked = len(self.zone.queries)
        second = yield resolver.resolve("www.ssx.test")
        self.assertEqual(first, ["192.0.2.10"])
        self.assertEqual(second, ["192.0.2.10"])
        self.assertEqual(len(self.zone.queries), asked)
        self.assertIn((b"www.ssx.test", dns.A), self.zone.queries)

    @defer.inlineCallbacks
    def test_cache_ttl_clamped(self):
        """A record with a huge TTL is cached for at most CACHE_MAX_TTL seconds."""
        from twisted.internet.task import Clock

        from ssx.net import resolver as resolver_module
        resolver = self.resolver()
        clock = Clock()
        clock.advance(reactor.seconds())
        resolver._reactor = clock
        resolver._cache._now = clock.seconds
        yield resolver.resolve("forever.ssx.test")
        asked = len(self.zone.queries)
        clock.advance(resolver_module.CACHE_MAX_TTL - 1)
        yield resolver.resolve("forever.ssx.test")
        self.assertEqual(len(self.zone.queries), asked)
        clock.advance(2)
        yield resolver.resolve("forever.ssx.test")
        self.assertGreater(len(self.zone.queries), asked)

    @defer.inlineCallbacks
    def test_cache_bounded(self):
        """The cache never holds more names than its capacity."""
        resolver = self.resolver(cache_capacity=2)
        for name in ("www.ssx.test", "dual.ssx.test", "v6only.ssx.test", "forever.ssx.test"):
            yield resolver.resolve(name)
            self.assertLessEqual(len(resolver._cache), 2)

    @defer.inlineCallbacks
    def test_known_without_asking(self):
        """known() answers literals, hosts-file names and cached names at once, and None for the rest without a query."""
        resolver = self.resolver()
        self.assertEqual(resolver.known("198.51.100.3"), ["198.51.100.3"])
        self.assertEqual(resolver.known("both.ssx.test"), ["127.0.0.1"])
        self.assertIsNone(resolver.known("www.ssx.test"))
        self.assertIsNone(resolver.known("2001:db8::1%eth0"))
        self.assertEqual(self.zone.queries, [])
        yield resolver.resolve("www.ssx.test")
        asked = len(self.zone.queries)
        self.assertEqual(resolver.known("WWW.ssx.test"), ["192.0.2.10"])
        self.assertEqual(len(self.zone.queries), asked)

    @defer.inlineCallbacks
    def test_scoped_address_refused(self):
        """A scoped IPv6 literal (an interface of this machine) is refused, not connected to."""
        with self.assertRaises(NameResolutionError):
            yield self.resolver().resolve("2001:db8::1%eth0")

    def test_cancel_stops_lookup(self):
        """Cancelling a resolution ends it: it never fires with addresses later."""
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
        self.addCleanup(silent.close)
        resolver = TargetResolver(reactor, [silent.getsockname()], hosts_file=self.hosts, query_timeouts=(0.3,))
        d = resolver.resolve("www.ssx.test")
        d.cancel()
        failure = self.failureResultOf(d)
        self.assertTrue(failure.check(defer.CancelledError))
        # twisted.names keeps each abandoned query's id reserved for one
        # timeout (a DNSDatagramProtocol._clearFailed timer): let it run.
        def reserved() -> bool:
            return any(isinstance(getattr(c.func, "__self__", None), dns.DNSDatagramProtocol) for c in reactor.getDelayedCalls())

        return defer.Deferred.fromCoroutine(support.wait_for(lambda: not reserved(), 3, "query ids still reserved")).addCallback(
            lambda _: resolver.close()
        )

    @defer.inlineCallbacks
    def test_ipv6_only_name(self):
        """A name with only an AAAA record resolves to its IPv6 address."""
        addresses = yield self.resolver().resolve("v6only.ssx.test")
        self.assertEqual(addresses, ["2001:db8::6"])

    @defer.inlineCallbacks
    def test_family_preference(self):
        """IPv4 comes first by default; prefer_ipv6 turns that round."""
        self.assertEqual((yield self.resolver().resolve("dual.ssx.test")), ["192.0.2.20"])
        self.assertEqual((yield self.resolver(prefer_ipv6=True).resolve("dual.ssx.test")), ["2001:db8::20"])

    @defer.inlineCallbacks
    def test_hosts_file_first(self):
        """The hosts file answers before DNS, for IPv4 and IPv6 entries."""
        resolver = self.resolver()
        self.assertEqual((yield resolver.resolve("both.ssx.test")), ["127.0.0.1"])
        self.assertNotIn((b"both.ssx.test", dns.A), self.zone.queries)
        self.assertEqual((yield resolver.resolve("six.ssx.test")), ["::1"])

    @defer.inlineCallbacks
    def test_unknown_name(self):
        """A name that does not exist fails with NameResolutionError."""
        with self.assertRaises(NameResolutionError):
            yield self.resolver().resolve("nope.ssx.test")

    @defer.inlineCallbacks
    def test_ip_literal_not_looked_up(self):
        """IP literals come back as they are, with no query."""
        self.assertEqual((yield self.resolver().resolve("198.51.100.3")), ["198.51.100.3"])
        self.assertEqual((yield self.resolver().resolve("2001:db8::1")), ["2001:db8::1"])
        self.assertEqual(self.zone.queries, [])

    @defer.inlineCallbacks
    def test_silent_upstream_fails_in_time(self):
        """An upstream that never answers gives NameResolutionError after the query timeouts, not a hang."""
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
        self.addCleanup(silent.close)
        resolver = TargetResolver(reactor, [silent.getsockname()], hosts_file=self.hosts, query_timeouts=(0.2, 0.2))
        start = reactor.seconds()
        with self.assertRaises(NameResolutionError):
            yield resolver.resolve("www.ssx.test")
        self.assertLess(reactor.seconds() - start, 2.0)


class SettingsTests(unittest.SynchronousTestCase):
    """nameserver values and resolv.conf."""

    def test_parse_nameservers(self):
        """IP, IP:port and [IPv6]:port forms, comma-separated."""
        self.assertEqual(
            parse_nameservers("1.1.1.1, 9.9.9.9:5353,[2606:4700::1111]:53,2001:db8::53"),
            (("1.1.1.1", 53), ("9.9.9.9", 5353), ("2606:4700::1111", 53), ("2001:db8::53", 53)),
        )
        self.assertEqual(parse_nameservers(None), ())

    def test_bad_nameservers(self):
        """Names, bad ports and junk are refused, naming the nameserver key."""
        for value in ("dns.google", "1.1.1.1:0", "1.1.1.1:x", "[::1]x", 53):
            with self.assertRaises(ConfigError) as caught:
                parse_nameservers(value)
            self.assertEqual(caught.exception.key, "nameserver")

    def _resolv_conf(self, text: str) -> str:
        fd, path = tempfile.mkstemp()
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self.addCleanup(os.unlink, path)
        return path

    def test_resolv_conf(self):
        """nameserver lines are read, scope IDs dropped, junk skipped."""
        path = self._resolv_conf("# c\nsearch example\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\nnameserver bogus\n")
        self.assertEqual(nameservers_from_resolv_conf(path), (("192.0.2.53", 53), ("fe80::1", 53)))

    def test_fallback(self):
        """With no configured servers and none in resolv.conf, 8.8.8.8 and 8.8.4.4 are used."""
        from twisted.internet.testing import MemoryReactorClock

        empty = self._resolv_conf("search example\n")
        self.assertEqual(TargetResolver(MemoryReactorClock(), resolv_conf=empty).nameservers, FALLBACK_NAMESERVERS)
        self.assertEqual(TargetResolver(MemoryReactorClock(), resolv_conf="/nonexistent").nameservers, FALLBACK_NAMESERVERS)
        self.assertEqual(
            TargetResolver(MemoryReactorClock(), [("192.0.2.1", 53)], resolv_conf=empty).nameservers, (("192.0.2.1", 53),)
        )
