"""
A reload of `ssx-local` (SIGHUP, `ssx.net.reload.ReloadService`):
`LocalReload.apply` takes the new, already checked `LocalConfig` and
applies what changed since the last read (`ssx.config.changes.local_changes`)
to the running `LocalService`:

- the configured servers become the new list in the picker
  (`ServerPicker.replace_static`): a server that stays keeps its health,
  a new one is tried from the next connection on, and running relays keep
  the server they have; a removed server's SIP003 plugin stops after the
  shutdown grace, a new server's plugin starts;
- proxy listeners and tunnels whose listen address went are stopped (their
  connections get the shutdown grace), new ones are started;
- timeouts, limits, verbosity and the SOCKS credentials go to every
  listener for the connections that come next.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from ssx.config.changes import local_changes
from ssx.config.local import LocalConfig
from ssx.config.upstreams import ServerEntry
from ssx.interfaces import IUpstream
from ssx.local.upstream import make_upstream
from ssx.net.acl_holder import apply_acl
from ssx.net.plugin import PluginService
from ssx.wire.sip003 import Plugin

__all__ = ["LocalReload"]

_log = Logger()


class LocalReload:
    """What a reload changes: the running `top` (a `ssx.local.tap.LocalService`) and the last `config` read."""

    def __init__(self, reactor: Any, top: Any, config: LocalConfig) -> None:
        self.reactor = reactor
        self.top = top
        self.config = config
        # The configured servers' plugins, by server.
        plugins = iter(top.plugins)
        self.plugins: dict[ServerEntry, PluginService] = {
            entry: next(plugins) for entry, plugin in zip(config.servers, config.plugins) if plugin is not None
        }

    def apply(self, new: LocalConfig) -> list[str]:
        """Apply `new` (checked); returns what changed, by name (servers, listeners, tunnels), never a secret."""
        # Imported here: ssx.local.tap imports this module.
        from ssx.local.tap import add_proxy_port, add_tunnel

        changes = local_changes(self.config, new)
        top = self.top
        notes: list[str] = []
        if changes.settings:
            for factory in top.factories:
                factory.set_limits(new.timeout, new.limits.handshake_timeout, new.limits.max_connections)
                factory.verbose = new.verbose
                if hasattr(factory, "credentials"):
                    factory.credentials = new.socks_credentials
            if top.drain is not None:
                top.drain.grace = new.limits.shutdown_grace
            notes.append("changed " + ", ".join(changes.settings))
        if changes.servers_added or changes.servers_removed:
            plugins = dict(zip(new.servers, new.plugins))
            top.picker.replace_static(new.servers, lambda entry: self._upstream(entry, plugins.get(entry), new))
            for entry in changes.servers_removed:
                self._stop_plugin(entry, new.limits.shutdown_grace)
            notes += [f"server {entry.label} removed" for entry in changes.servers_removed]
            notes += [f"server {entry.label} added" for entry in changes.servers_added]
        for description in changes.listen_removed:
            top.remove_port(description)
            notes.append(f"stopped listening on {description}")
        for tunnel in changes.tunnels_removed:
            top.remove_port(tunnel.listen)
            notes.append(f"tunnel {tunnel.listen} to {tunnel.target} removed")
        upstreams = top.picker.upstreams()
        udp_server = upstreams[0] if new.relays.udp and upstreams else None
        for description in changes.listen_added:
            add_proxy_port(top, self.reactor, new, description, udp_server)
            notes.append(f"listening on {description}")
        for tunnel in changes.tunnels_added:
            add_tunnel(top, self.reactor, new, tunnel, udp_server)
            notes.append(f"tunnel {tunnel.listen} to {tunnel.target} added")
        acl = apply_acl(top.router.holder if top.router is not None else None, new.acl, new.acl_path)
        if acl is not None:
            notes.append(acl)
        if top.router is not None:
            top.router.resolve = new.acl_resolve
        if changes.fixed:
            notes.append("not applied before a restart: " + ", ".join(changes.fixed))
            _log.warn("ssx-local: changed settings that only a restart applies: {keys}", keys=", ".join(changes.fixed))
        self.config = new
        return notes

    def _upstream(self, entry: ServerEntry, plugin: Plugin | None, config: LocalConfig) -> IUpstream:
        service = None
        if plugin is not None and config.relays.tcp:
            service = PluginService(self.reactor, plugin, f"ssx-local (server {entry.label})", (entry.host, entry.port),
                                    wait=False)
            self.plugins[entry] = service
            self.top.plugins.append(service)
            service.setServiceParent(self.top)
        # The mark of the start (a changed one waits for a restart, as the firewall's rules would).
        return make_upstream(self.reactor, entry, service, config.fast_open, self.top.mark)

    def _stop_plugin(self, entry: ServerEntry, grace: float) -> None:
        service = self.plugins.pop(entry, None)
        if service is None:
            return
        self.top.plugins.remove(service)
        # Its running relays go through it: they get the grace.
        self.reactor.callLater(grace, service.disownServiceParent)
