"""
`twistd ssx-server`: options and the service tree of the server end.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ssx.config import ServerConfig, server_config
from ssx.listener import DatagramListenerService, DrainService, serve
from ssx.replay import SaltFilter
from ssx.plugin import PluginService
from ssx.resolver import TargetResolver
from ssx.server import ShadowsocksServerFactory
from ssx.server_udp import ShadowsocksUdpRelay, UdpLookups, udp_relay_for
from ssx.tap._options import SsxOptions, log_config_notes, make_suite
from ssx.url import format_url

__all__ = ["CounterReport", "Options", "makeService", "build_service"]

_log = Logger()


class Options(SsxOptions):
    command = "ssx-server"
    synopsis = "[options]"
    longdesc = (
        "Shadowsocks server. With no options at all it listens on port 8388 with "
        "chacha20-ietf-poly1305 and a freshly generated password. At start it logs the "
        "ss:// URL that clients import (python -m ssx url -c FILE prints it with a QR "
        "code). Keys and flags follow shadowsocks-libev and the "
        "original Python shadowsocks: -c config.json, then flags override the file. "
        "Example: twistd -n ssx-server -p 8388 -k SECRET -m aes-256-gcm"
    )
    optParameters = [
        ["server", "s", None, "address to bind [default: 0.0.0.0]"],
        ["server-port", "p", None, "port to listen on [default: 8388]"],
        ["password", "k", None, "password [default: a fresh random one, logged as an ss:// URL]"],
        ["nameserver", None, None, "DNS servers, comma-separated IP[:port] [default: from resolv.conf, else 8.8.8.8,8.8.4.4]"],
        ["forbidden-ip", None, None, "destinations refused, comma-separated IPs/CIDRs; '' allows all "
         "[default: loopback, private, link-local, CGNAT, unique-local, multicast, unspecified]"],
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
    ]
    optFlags = [["prefer-ipv6", "6", "try AAAA records before A records"]]
    flag_keys = {
        "nameserver": "nameserver",
        "forbidden-ip": "forbidden_ip",
        "hosts-file": "hosts_file",
        "resolv-conf": "resolv_conf",
        "replay-history": "replay_history",
        "max-handshakes": "max_handshakes",
        "max-handshakes-per-ip": "max_handshakes_per_ip",
    }
    build = staticmethod(server_config)

    def postOptions(self) -> None:
        # A flag given only as a switch must not override the file's value.
        self["prefer-ipv6"] = True if self["prefer-ipv6"] else None
        self.flag_keys = {**self.flag_keys, "prefer-ipv6": "prefer_ipv6"}
        super().postOptions()


def build_service(reactor: Any, config: ServerConfig) -> MultiService:
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
    lookups = UdpLookups(resolver)
    top = MultiService()
    top.factory = factory  # type: ignore[attr-defined]
    top.udp_relays = []  # type: ignore[attr-defined]
    relays = config.relays

    def udp_relay() -> ShadowsocksUdpRelay | None:
        if not relays.udp:
            return None
        relay = udp_relay_for(suite)(
            reactor, suite, resolver, config.forbidden, relays.timeout, relays.capacity, salt_filter=salt_filter,
            lookups=lookups, verbose=config.verbose,
        )
        top.udp_relays.append(relay)  # type: ignore[attr-defined]
        return relay

    top.plugin = None  # type: ignore[attr-defined]
    if config.plugin is not None:
        # The plugin listens on the public address; ssx behind it on a
        # loopback port, which the listener binds before the plugin starts.
        label = f"ssx-server behind plugin {config.plugin.name}"
        listener = serve(top, reactor, config.listen[0], factory, label)
        remote = ("|".join(config.hosts), config.port)
        top.plugin = PluginService(reactor, config.plugin, "ssx-server", remote, listener=listener)  # type: ignore[attr-defined]
        top.plugin.setServiceParent(top)  # type: ignore[attr-defined]
    elif relays.tcp:
        for description in config.listen:
            serve(top, reactor, description, factory, "ssx-server", udp_relay())
    if relays.udp and (config.plugin is not None or not relays.tcp):
        # UDP does not go through a plugin: it stays on the public address and port.
        for host in config.hosts:
            DatagramListenerService(reactor, udp_relay(), "ssx-server", address=(host, config.port)).setServiceParent(top)
    DrainService(reactor, [factory], config.limits.shutdown_grace, "ssx-server").setServiceParent(top)
    _ResolverCache(resolver).setServiceParent(top)
    CounterReport(reactor, factory, top.udp_relays).setServiceParent(top)  # type: ignore[attr-defined]
    _report(config, resolver)
    # After the listeners, so that the URL has the port actually bound.
    _AnnounceUrl(config, top).setServiceParent(top)
    return top


class _AnnounceUrl(Service):
    """
    Logs the ss:// URL of this server's configuration once it listens: the
    line users copy into clients.  It carries the password, as it must.
    """

    def __init__(self, config: ServerConfig, top: MultiService) -> None:
        self.config = config
        self.top = top

    def startService(self) -> None:
        Service.startService(self)
        config = self.config
        host, port = config.host, config.port or 8388
        # Behind a plugin, clients reach the plugin on the configured port;
        # otherwise the first listener's bound port (port 0 picks one).
        for child in self.top if config.plugin is None else ():
            bound = getattr(getattr(child, "port", None), "getHost", None)
            address = bound() if bound is not None else None
            if hasattr(address, "port") and hasattr(address, "host"):
                host, port = address.host, address.port
                break
        if host in ("0.0.0.0", "::", ""):
            host = _this_host()
        if config.key is not None:
            _log.info("no ss:// URL: the server is configured with a raw key (--key), which URLs cannot carry")
            return
        plugin = config.plugin
        url = format_url(
            config.method, config.password, host, port,
            plugin=_client_plugin(plugin.name) if plugin is not None else None,
            plugin_opts=_client_plugin_options(plugin.options) if plugin is not None else None,
        )
        if config.password_generated:
            _log.warn(
                "no password given: generated one; clients connect with {url} "
                "(replace the host if clients know this machine by another name)",
                url=url,
            )
        else:
            _log.info(
                "clients connect with {url} (this URL carries the password: keep this log private; "
                "replace the host if clients know this machine by another name)",
                url=url,
            )


def _client_plugin(name: str) -> str:
    """The plugin name a client runs for this server's plugin (obfs-server pairs with obfs-local)."""
    base = name.rsplit("/", 1)[-1]
    return {"obfs-server": "obfs-local", "ss-v2ray-plugin": "v2ray-plugin"}.get(base, base)


def _client_plugin_options(options: str) -> str:
    """The options a client needs: v2ray-plugin's `server` flag is the server's alone."""
    return ";".join(part for part in options.split(";") if part and part != "server")


class CounterReport(Service):
    """
    Logs, every `interval` seconds, what peers caused meanwhile that
    failed or was refused: one line instead of one per event (those are
    logged only with --verbose), naming no peer and no destination.
    `clock` (the reactor) may be replaced before the service starts.
    """

    interval = 600.0
    # (counter on the factory, or on each UDP relay, summed; what it counts)
    TCP_COUNTERS = (
        ("handshake_failures", "connections failed authentication, replayed or sent a bad header"),
        ("handshakes_timed_out", "connections sent no whole header before the handshake timeout"),
        ("handshakes_evicted", "unfinished handshakes closed early to make room"),
        ("connections_refused", "forbidden targets refused"),
        ("targets_unreachable", "targets unreachable"),
        ("relays_broken", "relays closed on a broken stream"),
        ("limit_reached", "times at the connection limit"),
    )
    UDP_COUNTERS = (
        ("dropped", "UDP datagrams dropped (bad, replayed, unresolved or over a bound)"),
        ("refused", "UDP datagrams to forbidden targets"),
    )

    def __init__(self, reactor: Any, factory: ShadowsocksServerFactory, relays: list) -> None:
        self.clock = reactor
        self.factory = factory
        self.relays = relays
        self._last = self._counts()
        self._call: LoopingCall | None = None

    def _counts(self) -> tuple[int, ...]:
        tcp = [getattr(self.factory, name) for name, _ in self.TCP_COUNTERS]
        udp = [sum(getattr(r, name) for r in self.relays) for name, _ in self.UDP_COUNTERS]
        return (*tcp, *udp)

    def _report(self) -> None:
        now = self._counts()
        delta = [b - a for a, b in zip(self._last, now)]
        self._last = now
        described = [what for _, what in self.TCP_COUNTERS + self.UDP_COUNTERS]
        parts = [f"{count} {what}" for count, what in zip(delta, described) if count]
        if parts:
            _log.info(
                "ssx-server, last {minutes:g} min: {summary}",
                minutes=self.interval / 60,
                summary=", ".join(parts),
                counts=dict(zip([name for name, _ in self.TCP_COUNTERS + self.UDP_COUNTERS], delta)),
            )

    def startService(self) -> None:
        Service.startService(self)
        self._last = self._counts()
        self._call = LoopingCall(self._report)
        self._call.clock = self.clock
        self._call.start(self.interval, now=False)

    def stopService(self) -> None:
        Service.stopService(self)
        if self._call is not None and self._call.running:
            self._call.stop()


class _ResolverCache(Service):
    """Empties the resolver's cache when the server stops."""

    def __init__(self, resolver: TargetResolver) -> None:
        self.resolver = resolver

    def stopService(self) -> Any:
        Service.stopService(self)
        return self.resolver.close()


def _report(config: ServerConfig, resolver: TargetResolver) -> None:
    log_config_notes("ssx-server", config.method, config.warnings, config.ignored)
    _log.info(
        "ssx-server: method {method}, timeout {timeout:g}s, DNS {dns}, forbidden {forbidden}",
        method=config.method,
        timeout=config.timeout,
        dns=",".join(h for h, _ in resolver.nameservers),
        forbidden=str(config.forbidden),
    )


def _this_host() -> str:
    import socket

    return socket.gethostname()


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return build_service(reactor, options.config)
