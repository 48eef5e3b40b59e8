"""
The manager API of `ssx-server` (``--manager-address``): a datagram
service, UDP or a Unix datagram socket, that adds, removes and lists
ports of the running server and reports their traffic, in the text
protocol of `ssx.wire.manager`.  Ports come and go through
`ServerService.add_port`/`remove_port`, built by the same `build_port`
as the configured ones; figures come from each port's counters (`ServerPort.total_bytes`: its
encrypted bytes, TCP and UDP).
"""

from __future__ import annotations

import os
import stat
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.error import MessageLengthError
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ssx.config.manager import ManagerAddress
from ssx.config.ports import PortConfig
from ssx.errors import ConfigError
from ssx.server.ports import ServerPort
from ssx.server.service import PortUnavailable, ServerService
from ssx.wire.manager import (
    OK, ManagerRequest, ManagerRequestError, error_reply, list_reply, parse_request, stat_reply, stat_reports,
)

__all__ = ["ManagerProtocol", "ManagerService"]

_log = Logger()


class ManagerProtocol(DatagramProtocol):
    """Answers each request datagram with one reply to its sender."""

    noisy = False

    def __init__(
        self,
        server: ServerService,
        build: Callable[[PortConfig], ServerPort],
        port_config: Callable[[dict[str, Any]], PortConfig],
    ) -> None:
        self.server = server
        self.build = build
        self.port_config = port_config
        # Where the periodic `stat:` reports go: the last sender (the original's rule).
        self.last_sender: Any = None
        # Totals at the last periodic report, by port.
        self._reported: dict[int, int] = {}

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if addr:
            self.last_sender = addr
        try:
            reply = self.answer(parse_request(data))
        except ManagerRequestError as e:
            reply = error_reply(str(e))
        except ConfigError as e:
            reply = error_reply(f"{e.key}: {e.message}")
        if addr and self.transport is not None:
            try:
                self.transport.write(reply, addr)
            except MessageLengthError:
                # `list` or `ping` over many ports: more than one datagram holds.
                self.transport.write(error_reply("the reply is larger than one datagram"), addr)
            except OSError as e:
                _log.info("manager: cannot reply to {addr}: {error}", addr=addr, error=e)

    def answer(self, request: ManagerRequest) -> bytes:
        """The reply to `request`; a bad one raises and changes nothing."""
        if request.command == "ping":
            return stat_reply(self.totals())
        if request.command == "list":
            return list_reply(
                (number, port.config.password, port.config.method, [key.id for key in port.config.keys])
                for number, port in sorted(self.server.ports.items())
            )
        number = request.port()
        if request.command == "remove":
            if number not in self.server.ports:
                raise ManagerRequestError(f"remove: port {number} is not served")
            self.server.remove_port(number)
            self._reported.pop(number, None)
            _log.info("manager: port {port} removed", port=number)
            return OK
        if number in self.server.ports:
            raise ManagerRequestError(f"add: port {number} is already served")
        config = self.port_config({**request.body, "server_port": number})
        try:
            self.server.add_port(self.build(config))
        except PortUnavailable as e:
            raise ManagerRequestError(f"add: port {number} unavailable: {e}") from None
        _log.info("manager: port {port} added ({method})", port=number, method=config.method)
        return OK

    def totals(self) -> dict[int, int]:
        """Each port's bytes since it was added, both directions."""
        return {
            number: port.total_bytes()
            for number, port in sorted(self.server.ports.items())
        }

    def report(self) -> None:
        """The original's periodic report: bytes since the last one, ports that moved any, to the last sender."""
        if self.last_sender is None or self.transport is None:
            return
        totals = self.totals()
        moved = {n: total - self._reported.get(n, 0) for n, total in totals.items() if total != self._reported.get(n, 0)}
        self._reported = totals
        for datagram in stat_reports(moved):
            try:
                self.transport.write(datagram, self.last_sender)
            except (OSError, MessageLengthError):
                return


class ManagerService(Service):
    """Listens at `address` while running, and reports traffic every `interval` seconds."""

    interval = 10.0

    def __init__(self, reactor: Any, address: ManagerAddress, protocol: ManagerProtocol) -> None:
        self.reactor = reactor
        self.address = address
        self.protocol = protocol
        self.port: Any = None
        self._call: LoopingCall | None = None

    def privilegedStartService(self) -> None:
        self._listen()
        Service.privilegedStartService(self)

    def startService(self) -> None:
        if self.port is None:
            self._listen()
        Service.startService(self)
        self._call = LoopingCall(self.protocol.report)
        self._call.clock = self.reactor
        self._call.start(self.interval, now=False)

    def _listen(self) -> None:
        address = self.address
        try:
            if address.path is not None:
                _remove_stale_socket(address.path)
                self.port = self.reactor.listenUNIXDatagram(address.path, self.protocol, mode=0o600)
            else:
                self.port = self.reactor.listenUDP(address.port, self.protocol, interface=address.host)
        except Exception as e:  # CannotListenError, or a bad path
            raise SystemExit(f"ssx-server: cannot listen for the manager API on {address}: {e}") from None
        _log.info("ssx-server: manager API on {address}", address=str(address))

    def stopService(self) -> Any:
        Service.stopService(self)
        if self._call is not None and self._call.running:
            self._call.stop()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None


def _remove_stale_socket(path: str) -> None:
    """A socket file left by an earlier run is replaced (as libev does); any other file is not."""
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
