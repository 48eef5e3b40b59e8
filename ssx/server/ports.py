"""
One served port: `build_port` makes, from one `PortConfig`, the port's
credentials (`port_credentials`: its keys and their limits, one object
the TCP factory and the UDP relays share, so that it can be replaced
while the port runs), its TCP factory (with its counters and, if asked, its
traffic through the accounting seam), its TCP listeners (or
its SIP003 plugin and ssx's loopback listener behind it) and its UDP
relays, as one `ServerPort` service.  `ssx.server.tap.build_service` adds
one per configured port to the `ServerService`, which keeps them by port
number; what every port shares (resolver, forbidden ranges, replay
filter, limits) comes in a `SharedParts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from twisted.application.service import MultiService

from ssx.config import Limits
from ssx.config.ports import PortConfig
from ssx.crypto import SaltFilter, SharedSaltFilter, make_key_ring
from ssx.crypto.edition2022 import SaltChecker
from ssx.net.listener import DatagramListenerService, ListenerService, serve
from ssx.net.outbound import Outbound
from ssx.net.plugin import PluginService
from ssx.net.resolver import TargetResolver
from ssx.net.tcp import FAST_OPEN_QUEUE
from ssx.server.accounting import UserTraffic, UserTrafficTable
from ssx.server.credentials import PortCredentials
from ssx.server.key_limits import KeyLimit
from ssx.net.acl_holder import AclHolder
from ssx.server.forbidden import ForbiddenNetworks
from ssx.server.protocol import ShadowsocksServerFactory
from ssx.server.session_windows import SessionWindows
from ssx.server.udp import UdpLookups, UdpRelay, udp_relay_for

__all__ = ["ServerPort", "SharedParts", "build_port", "port_credentials"]


@dataclass(frozen=True)
class SharedParts:
    """What every port of one server shares."""

    reactor: Any
    resolver: TargetResolver
    forbidden: ForbiddenNetworks
    lookups: UdpLookups
    salt_filter: SaltFilter | None
    limits: Limits
    max_handshakes: int
    max_handshakes_per_ip: int
    verbose: bool
    # Count each port's encrypted bytes, TCP and UDP (`ServerPort.traffic`),
    # for the manager API's figures: one call per read, write or datagram when on.
    count_traffic: bool = False
    # Where connections and datagrams to targets leave from (None: as the kernel chooses).
    outbound: Outbound | None = None
    # The server's metrics (`ssx.server.metrics.ServerMetrics`), None when off:
    # each port's factory is instrumented as it is built, added ports too.
    metrics: Any = None
    # SO_REUSEPORT on every listening socket (--reuse-port, and in a worker
    # the ports the manager adds, which every worker binds).
    reuse_port: bool = False
    # The ACL (client and outbound lists), reloadable, or None.
    acl: AclHolder | None = None
    # The 2022 request salts of every port (a `SaltPool`), which outlive a
    # port's keys: a request captured before a reload or a port's restart is
    # still a replay after it.  None: each key's own pool.  Workers check
    # theirs in the shared `salt_filter` instead.
    salts_2022: SaltChecker | None = None


class ServerPort(MultiService):
    """
    One port while it runs: its `factory` (keys, counters, per-user
    accounting), `listeners`, `plugin`, `udp_relays` and
    `datagram_listeners`.  Starting and stopping it starts and stops
    only this port.
    """

    def __init__(
        self, config: PortConfig, factory: ShadowsocksServerFactory, traffic: UserTraffic | None = None,
        udp_traffic: UserTraffic | None = None,
    ) -> None:
        MultiService.__init__(self)
        self.config = config
        self.factory = factory
        # Where 2022 salts are checked (the server's pool, or the filter
        # --workers share; None: each suite's own pool): new credentials at
        # a reload take it too.
        self.shared_salts: SaltChecker | None = None
        # The port's encrypted bytes, both directions, when counted: TCP
        # (UDP too unless `udp_traffic` counts UDP apart, for the metrics).
        self.traffic = traffic
        self.udp_traffic = udp_traffic
        # Each key's UDP payload bytes, with metrics on (TCP's: the factory's `user_traffic`).
        self.udp_payload: UserTrafficTable | None = UserTrafficTable() if udp_traffic is not None else None
        self.listeners: list[ListenerService] = []
        self.plugin: PluginService | None = None
        self.udp_relays: list[UdpRelay] = []
        self.datagram_listeners: list[DatagramListenerService] = []

    def total_bytes(self) -> int:
        """The encrypted bytes counted, both directions, TCP and UDP (0 when not counted)."""
        return sum(t.up + t.down for t in (self.traffic, self.udp_traffic) if t is not None)

    @property
    def credentials(self) -> PortCredentials:
        """The port's keys and their limits, which its factory and UDP relays share."""
        return self.factory.credentials

    def replace_credentials(self, credentials: PortCredentials) -> None:
        """
        New keys (from `port_credentials`) for the port's new connections
        and datagrams; relays already running keep the codecs they have.
        """
        self.factory.credentials = credentials
        for relay in self.udp_relays:
            relay.credentials = credentials

    def rekey(self, config: PortConfig) -> list[Any]:
        """
        Take `config`'s credentials (a reload; the method is this port's):
        rebuilt by `port_credentials` and handed to the factory and the UDP
        relays, so new connections and datagrams are opened with them at
        once, while running connections keep the codec they have.  Returns
        those running connections whose key is gone (every one when the
        port's own password or key changed, else those of users removed or
        given a new key), for the caller to end after the grace.
        """
        old = self.config
        self.replace_credentials(port_credentials(config, self.factory.reactor.seconds, self.shared_salts))
        self.config = config
        running = list(self.factory.connections)
        if (old.password, old.key) != (config.password, config.key):
            return running
        kept = dict(config.users)
        gone = {name for name, key in old.users if kept.get(name) != key}
        # Access keys (many keys on one port) removed, or given another cipher or secret.
        keys = {key.id: (key.method, key.secret) for key in config.keys}
        gone |= {key.id for key in old.keys if keys.get(key.id) != (key.method, key.secret)}
        if not gone:
            return []
        # A connection not yet past its header may still turn out to be one of them.
        return [c for c in running if getattr(c, "user", None) in gone or getattr(c, "user", None) is None]

    def configure(self, config: PortConfig, shared: SharedParts) -> None:
        """
        Take the settings that apply in place (a reload): the port's idle
        timeout and the shared forbidden ranges, limits, handshake bounds
        and verbosity, for what comes next.
        """
        factory = self.factory
        factory.forbidden = shared.forbidden
        factory.verbose = shared.verbose
        limits = shared.limits
        factory.set_limits(config.timeout, limits.handshake_timeout, limits.max_connections)
        factory.set_handshake_bounds(
            shared.max_handshakes, shared.max_handshakes_per_ip if config.plugin is None else 0,
        )
        for relay in self.udp_relays:
            relay.forbidden = shared.forbidden
            relay.verbose = shared.verbose
        self.config = config


def port_credentials(
    config: PortConfig, now: Callable[[], float], shared_salts: SaltChecker | None = None,
) -> PortCredentials:
    """
    The keys of the port `config` describes, derived now, and their
    limits: its access keys, or its one password (with its 2022 users).
    2022 headers are stamped and checked on the clock `now` (the reactor's),
    and their salts in `shared_salts` when given (the server's pool, or
    the filter of --workers).
    """
    ring = make_key_ring(
        config.method, config.password, key=config.key, users=dict(config.users),
        keys=[(key.id, key.method, key.secret) for key in config.keys], now=now,
    )
    if shared_salts is not None:
        for access in ring.keys:
            if access.suite.spec.family == "aead2022":
                access.suite.salts = shared_salts  # type: ignore[union-attr]
    limits = {
        key.id: KeyLimit(key.max_connections, key.quota_bytes, key.quota_period)
        for key in config.keys if key.max_connections or key.quota_bytes
    }
    return PortCredentials(ring, limits)


def build_port(shared: SharedParts, config: PortConfig) -> ServerPort:
    """The service of the port `config` describes, not started."""
    reactor = shared.reactor
    counting = shared.count_traffic or shared.metrics is not None
    traffic = UserTraffic() if counting else None
    # Workers: a 2022 salt seen by any of them is refused by all (the
    # shared filter, instead of each suite's exact pool of one process).
    shared_salts = shared.salt_filter if isinstance(shared.salt_filter, SharedSaltFilter) else shared.salts_2022
    credentials = port_credentials(config, reactor.seconds, shared_salts)
    factory = ShadowsocksServerFactory(
        reactor, credentials, shared.resolver, shared.forbidden, timeout=config.timeout, salt_filter=shared.salt_filter,
        max_handshakes=shared.max_handshakes,
        # Behind a plugin every connection comes from the plugin's address.
        max_handshakes_per_ip=shared.max_handshakes_per_ip if config.plugin is None else 0,
        verbose=shared.verbose,
        port_traffic=traffic,
        outbound=shared.outbound,
        acl=shared.acl,
        **shared.limits.factory_arguments(),
    )
    # The metrics tell TCP from UDP.
    port = ServerPort(config, factory, traffic, UserTraffic() if shared.metrics is not None else None)
    port.shared_salts = shared_salts
    if shared.metrics is not None:
        shared.metrics.instrument(port)
    relays = config.relays
    # One store of 2022 session windows for every address of the port.
    sessions = (
        {"sessions": SessionWindows(credentials.ring.replay_window, relays.capacity)}
        if credentials.spec.family == "aead2022" else {}
    )

    def udp_relay() -> UdpRelay:
        # Every relay holds the factory's credentials: a port's keys are one object.
        relay = udp_relay_for(credentials)(
            reactor, factory.credentials, shared.resolver, shared.forbidden, relays.timeout, relays.capacity,
            salt_filter=shared.salt_filter, lookups=shared.lookups, verbose=shared.verbose,
            traffic=port.udp_traffic if port.udp_traffic is not None else port.traffic,
            outbound=shared.outbound, user_traffic=factory.user_traffic, acl=shared.acl, **sessions,
        )
        relay.payload_traffic = port.udp_payload
        if shared.metrics is not None:
            shared.metrics.instrument_udp(port, relay)
        port.udp_relays.append(relay)
        return relay

    def udp_at(address: tuple[str, int] | None = None, beside: ListenerService | None = None) -> None:
        port.datagram_listeners.append(add(DatagramListenerService(
            reactor, udp_relay(), "ssx-server", address=address, beside=beside, v6only=config.v6only,
            reuse_port=shared.reuse_port,
        )))

    def add(child: Any) -> Any:
        child.setServiceParent(port)
        return child

    if config.plugin is not None:
        # The plugin listens on the public address; ssx behind it on a
        # loopback port, which the listener binds before the plugin starts.
        label = f"ssx-server behind plugin {config.plugin.name}"
        listener = serve(port, reactor, config.listen[0], factory, label)
        port.listeners.append(listener)
        remote = ("|".join(config.hosts), config.port)
        port.plugin = add(PluginService(reactor, config.plugin, "ssx-server", remote, listener=listener))
    elif relays.tcp:
        for description in config.listen:
            listener = serve(
                port, reactor, description, factory, "ssx-server", v6only=config.v6only,
                # Not behind a plugin, which takes the public connections itself.
                fast_open=FAST_OPEN_QUEUE if config.fast_open else 0, reuse_port=shared.reuse_port,
            )
            port.listeners.append(listener)
            if relays.udp:
                # UDP on the very address and port the listener bound.
                udp_at(beside=listener)
    if relays.udp and (config.plugin is not None or not relays.tcp):
        # UDP does not go through a plugin: it stays on the public address and port.
        for host in config.hosts:
            udp_at(address=(host, config.port))
    return port
