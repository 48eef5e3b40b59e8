"""
`twistd ssx-local`: options and the service tree of the local end: the
mixed proxy port and tunnels, the server picker with its health check, and
the online config.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, MultiService
from twisted.logger import Logger

from ssx.config import LocalConfig, local_config
from ssx.local.health import HealthCheckService
from ssx.net.listener import DatagramListenerService, DrainService, serve
from ssx.local.tunnel import TunnelFactory
from ssx.local.front import MixedLocalFactory
from ssx.local.udp import Socks5UdpRelay, TunnelUdpRelay
from ssx.local.online import OnlineConfigService, describe_url, load_trust_root
from ssx.local.picker import ServerPicker
from ssx.local.upstream import make_upstream
from ssx.net.plugin import PluginService
from ssx.config.options import SsxOptions, check_endpoint, log_config_notes

__all__ = ["Options", "makeService", "build_service"]

_log = Logger()


class Options(SsxOptions):
    command = "ssx-local"
    synopsis = "[options]"
    longdesc = (
        "Shadowsocks local end: offers SOCKS5, SOCKS4/4a and HTTP proxying (CONNECT and "
        "plain requests) on one port, 127.0.0.1:1080, and carries each connection, "
        "encrypted, to a server. Servers come from -s/-p/-k/-m, repeated --url ss://..., "
        "a servers list in the config file, or --online-config (SIP008); with several, each "
        "new connection goes to the healthiest, and to the next one when a server cannot be "
        "reached. Keys and flags follow shadowsocks-libev, shadowsocks-rust and the original "
        "Python shadowsocks: -c config.json, then flags override the file. Example: "
        "twistd -n ssx-local -s 203.0.113.5 -p 8388 -l 1080 -k SECRET -m aes-256-gcm"
    )
    optParameters = [
        ["server", "s", None, "server host name or IP address"],
        ["server-port", "p", None, "server port [default: 8388]"],
        ["local-address", "b", None, "address to offer the proxy on [default: 127.0.0.1]"],
        ["local-port", "l", None, "port to offer SOCKS5, SOCKS4/4a and HTTP on [default: 1080]"],
        ["password", "k", None, "the server's password"],
        ["socks-user", None, None, "require a user name and password from applications: SOCKS5 "
         "username/password and HTTP Basic proxy authentication (SOCKS4 is then refused)"],
        ["socks-password", None, None, "... and this password"],
        ["tunnel-address", "L", None, "make the listener a tunnel (port forward) to HOST:PORT through the "
         "server instead of a proxy, like ss-tunnel"],
        ["server-endpoint", None, None, "Twisted client endpoint to reach the server, instead of -s/-p, "
         "e.g. tcp:host=198.51.100.7:port=8388, unix:path=/run/ssx.sock, or tls:host=example.net:port=443 "
         "(certificate checked against the system's roots; add :trustRoots=DIR to trust only the certificates "
         "in DIR, e.g. the server's own)"],
        ["online-config", None, None, "https:// URL of a SIP008 server list, fetched at start and then "
         "every --online-config-interval seconds"],
        ["online-config-interval", None, None, "seconds between fetches of the online config [default: 3600]"],
        ["online-config-ca", None, None, "PEM file of the CA certificates to trust for the online config "
         "[default: the system's]"],
        ["health-check-interval", None, None, "seconds between health checks of the servers, when there are "
         "several; 0 turns them off [default: 60]"],
        ["health-check-url", None, None, "http:// URL fetched through each server to check it and measure its "
         "latency [default: http://www.gstatic.com/generate_204]"],
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
        "online-config": "online_config",
        "online-config-interval": "online_config_interval",
        "online-config-ca": "online_config_ca",
        "health-check-interval": "health_check_interval",
        "health-check-url": "health_check_url",
    }
    build = staticmethod(local_config)

    def __init__(self) -> None:
        super().__init__()
        self["tunnels"] = None
        self["url"] = None

    def opt_tunnel(self, spec: str) -> None:
        """[ADDRESS:]PORT=HOST:PORT: forward a further local port to HOST:PORT through the server (repeatable), e.g. 5353=8.8.8.8:53."""
        if self["tunnels"] is None:
            self["tunnels"] = []
        self["tunnels"].append(spec)

    def opt_url(self, url: str) -> None:
        """ss:// URL of a server (SIP002 or the legacy base64 form); repeatable, for several servers with failover."""
        if self["url"] is None:
            self["url"] = []
        self["url"].append(url)

    def postOptions(self) -> None:
        self.flag_keys = {**self.flag_keys, "tunnels": "tunnels", "url": "url"}
        super().postOptions()

    def check(self, config: LocalConfig) -> None:
        super().check(config)
        for tunnel in config.tunnels:
            check_endpoint("listen", tunnel.listen, server=True)
        for entry in config.servers:
            if entry.endpoint is not None:
                check_endpoint("server_endpoint", entry.endpoint, server=False)
        if config.online is not None and config.online.ca_file is not None:
            load_trust_root(config.online.ca_file)


def build_service(reactor: Any, config: LocalConfig) -> MultiService:
    """The local end's service tree for `config`."""
    top = MultiService()
    top.plugin = None  # type: ignore[attr-defined]
    if config.plugin is not None:
        # First in the tree: started (and listening) before any listener's
        # connection can want it.  UDP does not go through it.  (Config
        # allows a plugin only with one server.)
        entry = config.servers[0]
        top.plugin = PluginService(reactor, config.plugin, "ssx-local", (entry.host, entry.port))  # type: ignore[attr-defined]
        top.plugin.setServiceParent(top)  # type: ignore[attr-defined]
    picker = ServerPicker([make_upstream(reactor, entry, top.plugin) for entry in config.servers])  # type: ignore[attr-defined]
    relays = config.relays
    top.picker = picker  # type: ignore[attr-defined]
    top.factories = []  # type: ignore[attr-defined]
    top.udp_relays = []  # type: ignore[attr-defined]

    def keep(relay: Any) -> Any:
        top.udp_relays.append(relay)  # type: ignore[attr-defined]
        return relay

    # UDP goes to the first configured server (checked by local_config).
    primary = picker.upstreams()[0] if relays.udp else None
    server = (primary.entry.host, primary.entry.port) if primary is not None else ("", 0)
    for description in config.listen:
        socks_udp = None
        if primary is not None:
            socks_udp = keep(Socks5UdpRelay(reactor, primary.suite, server, relays.timeout, relays.capacity))
        factory = MixedLocalFactory(
            reactor, picker, config.timeout, config.socks_credentials, udp_relay=socks_udp, tcp=relays.tcp,
            verbose=config.verbose, **config.limits.factory_arguments(),
        )
        top.factories.append(factory)  # type: ignore[attr-defined]
        serve(top, reactor, description, factory, "ssx-local", socks_udp)
    for tunnel in config.tunnels:
        tunnel_udp = None
        if primary is not None:
            tunnel_udp = keep(
                TunnelUdpRelay(reactor, primary.suite, server, tunnel.target, timeout=relays.timeout, capacity=relays.capacity)
            )
        if relays.tcp:
            factory = TunnelFactory(
                reactor, picker, tunnel.target, config.timeout, verbose=config.verbose,
                **config.limits.factory_arguments(),
            )
            top.factories.append(factory)  # type: ignore[attr-defined]
            serve(top, reactor, tunnel.listen, factory, f"ssx-local tunnel to {tunnel.target}", tunnel_udp)
        else:
            assert tunnel.address is not None
            DatagramListenerService(
                reactor, tunnel_udp, f"ssx-local tunnel to {tunnel.target}", address=tunnel.address
            ).setServiceParent(top)
    top.factory = top.factories[0] if top.factories else None  # type: ignore[attr-defined]
    DrainService(reactor, top.factories, config.limits.shutdown_grace, "ssx-local").setServiceParent(top)  # type: ignore[attr-defined]
    check = config.health_check
    if check is not None and check.interval > 0 and relays.tcp:
        top.health = HealthCheckService(  # type: ignore[attr-defined]
            reactor, picker, check.target, check.request, check.interval, check.timeout
        )
        top.health.setServiceParent(top)  # type: ignore[attr-defined]
    online = config.online
    if online is not None:
        trust_root = load_trust_root(online.ca_file) if online.ca_file is not None else None
        top.online = OnlineConfigService(  # type: ignore[attr-defined]
            reactor,
            online.url,
            online.interval,
            lambda entries: picker.replace_dynamic(entries, lambda entry: make_upstream(reactor, entry)),
            trust_root,
        )
        top.online.setServiceParent(top)  # type: ignore[attr-defined]
    if config.plugin is not None:
        _log.info("ssx-local: TCP to the server goes through plugin {name}", name=config.plugin.name)
    methods = sorted({entry.method for entry in config.servers}) or [config.method]
    for i, method in enumerate(methods):
        log_config_notes("ssx-local", method, config.warnings if i == 0 else (), config.ignored if i == 0 else ())
    for entry in config.servers:
        _log.info(
            "ssx-local: server {server}, method {method}, timeout {timeout:g}s",
            server=entry.label, method=entry.method, timeout=config.timeout,
        )
    if online is not None:
        _log.info("ssx-local: servers also from the online config at {where}", where=describe_url(online.url))
    return top


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return build_service(reactor, options.config)
