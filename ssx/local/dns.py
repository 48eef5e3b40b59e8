"""
The local DNS server of ssx-local (`--dns-listen`): answers on UDP and TCP
and follows the routing decision.

A query's name goes to `should_proxy` (the ACL's decision; everything is
proxied without one).  A name sent direct is asked of the local resolvers
(`LocalResolver`: `twisted.names.client` to `--dns-local`, by default the
system's, from sockets carrying --outbound-fwmark); every other name is
asked of the remote resolver through a Shadowsocks server
(`ssx.local.dns_remote`), never of the local ones, so a poisoned local
resolver cannot answer for a proxied name.  Answers are
cached by route and question (`ssx.local.dns_cache`).  At most
`max_in_flight` queries wait for an upstream at once (more are answered
SERVFAIL at once), and one that has no answer within `timeout` seconds is
answered SERVFAIL.  At most `DEFAULT_MAX_TCP_CLIENTS` clients are connected
over TCP at once (`DnsTcpFactory`): a newer one is closed at once, so
a LAN client cannot spend the process's file descriptors.

Twisted's `DNSServerFactory` and `DNSDatagramProtocol` read and answer the
clients' messages; `RoutingResolver` is its resolver.  `DnsSummaryService`
logs what the server did every ten minutes; with verbose, each query is
logged too.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred, TimeoutError, fail, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.names import client, dns, server
from twisted.names.common import ResolverBase
from twisted.names.error import DNSNameError, DomainError
from twisted.protocols.policies import TimeoutFactory
from twisted.python.failure import Failure

from ssx.local.dns_cache import DEFAULT_CAPACITY, DnsCache
from ssx.net import tcp
from ssx.net.outbound import set_mark
from ssx.net.summary import CounterSummary
from ssx.wire.address import is_hostname

__all__ = [
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_MAX_TCP_CLIENTS",
    "DEFAULT_TIMEOUT",
    "DnsServerFactory",
    "DnsTcpFactory",
    "DnsSummaryService",
    "LocalResolver",
    "RoutingResolver",
    "TooManyQueries",
]

_log = Logger()

DEFAULT_MAX_IN_FLIGHT = 256
DEFAULT_TIMEOUT = 5.0
# DNS over TCP is rare (truncated answers, some stub resolvers); a few
# hundred clients at once is far more than a LAN needs.
DEFAULT_MAX_TCP_CLIENTS = 256


class TooManyQueries(Exception):
    """More queries wait for an upstream than the server allows at once."""


class _BadName(Exception):
    """A query name that is not a host name: not sent anywhere."""


class _MarkedReactor:
    """
    `reactor` for `twisted.names.client`, whose own sockets then carry the
    firewall mark `mark` (--outbound-fwmark) before they send: its UDP
    sockets marked as they are bound, its TCP connections made by
    `ssx.net.tcp.connect`, which marks the socket before it connects.
    """

    def __init__(self, reactor: Any, mark: int) -> None:
        self._reactor = reactor
        self.mark = mark

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> Any:
        listening = self._reactor.listenUDP(port, protocol, interface=interface, maxPacketSize=maxPacketSize)
        try:
            set_mark(listening.socket, self.mark)
        except OSError:
            listening.stopListening()
            raise
        return listening

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30, bindAddress: Any = None) -> Any:
        return tcp.connect(self._reactor, host, port, factory, timeout, bind_address=bindAddress, mark=self.mark)


class LocalResolver:
    """
    The direct side: `twisted.names.client.Resolver` asking `servers` in
    turn, within `timeout` seconds in all (a truncated answer is asked
    again over TCP), from sockets carrying `mark` (--outbound-fwmark) if
    given.  Cancelling a query only stops waiting for it: the client's own
    timeouts, shorter than `timeout`, end it.
    """

    def __init__(
        self, reactor: Any, servers: Sequence[tuple[str, int]], timeout: float = DEFAULT_TIMEOUT, mark: int | None = None,
    ) -> None:
        if mark is not None:
            reactor = _MarkedReactor(reactor, mark)
        self._resolver = client.Resolver(servers=list(servers), reactor=reactor)
        # Two tries per server, the second longer, together well inside the
        # server's own timeout.
        self._timeouts = (timeout * 0.2 / len(servers), timeout * 0.6 / len(servers))

    def query(self, query: dns.Query) -> Deferred:
        inner = self._resolver.queryUDP([dns.Query(query.name.name, query.type, query.cls)], timeout=self._timeouts)
        inner.addCallback(self._resolver.filterAnswers)
        outer: Deferred = Deferred()

        def passed(result: Any) -> None:
            if outer.called:  # cancelled: the answer is not wanted any more
                return
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)

        inner.addBoth(passed)
        return outer


class RoutingResolver(ResolverBase):
    """
    The server's resolver: routes each query by its name, answers from the
    cache when it can, and bounds the queries waiting for an upstream.
    `local` and `remote` have `query(query) -> Deferred` of the answer's
    sections, like `twisted.names` resolvers.
    """

    def __init__(
        self,
        reactor: Any,
        should_proxy: Callable[[str], bool],
        local: Any,
        remote: Any,
        timeout: float = DEFAULT_TIMEOUT,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        cache_capacity: int = DEFAULT_CAPACITY,
        verbose: bool = False,
    ) -> None:
        ResolverBase.__init__(self)
        self._reactor = reactor
        self.should_proxy = should_proxy
        self.local = local
        self.remote = remote
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.cache = DnsCache(reactor, cache_capacity)
        self.verbose = verbose
        self.in_flight = 0
        # What the summary counts.
        self.direct = 0
        self.proxied = 0
        self.cache_hits = 0
        self.failures = 0
        # Counted by the TCP listener (`DnsTcpFactory`).
        self.tcp_refused = 0

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred:
        # ResolverBase's lookup* methods, for callers other than the server.
        return self.query(dns.Query(name, type, cls))

    def query(self, query: dns.Query, timeout: Any = None) -> Deferred:
        """The answer's (answers, authority, additional) for `query`, or a failure (NXDOMAIN or SERVFAIL)."""
        name = query.name.name.decode("ascii", "replace").rstrip(".").lower()
        if name and not is_hostname(name):
            # Nothing a resolver could answer; not passed on to one.
            self.failures += 1
            self._log_query(name, query, "refused", "not a host name")
            return fail(_BadName(name))
        proxied = self._route(name)
        route = "proxied" if proxied else "direct"
        key = DnsCache.key(proxied, query)
        cached = self.cache.lookup(key)
        if cached is not None:
            self.cache_hits += 1
            self._log_query(name, query, route, "cached")
            return fail(cached) if isinstance(cached, Exception) else succeed(cached)
        if self.in_flight >= self.max_in_flight:
            self.failures += 1
            self._log_query(name, query, route, "too many queries in flight")
            return fail(TooManyQueries(self.max_in_flight))
        if proxied:
            self.proxied += 1
        else:
            self.direct += 1
        self.in_flight += 1
        d = maybeDeferred((self.remote if proxied else self.local).query, query)
        d.addTimeout(self.timeout, self._reactor)
        return d.addBoth(self._answered, key, name, query, route)

    def _route(self, name: str) -> bool:
        try:
            return bool(self.should_proxy(name))
        except Exception:
            # Proxied: sent direct, a name meant for the proxy would leak.
            _log.failure("DNS: the routing decision for {name} failed; proxied", name=name)
            return True

    def _answered(self, result: Any, key: Any, name: str, query: dns.Query, route: str) -> Any:
        self.in_flight -= 1
        if not isinstance(result, Failure):
            self.cache.store(key, result)
            self._log_query(name, query, route, f"{len(result[0])} answers")
            return result
        error = result.value
        if isinstance(error, DNSNameError):
            message = error.args[0] if error.args else None
            authority = message.authority if isinstance(message, dns.Message) else []
            self.cache.store_error(key, error, authority)
            self._log_query(name, query, route, "no such name")
            return result
        self.failures += 1
        if result.check(TimeoutError):
            reason = f"no answer within {self.timeout:g}s"
        elif result.check(DomainError):
            reason = type(result.value).__name__
        else:
            reason = result.getErrorMessage() or type(result.value).__name__
        self._log_query(name, query, route, f"failed: {reason}")
        return result

    def _log_query(self, name: str, query: dns.Query, route: str, outcome: str) -> None:
        if self.verbose:
            _log.debug(
                "DNS {type} {name} ({route}): {outcome}",
                type=dns.QUERY_TYPES.get(query.type, str(query.type)), name=name or ".", route=route, outcome=outcome,
            )


class DnsServerFactory(server.DNSServerFactory):
    """Twisted's DNS server (TCP factory and UDP controller) with `resolver` as its only resolver."""

    noisy = False

    def __init__(self, resolver: RoutingResolver) -> None:
        server.DNSServerFactory.__init__(self, clients=[resolver])
        # The resolver itself, not a chain around it: it keeps the
        # question's class and its failures as they are.
        self.resolver = resolver  # type: ignore[assignment]
        self.routing = resolver

    def gotResolverError(self, failure: Failure, protocol: Any, message: dns.Message, address: Any) -> None:
        """
        NXDOMAIN for a name that does not exist, SERVFAIL for any other
        failure: without Twisted's traceback in the log for each (the
        resolver counts them, and logs them with verbose).
        """
        rcode = dns.ENAME if failure.check(DomainError) else dns.ESERVER
        response = dns.Message(
            id=message.id, answer=1, opCode=message.opCode, recDes=message.recDes, recAv=1, rCode=rcode,
        )
        response.queries = message.queries
        # sendReply reports the time since the query came in.
        response.timeReceived = getattr(message, "timeReceived", time.time())
        self.sendReply(protocol, response, address)


class DnsTcpFactory(TimeoutFactory):
    """
    The DNS server's TCP side: a client idle for `timeout` seconds is
    closed, and beyond `max_clients` connected at once a new client is
    closed at once (counted in the resolver's `tcp_refused`).
    """

    noisy = False

    def __init__(self, factory: DnsServerFactory, timeout: float, max_clients: int = DEFAULT_MAX_TCP_CLIENTS) -> None:
        TimeoutFactory.__init__(self, factory, timeoutPeriod=timeout)
        self.resolver = factory.routing
        self.max_clients = max_clients

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.protocols) >= self.max_clients:
            self.resolver.tcp_refused += 1
            return None  # Twisted closes the connection
        return TimeoutFactory.buildProtocol(self, addr)


class DnsSummaryService(CounterSummary):
    """Logs every `interval` seconds (and at stop) how many queries went where, when there were any."""

    COUNTERS = (
        ("direct", "sent direct"),
        ("proxied", "sent through the proxy"),
        ("cache_hits", "answered from the cache"),
        ("failures", "failed (SERVFAIL)"),
        ("tcp_refused", "TCP clients refused (too many connected)"),
    )

    def __init__(self, reactor: Any, resolver: RoutingResolver) -> None:
        self.resolver = resolver
        CounterSummary.__init__(
            self, reactor, self.COUNTERS, lambda: [getattr(resolver, name) for name, _ in self.COUNTERS],
            "ssx-local DNS", at_stop=True,
        )
