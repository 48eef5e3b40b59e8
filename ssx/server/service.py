"""
The root of `ssx-server`'s service tree, with its parts by name, and the
small services only the server runs: the periodic summary of what peers
caused (`CounterReport`) and the resolver's cache emptied at stop
(`ResolverCache`).  `ssx.server.tap.build_service` puts the tree together.
"""

from __future__ import annotations

from typing import Any, Sequence, TypeVar

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.logger import Logger

from ssx.net.acl_holder import AclHolder
from ssx.net.inherited import release

from ssx.net.listener import DatagramListenerService, DrainService, ListenerService
from ssx.net.plugin import PluginService
from ssx.net.summary import CounterSummary
from ssx.net.resolver import TargetResolver
from ssx.server.host_address_watch import HostAddressWatcher
from ssx.server.ports import ServerPort
from ssx.server.protocol import ShadowsocksServerFactory
from ssx.server.udp import UdpRelay
from ssx.server.url_file import UrlAnnouncement

__all__ = ["CounterReport", "PortUnavailable", "ResolverCache", "ServerService"]

_log = Logger()

_Child = TypeVar("_Child", bound=Service)


class PortUnavailable(Exception):
    """A port added while the server runs could not start (its number served already, or a bind failed)."""


class ServerService(MultiService):
    """
    `ssx-server`'s service tree.  Its children start in the order they
    were added (and stop in reverse); the named ones are:

    - `host_address_watcher`: keeps this host's addresses current for the
      forbidden check, when 'self' is forbidden;
    - `ports`: each served port's service (`ssx.server.ports.ServerPort`:
      its factory, listeners, plugin and UDP relays) by port number;
    - `factories`, `listeners`, `udp_relays` and `datagram_listeners`:
      those of every port together; `factory` and `plugin` are the first
      port's (with one port, the server's);
    - `drain`, `resolver_cache`, `counter_report`, `manager` (if any),
      `metrics_listener` (with --metrics, serving `metrics`' registry) and
      `url_announcement`, the services that follow them.
    """

    drain: DrainService
    resolver_cache: ResolverCache
    counter_report: CounterReport
    url_announcement: UrlAnnouncement
    # The manager API's service, when --manager-address is given, and the
    # protocol answering it (a worker has the protocol alone).
    manager: Service | None = None
    # With --metrics: the registry and its histograms (`ssx.server.metrics.ServerMetrics`), and its listener.
    metrics: Any = None
    metrics_listener: ListenerService | None = None
    manager_protocol: Any = None
    # The ACL (`--acl`) every port reads at decision time (a reload replaces its rules).
    acl: AclHolder | None = None

    def __init__(self) -> None:
        MultiService.__init__(self)
        self.host_address_watcher: HostAddressWatcher | None = None
        self.ports: dict[int, ServerPort] = {}
        self.factories: list[ShadowsocksServerFactory] = []
        self.listeners: list[ListenerService] = []
        self.udp_relays: list[UdpRelay] = []
        self.datagram_listeners: list[DatagramListenerService] = []
        # Timers ending the connections of keys a reload removed.
        self._retiring: list[Any] = []
        # What applies a reload (`ssx.server.reload.ServerReload`), set by `ssx.server.tap`.
        self.reload: Any = None

    @property
    def factory(self) -> ShadowsocksServerFactory:
        return self.factories[0]

    @property
    def plugin(self) -> PluginService | None:
        return next((port.plugin for port in self.ports.values() if port.plugin is not None), None)

    def add_port(self, port: ServerPort) -> ServerPort:
        """
        `port` served from now on (started if the server runs), in the table
        under its configured number.  While the server runs, a port that
        cannot start (its number taken, a bind failure) raises
        `PortUnavailable` and leaves nothing behind; before, a bind failure
        stops start-up later as it always did.
        """
        if port.config.port in self.ports:
            raise PortUnavailable(f"port {port.config.port} is already served")
        self.ports[port.config.port] = port
        self.factories.append(port.factory)
        self.listeners.extend(port.listeners)
        self.udp_relays.extend(port.udp_relays)
        self.datagram_listeners.extend(port.datagram_listeners)
        if not self.running:
            return self.add(port)
        try:
            return self.add(port)
        except SystemExit as e:
            # The listeners stop start-up with SystemExit; at run time only this port fails.
            self._forget(port)
            port.disownServiceParent()
            raise PortUnavailable(str(e.code)) from None

    def _forget(self, port: ServerPort) -> None:
        self.ports.pop(port.config.port, None)
        # The same lists that the drain, the summary and the URL hold: changed in place.
        self.factories[:] = [x for x in self.factories if x is not port.factory]
        self.listeners[:] = [x for x in self.listeners if x not in port.listeners]
        self.udp_relays[:] = [x for x in self.udp_relays if x not in port.udp_relays]
        self.datagram_listeners[:] = [x for x in self.datagram_listeners if x not in port.datagram_listeners]

    def remove_port(self, number: int, grace: float | None = None) -> Deferred[None]:
        """
        Stop serving port `number`: its listeners close at once, and its
        running relays may finish for `grace` seconds (by default the
        server's shutdown grace, as at SIGTERM), then the rest are aborted.
        Fires once its listeners are closed and its relays are done.
        """
        port = self.ports[number]
        self._forget(port)
        if self.metrics is not None:
            self.metrics.forget(port)
        stopped = maybeDeferred(port.disownServiceParent)
        # In a worker: the sockets it inherited for the port close with it.
        keys = [listener.inherited_key for listener in port.listeners]
        keys += [listener.inherited_key for listener in port.datagram_listeners]
        for key in keys:
            if key is not None:
                release(key)
        drained = self._drain(port, grace)
        return gatherResults([stopped, drained]).addCallback(lambda _: None)

    def _drain(self, port: ServerPort, grace: float | None) -> Deferred[None]:
        if grace is None:
            grace = self._grace()
        label = f"port {port.config.port}"
        return maybeDeferred(DrainService(self._reactor_of(port), [port.factory], grace, label).stopService)

    def _grace(self) -> float:
        return self.drain.grace if hasattr(self, "drain") else 0.0

    def restart_port(self, port: ServerPort, grace: float | None = None) -> Deferred[None]:
        """
        Serve `port` instead of the running port of its number (a reload
        that changed its addresses, plugin, mode or method): the running
        one's listeners, plugin and UDP relays stop, its running TCP relays
        get `grace` seconds as at `remove_port`, and `port` starts once the
        old listeners are closed, with the running one's key limits' state.
        Fails with `PortUnavailable` if it cannot.
        """
        old = self.ports[port.config.port]
        # The keys' connections and quota use go on: the running relays
        # still count against them, and a restart is no new quota period.
        port.factory.key_usage = old.factory.key_usage
        self._forget(old)
        stopped = maybeDeferred(old.disownServiceParent)
        self._drain(old, grace)
        return stopped.addCallback(lambda _: self.add_port(port)).addCallback(lambda _: None)

    def end_after_grace(self, port: ServerPort, connections: Sequence[Any], grace: float | None = None) -> None:
        """
        Let `connections` of `port` (whose key a reload took away) run for
        `grace` seconds, by default the shutdown grace, then abort those
        still open.
        """
        if not connections:
            return
        factory = port.factory

        def end() -> None:
            self._retiring.remove(call)
            live = [c for c in connections if c in factory.connections]
            if live:
                _log.info("port {port}: closing {count} connections whose key was removed",
                          port=port.config.port, count=len(live))
            for protocol in live:
                protocol.close_both(abort=True)

        call = self._reactor_of(port).callLater(self._grace() if grace is None else grace, end)
        self._retiring.append(call)

    def stopService(self) -> Any:
        # The drain ends whatever still runs.
        for call in self._retiring:
            call.cancel()
        self._retiring.clear()
        return MultiService.stopService(self)

    @staticmethod
    def _reactor_of(port: ServerPort) -> Any:
        return port.factory.reactor

    def add(self, child: _Child) -> _Child:
        """`child`, added after the children already there."""
        child.setServiceParent(self)
        return child


class CounterReport(CounterSummary):
    """
    Logs, every `interval` seconds, what peers caused meanwhile that
    failed or was refused: one line instead of one per event (those are
    logged only with --verbose), naming no peer and no destination.
    `clock` (the reactor) may be replaced before the service starts.
    """

    # (counter on the factory, or on each UDP relay, summed; what it counts)
    TCP_COUNTERS = (
        ("handshake_failures", "connections failed authentication, replayed or sent a bad header"),
        ("handshakes_timed_out", "connections sent no whole header before the handshake timeout"),
        ("handshakes_evicted", "unfinished handshakes closed early to make room"),
        ("connections_refused", "forbidden targets refused"),
        ("targets_unreachable", "targets unreachable"),
        ("targets_unresolvable", "of which target names unresolvable"),
        ("relays_broken", "relays closed on a broken stream"),
        ("limit_reached", "times at the connection limit"),
        ("acl_clients_refused", "clients refused by the ACL"),
        ("acl_refused", "targets refused by the ACL"),
    )
    UDP_COUNTERS = (
        ("dropped", "UDP datagrams dropped (bad, replayed, unresolved or over a bound)"),
        ("refused", "UDP datagrams to forbidden targets"),
        ("acl_clients_refused", "UDP datagrams from clients refused by the ACL"),
        ("acl_refused", "UDP datagrams to targets refused by the ACL"),
    )

    def __init__(self, reactor: Any, factories: Sequence[ShadowsocksServerFactory], relays: Sequence[UdpRelay]) -> None:
        self.factories = factories
        self.relays = relays
        CounterSummary.__init__(self, reactor, self.TCP_COUNTERS + self.UDP_COUNTERS, self._counts, "ssx-server")

    def _counts(self) -> tuple[int, ...]:
        tcp = [sum(getattr(f, name) for f in self.factories) for name, _ in self.TCP_COUNTERS]
        udp = [sum(getattr(r, name) for r in self.relays) for name, _ in self.UDP_COUNTERS]
        return (*tcp, *udp)

    def heading(self) -> str:
        return f"ssx-server, last {self.interval / 60:g} min"


class ResolverCache(Service):
    """Empties the resolver's cache when the server stops."""

    def __init__(self, resolver: TargetResolver) -> None:
        self.resolver = resolver

    def stopService(self) -> Any:
        Service.stopService(self)
        return self.resolver.close()
