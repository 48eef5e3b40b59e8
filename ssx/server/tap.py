"""
`twistd ssx-server`: the server end's options, and `makeService`, which
builds its service tree (`ssx.server.service.ServerService`) from the
checked configuration (`ssx.config.server`).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ssx.config import ServerConfig, server_config
from ssx.config.server import added_port
from ssx.config.options import SsxOptions, log_config_notes
from ssx.crypto import SaltFilter
from ssx.crypto.edition2022 import SaltPool
from ssx.net.acl_holder import AclHolder
from ssx.net.listener import DrainService
from ssx.errors import ConfigError
from ssx.net.plugin import find_plugin
from ssx.net.reload import ReloadService
from ssx.net.resolver import TargetResolver
from ssx.net.outbound import device_problem
from ssx.net.tcp import fast_open_sysctl_note
from ssx.server.host_address_watch import HostAddressWatcher
from ssx.server.manager import ManagerProtocol, ManagerService
from ssx.server.ports import SharedParts, build_port
from ssx.server.reload import ServerReload
from ssx.server.service import CounterReport, ResolverCache, ServerService
from ssx.server.udp import UdpLookups
from ssx.server.url_file import UrlAnnouncement, reuse_generated_password

__all__ = ["Options", "build_service", "makeService"]

_log = Logger()


class Options(SsxOptions):
    command = "ssx-server"
    synopsis = "[options]"
    longdesc = (
        "Shadowsocks server. With no options at all it listens on port 8388 with "
        "chacha20-ietf-poly1305 and a freshly generated password, kept for the next start. "
        "At start it writes the ss:// URL that clients import to ssx-server.url (mode 0600; "
        "python -m ssx url -c FILE prints it with a QR code) and logs where it is. Keys and "
        "flags follow shadowsocks-libev and the "
        "original Python shadowsocks: -c config.json, then flags override the file. "
        "SIGHUP reloads the config file (the command line stays as given). "
        "Example: twistd -n ssx-server -p 8388 -k SECRET -m aes-256-gcm"
    )
    optParameters = [
        ["server-port", "p", None, "port to listen on [default: 8388]"],
        ["password", "k", None, "password [default: the one generated at an earlier start, from the URL file; "
         "else a fresh random one]"],
        ["nameserver", None, None, "DNS servers, comma-separated IP[:port] [default: from resolv.conf, else 8.8.8.8,8.8.4.4]"],
        ["forbidden-ip", None, None, "destinations refused, comma-separated IPs/CIDRs and the words 'special' "
         "(every special-purpose range that is not globally reachable: loopback, private, link-local, CGNAT, "
         "documentation, benchmarking, reserved, multicast, ...), 'self' (this host's own addresses) and 'default' "
         "(both); a list replaces the default, so 'default,203.0.113.0/24' adds to it; '' allows all "
         "[default: default]"],
        ["hosts-file", None, None, "hosts file consulted before DNS [default: /etc/hosts]"],
        ["resolv-conf", None, None, "resolv.conf to take DNS servers from [default: /etc/resolv.conf]"],
        ["replay-history", None, None, "salts remembered to refuse replayed connections and datagrams "
         "(stream and AEAD-2017 methods; 0 turns it off) [default: 1000000]"],
        ["max-handshakes", None, None, "connections kept at once that have not sent a valid header (at most "
         "half of --max-connections; 0: no bound); beyond, the oldest that sent bytes or waited 2 s is closed "
         "as its handshake timeout would close it [default: 512]"],
        ["max-handshakes-per-ip", None, None, "the same, from one IPv4 address or IPv6 /64; not applied "
         "behind a plugin (0: no bound) [default: 128]"],
        ["plugin", None, None, "SIP003 plugin (a name on PATH or a path), e.g. obfs-server or v2ray-plugin: it "
         "listens on -s/-p, ssx behind it on a loopback port; UDP (-u) stays on -s/-p, outside the plugin"],
        ["plugin-opts", None, None, "the plugin's options (SS_PLUGIN_OPTIONS), e.g. \"obfs=http\" or "
         "\"server;host=example.com\""],
        ["manager-address", None, None, "where the manager API answers (add/remove/list/ping, stat reports): "
         "host:port for UDP, or a path for a Unix datagram socket; loopback only unless --manager-allow-remote"],
        ["outbound-address", None, None, "source address of connections and UDP datagrams to targets "
         "(key outbound_address; libev's server-side local_address, -b): an IPv4 address for IPv4 targets, an "
         "IPv6 one for IPv6 targets, or both, comma-separated [default: the kernel's choice]"],
        ["interface", None, None, "send connections and datagrams to targets through this interface only "
         "(key interface; libev's -i; SO_BINDTODEVICE, needs root or CAP_NET_RAW)"],
        ["url-file", None, None, "file the ss:// URL is written to at start, mode 0600 (it carries the "
         "password), relative to twistd's --rundir; '' for none [default: ssx-server.url]"],
    ]
    optFlags = [
        ["prefer-ipv6", "6", "try AAAA records before A records"],
        ["manager-allow-remote", None, "let --manager-address be a non-loopback address (whoever reaches it "
         "controls the server)"],
    ]
    flag_keys = {
        "nameserver": "nameserver",
        "forbidden-ip": "forbidden_ip",
        "hosts-file": "hosts_file",
        "resolv-conf": "resolv_conf",
        "replay-history": "replay_history",
        "url-file": "url_file",
        "max-handshakes": "max_handshakes",
        "max-handshakes-per-ip": "max_handshakes_per_ip",
        "manager-address": "manager_address",
        "outbound-address": "outbound_address",
        "interface": "interface",
    }
    build = staticmethod(server_config)

    def __init__(self) -> None:
        super().__init__()
        self["server"] = None

    def opt_server(self, address: str) -> None:
        """address to bind, repeatable (IPv6 sockets then take IPv6 only when IPv4 addresses are bound too) [default: 0.0.0.0]"""
        previous = self.get("server")
        if previous is None:
            self["server"] = address
        else:
            self["server"] = [*(previous if isinstance(previous, list) else [previous]), address]

    opt_s = opt_server

    def postOptions(self) -> None:
        # A flag given only as a switch must not override the file's value.
        self["prefer-ipv6"] = True if self["prefer-ipv6"] else None
        self["manager-allow-remote"] = True if self["manager-allow-remote"] else None
        self.flag_keys = {**self.flag_keys, "prefer-ipv6": "prefer_ipv6", "manager-allow-remote": "manager_allow_remote"}
        super().postOptions()

    def check(self, config: ServerConfig) -> ServerConfig:
        super().check(config)
        for port in config.ports[1:]:
            # The first port's plugin was looked for with the config's own.
            if port.plugin is not None:
                try:
                    find_plugin(port.plugin.name)
                except ConfigError as e:
                    raise ConfigError(f"{port.label}.plugin" if port.label.startswith("servers[") else "plugin",
                                      e.message) from None
        if config.outbound is not None and config.outbound.device is not None:
            problem = device_problem(config.outbound.device)
            if problem is not None:
                raise ConfigError("interface", problem)
        # twistd changes to --rundir before the services start: the URL file
        # is read now and written then, so both must mean the same file (and
        # a reload, run in --rundir, reads the same file again).
        parent = getattr(self, "parent", None)
        if not hasattr(self, "_rundir"):
            self._rundir = os.path.abspath((parent.get("rundir", ".") if parent is not None else ".") or ".")
        # The file of an earlier start belongs to the user twistd switches to.
        uid = parent.get("uid") if parent is not None else None
        return reuse_generated_password(config, self._rundir, uid)


def build_service(
    reactor: Any, config: ServerConfig, count_traffic: bool = False, salt_filter: SaltFilter | None = None,
    manager_listens: bool = True,
) -> ServerService:
    """
    The server's service tree for `config`: one `ServerPort` per configured
    port; with `count_traffic` or a manager, each counts its encrypted
    bytes, TCP and UDP (`traffic`).  With `config.metrics`, a registry of
    its own (`service.metrics`), served at /metrics there.  A worker
    (`ssx.workers.worker`) passes the replay filter it shares with the other
    workers, and takes manager requests from its supervisor
    (`manager_listens` false: the protocol is `service.manager_protocol`,
    with no socket of its own).
    """
    service = ServerService()
    metrics = None
    if config.metrics is not None:
        # Imported only when asked for: prometheus-client is needed for nothing else.
        from ssx.server.metrics import ServerMetrics

        metrics = ServerMetrics(lambda: service.ports)
    resolver = TargetResolver(
        reactor,
        nameservers=config.nameservers,
        hosts_file=config.hosts_file,
        resolv_conf=config.resolv_conf,
        prefer_ipv6=config.prefer_ipv6,
    )
    shared = SharedParts(
        reactor=reactor,
        resolver=resolver,
        forbidden=config.forbidden,
        lookups=UdpLookups(resolver),
        salt_filter=salt_filter if salt_filter is not None else
        SaltFilter(config.replay_history) if config.replay_history >= 2 else None,
        limits=config.limits,
        max_handshakes=config.max_handshakes,
        max_handshakes_per_ip=config.max_handshakes_per_ip,
        verbose=config.verbose,
        count_traffic=count_traffic or config.manager is not None,
        outbound=config.outbound,
        metrics=metrics,
        reuse_port=config.reuse_port,
        acl=AclHolder(config.acl_path, config.acl) if config.acl is not None and config.acl_path else None,
        salts_2022=SaltPool(reactor.seconds),
    )
    # Every port reads the ACL here; a reload (SIGHUP) puts the new one in.
    service.acl = shared.acl
    if config.forbidden.host is not None:
        # Reads the addresses at start and after every change (a check made
        # before the first read reads them itself).
        service.host_address_watcher = service.add(HostAddressWatcher(reactor, config.forbidden.host))
    for port in config.port_configs():
        service.add_port(build_port(shared, port))
    service.drain = service.add(DrainService(reactor, service.factories, config.limits.shutdown_grace, "ssx-server"))
    service.resolver_cache = service.add(ResolverCache(resolver))
    service.counter_report = service.add(CounterReport(reactor, service.factories, service.udp_relays))
    # Reloads change the shared parts and the top-level keys that added ports inherit.
    reload = service.reload = ServerReload(service, shared, config)
    if config.manager is not None:
        protocol = ManagerProtocol(
            service, lambda port: build_port(reload.shared, port),
            lambda request: added_port(reload.config.port_defaults, request),
        )
        service.manager_protocol = protocol
        if manager_listens:
            service.manager = service.add(ManagerService(reactor, config.manager, protocol))
    if metrics is not None and config.metrics is not None:
        from ssx.net.metrics import serve_metrics

        service.metrics = metrics
        service.metrics_listener = serve_metrics(service, reactor, config.metrics, metrics.registry, "ssx-server")
    _report(config, resolver)
    # With several ports, the URL file carries the first port's URL.
    service.url_announcement = service.add(
        UrlAnnouncement(config, service.listeners, service.datagram_listeners)
    )
    return service


def _report(config: ServerConfig, resolver: TargetResolver) -> None:
    log_config_notes("ssx-server", config.method, config.warnings, config.ignored)
    if any(port.fast_open for port in config.port_configs()):
        note = fast_open_sysctl_note(server=True)
        if note is not None:
            _log.warn(note)
    _log.info(
        "ssx-server: method {method}, timeout {timeout:g}s, DNS {dns}, forbidden {forbidden}",
        method=", ".join(dict.fromkeys(p.method for p in config.port_configs())),
        timeout=config.timeout,
        dns=",".join(h for h, _ in resolver.nameservers),
        forbidden=str(config.forbidden),
    )
    if config.acl is not None:
        _log.info("ssx-server: ACL {acl}", acl=config.acl)
        if config.acl.checks_clients and any(port.plugin is not None for port in config.port_configs()):
            # The plugin connects to ssx from loopback, whoever its client is.
            _log.warn("ssx-server: on a port behind a plugin every client comes from the plugin's loopback "
                      "address: the ACL's client lists judge that address, not the clients'")


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    if options.config.workers > 1:
        from ssx.workers.supervisor import Supervisor

        return Supervisor(reactor, "ssx-server", options.argv, options.config, options.cwd,
                          load=options.load_config, refusal=options.config_error)
    service = build_service(reactor, options.config)
    # SIGHUP: the file read again, the start's command line over it.
    ReloadService(
        reactor, "ssx-server", options.load_config, lambda config: Deferred.fromCoroutine(service.reload.apply(config)),
        options.config_error,
    ).setServiceParent(service)
    return service
