"""
The replay windows of a server's 2022 UDP sessions (SIP022 §3.2.2), kept
apart from the relays' NAT tables.

A 2022 UDP packet stamped T passes the timestamp check while
``int(now) - T <= MAX_TIME_DIFF``, so a session's sliding window of packet
IDs must live at least that long after its newest packet, whatever happens
to the NAT entry that routes its replies: an entry that idles out (a
``udp_timeout`` below 30 s) or is pushed out of a full table must not let a
captured packet open the session again with a fresh window.  And a server
bound to several addresses (``"server": ["::", "0.0.0.0"]``) has a relay
per address: one store serves them all, so a packet captured on one is
refused on the other.

Windows of sessions no relay holds are kept while fresh, up to a bound;
beyond it the oldest is dropped and its session key goes into a Bloom
filter, which refuses that session until the filter has turned over (2**17
to 2**18 later forgettings: a user would have to push out that many fresh
sessions of its own within 30 s to reopen one).  No Twisted here.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

from ssx.crypto import MAX_TIME_DIFF
from ssx.crypto import SaltFilter
from ssx.errors import ReplayError

__all__ = ["FORGOTTEN_HISTORY", "SessionState", "SessionWindows"]

#: Session keys remembered after their window was dropped while fresh.
FORGOTTEN_HISTORY = 1 << 18


class SessionState:
    """What a 2022 UDP session keeps across relays and NAT entries."""

    __slots__ = ("window", "newest", "reply_session", "holders")

    def __init__(self, window: Any, reply_session: Any) -> None:
        self.window = window
        #: The newest timestamp of an accepted packet (0: none yet).
        self.newest = 0
        #: The server side of the session: its session ID and packet counter.
        self.reply_session = reply_session
        #: How many relays' NAT tables hold the session now.
        self.holders = 0

    def fresh(self, now: float) -> bool:
        """Whether a packet of this session could still pass the timestamp check."""
        return self.newest > 0 and int(now) - self.newest <= MAX_TIME_DIFF


class SessionWindows:
    """The sessions of one server's 2022 UDP relays, by (user, session ID)."""

    def __init__(self, new_window: Callable[[], Any], retired_capacity: int, forgotten: int = FORGOTTEN_HISTORY) -> None:
        self._new_window = new_window
        self.retired_capacity = retired_capacity
        self._live: dict[Any, SessionState] = {}
        self._retired: OrderedDict[Any, SessionState] = OrderedDict()
        # Session names, not salts: every byte of them counts.
        self._forgotten = SaltFilter(forgotten, marks=False)
        self.forgotten_early = 0

    def __len__(self) -> int:
        """Sessions known: held by a relay, or retired while fresh."""
        return len(self._live) + len(self._retired)

    @staticmethod
    def _name(key: Any) -> bytes:
        user, session_id = key
        return (user.name.encode() if user is not None else b"") + b"\0" + session_id

    def open(self, key: Any, now: float, reply_session: Callable[[], Any]) -> SessionState:
        """
        The state of session `key` for a relay about to hold it (pair with
        `close`); raises ReplayError for a session whose window was dropped
        while it was fresh.
        """
        state = self._live.get(key)
        if state is None:
            state = self._retired.pop(key, None)
            if state is None or not state.fresh(now):
                if self._forgotten.remembers(self._name(key)):
                    raise ReplayError("2022 UDP: a session whose replay window was dropped while fresh")
                state = SessionState(self._new_window(), reply_session())
            self._live[key] = state
        state.holders += 1
        return state

    def close(self, key: Any, state: SessionState, now: float) -> None:
        """A relay no longer holds session `key`; its window is kept while fresh."""
        state.holders -= 1
        if state.holders > 0:
            return
        del self._live[key]
        if not state.fresh(now):
            return
        retired = self._retired
        retired[key] = state
        while len(retired) > self.retired_capacity:
            old_key, old = retired.popitem(last=False)
            if old.fresh(now):
                self._forgotten.add(self._name(old_key))
                self.forgotten_early += 1
