"""
Watching a `--workers` server from outside: which process holds a TCP
connection (from /proc), whether a pid is still running, the worker pids
the supervisor's log names, the end of a reload the supervisor ran; and
`Recorder`, a loopback forwarder that keeps the bytes a client sent
through it (a valid first packet, to replay).
"""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.internet import protocol, reactor

__all__ = ["Recorder", "alive", "connection_owner", "reload_workers", "started_workers"]

_STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")
_WORKER_LINE = re.compile(rb"worker \d+ \[\d+\]: ")
# The supervisor's lines that end a reload: every worker done, a worker's failure, or the file refused.
_RELOAD_ENDS = (b"reload done in every worker", b": reload: worker ", b"(reload refused: ")


def started_workers(text: str) -> list[tuple[int, int]]:
    """(slot, pid) of every worker start the supervisor logged, in order."""
    return [(int(slot), int(pid)) for slot, pid in _STARTED.findall(text)]


async def reload_workers(child: Any, seconds: float = 20.0) -> str:
    """SIGHUP to a `--workers` supervisor (a twistd child); the supervisor's line that ends the reload."""
    from tests.support.waiting import wait_until

    def ended() -> list[bytes]:
        return [line for line in b"".join(child.output).splitlines()
                if not _WORKER_LINE.search(line) and any(end in line for end in _RELOAD_ENDS)]

    before = len(ended())
    child.transport.signalProcess("HUP")
    await wait_until(lambda: len(ended()) > before or child.ended.called, seconds, step=0.05)
    lines = ended()
    if len(lines) <= before:
        raise AssertionError(f"the supervisor did not finish a reload after SIGHUP: {child.text()}")
    return lines[before].decode(errors="replace")


def alive(pid: int) -> bool:
    """Whether `pid` is a running process (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _inodes(local_port: int, remote_port: int | None) -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if int(local.rsplit(":", 1)[1], 16) != local_port:
                continue
            if remote_port is not None and int(remote.rsplit(":", 1)[1], 16) != remote_port:
                continue
            found.add(inode)
    return found


def connection_owner(pids: list[int], local_port: int, remote_port: int | None = None) -> int | None:
    """Which of `pids` holds the TCP socket on `local_port` (to `remote_port`, if given); None if none does."""
    inodes = {f"socket:[{inode}]" for inode in _inodes(local_port, remote_port) if inode != "0"}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return pid
            except OSError:
                continue
    return None


class _Upstream(protocol.Protocol):
    def __init__(self, downstream: _Downstream) -> None:
        self.downstream = downstream

    def connectionMade(self) -> None:
        self.downstream.upstream_made(self)

    def dataReceived(self, data: bytes) -> None:
        factory = self.downstream.factory
        factory.returned[self.downstream.index] += len(data)
        self.downstream.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.downstream.transport.loseConnection()


class _Downstream(protocol.Protocol):
    factory: Recorder

    def connectionMade(self) -> None:
        self.sent = bytearray()
        self.factory.recorded.append(self.sent)
        self.index = len(self.factory.returned)
        self.factory.returned.append(0)
        self.pending: list[bytes] = []
        self.upstream: _Upstream | None = None
        self.transport.pauseProducing()
        creator = protocol.ClientCreator(reactor, _Upstream, self)
        creator.connectTCP("127.0.0.1", self.factory.port).addErrback(lambda _: self.transport.loseConnection())

    def upstream_made(self, upstream: _Upstream) -> None:
        self.upstream = upstream
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        self.sent += data
        assert self.upstream is not None
        self.upstream.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.upstream is not None:
            self.upstream.transport.loseConnection()


class Recorder(protocol.Factory):
    """
    Forwards each connection to 127.0.0.1:`port`; keeps what each client
    sent (`recorded`) and counts what came back (`returned`), one entry
    per connection.
    """

    protocol = _Downstream

    def __init__(self, port: int) -> None:
        self.port = port
        self.recorded: list[bytearray] = []
        self.returned: list[int] = []

    def total(self) -> int:
        """The bytes of every connection, both ways."""
        return sum(len(sent) for sent in self.recorded) + sum(self.returned)

    def listen(self) -> Any:
        return reactor.listenTCP(0, self, interface="127.0.0.1")


