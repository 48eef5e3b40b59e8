"""
The manager API of a `--workers` server, answered by the supervisor: the
same protocol as one process's (`ssx.server.manager.ManagerProtocol`,
over `ManagerService`), against a table of ports whose figures are the
sums of every worker's `stat:` reports (`WorkerTotals`).  `add` and
`remove` are checked here, then forwarded to every worker, which starts
or stops the port itself (binding an added port with SO_REUSEPORT).  A
reload (SIGHUP) changes the table as it changes each worker's ports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet import defer

from ssx.config.changes import server_changes, wanted_port
from ssx.config.ports import PortConfig
from ssx.config.server import added_port
from ssx.errors import ConfigError
from ssx.server.manager import ManagerProtocol, ManagerService
from ssx.server.service import PortUnavailable
from ssx.wire.manager import ManagerRequest

if TYPE_CHECKING:
    from ssx.workers.supervisor import Supervisor, WorkerTotals

__all__ = ["WorkerPorts", "supervisor_manager"]


class _Traffic:
    """A port's bytes over all workers (`up` holds both directions, as `ManagerProtocol.totals` adds them)."""

    def __init__(self, totals: WorkerTotals, number: int) -> None:
        self._totals = totals
        self._number = number
        self.down = 0

    @property
    def up(self) -> int:
        return self._totals.total(self._number)


@dataclass
class _Port:
    config: PortConfig
    traffic: Any = None

    def total_bytes(self) -> int:
        """The port's bytes over all workers, both directions (as `ServerPort.total_bytes`)."""
        return self.traffic.up if self.traffic is not None else 0


class WorkerPorts:
    """The ports every worker serves, as `ManagerProtocol` sees a `ServerService`."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.ports: dict[int, _Port] = {}
        # The file's configuration as last read (what a reload is told from).
        self.config = supervisor.config
        for config in supervisor.config.port_configs():
            self.ports[config.port] = _Port(config, _Traffic(supervisor.totals, config.port))

    def reload(self, new: Any) -> None:
        """
        Follow a reload as each worker's `ServerReload` does: the file's
        ports removed, added or changed; ports the manager added stay
        unless the file now defines their number.
        """
        changes = server_changes(self.config, new)
        self.config = new
        for number in changes.removed:
            if number in self.ports:
                self.remove_port(number)
        for wanted in changes.added + changes.changed:
            running = self.ports.get(wanted.port)
            if running is None:
                self.add_port(_Port(wanted))
            else:
                running.config = wanted_port(running.config, wanted)

    def add_port(self, port: _Port) -> _Port:
        if port.config.port in self.ports:
            raise PortUnavailable(f"port {port.config.port} is already served")
        port.traffic = _Traffic(self.supervisor.totals, port.config.port)
        self.ports[port.config.port] = port
        return port

    def remove_port(self, number: int, grace: float | None = None) -> defer.Deferred[None]:
        del self.ports[number]
        self.supervisor.totals.forget(number)
        return defer.succeed(None)


class _SupervisorManagerProtocol(ManagerProtocol):
    def answer(self, request: ManagerRequest) -> bytes:
        reply = super().answer(request)
        if request.command in ("add", "remove"):
            self.supervisor.forward_request(request.command, request.body)
        return reply

    supervisor: Supervisor


def _added_port(ports: WorkerPorts, request: Any) -> PortConfig:
    """
    The port an `add` asks for, read as the workers will read it: over the
    top-level keys of the configuration last loaded (a reload changes
    them), and without a plugin (each worker would start its own on one
    port, as `workers` at start-up says).
    """
    port = added_port(ports.config.port_defaults, request)
    if port.plugin is not None:
        raise ConfigError("plugin", "not with --workers above 1 (each worker would start its own on one port)")
    return port


def supervisor_manager(supervisor: Supervisor) -> None:
    """The manager API of `supervisor` (its config has a manager address), as its child service."""
    config = supervisor.config
    ports = WorkerPorts(supervisor)
    # WorkerPorts and _Port have what ManagerProtocol uses of a ServerService and a ServerPort.
    protocol = _SupervisorManagerProtocol(
        ports,  # type: ignore[arg-type]
        lambda port_config: _Port(port_config),  # type: ignore[arg-type,return-value]
        lambda request: _added_port(ports, request),
    )
    protocol.supervisor = supervisor
    supervisor.manager_protocol = protocol
    supervisor.reloaded.append(ports.reload)
    ManagerService(supervisor.reactor, config.manager, protocol).setServiceParent(supervisor)
