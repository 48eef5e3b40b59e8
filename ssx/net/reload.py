"""
Live reload on SIGHUP, for both ends: `ReloadService` installs the
handler while it runs, and each SIGHUP, run on the reactor's thread,
loads the configuration again (the file re-read, the start's command
line over it, checked as at start) and hands it to the end's `apply`.
A configuration that does not load is refused with one line, the
start-up error's text, and nothing of it is applied.  What `apply`
returns (the names of what changed) goes into the line that says the
reload is done.  twistd itself uses SIGUSR1 (log rotation), not SIGHUP.
"""

from __future__ import annotations

import signal
from typing import Any, Callable, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from ssx.errors import ConfigError

__all__ = ["ReloadService"]

_log = Logger()


class ReloadService(Service):
    """
    Reloads on SIGHUP while running: `load()` returns the new
    configuration or raises `ConfigError` (refused with `refusal(error)`,
    one line); `apply(config)` applies it and returns (or fires with) the
    names of what changed.  A SIGHUP that comes while a reload is being
    applied starts another once it is done.
    """

    def __init__(
        self,
        reactor: Any,
        label: str,
        load: Callable[[], Any],
        apply: Callable[[Any], Sequence[str] | Deferred[Sequence[str]]],
        refusal: Callable[[ConfigError], str],
    ) -> None:
        self._reactor = reactor
        self.label = label
        self.load = load
        self.apply = apply
        self.refusal = refusal
        self._previous: Any = None
        self._installed = False
        self._busy: Deferred[None] | None = None
        self._again = False

    def startService(self) -> None:
        Service.startService(self)
        try:
            self._previous = signal.signal(signal.SIGHUP, self._signalled)
        except ValueError:
            # Not the main thread (a service run inside tests): no signals.
            self._previous = None
            return
        self._installed = True

    def stopService(self) -> None:
        Service.stopService(self)
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def _signalled(self, signum: int, frame: Any) -> None:
        # In the signal handler: only schedule, the reload runs on the reactor.
        self._reactor.callFromThread(self.reload)

    def reload(self) -> Deferred[None]:
        """Load and apply the configuration now; fires when done (refused or applied)."""
        if self._busy is not None:
            self._again = True
            return self._busy
        _log.info("{label}: reloading the configuration", label=self.label)
        try:
            config = self.load()
        except ConfigError as e:
            _log.error("{line} (reload refused: the running configuration stays)", line=self.refusal(e))
            return succeed(None)
        busy: Deferred[None] = maybeDeferred(self.apply, config).addCallbacks(self._done, self._failed)
        if not busy.called:
            self._busy = busy
            busy.addBoth(self._next)
        return busy

    def _done(self, changed: Sequence[str]) -> None:
        _log.info("{label}: reload done: {changes}", label=self.label,
                  changes="; ".join(changed) if changed else "nothing changed")

    def _failed(self, failure: Failure) -> None:
        _log.failure("{label}: reload failed", failure, label=self.label)

    def _next(self, result: Any) -> Any:
        self._busy = None
        if self._again:
            self._again = False
            self.reload()
        return result
