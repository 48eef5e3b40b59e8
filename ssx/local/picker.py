"""
Which server a new local-end connection goes to.

The local end may know several servers (the `servers` list, repeated
`--url`, an online config).  `ServerPicker` keeps, per server, whether it
is up, an average latency measured by the health check (`ssx.local.health`) and
its consecutive failures, and offers the servers best first: up before
down, then lowest latency, then configuration order.  A connection that
cannot reach a server reports it (`failed`) and the server is down until a
connection or a check gets through again.  `LocalRelayProtocol.open_relay`
asks it for candidates and tries the next one when a server cannot be
reached.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

from twisted.logger import Logger
from zope.interface import implementer

from ssx.interfaces import IServerPicker, IUpstream
from ssx.config.upstreams import ServerEntry

__all__ = ["LATENCY_WEIGHT", "ServerPicker"]

_log = Logger()

# Weight of a new latency sample in the moving average.
LATENCY_WEIGHT = 0.3


class _Health:
    __slots__ = ("up", "latency", "failures")

    def __init__(self) -> None:
        # Unknown counts as up: a server is tried before anything is known.
        self.up = True
        self.latency: float | None = None
        self.failures = 0


@implementer(IServerPicker)
class ServerPicker:
    """Per-server health, and the order in which to try them."""

    def __init__(self, upstreams: Iterable[IUpstream] = ()) -> None:
        self._static = list(upstreams)
        self._dynamic: list[IUpstream] = []
        self._health: dict[IUpstream, _Health] = {u: _Health() for u in self._static}

    def upstreams(self) -> list[IUpstream]:
        return self._static + self._dynamic

    def candidates(self) -> list[IUpstream]:
        if not self._dynamic and len(self._static) == 1:
            # One server (the common case): the ranking has nothing to order.
            return list(self._static)
        ranked = []
        for index, upstream in enumerate(self.upstreams()):
            h = self._health[upstream]
            ranked.append(((not h.up, h.failures, h.latency is None, h.latency or 0.0, index), upstream))
        ranked.sort(key=lambda pair: pair[0])
        return [upstream for _, upstream in ranked]

    def health(self, upstream: IUpstream) -> tuple[bool, float | None, int]:
        """(up, average latency in seconds or None, consecutive failures)."""
        h = self._health[upstream]
        return h.up, h.latency, h.failures

    def succeeded(self, upstream: IUpstream) -> None:
        h = self._health.get(upstream)
        if h is None:  # dropped by an online config refresh meanwhile
            return
        h.failures = 0
        if not h.up:
            h.up = True
            _log.info("server {server} is up again", server=upstream.label)

    def failed(self, upstream: IUpstream, reason: str) -> None:
        h = self._health.get(upstream)
        if h is None:
            return
        h.failures += 1
        if h.up:
            h.up = False
            _log.warn("server {server} marked down: {reason}", server=upstream.label, reason=reason)

    def checked(self, upstream: IUpstream, latency: float | None) -> None:
        if latency is None:
            self.failed(upstream, "health check failed")
            return
        h = self._health.get(upstream)
        if h is None:
            return
        h.latency = latency if h.latency is None else (1 - LATENCY_WEIGHT) * h.latency + LATENCY_WEIGHT * latency
        _log.debug("server {server}: {ms:.1f} ms to the check target", server=upstream.label, ms=latency * 1000)
        self.succeeded(upstream)

    def replace_static(self, entries: Sequence[ServerEntry], build: Callable[[ServerEntry], IUpstream]) -> None:
        """
        Make the configured servers exactly `entries`, in that order (a
        reload): a server already there keeps its upstream and health, a
        new one is built; the running connections of one that goes keep it.
        """
        self._static = self._rebuilt(self._static, entries, build, set())
        # An online server that is now configured is the configured one.
        wanted = set(entries)
        dynamic = [u for u in self._dynamic if u.entry not in wanted]
        for gone in [u for u in self._dynamic if u not in dynamic]:
            del self._health[gone]
        self._dynamic = dynamic

    def replace_dynamic(self, entries: Sequence[ServerEntry], build: Callable[[ServerEntry], IUpstream]) -> None:
        # Each server once, and not again beside the configured one.
        unique = list(dict.fromkeys(entries))
        self._dynamic = self._rebuilt(self._dynamic, unique, build, {u.entry for u in self._static})

    def _rebuilt(
        self, current: list[IUpstream], entries: Sequence[ServerEntry], build: Callable[[ServerEntry], IUpstream],
        skip: set[ServerEntry],
    ) -> list[IUpstream]:
        """
        The upstreams of `entries` (but those in `skip`): those of `current`
        kept with their health, new ones built; the health of those that
        went is forgotten.
        """
        known = {u.entry: u for u in current}
        upstreams: list[IUpstream] = []
        for entry in entries:
            if entry in skip:
                continue
            upstream = known.pop(entry, None)
            if upstream is None:
                upstream = build(entry)
                self._health[upstream] = _Health()
            upstreams.append(upstream)
        for gone in known.values():
            del self._health[gone]
        return upstreams
