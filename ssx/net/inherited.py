"""
Listening sockets a worker process inherits from its supervisor
(`ssx.workers`): which file descriptor serves which listener.

The supervisor opens every configured listener's sockets before it starts
the workers, and hands each worker its own (`spawnProcess(childFDs=...)`);
the worker records them here once, at start (`inherit`), and the
listeners (`ssx.net.listener`) take theirs instead of binding: TCP by
the listener's endpoint description, UDP by the address it would bind.
A listener with no inherited socket (a port the manager API adds while a
worker runs) binds its own, with SO_REUSEPORT in a worker.  A listener
keeps its inherited descriptor while it stops and starts again (a port
restarted by a reload); a port removed for good `release`s it, so that
the socket closes once the supervisor has closed its copy too.  No
Twisted here.
"""

from __future__ import annotations

import os

__all__ = ["datagram_key", "inherit", "inherited", "release", "stream_key"]

# key -> (file descriptor, address family); empty outside a worker.
_sockets: dict[str, tuple[int, int]] = {}


def stream_key(description: str) -> str:
    """The key of the TCP listener for the endpoint `description`."""
    return f"tcp {description}"


def datagram_key(host: str, port: int) -> str:
    """The key of the UDP socket bound to `host`:`port` (the port as configured, or as the TCP listener bound it)."""
    return f"udp {host} {port}"


def inherit(sockets: dict[str, tuple[int, int]]) -> None:
    """Record the sockets this process was handed (a worker, at start)."""
    _sockets.update(sockets)


def inherited(key: str) -> tuple[int, int] | None:
    """The file descriptor and family of the socket inherited for `key`, if any."""
    return _sockets.get(key)


def release(key: str) -> None:
    """Close the socket inherited for `key` (its listener is gone for good); nothing if there is none."""
    entry = _sockets.pop(key, None)
    if entry is not None:
        os.close(entry[0])
