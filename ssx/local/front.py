"""
The mixed port of the local end: SOCKS5, SOCKS4/4a and HTTP on one listener.

Data path: `ProxySniffer` reads an application's first byte — 0x05 is a
SOCKS5 greeting, 0x04 a SOCKS4 request, an ASCII letter the method of an
HTTP request — and hands the connection to the protocol for it
(`Socks5LocalProtocol`, `Socks4LocalProtocol` in `ssx.local.socks`,
`HttpProxyProtocol` in `ssx.local.http`).  Each is a `LocalRelayProtocol`
(`ssx.local.relay`), so the Shadowsocks side (server choice and failover,
first-write coalescing, backpressure) is the same whatever the application
spoke.  One credential setting serves SOCKS5
username/password and HTTP Basic proxy authentication; SOCKS4 has no
password and is refused while credentials are required.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ssx.local.relay import LocalRelayProtocol
from ssx.local.socks import ProxyPortFactory, Socks4LocalProtocol, Socks5LocalProtocol
from ssx.local.http import HttpProxyProtocol

__all__ = ["MixedLocalFactory", "ProxySniffer"]

_log = Logger()


def _is_http_method_start(byte: int) -> bool:
    return 0x41 <= byte <= 0x5A or 0x61 <= byte <= 0x7A


@implementer(IHalfCloseableProtocol)
class ProxySniffer(Protocol):
    """
    Waits for an application's first byte and passes the connection to the
    protocol that speaks what it sent; closes it if that is nothing known, or
    if nothing comes within the idle timeout.
    """

    # The accepted connection's: TCP (`ssx.net.tcp`), TLS or a Unix socket.
    transport: Any

    def __init__(self, factory: "MixedLocalFactory") -> None:
        self.factory = factory
        self.handler: LocalRelayProtocol | None = None
        self.idle_limit: float | None = None
        self.last_activity = 0.0

    def connectionMade(self) -> None:
        # Counted from accept, so connections that have not spoken yet are
        # bound by the connection limit and seen by a graceful shutdown,
        # and timed out by the factory's sweep.
        self.idle_limit = self.factory.handshake_timeout
        self.last_activity = self.factory.reactor.seconds()
        self.factory.connection_opened(self)

    def timeoutConnection(self) -> None:
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.handler is not None:
            self.handler.dataReceived(data)
            return
        first = data[0]
        handler: LocalRelayProtocol
        # In udp_only mode the port is only for SOCKS5 UDP ASSOCIATE.
        tcp = self.factory.tcp  # as CMD_CONNECT in its `commands`, without building them
        if first == 5:
            handler, front = Socks5LocalProtocol(self.factory), "socks5"
        elif first == 4 and tcp:
            handler, front = Socks4LocalProtocol(self.factory), "socks4"
        elif _is_http_method_start(first) and tcp:
            handler, front = HttpProxyProtocol(self.factory), "http"
        else:
            if self.factory.verbose:
                _log.debug("closing a connection that speaks no known proxy protocol (first byte {byte:#04x})", byte=first)
            self.transport.loseConnection()
            return
        fronts = self.factory.fronts
        if fronts is not None:
            fronts[front] = fronts.get(front, 0) + 1
        self.handler = handler
        # The handler takes this connection's place in the factory's
        # bookkeeping (its connectionMade counts it again).
        self.factory.connections.discard(self)
        self.factory.accepted -= 1
        if getattr(self.transport, "protocol", None) is self:
            # A plain socket: the handler takes the sniffer's place in the
            # transport, so reads go straight to it and the sniffer is freed.
            self.transport.protocol = handler
            self.handler = None
        handler.makeConnection(self.transport)
        handler.dataReceived(data)

    def readConnectionLost(self) -> None:
        if self.handler is None:
            self.transport.loseConnection()
        else:
            self.handler.readConnectionLost()

    def writeConnectionLost(self) -> None:
        if self.handler is not None:
            self.handler.writeConnectionLost()

    def close_both(self, abort: bool = False) -> None:
        """Close before any handler took over (graceful shutdown's last resort)."""
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.handler is not None:
            self.handler.connectionLost(reason)
        else:
            self.factory.connection_closed(self)


class MixedLocalFactory(ProxyPortFactory):
    """The main listener of `ssx-local`: every proxy protocol on one port."""

    def buildProtocol(self, addr: Any) -> ProxySniffer:
        return ProxySniffer(self)
