"""
A SIGHUP under `--workers`: the supervisor's side of a reload.

`SupervisorReload.reload` (run on the reactor's thread) loads the
configuration itself first, as a single process would (the file read
again, the start's command line over it, checked): a file that does not
load is refused with the usual one line, once, and nothing reaches the
workers, which keep the running configuration.  A good file is passed on
to every worker as a `reload:` request (each reads the file again and
applies it as a single process does, `ssx.workers.worker.WorkerReload`),
with the keys of the inherited sockets of listeners the file no longer
has: each worker closes its copy once applied, and the supervisor closes
its own at once, so that no listening socket is left taking a share of a
removed port's connections that nobody accepts.  Ports the file adds are
bound by each worker itself, with SO_REUSEPORT; a worker started later
reads the file as it is then.  One line says when every worker reported
its reload done, or which did not: refused it (the file changed in
between), ended, or did not report in time.  A port that could not be
bound is not a refusal: the worker's own reload line names it.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.logger import Logger

from ssx.errors import ConfigError
from ssx.workers.control import reload_line
from ssx.workers.sockets import release_removed

__all__ = ["REPORT_WAIT", "SupervisorReload"]

_log = Logger()

# How long the supervisor waits for the workers' reports before it says which are missing.
REPORT_WAIT = 60.0


class SupervisorReload:
    """Reloads for `supervisor` (`ssx.workers.supervisor.Supervisor`): `load()` returns the checked configuration or raises `ConfigError`."""

    def __init__(self, supervisor: Any, load: Callable[[], Any], refusal: Callable[[ConfigError], str]) -> None:
        self.supervisor = supervisor
        self.load = load
        self.refusal = refusal
        # Worker slots whose report is awaited, and what the others said.
        self.waiting: set[int] = set()
        self.refused: dict[int, str] = {}
        self._again = False
        self._timeout: Any = None

    def reload(self) -> None:
        supervisor = self.supervisor
        command = supervisor.command
        if self.waiting:
            # Once the workers have reported, the file is read again.
            self._again = True
            return
        _log.info("{command}: reloading the configuration", command=command)
        try:
            config = self.load()
        except ConfigError as e:
            _log.error("{line} (reload refused: the running configuration stays)", line=self.refusal(e))
            return
        if config.workers != supervisor.count:
            _log.warn("{command}: workers {count} not applied before a restart", command=command, count=config.workers)
        released = release_removed(supervisor.sockets, supervisor.listener_fn(config))
        supervisor.config = config
        # What the supervisor keeps of the configuration (its manager's table of ports).
        for apply in supervisor.reloaded:
            apply(config)
        line = reload_line(released)
        self.refused = {}
        self.waiting = set(supervisor.workers)
        for worker in list(supervisor.workers.values()):
            worker.send(line)
        if not self.waiting:
            self._finish()
            return
        self._timeout = supervisor.reactor.callLater(REPORT_WAIT, self._late)

    def stop(self) -> None:
        """The supervisor stops: no more waiting."""
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        self.waiting = set()
        self._again = False

    def reported(self, slot: int, ok: bool, error: str) -> None:
        """Worker `slot` says how its reload ended."""
        if slot not in self.waiting:
            return
        self.waiting.discard(slot)
        if not ok:
            self.refused[slot] = f"refused it: {error}"
        if not self.waiting:
            self._finish()

    def gone(self, slot: int) -> None:
        """Worker `slot` ended (its successor reads the file as it is)."""
        if slot in self.waiting:
            self.refused[slot] = "ended before it reported (its successor reads the file as it is)"
            self.reported(slot, True, "")

    def _late(self) -> None:
        self._timeout = None
        for slot in sorted(self.waiting):
            self.refused[slot] = f"did not report within {REPORT_WAIT:g} s"
        self.waiting = set()
        self._finish()

    def _finish(self) -> None:
        command = self.supervisor.command
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        if not self.refused:
            _log.info("{command}: reload done in every worker ({count})", command=command,
                      count=len(self.supervisor.workers))
        for slot, error in sorted(self.refused.items()):
            _log.error("{command}: reload: worker {slot} {error}", command=command, slot=slot, error=error)
        if self._again:
            self._again = False
            self.reload()
