"""
`twistd ssx-server`: options and the service tree of the server end.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ssx.config import ServerConfig, server_config
from ssx.crypto import lookup_method, make_suite as check_suite
from ssx.errors import ConfigError
from ssx.server.host_address_watch import HostAddressWatcher
from ssx.net.listener import DatagramListenerService, DrainService, serve
from ssx.crypto._salt_filter import SaltFilter
from ssx.net.plugin import PluginService
from ssx.net.resolver import TargetResolver
from ssx.server.protocol import ShadowsocksServerFactory
from ssx.safe_file import read_private_file, write_file
from ssx.server.udp import ShadowsocksUdpRelay, UdpLookups, udp_relay_for
from ssx.config.options import SsxOptions, log_config_notes, make_suite
from ssx.wire.sip002 import format_url, parse_url

__all__ = ["CounterReport", "Options", "makeService", "build_service"]

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


def reuse_generated_password(config: ServerConfig, rundir: str = ".", uid: int | None = None) -> ServerConfig:
    """
    The config with its URL file's path made absolute (relative ones are in
    `rundir`) and, when no password was configured, the password of that
    file's URL (written at an earlier start) in place of the freshly
    generated one: clients that imported the URL go on working.  The file
    is trusted only if it is a private file of the effective user (or of
    `uid`, the user twistd's --uid switches to) and its method is the
    configured one; otherwise the fresh password stands, with a warning.
    ConfigError if the file's directory does not exist.
    """
    if config.url_file is None:
        return config
    path = os.path.abspath(os.path.join(rundir, config.url_file))
    if not os.path.isdir(os.path.dirname(path)):
        raise ConfigError("url_file", f"{path}: no such directory")
    config = dataclasses.replace(config, url_file=path)
    if not config.password_generated or config.key is not None:
        return config
    try:
        text = read_private_file(path, limit=4096, owners=() if uid is None else (uid,)).decode("utf-8")
        saved = parse_url(text.strip())
        method = lookup_method(saved.method).name
        if method != config.method:
            return _warn(config, f"{path} is for method {method}, not {config.method}: generated a new password")
        check_suite(config.method, saved.password, users=dict(config.users))
    except FileNotFoundError:
        return config
    except (OSError, UnicodeDecodeError, ConfigError) as e:
        reason = (e.strerror or str(e)) if isinstance(e, OSError) else str(e)
        return _warn(config, f"{path} not used ({reason}): generated a new password")
    return dataclasses.replace(config, password=saved.password, password_reused=True)


def _warn(config: ServerConfig, line: str) -> ServerConfig:
    return dataclasses.replace(config, warnings=(*config.warnings, line))


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
    if config.forbidden.host is not None:
        # Reads the addresses at start and after every change (a check made
        # before the first read reads them itself).
        HostAddressWatcher(reactor, config.forbidden.host).setServiceParent(top)
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
    Once the server listens, writes the ss:// URL of its configuration (the
    text users import into clients; it carries the password) to the URL
    file, mode 0600, and logs where clients connect and where the URL is:
    never the password itself, as twistd's log file is readable by others.
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
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if config.url_file is None:
            # Only with a configured password (server_config sees to it).
            _log.info(
                "clients connect to {where} with {method} and the configured password "
                "(no URL file: python -m ssx url prints the ss:// URL)",
                where=where, method=config.method,
            )
            return
        path = os.path.abspath(config.url_file)
        try:
            write_file(path, (url + "\n").encode("utf-8"), 0o600)
        except OSError as e:
            _log.error(
                "cannot write the ss:// URL to {path}: {reason}{lost}",
                path=path,
                reason=e.strerror or str(e),
                lost="; the generated password is lost: restart with -k PASSWORD or a writable --url-file"
                if config.password_generated and not config.password_reused else "",
            )
            return
        about = (
            "clients connect to {where} with {method}; the ss:// URL they import (it carries the password) "
            "is in {path} (replace its host if clients know this machine by another name)"
        )
        if config.password_reused:
            _log.info("no password given: kept the one generated at an earlier start; " + about,
                      where=where, method=config.method, path=path)
        elif config.password_generated:
            _log.warn("no password given: generated one, kept for later starts; " + about,
                      where=where, method=config.method, path=path)
        else:
            _log.info(about, where=where, method=config.method, path=path)


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
