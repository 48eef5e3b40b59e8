"""
The local end's configuration: `local_config` checks the merged keys
(`ssx.config.file`) and returns one frozen `LocalConfig`, with the parts
only the local end has: the servers it may use and where they come from
(`ssx.config.upstreams`), tunnels, the SOCKS credentials, the SIP008
online config, the health check and the local DNS server.  `ssx.local.tap` builds the service
tree from it.  No Twisted here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple

from ssx.config.known_keys import LOCAL_PEER_KEYS, no_method_warning, peer_key_notes
from ssx.config.nameservers import parse_nameservers
from ssx.config.metrics import METRICS_KEYS, read_metrics
from ssx.numbers import parse_number, parse_port, parse_seconds
from ssx.config.upstreams import ServerEntry, server_list, url_entries
from ssx.config.values import (
    COMMON_KEYS,
    DEFAULT_SERVER_PORT,
    Limits,
    RelayModes,
    read_limits,
    read_bool,
    read_listen,
    read_method,
    read_plugin,
    read_port,
    read_relay_modes,
    read_seconds,
    read_secret,
    read_string,
    read_verbose,
    read_workers,
    is_plain_tcp,
    read_acl,
    tcp_description,
)
from ssx.acl import Acl
from ssx.crypto import make_suite
from ssx.errors import ConfigError
from ssx.wire.address import Address, is_ip_literal
from ssx.wire.http_message import HttpError, absolute_target
from ssx.wire.sip003 import Plugin

__all__ = [
    "DEFAULT_CHECK_URL",
    "DEFAULT_DNS_REMOTE",
    "DnsServer",
    "HealthCheck",
    "LOCAL_KEYS",
    "LocalConfig",
    "OnlineConfig",
    "TransparentPort",
    "Tunnel",
    "local_config",
]

DEFAULT_LOCAL_PORT = 1080
# What the health check fetches through each server (as shadowsocks-rust and
# Clash do): small, fast and answered everywhere.
DEFAULT_CHECK_URL = "http://www.gstatic.com/generate_204"
DEFAULT_CHECK_INTERVAL = 60.0
DEFAULT_ONLINE_INTERVAL = 3600.0

LOCAL_KEYS = COMMON_KEYS | {
    "local_address", "local_port", "server_endpoint", "socks_user", "socks_password", "tunnel_address", "tunnels",
    "servers", "shadowsocks", "url", "online_config", "online_config_interval", "online_config_ca",
    "health_check_interval", "health_check_url", "dns_listen", "dns_local", "dns_remote",
    "health_check_interval", "health_check_url", "acl_resolve",
    # The original's tunnel (its tunnel.py), read into `tunnels`.
    "tunnel_remote", "tunnel_remote_port", "tunnel_port",
    # Transparent proxying: ssx's keys, and shadowsocks-rust's `locals`
    # entries with "protocol": "redir".
    "redir", "tproxy", "locals", "outbound_fwmark",
} | METRICS_KEYS
# How each transparent TCP port learns a connection's destination.
TCP_REDIR_MODES = ("redirect", "tproxy")
# The largest SO_MARK (an unsigned 32-bit value).
MAX_MARK = 2**32 - 1
# The original's defaults for its tunnel's target.
ORIGINAL_TUNNEL_TARGET = ("8.8.8.8", 53)


@dataclass(frozen=True)
class Tunnel:
    """A local port forwarded through the server to a fixed target."""

    listen: str
    target: Address
    # Where a UDP-only tunnel binds (TCP tunnels put UDP beside `listen`).
    address: tuple[str, int] | None = None


@dataclass(frozen=True)
class TransparentPort:
    """
    A port the firewall diverts a LAN's traffic to: TCP by NAT redirect
    ("redirect") or TPROXY ("tproxy"), or no TCP (None); UDP (always by
    TPROXY) or not.
    """

    host: str
    port: int
    tcp: str | None
    udp: bool

    @property
    def label(self) -> str:
        return "ssx-local redir" if self.tcp == "redirect" else "ssx-local tproxy"


@dataclass(frozen=True)
class HealthCheck:
    """
    The local end's check of its servers: every `interval` seconds (0: never)
    `request` is sent through each server to `target`, and the time to the
    first byte of the answer is the server's latency.
    """

    interval: float
    target: Address
    request: bytes
    timeout: float


@dataclass(frozen=True)
class OnlineConfig:
    """Where a SIP008 server list is fetched from, how often, and which CAs to trust (None: the system's)."""

    url: str = field(repr=False)  # SIP008 URLs carry a secret
    interval: float
    ca_file: str | None = None


# Where proxied DNS queries go when dns_remote is not set (as
# shadowsocks-rust and the tunnels' usual target).
DEFAULT_DNS_REMOTE = ("8.8.8.8", 53)


@dataclass(frozen=True)
class DnsServer:
    """
    The local DNS server: where it listens (UDP and TCP), the resolvers it
    asks for names sent direct (empty: the system's, from resolv.conf) and
    the resolver it asks through the proxy for the others.
    """

    listen: tuple[str, int]
    local: tuple[tuple[str, int], ...]
    remote: tuple[str, int]


@dataclass(frozen=True)
class LocalConfig:
    """Everything `ssx-local` needs to start."""

    listen: tuple[str, ...]
    server: str | None
    server_port: int
    server_endpoint: str | None
    method: str
    password: str = field(repr=False)
    key: bytes | None = field(repr=False)
    timeout: float
    socks_credentials: tuple[bytes, bytes] | None = field(repr=False)
    relays: RelayModes
    limits: Limits
    # The main listener offers SOCKS5, unless -L/tunnel_address makes it a tunnel.
    tunnels: tuple[Tunnel, ...] = ()
    # Per server, in the order of `servers`: its SIP003 plugin or None.  With
    # a plugin, TCP goes to the plugin's loopback port; it reaches the server.
    plugins: tuple[Plugin | None, ...] = ()
    ignored: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    # Every server known at start, in order: -s/-p (or each of a "server"
    # list), then the servers list, then the ss:// URLs.
    servers: tuple[ServerEntry, ...] = ()
    online: OnlineConfig | None = None
    health_check: HealthCheck | None = None
    # A log line for every connection's failure, its destination included.
    verbose: bool = False
    # TCP Fast Open to the servers: the first write (salt, header, first
    # bytes) in the SYN.
    fast_open: bool = False
    # The local DNS server (--dns-listen), or None.
    dns: DnsServer | None = None
    # The endpoint description /metrics is served on (None: no metrics).
    metrics: str | None = None
    # The ports for transparent proxying (--redir, --tproxy, rust's redir locals).
    transparent: tuple[TransparentPort, ...] = ()
    # SO_MARK on the connections and datagrams to the servers (None: unmarked).
    outbound_fwmark: int | None = None
    # Processes serving the ports (1: this one, no supervisor), and
    # SO_REUSEPORT on the listening sockets (so several processes bind one port).
    workers: int = 1
    reuse_port: bool = False
    # The ACL file (`acl`): which targets go through a server and which
    # ssx-local reaches itself; with `acl_resolve`, a name no name rule
    # matches is resolved here and its addresses matched.
    acl: Acl | None = None
    acl_path: str | None = None
    acl_resolve: bool = False

    @property
    def plugin(self) -> Plugin | None:
        """The first server's plugin that has one (with one server: its plugin)."""
        return next((plugin for plugin in self.plugins if plugin is not None), None)


def local_config(values: Mapping[str, Any]) -> LocalConfig:
    """Check the merged local settings."""
    method = read_method(values)
    given = _given_server(values, method)
    servers = [*given.entries, *server_list(values), *url_entries(values)]
    online = _online_config(values)
    if not servers and online is None:
        raise ConfigError(
            "server", "required: the server's address (-s HOST), an ss:// URL (--url), a servers list or --online-config"
        )
    listen = read_listen(values)
    address = read_string(values, "local_address", "127.0.0.1")
    if not listen:
        listen = (tcp_description(address, read_port(values, "local_port", DEFAULT_LOCAL_PORT, allow_zero=True)),)
    relays = read_relay_modes(values)
    transparent_ports, locals_notes = _transparent_ports(values, relays)
    _check_servers(servers, relays)
    if any(port.udp for port in transparent_ports) and not relays.udp:
        _check_servers(servers, RelayModes(relays.tcp, True, relays.timeout, relays.capacity))
    plugins, warnings = _local_plugins(values, relays, servers, given)
    tunnels = _tunnel_address(values, listen, address, relays)
    socks_listen = () if tunnels else listen
    tunnels += _tunnel_list(values, address)
    original_tunnel, note = _original_tunnel(values, address)
    tunnels += original_tunnel
    warnings += note + locals_notes
    if "method" not in values and given.entries:
        warnings += (no_method_warning(method),)
    peer_warnings, ignored = peer_key_notes(values, LOCAL_KEYS, LOCAL_PEER_KEYS)
    warnings += peer_warnings
    credentials = _socks_credentials(values)
    if read_bool(values, "acl_resolve") and values.get("acl") is None:
        warnings += ("acl_resolve without acl: no ACL to resolve names for; ignored",)
    return LocalConfig(
        listen=socks_listen,
        server=given.host,
        server_port=given.port,
        server_endpoint=given.endpoint,
        method=method,
        password=given.password,
        key=given.key,
        timeout=read_seconds(values),
        socks_credentials=credentials,
        relays=relays,
        limits=read_limits(values),
        tunnels=tuple(tunnels),
        plugins=plugins,
        ignored=ignored,
        warnings=warnings,
        servers=tuple(servers),
        online=online,
        health_check=_health_check(values),
        verbose=read_verbose(values),
        fast_open=read_bool(values, "fast_open"),
        dns=_dns_server(values),
        metrics=read_metrics(values),
        transparent=transparent_ports,
        outbound_fwmark=_outbound_fwmark(values),
        workers=_workers(values, socks_listen, tunnels, relays),
        reuse_port=read_bool(values, "reuse_port"),
        acl=read_acl(values),
        acl_path=values.get("acl"),
        acl_resolve=read_bool(values, "acl_resolve"),
    )


def _workers(values: Mapping[str, Any], listen: tuple[str, ...], tunnels: list[Tunnel], relays: RelayModes) -> int:
    """`workers`, refused where the processes cannot share the listeners."""
    workers = read_workers(values)
    if workers > 1:
        if relays.udp and listen:
            # The datagrams of an association may reach another worker than its TCP connection.
            raise ConfigError("workers", "not with SOCKS5 UDP (mode tcp_and_udp or udp_only on a SOCKS port): "
                                         "an association's datagrams must reach the process holding its connection")
        for description in (*listen, *(tunnel.listen for tunnel in tunnels if relays.tcp)):
            if not is_plain_tcp(description):
                raise ConfigError("workers", f"listeners must be plain TCP (tcp:, tcp6: or an address), "
                                             f"not {description!r}")
    return workers


class _GivenServer(NamedTuple):
    """The server the top-level keys name: -s/-p/-k or --server-endpoint."""

    host: str | None  # the first of a list of hosts
    port: int
    endpoint: str | None
    password: str
    key: bytes | None
    entries: list[ServerEntry]  # one per host, or the endpoint's


def _given_server(values: Mapping[str, Any], method: str) -> _GivenServer:
    endpoint = values.get("server_endpoint")
    if endpoint is not None and (not isinstance(endpoint, str) or not endpoint):
        raise ConfigError("server_endpoint", "expected a Twisted client endpoint description, e.g. tcp:host=1.2.3.4:port=8388")
    raw_server = values.get("server")
    hosts = raw_server if isinstance(raw_server, list) else [] if raw_server is None else [raw_server]
    if not all(isinstance(h, str) and h for h in hosts):
        raise ConfigError("server", "expected the server's host name or IP address")
    server = hosts[0] if hosts else None
    entries: list[ServerEntry] = []
    password, key = "", None
    server_port = read_port(values, "server_port", DEFAULT_SERVER_PORT, allow_zero=False)
    if hosts or endpoint is not None:
        password, key, _ = read_secret(values, method, required=True)
        if endpoint is not None:
            entries.append(ServerEntry(server or "", server_port, method, password, key, endpoint=endpoint))
        else:
            entries += [ServerEntry(host, server_port, method, password, key) for host in hosts]
    return _GivenServer(server, server_port, endpoint, password, key, entries)


def _check_servers(servers: list[ServerEntry], relays: RelayModes) -> None:
    for entry in servers:
        # Keys checked now (2022 PSK lengths and form), so a bad one stops start-up.
        make_suite(entry.method, entry.password, key=entry.key)
    if relays.udp and (not servers or not servers[0].host):
        raise ConfigError(
            "server", "the UDP relay needs the first server's address (-s HOST, a servers list or --url), "
            "not only --server-endpoint or --online-config"
        )


def _local_plugins(
    values: Mapping[str, Any], relays: RelayModes, servers: list[ServerEntry], given: _GivenServer
) -> tuple[tuple[Plugin | None, ...], tuple[str, ...]]:
    """
    Each server's plugin (None: TCP goes straight to it), and warnings.  The
    top-level plugin keys belong to the server the top-level keys name (-s),
    or to a lone server from a URL or a servers entry; any other server
    may name its own (its entry's plugin/plugin_opts, or its URL's ?plugin=).
    """
    top, warnings = read_plugin(values, relays)
    if top is not None and given.endpoint is not None:
        raise ConfigError(
            "plugin", "a plugin connects to the server itself: give the server with -s/-p, not --server-endpoint"
        )
    lone = len(servers) == 1
    if top is not None and not given.entries and not lone:
        raise ConfigError(
            "plugin", "with several servers, name each server's plugin in its servers entry (plugin, plugin_opts) "
            "or in its ss:// URL (?plugin=)"
        )
    plugins: list[Plugin | None] = []
    for i, entry in enumerate(servers):
        plugin = None
        if top is not None and (i < len(given.entries) or lone):
            plugin = top
        elif entry.plugin:
            try:
                plugin, more = read_plugin({"plugin": entry.plugin, "plugin_opts": entry.plugin_opts or None}, relays)
            except ConfigError as e:
                raise ConfigError(e.key, f"server {entry.label}: {e.message}") from None
            warnings += more
        plugins.append(plugin)
    return tuple(plugins), warnings


def _tunnel_address(
    values: Mapping[str, Any], listen: tuple[str, ...], address: str, relays: RelayModes
) -> list[Tunnel]:
    """-L/tunnel_address: the main listeners forward to one target instead of offering SOCKS5."""
    if not values.get("tunnel_address"):
        return []
    target = _target(values["tunnel_address"], "tunnel_address")
    if values.get("listen") is None:
        local_port = read_port(values, "local_port", DEFAULT_LOCAL_PORT, allow_zero=True)
        return [Tunnel(listen[0], target, (address, local_port))]
    if not relays.tcp:
        raise ConfigError("listen", "endpoint descriptions are for TCP; a udp_only tunnel uses local_address and local_port")
    return [Tunnel(description, target) for description in listen]


def _tunnel_list(values: Mapping[str, Any], address: str) -> list[Tunnel]:
    """`tunnels`: further ports, each forwarded to its own target."""
    raw = values.get("tunnels") or []
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise ConfigError("tunnels", "expected a list of [ADDRESS:]PORT=HOST:PORT")
    return [_tunnel(item, address) for item in raw]


def _original_tunnel(values: Mapping[str, Any], address: str) -> tuple[list[Tunnel], tuple[str, ...]]:
    """
    The original's tunnel_port, tunnel_remote and tunnel_remote_port: one
    more port forwarded to tunnel_remote:tunnel_remote_port (8.8.8.8:53 by
    default), as `tunnels` would.  Only tunnel_port opens it: the original's
    default port (53) needs root, and its shared config.json often carries
    the keys for a tunnel that was never started.
    """
    given = [k for k in ("tunnel_remote", "tunnel_remote_port") if values.get(k) is not None]
    if values.get("tunnel_port") is None:
        if not given:
            return [], ()
        return [], (f"config key {' and '.join(given)}: no tunnel opened without tunnel_port "
                    "(the original's default port, 53, is not assumed); set tunnel_port to open it",)
    port = parse_port(values["tunnel_port"], "tunnel_port", allow_zero=True)
    host = values.get("tunnel_remote", ORIGINAL_TUNNEL_TARGET[0])
    if not isinstance(host, str) or not host:
        raise ConfigError("tunnel_remote", "expected the tunnel's target host")
    remote_port = parse_port(values.get("tunnel_remote_port", ORIGINAL_TUNNEL_TARGET[1]), "tunnel_remote_port")
    return [Tunnel(tcp_description(address, port), Address(host, remote_port), (address, port))], ()


def _socks_credentials(values: Mapping[str, Any]) -> tuple[bytes, bytes] | None:
    """socks_user and socks_password (RFC 1929), both or neither."""
    user = values.get("socks_user")
    secret = values.get("socks_password")
    if user is None and secret is None:
        return None
    return _credential("socks_user", user), _credential("socks_password", secret)


def _credential(key: str, value: Any) -> bytes:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, "socks_user and socks_password must be set together, non-empty")
    encoded = value.encode()
    if len(encoded) > 255:
        raise ConfigError(key, "at most 255 bytes (RFC 1929)")
    return encoded


def _online_config(values: Mapping[str, Any]) -> OnlineConfig | None:
    """--online-config URL, or rust's {"config_url": ..., "update_interval": ...}."""
    raw = values.get("online_config")
    interval = values.get("online_config_interval")
    if raw is None:
        if interval is not None:
            read_seconds(values, "online_config_interval")  # a bad value is an error even where unused
        return None
    if isinstance(raw, Mapping):
        if interval is None:
            interval = raw.get("update_interval")
        raw = raw.get("config_url")
    if not isinstance(raw, str) or not raw.lower().startswith("https://") or len(raw) <= len("https://"):
        raise ConfigError("online_config", "expected an https:// URL (SIP008 lists are fetched over TLS only)")
    _url_port(raw, "online_config")
    ca_file = values.get("online_config_ca")
    if ca_file is not None and (not isinstance(ca_file, str) or not ca_file):
        raise ConfigError("online_config_ca", "expected the path of a PEM file of CA certificates")
    seconds = read_seconds({"online_config_interval": DEFAULT_ONLINE_INTERVAL if interval is None else interval}, "online_config_interval")
    return OnlineConfig(raw, seconds, ca_file)


def _health_check(values: Mapping[str, Any]) -> HealthCheck:
    interval = parse_seconds(
        values.get("health_check_interval", DEFAULT_CHECK_INTERVAL), "health_check_interval", allow_zero=True,
        meaning_of_zero=" (0 turns the check off)",
    )
    url = values.get("health_check_url", DEFAULT_CHECK_URL)
    if not isinstance(url, str):
        raise ConfigError("health_check_url", "expected an http:// URL")
    _url_port(url, "health_check_url")
    try:
        host, port, path = absolute_target(url)
    except HttpError as e:
        raise ConfigError("health_check_url", f"expected an http:// URL: {e}") from None
    authority = (f"[{host}]" if ":" in host else host) + ("" if port == 80 else f":{port}")
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: ssx-health-check\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")
    # A check slower than this counts as failed.
    timeout = min(10.0, max(interval, 1.0))
    return HealthCheck(interval, Address(host, port), request, timeout)


def _dns_server(values: Mapping[str, Any]) -> DnsServer | None:
    """The local DNS server's settings, if dns_listen is set (dns_local and dns_remote alone are an error)."""
    listen = values.get("dns_listen")
    if listen is None:
        for key in ("dns_local", "dns_remote"):
            if values.get(key) is not None:
                raise ConfigError(key, "set without dns_listen (--dns-listen ADDR:PORT), which starts the DNS server")
        return None
    if not isinstance(listen, str) or not listen.strip():
        raise ConfigError("dns_listen", "expected ADDR:PORT, e.g. 127.0.0.1:5353 or [::1]:53")
    address = _ip_and_port(listen.strip(), "dns_listen")
    local = parse_nameservers(values.get("dns_local"), "dns_local")
    if values.get("dns_local") is not None and not local:
        raise ConfigError("dns_local", "expected IP[:PORT] of one or more resolvers, comma-separated")
    remote = DEFAULT_DNS_REMOTE
    if values.get("dns_remote") is not None:
        given = parse_nameservers(values.get("dns_remote"), "dns_remote")
        if len(given) != 1:
            raise ConfigError("dns_remote", "expected one resolver's IP[:PORT], e.g. 8.8.8.8:53 or [2001:4860:4860::8888]:53")
        remote = given[0]
    return DnsServer(address, local, remote)


def _ip_and_port(text: str, key: str) -> tuple[str, int]:
    """`IP:PORT` or `[IPv6]:PORT` (port 0: any free one)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            port_text = None
    if port_text is None:
        raise ConfigError(key, f"expected ADDR:PORT or [IPv6]:PORT, not {text!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(key, f"{host!r} is not an IP address") from None
    return host, parse_port(port_text, key, allow_zero=True)


def _url_port(url: str, key: str) -> None:
    """Check the port of an http(s) URL, if it names one (the URL itself may hold a secret: not quoted)."""
    authority = url.partition("://")[2]
    for end in "/?#":
        authority = authority.partition(end)[0]
    authority = authority.rpartition("@")[2]
    if authority.startswith("["):
        after = authority.partition("]")[2]
        port = after[1:] if after.startswith(":") else ""
    else:
        port = authority.rpartition(":")[2] if ":" in authority else ""
    if port:
        parse_number(port, key, "a URL whose port is a number from 1 to 65535", minimum=1, maximum=65535, show=False)


def _target(text: Any, key: str) -> Address:
    """HOST:PORT or [IPv6]:PORT."""
    if not isinstance(text, str):
        raise ConfigError(key, "expected HOST:PORT")
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host:
        raise ConfigError(key, f"expected HOST:PORT, not {text!r}")
    return Address(host, parse_port(port, key))


def _tunnel(text: Any, default_address: str) -> Tunnel:
    """[ADDRESS:]PORT=HOST:PORT, e.g. 5353=8.8.8.8:53."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError("tunnels", f"expected [ADDRESS:]PORT=HOST:PORT, not {text!r}")
    local, _, target = text.partition("=")
    address, sep, port = local.rpartition(":")
    if not sep:
        address = default_address
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    if not address:
        raise ConfigError("tunnels", f"no local address in {text!r}")
    number = parse_port(port, "tunnels", allow_zero=True)
    return Tunnel(tcp_description(address, number), _target(target, "tunnels"), (address, number))


def _transparent_ports(values: Mapping[str, Any], relays: RelayModes) -> tuple[tuple[TransparentPort, ...], tuple[str, ...]]:
    """
    --redir and --tproxy ([ADDRESS:]PORT, each a string or a list), then
    rust's `locals` entries with "protocol": "redir"; and a warning for each
    `locals` entry of another protocol (ssx reads only those).  `mode`
    says which relays run: TCP as the option says, UDP always by TPROXY
    (as ss-redir -u and rust's udp_redir do).
    """
    ports: list[TransparentPort] = []
    for key in ("redir", "tproxy"):
        raw = values.get(key)
        if raw is None:
            continue
        items = [raw] if isinstance(raw, (str, int)) else raw
        if not isinstance(items, list) or not items:
            raise ConfigError(key, "expected [ADDRESS:]PORT, or a list of them")
        tcp = ("redirect" if key == "redir" else "tproxy") if relays.tcp else None
        for item in items:
            for host, port in _transparent_address(item, key):
                ports.append(TransparentPort(host, port, tcp, relays.udp))
    notes: list[str] = []
    raw_locals = values.get("locals")
    if raw_locals is not None:
        if not isinstance(raw_locals, list) or not all(isinstance(entry, Mapping) for entry in raw_locals):
            raise ConfigError("locals", "expected a list of objects")
        for i, entry in enumerate(raw_locals):
            protocol = entry.get("protocol", "socks")
            if entry.get("disabled") is True:
                continue
            if protocol != "redir":
                notes.append(f"config key locals[{i}]: protocol {protocol!r} is not read from locals "
                             "(only \"redir\"); use the top-level keys or --listen/--tunnel; ignored")
                continue
            ports.append(_redir_local(entry, i, relays))
    return tuple(ports), tuple(notes)


def _transparent_address(item: Any, key: str) -> list[tuple[str, int]]:
    """ADDRESS:PORT or [IPv6]:PORT; a PORT alone is both wildcards, 0.0.0.0 and ::."""
    text = str(item) if isinstance(item, int) and not isinstance(item, bool) else item
    if not isinstance(text, str) or not text:
        raise ConfigError(key, "expected [ADDRESS:]PORT, e.g. 0.0.0.0:12345 or [::]:12345")
    host, sep, port = text.rpartition(":")
    if not sep:
        number = parse_port(text, key)
        return [("0.0.0.0", number), ("::", number)]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not is_ip_literal(host):
        raise ConfigError(key, f"expected an IP address before the port, not {host!r}")
    return [(host, parse_port(port, key))]


def _redir_local(entry: Mapping[str, Any], i: int, relays: RelayModes) -> TransparentPort:
    """One of rust's `locals` entries with "protocol": "redir"."""
    key = f"locals[{i}]"
    host = entry.get("local_address", "0.0.0.0")
    if not isinstance(host, str) or not is_ip_literal(host):
        raise ConfigError(f"{key}.local_address", "expected an IP address")
    port = parse_port(entry.get("local_port"), f"{key}.local_port")
    modes = read_relay_modes(entry) if "mode" in entry else relays
    tcp_redir = entry.get("tcp_redir", "redirect")
    if tcp_redir not in TCP_REDIR_MODES:
        raise ConfigError(f"{key}.tcp_redir", "expected \"redirect\" or \"tproxy\" (ssx runs on Linux only)")
    udp_redir = entry.get("udp_redir", "tproxy")
    if udp_redir != "tproxy":
        raise ConfigError(f"{key}.udp_redir", "expected \"tproxy\" (the only way to divert UDP on Linux)")
    return TransparentPort(host, port, tcp_redir if modes.tcp else None, modes.udp)


def _outbound_fwmark(values: Mapping[str, Any]) -> int | None:
    """outbound_fwmark: SO_MARK for the connections to the servers (rust's key), 1 to 2^32-1."""
    raw = values.get("outbound_fwmark")
    if raw is None:
        return None
    if isinstance(raw, str) and raw.lower().startswith("0x"):
        try:
            raw = int(raw, 16)
        except ValueError:
            raise ConfigError("outbound_fwmark", "expected a firewall mark, a number from 1 to 4294967295") from None
    return int(parse_number(raw, "outbound_fwmark", "a firewall mark, a number from 1 to 4294967295",
                            minimum=1, maximum=MAX_MARK))
