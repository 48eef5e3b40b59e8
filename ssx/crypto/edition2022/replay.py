"""
Freshness checks of Shadowsocks 2022 (wire.md §7.5, §7.6): the ±30 s
timestamp window, the server's exact salt pool for TCP, and the per-session
sliding window of UDP packet IDs.

The TCP and UDP codecs call `check_timestamp` on every header they open; a
TCP server hands its `RequestDecoder`s one shared `SaltPool`; the UDP
session table (protocol layer) keeps one `SlidingWindow` per peer session.
Time always comes in from the caller (``now``), never from the system
clock, so tests drive it.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Protocol, Union

from ssx.errors import ReplayError, ProtocolError

__all__ = [
    "Clock",
    "MAX_TIME_DIFF",
    "SALT_RETENTION",
    "WINDOW_SIZE",
    "ReplayError",
    "StaleTimestampError",
    "SaltChecker",
    "SaltCheck",
    "SaltPool",
    "SlidingWindow",
    "check_timestamp",
    "as_salt_check",
]

#: Where the codecs read the time: seconds since the epoch (``reactor.seconds``).
Clock = Callable[[], float]

#: Largest accepted |now - timestamp| in seconds (rust's
#: SERVER_STREAM_TIMESTAMP_MAX_DIFF).
MAX_TIME_DIFF = 30

#: How long an accepted salt is remembered.  A header stamped now + 30 s is
#: still fresh 60 s from now; the extra second covers truncating `now` to
#: whole seconds before comparing.
SALT_RETENTION = 2.0 * MAX_TIME_DIFF + 1.0

#: Packet IDs older than ``newest - WINDOW_SIZE`` are refused; rust's ring of
#: 128 64-bit words gives (128 - 1) * 64.
WINDOW_SIZE = (128 - 1) * 64


class StaleTimestampError(ProtocolError):
    """A header's timestamp is more than 30 s away from our clock."""


def check_timestamp(timestamp: int, now: float) -> None:
    """Raise StaleTimestampError unless |int(now) - timestamp| <= 30 s."""
    if abs(int(now) - timestamp) > MAX_TIME_DIFF:
        raise StaleTimestampError(
            f"header timestamp {timestamp} is {int(now) - timestamp:+d} s from now"
        )


class SaltChecker(Protocol):
    """What a TCP server asks whether a client salt is new."""

    def check_and_add(self, salt: bytes) -> bool:
        """True if `salt` was never seen (it is remembered from now on), else False."""


SaltCheck = Union[SaltChecker, Callable[[bytes], bool]]


def as_salt_check(checker: SaltCheck) -> Callable[[bytes], bool]:
    """The bound ``check_and_add`` of an object, or a plain callable as is."""
    method = getattr(checker, "check_and_add", None)
    if method is not None:
        return method
    if callable(checker):
        return checker
    raise TypeError(f"{checker!r} is neither callable nor has check_and_add")


class SaltPool:
    """
    The exact set of client salts accepted in the last `retention` seconds.

    One per server, shared by all its ports' connections and kept across
    reloads (a suite alone has one of its own).  Exact (no Bloom
    filter: a false positive would refuse an honest client) and bounded by
    time only: entries can only be added by clients that hold a key, and
    each leaves after `retention` seconds.  Expiry is amortised O(1): salts
    sit in a queue in arrival order.
    """

    __slots__ = ("_now", "_retention", "_seen", "_queue")

    def __init__(self, now: Clock, retention: float = SALT_RETENTION) -> None:
        if retention < 2 * MAX_TIME_DIFF:
            raise ValueError(f"salt retention must be >= {2 * MAX_TIME_DIFF} s")
        self._now = now
        self._retention = retention
        self._seen: set[bytes] = set()
        self._queue: deque[tuple[float, bytes]] = deque()

    def check_and_add(self, salt: bytes) -> bool:
        """True if `salt` is new (and now remembered); False for a replay."""
        now = self._now()
        self._expire(now)
        if salt in self._seen:
            return False
        salt = bytes(salt)
        self._seen.add(salt)
        self._queue.append((now + self._retention, salt))
        return True

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, salt: object) -> bool:
        return salt in self._seen

    def _expire(self, now: float) -> None:
        # If the clock steps back, later entries may expire before earlier
        # ones; they then stay a little longer than needed, never shorter.
        queue = self._queue
        seen = self._seen
        while queue and queue[0][0] < now:
            seen.discard(queue.popleft()[1])


class SlidingWindow:
    """
    Anti-replay filter over the packet IDs of one UDP session (WireGuard's).

    Accepts each ID at most once, and only IDs no older than
    ``newest - WINDOW_SIZE``; newer IDs slide the window forward.  Call
    `check` early if you like, and `add` only once the packet has been
    authenticated and its timestamp checked (wire.md §7.6); `accept` does
    both for callers that have already authenticated.
    """

    __slots__ = ("_newest", "_bits")

    _MASK = (1 << (WINDOW_SIZE + 1)) - 1

    def __init__(self) -> None:
        self._newest = 0
        # Bit i set <=> packet ID (newest - i) was seen.
        self._bits = 0

    def check(self, packet_id: int) -> bool:
        """True if `packet_id` would be accepted now (nothing is recorded)."""
        newest = self._newest
        if packet_id > newest:
            return True
        age = newest - packet_id
        if age > WINDOW_SIZE:
            return False
        return not (self._bits >> age) & 1

    def add(self, packet_id: int) -> None:
        """Record `packet_id` as seen (after `check` said True)."""
        newest = self._newest
        if packet_id > newest:
            shift = packet_id - newest
            if shift > WINDOW_SIZE:
                self._bits = 1
            else:
                self._bits = ((self._bits << shift) | 1) & self._MASK
            self._newest = packet_id
        else:
            self._bits |= 1 << (newest - packet_id)

    def accept(self, packet_id: int) -> bool:
        """`check` then `add`; False (nothing recorded) for a replay or a too-old ID."""
        if not self.check(packet_id):
            return False
        self.add(packet_id)
        return True

    def require(self, packet_id: int) -> None:
        """Like `accept`, but raise ReplayError instead of returning False."""
        if not self.accept(packet_id):
            raise ReplayError(f"UDP packet ID {packet_id} replayed or too old")
