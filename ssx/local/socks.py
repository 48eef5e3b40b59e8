"""
SOCKS5 and SOCKS4/4a on the local end: the application's proxy handshake,
then the relay through a server (`ssx.local.relay`).

Data path: `Socks5LocalProtocol` feeds the application's bytes to
`ssx.wire.socks5.Socks5Negotiation`; a CONNECT opens the relay, and its
success or failure is the SOCKS5 reply (`reply_code_for`); a UDP ASSOCIATE
instead registers the application with the UDP relay (`ssx.local.udp`) for
as long as the TCP connection lives.  `Socks4LocalProtocol` does the same
for SOCKS4 and SOCKS4a (`ssx.wire.socks4`), CONNECT only: it has no
password, so it is refused while credentials are required.  Applications
reach both through the mixed port's sniffer (`ssx.local.front`).
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet.error import (
    ConnectError,
    ConnectionRefusedError,
    DNSLookupError,
    NoRouteError,
    TCPTimedOutError,
    TimeoutError,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from ssx.errors import Socks5Error
from ssx.interfaces import IServerPicker
from ssx.local.relay import ASSOCIATED, CLOSED, LocalFactory, LocalRelayProtocol
from ssx.local.udp import Socks5Association, Socks5UdpRelay
from ssx.wire import socks4, socks5
from ssx.wire.address import Address
from ssx.wire.socks4 import Socks4Error, Socks4Negotiation

__all__ = ["ProxyPortFactory", "Socks4LocalProtocol", "Socks5LocalProtocol", "reply_code_for"]

_log = Logger()

# The commands a proxy port offers, by (TCP relayed, UDP relay listening):
# built once, as the property below is read for every new connection.
_COMMANDS = {
    (tcp, udp): frozenset(
        ({socks5.CMD_CONNECT} if tcp else set()) | ({socks5.CMD_UDP_ASSOCIATE} if udp else set())
    )
    for tcp in (False, True)
    for udp in (False, True)
}

# The reply to every CONNECT that reached a server (no bound address given).
_REPLY_SUCCEEDED = socks5.build_reply(socks5.REP_SUCCEEDED)


def reply_code_for(failure: Failure) -> int:
    """The SOCKS5 reply code for a failure to reach the server."""
    error = failure.value
    if isinstance(error, ConnectionRefusedError):
        return socks5.REP_CONNECTION_REFUSED
    if isinstance(error, NoRouteError):
        return socks5.REP_NETWORK_UNREACHABLE
    if isinstance(error, DNSLookupError):
        return socks5.REP_HOST_UNREACHABLE
    if isinstance(error, (TimeoutError, TCPTimedOutError)):
        return socks5.REP_TTL_EXPIRED
    if isinstance(error, ConnectError) and getattr(error, "osError", None) == errno.EHOSTUNREACH:
        return socks5.REP_HOST_UNREACHABLE
    return socks5.REP_GENERAL_FAILURE


class ProxyPortFactory(LocalFactory):
    """
    What the connections of one application proxy port share, whichever
    protocol they speak (SOCKS5, SOCKS4, HTTP): the credentials, the SOCKS5
    UDP relay (set when UDP is relayed) and whether TCP is relayed at all.
    On its own it speaks SOCKS5; the mixed port (`ssx.local.front`) puts a
    sniffer in front.
    """

    def __init__(
        self,
        reactor: Any,
        servers: IServerPicker,
        timeout: float = 300.0,
        credentials: tuple[bytes, bytes] | None = None,
        udp_relay: Socks5UdpRelay | None = None,
        tcp: bool = True,
        **limits: Any,
    ) -> None:
        LocalFactory.__init__(self, reactor, servers, timeout, **limits)
        self.credentials = credentials
        self.udp_relay = udp_relay
        self.tcp = tcp

    @property
    def commands(self) -> frozenset[int]:
        """The SOCKS5 commands offered to the next application."""
        relay = self.udp_relay
        # A relay with no port (none beside a Unix-socket listener) cannot associate.
        return _COMMANDS[bool(self.tcp), relay is not None and relay.transport is not None]

    def buildProtocol(self, addr: Any) -> Protocol:
        """SOCKS5 alone (`MixedLocalFactory` builds its sniffer instead)."""
        return Socks5LocalProtocol(self)


class Socks5LocalProtocol(LocalRelayProtocol):
    """An application speaking SOCKS5 to the local end."""

    factory: ProxyPortFactory

    def __init__(self, factory: ProxyPortFactory) -> None:
        LocalRelayProtocol.__init__(self, factory)
        self._negotiation: socks5.Socks5Negotiation | None = socks5.Socks5Negotiation(
            factory.credentials, factory.commands
        )
        self._association: Socks5Association | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._negotiation is not None:
            self._negotiate(data)
        elif self._state != ASSOCIATED:  # the control connection's bytes mean nothing
            LocalRelayProtocol.dataReceived(self, data)

    def _negotiate(self, data: bytes) -> None:
        assert self._negotiation is not None
        try:
            out, request = self._negotiation.feed(data)
        except Socks5Error as e:
            if self.factory.verbose:
                _log.debug("SOCKS5 negotiation failed: {error}", error=e)
            if e.reply:
                self.transport.write(e.reply)
            self._negotiation = None
            self._state = CLOSED
            self.transport.loseConnection()
            return
        if out:
            self.transport.write(out)
        if request is None:
            return
        self._negotiation = None
        if request.command == socks5.CMD_UDP_ASSOCIATE:
            self._associate(request.address)
        else:
            self.open_relay(request.address, request.extra)

    def _associate(self, requested: Address) -> None:
        relay = self.factory.udp_relay
        assert relay is not None and relay.transport is not None
        # The association is this application's alone: its IP, and the port
        # it named or else the one its first datagram comes from.
        peer = self.transport.getPeer().host
        port = socks5.associate_source_port(requested, peer)
        association = relay.associate(peer, port)
        if association is None:
            if self.factory.verbose:
                _log.debug("UDP ASSOCIATE from {peer} refused: another association sends from port {port}", peer=peer, port=port)
            self._state = CLOSED
            self.transport.write(socks5.build_reply(socks5.REP_NOT_ALLOWED))
            self.transport.loseConnection()
            return
        self._state = ASSOCIATED
        self._association = association
        self.set_idle_timeout(self.factory.timeout)
        # The address the application reached us on, with the UDP port.
        bind = Address(self.transport.getHost().host, relay.transport.getHost().port)
        self.transport.write(socks5.build_reply(socks5.REP_SUCCEEDED, bind))

    def relay_ready(self) -> None:
        self.transport.write(_REPLY_SUCCEEDED)

    def relay_failed(self, failure: Failure) -> None:
        self.transport.write(socks5.build_reply(reply_code_for(failure)))
        self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        if self._state == ASSOCIATED:
            self.transport.loseConnection()
        else:
            LocalRelayProtocol.readConnectionLost(self)

    def timeoutConnection(self) -> None:
        relay = self.factory.udp_relay
        if self._state == ASSOCIATED and relay is not None and self._association is not None:
            # The control connection idles by design; the association lives
            # while its application keeps using UDP.
            if relay.active(self._association):
                self.set_idle_timeout(self.factory.timeout)
                return
            self.transport.loseConnection()
            return
        LocalRelayProtocol.timeoutConnection(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._association is not None and self.factory.udp_relay is not None:
            self.factory.udp_relay.dissociate(self._association)
            self._association = None
        LocalRelayProtocol.connectionLost(self, reason)


class Socks4LocalProtocol(LocalRelayProtocol):
    """An application speaking SOCKS4 or SOCKS4a (CONNECT only)."""

    factory: ProxyPortFactory

    def __init__(self, factory: ProxyPortFactory) -> None:
        LocalRelayProtocol.__init__(self, factory)
        self._negotiation: Socks4Negotiation | None = Socks4Negotiation()

    def dataReceived(self, data: bytes) -> None:
        if self._negotiation is None:
            LocalRelayProtocol.dataReceived(self, data)
            return
        try:
            request = self._negotiation.feed(data)
        except Socks4Error as e:
            self._refuse(str(e), e.reply)
            return
        if request is None:
            return
        self._negotiation = None
        if self.factory.credentials is not None:
            # SOCKS4 cannot carry a password; a user id alone proves nothing.
            self._refuse("SOCKS4 offers no password and credentials are required", socks4.build_reply(socks4.REP_REJECTED))
            return
        self.open_relay(request.address, request.extra)

    def _refuse(self, why: str, reply: bytes) -> None:
        if self.factory.verbose:
            _log.debug("SOCKS4 request refused: {why}", why=why)
        self._negotiation = None
        self._state = CLOSED
        if reply:
            self.transport.write(reply)
        self.transport.loseConnection()

    def relay_ready(self) -> None:
        self.transport.write(socks4.build_reply(socks4.REP_GRANTED))

    def relay_failed(self, failure: Failure) -> None:
        self.transport.write(socks4.build_reply(socks4.REP_REJECTED))
        self.transport.loseConnection()
