"""
Tunnels on the local end (port forwards, like ss-tunnel): each connection to
a tunnel's port is relayed at once, with no handshake, to the tunnel's fixed
target through a server (`ssx.local.relay`).  UDP tunnels are
`ssx.local.udp.TunnelUdpRelay`.
"""

from __future__ import annotations

from typing import Any

from ssx.interfaces import IServerPicker
from ssx.local.relay import LocalFactory, LocalRelayProtocol
from ssx.wire.address import Address

__all__ = ["TunnelFactory", "TunnelProtocol"]


class TunnelFactory(LocalFactory):
    """A TCP port forward: every connection goes to `target` through the server."""

    def __init__(self, reactor: Any, servers: IServerPicker, target: Address, timeout: float = 300.0, **limits: Any) -> None:
        LocalFactory.__init__(self, reactor, servers, timeout, **limits)
        self.target = target

    def buildProtocol(self, addr: Any) -> "TunnelProtocol":
        return TunnelProtocol(self)


class TunnelProtocol(LocalRelayProtocol):
    """A connection to a tunnel port: relayed at once to the tunnel's target."""

    factory: TunnelFactory

    def connectionMade(self) -> None:
        LocalRelayProtocol.connectionMade(self)
        self.open_relay(self.factory.target)
