"""
`twistd ssx-server`: the server end's options, and `makeService`, which
builds its service tree (`ssx.server.service.ServerService`) from the
checked configuration (`ssx.config.server`).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.service import IService
from twisted.logger import Logger

from ssx.config import ServerConfig, server_config
from ssx.config.options import SsxOptions, log_config_notes, make_suite
from ssx.crypto import SaltFilter
from ssx.net.listener import DatagramListenerService, DrainService, serve
from ssx.net.plugin import PluginService
from ssx.net.resolver import TargetResolver
from ssx.server.host_address_watch import HostAddressWatcher
from ssx.server.protocol import ShadowsocksServerFactory
from ssx.server.service import CounterReport, ResolverCache, ServerService
from ssx.server.session_windows import SessionWindows
from ssx.server.udp import UdpLookups, UdpRelay, udp_relay_for
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
        "Example: twistd -n ssx-server -p 8388 -k SECRET -m aes-256-gcm"
    )
    optParameters = [
        ["server", "s", None, "address to bind [default: 0.0.0.0]"],
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
        ["url-file", None, None, "file the ss:// URL is written to at start, mode 0600 (it carries the "
         "password), relative to twistd's --rundir; '' for none [default: ssx-server.url]"],
    ]
    optFlags = [["prefer-ipv6", "6", "try AAAA records before A records"]]
    flag_keys = {
        "nameserver": "nameserver",
        "forbidden-ip": "forbidden_ip",
        "hosts-file": "hosts_file",
        "resolv-conf": "resolv_conf",
        "replay-history": "replay_history",
        "url-file": "url_file",
        "max-handshakes": "max_handshakes",
        "max-handshakes-per-ip": "max_handshakes_per_ip",
    }
    build = staticmethod(server_config)

    def postOptions(self) -> None:
        # A flag given only as a switch must not override the file's value.
        self["prefer-ipv6"] = True if self["prefer-ipv6"] else None
        self.flag_keys = {**self.flag_keys, "prefer-ipv6": "prefer_ipv6"}
        super().postOptions()

    def check(self, config: ServerConfig) -> None:
        super().check(config)
        # twistd changes to --rundir before the services start: the URL file
        # is read now and written then, so both must mean the same file.
        parent = getattr(self, "parent", None)
        rundir = parent.get("rundir", ".") if parent is not None else "."
        # The file of an earlier start belongs to the user twistd switches to.
        uid = parent.get("uid") if parent is not None else None
        self.config = reuse_generated_password(config, rundir or ".", uid)


def build_service(reactor: Any, config: ServerConfig) -> ServerService:
    """The server's service tree for `config`."""
    suite = make_suite(reactor, config.method, config.password, config.key, config.users)
    resolver = TargetResolver(
        reactor,
        nameservers=config.nameservers,
        hosts_file=config.hosts_file,
        resolv_conf=config.resolv_conf,
        prefer_ipv6=config.prefer_ipv6,
    )
    salt_filter = SaltFilter(config.replay_history) if config.replay_history >= 2 else None
    factory = ShadowsocksServerFactory(
        reactor, suite, resolver, config.forbidden, timeout=config.timeout, salt_filter=salt_filter,
        max_handshakes=config.max_handshakes,
        # Behind a plugin every connection comes from the plugin's address.
        max_handshakes_per_ip=config.max_handshakes_per_ip if config.plugin is None else 0,
        verbose=config.verbose,
        **config.limits.factory_arguments(),
    )
    service = ServerService(factory)
    if config.forbidden.host is not None:
        # Reads the addresses at start and after every change (a check made
        # before the first read reads them itself).
        service.host_address_watcher = service.add(HostAddressWatcher(reactor, config.forbidden.host))
    lookups = UdpLookups(resolver)
    # One store of 2022 session windows for every bound address.
    sessions = {"sessions": SessionWindows(suite.replay_window, config.relays.capacity)} if suite.spec.family == "aead2022" else {}

    def udp_relay() -> UdpRelay:
        relay = udp_relay_for(suite)(
            reactor, suite, resolver, config.forbidden, config.relays.timeout, config.relays.capacity,
            salt_filter=salt_filter, lookups=lookups, verbose=config.verbose, **sessions,
        )
        service.udp_relays.append(relay)
        return relay

    _add_ports(service, reactor, config, udp_relay)
    service.drain = service.add(DrainService(reactor, [factory], config.limits.shutdown_grace, "ssx-server"))
    service.resolver_cache = service.add(ResolverCache(resolver))
    service.counter_report = service.add(CounterReport(reactor, factory, service.udp_relays))
    _report(config, resolver)
    service.url_announcement = service.add(
        UrlAnnouncement(config, service.listeners, service.datagram_listeners)
    )
    return service


def _add_ports(service: ServerService, reactor: Any, config: ServerConfig, udp_relay: Callable[[], UdpRelay]) -> None:
    """The TCP listeners (or the plugin, on the public port, and ssx behind it) and the UDP ports."""
    relays = config.relays
    if config.plugin is not None:
        # The plugin listens on the public address; ssx behind it on a
        # loopback port, which the listener binds before the plugin starts.
        label = f"ssx-server behind plugin {config.plugin.name}"
        listener = serve(service, reactor, config.listen[0], service.factory, label)
        service.listeners.append(listener)
        remote = ("|".join(config.hosts), config.port)
        service.plugin = service.add(PluginService(reactor, config.plugin, "ssx-server", remote, listener=listener))
    elif relays.tcp:
        for description in config.listen:
            relay = udp_relay() if relays.udp else None
            listener = serve(service, reactor, description, service.factory, "ssx-server")
            service.listeners.append(listener)
            if relay is not None:
                # UDP on the very address and port the listener bound.
                service.datagram_listeners.append(
                    service.add(DatagramListenerService(reactor, relay, "ssx-server", beside=listener))
                )
    if relays.udp and (config.plugin is not None or not relays.tcp):
        # UDP does not go through a plugin: it stays on the public address and port.
        for host in config.hosts:
            service.datagram_listeners.append(
                service.add(DatagramListenerService(reactor, udp_relay(), "ssx-server", address=(host, config.port)))
            )


def _report(config: ServerConfig, resolver: TargetResolver) -> None:
    log_config_notes("ssx-server", config.method, config.warnings, config.ignored)
    _log.info(
        "ssx-server: method {method}, timeout {timeout:g}s, DNS {dns}, forbidden {forbidden}",
        method=config.method,
        timeout=config.timeout,
        dns=",".join(h for h, _ in resolver.nameservers),
        forbidden=str(config.forbidden),
    )


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return build_service(reactor, options.config)
