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
from ssx.listener import listeners
from ssx.local import Socks5LocalFactory
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
        ["server-endpoint", None, None, "Twisted client endpoint to reach the server, instead of -s/-p, "
         "e.g. tcp:host=198.51.100.7:port=8388 or tls:host=example.net:port=443"],
    ]
    flag_keys = {
        "local-address": "local_address",
        "local-port": "local_port",
        "socks-user": "socks_user",
        "socks-password": "socks_password",
        "server-endpoint": "server_endpoint",
    }
    build = staticmethod(local_config)

    def check(self, config: LocalConfig) -> None:
        super().check(config)
        if config.server_endpoint is not None:
            check_endpoint("server_endpoint", config.server_endpoint, server=False)


def server_endpoint(reactor: Any, config: LocalConfig) -> IStreamClientEndpoint:
    """How the local end reaches its server."""
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
    endpoint = server_endpoint(reactor, config)
    connect: Callable[[Protocol], Deferred] = lambda protocol: connect_protocol(endpoint, protocol)
    factory = Socks5LocalFactory(
        reactor, suite, connect, timeout=config.timeout, credentials=config.socks_credentials
    )
    top = listeners(reactor, factory, config.listen, "ssx-local")
    log_config_notes("ssx-local", config.method, config.warnings, config.ignored)
    _log.info(
        "ssx-local: server {server}, method {method}, timeout {timeout:g}s",
        server=config.server_endpoint or f"{config.server}:{config.server_port}",
        method=config.method,
        timeout=config.timeout,
    )
    return top


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return build_service(reactor, options.config)
