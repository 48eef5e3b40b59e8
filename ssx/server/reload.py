"""
A reload of `ssx-server` (SIGHUP, `ssx.net.reload.ReloadService`):
`ServerReload.apply` takes the new, already checked `ServerConfig` and
applies what changed in the file since the last read
(`ssx.config.changes.server_changes`) to the running `ServerService`:

- shared settings (forbidden ranges, limits, handshake bounds, verbose)
  go to every running port, and to the ports built from now on;
- a port gone from the file is removed (`ServerService.remove_port`: its
  relays get the shutdown grace);
- a new port is added; a port whose credentials or timeout changed takes
  them in place (`ServerPort.rekey`/`configure`), and the running
  connections of a key that is gone get the shutdown grace; a port whose
  addresses, plugin, mode or method changed is stopped and started again
  (`ServerService.restart_port`).

Only the file's changes are applied: ports the manager API added stay
(unless the file now defines their number: then the file's entry
replaces them), and file ports the manager removed stay removed unless
their entry in the file changes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from ssx.config.changes import IN_PLACE, KEEP, RESTART, port_update, server_changes, wanted_port
from ssx.config.ports import PortConfig
from ssx.config.server import ServerConfig
from ssx.net.acl_holder import apply_acl
from ssx.server.forbidden import ForbiddenNetworks
from ssx.server.host_address_watch import HostAddressWatcher
from ssx.server.ports import SharedParts, build_port
from ssx.server.service import PortUnavailable, ServerService

__all__ = ["ServerReload"]

_log = Logger()


class ServerReload:
    """What a reload changes: the running `service`, the `shared` parts new ports are built with, and the last `config` read."""

    def __init__(self, service: ServerService, shared: SharedParts, config: ServerConfig) -> None:
        self.service = service
        self.shared = shared
        self.config = config

    async def apply(self, new: ServerConfig) -> list[str]:
        """Apply `new` (checked); returns what changed, by name (ports, users, keys), never a secret."""
        changes = server_changes(self.config, new)
        notes: list[str] = []
        if changes.settings:
            self.shared = self._shared(new)
            for port in self.service.ports.values():
                port.configure(port.config, self.shared)
            self.service.drain.grace = new.limits.shutdown_grace
            notes.append("changed " + ", ".join(changes.settings))
        for number in changes.removed:
            if number in self.service.ports:
                # Its relays drain in the background, for at most the grace.
                self.service.remove_port(number).addErrback(_removal_failed, number)
                notes.append(f"port {number} removed")
        for wanted in changes.added + changes.changed:
            note = await self._apply_port(wanted)
            if note:
                notes.append(note)
        acl = apply_acl(self.service.acl, new.acl, new.acl_path)
        if acl is not None:
            notes.append(acl)
        if changes.fixed:
            notes.append("not applied before a restart: " + ", ".join(changes.fixed))
            _log.warn("ssx-server: changed settings that only a restart applies: {keys}", keys=", ".join(changes.fixed))
        self.config = new
        return notes

    async def _apply_port(self, wanted: PortConfig) -> str | None:
        number = wanted.port
        running = self.service.ports.get(number)
        if running is None:
            try:
                self.service.add_port(build_port(self.shared, wanted))
            except PortUnavailable as e:
                _log.error("ssx-server: reload: port {port} cannot start: {error}", port=number, error=str(e))
                return f"port {number} not added (cannot start)"
            return f"port {number} added ({wanted.method})"
        update = port_update(running.config, wanted)
        wanted = wanted_port(running.config, wanted)
        if update.action == KEEP:
            return None
        if update.action == IN_PLACE:
            stale = running.rekey(wanted)
            running.configure(wanted, self.shared)
            self.service.end_after_grace(running, stale)
            return f"port {number}: " + ", ".join(update.changed)
        assert update.action == RESTART
        try:
            await self.service.restart_port(build_port(self.shared, wanted))
        except PortUnavailable as e:
            _log.error("ssx-server: reload: port {port} cannot start again: {error}", port=number, error=str(e))
            return f"port {number} stopped, not started again (cannot start)"
        return f"port {number} restarted: " + ", ".join(update.changed)

    def _shared(self, new: ServerConfig) -> SharedParts:
        forbidden = new.forbidden
        if forbidden.host is not None:
            watcher = self.service.host_address_watcher
            if watcher is None:
                watcher = self.service.add(HostAddressWatcher(self.shared.reactor, forbidden.host))
                self.service.host_address_watcher = watcher
            else:
                # The running watcher keeps this host's addresses current.
                forbidden = ForbiddenNetworks(forbidden.entries, host=watcher.addresses)
        return dataclasses.replace(
            self.shared,
            forbidden=forbidden,
            limits=new.limits,
            max_handshakes=new.max_handshakes,
            max_handshakes_per_ip=new.max_handshakes_per_ip,
            verbose=new.verbose,
        )


def _removal_failed(failure: Failure, number: int) -> None:
    _log.failure("ssx-server: reload: removing port {port}", failure, port=number)
