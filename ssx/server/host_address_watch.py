"""
Keeps the server's view of this host's own addresses current, so that the
``self`` entry of `forbidden_ip` (`ssx.server.forbidden`) follows addresses as DHCP,
SLAAC, VPNs or the operator add and remove them.

`HostAddressWatcher` reads the addresses when the server starts, then
subscribes to the kernel's address notifications (rtnetlink groups
RTMGRP_IPV4_IFADDR and RTMGRP_IPV6_IFADDR) on a socket the reactor watches,
and reads them all again after every batch of notifications; a lost
notification (ENOBUFS) leads to the same re-read.  Where there is no netlink,
it re-reads every `poll_interval` seconds instead.  The reading itself is in
`ssx.server.host_addresses`, free of Twisted.
"""

from __future__ import annotations

import socket
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from ssx.server.host_addresses import HostAddresses, address_change_socket

__all__ = ["HostAddressWatcher"]

_log = Logger()

# Reads of the notification socket per wake-up before re-reading anyway.
_MAX_READS = 256


@implementer(IReadDescriptor)
class HostAddressWatcher(Service):
    """Refreshes `addresses` at start and whenever the kernel reports an address change."""

    poll_interval = 60.0

    def __init__(
        self,
        reactor: Any,
        addresses: HostAddresses,
        subscribe: Callable[[], socket.socket] = address_change_socket,
    ) -> None:
        self._reactor = reactor
        self.addresses = addresses
        self._subscribe = subscribe
        self._socket: socket.socket | None = None
        self._poll: LoopingCall | None = None
        self._problem: str | None = None
        self.refreshes = 0

    def startService(self) -> None:
        Service.startService(self)
        # Subscribe first, then read: a change between the two is then
        # notified and read again, never missed.
        try:
            self._socket = self._subscribe()
        except OSError as e:
            _log.warn(
                "cannot follow this host's address changes ({error}): re-reading them every {interval:g} s",
                error=e, interval=self.poll_interval,
            )
            self._poll = LoopingCall(self._refresh)
            self._poll.clock = self._reactor
        self._refresh()
        if self._socket is not None:
            self._reactor.addReader(self)
        elif self._poll is not None:
            self._poll.start(self.poll_interval, now=False)

    def stopService(self) -> None:
        Service.stopService(self)
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None
        if self._socket is not None:
            self._reactor.removeReader(self)
            self._socket.close()
            self._socket = None

    # IReadDescriptor

    def fileno(self) -> int:
        return self._socket.fileno() if self._socket is not None else -1

    def logPrefix(self) -> str:
        return "HostAddressWatcher"

    def doRead(self) -> None:
        """Drain the pending notifications (their content does not matter), then read the addresses once."""
        sock = self._socket
        if sock is None:
            return
        for _ in range(_MAX_READS):
            try:
                if not sock.recv(65536):
                    break
            except BlockingIOError:
                break
            except OSError as e:  # ENOBUFS: notifications were lost; the re-read below catches up
                _log.debug("address notifications: {error}", error=e)
        self._refresh()

    def connectionLost(self, reason: Any) -> None:
        pass

    def _refresh(self) -> None:
        before = self.addresses.networks if self.addresses.known else None
        after = self.addresses.refresh()
        self.refreshes += 1
        problem = self.addresses.problem
        if problem is not None and problem != self._problem:
            _log.warn(
                "cannot read this host's addresses ({problem}); refusing {what}",
                problem=problem,
                what="the last ones read" if before is not None else "those of its name",
            )
        self._problem = problem
        if after != before:
            _log.info(
                "this host's own addresses, refused as destinations: {addresses}",
                addresses=", ".join(str(n.network_address) if n.num_addresses == 1 else str(n) for n in after),
            )
