"""
`twistd ssx-local`: options and the service tree of the local end.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    clientFromString,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from ssx.config import LocalConfig, local_config
from ssx.listener import DatagramListenerService, serve
from ssx.local import Socks5LocalFactory, TunnelFactory
from ssx.local_udp import Socks5UdpRelay, TunnelUdpRelay
from ssx.plugin import PluginService
from ssx.relay import connect_protocol
from ssx.tap._options import SsxOptions, check_endpoint, log_config_notes, make_suite

__all__ = ["Options", "makeService", "build_service"]

_log = Logger()

CONNECT_TIMEOUT = 10.0


class Options(SsxOptions):
    command = "ssx-local"
    synopsis = "[options]"
    longdesc = (
        "Shadowsocks local end: offers SOCKS5 on 127.0.0.1:1080 and carries each "
        "connection, encrypted, to the server. Keys and flags follow "
        "shadowsocks-libev and the original Python shadowsocks: -c config.json, then "
        "flags override the file. Example: "
        "twistd -n ssx-local -s 203.0.113.5 -p 8388 -l 1080 -k SECRET -m aes-256-gcm"
    )
    optParameters = [
        ["server", "s", None, "server host name or IP address"],
        ["server-port", "p", None, "server port [default: 8388]"],
        ["local-address", "b", None, "address to offer SOCKS5 on [default: 127.0.0.1]"],
        ["local-port", "l", None, "port to offer SOCKS5 on [default: 1080]"],
        ["password", "k", None, "the server's password"],
        ["socks-user", None, None, "require SOCKS5 username/password authentication with this user"],
        ["socks-password", None, None, "... and this password"],
        ["tunnel-address", "L", None, "make the listener a tunnel (port forward) to HOST:PORT through the "
         "server instead of SOCKS5, like ss-tunnel"],
        ["server-endpoint", None, None, "Twisted client endpoint to reach the server, instead of -s/-p, "
         "e.g. tcp:host=198.51.100.7:port=8388, unix:path=/run/ssx.sock, or tls:host=example.net:port=443 "
         "(certificate checked against the system's roots; add :trustRoots=DIR to trust only the certificates "
         "in DIR, e.g. the server's own)"],
        ["plugin", None, None, "SIP003 plugin (a name on PATH or a path), e.g. obfs-local or v2ray-plugin: ssx "
         "sends TCP to it on a loopback port and it reaches -s/-p; UDP (-u) goes straight to -s/-p"],
        ["plugin-opts", None, None, "the plugin's options (SS_PLUGIN_OPTIONS), e.g. \"obfs=http;obfs-host=example.com\""],
    ]
    flag_keys = {
        "local-address": "local_address",
        "local-port": "local_port",
        "socks-user": "socks_user",
        "socks-password": "socks_password",
        "server-endpoint": "server_endpoint",
        "tunnel-address": "tunnel_address",
    }
    build = staticmethod(local_config)

    def __init__(self) -> None:
        super().__init__()
        self["tunnels"] = None

    def opt_tunnel(self, spec: str) -> None:
        """[ADDRESS:]PORT=HOST:PORT: forward a further local port to HOST:PORT through the server (repeatable), e.g. 5353=8.8.8.8:53."""
        if self["tunnels"] is None:
            self["tunnels"] = []
        self["tunnels"].append(spec)

    def postOptions(self) -> None:
        self.flag_keys = {**self.flag_keys, "tunnels": "tunnels"}
        super().postOptions()

    def check(self, config: LocalConfig) -> None:
        super().check(config)
        for tunnel in config.tunnels:
            check_endpoint("listen", tunnel.listen, server=True)
        if config.server_endpoint is not None:
            check_endpoint("server_endpoint", config.server_endpoint, server=False)


def server_connector(reactor: Any, config: LocalConfig, plugin: PluginService | None) -> Callable[[Protocol], Deferred]:
    """How each relay connects to the server: through the plugin's loopback port when there is one."""
    if plugin is None:
        endpoint = server_endpoint(reactor, config)
        return lambda protocol: connect_protocol(endpoint, protocol)

    def connect(protocol: Protocol) -> Deferred:
        # The plugin picks its port when it starts.
        assert plugin.local_address is not None
        host, port = plugin.local_address
        return connect_protocol(TCP4ClientEndpoint(reactor, host, port, timeout=CONNECT_TIMEOUT), protocol)

    return connect


def server_endpoint(reactor: Any, config: LocalConfig) -> IStreamClientEndpoint:
    """How the local end reaches its server (without a plugin)."""
    if config.server_endpoint is not None:
        return clientFromString(reactor, config.server_endpoint)
    assert config.server is not None
    try:
        version = ipaddress.ip_address(config.server).version
    except ValueError:
        return HostnameEndpoint(reactor, config.server, config.server_port, timeout=CONNECT_TIMEOUT)
    # An IP literal needs no name look-up (HostnameEndpoint would ask a thread).
    endpoint_type = TCP6ClientEndpoint if version == 6 else TCP4ClientEndpoint
    return endpoint_type(reactor, config.server, config.server_port, timeout=CONNECT_TIMEOUT)


def build_service(reactor: Any, config: LocalConfig) -> MultiService:
    """The local end's service tree for `config`."""
    suite = make_suite(config.method, config.password, config.key)
    relays = config.relays
    server = (config.server or "", config.server_port)
    top = MultiService()
    top.factories = []  # type: ignore[attr-defined]
    top.udp_relays = []  # type: ignore[attr-defined]
    top.plugin = None  # type: ignore[attr-defined]
    if config.plugin is not None:
        # First in the tree: started (and listening) before any listener's
        # connection can want it.  UDP does not go through it.
        top.plugin = PluginService(reactor, config.plugin, "ssx-local", server)  # type: ignore[attr-defined]
        top.plugin.setServiceParent(top)  # type: ignore[attr-defined]
    connect = server_connector(reactor, config, top.plugin)  # type: ignore[attr-defined]

    def keep(relay: Any) -> Any:
        top.udp_relays.append(relay)  # type: ignore[attr-defined]
        return relay

    for description in config.listen:
        socks_udp = keep(Socks5UdpRelay(reactor, suite, server, relays.timeout, relays.capacity)) if relays.udp else None
        factory = Socks5LocalFactory(
            reactor, suite, connect, config.timeout, config.socks_credentials, udp_relay=socks_udp, tcp=relays.tcp
        )
        top.factories.append(factory)  # type: ignore[attr-defined]
        serve(top, reactor, description, factory, "ssx-local", socks_udp)
    for tunnel in config.tunnels:
        tunnel_udp = None
        if relays.udp:
            tunnel_udp = keep(
                TunnelUdpRelay(reactor, suite, server, tunnel.target, timeout=relays.timeout, capacity=relays.capacity)
            )
        if relays.tcp:
            factory = TunnelFactory(reactor, suite, connect, tunnel.target, config.timeout)
            top.factories.append(factory)  # type: ignore[attr-defined]
            serve(top, reactor, tunnel.listen, factory, f"ssx-local tunnel to {tunnel.target}", tunnel_udp)
        else:
            assert tunnel.address is not None
            DatagramListenerService(
                reactor, tunnel_udp, f"ssx-local tunnel to {tunnel.target}", address=tunnel.address
            ).setServiceParent(top)
    top.factory = top.factories[0] if top.factories else None  # type: ignore[attr-defined]
    log_config_notes("ssx-local", config.method, config.warnings, config.ignored)
    via = f" through plugin {config.plugin.name}" if config.plugin is not None else ""
    _log.info(
        "ssx-local: server {server}{via}, method {method}, timeout {timeout:g}s",
        via=via,
        server=config.server_endpoint or f"{config.server}:{config.server_port}",
        method=config.method,
        timeout=config.timeout,
    )
    return top


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return build_service(reactor, options.config)
