"""
The online config's servers as the picker's dynamic upstreams, with a SIP003
plugin process for each server that names one.

`OnlineUpstreams.apply` is what `OnlineConfigService` calls with each good
document: a server with a plugin that appears gets its plugin started (on
its own loopback port, supervised like the configured servers' plugins, but
without blocking the running reactor until it listens); one that leaves
has its plugin stopped.  A server whose plugin executable is missing is left
out with a log line, and the rest of the list is used.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.application.service import MultiService
from twisted.logger import Logger

from ssx.config.upstreams import ServerEntry
from ssx.errors import ConfigError
from ssx.interfaces import IServerPicker, IUpstream
from ssx.local.upstream import make_upstream
from ssx.net.plugin import PluginService, find_plugin
from ssx.wire.sip003 import Plugin

__all__ = ["OnlineUpstreams"]

_log = Logger()


class OnlineUpstreams:
    """Builds the online servers' upstreams into `picker`; their plugins are children of `parent`."""

    def __init__(
        self, reactor: Any, picker: IServerPicker, parent: MultiService, plugins: bool = True, fast_open: bool = False,
        mark: int | None = None,
    ) -> None:
        self.fast_open = fast_open
        self.mark = mark
        self.reactor = reactor
        self.picker = picker
        self.parent = parent
        # False in udp_only mode: plugins carry TCP, so none is started.
        self.plugins_wanted = plugins
        #: The running plugin of each online server that has one.
        self.plugins: dict[ServerEntry, PluginService] = {}

    def apply(self, entries: Sequence[ServerEntry]) -> None:
        """Make the picker's online servers exactly `entries` (less those whose plugin is missing)."""
        usable = [entry for entry in entries if self._usable(entry)]
        self.picker.replace_dynamic(usable, self._build)
        current = {upstream.entry for upstream in self.picker.upstreams()}
        for entry in [e for e in self.plugins if e not in current]:
            service = self.plugins.pop(entry)
            _log.info("online server {server} left: stopping its plugin {name}", server=entry.label, name=entry.plugin)
            service.disownServiceParent()

    def _usable(self, entry: ServerEntry) -> bool:
        if not entry.plugin or not self.plugins_wanted or entry in self.plugins:
            return True
        try:
            find_plugin(entry.plugin)
        except ConfigError as e:
            _log.warn("online server {server} left out: {error}", server=entry.label, error=e.message)
            return False
        return True

    def _build(self, entry: ServerEntry) -> IUpstream:
        service = None
        if entry.plugin and self.plugins_wanted:
            plugin = Plugin(entry.plugin, entry.plugin_opts)
            service = PluginService(self.reactor, plugin, f"ssx-local (online server {entry.label})",
                                    (entry.host, entry.port), wait=False)
            self.plugins[entry] = service
            service.setServiceParent(self.parent)
            _log.info("online server {server}: TCP goes through plugin {name} on {where}",
                      server=entry.label, name=entry.plugin, where=service.local_address)
        return make_upstream(self.reactor, entry, service, self.fast_open, self.mark)
