"""
`CounterSummary`: one log line every `interval` seconds of what a set of
counters rose by meanwhile, instead of a line per event; counts that did
not rise are left out, and a quiet interval logs nothing.  The server's
summary of what peers caused (`ssx.server.service.CounterReport`) and the
local DNS server's (`ssx.local.dns.DnsSummaryService`) are two of them.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

__all__ = ["CounterSummary"]

_log = Logger()


class CounterSummary(Service):
    """
    Logs, every `interval` seconds (and at stop if `at_stop`), the rise of
    each of `counters` (name, what it counts), read together by `read`.
    `clock` (the reactor) may be replaced before the service starts.
    """

    interval = 600.0

    def __init__(
        self, reactor: Any, counters: Sequence[tuple[str, str]], read: Callable[[], Sequence[int]], head: str,
        at_stop: bool = False,
    ) -> None:
        self.clock = reactor
        self.counters = tuple(counters)
        self._read = read
        self.head = head
        self.at_stop = at_stop
        self._last = tuple(read())
        self._call: LoopingCall | None = None

    def heading(self) -> str:
        """What the line starts with."""
        return self.head

    def report(self) -> None:
        now = tuple(self._read())
        delta = [b - a for a, b in zip(self._last, now)]
        self._last = now
        parts = [f"{count} {what}" for count, (_, what) in zip(delta, self.counters) if count]
        if parts:
            _log.info(
                "{head}: {summary}",
                head=self.heading(),
                summary=", ".join(parts),
                counts=dict(zip([name for name, _ in self.counters], delta)),
            )

    def startService(self) -> None:
        Service.startService(self)
        self._last = tuple(self._read())
        self._call = LoopingCall(self.report)
        self._call.clock = self.clock
        self._call.start(self.interval, now=False)

    def stopService(self) -> None:
        Service.stopService(self)
        if self._call is not None and self._call.running:
            self._call.stop()
        if self.at_stop:
            self.report()
