"""
Former home of the local end's protocols (now `ssx.local.relay`,
`ssx.local.socks`, `ssx.local.tunnel`): the names `ssx.local.http` still
imports from here, until it imports them from their homes.
"""

from ssx.local.relay import CLOSED as _CLOSED, CONNECTING as _CONNECTING, RELAYING as _RELAY, WAITING as _WAITING
from ssx.local.relay import LocalRelayProtocol
from ssx.local.socks import ProxyPortFactory as Socks5LocalFactory

__all__ = ["LocalRelayProtocol", "Socks5LocalFactory", "_CLOSED", "_CONNECTING", "_RELAY", "_WAITING"]
