"""
What the two commands' options share: `-c config.json`, repeatable
`--listen`, merging flags over the file, and one clear line on a bad value.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.logger import Logger
from twisted.python import usage

from ssx.config.file import merge, read_config_file
from ssx import crypto
from ssx.crypto import METHODS, lookup_method
from ssx.errors import ConfigError
from ssx.net.plugin import find_plugin

__all__ = ["SsxOptions", "check_endpoint", "check_metrics_library", "log_config_notes", "make_suite", "method_help"]


def method_help() -> str:
    return "encryption method, one of: " + ", ".join(METHODS)


class SsxOptions(usage.Options):
    """
    Options whose values are config.json keys.  `flag_keys` maps each
    option's long name to its key; subclasses set `command` and `build`.
    """

    command = "ssx"
    # usage.Options gathers optParameters from every class in the hierarchy:
    # these are the ones both commands have.
    optParameters = [
        ["config", "c", None, "JSON config file (shadowsocks key names), or YAML (.yml/.yaml, or text that is not JSON)"],
        ["key", None, None, "master key in URL-safe base64, instead of a password"],
        ["method", "m", None, method_help() + " [default: chacha20-ietf-poly1305]"],
        ["timeout", "t", None, "idle timeout in seconds [default: 300]"],
        ["handshake-timeout", None, None, "seconds a new connection has to complete its handshake "
         "(the Shadowsocks header, or SOCKS5) [default: 30, at most the idle timeout]"],
        ["max-connections", None, None, "most connections at once; more wait in the listen backlog "
         "[default: 0, no limit]"],
        ["shutdown-grace", None, None, "on SIGTERM, seconds running connections get to finish; at a reload "
         "(SIGHUP), those of a removed port, listener or key [default: 10]"],
        ["udp-timeout", None, None, "seconds a UDP association lives without traffic [default: 60]"],
        ["udp-max-associations", None, None, "most UDP associations kept at once; the least recently used "
         "goes first [default: 1024]"],
        ["metrics", None, None, "serve Prometheus metrics at /metrics on this Twisted endpoint, e.g. "
         "tcp:9090:interface=127.0.0.1, or PORT (on 127.0.0.1) or IP:PORT; keep it off public addresses "
         "[default: none]"],
        ["workers", None, None, "processes serving every port, TCP and UDP (key workers); above 1, this process "
         "supervises them (restarts, signals, totals); 0 or auto: one per core [default: 1, this process alone]"],
        ["acl", None, None, "ACL file (shadowsocks-libev/rust format): on ssx-local, which targets go through the "
         "server ([proxy_list]) and which directly ([bypass_list]); on ssx-server, which clients are served "
         "([black_list]/[white_list]) and which destinations refused ([outbound_block_list]); reread on SIGHUP"],
    ]
    optFlags = [
        ["tcp-and-udp", "u", "relay UDP as well as TCP (mode tcp_and_udp)"],
        ["udp-only", "U", "relay UDP only (mode udp_only)"],
        ["verbose", "v", "a log line (debug level) for each failure a peer causes: failed handshakes, refused "
         "or unreachable targets, broken relays, destinations named; by default the server counts them in a "
         "summary every 10 minutes and no line names a destination"],
        # Accepted so that shadowsocks-libev command lines work unchanged.
        ["no-delay", None, "accepted for compatibility: TCP_NODELAY is always on"],
        ["reuse-port", None, "SO_REUSEPORT on the listening sockets (key reuse_port), so several processes "
         "(another ssx, a libev ss-server) bind one port and the kernel spreads connections between them"],
        ["fast-open", None, "TCP Fast Open (key fast_open): the server takes data in SYNs, the local end sends its "
         "first bytes in the SYN; needs net.ipv4.tcp_fastopen to allow it (see README)"],
    ]
    # Each command declares --plugin and --plugin-opts itself, with its side's help.
    common_keys: Mapping[str, str] = {
        "server": "server",
        "server-port": "server_port",
        "password": "password",
        "key": "key",
        "method": "method",
        "timeout": "timeout",
        "handshake-timeout": "handshake_timeout",
        "max-connections": "max_connections",
        "shutdown-grace": "shutdown_grace",
        "udp-timeout": "udp_timeout",
        "udp-max-associations": "udp_max_associations",
        "plugin": "plugin",
        "plugin-opts": "plugin_opts",
        "verbose": "verbose",
        "fast-open": "fast_open",
        "metrics": "metrics",
        "workers": "workers",
        "reuse-port": "reuse_port",
        "acl": "acl",
    }
    flag_keys: Mapping[str, str] = {}
    build: Callable[[Mapping[str, Any]], Any]
    # Values over both the file's and the flags' (what a `--workers`
    # supervisor settled for its workers: the password it generated).
    overrides: Mapping[str, Any] = {}
    # The command line and the directory it was read in, for the workers.
    argv: list[str] = []
    cwd: str = "."

    def parseOptions(self, options: Any = None) -> None:
        import os
        import sys

        self.argv = list(sys.argv[1:] if options is None else options)
        self.cwd = os.getcwd()
        super().parseOptions(options)

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = None

    def opt_listen(self, description: str) -> None:
        """Twisted endpoint description to listen on (repeatable), e.g. tcp:8388:interface=\\:\\: or ssl:8443:privateKey=key.pem:certKey=cert.pem or unix:/run/ssx.sock; replaces the address/port options."""
        if self["listen"] is None:
            self["listen"] = []
        self["listen"].append(description)

    def opt_version(self) -> None:
        """Print the ssx version and exit."""
        from ssx import __version__

        print(f"{self.command} (ssx) {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        # A switch not given must not override the file's value.
        self["verbose"] = True if self["verbose"] else None
        self["fast-open"] = True if self["fast-open"] else None
        self["reuse-port"] = True if self["reuse-port"] else None
        # A reload reads the same file from twistd's --rundir.
        self.config_path = os.path.abspath(self["config"]) if self["config"] else None
        try:
            self.config = self.load_config()
        except ConfigError as e:
            # One line naming the key, rather than twistd's full usage text:
            # the command line itself was well-formed.
            raise SystemExit(self.config_error(e)) from None

    def load_config(self) -> Any:
        """
        The configuration: the file (-c) read now, the command line given
        at start over it, checked; a bad one raises `ConfigError`.  A
        reload (SIGHUP) calls it again.
        """
        file_values = read_config_file(self.config_path) if self.config_path else {}
        keys = {**self.common_keys, **self.flag_keys}
        flags = {key: self[name] for name, key in keys.items()}
        flags["listen"] = self["listen"]
        if self["udp-only"]:
            flags["mode"] = "udp_only"
        elif self["tcp-and-udp"]:
            flags["mode"] = "tcp_and_udp"
        return self.check(type(self).build({**merge(file_values, flags), **self.overrides}))

    def config_error(self, error: ConfigError) -> str:
        """The one line a bad configuration is refused with, at start and at a reload."""
        return f"{self.command}: bad configuration: {error}"

    def check(self, config: Any) -> Any:
        """What is checked beyond the values (endpoints, plugins on PATH): `config`, or the one made of it."""
        for description in config.listen:
            check_endpoint("listen", description, server=True)
        if config.metrics is not None:
            check_endpoint("metrics", config.metrics, server=True)
            check_metrics_library()
        if config.plugin is not None:
            find_plugin(config.plugin.name)
        return config


def check_endpoint(key: str, description: str, server: bool) -> None:
    """Parse an endpoint description now, so a bad one stops start-up."""
    parse = serverFromString if server else clientFromString
    try:
        parse(None, description)
    except IndexError:
        # The systemd parser indexes the sockets it inherited.
        raise ConfigError(key, f"{description!r}: no socket at that index was passed by systemd") from None
    except Exception as e:  # the parsers raise ValueError, KeyError, TypeError, OSError...
        hint = ""
        if "trustRoots=" in description and type(e).__module__.startswith("OpenSSL"):
            # Twisted loads every *.pem file in the directory as a certificate.
            hint = " (every .pem file in the trustRoots directory must be a certificate: keep keys elsewhere)"
        raise ConfigError(key, f"bad endpoint description {description!r}: {e}{hint}") from None


def check_metrics_library() -> None:
    """Metrics need prometheus-client: without it, one line naming the key stops start-up."""
    # Found, not imported: its Twisted resource imports the reactor, which
    # twistd has not installed yet while it reads the options.
    import importlib.util

    if importlib.util.find_spec("prometheus_client") is None:
        raise ConfigError("metrics", "needs the prometheus-client library (pip install prometheus-client)")


def make_suite(reactor: Any, method: str, password: str, key: bytes | None, users: Any = ()) -> Any:
    """The suite for the services: 2022 headers stamped and checked on the reactor's clock."""
    return crypto.make_suite(method, password, key=key, users=dict(users), now=reactor.seconds)


_log = Logger()


def log_config_notes(label: str, method: str, warnings: tuple[str, ...], ignored: tuple[str, ...]) -> None:
    """Warn about an insecure method and settings not (yet) acted on."""
    if lookup_method(method).insecure:
        _log.warn(
            "method {method} has no integrity protection and is insecure: use it only to reach "
            "old servers; prefer an AEAD method such as chacha20-ietf-poly1305",
            method=method,
        )
    for line in warnings:
        _log.warn(line)
    if ignored:
        # A warning: a key ssx does not know is often a misspelt one that the user meant to take effect.
        _log.warn("config keys not used by {label}: {keys}", label=label, keys=", ".join(ignored))
