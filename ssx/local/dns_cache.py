"""
The answer cache of the local DNS server (`ssx.local.dns`).

An answer is kept for its TTL: the smallest TTL of its answer records, or,
for a negative answer (no such name, or no records of the type), the SOA
minimum of its authority section, capped (RFC 2308).  The cache holds at
most `capacity` answers and forgets the least recently used first.  Its key
holds the route (direct or proxied) beside the question, so an answer the
local resolver gave can never answer a query that must go through the
proxy, even if the route of a name changes (an ACL reload).  Time comes
from the clock passed in (the reactor, or a `task.Clock` in tests).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

from twisted.names import dns

__all__ = ["CacheKey", "DnsCache", "DEFAULT_CAPACITY", "NEGATIVE_TTL_CAP", "answer_ttl", "negative_ttl"]

DEFAULT_CAPACITY = 10_000
# Negative answers are kept at most this long whatever their SOA says
# (RFC 2308 suggests one to three hours; a name that appears should not
# stay missing that long behind a proxy).
NEGATIVE_TTL_CAP = 300
# And positive ones at most a day, as resolvers commonly cap them.
POSITIVE_TTL_CAP = 86_400

# (proxied, name in lower case, type, class)
CacheKey = tuple[bool, bytes, int, int]
Sections = tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]


@dataclass
class _Entry:
    expires: float
    stored: float
    # The three sections of a positive answer, or the exception (a
    # `twisted.names.error.DomainError`) of a negative one.
    sections: Sections | None
    error: Exception | None


def answer_ttl(answers: Sequence[dns.RRHeader]) -> int:
    """How long a positive answer may be kept: its answer records' smallest TTL (capped)."""
    return min(min(rr.ttl for rr in answers), POSITIVE_TTL_CAP)


def negative_ttl(authority: Sequence[dns.RRHeader]) -> int:
    """How long a negative answer may be kept: its SOA's minimum (or TTL if lower), capped; 0 without an SOA."""
    for rr in authority:
        if rr.type == dns.SOA and isinstance(rr.payload, dns.Record_SOA):
            return min(rr.ttl, rr.payload.minimum, NEGATIVE_TTL_CAP)
    return 0


class DnsCache:
    """Answers by route and question, each until its TTL runs out, at most `capacity` of them."""

    def __init__(self, clock: Any, capacity: int = DEFAULT_CAPACITY) -> None:
        self._clock = clock
        self.capacity = capacity
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(proxied: bool, query: dns.Query) -> CacheKey:
        return (proxied, query.name.name.lower(), query.type, query.cls)

    def store(self, key: CacheKey, sections: Sections) -> None:
        """Keep a positive answer (or, with no answer records, a negative one by its SOA)."""
        answers, authority, _ = sections
        ttl = answer_ttl(answers) if answers else negative_ttl(authority)
        self._put(key, ttl, sections, None)

    def store_error(self, key: CacheKey, error: Exception, authority: Sequence[dns.RRHeader]) -> None:
        """Keep a negative answer (no such name) for its SOA minimum."""
        self._put(key, negative_ttl(authority), None, error)

    def _put(self, key: CacheKey, ttl: int, sections: Sections | None, error: Exception | None) -> None:
        if ttl <= 0 or self.capacity <= 0:
            return
        now = self._clock.seconds()
        self._entries[key] = _Entry(now + ttl, now, sections, error)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def lookup(self, key: CacheKey) -> Sections | Exception | None:
        """
        A kept answer for `key` with its TTLs lowered by the time it was
        kept, or the kept negative answer's exception; None if there is none.
        """
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock.seconds()
        if now >= entry.expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        if entry.error is not None:
            return entry.error
        assert entry.sections is not None
        age = int(now - entry.stored)
        answers, authority, additional = entry.sections
        return (_aged(answers, age), _aged(authority, age), _aged(additional, age))


def _aged(records: list[dns.RRHeader], age: int) -> list[dns.RRHeader]:
    """Copies of `records` with `age` seconds taken off their TTLs."""
    if not age:
        return list(records)
    return [
        dns.RRHeader(rr.name.name, rr.type, rr.cls, max(rr.ttl - age, 0), rr.payload, rr.auth)
        for rr in records
    ]
