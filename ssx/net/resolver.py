"""
Name resolution for the server end, built on twisted.names.

Order: the hosts file, then a cache (bounded: at most CACHE_CAPACITY names
for at most CACHE_MAX_TTL seconds), then the upstream DNS servers (the
configured ones, else those of resolv.conf, else 8.8.8.8 and 8.8.4.4).  The
server calls `TargetResolver.resolve` for every domain-name target, then filters
the resulting IPs (see `ssx.server.forbidden`) and connects to one of them.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, Iterable, TypeVar

from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import client, dns, hosts
from twisted.names.error import DomainError, DNSNameError

from ssx.errors import SSXError
from ssx.wire.address import is_ip_literal
from ssx.net.nat import NatTable
from ssx.net.quiet_udp import QuietUdpReactor

__all__ = [
    "FALLBACK_NAMESERVERS",
    "NameResolutionError",
    "TargetResolver",
    "nameservers_from_resolv_conf",
]

_log = Logger()

_T = TypeVar("_T")

FALLBACK_NAMESERVERS: tuple[tuple[str, int], ...] = (("8.8.8.8", 53), ("8.8.4.4", 53))

# Shorter than twisted.names' default (1, 3, 11, 45): a proxied connection
# should fail within seconds, not a minute.  Each value is one attempt, on
# the next server in turn.
QUERY_TIMEOUTS: tuple[float, ...] = (1, 2, 4)


class NameResolutionError(SSXError):
    """A target name has no usable address."""


def nameservers_from_resolv_conf(path: str) -> tuple[tuple[str, int], ...]:
    """The `nameserver` lines of a resolv.conf file; () if there are none or it is unreadable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return ()
    servers = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            address = fields[1].split("%", 1)[0]
            try:
                ipaddress.ip_address(address)
            except ValueError:
                continue
            servers.append((address, 53))
    return tuple(servers)


# Answers are cached for at most this long whatever their TTL, and at most
# this many names: a client must not be able to grow the server's memory by
# asking for names whose zone it controls.
CACHE_MAX_TTL = 300.0
CACHE_CAPACITY = 4096


class TargetResolver:
    """
    Resolves destination names to IP addresses.

    `resolve(name)` gives the addresses to try, IPv4 first unless
    `prefer_ipv6` is set.  IP literals are returned as they are.  A name the
    hosts file knows (in either family) never reaches DNS.  Upstream answers
    are cached (bounded in size and time) in a `NatTable`.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        nameservers: Iterable[tuple[str, int]] = (),
        hosts_file: str = "/etc/hosts",
        resolv_conf: str = "/etc/resolv.conf",
        prefer_ipv6: bool = False,
        query_timeouts: tuple[float, ...] = QUERY_TIMEOUTS,
        cache_capacity: int = CACHE_CAPACITY,
    ) -> None:
        servers = tuple(nameservers) or nameservers_from_resolv_conf(resolv_conf) or FALLBACK_NAMESERVERS
        self.nameservers = servers
        self.prefer_ipv6 = prefer_ipv6
        self._reactor = reactor
        self._hosts = hosts.Resolver(file=hosts_file.encode() if isinstance(hosts_file, str) else hosts_file)
        # One socket per query, on a random port (see ssx.server_udp.UdpLookups),
        # but without Twisted's two log lines for each.
        self._upstream = client.Resolver(servers=list(servers), reactor=QuietUdpReactor(reactor), timeout=query_timeouts)
        self._timeouts = query_timeouts
        # (name, record type) -> (addresses, expiry time)
        self._cache: NatTable[tuple[str, int], tuple[list[str], float]] = NatTable(
            reactor.seconds, CACHE_MAX_TTL, cache_capacity
        )
        self._pending: set[Deferred] = set()

    def close(self) -> Deferred:
        """Forget the cache (at service stop); fires once queries still in flight have ended."""
        self._cache.clear()
        waiting = []
        for d in list(self._pending):
            ended: Deferred = Deferred()
            d.addBoth(_fire_then_pass, ended)
            waiting.append(ended)
        return DeferredList(waiting)

    def resolve(self, name: str) -> Deferred:
        """A Deferred firing with a non-empty list of IP strings, or failing with NameResolutionError."""
        if "%" in name:
            # A scoped IPv6 literal names an interface of this machine.
            return fail(NameResolutionError(f"refusing the scoped address {name!r}"))
        if is_ip_literal(name):
            return succeed([name])
        return Deferred.fromCoroutine(self._resolve(name))

    def known(self, name: str) -> list[str] | None:
        """
        The addresses `resolve` would give without asking DNS (an IP
        literal, the hosts file, a fresh cache entry), or None: what a
        caller that bounds its look-ups need not count.
        """
        if "%" in name:
            return None
        if is_ip_literal(name):
            return [name]
        outcome: list[Any] = []
        # The hosts file and the cache answer at once, so this has fired.
        Deferred.fromCoroutine(self._resolve(name, upstream=False)).addBoth(outcome.append)
        found = outcome[0] if outcome else None
        return found if isinstance(found, list) and found else None

    async def _resolve(self, name: str, upstream: bool = True) -> list[str]:
        lookups = [_lookup(self._hosts, name, dns.A), _lookup(self._hosts, name, dns.AAAA)]
        local, _ = await self._first_found(lookups)
        if local:
            return local
        # Both families at once, so a dead or slow upstream costs one timeout
        # sequence, not two; the preferred family wins when it has addresses.
        lookups = [self._cached(name, dns.A, upstream), self._cached(name, dns.AAAA, upstream)]
        found, error = await self._first_found(lookups)
        if found:
            return found
        raise NameResolutionError(f"cannot resolve {name!r}: {_describe(error)}")

    async def _first_found(self, lookups: list[Deferred]) -> tuple[list[str], Exception | None]:
        """The preferred family's addresses if it has any, else the other's; and the last error."""
        if self.prefer_ipv6:
            lookups.reverse()
        error: Exception | None = None
        for i, lookup in enumerate(lookups):
            try:
                addresses = await lookup
            except CancelledError:
                for other in lookups:
                    other.addErrback(lambda _: None)  # consumed here: we are giving up
                    other.cancel()
                raise
            except Exception as e:  # no such name, timeouts, server failures, refused queries
                error = e
                continue
            if addresses:
                for rest in lookups[i + 1 :]:
                    rest.addErrback(lambda _: None)  # its outcome no longer matters
                return addresses, None
        return [], error

    def _cached(self, name: str, record_type: int, upstream: bool = True) -> Deferred:
        key = (name.lower(), record_type)
        hit = self._cache.peek(key)
        if hit is not None:
            addresses, expires = hit
            if expires > self._reactor.seconds():
                return succeed(addresses)
            self._cache.remove(key)
        if not upstream:
            return succeed([])
        d = Deferred.fromCoroutine(self._query(name, record_type))
        self._pending.add(d)
        d.addBoth(self._forget_pending, d)
        return d

    def _forget_pending(self, result: _T, d: Deferred) -> _T:
        self._pending.discard(d)
        return result

    async def _query(self, name: str, record_type: int) -> list[str]:
        query = dns.Query(name, record_type, dns.IN)
        answers, _, _ = await self._upstream.query(query, self._timeouts)
        addresses = _addresses_in(answers, record_type)
        ttl = min([r.ttl for r in answers if r.type == record_type] or [0])
        if addresses and ttl > 0:
            self._cache.add((name.lower(), record_type), (addresses, self._reactor.seconds() + min(ttl, CACHE_MAX_TTL)))
        return addresses


def _fire_then_pass(result: _T, ended: Deferred) -> _T:
    ended.callback(None)
    return result


def _lookup(resolver: Any, name: str, record_type: int) -> Deferred:
    return Deferred.fromCoroutine(_lookup_addresses(resolver, name, record_type))


async def _lookup_addresses(resolver: Any, name: str, record_type: int) -> list[str]:
    if record_type == dns.A:
        answers, _, _ = await resolver.lookupAddress(name)
    else:
        answers, _, _ = await resolver.lookupIPV6Address(name)
    return _addresses_in(answers, record_type)


def _addresses_in(answers: list[dns.RRHeader], record_type: int) -> list[str]:
    records: list[object] = [r.payload for r in answers]
    if record_type == dns.A:
        return [record.dottedQuad() for record in records if isinstance(record, dns.Record_A)]
    return [
        socket.inet_ntop(socket.AF_INET6, record.address) for record in records if isinstance(record, dns.Record_AAAA)
    ]


def _describe(error: Exception | None) -> str:
    if error is None:
        return "no address records"
    if isinstance(error, (DomainError, DNSNameError)):
        return "no such name"
    return type(error).__name__
