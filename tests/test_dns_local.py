"""
The logic of ssx-local's DNS server on a `task.Clock`: routing, the cache
(TTLs, negative answers, LRU bound, routes kept apart), the bound on
queries in flight and the timeout (both SERVFAIL), the answers the server
sends (through Twisted's datagram protocol on an in-memory transport), the
proxied side's checks of the server's answers, and the configuration.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings, strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.names.error import DNSNameError, DNSServerError
from twisted.trial import unittest

from ssx.config import local_config
from ssx.config.local import DEFAULT_DNS_REMOTE
from ssx.crypto import make_suite
from ssx.errors import ConfigError
from ssx.local import tap as local_tap
from ssx.local.dns import DnsServerFactory, DnsSummaryService, DnsTcpFactory, RoutingResolver
from ssx.local.dns_cache import NEGATIVE_TTL_CAP, DnsCache
from ssx.local.dns_remote import _QuerySocket, message_for
from ssx.wire.address import Address, encode_address, is_hostname
from tests import support

LOCAL_ADDRESS = "192.0.2.1"
REMOTE_ADDRESS = "198.51.100.2"


def _answer(name: bytes, address: str, ttl: int) -> tuple[list, list, list]:
    return ([dns.RRHeader(name, dns.A, dns.IN, ttl, dns.Record_A(address, ttl=ttl))], [], [])


def _soa(minimum: int, ttl: int = 3600) -> dns.RRHeader:
    record = dns.Record_SOA(mname=b"ns.test", rname=b"root.test", minimum=minimum, ttl=ttl)
    return dns.RRHeader(b"test", dns.SOA, dns.IN, ttl, record)


class FakeUpstream:
    """An upstream resolver that records the names asked; it answers at once, or holds queries when `hold` is set."""

    def __init__(self, address: str, ttl: int = 60) -> None:
        self.address = address
        self.ttl = ttl
        self.asked: list[str] = []
        self.hold = False
        self.pending: list[Deferred] = []
        self.cancelled = 0
        # Set: the sections to answer with instead.
        self.result: Any = None

    def query(self, query: dns.Query) -> Deferred:
        self.asked.append(query.name.name.decode())
        if self.hold:
            def cancel(d: Deferred) -> None:
                self.cancelled += 1

            d: Deferred = Deferred(cancel)
            self.pending.append(d)
            return d
        return succeed(self.result if self.result is not None else _answer(query.name.name, self.address, self.ttl))


class _Failing(FakeUpstream):
    """An upstream that fails every query with `error`."""

    def __init__(self, error: Exception) -> None:
        super().__init__("0.0.0.0")
        self.error = error

    def query(self, query: dns.Query) -> Deferred:
        self.asked.append(query.name.name.decode())
        d: Deferred = Deferred()
        d.errback(self.error)
        return d


class DatagramRecorder:
    """The transport of a server's DNSDatagramProtocol: keeps what it writes."""

    def __init__(self) -> None:
        self.written: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, addr: Any = None) -> None:
        self.written.append((data, addr))


def _resolver(
    clock: Clock, proxied: set[str] | None = None, local: Any = None, remote: Any = None, **kwargs: Any,
) -> RoutingResolver:
    """A resolver on `clock` that proxies the names in `proxied` (every name if None)."""
    return RoutingResolver(
        clock,
        (lambda name: True) if proxied is None else (lambda name: name in proxied),
        local if local is not None else FakeUpstream(LOCAL_ADDRESS),
        remote if remote is not None else FakeUpstream(REMOTE_ADDRESS),
        **kwargs,
    )


def _ask(resolver: RoutingResolver, name: str, record_type: int = dns.A) -> Deferred:
    return resolver.query(dns.Query(name, record_type, dns.IN))


def _address(result: Any) -> str:
    return result[0][0].payload.dottedQuad()


class RoutingTests(unittest.SynchronousTestCase):
    """Which upstream each name goes to."""

    def test_proxied_name_asks_remote_only(self) -> None:
        """A proxied name is asked of the remote resolver, never of the local one."""
        resolver = _resolver(Clock(), proxied={"blocked.test"})
        self.assertEqual(_address(self.successResultOf(_ask(resolver, "blocked.test"))), REMOTE_ADDRESS)
        self.assertEqual((resolver.local.asked, resolver.remote.asked), ([], ["blocked.test"]))
        self.assertEqual((resolver.proxied, resolver.direct), (1, 0))

    def test_direct_name_asks_local_only(self) -> None:
        """A name sent direct is asked of the local resolver only."""
        resolver = _resolver(Clock(), proxied=set())
        self.assertEqual(_address(self.successResultOf(_ask(resolver, "www.home.test"))), LOCAL_ADDRESS)
        self.assertEqual((resolver.local.asked, resolver.remote.asked), (["www.home.test"], []))

    def test_decision_sees_plain_lower_case_name(self) -> None:
        """The routing decision gets the name in lower case without its trailing dot."""
        seen: list[str] = []
        resolver = RoutingResolver(Clock(), lambda name: seen.append(name) or True, FakeUpstream(LOCAL_ADDRESS),
                                   FakeUpstream(REMOTE_ADDRESS))
        self.successResultOf(_ask(resolver, "WWW.Example.TEST."))
        self.assertEqual(seen, ["www.example.test"])

    def test_failing_decision_proxies(self) -> None:
        """A routing decision that raises sends the name through the proxy (never direct) and logs the failure."""
        def broken(name: str) -> bool:
            raise RuntimeError("broken ACL")

        resolver = RoutingResolver(Clock(), broken, FakeUpstream(LOCAL_ADDRESS), FakeUpstream(REMOTE_ADDRESS))
        self.successResultOf(_ask(resolver, "a.test"))
        self.assertEqual((resolver.local.asked, resolver.remote.asked), ([], ["a.test"]))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_bad_name_not_sent(self) -> None:
        """A query name that is not a host name (a control byte) fails and reaches no upstream."""
        resolver = _resolver(Clock())
        self.failureResultOf(resolver.query(dns.Query(b"bad\x01name.test", dns.A, dns.IN)))
        self.assertEqual((resolver.local.asked, resolver.remote.asked, resolver.failures), ([], [], 1))


class CacheTests(unittest.SynchronousTestCase):
    """Answers kept for their TTL, by route."""

    def test_second_query_within_ttl_from_cache(self) -> None:
        """A second query within the TTL is not sent upstream, and its TTL is lowered by the time kept."""
        clock = Clock()
        resolver = _resolver(clock)
        self.successResultOf(_ask(resolver, "a.test"))
        clock.advance(59)
        result = self.successResultOf(_ask(resolver, "a.test"))
        self.assertEqual(resolver.remote.asked, ["a.test"])
        self.assertEqual(result[0][0].ttl, 1)
        self.assertEqual(resolver.cache_hits, 1)

    def test_query_after_ttl_sent_again(self) -> None:
        """Once the TTL has run out the query goes upstream again."""
        clock = Clock()
        resolver = _resolver(clock)
        self.successResultOf(_ask(resolver, "a.test"))
        clock.advance(60)
        self.successResultOf(_ask(resolver, "a.test"))
        self.assertEqual(resolver.remote.asked, ["a.test", "a.test"])

    def test_smallest_answer_ttl_counts(self) -> None:
        """The TTL of an answer is the smallest of its records'."""
        clock = Clock()
        remote = FakeUpstream(REMOTE_ADDRESS)
        remote.result = (_answer(b"a.test", "192.0.2.7", 300)[0] + _answer(b"a.test", "192.0.2.8", 10)[0], [], [])
        resolver = _resolver(clock, remote=remote)
        self.successResultOf(_ask(resolver, "a.test"))
        clock.advance(9)
        self.successResultOf(_ask(resolver, "a.test"))
        clock.advance(1)
        self.successResultOf(_ask(resolver, "a.test"))
        self.assertEqual(remote.asked, ["a.test", "a.test"])

    def test_zero_ttl_not_cached(self) -> None:
        """An answer with TTL 0 is not kept."""
        resolver = _resolver(Clock(), remote=FakeUpstream(REMOTE_ADDRESS, ttl=0))
        self.successResultOf(_ask(resolver, "a.test"))
        self.successResultOf(_ask(resolver, "a.test"))
        self.assertEqual(resolver.remote.asked, ["a.test", "a.test"])

    def test_proxied_entry_not_served_direct(self) -> None:
        """The cache cannot mix routes: when a name's route changes, the other route's entry is not used, both ways."""
        clock = Clock()
        proxied = {"a.test"}
        resolver = _resolver(clock, proxied=proxied)
        self.assertEqual(_address(self.successResultOf(_ask(resolver, "a.test"))), REMOTE_ADDRESS)
        proxied.clear()
        self.assertEqual(_address(self.successResultOf(_ask(resolver, "a.test"))), LOCAL_ADDRESS)
        proxied.add("a.test")
        self.assertEqual(_address(self.successResultOf(_ask(resolver, "a.test"))), REMOTE_ADDRESS)
        self.assertEqual((resolver.local.asked, resolver.remote.asked), (["a.test"], ["a.test"]))

    def test_types_cached_apart(self) -> None:
        """A and AAAA questions for one name are separate entries."""
        resolver = _resolver(Clock())
        self.successResultOf(_ask(resolver, "a.test", dns.A))
        self.successResultOf(_ask(resolver, "a.test", dns.AAAA))
        self.assertEqual(len(resolver.remote.asked), 2)

    def test_nxdomain_cached_by_soa_minimum(self) -> None:
        """NXDOMAIN is kept for the SOA minimum of its authority section, then asked again."""
        clock = Clock()
        message = dns.Message(rCode=dns.ENAME)
        message.authority = [_soa(minimum=30)]
        remote = _Failing(DNSNameError(message))
        resolver = _resolver(clock, remote=remote)
        self.failureResultOf(_ask(resolver, "gone.test"), DNSNameError)
        clock.advance(29)
        self.failureResultOf(_ask(resolver, "gone.test"), DNSNameError)
        self.assertEqual(remote.asked, ["gone.test"])
        clock.advance(1)
        self.failureResultOf(_ask(resolver, "gone.test"), DNSNameError)
        self.assertEqual(remote.asked, ["gone.test", "gone.test"])
        self.assertEqual(resolver.failures, 0)

    def test_negative_ttl_capped(self) -> None:
        """A negative answer is kept at most NEGATIVE_TTL_CAP seconds whatever its SOA says."""
        clock = Clock()
        remote = FakeUpstream(REMOTE_ADDRESS)
        remote.result = ([], [_soa(minimum=86400, ttl=86400)], [])
        resolver = _resolver(clock, remote=remote)
        self.successResultOf(_ask(resolver, "empty.test"))
        clock.advance(NEGATIVE_TTL_CAP - 1)
        self.successResultOf(_ask(resolver, "empty.test"))
        self.assertEqual(len(remote.asked), 1)
        clock.advance(1)
        self.successResultOf(_ask(resolver, "empty.test"))
        self.assertEqual(len(remote.asked), 2)

    def test_negative_without_soa_not_cached(self) -> None:
        """A negative answer without an SOA is not kept."""
        remote = _Failing(DNSNameError(dns.Message(rCode=dns.ENAME)))
        resolver = _resolver(Clock(), remote=remote)
        self.failureResultOf(_ask(resolver, "gone.test"), DNSNameError)
        self.failureResultOf(_ask(resolver, "gone.test"), DNSNameError)
        self.assertEqual(len(remote.asked), 2)

    def test_failure_not_cached(self) -> None:
        """A failure (SERVFAIL from upstream) is not kept, and counted."""
        remote = _Failing(DNSServerError(dns.Message(rCode=dns.ESERVER)))
        resolver = _resolver(Clock(), remote=remote)
        self.failureResultOf(_ask(resolver, "a.test"), DNSServerError)
        self.failureResultOf(_ask(resolver, "a.test"), DNSServerError)
        self.assertEqual((len(remote.asked), resolver.failures), (2, 2))

    def test_least_recently_used_evicted(self) -> None:
        """Beyond its capacity the cache forgets the least recently used answer."""
        resolver = _resolver(Clock(), cache_capacity=2)
        for name in ("a.test", "b.test", "a.test", "c.test", "a.test", "b.test"):
            self.successResultOf(_ask(resolver, name))
        # b was evicted by c (a was used more recently); a stayed.
        self.assertEqual(resolver.remote.asked, ["a.test", "b.test", "c.test", "b.test"])
        self.assertEqual(len(resolver.cache), 2)

    def test_key_ignores_name_case(self) -> None:
        """Names differing only in case share an entry."""
        self.assertEqual(
            DnsCache.key(True, dns.Query("A.Test", dns.A, dns.IN)), DnsCache.key(True, dns.Query("a.test", dns.A, dns.IN))
        )


class ServerBoundsTests(unittest.SynchronousTestCase):
    """What the server answers at its bounds, through Twisted's datagram protocol."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.remote = FakeUpstream(REMOTE_ADDRESS)
        self.remote.hold = True
        self.resolver = _resolver(self.clock, remote=self.remote, max_in_flight=2, timeout=5.0)
        self.factory = DnsServerFactory(self.resolver)
        self.protocol = dns.DNSDatagramProtocol(self.factory)
        self.transport = DatagramRecorder()
        self.protocol.makeConnection(self.transport)
        self.next_id = 1

    def send(self, name: str) -> int:
        message = message_for(dns.Query(name, dns.A, dns.IN), self.next_id)
        self.next_id += 1
        self.protocol.datagramReceived(message.toStr(), ("127.0.0.1", 5353))
        return message.id

    def replies(self) -> dict[int, dns.Message]:
        out = {}
        for data, _ in self.transport.written:
            message = dns.Message()
            message.fromStr(data)
            out[message.id] = message
        return out

    def test_in_flight_limit_servfail(self) -> None:
        """Beyond max_in_flight waiting queries a new one is answered SERVFAIL at once, without going upstream; room comes back when one is answered."""
        first, second = self.send("a.test"), self.send("b.test")
        third = self.send("c.test")
        self.assertEqual(list(self.replies()), [third])
        self.assertEqual(self.replies()[third].rCode, dns.ESERVER)
        self.assertEqual(self.remote.asked, ["a.test", "b.test"])
        self.remote.pending[0].callback(_answer(b"a.test", REMOTE_ADDRESS, 60))
        self.assertEqual(self.replies()[first].rCode, dns.OK)
        fourth = self.send("d.test")
        self.assertNotIn(fourth, self.replies())
        self.assertEqual(self.remote.asked, ["a.test", "b.test", "d.test"])
        self.assertEqual(self.resolver.in_flight, 2)
        self.assertNotIn(second, self.replies())

    def test_timeout_servfail(self) -> None:
        """A query with no upstream answer within the timeout is answered SERVFAIL, its upstream query cancelled."""
        query_id = self.send("slow.test")
        self.clock.advance(4.9)
        self.assertEqual(self.replies(), {})
        self.clock.advance(0.1)
        self.assertEqual(self.replies()[query_id].rCode, dns.ESERVER)
        self.assertEqual(self.remote.cancelled, 1)
        self.assertEqual((self.resolver.in_flight, self.resolver.failures), (0, 1))

    def test_answer_carries_records(self) -> None:
        """An upstream answer reaches the client with its records and the client's ID."""
        query_id = self.send("a.test")
        self.remote.pending[0].callback(_answer(b"a.test", REMOTE_ADDRESS, 60))
        reply = self.replies()[query_id]
        self.assertEqual((reply.rCode, reply.answers[0].payload.dottedQuad()), (dns.OK, REMOTE_ADDRESS))

    @given(st.binary(max_size=600))
    @settings(max_examples=300, deadline=None, database=None)
    def test_garbage_datagrams_quiet(self, data: bytes) -> None:
        """Any datagram from a client is answered or dropped without an error logged, and only host names go upstream."""
        self.transport.written.clear()
        self.remote.asked.clear()
        self.protocol.datagramReceived(data, ("127.0.0.1", 5353))
        self.assertEqual(self.flushLoggedErrors(), [])
        for name in self.remote.asked:
            self.assertTrue(name == "" or is_hostname(name.rstrip(".")), name)
        for pending in self.remote.pending:
            if not pending.called:
                pending.cancel()
        self.remote.pending.clear()

    def test_nxdomain_reply(self) -> None:
        """An upstream NXDOMAIN reaches the client as NXDOMAIN, with no traceback logged."""
        query_id = self.send("gone.test")
        self.remote.pending[0].errback(DNSNameError(dns.Message(rCode=dns.ENAME)))
        self.assertEqual(self.replies()[query_id].rCode, dns.ENAME)
        self.assertEqual(self.flushLoggedErrors(), [])


class LoggingTests(unittest.SynchronousTestCase):
    """Per-query lines only with verbose; counts in the summary."""

    def test_query_lines_only_verbose(self) -> None:
        """Without verbose no line per query; with it, one naming the name and its route."""
        events = support.log_events(self)
        self.successResultOf(_ask(_resolver(Clock()), "quiet.test"))
        self.assertEqual([t for t in support.event_texts(events) if "quiet.test" in t], [])
        self.successResultOf(_ask(_resolver(Clock(), verbose=True), "loud.test"))
        lines = [t for t in support.event_texts(events) if "loud.test" in t]
        self.assertEqual(lines, ["DNS A loud.test (proxied): 1 answers"])

    def test_summary_counts(self) -> None:
        """The summary reports queries sent direct and proxied, cache hits, failures and refused TCP clients since the last one."""
        clock = Clock()
        resolver = _resolver(clock, proxied={"p.test"})
        summary = DnsSummaryService(clock, resolver)
        summary.startService()
        events = support.log_events(self)
        for name in ("p.test", "p.test", "d.test", "bad\x01.test"):
            _ask(resolver, name).addErrback(lambda f: None)
        full = DnsTcpFactory(DnsServerFactory(resolver), 30, max_clients=0)
        self.assertIsNone(full.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5353)))
        clock.advance(summary.interval)
        counts = [e["counts"] for e in events if "counts" in e]
        self.assertEqual(counts, [{"direct": 1, "proxied": 1, "cache_hits": 1, "failures": 1, "tcp_refused": 1}])
        summary.stopService()
        self.assertEqual(len([e for e in events if "counts" in e]), 1)  # nothing new: no second line


class QuerySocketTests(unittest.SynchronousTestCase):
    """The proxied UDP side accepts only the answer to its own query."""

    def _socket(self) -> tuple[_QuerySocket, Deferred, Any]:
        suite = make_suite("none", "")
        done: Deferred = Deferred()
        sock = _QuerySocket(suite.udp_client_codec(), 1234, dns.Query("a.test", dns.A, dns.IN), done)
        return sock, done, suite

    def _reply(self, suite: Any, message_id: int, name: str) -> bytes:
        reply = dns.Message(id=message_id, answer=1)
        reply.queries = [dns.Query(name, dns.A, dns.IN)]
        return suite.udp_client_codec().seal(encode_address(Address("127.0.0.1", 53)) + reply.toStr())

    def test_other_id_or_question_dropped(self) -> None:
        """An answer with another ID or question, or garbage, is dropped; the right one completes the query."""
        sock, done, suite = self._socket()
        sock.datagramReceived(self._reply(suite, 999, "a.test"), None)
        sock.datagramReceived(self._reply(suite, 1234, "b.test"), None)
        sock.datagramReceived(b"\x01garbage", None)
        self.assertNoResult(done)
        self.assertEqual(sock.dropped, 3)
        sock.datagramReceived(self._reply(suite, 1234, "a.test"), None)
        self.assertEqual(self.successResultOf(done).id, 1234)


class ConfigTests(unittest.SynchronousTestCase):
    """The dns_* keys."""

    BASE = {"server": "192.0.2.9", "password": "secret", "method": "aes-256-gcm"}

    def config(self, **values: Any) -> Any:
        return local_config({**self.BASE, **values})

    def test_absent(self) -> None:
        """Without dns_listen there is no DNS server."""
        self.assertIsNone(self.config().dns)

    def test_defaults(self) -> None:
        """dns_listen alone: the system's local resolvers (empty here), remote 8.8.8.8:53."""
        dns_server = self.config(dns_listen="127.0.0.1:5353").dns
        self.assertEqual((dns_server.listen, dns_server.local, dns_server.remote), (("127.0.0.1", 5353), (), DEFAULT_DNS_REMOTE))
        self.assertEqual(DEFAULT_DNS_REMOTE, ("8.8.8.8", 53))

    def test_values(self) -> None:
        """IPv6 listen, several local resolvers, a remote with a port."""
        dns_server = self.config(dns_listen="[::1]:53", dns_local="192.0.2.53, 192.0.2.54:5353",
                                 dns_remote="[2001:db8::53]:853").dns
        self.assertEqual(dns_server.listen, ("::1", 53))
        self.assertEqual(dns_server.local, (("192.0.2.53", 53), ("192.0.2.54", 5353)))
        self.assertEqual(dns_server.remote, ("2001:db8::53", 853))

    def test_errors_name_the_key(self) -> None:
        """Bad values stop start-up with a ConfigError naming the key."""
        cases = [
            ({"dns_listen": "localhost:53"}, "dns_listen"),
            ({"dns_listen": "127.0.0.1"}, "dns_listen"),
            ({"dns_listen": "127.0.0.1:70000"}, "dns_listen"),
            ({"dns_listen": 53}, "dns_listen"),
            ({"dns_listen": "127.0.0.1:53", "dns_local": "resolver.test"}, "dns_local"),
            ({"dns_listen": "127.0.0.1:53", "dns_local": ""}, "dns_local"),
            ({"dns_listen": "127.0.0.1:53", "dns_remote": "8.8.8.8,8.8.4.4"}, "dns_remote"),
            ({"dns_listen": "127.0.0.1:53", "dns_remote": "dns.google"}, "dns_remote"),
            ({"dns_remote": "8.8.8.8"}, "dns_remote"),
            ({"dns_local": "192.0.2.53"}, "dns_local"),
        ]
        for values, key in cases:
            error = self.assertRaises(ConfigError, self.config, **values)
            self.assertEqual(error.key, key, values)

    def test_loop_refused_at_start(self) -> None:
        """ssx-local refuses, in one line naming dns_local, a local resolver that is the DNS server's own address."""
        options = local_tap.Options()
        argv = ["-s", "192.0.2.9", "-k", "secret", "-m", "aes-256-gcm",
                "--dns-listen", "127.0.0.1:5353", "--dns-local", "192.0.2.53,127.0.0.1:5353"]
        with self.assertRaises(SystemExit) as caught:
            options.parseOptions(argv)
        message = str(caught.exception.code)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith("ssx-local: bad configuration: dns_local:"), message)

    def test_flags_reach_config(self) -> None:
        """--dns-listen, --dns-local and --dns-remote set the DNS server's settings."""
        options = local_tap.Options()
        options.parseOptions(["-s", "192.0.2.9", "-k", "secret", "-m", "aes-256-gcm", "--dns-listen", "127.0.0.1:5353",
                              "--dns-local", "192.0.2.53", "--dns-remote", "192.0.2.153:5353"])
        dns_server = options.config.dns
        self.assertEqual(
            (dns_server.listen, dns_server.local, dns_server.remote),
            (("127.0.0.1", 5353), (("192.0.2.53", 53),), ("192.0.2.153", 5353)),
        )
