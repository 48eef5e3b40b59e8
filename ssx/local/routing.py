"""
Which way a target goes from the local end: through a server or direct,
as the ACL (`ssx.acl`, held in an `ssx.net.acl_holder.AclHolder`) says.

`AclRouter.route` decides for one TCP target: a name by the name rules,
an IP literal by the address rules; with `resolve` (`--acl-resolve`), a
name no name rule matches is resolved here (getaddrinfo, in the reactor's
thread pool) and its addresses decide, as shadowsocks-rust does.  UDP
decides with `route_now`, never resolving.  Relays call it where they pick
their upstream (`ssx.local.relay.LocalRelayProtocol.open_relay`,
`ssx.local.udp.LocalUdpRelay`).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from ssx.net.acl_holder import AclHolder
from ssx.wire.address import Address

__all__ = ["AclRouter", "Lookup", "Route", "system_lookup"]

_log = Logger()


@dataclass(frozen=True)
class Route:
    """A decision: through a server (`proxied`) or direct, to `addresses` if they were resolved."""

    proxied: bool
    addresses: tuple[str, ...] = ()


# How a name's addresses are found: (host, port) -> Deferred list of IP strings.
Lookup = Callable[[str, int], "Deferred[list[str]]"]


def system_lookup(reactor: Any) -> Lookup:
    """getaddrinfo in the reactor's thread pool (hosts file, then the system's DNS), as ssx-local connects."""

    def lookup(host: str, port: int) -> Deferred[list[str]]:
        d = deferToThreadPool(reactor, reactor.getThreadPool(), socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
        return d.addCallback(lambda infos: list(dict.fromkeys(str(info[4][0]) for info in infos)))

    return lookup


class AclRouter:
    """
    The local end's decisions; `holder.acl` is read at each one, so a
    reload applies at once.  `lookup` finds a name's addresses for
    `resolve` (by default `system_lookup`).
    """

    def __init__(
        self, reactor: Any, holder: AclHolder, resolve: bool = False, verbose: bool = False,
        lookup: Lookup | None = None,
    ) -> None:
        self.holder = holder
        self.resolve = resolve
        self.verbose = verbose
        self._lookup = lookup if lookup is not None else system_lookup(reactor)

    def route_now(self, target: Address) -> Route:
        """The decision from the rules alone (a name no rule matches takes the default)."""
        acl = self.holder.acl
        route = Route(True) if acl is None else Route(acl.proxies(target.host))
        self._log(target, route, "")
        return route

    def route(self, target: Address) -> Route | Deferred[Route]:
        """The decision for a TCP target: a `Route`, or a Deferred of one while a name resolves."""
        acl = self.holder.acl
        if acl is None or not self.resolve or not acl.resolving_decides(target.host):
            return self.route_now(target)
        d = self._lookup(target.host, target.port)
        return d.addCallbacks(self._resolved, self._unresolved, callbackArgs=(target,), errbackArgs=(target,))

    def _resolved(self, found: list[str], target: Address) -> Route:
        addresses = tuple(found)
        acl = self.holder.acl
        proxied = True if acl is None else acl.addresses_proxy(addresses)
        route = Route(proxied, () if proxied else addresses)
        self._log(target, route, f" (resolved to {', '.join(addresses)})")
        return route

    def _unresolved(self, failure: Any, target: Address) -> Any:
        if failure.check(CancelledError):
            return failure  # the application went away meanwhile
        # A name that does not resolve here may still resolve at the server.
        acl = self.holder.acl
        route = Route(True if acl is None else acl.proxy_all)
        self._log(target, route, f" (does not resolve here: {failure.getErrorMessage()})")
        return route

    def _log(self, target: Address, route: Route, why: str) -> None:
        if self.verbose:
            _log.debug(
                "ACL: {host}:{port} {way}{why}",
                host=target.host, port=target.port, way="through the server" if route.proxied else "direct", why=why,
            )
