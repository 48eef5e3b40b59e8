"""
One `--workers` worker: ``python -m ssx.workers.worker``, started by the
supervisor (`ssx.workers.supervisor`) with its control pipes on fds 3
(read) and 4 (write) and its listening sockets after them.

It reads the supervisor's `hello` line, reads the configuration from the
same command line as the supervisor did, builds the same service tree as
a single process (`build_service`, reloaded on SIGHUP), with the inherited sockets
(`ssx.net.inherited`), the shared replay filter, SO_REUSEPORT for ports
the manager or a reload adds, no manager socket of its own, and, with
``--metrics``, its registry served on the private Unix socket the
supervisor named (the supervisor serves the sums); then runs the reactor.
It logs to its stdout (level, then text), which the supervisor reads;
SIGTERM drains it as it would a single process; the end of its control
pipe (the supervisor gone, whatever way) stops it the same way.

A reload is the supervisor's `reload:` request (SIGHUP itself is left to
the supervisor, which checks the file first): the same `ReloadService`
reload as a single process runs, the file read again here, after which
the inherited sockets of listeners gone from the file are closed and the
outcome is reported (`reloaded:`).
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
from ssx.net.inherited import release
from ssx.net.reload import ReloadService
from ssx.wire.manager import ManagerRequestError, parse_request
from ssx.workers.control import CONTROL_IN, CONTROL_OUT, parse_hello, parse_reload, reloaded_line, stat_line

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

    def __init__(self, reactor: Any, service: Any, pending: bytes, reload: WorkerReload | None = None) -> None:
        self.reactor = reactor
        self.service = service
        self.reload = reload
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
        released = parse_reload(line)
        if released is not None:
            if self.reload is not None:
                self.reload.run(released).addCallback(self._reloaded)
            return
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

    def _reloaded(self, outcome: tuple[bool, str]) -> None:
        if self.transport is not None:
            self.transport.write(reloaded_line(*outcome))

    def connectionLost(self, reason: Any = None) -> None:
        if self.reactor.running and not self.stopping:
            _log.info("the supervisor is gone: stopping")
            self.reactor.stop()


class WorkerReload:
    """
    A single process's reload (`ReloadService`, over the end's `apply`),
    run at the supervisor's request: `run` fires with (ok, the refusal's
    or failure's line).
    """

    def __init__(self, reactor: Any, label: str, load: Any, apply: Any, refusal: Any) -> None:
        self._load = load
        self._apply = apply
        self._refusal = refusal
        self._outcome: tuple[bool, str] = (True, "")
        self.service = ReloadService(reactor, label, self._loading, self._applying, refusal)

    def _loading(self) -> Any:
        try:
            return self._load()
        except ConfigError as e:
            self._outcome = (False, self._refusal(e))
            raise

    def _applying(self, config: Any) -> Any:
        from twisted.internet.defer import maybeDeferred

        def failed(failure: Failure) -> Failure:
            self._outcome = (False, f"reload failed: {failure.getErrorMessage()}")
            return failure

        return maybeDeferred(self._apply, config).addErrback(failed)

    def run(self, release_keys: list[str]) -> Any:
        self._outcome = (True, "")

        def finished(_: Any) -> tuple[bool, str]:
            if self._outcome[0]:
                for key in release_keys:
                    release(key)
            return self._outcome

        return self.service.reload().addCallback(finished)


def _build(reactor: Any, hello: dict[str, Any]) -> tuple[Any, WorkerReload]:
    """The worker's service tree, and what reloads it."""
    from twisted.internet.defer import Deferred

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

    def load() -> Any:
        # One worker of several: ports it adds are shared with SO_REUSEPORT.
        return dataclasses.replace(options.load_config(), workers=1, reuse_port=True)

    config = dataclasses.replace(options.config, workers=1, reuse_port=True)
    os.chdir(hello["rundir"])
    if command == "ssx-server":
        salt_filter = None
        if hello.get("salt_fd") is not None:
            salt_filter = SharedSaltFilter(hello["salt_fd"], config.replay_history)
        server = server_tap.build_service(reactor, config, salt_filter=salt_filter, manager_listens=False)
        apply: Any = lambda new: Deferred.fromCoroutine(server.reload.apply(new))
        return server, WorkerReload(reactor, command, load, apply, options.config_error)
    service = local_tap.build_service(reactor, config)
    return service, WorkerReload(reactor, command, load, service.reload.apply, options.config_error)


def _totals(service: Any) -> dict[int, int]:
    protocol = getattr(service, "manager_protocol", None)
    return dict(protocol.totals()) if protocol is not None else {}


def main() -> None:
    # ssx's reactor, as twistd's plugin installs it in a single process
    # (unless SSX_TCP_PATH=twisted); nothing imported so far installs one.
    try:
        from ssx.net.reactor import install_default
    except ImportError:
        pass  # no epoll on this system: Twisted's default reactor
    else:
        install_default()
    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO
    from twisted.internet.task import LoopingCall

    from ssx.net.inherited import inherit

    hello, pending = _read_hello(CONTROL_IN)
    globalLogBeginner.beginLoggingTo([_observer(sys.stdout)], redirectStandardIO=False)
    os.chdir(hello["cwd"])
    inherit({key: (fd, family) for key, (fd, family) in hello["sockets"].items()})
    service, reload = _build(reactor, hello)
    # The supervisor reloads the workers (its `reload:` request): a SIGHUP
    # sent to the whole process group must neither end nor reload a worker.
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(  # type: ignore[attr-defined]
        _log.info, "SIGHUP ignored: the supervisor reloads the workers"))
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    control = _Control(reactor, service, pending, reload)
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
