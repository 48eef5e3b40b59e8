"""
Name resolution for the server end, built on twisted.names.

Order: the hosts file, then a cache, then the upstream DNS servers (the
configured ones, else those of resolv.conf, else 8.8.8.8 and 8.8.4.4).  The
server calls `TargetResolver.resolve` for every domain-name target, then filters
the resulting IPs (see `ssx.forbidden`) and connects to one of them.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, Iterable

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import cache, client, dns, hosts, resolve
from twisted.names.error import DomainError, DNSNameError

from ssx.errors import ConfigError, SSXError

__all__ = [
    "FALLBACK_NAMESERVERS",
    "NameResolutionError",
    "TargetResolver",
    "nameservers_from_resolv_conf",
    "parse_nameservers",
]

_log = Logger()

FALLBACK_NAMESERVERS: tuple[tuple[str, int], ...] = (("8.8.8.8", 53), ("8.8.4.4", 53))

# Shorter than twisted.names' default (1, 3, 11, 45): a proxied connection
# should fail within seconds, not a minute.  Each value is one attempt, on
# the next server in turn.
QUERY_TIMEOUTS: tuple[float, ...] = (1, 2, 4)


class NameResolutionError(SSXError):
    """A target name has no usable address."""


def parse_nameservers(value: str | list[str] | None) -> tuple[tuple[str, int], ...]:
    """
    Parse the `nameserver` setting: comma-separated `IP`, `IP:port` or `[IPv6]:port`.
    """
    if value is None:
        return ()
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value if v.strip()]
    else:
        raise ConfigError("nameserver", "expected a comma-separated string of IP addresses")
    servers = []
    for item in items:
        host, port = item, 53
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            if rest:
                if not rest.startswith(":"):
                    raise ConfigError("nameserver", f"{item!r} is not IP, IP:port or [IPv6]:port")
                port = _port(item, rest[1:])
        elif item.count(":") == 1:
            host, _, text = item.partition(":")
            port = _port(item, text)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError("nameserver", f"{item!r} is not an IP address") from None
        servers.append((host, port))
    return tuple(servers)


def _port(item: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError("nameserver", f"{item!r} has a bad port")
    return int(text)


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


class _CachingUpstream:
    """Queries the upstream servers and stores every answer in the cache."""

    def __init__(self, upstream: client.Resolver, store: cache.CacheResolver, timeouts: tuple[float, ...]) -> None:
        self._upstream = upstream
        self._store = store
        self._timeouts = timeouts

    def query(self, query: dns.Query, timeout: Any = None) -> Deferred:
        d = self._upstream.query(query, timeout or self._timeouts)
        d.addCallback(self._remember, query)
        return d

    def _remember(self, result: Any, query: dns.Query) -> Any:
        self._store.cacheResult(query, result)
        return result


class TargetResolver:
    """
    Resolves destination names to IP addresses.

    `resolve(name)` gives the addresses to try, IPv4 first unless
    `prefer_ipv6` is set.  IP literals are returned as they are.  A name the
    hosts file knows (in either family) never reaches DNS.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        nameservers: Iterable[tuple[str, int]] = (),
        hosts_file: str = "/etc/hosts",
        resolv_conf: str = "/etc/resolv.conf",
        prefer_ipv6: bool = False,
        query_timeouts: tuple[float, ...] = QUERY_TIMEOUTS,
    ) -> None:
        servers = tuple(nameservers) or nameservers_from_resolv_conf(resolv_conf) or FALLBACK_NAMESERVERS
        self.nameservers = servers
        self.prefer_ipv6 = prefer_ipv6
        self._hosts = hosts.Resolver(file=hosts_file.encode() if isinstance(hosts_file, str) else hosts_file)
        self._store = cache.CacheResolver(reactor=reactor)
        upstream = client.Resolver(servers=list(servers), reactor=reactor, timeout=query_timeouts)
        self._dns = resolve.ResolverChain([self._store, _CachingUpstream(upstream, self._store, query_timeouts)])
        self._pending: set[Deferred] = set()

    def close(self) -> Deferred:
        """
        Forget the cache and cancel its expiry timers (at service stop); the
        Deferred fires once queries still in flight have ended.
        """
        for call in self._store.cancel.values():
            if call.active():
                call.cancel()
        self._store.cancel.clear()
        self._store.cache.clear()
        waiting = []
        for d in list(self._pending):
            ended: Deferred = Deferred()
            d.addBoth(lambda result, ended=ended: (ended.callback(None), result)[1])
            waiting.append(ended)
        return DeferredList(waiting)

    def resolve(self, name: str) -> Deferred:
        """A Deferred firing with a non-empty list of IP strings, or failing with NameResolutionError."""
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return Deferred.fromCoroutine(self._resolve(name))
        return succeed([name])

    async def _resolve(self, name: str) -> list[str]:
        lookups = [self._lookup(self._hosts, name, dns.A), self._lookup(self._hosts, name, dns.AAAA)]
        local, _ = await self._first_found(lookups)
        if local:
            return local
        # Both families at once, so a dead or slow upstream costs one timeout
        # sequence, not two; the preferred family wins when it has addresses.
        lookups = [self._track(self._lookup(self._dns, name, dns.A)), self._track(self._lookup(self._dns, name, dns.AAAA))]
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
            except Exception as e:  # no such name, timeouts, server failures, refused queries
                error = e
                continue
            if addresses:
                for rest in lookups[i + 1 :]:
                    rest.addErrback(lambda _: None)  # its outcome no longer matters
                return addresses, None
        return [], error

    def _track(self, d: Deferred) -> Deferred:
        self._pending.add(d)
        d.addBoth(lambda result: (self._pending.discard(d), result)[1])
        return d

    @staticmethod
    def _lookup(resolver: Any, name: str, record_type: int) -> Deferred:
        return Deferred.fromCoroutine(_addresses(resolver, name, record_type))


async def _addresses(resolver: Any, name: str, record_type: int) -> list[str]:
    if record_type == dns.A:
        answers, _, _ = await resolver.lookupAddress(name)
        return [r.payload.dottedQuad() for r in answers if r.type == dns.A]
    answers, _, _ = await resolver.lookupIPV6Address(name)
    return [socket.inet_ntop(socket.AF_INET6, r.payload.address) for r in answers if r.type == dns.AAAA]


def _describe(error: Exception | None) -> str:
    if error is None:
        return "no address records"
    if isinstance(error, (DomainError, DNSNameError)):
        return "no such name"
    return type(error).__name__
