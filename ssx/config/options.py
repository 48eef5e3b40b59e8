"""
What the two commands' options share: `-c config.json`, repeatable
`--listen`, merging flags over the file, and one clear line on a bad value.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.logger import Logger
from twisted.python import usage

from ssx.config.file import merge, read_config_file
from ssx import crypto
from ssx.crypto import METHODS, lookup_method
from ssx.errors import ConfigError
from ssx.net.plugin import find_plugin

__all__ = ["SsxOptions", "check_endpoint", "log_config_notes", "make_suite", "method_help"]


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
        ["config", "c", None, "JSON config file (shadowsocks key names)"],
        ["key", None, None, "master key in URL-safe base64, instead of a password"],
        ["method", "m", None, method_help() + " [default: chacha20-ietf-poly1305]"],
        ["timeout", "t", None, "idle timeout in seconds [default: 300]"],
        ["handshake-timeout", None, None, "seconds a new connection has to complete its handshake "
         "(the Shadowsocks header, or SOCKS5) [default: 30, at most the idle timeout]"],
        ["max-connections", None, None, "most connections at once; more wait in the listen backlog "
         "[default: 0, no limit]"],
        ["shutdown-grace", None, None, "on SIGTERM, seconds running connections get to finish "
         "[default: 10]"],
        ["udp-timeout", None, None, "seconds a UDP association lives without traffic [default: 60]"],
        ["udp-max-associations", None, None, "most UDP associations kept at once; the least recently used "
         "goes first [default: 1024]"],
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
        "acl": "acl",
    }
    flag_keys: Mapping[str, str] = {}
    build: Callable[[Mapping[str, Any]], Any]

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
        try:
            file_values = read_config_file(self["config"]) if self["config"] else {}
            keys = {**self.common_keys, **self.flag_keys}
            flags = {key: self[name] for name, key in keys.items()}
            flags["listen"] = self["listen"]
            if self["udp-only"]:
                flags["mode"] = "udp_only"
            elif self["tcp-and-udp"]:
                flags["mode"] = "tcp_and_udp"
            self.config = type(self).build(merge(file_values, flags))
            self.check(self.config)
        except ConfigError as e:
            # One line naming the key, rather than twistd's full usage text:
            # the command line itself was well-formed.
            raise SystemExit(f"{self.command}: bad configuration: {e}") from None

    def check(self, config: Any) -> None:
        for description in config.listen:
            check_endpoint("listen", description, server=True)
        if config.plugin is not None:
            find_plugin(config.plugin.name)


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
