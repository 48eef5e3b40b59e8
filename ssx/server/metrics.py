"""
The server's Prometheus metrics (``--metrics``): one `CollectorRegistry`
per server (never the library's global one, so that several servers in
one process keep apart), served by `ssx.net.metrics`.

Nearly everything is read at scrape time from the counters the server
keeps anyway (`ServerCollector`): each port's factory counters
(`ssx.server.protocol`), its traffic (`ssx.server.accounting`: the
encrypted bytes of the port's TCP and UDP apart, and the payload bytes of
each key or user, TCP and UDP), its UDP relays' counters and NAT tables,
the ACL's refusals (`acl_refused`, `acl_clients_refused` of the factory
and the relays) and each key's refusals at its limits and quota use
(`ssx.server.key_limits`, the factory's `key_usage`).  Nothing is called
per packet for them.  What cannot be read later is observed per
connection: the handshake, key search and connect histograms, one call
each through the factory's `observer` (`PortObserver`), and how each
connection ended; each datagram's key search through its UDP relay's
`observe_key_search`; the payload bytes, a wrapper per TCP read and a
counter per UDP datagram.  With metrics off, none of this exists.

Labels are bounded by what the operator configures: `port`, `key` (a
2022 user's name or a key's id; empty on a single-key port), `proto`,
`dir` and fixed reasons.  No client address and no destination is ever a
label.  Directions are Outline's: ``c>p`` client to proxy, ``p>t`` proxy
to target, ``t>p`` and ``p>c`` back.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ssx.server.accounting import UserTrafficTable
from ssx.server.ports import ServerPort
from ssx.server.udp import UdpRelay

__all__ = ["PortObserver", "ServerCollector", "ServerMetrics"]

# Seconds: a handshake lasts about a round trip (the client's first write
# carries the header); a connect, a round trip to the target plus any
# name look-up.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Finding the key is CPU time: microseconds per key tried.
KEY_SEARCH_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 0.1)


class PortObserver:
    """One port's histograms, their labels bound once: what its factory calls per connection."""

    __slots__ = ("handshake", "connect", "_found", "_not_found")

    def __init__(self, metrics: "ServerMetrics", port: str) -> None:
        self.handshake: Callable[[float], None] = metrics.handshake_seconds.labels(port=port).observe
        self.connect: Callable[[float], None] = metrics.connect_seconds.labels(port=port).observe
        self._found, self._not_found = metrics.key_search_observers(port, "tcp")

    def key_search(self, seconds: float, found: bool) -> None:
        (self._found if found else self._not_found)(seconds)


class ServerMetrics:
    """A server's registry: its histograms, and the collector of its ports' counters."""

    def __init__(self, ports: Callable[[], Mapping[int, ServerPort]]) -> None:
        self.registry = CollectorRegistry()
        self.handshake_seconds = Histogram(
            "ssx_server_handshake_seconds", "From accepting a connection to its whole, valid header",
            ["port"], registry=self.registry, buckets=LATENCY_BUCKETS,
        )
        self.connect_seconds = Histogram(
            "ssx_server_connect_seconds", "From a connection's header to its target connected (name look-up included)",
            ["port"], registry=self.registry, buckets=LATENCY_BUCKETS,
        )
        self.key_search_seconds = Histogram(
            "ssx_server_key_search_seconds",
            "CPU time to find a connection's or a datagram's key, or that none matches",
            ["port", "proto", "found_key"], registry=self.registry, buckets=KEY_SEARCH_BUCKETS,
        )
        self.registry.register(ServerCollector(ports))

    def instrument(self, port: ServerPort) -> None:
        """Have `port`'s connections observed and counted (single-key connections under key "")."""
        factory = port.factory
        factory.observer = PortObserver(self, port_label(port))
        factory.closed_by_status = {}
        factory.default_user = ""

    def instrument_udp(self, port: ServerPort, relay: UdpRelay) -> None:
        """Have `relay` (one of `port`'s) time each datagram's key search."""
        found, not_found = self.key_search_observers(port_label(port), "udp")

        def observe(seconds: float, matched: bool) -> None:
            (found if matched else not_found)(seconds)

        relay.observe_key_search = observe

    def key_search_observers(self, port: str, proto: str) -> tuple[Callable[[float], None], Callable[[float], None]]:
        """The key search histogram's `observe` of `port` and `proto` for (found, not found)."""
        search = self.key_search_seconds
        return (search.labels(port=port, proto=proto, found_key="true").observe,
                search.labels(port=port, proto=proto, found_key="false").observe)

    def forget(self, port: ServerPort) -> None:
        """`port` is no longer served: its histograms' series go (a port restarted on its number keeps them)."""
        label = port_label(port)
        for histogram, labels in (
            (self.handshake_seconds, [(label,)]), (self.connect_seconds, [(label,)]),
            (self.key_search_seconds, [(label, proto, found) for proto in ("tcp", "udp") for found in ("true", "false")]),
        ):
            for values in labels:
                try:
                    histogram.remove(*values)
                except KeyError:
                    pass


def port_label(port: ServerPort) -> str:
    return str(port.config.port)


# (factory counter, reason) of connections that never presented a valid header.
PROBE_COUNTERS = (("handshake_failures", "bad_data"), ("handshakes_timed_out", "timeout"), ("handshakes_evicted", "evicted"))


class ServerCollector(Collector):
    """Reads every port's counters at scrape time (in the web thread: it copies what it iterates)."""

    def __init__(self, ports: Callable[[], Mapping[int, ServerPort]]) -> None:
        self._ports = ports

    def collect(self) -> Iterator[Metric]:
        ports = [(port_label(port), port) for _, port in list(self._ports().items())]
        yield GaugeMetricFamily("ssx_server_ports", "Ports served", value=len(ports))
        keys = GaugeMetricFamily("ssx_server_keys", "Keys (or users) a port takes", labels=["port"])
        data = CounterMetricFamily(
            "ssx_server_data_bytes", "Encrypted bytes a port's clients sent (c>p) and were sent (p>c)",
            labels=["port", "proto", "dir"],
        )
        payload = CounterMetricFamily(
            "ssx_server_payload_bytes", "Payload bytes relayed to targets (p>t) and back (t>p), by key",
            labels=["port", "key", "proto", "dir"],
        )
        opened = CounterMetricFamily("ssx_server_connections_opened", "Connections accepted", labels=["port"])
        active = GaugeMetricFamily("ssx_server_connections_active", "Connections open", labels=["port"])
        closed = CounterMetricFamily(
            "ssx_server_connections_closed",
            "Connections closed, by how far they got (no_header, bad_data, not_connected, relayed)",
            labels=["port", "status"],
        )
        probes = CounterMetricFamily(
            "ssx_server_probes",
            "Connections without a valid header: bad data, handshake timeouts, evictions, clients the ACL refuses",
            labels=["port", "reason"],
        )
        refused = CounterMetricFamily(
            "ssx_server_refused", "Targets refused or not reached (forbidden, acl, unresolvable, unreachable)",
            labels=["port", "proto", "reason"],
        )
        broken = CounterMetricFamily("ssx_server_relays_broken", "Relays closed on a broken stream", labels=["port"])
        limit = CounterMetricFamily(
            "ssx_server_connection_limit_reached", "Times a port stopped accepting at max_connections", labels=["port"]
        )
        datagrams = CounterMetricFamily("ssx_server_udp_datagrams", "UDP datagrams received from clients", labels=["port"])
        dropped = CounterMetricFamily(
            "ssx_server_udp_dropped", "UDP datagrams dropped (bad, replayed, unresolved or over a bound)", labels=["port"]
        )
        nat = GaugeMetricFamily("ssx_server_udp_nat_entries", "UDP associations (NAT entries) held", labels=["port"])
        nat_added = CounterMetricFamily("ssx_server_udp_nat_added", "UDP associations opened", labels=["port"])
        nat_removed = CounterMetricFamily(
            "ssx_server_udp_nat_removed", "UDP associations closed (idle, evicted or at stop)", labels=["port"]
        )
        udp_clients = CounterMetricFamily(
            "ssx_server_udp_clients_refused", "UDP datagrams dropped unread from clients the ACL refuses",
            labels=["port", "reason"],
        )
        key_refused = CounterMetricFamily(
            "ssx_server_key_refused",
            "Connections refused after their header because their key was at a limit (max_connections, quota)",
            labels=["port", "key", "reason"],
        )
        quota_used = GaugeMetricFamily(
            "ssx_server_key_quota_used_bytes", "Bytes counted against a key's quota in its current period",
            labels=["port", "key"],
        )
        for label, port in ports:
            factory = port.factory
            # Access keys, or a 2022 port's users, or its one password.
            keys.add_metric([label], len(port.config.keys) or len(port.config.users) or 1)
            for proto, traffic in (("tcp", port.traffic), ("udp", port.udp_traffic)):
                if traffic is not None:
                    data.add_metric([label, proto, "c>p"], traffic.up)
                    data.add_metric([label, proto, "p>c"], traffic.down)
            for proto, sink in (("tcp", factory.user_traffic), ("udp", port.udp_payload)):
                if isinstance(sink, UserTrafficTable):
                    for key, counter in sink.snapshot():
                        payload.add_metric([label, key, proto, "p>t"], counter.up)
                        payload.add_metric([label, key, proto, "t>p"], counter.down)
            opened.add_metric([label], factory.accepted)
            active.add_metric([label], len(factory.connections))
            if factory.closed_by_status is not None:
                for status, count in list(factory.closed_by_status.items()):
                    closed.add_metric([label, status], count)
            # The ACL's series only with --acl (a reload cannot add one).
            acl = factory.acl is not None
            for name, reason in PROBE_COUNTERS:
                probes.add_metric([label, reason], getattr(factory, name))
            if acl:
                # Clients the ACL refuses, closed at accept.
                probes.add_metric([label, "acl"], factory.acl_clients_refused)
            refused.add_metric([label, "tcp", "forbidden"], factory.connections_refused)
            if acl:
                refused.add_metric([label, "tcp", "acl"], factory.acl_refused)
            refused.add_metric([label, "tcp", "unresolvable"], factory.targets_unresolvable)
            refused.add_metric([label, "tcp", "unreachable"], factory.targets_unreachable - factory.targets_unresolvable)
            broken.add_metric([label], factory.relays_broken)
            limit.add_metric([label], factory.limit_reached)
            for report in factory.key_usage.report(factory.credentials.limits):
                key_refused.add_metric([label, report.key, "max_connections"], report.refused_connections)
                key_refused.add_metric([label, report.key, "quota"], report.refused_quota)
                if report.quota_used is not None:
                    quota_used.add_metric([label, report.key], report.quota_used)
            relays = list(port.udp_relays)
            if relays:
                refused.add_metric([label, "udp", "forbidden"], sum(r.refused for r in relays))
                if acl:
                    refused.add_metric([label, "udp", "acl"], sum(r.acl_refused for r in relays))
                    udp_clients.add_metric([label, "acl"], sum(r.acl_clients_refused for r in relays))
                refused.add_metric([label, "udp", "unresolvable"], sum(r.unresolvable for r in relays))
                datagrams.add_metric([label], sum(r.received for r in relays))
                dropped.add_metric([label], sum(r.dropped for r in relays))
                entries = sum(len(r.nat) for r in relays)
                added = sum(r.nat.added for r in relays)
                nat.add_metric([label], entries)
                nat_added.add_metric([label], added)
                nat_removed.add_metric([label], added - entries)
        yield from (keys, data, payload, opened, active, closed, probes, refused, broken, limit,
                    datagrams, dropped, nat, nat_added, nat_removed, udp_clients, key_refused, quota_used)
