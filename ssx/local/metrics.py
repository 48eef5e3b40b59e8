"""
The local end's Prometheus metrics (``--metrics``): one
`CollectorRegistry` per local end, served by `ssx.net.metrics`.

Read at scrape time (`LocalCollector`): each server's state in the picker
(`ssx.local.picker`: up or down, average latency, consecutive failures),
the factories' counters (`ssx.local.relay`: failovers, connections by
the protocol the application spoke, broken relays) and each server's
payload bytes, counted per relay read through the factories'
`server_traffic` while metrics are on (UDP: per datagram, through the UDP
relays' `server_traffic`, the Shadowsocks plaintext: target address and
payload).  With an ACL, its decisions: the factories' and UDP relays'
`acl_proxied` and `acl_direct` (`ssx.local.routing`); with
--dns-listen, the DNS server's counters (`ssx.local.dns.RoutingResolver`);
transparent ports (`ssx.local.redir`) count as fronts of their own.
Observed as they happen: each health check's latency (`ssx.local.health`),
a histogram.  A port a reload adds is counted from its start; one it stops
leaves its counts in the totals (`RetiredCounts`), so counters never go
down.

Labels are bounded by what the operator configures (or the online
config lists): `server` (its label: the name given, else host:port),
`front` (socks5, socks4, http, tunnel, redir, tproxy), `proto`, `dir`,
`route`.  No
application address and no destination is ever a label.  Directions:
``c>p``, from the application to ssx-local (and on to the server),
``p>c`` back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ssx.interfaces import IUpstream
from ssx.local.dns import RoutingResolver
from ssx.local.redir import REDIRECT, RedirFactory
from ssx.local.relay import LocalFactory
from ssx.local.tunnel import TunnelFactory
from ssx.local.udp import LocalUdpRelay
from ssx.traffic import TrafficCounter

if TYPE_CHECKING:
    from ssx.local.tap import LocalService

__all__ = ["LocalCollector", "LocalMetrics", "ServerTraffic"]

# Seconds to the first byte of the check target's answer, through a server.
CHECK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# One server's payload bytes: `up` (from applications) and `down`.
ServerTraffic = TrafficCounter


class LocalMetrics:
    """A local end's registry, its health-check histogram, and the collector of its counters."""

    def __init__(self, top: "LocalService") -> None:
        self.registry = CollectorRegistry()
        # By protocol and server label: kept when an online config drops a server and brings it back.
        self.traffic: dict[str, ServerTraffic] = {}
        self.udp_traffic: dict[str, ServerTraffic] = {}
        self.check_seconds = Histogram(
            "ssx_local_health_check_seconds", "Health checks through each server: time to the target's first byte",
            ["server"], registry=self.registry, buckets=CHECK_BUCKETS,
        )
        # The counts of the factories a reload stopped (their ports went):
        # kept, so that no counter goes down.
        self.retired = RetiredCounts()
        self.registry.register(LocalCollector(top, {"tcp": self.traffic, "udp": self.udp_traffic}, self.retired))

    def server_traffic(self, upstream: IUpstream) -> ServerTraffic:
        """`upstream`'s counter of TCP payload bytes."""
        counter = self.traffic.get(upstream.label)
        if counter is None:
            counter = self.traffic[upstream.label] = ServerTraffic()
        return counter

    def udp_server_traffic(self, upstream: IUpstream) -> ServerTraffic:
        """`upstream`'s counter of UDP plaintext bytes (each datagram's target address and payload)."""
        counter = self.udp_traffic.get(upstream.label)
        if counter is None:
            counter = self.udp_traffic[upstream.label] = ServerTraffic()
        return counter

    def instrument(self, factory: LocalFactory) -> None:
        """Have `factory`'s relays count their servers' bytes, and its connections by protocol."""
        factory.server_traffic = self.server_traffic
        if not isinstance(factory, (TunnelFactory, RedirFactory)):
            factory.fronts = {}

    def retire(self, factory: LocalFactory) -> None:
        """Keep the counts of `factory`, whose port a reload stopped, in the totals."""
        self.retired.add(factory)

    def observe_check(self, server: str, latency: float | None) -> None:
        if latency is not None:
            self.check_seconds.labels(server=server).observe(latency)


class RetiredCounts:
    """The counters of factories no longer serving a port, summed."""

    def __init__(self) -> None:
        self.failovers: dict[str, int] = {}
        self.fronts: dict[str, int] = {}
        self.unknown: dict[str, int] = {}
        self.broken = 0

    def add(self, factory: LocalFactory) -> None:
        for label, count in factory.failovers.items():
            self.failovers[label] = self.failovers.get(label, 0) + count
        for front, count in _fronts(factory).items():
            self.fronts[front] = self.fronts.get(front, 0) + count
        for front, count in _unknown(factory).items():
            self.unknown[front] = self.unknown.get(front, 0) + count
        self.broken += factory.relays_broken


def _fronts(factory: LocalFactory) -> dict[str, int]:
    """`factory`'s connections by the protocol the application spoke (a transparent port's: its mode)."""
    if isinstance(factory, TunnelFactory):
        return {"tunnel": factory.accepted}
    if isinstance(factory, RedirFactory):
        return {_redir_front(factory): factory.accepted}
    return dict(factory.fronts) if factory.fronts is not None else {}


def _unknown(factory: LocalFactory) -> dict[str, int]:
    """A transparent port's connections whose original destination was not found, by front."""
    if isinstance(factory, RedirFactory):
        return {_redir_front(factory): factory.unknown_destinations}
    return {}


def _redir_front(factory: RedirFactory) -> str:
    return "redir" if factory.mode == REDIRECT else "tproxy"


class LocalCollector(Collector):
    """Reads the picker and the factories at scrape time (in the web thread: it copies what it iterates)."""

    def __init__(
        self, top: "LocalService", traffic: dict[str, dict[str, ServerTraffic]], retired: RetiredCounts | None = None,
    ) -> None:
        self._top = top
        self._traffic = traffic
        self._retired = retired if retired is not None else RetiredCounts()

    def collect(self) -> Iterator[Metric]:
        picker = self._top.picker
        upstreams = list(picker.upstreams())
        factories = list(self._top.factories)
        relays = list(self._top.udp_relays)
        yield GaugeMetricFamily("ssx_local_servers", "Servers known (configured and from the online config)",
                                value=len(upstreams))
        up = GaugeMetricFamily("ssx_local_server_up", "1 while a server is taken as up, 0 once marked down",
                               labels=["server"])
        latency = GaugeMetricFamily("ssx_local_server_latency_seconds",
                                    "A server's moving average latency from the health checks", labels=["server"])
        failures = GaugeMetricFamily("ssx_local_server_failures", "A server's consecutive failures", labels=["server"])
        for upstream in upstreams:
            try:
                is_up, average, failed = picker.health(upstream)
            except KeyError:  # dropped by an online config meanwhile
                continue
            up.add_metric([upstream.label], 1 if is_up else 0)
            failures.add_metric([upstream.label], failed)
            if average is not None:
                latency.add_metric([upstream.label], average)
        data = CounterMetricFamily("ssx_local_data_bytes", "Payload bytes relayed through each server, by direction",
                                   labels=["server", "proto", "dir"])
        for proto, table in self._traffic.items():
            for label, counter in list(table.items()):
                data.add_metric([label, proto, "c>p"], counter.up)
                data.add_metric([label, proto, "p>c"], counter.down)
        retired = self._retired
        failovers = dict(retired.failovers)
        fronts = dict(retired.fronts)
        # Transparent connections whose original destination was not found, by front.
        unknown = dict(retired.unknown)
        active, broken = 0, retired.broken
        for factory in factories:
            for label, count in list(factory.failovers.items()):
                failovers[label] = failovers.get(label, 0) + count
            for front, count in _fronts(factory).items():
                fronts[front] = fronts.get(front, 0) + count
            for front, count in _unknown(factory).items():
                unknown[front] = unknown.get(front, 0) + count
            active += len(factory.connections)
            broken += factory.relays_broken
        failover = CounterMetricFamily(
            "ssx_local_failovers", "Connections that could not reach a server and tried the next, by the server left",
            labels=["server"],
        )
        for label, count in sorted(failovers.items()):
            failover.add_metric([label], count)
        connections = CounterMetricFamily(
            "ssx_local_connections",
            "Application connections, by the protocol spoken or the port taking them "
            "(socks5, socks4, http, tunnel, redir, tproxy)",
            labels=["front"],
        )
        for front, count in sorted(fronts.items()):
            connections.add_metric([front], count)
        no_destination = CounterMetricFamily(
            "ssx_local_transparent_no_destination",
            "Transparent connections closed at once: their original destination was not found", labels=["front"],
        )
        for front, count in sorted(unknown.items()):
            no_destination.add_metric([front], count)
        yield from (up, latency, failures, data, failover, connections, no_destination)
        if self._top.router is not None:
            yield self._acl_decisions(factories, relays)
        if self._top.dns is not None:
            yield from self._dns(self._top.dns)
        yield GaugeMetricFamily("ssx_local_connections_active", "Application connections open", value=active)
        yield CounterMetricFamily("ssx_local_relays_broken", "Relays closed on a stream from a server that failed "
                                  "to decrypt", value=broken)

    @staticmethod
    def _acl_decisions(factories: list[LocalFactory], relays: list[LocalUdpRelay]) -> Metric:
        decisions = CounterMetricFamily(
            "ssx_local_acl_decisions", "The ACL's decisions: targets sent through a server (proxy) or direct",
            labels=["route", "proto"],
        )
        decisions.add_metric(["proxy", "tcp"], sum(f.acl_proxied for f in factories))
        decisions.add_metric(["direct", "tcp"], sum(f.acl_direct for f in factories))
        decisions.add_metric(["proxy", "udp"], sum(r.acl_proxied for r in relays))
        decisions.add_metric(["direct", "udp"], sum(r.acl_direct for r in relays))
        return decisions

    @staticmethod
    def _dns(resolver: RoutingResolver) -> Iterator[Metric]:
        queries = CounterMetricFamily(
            "ssx_local_dns_queries", "DNS queries asked of a resolver: direct (--dns-local) or proxied (--dns-remote)",
            labels=["route"],
        )
        queries.add_metric(["direct"], resolver.direct)
        queries.add_metric(["proxied"], resolver.proxied)
        yield queries
        yield CounterMetricFamily("ssx_local_dns_cache_hits", "DNS queries answered from the cache",
                                  value=resolver.cache_hits)
        yield CounterMetricFamily(
            "ssx_local_dns_failures", "DNS queries failed (no answer in time, upstream error, bad name, too many queries)",
            value=resolver.failures,
        )
        yield GaugeMetricFamily("ssx_local_dns_cache_entries", "DNS answers held in the cache",
                                value=len(resolver.cache))
