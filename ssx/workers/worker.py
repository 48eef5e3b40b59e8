"""
One `--workers` worker: ``python -m ssx.workers.worker``, started by the
supervisor (`ssx.workers.supervisor`) with its control pipes on fds 3
(read) and 4 (write) and its listening sockets after them.

It reads the supervisor's `hello` line, reads the configuration from the
same command line as the supervisor did, builds the same service tree as
a single process (`build_service`, reloaded on SIGHUP), with the inherited sockets
(`ssx.net.inherited`), the shared replay filter, SO_REUSEPORT for ports
the manager adds, and no manager socket of its own; then runs the
reactor.  It logs to its stdout (level, then text), which the supervisor
reads; SIGTERM drains it as it would a single process; the end of its
control pipe (the supervisor gone, whatever way) stops it the same way.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import signal
import sys
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, formatEvent, globalLogBeginner
from twisted.python.failure import Failure

from ssx.errors import ConfigError
from ssx.net.reload import ReloadService
from ssx.wire.manager import ManagerRequestError, parse_request
from ssx.workers.control import CONTROL_IN, CONTROL_OUT, parse_hello, stat_line

__all__ = ["main"]

_log = Logger()

REPORT_INTERVAL = 1.0


def _read_hello(fd: int) -> tuple[dict[str, Any], bytes]:
    data = b""
    while b"\n" not in data:
        chunk = os.read(fd, 65536)
        if not chunk:
            raise SystemExit("ssx worker: no hello from the supervisor")
        data += chunk
    line, _, rest = data.partition(b"\n")
    return parse_hello(line), rest


def _observer(out: TextIO) -> Any:
    def observe(event: dict[str, Any]) -> None:
        text = formatEvent(event)
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            text += "\n" + failure.getTraceback()
        level = event.get("log_level")
        name = level.name if level is not None else "info"
        for line in text.splitlines() or [""]:
            out.write(f"{name} {line}\n")
        out.flush()

    return observe


class _Control(Protocol):
    """The supervisor's requests in; the end of the pipe stops this worker."""

    def __init__(self, reactor: Any, service: Any, pending: bytes) -> None:
        self.reactor = reactor
        self.service = service
        self._buffer = pending
        self.stopping = False
        reactor.addSystemEventTrigger("before", "shutdown", self._stopping)

    def _stopping(self) -> None:
        self.stopping = True

    def connectionMade(self) -> None:
        if self._buffer:
            data, self._buffer = self._buffer, b""
            self.dataReceived(data)

    def dataReceived(self, data: bytes) -> None:
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            self._request(line)

    def _request(self, line: bytes) -> None:
        protocol = getattr(self.service, "manager_protocol", None)
        if protocol is None:
            return
        try:
            protocol.answer(parse_request(line))
        except (ManagerRequestError, ConfigError) as e:
            _log.warn("manager request from the supervisor refused: {error}", error=e)

    def report(self, totals: dict[int, int]) -> None:
        if self.transport is not None:
            self.transport.write(stat_line(totals))

    def connectionLost(self, reason: Any = None) -> None:
        if self.reactor.running and not self.stopping:
            _log.info("the supervisor is gone: stopping")
            self.reactor.stop()


def _build(reactor: Any, hello: dict[str, Any]) -> Any:
    from ssx.crypto import SharedSaltFilter

    command = hello["command"]
    if command == "ssx-server":
        from ssx.server import tap as server_tap

        options: Any = server_tap.Options()
    else:
        from ssx.local import tap as local_tap

        options = local_tap.Options()
    # One worker writes the server's URL file.
    quiet = {"url_file": ""} if command == "ssx-server" and hello["slot"] != 0 else {}
    options.overrides = {**hello.get("overrides", {}), **quiet}
    options.parseOptions(hello["argv"])

    def worker_config(config: Any) -> Any:
        return dataclasses.replace(config, workers=1, reuse_port=True)

    config = worker_config(options.config)
    os.chdir(hello["rundir"])
    if command == "ssx-server":
        salt_filter = None
        if hello.get("salt_fd") is not None:
            salt_filter = SharedSaltFilter(hello["salt_fd"], config.replay_history)
        service: Any = server_tap.build_service(reactor, config, salt_filter=salt_filter, manager_listens=False)
    else:
        service = local_tap.build_service(reactor, config)
    # SIGHUP (passed on by the supervisor) reloads the worker as it does
    # a single process: the file read again, the same command line over it.
    ReloadService(
        reactor, command, lambda: worker_config(options.load_config()), lambda new: _applied(service.reload.apply(new)),
        options.config_error,
    ).setServiceParent(service)
    return service


def _applied(result: Any) -> Any:
    """What an end's reload `apply` returned, as ReloadService takes it (the server's is a coroutine)."""
    return Deferred.fromCoroutine(result) if inspect.iscoroutine(result) else result


def _totals(service: Any) -> dict[int, int]:
    protocol = getattr(service, "manager_protocol", None)
    return dict(protocol.totals()) if protocol is not None else {}


def main() -> None:
    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO
    from twisted.internet.task import LoopingCall

    from ssx.net.inherited import inherit

    hello, pending = _read_hello(CONTROL_IN)
    globalLogBeginner.beginLoggingTo([_observer(sys.stdout)], redirectStandardIO=False)
    os.chdir(hello["cwd"])
    inherit({key: (fd, family) for key, (fd, family) in hello["sockets"].items()})
    service = _build(reactor, hello)
    # SIGHUP is passed on by the supervisor; it must not end a worker
    # before the service's reload handler takes it over.
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(_log.info, "SIGHUP received"))  # type: ignore[attr-defined]
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    control = _Control(reactor, service, pending)
    # mypy sees the Windows StandardIO, which has no stdin/stdout arguments.
    StandardIO(control, stdin=CONTROL_IN, stdout=CONTROL_OUT, reactor=reactor)  # type: ignore[call-arg]
    last: dict[int, int] = {}

    def report() -> None:
        nonlocal last
        totals = _totals(service)
        if totals != last:
            last = totals
            control.report(totals)

    LoopingCall(report).start(REPORT_INTERVAL, now=False)
    reactor.run()


if __name__ == "__main__":
    main()
