"""
`twistd ssx-local`: options and the service tree of the local end: the
mixed proxy port and tunnels, the server picker with its health check, the
online config and the local DNS server.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from twisted.application.service import IService, MultiService, Service
from twisted.logger import Logger
from twisted.names.dns import DNSDatagramProtocol

from ssx.config import LocalConfig, local_config
from ssx.config.local import DnsServer
from ssx.config.values import tcp_description
from ssx.config import LocalConfig, Tunnel, local_config
from ssx.interfaces import IUpstream
from ssx.local.dns import DnsServerFactory, DnsSummaryService, DnsTcpFactory, LocalResolver, RoutingResolver
from ssx.local.dns_remote import RelayedTcpDns, RelayedUdpDns
from ssx.local.health import HealthCheckService
from ssx.net.listener import DatagramListenerService, DrainService, ListenerService, serve
from ssx.local.relay import LocalFactory
from ssx.local.redir import check_transparent, add_transparent_ports
from ssx.local.tunnel import TunnelFactory
from ssx.local.front import MixedLocalFactory
from ssx.local.udp import LocalUdpRelay, Socks5UdpRelay, TunnelUdpRelay
from ssx.local.online import OnlineConfigService, describe_url, load_trust_root
from ssx.local.online_upstreams import OnlineUpstreams
from ssx.local.picker import ServerPicker
from ssx.local.reload import LocalReload
from ssx.local.routing import AclRouter
from ssx.local.upstream import make_upstream
from ssx.errors import ConfigError
from ssx.net.acl_holder import AclHolder
from ssx.net.plugin import PluginService, find_plugin
from ssx.net.resolver import nameservers_from_resolv_conf
from ssx.wire.address import Address
from ssx.net.reload import ReloadService
from ssx.net.tcp import fast_open_sysctl_note
from ssx.config.options import SsxOptions, check_endpoint, log_config_notes

__all__ = ["LocalService", "Options", "build_service", "makeService"]

_log = Logger()

# Where the DNS server's default local resolvers come from.
RESOLV_CONF = "/etc/resolv.conf"
# A DNS client's TCP connection idle this long is closed.
DNS_TCP_IDLE = 30


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
        "Python shadowsocks: -c config.json, then flags override the file; SIGHUP reloads the file. Example: "
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
        ["plugin", None, None, "SIP003 plugin (a name on PATH or a path), e.g. obfs-local or v2ray-plugin, for the "
         "server -s/-p (or a lone --url): ssx sends TCP to it on a loopback port and it reaches the server; UDP (-u) "
         "goes straight to the server. Other servers name their own (servers entry plugin/plugin_opts, URL ?plugin=)"],
        ["plugin-opts", None, None, "the plugin's options (SS_PLUGIN_OPTIONS), e.g. \"obfs=http;obfs-host=example.com\""],
        ["dns-listen", None, None, "run a DNS server on ADDR:PORT (UDP and TCP), e.g. 127.0.0.1:5353: names the ACL "
         "sends direct are asked of --dns-local, all others of --dns-remote through the server"],
        ["dns-local", None, None, "IP[:PORT] of the resolvers for names sent direct, comma-separated "
         "[default: the nameservers of /etc/resolv.conf]"],
        ["dns-remote", None, None, "IP[:PORT] of the resolver asked through the server, over the UDP relay "
         "(-u) or else DNS over TCP through the TCP relay [default: 8.8.8.8:53]"],
        ["outbound-fwmark", None, None, "firewall mark (SO_MARK) on the connections and datagrams to the servers "
         "and the ACL's direct targets, so that the rules of --redir/--tproxy let them pass (needs CAP_NET_ADMIN)"],
    ]
    optFlags = [
        ["acl-resolve", None, "with --acl, resolve a name that no name rule matches and match its addresses "
         "against the address rules (as shadowsocks-rust does); without it such a name takes the default"],
    ]
    flag_keys = {
        "acl-resolve": "acl_resolve",
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
        "dns-listen": "dns_listen",
        "dns-local": "dns_local",
        "dns-remote": "dns_remote",
        "outbound-fwmark": "outbound_fwmark",
    }
    build = staticmethod(local_config)

    def __init__(self) -> None:
        super().__init__()
        self["tunnels"] = None
        self["url"] = None
        self["redir"] = None
        self["tproxy"] = None

    def opt_tunnel(self, spec: str) -> None:
        """[ADDRESS:]PORT=HOST:PORT: forward a further local port to HOST:PORT through the server (repeatable), e.g. 5353=8.8.8.8:53."""
        if self["tunnels"] is None:
            self["tunnels"] = []
        self["tunnels"].append(spec)

    def opt_redir(self, spec: str) -> None:
        """[ADDRESS:]PORT: transparent proxy port for connections a firewall NAT-redirects here (REDIRECT; with -u, UDP by TPROXY on the same port), like ss-redir; repeatable; a PORT alone listens on 0.0.0.0 and ::."""
        if self["redir"] is None:
            self["redir"] = []
        self["redir"].append(spec)

    def opt_tproxy(self, spec: str) -> None:
        """[ADDRESS:]PORT: transparent proxy port for TCP (and with -u, UDP) a firewall diverts here with TPROXY, like ss-redir -T; repeatable; needs CAP_NET_ADMIN."""
        if self["tproxy"] is None:
            self["tproxy"] = []
        self["tproxy"].append(spec)

    def opt_url(self, url: str) -> None:
        """ss:// URL of a server (SIP002 or the legacy base64 form); repeatable, for several servers with failover."""
        if self["url"] is None:
            self["url"] = []
        self["url"].append(url)

    def postOptions(self) -> None:
        self["acl-resolve"] = True if self["acl-resolve"] else None
        self.flag_keys = {**self.flag_keys, "tunnels": "tunnels", "url": "url", "redir": "redir", "tproxy": "tproxy"}
        super().postOptions()

    def check(self, config: LocalConfig) -> LocalConfig:
        for entry, plugin in zip(config.servers, config.plugins):
            if plugin is not None and len(config.servers) > 1:
                # Before the common check (the first plugin): the message names the server.
                try:
                    find_plugin(plugin.name)
                except ConfigError as e:
                    raise ConfigError(e.key, f"server {entry.label}: {e.message}") from None
        super().check(config)
        for tunnel in config.tunnels:
            check_endpoint("listen", tunnel.listen, server=True)
        for entry in config.servers:
            if entry.endpoint is not None:
                check_endpoint("server_endpoint", entry.endpoint, server=False)
        if config.online is not None and config.online.ca_file is not None:
            load_trust_root(config.online.ca_file)
        if config.dns is not None:
            local = _dns_local_servers(config.dns)
            if not local:
                raise ConfigError("dns_local", f"no nameserver in {RESOLV_CONF}: give the local resolvers (IP[:PORT])")
            if config.dns.listen in local:
                raise ConfigError("dns_local", f"names the DNS server's own address {config.dns.listen[0]}:"
                                  f"{config.dns.listen[1]}: queries would loop")
        check_transparent(config)
        return config


class LocalService(MultiService):
    """
    The root of the local end's service tree, its parts by name: the SIP003
    plugins (one per configured server that has one; the online config's
    servers' plugins are added and removed as they come and go), the server picker, the proxy and tunnel ports (factories and
    listeners), the UDP relays, the graceful-shutdown drain, the health
    check, the online config and, with --metrics, the metrics (`metrics`)
    and their listener (`metrics_listener`).
    """

    # SO_REUSEPORT on the listening sockets (--reuse-port).
    reuse_port = False

    def __init__(self, picker: ServerPicker, plugins: Sequence[PluginService] = ()) -> None:
        MultiService.__init__(self)
        self.plugins = list(plugins)
        self.picker = picker
        self.factories: list[LocalFactory] = []
        self.listeners: list[ListenerService] = []
        self.udp_relays: list[LocalUdpRelay] = []
        self.drain: DrainService | None = None
        self.health: HealthCheckService | None = None
        self.online: OnlineConfigService | None = None
        self.online_upstreams: OnlineUpstreams | None = None
        self.dns: RoutingResolver | None = None
        self.dns_listener: ListenerService | None = None
        # With --metrics: the registry (`ssx.local.metrics.LocalMetrics`) and its listener.
        self.metrics: Any = None
        self.metrics_listener: ListenerService | None = None
        # Each proxy port's and tunnel's factory (None for a UDP-only
        # tunnel) and services, by its listen description: what a reload
        # stops when it goes.
        self.ports: dict[str, tuple[LocalFactory | None, list[Service]]] = {}
        # What applies a reload (`ssx.local.reload.LocalReload`).
        self.reload: Any = None
        # The ACL (`--acl`) every port reads at decision time (a reload replaces its rules).
        self.router: AclRouter | None = None
        # --outbound-fwmark, fixed at start: the mark of every socket to a
        # server, also of those a reload adds (None: unmarked).
        self.mark: int | None = None
        for plugin in self.plugins:
            # First in the tree: started (and listening) before any
            # listener's connection can want them.
            plugin.setServiceParent(self)

    @property
    def plugin(self) -> PluginService | None:
        """The first server's plugin (with one server: its plugin)."""
        return self.plugins[0] if self.plugins else None

    @property
    def factory(self) -> LocalFactory | None:
        """The first port's factory: the proxy port's, or the first tunnel's."""
        return self.factories[0] if self.factories else None

    def add_port(
        self, reactor: Any, description: str, factory: LocalFactory, label: str, udp: LocalUdpRelay | None = None
    ) -> None:
        """Listen with `factory` on `description`, with `udp` beside it on the same port if given."""
        self.factories.append(factory)
        factory.mark = self.mark
        if self.metrics is not None:  # a port a reload adds
            self.metrics.instrument(factory)
        before = len(self.services)
        listener = serve(self, reactor, description, factory, label, udp, reuse_port=self.reuse_port)
        self.listeners.append(listener)
        self.ports[description] = (factory, list(self.services[before:]))

    def remove_port(self, description: str) -> None:
        """
        Stop the proxy port or tunnel listening on `description` (a
        reload): its listeners close at once, and its running connections
        get the shutdown grace, as at SIGTERM.
        """
        factory, services = self.ports.pop(description)
        for service in services:
            service.disownServiceParent()
            if service in self.listeners:
                self.listeners.remove(service)
        if factory is not None:
            self.factories[:] = [f for f in self.factories if f is not factory]
            if self.metrics is not None:
                self.metrics.retire(factory)
            grace = self.drain.grace if self.drain is not None else 0.0
            DrainService(factory.reactor, [factory], grace, f"ssx-local on {description}").stopService()
        for relay in [r for r in self.udp_relays if any(getattr(s, "protocol", None) is r for s in services)]:
            self.udp_relays.remove(relay)


def build_service(
    reactor: Any, config: LocalConfig, should_proxy: Callable[[str], bool] | None = None,
) -> LocalService:
    """
    The local end's service tree for `config`; `should_proxy` decides
    which names the DNS server sends through the proxy (all by default).
    """
    upstreams, plugins = [], []
    for entry, plugin in zip(config.servers, config.plugins):
        service = None
        if plugin is not None:
            # Each on its own loopback port; UDP does not go through it.
            label = "ssx-local" if len(config.servers) == 1 else f"ssx-local (server {entry.label})"
            service = PluginService(reactor, plugin, label, (entry.host, entry.port))
            plugins.append(service)
        upstreams.append(make_upstream(reactor, entry, service, config.fast_open, config.outbound_fwmark))
    top = LocalService(ServerPicker(upstreams), plugins)
    top.reuse_port = config.reuse_port
    top.mark = config.outbound_fwmark
    if config.acl is not None and config.acl_path:
        holder = AclHolder(config.acl_path, config.acl)
        top.router = AclRouter(reactor, holder, config.acl_resolve, config.verbose)
    # UDP starts with the first configured server (checked by local_config),
    # then follows the picker's choice as servers go down.
    udp_server = top.picker.upstreams()[0] if config.relays.udp else None
    _add_proxy_ports(top, reactor, config, udp_server)
    _add_tunnels(top, reactor, config, udp_server)
    if config.dns is not None:
        if should_proxy is None and top.router is not None:
            # The ACL as it is at each query: a SIGHUP's new rules apply at once.
            holder = top.router.holder

            def should_proxy(name: str) -> bool:
                return holder.acl.proxies(name) if holder.acl is not None else True
        _add_dns_server(top, reactor, config, config.dns, should_proxy or (lambda name: True))
    add_transparent_ports(top, reactor, config)
    for relay in top.udp_relays:
        relay.mark = config.outbound_fwmark
    for factory in top.factories:
        factory.mark = config.outbound_fwmark  # on their direct connections (ACL)
    top.drain = DrainService(reactor, top.factories, config.limits.shutdown_grace, "ssx-local")
    top.drain.setServiceParent(top)
    check = config.health_check
    if check is not None and check.interval > 0 and config.relays.tcp:
        top.health = HealthCheckService(reactor, top.picker, check.target, check.request, check.interval, check.timeout)
        top.health.setServiceParent(top)
    online = config.online
    if online is not None:
        trust_root = load_trust_root(online.ca_file) if online.ca_file is not None else None
        top.online_upstreams = OnlineUpstreams(reactor, top.picker, top, plugins=config.relays.tcp, fast_open=config.fast_open,
                                              mark=config.outbound_fwmark)
        top.online = OnlineConfigService(reactor, online.url, online.interval, top.online_upstreams.apply, trust_root)
        top.online.setServiceParent(top)
    if config.metrics is not None:
        _add_metrics(top, reactor, config.metrics)
    _log_configuration(config)
    top.reload = LocalReload(reactor, top, config)
    return top


def _add_metrics(top: LocalService, reactor: Any, description: str) -> None:
    """A registry of this local end's own, served at /metrics on `description`."""
    # Imported only when asked for: prometheus-client is needed for nothing else.
    from ssx.local.metrics import LocalMetrics
    from ssx.net.metrics import serve_metrics

    top.metrics = metrics = LocalMetrics(top)
    for factory in top.factories:
        metrics.instrument(factory)
    for relay in top.udp_relays:
        relay.server_traffic = metrics.udp_server_traffic
    if top.health is not None:
        top.health.observe = metrics.observe_check
    top.metrics_listener = serve_metrics(top, reactor, description, metrics.registry, "ssx-local")


def _add_proxy_ports(top: LocalService, reactor: Any, config: LocalConfig, udp_server: IUpstream | None) -> None:
    """The mixed proxy ports (SOCKS5, SOCKS4, HTTP), each with its SOCKS5 UDP relay if UDP is relayed."""
    for description in config.listen:
        add_proxy_port(top, reactor, config, description, udp_server)


def add_proxy_port(top: LocalService, reactor: Any, config: LocalConfig, description: str, udp_server: IUpstream | None) -> None:
    """One mixed proxy port, on `description`, with its SOCKS5 UDP relay if UDP is relayed (at start, or a reload)."""
    relays = config.relays
    socks_udp = None
    if udp_server is not None:
        address = (udp_server.entry.host, udp_server.entry.port)
        socks_udp = Socks5UdpRelay(
            reactor, udp_server.suite, address, relays.timeout, relays.capacity, picker=top.picker,
            router=top.router,
        )
        socks_udp.mark = top.mark
        if top.metrics is not None:  # a port a reload adds
            socks_udp.server_traffic = top.metrics.udp_server_traffic
        top.udp_relays.append(socks_udp)
    factory = MixedLocalFactory(
        reactor, top.picker, config.timeout, config.socks_credentials, udp_relay=socks_udp, tcp=relays.tcp,
        verbose=config.verbose, router=top.router, **config.limits.factory_arguments(),
    )
    top.add_port(reactor, description, factory, "ssx-local", socks_udp)


def _add_tunnels(top: LocalService, reactor: Any, config: LocalConfig, udp_server: IUpstream | None) -> None:
    """The port forwards: TCP, UDP beside it on the same port, or UDP alone."""
    for tunnel in config.tunnels:
        add_tunnel(top, reactor, config, tunnel, udp_server)


def add_tunnel(top: LocalService, reactor: Any, config: LocalConfig, tunnel: Tunnel, udp_server: IUpstream | None) -> None:
    """One port forward (at start, or a reload): TCP, UDP beside it on the same port, or UDP alone."""
    relays = config.relays
    label = f"ssx-local tunnel to {tunnel.target}"
    tunnel_udp = None
    if udp_server is not None:
        address = (udp_server.entry.host, udp_server.entry.port)
        tunnel_udp = TunnelUdpRelay(
            reactor, udp_server.suite, address, tunnel.target, timeout=relays.timeout, capacity=relays.capacity,
            picker=top.picker, router=top.router,
        )
        tunnel_udp.mark = top.mark
        if top.metrics is not None:  # a tunnel a reload adds
            tunnel_udp.server_traffic = top.metrics.udp_server_traffic
        top.udp_relays.append(tunnel_udp)
    if relays.tcp:
        factory = TunnelFactory(
            reactor, top.picker, tunnel.target, config.timeout, verbose=config.verbose, router=top.router,
            **config.limits.factory_arguments(),
        )
        top.add_port(reactor, tunnel.listen, factory, label, tunnel_udp)
    else:
        assert tunnel.address is not None
        service = DatagramListenerService(reactor, tunnel_udp, label, address=tunnel.address, reuse_port=top.reuse_port)
        service.setServiceParent(top)
        top.ports[tunnel.listen] = (None, [service])


def _dns_local_servers(dns: DnsServer) -> tuple[tuple[str, int], ...]:
    """The resolvers for names sent direct: the configured ones, or the system's."""
    return dns.local or nameservers_from_resolv_conf(RESOLV_CONF)


def _add_dns_server(
    top: LocalService, reactor: Any, config: LocalConfig, dns: DnsServer, should_proxy: Callable[[str], bool],
) -> None:
    """The DNS server on UDP and TCP, asking the remote resolver over the UDP relay if UDP is on, else over TCP."""
    target = Address(*dns.remote)
    tcp = RelayedTcpDns(top.picker, target) if config.relays.tcp else None
    remote: Any = RelayedUdpDns(reactor, top.picker, target, tcp, top.mark) if config.relays.udp else tcp
    local = LocalResolver(reactor, _dns_local_servers(dns), mark=top.mark)
    top.dns = RoutingResolver(reactor, should_proxy, local, remote, verbose=config.verbose)
    factory = DnsServerFactory(top.dns)
    host, port = dns.listen
    tcp_factory: Any = DnsTcpFactory(factory, DNS_TCP_IDLE)
    top.dns_listener = serve(
        top, reactor, tcp_description(host, port), tcp_factory,
        "ssx-local DNS", udp=DNSDatagramProtocol(factory), reuse_port=top.reuse_port,
    )
    DnsSummaryService(reactor, top.dns).setServiceParent(top)
    _log.info(
        "ssx-local DNS: proxied names to {remote} over {how}",
        remote=f"{target.host}:{target.port}", how="the UDP relay" if config.relays.udp else "TCP through the relay",
    )


def _log_configuration(config: LocalConfig) -> None:
    """The start-up lines: the plugin, each method's notes, each server, the online config."""
    for entry, plugin in zip(config.servers, config.plugins):
        if plugin is not None:
            _log.info("ssx-local: TCP to {server} goes through plugin {name}", server=entry.label, name=plugin.name)
    methods = sorted({entry.method for entry in config.servers}) or [config.method]
    for i, method in enumerate(methods):
        log_config_notes("ssx-local", method, config.warnings if i == 0 else (), config.ignored if i == 0 else ())
    if config.fast_open:
        note = fast_open_sysctl_note(server=False)
        if note is not None:
            _log.warn(note)
    for entry in config.servers:
        _log.info(
            "ssx-local: server {server}, method {method}, timeout {timeout:g}s",
            server=entry.label, method=entry.method, timeout=config.timeout,
        )
    if config.acl is not None:
        _log.info("ssx-local: ACL {acl}{resolving}", acl=config.acl,
                  resolving=", unmatched names resolved here" if config.acl_resolve else "")
    if config.online is not None:
        _log.info("ssx-local: servers also from the online config at {where}", where=describe_url(config.online.url))


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    if options.config.workers > 1:
        from ssx.workers.supervisor import Supervisor, local_listeners

        return Supervisor(reactor, "ssx-local", options.argv, options.config, options.cwd, listeners=local_listeners,
                          load=options.load_config, refusal=options.config_error)
    service = build_service(reactor, options.config)
    # SIGHUP: the file read again, the start's command line over it.
    ReloadService(reactor, "ssx-local", options.load_config, service.reload.apply, options.config_error).setServiceParent(
        service
    )
    return service
