"""
One served port: `build_port` makes, from one `PortConfig`, the port's
cipher suite, its TCP factory (with its counters and, if asked, its
traffic through the accounting seam), its TCP listeners (or
its SIP003 plugin and ssx's loopback listener behind it) and its UDP
relays, as one `ServerPort` service.  `ssx.server.tap.build_service` adds
one per configured port to the `ServerService`, which keeps them by port
number; what every port shares (resolver, forbidden ranges, replay
filter, limits) comes in a `SharedParts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.application.service import MultiService

from ssx.config import Limits
from ssx.config.options import make_suite
from ssx.config.ports import PortConfig
from ssx.crypto import SaltFilter
from ssx.net.listener import DatagramListenerService, ListenerService, serve
from ssx.net.outbound import Outbound
from ssx.net.plugin import PluginService
from ssx.net.resolver import TargetResolver
from ssx.net.tcp import FAST_OPEN_QUEUE
from ssx.server.accounting import UserTraffic
from ssx.net.acl_holder import AclHolder
from ssx.server.forbidden import ForbiddenNetworks
from ssx.server.protocol import ShadowsocksServerFactory
from ssx.server.session_windows import SessionWindows
from ssx.server.udp import UdpLookups, UdpRelay, udp_relay_for

__all__ = ["ServerPort", "SharedParts", "build_port"]


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
    # The ACL (client and outbound lists), reloadable, or None.
    acl: AclHolder | None = None


class ServerPort(MultiService):
    """
    One port while it runs: its `factory` (keys, counters, per-user
    accounting), `listeners`, `plugin`, `udp_relays` and
    `datagram_listeners`.  Starting and stopping it starts and stops
    only this port.
    """

    def __init__(self, config: PortConfig, factory: ShadowsocksServerFactory, traffic: UserTraffic | None = None) -> None:
        MultiService.__init__(self)
        self.config = config
        self.factory = factory
        # The port's encrypted bytes, both directions, TCP and UDP, when counted.
        self.traffic = traffic
        self.listeners: list[ListenerService] = []
        self.plugin: PluginService | None = None
        self.udp_relays: list[UdpRelay] = []
        self.datagram_listeners: list[DatagramListenerService] = []


def build_port(shared: SharedParts, config: PortConfig) -> ServerPort:
    """The service of the port `config` describes, not started."""
    reactor = shared.reactor
    traffic = UserTraffic() if shared.count_traffic else None
    suite = make_suite(reactor, config.method, config.password, config.key, config.users)
    factory = ShadowsocksServerFactory(
        reactor, suite, shared.resolver, shared.forbidden, timeout=config.timeout, salt_filter=shared.salt_filter,
        max_handshakes=shared.max_handshakes,
        # Behind a plugin every connection comes from the plugin's address.
        max_handshakes_per_ip=shared.max_handshakes_per_ip if config.plugin is None else 0,
        verbose=shared.verbose,
        port_traffic=traffic,
        outbound=shared.outbound,
        acl=shared.acl,
        **shared.limits.factory_arguments(),
    )
    port = ServerPort(config, factory, traffic)
    relays = config.relays
    # One store of 2022 session windows for every address of the port.
    sessions = {"sessions": SessionWindows(suite.replay_window, relays.capacity)} if suite.spec.family == "aead2022" else {}

    def udp_relay() -> UdpRelay:
        relay = udp_relay_for(suite)(
            reactor, suite, shared.resolver, shared.forbidden, relays.timeout, relays.capacity,
            salt_filter=shared.salt_filter, lookups=shared.lookups, verbose=shared.verbose, traffic=port.traffic,
            outbound=shared.outbound, acl=shared.acl, **sessions,
        )
        port.udp_relays.append(relay)
        return relay

    def udp_at(address: tuple[str, int] | None = None, beside: ListenerService | None = None) -> None:
        port.datagram_listeners.append(add(DatagramListenerService(
            reactor, udp_relay(), "ssx-server", address=address, beside=beside, v6only=config.v6only,
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
                fast_open=FAST_OPEN_QUEUE if config.fast_open else 0,
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
