"""
Which connection path `ssx.net.tcp.listen`/`connect` take during a test:
`ssx.net.lean`'s port and connector (`LeanTcp`, the default) or Twisted's
`Port` and `Connector` (`TwistedTcp`).  A test class that runs on both
takes `LeanTcp` as a base, and its Twisted twin is
`class XOnTwistedTcp(TwistedTcp, X)`.  `buffered_bytes` reads how much
a transport of either path holds unsent.
"""

from __future__ import annotations

from typing import Any

from ssx.net import lean, lean_transport, tcp

__all__ = ["LeanTcp", "TwistedTcp", "buffered_bytes"]


def buffered_bytes(transport: Any) -> int:
    """The bytes `transport` (ssx.net.lean's, or a Twisted TCP transport) holds, waiting to be sent."""
    if isinstance(transport, lean_transport.LeanTransport):
        return transport.buffered
    # Twisted keeps them in two private buffers.
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


class LeanTcp:
    """A TestCase mixin: ssx listens and connects on ssx.net.lean."""

    lean_path = True

    def setUp(self) -> None:
        self.patch(tcp, "LEAN_PATH", self.lean_path)  # type: ignore[attr-defined]
        super().setUp()  # type: ignore[misc]

    @property
    def port_type(self) -> type:
        return lean.LeanPort if self.lean_path else tcp.Port

    @property
    def connector_type(self) -> type:
        return lean.LeanConnector if self.lean_path else tcp.Connector

    @property
    def server_type(self) -> type:
        return lean.LeanServer if self.lean_path else tcp.Server

    @property
    def client_type(self) -> type:
        return lean.LeanClient if self.lean_path else tcp.Client


class TwistedTcp(LeanTcp):
    """A TestCase mixin: ssx listens and connects with Twisted's Port and Connector (ssx's transports)."""

    lean_path = False
