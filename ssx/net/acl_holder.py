"""
The one place each end keeps its ACL (`ssx.acl`): factories and relays
hold the `AclHolder` and read `holder.acl` at decision time, so that
`reload()` (on SIGHUP, through `reload_on_sighup`) swaps the rules for
every connection that starts afterwards.  A file that no longer parses
leaves the old rules in place, with one log line.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable

from twisted.application.service import Service
from twisted.logger import Logger

from ssx.acl import Acl, load_acl
from ssx.errors import ConfigError

__all__ = ["AclHolder", "AclReloadService"]

_log = Logger()


class AclHolder:
    """The ACL loaded from `path`, replaced by `reload()`; `acl` is None when the end has none."""

    def __init__(self, path: str, acl: Acl | None = None) -> None:
        # Absolute: twistd may change directory before a reload.
        self.path = os.path.abspath(path)
        self.acl: Acl | None = acl if acl is not None else load_acl(path)
        self.reloads = 0
        self.reload_failures = 0

    def reload(self) -> bool:
        """Read the file again and use it; on a bad file keep the rules in use. True if it was swapped."""
        try:
            acl = load_acl(self.path)
        except ConfigError as e:
            self.reload_failures += 1
            _log.error("ACL not reloaded, the previous rules stay: {error}", error=e.message)
            return False
        self.acl = acl
        self.reloads += 1
        _log.info("ACL reloaded: {acl}", acl=acl)
        return True


class AclReloadService(Service):
    """
    Reloads the holder's ACL on SIGHUP while running.  A handler already
    installed (the whole config's reload, for one) is still called after
    it; stopping puts it back.  Whoever reloads everything on SIGHUP may
    call `holder.reload()` instead and leave this service out.
    """

    def __init__(self, reactor: Any, holder: AclHolder) -> None:
        self._reactor = reactor
        self.holder = holder
        self._previous: Any = None

    def startService(self) -> None:
        Service.startService(self)
        self._previous = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self) -> None:
        Service.stopService(self)
        if signal.getsignal(signal.SIGHUP) == self._on_signal:
            signal.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)

    def _on_signal(self, number: int, frame: Any) -> None:
        self._reactor.callFromThread(self.holder.reload)
        previous: Callable[..., Any] | Any = self._previous
        if callable(previous):
            previous(number, frame)
