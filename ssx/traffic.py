"""
`TrafficCounter`: bytes relayed one way and the other, `up` and `down`,
the one `ssx.interfaces.ITrafficCounter` both ends keep: the server per
user, key and port (`ssx.server.accounting`), the local end per server
(`ssx.local.metrics`).  No Twisted here.
"""

from __future__ import annotations

from zope.interface import implementer

from ssx.interfaces import ITrafficCounter

__all__ = ["TrafficCounter"]


@implementer(ITrafficCounter)
class TrafficCounter:
    """Bytes relayed: `up` (towards the target) and `down` (back)."""

    __slots__ = ("up", "down")

    def __init__(self) -> None:
        self.up = 0
        self.down = 0

    def add_up(self, count: int) -> None:
        self.up += count

    def add_down(self, count: int) -> None:
        self.down += count
