"""Former home of `ssx.local.relay`: the names `ssx.local.http` still imports from here."""

from ssx.local.relay import _CLOSED, _CONNECTING, _RELAY, _WAITING, LocalRelayProtocol, Socks5LocalFactory  # noqa: F401
