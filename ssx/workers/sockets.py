"""
The listening sockets a `--workers` supervisor opens before its workers
start: for every TCP listener and UDP port of the configuration, one
socket per worker slot, all bound to one address with SO_REUSEPORT (the
kernel hashes each connection and each client's datagrams to one of them,
so a UDP client keeps reaching the worker that holds its association).

The supervisor keeps every socket open: a restarted worker gets its slot's
sockets back (connections waiting in a dead worker's accept queue are not
lost), privileged ports are bound once, as root, before twistd drops
privileges, and port 0 is resolved once (the first slot's bind picks the
port, the others bind it).  See benchmarks/RESULTS.md for why one socket
per worker rather than one shared by all.  At a reload, the sockets of
listeners gone from the configuration are closed (`release_removed`).
No Twisted here.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from ssx.net.inherited import datagram_key, stream_key
from ssx.net.tcp import TCP_FASTOPEN, tcp_listen_address

__all__ = ["Listener", "SlotSockets", "close_all", "open_slot_sockets", "release_removed"]

LISTEN_BACKLOG = 4096


@dataclass(frozen=True)
class Listener:
    """One configured listener: TCP `description` (UDP beside it with `udp`), or UDP alone at `host`:`port`."""

    description: str | None = None
    udp: bool = False
    host: str = ""
    port: int = 0
    v6only: bool = False
    fast_open: int = 0


# key (`ssx.net.inherited`) -> socket, one mapping per worker slot.
SlotSockets = dict[str, socket.socket]


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _socket(kind: int, host: str, port: int, v6only: bool) -> socket.socket:
    sock = socket.socket(_family(host), kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if v6only and sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def open_slot_sockets(listeners: list[Listener], slots: int) -> list[SlotSockets]:
    """Every listener's sockets for `slots` workers; `OSError` (all closed again) if one cannot bind."""
    opened: list[SlotSockets] = [{} for _ in range(slots)]
    try:
        for listener in listeners:
            if listener.description is not None:
                host, port, backlog = tcp_listen_address(listener.description)
                if not host:
                    host = "::" if listener.description.startswith("tcp6:") else "0.0.0.0"
                for slot in opened:
                    sock = _socket(socket.SOCK_STREAM, host, port, listener.v6only)
                    slot[stream_key(listener.description)] = sock
                    port = sock.getsockname()[1]
                    if listener.fast_open:
                        try:
                            sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, listener.fast_open)
                        except OSError:
                            pass
                    sock.listen(backlog or LISTEN_BACKLOG)
                    if listener.udp:
                        bound = sock.getsockname()[0]
                        slot[datagram_key(bound, port)] = _socket(socket.SOCK_DGRAM, bound, port, listener.v6only)
            else:
                port = listener.port
                for slot in opened:
                    sock = _socket(socket.SOCK_DGRAM, listener.host, port, listener.v6only)
                    slot[datagram_key(listener.host, listener.port)] = sock
                    port = sock.getsockname()[1]
    except OSError:
        close_all(opened)
        raise
    return opened


def close_all(opened: list[SlotSockets]) -> None:
    for slot in opened:
        for sock in slot.values():
            sock.close()


def release_removed(opened: list[SlotSockets], listeners: list[Listener]) -> list[str]:
    """Close, in every slot, the sockets of listeners not in `listeners` (a reload's); their keys."""
    wanted: set[str] = set()
    for listener in listeners:
        if listener.description is None:
            wanted.add(datagram_key(listener.host, listener.port))
            continue
        key = stream_key(listener.description)
        wanted.add(key)
        for slot in opened:
            if listener.udp and key in slot:
                bound = slot[key].getsockname()
                wanted.add(datagram_key(bound[0], bound[1]))
    removed = sorted({key for slot in opened for key in slot} - wanted)
    for slot in opened:
        for key in removed:
            sock = slot.pop(key, None)
            if sock is not None:
                sock.close()
    return removed
