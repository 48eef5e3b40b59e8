"""
Per-key limits of a port's access keys: most connections at once
(`max_connections`) and a byte quota per period (`quota`), as an
operator sets them on each key (`ssx.config.keys`).

`KeyUsage` is the state a port keeps by key id, apart from the keys
themselves (so that a port's keys can be replaced while their
connections and counts go on): the connections each key has open and the
bytes each has relayed in its current quota period.  The server protocol
asks `admit` once a connection's header is in, and refuses the
connection the way it refuses a wrong key (silence) when the key is at a
limit; the first refusal of an episode logs one line naming the key id.
Bytes reach the quota through the accounting seam: the user counter of
the connection is wrapped with `counted_against`.  Quotas count the
application bytes of both directions, in periods that start at the key's
first connection; a connection that is running when its key reaches the
quota goes on, later ones are refused until the next period.
Nothing here reads the reactor: the clock is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple

from twisted.logger import Logger
from zope.interface import implementer

from ssx.interfaces import ITrafficCounter

__all__ = ["KeyLimit", "KeyReport", "KeyUsage", "NO_LIMIT"]

_log = Logger()


@dataclass(frozen=True)
class KeyLimit:
    """What one key may use: connections at once and bytes per period (0: no bound)."""

    max_connections: int = 0
    quota_bytes: int = 0
    quota_period: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.max_connections or self.quota_bytes)


NO_LIMIT = KeyLimit()


class KeyReport(NamedTuple):
    """What the metrics read of one key: its refusals by limit, and its quota use this period (None: no quota)."""

    key: str
    refused_connections: int
    refused_quota: int
    quota_used: int | None


class _KeyState:
    __slots__ = (
        "open", "warned_connections", "period_start", "used", "warned_quota", "refused_connections", "refused_quota",
    )

    def __init__(self) -> None:
        self.open = 0
        self.warned_connections = False
        self.period_start: float | None = None
        self.used = 0
        self.warned_quota = False
        self.refused_connections = 0
        self.refused_quota = 0


@implementer(ITrafficCounter)
class _QuotaCounter:
    """A user counter that also adds to its key's quota tally."""

    __slots__ = ("_inner", "_state")

    def __init__(self, inner: ITrafficCounter, state: _KeyState) -> None:
        self._inner = inner
        self._state = state

    def add_up(self, count: int) -> None:
        self._state.used += count
        self._inner.add_up(count)

    def add_down(self, count: int) -> None:
        self._state.used += count
        self._inner.add_down(count)


class KeyUsage:
    """A port's use of its keys, by key id; `now` is the reactor's clock."""

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self._keys: dict[str, _KeyState] = {}
        #: Connections refused because their key was at a limit.
        self.refused = 0

    def open_connections(self, key_id: str) -> int:
        state = self._keys.get(key_id)
        return state.open if state is not None else 0

    def used(self, key_id: str) -> int:
        """Bytes counted against `key_id`'s quota in its current period."""
        state = self._keys.get(key_id)
        return state.used if state is not None else 0

    def admit(self, key_id: str, limit: KeyLimit) -> bool:
        """
        Whether a new connection of `key_id` may go on; if so it counts
        as open until `release`.  A refusal logs once per episode.
        """
        state = self._keys.get(key_id)
        if state is None:
            state = self._keys[key_id] = _KeyState()
        if limit.quota_bytes and self._over_quota(key_id, state, limit):
            self.refused += 1
            state.refused_quota += 1
            return False
        if limit.max_connections and state.open >= limit.max_connections:
            self.refused += 1
            state.refused_connections += 1
            if not state.warned_connections:
                state.warned_connections = True
                _log.warn(
                    "key {key}: {count} connections open, its max_connections: further ones are refused "
                    "(silence, as for a wrong key) until one closes",
                    key=key_id, count=state.open,
                )
            return False
        state.open += 1
        return True

    def release(self, key_id: str) -> None:
        """A connection `admit` let in has ended."""
        state = self._keys.get(key_id)
        if state is None or not state.open:
            return
        state.open -= 1
        # Below the bound again: the next time it is reached is worth a line.
        state.warned_connections = False

    def report(self, limits: Mapping[str, KeyLimit]) -> list[KeyReport]:
        """
        Each key seen so far, for the metrics (read in another thread: it
        copies what it iterates, and changes nothing).  A quota whose
        period has ended reads 0, although the tally is reset only at
        the key's next connection.
        """
        now = self._now()
        reports = []
        for key_id, state in list(self._keys.items()):
            limit = limits.get(key_id, NO_LIMIT)
            used: int | None = None
            if limit.quota_bytes:
                start = state.period_start
                ended = start is not None and limit.quota_period > 0 and now >= start + limit.quota_period
                used = 0 if ended else state.used
            reports.append(KeyReport(key_id, state.refused_connections, state.refused_quota, used))
        return reports

    def counted_against(self, key_id: str, counter: ITrafficCounter) -> ITrafficCounter:
        """`counter`, also adding what it counts to `key_id`'s quota."""
        state = self._keys.get(key_id)
        if state is None:
            state = self._keys[key_id] = _KeyState()
        return _QuotaCounter(counter, state)

    def _over_quota(self, key_id: str, state: _KeyState, limit: KeyLimit) -> bool:
        now = self._now()
        start = state.period_start
        if start is None:
            state.period_start = now
        elif now >= start + limit.quota_period:
            # A new period: periods follow each other from the key's first connection.
            periods = (now - start) // limit.quota_period
            state.period_start = start + periods * limit.quota_period
            state.used = 0
            state.warned_quota = False
        if state.used < limit.quota_bytes:
            return False
        if not state.warned_quota:
            state.warned_quota = True
            assert state.period_start is not None
            _log.warn(
                "key {key}: quota of {quota} bytes reached ({used} bytes this period): new connections are "
                "refused (silence, as for a wrong key) for {left:.0f} s more, until the period ends",
                key=key_id, quota=limit.quota_bytes, used=state.used,
                left=state.period_start + limit.quota_period - now,
            )
        return True
