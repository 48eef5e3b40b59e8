"""
One server as the local end reaches it.

`Upstream` (an `IUpstream`) holds a configured `ServerEntry`, its cipher
suite with the keys derived once, and the way to connect to it;
`make_upstream` builds one.  The picker (`ssx.local.picker`) ranks them; the
relay (`ssx.local.relay`) and the health check (`ssx.local.health`) connect
through them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    clientFromString,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from ssx.config.options import make_suite
from ssx.config.upstreams import ServerEntry
from ssx.interfaces import ICipherSuite, IUpstream
from ssx.net.plugin import PluginService
from ssx.net.relay import connect_protocol, connect_tcp
from ssx.net.tcp import fast_open_reactor
from ssx.net.transparent import MarkingReactor
from ssx.wire.address import is_ip_literal

__all__ = ["CONNECT_TIMEOUT", "Upstream", "make_upstream", "server_endpoint"]

CONNECT_TIMEOUT = 10.0


@implementer(IUpstream)
@dataclass(eq=False)
class Upstream:
    """One server as the local end reaches it: its entry, keys and way to connect."""

    entry: ServerEntry
    suite: ICipherSuite
    connect: Callable[[Protocol], Deferred]  # IUpstream.connect

    @property
    def label(self) -> str:
        return self.entry.label

    def __repr__(self) -> str:
        return f"<Upstream {self.label}>"


def server_endpoint(reactor: Any, entry: ServerEntry, fast_open: bool = False) -> IStreamClientEndpoint:
    """
    How the local end reaches one server (without a plugin); with
    `fast_open`, a host name's connections use TCP Fast Open (an endpoint
    description is Twisted's to connect, without it).
    """
    if entry.endpoint is not None:
        return clientFromString(reactor, entry.endpoint)
    try:
        version = ipaddress.ip_address(entry.host).version
    except ValueError:
        connecting = fast_open_reactor(reactor) if fast_open else reactor
        return HostnameEndpoint(connecting, entry.host, entry.port, timeout=CONNECT_TIMEOUT)
    # An IP literal needs no name look-up (HostnameEndpoint would ask a thread).
    endpoint_type = TCP6ClientEndpoint if version == 6 else TCP4ClientEndpoint
    return endpoint_type(reactor, entry.host, entry.port, timeout=CONNECT_TIMEOUT)


def make_upstream(
    reactor: Any, entry: ServerEntry, plugin: PluginService | None = None, fast_open: bool = False,
    mark: int | None = None,
) -> Upstream:
    """
    A server ready for connections: its keys derived once, the way to reach
    it built; with a plugin, TCP goes to the plugin's loopback port instead
    (the plugin picks it when it starts, so it is looked up per connection).
    With `fast_open`, a server given by IP address or host name is reached
    with TCP Fast Open (the first write in the SYN); a plugin makes its own
    connections, and an endpoint description is Twisted's to connect, both
    without it.  With `mark`, the connections to the server (not to a
    plugin, which makes its own) carry that firewall mark (SO_MARK), and go
    without Fast Open.
    """
    suite = make_suite(reactor, entry.method, entry.password, entry.key)
    connect: Callable[[Protocol], Deferred]
    if mark is not None and plugin is None:
        reactor, fast_open = MarkingReactor(reactor, mark), False
    if plugin is not None:

        def connect(protocol: Protocol) -> Deferred:
            assert plugin.local_address is not None
            host, port = plugin.local_address
            return connect_tcp(reactor, host, port, protocol, CONNECT_TIMEOUT)

    elif entry.endpoint is None and is_ip_literal(entry.host):
        # The common case, and the fastest path (no endpoint wrappers).
        connect = lambda protocol: connect_tcp(  # noqa: E731
            reactor, entry.host, entry.port, protocol, CONNECT_TIMEOUT, fast_open,
        )
    else:
        endpoint = server_endpoint(reactor, entry, fast_open)
        connect = lambda protocol: connect_protocol(endpoint, protocol)  # noqa: E731
    return Upstream(entry, suite, connect)
