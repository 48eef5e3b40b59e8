"""
The server's per-user accounting: the application bytes each user of a
multi-user (2022) port relays, up (client to target) and down.

When a connection's relay starts, `ssx.server.protocol` asks the factory's
sink (`ssx.interfaces.IUserTrafficSink`) for the user's counter and wraps
the connection's data path with `counted`; single-user ports relay bare.
A port built to count its traffic (`ssx.server.ports`, for the manager
API) also wraps every connection with `counted_wire` into the port's own
`UserTraffic`, which its UDP relays add to as well: the encrypted bytes,
as Shadowsocks peers and managers count them.
`UserTrafficTable`, the sink a server keeps unless given another, holds
running totals by user name.  No Twisted here.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

from zope.interface import implementer

from ssx.interfaces import ITrafficCounter, IUserTrafficSink
from ssx.traffic import TrafficCounter

__all__ = ["UserTraffic", "UserTrafficTable", "counted", "counted_wire"]

Transform = Callable[[bytes], bytes]


# One user's (or key's, or port's) relayed bytes: `up` (client to target) and `down`.
UserTraffic = TrafficCounter


@implementer(IUserTrafficSink)
class UserTrafficTable(Mapping[str, UserTraffic]):
    """Running totals by user name, from the server's start."""

    def __init__(self) -> None:
        self._users: dict[str, UserTraffic] = {}

    def counter(self, user: str) -> UserTraffic:
        return self._users.setdefault(user, UserTraffic())

    def __getitem__(self, user: str) -> UserTraffic:
        return self._users[user]

    def __iter__(self) -> Iterator[str]:
        return iter(self._users)

    def __len__(self) -> int:
        return len(self._users)

    def snapshot(self) -> list[tuple[str, UserTraffic]]:
        """(user, counter) pairs, copied at once: safe to take from another thread (a scrape's)."""
        return list(self._users.items())


def counted(counter: ITrafficCounter, decrypt: Transform, encrypt: Transform) -> tuple[Transform, Transform]:
    """A connection's (decrypt, encrypt) that also add what they pass to `counter`."""
    add_up, add_down = counter.add_up, counter.add_down

    def counted_decrypt(data: bytes) -> bytes:
        out = decrypt(data)
        add_up(len(out))
        return out

    def counted_encrypt(data: bytes) -> bytes:
        add_down(len(data))
        return encrypt(data)

    return counted_decrypt, counted_encrypt


def counted_wire(counter: ITrafficCounter, decrypt: Transform, encrypt: Transform) -> tuple[Transform, Transform]:
    """
    A connection's (decrypt, encrypt) that add the encrypted bytes they
    take and give to `counter`: what the client sent and is sent.
    """
    add_up, add_down = counter.add_up, counter.add_down

    def counted_decrypt(data: bytes) -> bytes:
        add_up(len(data))
        return decrypt(data)

    def counted_encrypt(data: bytes) -> bytes:
        out = encrypt(data)
        add_down(len(out))
        return out

    return counted_decrypt, counted_encrypt
