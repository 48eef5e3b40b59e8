"""
`PortCredentials`: everything one port authenticates its clients with,
as one object that the port's TCP factory and its UDP relays hold by
reference: the `KeyRing` (its keys, tried per connection and datagram)
and each key's `KeyLimit`.  `ssx.server.ports.port_credentials` builds it
from a `PortConfig`; replacing a port's keys at run time is building a
new one and assigning it to the factory and relays (connections already
running keep the codecs they have).  No Twisted here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ssx.crypto import AccessKey, KeyRing
from ssx.crypto._registry import MethodSpec
from ssx.server.key_limits import NO_LIMIT, KeyLimit

__all__ = ["PortCredentials", "credentials_of"]


@dataclass(frozen=True)
class PortCredentials:
    """A port's keys and their limits (by key id)."""

    ring: KeyRing
    limits: Mapping[str, KeyLimit] = field(default_factory=dict)

    @property
    def spec(self) -> MethodSpec:
        """The method of the port's (first) key: the edition its relays speak."""
        return self.ring.spec

    def limit(self, key: AccessKey) -> KeyLimit:
        """`key`'s limits (none for a key without an id)."""
        if key.id is None:
            return NO_LIMIT
        return self.limits.get(key.id, NO_LIMIT)


def credentials_of(keys: Any) -> PortCredentials:
    """`keys` as a port's credentials: as it is, or a ring of one for a bare suite."""
    if isinstance(keys, PortCredentials):
        return keys
    if isinstance(keys, KeyRing):
        return PortCredentials(keys)
    return PortCredentials(KeyRing([AccessKey(None, keys)]))
