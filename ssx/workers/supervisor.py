"""
The `--workers N` supervisor: the process twistd runs (and daemonises,
and names in its pid file) when N > 1.  It opens every listener's sockets
(`ssx.workers.sockets`) and, for a server, the shared replay filter
(`ssx.crypto.SharedSaltFilter`), then starts N workers
(``python -m ssx.workers.worker``, each handed its sockets), and:

- restarts a worker that dies, after 1 s, doubling to 30 s while workers
  keep dying young, back to 1 s once one has lived a minute;
- on SIGHUP checks the configuration file itself and has every worker
  reload it (`ssx.workers.reload`); at stop (SIGTERM) sends each SIGTERM,
  so that each drains within the shutdown grace, kills what is left 5 s
  after the grace, and returns once all have ended;
- logs the workers' log lines (they write them to their stdout) under
  their index and pid, and their starts and exits;
- holds the totals of all workers (`totals`: each worker reports its
  ports' bytes with the manager protocol's `stat:` line), and answers the
  manager API itself, forwarding `add` and `remove` to every worker;
- with ``--metrics``, serves the sums of the workers' metrics, which each
  serves on a private Unix socket (`ssx.workers.metrics`).

A worker watches its control pipe: when the supervisor is gone (even by
SIGKILL), the pipe's end is read and the worker stops.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from typing import Any, Callable, Mapping

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from ssx.errors import ConfigError
from ssx.net.tcp import FAST_OPEN_QUEUE
from ssx.workers.control import CONTROL_IN, CONTROL_OUT, hello_line, parse_reloaded, parse_stat, request_line
from ssx.workers.sockets import Listener, SlotSockets, close_all, open_slot_sockets

__all__ = ["Supervisor", "WorkerTotals", "local_listeners", "server_listeners"]

_log = Logger()

FIRST_DELAY = 1.0
MAX_DELAY = 30.0
# A worker that lived this long resets the back-off.
STEADY = 60.0
# After the grace, what a worker gets to end before it is killed.
KILL_AFTER = 5.0
# Child descriptors after the control pipes: the inherited sockets.
FIRST_SOCKET = 5


def server_listeners(config: Any) -> list[Listener]:
    """The listeners of an `ssx-server` configuration (`config.workers` > 1 checked them plain TCP, no plugin)."""
    listeners = []
    for port in config.port_configs():
        if port.relays.tcp:
            for description in port.listen:
                listeners.append(Listener(description=description, udp=port.relays.udp, v6only=port.v6only,
                                          fast_open=FAST_OPEN_QUEUE if port.fast_open else 0))
        elif port.relays.udp:
            for host in port.hosts:
                listeners.append(Listener(host=host, port=port.port, v6only=port.v6only))
    return listeners


def local_listeners(config: Any) -> list[Listener]:
    """The listeners of an `ssx-local` configuration: its SOCKS/HTTP ports (no UDP with workers) and tunnels."""
    listeners = [Listener(description=description, udp=config.relays.udp) for description in config.listen]
    for tunnel in config.tunnels:
        if config.relays.tcp:
            listeners.append(Listener(description=tunnel.listen, udp=config.relays.udp))
        elif tunnel.address is not None:
            listeners.append(Listener(host=tunnel.address[0], port=tunnel.address[1]))
    return listeners


class WorkerTotals:
    """
    The bytes of every port over all workers, living and dead: the seam
    for anything that reports traffic (the manager API here; metrics, which
    should read these sums too rather than one worker's).
    """

    def __init__(self) -> None:
        self.live: dict[int, dict[int, int]] = {}
        self.retired: dict[int, int] = {}

    def report(self, slot: int, totals: Mapping[int, int]) -> None:
        self.live[slot] = dict(totals)

    def retire(self, slot: int) -> None:
        """A worker ended: its bytes stay counted (a new worker reports from zero)."""
        for port, total in self.live.pop(slot, {}).items():
            self.retired[port] = self.retired.get(port, 0) + total

    def forget(self, port: int) -> None:
        self.retired.pop(port, None)
        for table in self.live.values():
            table.pop(port, None)

    def total(self, port: int) -> int:
        return self.retired.get(port, 0) + sum(table.get(port, 0) for table in self.live.values())


class _Worker(ProcessProtocol):
    """One worker process: its log lines and reports go to the supervisor."""

    def __init__(self, supervisor: Supervisor, slot: int) -> None:
        self.supervisor = supervisor
        self.slot = slot
        self.pid: int | None = None
        self.started = 0.0
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._partial: dict[int, bytes] = {}

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._partial.pop(childFD, b"") + data).split(b"\n")
        if lines[-1]:
            self._partial[childFD] = lines[-1][-65536:]
        for line in lines[:-1]:
            if childFD == CONTROL_OUT:
                totals = parse_stat(line)
                if totals is not None:
                    self.supervisor.totals.report(self.slot, totals)
                reloaded = parse_reloaded(line)
                if reloaded is not None and self.supervisor.reloading is not None:
                    self.supervisor.reloading.reported(self.slot, *reloaded)
            else:
                self._relog(line.decode("utf-8", "replace"))

    def _relog(self, line: str) -> None:
        level_name, _, text = line.partition(" ")
        try:
            level = LogLevel.levelWithName(level_name)
        except Exception:
            level, text = LogLevel.info, line
        _log.emit(level, "worker {slot} [{pid}]: {text}", slot=self.slot, pid=self.pid, text=text)

    def send(self, line: bytes) -> None:
        if self.transport is not None and not self.ended.called:
            try:
                self.transport.writeToChild(CONTROL_IN, line)
            except (KeyError, OSError):
                pass

    def signal(self, name: str) -> None:
        if self.transport is not None and not self.ended.called:
            try:
                self.transport.signalProcess(name)
            except Exception:  # ProcessExitedAlready
                pass

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self.supervisor.worker_ended(self, reason)


class Supervisor(MultiService):
    """
    Runs `config.workers` workers of `command` (read from `argv`, as parsed
    in `cwd`).  With `load` (the options' `load_config`) and `refusal`,
    SIGHUP reloads: the file is checked here, then every worker reloads it.
    """

    def __init__(
        self, reactor: Any, command: str, argv: list[str], config: Any, cwd: str,
        listeners: Callable[[Any], list[Listener]] = server_listeners, overrides: Mapping[str, Any] | None = None,
        load: Callable[[], Any] | None = None, refusal: Callable[[ConfigError], str] | None = None,
    ) -> None:
        MultiService.__init__(self)
        self.reactor = reactor
        self.command = command
        # Reads the configuration again at SIGHUP (as the workers do), for
        # what the supervisor keeps of it: `reloaded` is called with it.
        self.load = load
        self.reloaded: list[Callable[[Any], None]] = []
        self.argv = argv
        self.config = config
        self.cwd = cwd
        self.count = config.workers
        self.listener_fn = listeners
        self.listeners = listeners(config)
        self._listeners_of = listeners
        self.overrides = dict(overrides or {})
        self.totals = WorkerTotals()
        self.sockets: list[SlotSockets] = []
        self.salt_fd: int | None = None
        self.workers: dict[int, _Worker] = {}
        self.delays = [FIRST_DELAY] * self.count
        self._restarts: dict[int, Any] = {}
        self._stopping = False
        self._previous_hup: Any = None
        if command == "ssx-server" and getattr(config, "password_generated", False):
            # Every worker must use the password this process settled on.
            self.overrides["password"] = config.password
        self.manager_protocol: Any = None
        if getattr(config, "manager", None) is not None:
            from ssx.workers.manager import supervisor_manager

            supervisor_manager(self)
        self.reloading: Any = None
        if load is not None and refusal is not None:
            from ssx.workers.reload import SupervisorReload

            self.reloading = SupervisorReload(self, load, refusal)
        # --metrics: the workers' sockets (a private directory), what is scraped, and restarts counted.
        self.metrics_dir: str | None = None
        self.metrics_sockets: tuple[str, ...] = ()
        self.restarts = 0
        self.metrics_listener: Any = None
        if getattr(config, "metrics", None) is not None:
            self._serve_metrics(config.metrics)

    def _serve_metrics(self, description: str) -> None:
        from ssx.net.metrics import serve_metrics
        from ssx.workers.metrics import WorkersCollector, collector_registry

        prefix = "ssx_server_supervisor" if self.command == "ssx-server" else "ssx_local_supervisor"
        collector = WorkersCollector(prefix, lambda: self.metrics_sockets, lambda: len(self.workers), lambda: self.restarts)
        self.metrics_listener = serve_metrics(self, self.reactor, description, collector_registry(collector),
                                              f"{self.command} supervisor")

    def _metrics_socket(self, slot: int) -> str:
        assert self.metrics_dir is not None
        return os.path.join(self.metrics_dir, f"worker-{slot}.sock")

    def _update_metrics_sockets(self) -> None:
        if self.metrics_dir is not None:
            # Replaced whole: the scrape reads it in another thread.
            self.metrics_sockets = tuple(self._metrics_socket(slot) for slot in sorted(self.workers))

    def privilegedStartService(self) -> None:
        try:
            self.sockets = open_slot_sockets(self.listeners, self.count)
        except OSError as e:
            raise SystemExit(f"{self.command}: cannot listen for the workers: {e}") from None
        if self.command == "ssx-server" and self.config.replay_history >= 2:
            from ssx.crypto import SharedSaltFilter

            self.salt_fd = SharedSaltFilter.create(self.config.replay_history)
        for slot in self.sockets:
            for key, sock in slot.items():
                _log.info("{command} supervisor: {what} on {address}", command=self.command, what=key.split(" ")[0].upper(),
                          address=_address(sock.getsockname()))
        MultiService.privilegedStartService(self)

    def startService(self) -> None:
        MultiService.startService(self)
        if hasattr(signal, "SIGHUP"):
            self._previous_hup = signal.signal(signal.SIGHUP, self._hup)
        if self.metrics_listener is not None:
            # After twistd dropped privileges: the workers, run as the same user, bind in it.
            self.metrics_dir = tempfile.mkdtemp(prefix="ssx-metrics-")
        _log.info("{command}: supervising {count} workers", command=self.command, count=self.count)
        for slot in range(self.count):
            self.start_worker(slot)

    def _hup(self, signum: int, frame: Any) -> None:
        if self.reloading is not None:
            self.reactor.callFromThread(self.reloading.reload)
        else:
            self.reactor.callFromThread(self.forward_signal, "HUP")

    def forward_signal(self, name: str) -> None:
        _log.info("{command}: passing SIG{name} on to the workers", command=self.command, name=name)
        for worker in self.workers.values():
            worker.signal(name)

    def forward_request(self, command: str, body: Any) -> None:
        """A manager request (`add`/`remove`) to every worker."""
        line = request_line(command, body)
        for worker in self.workers.values():
            worker.send(line)

    def start_worker(self, slot: int) -> None:
        self._restarts.pop(slot, None)
        if self._stopping:
            return
        worker = _Worker(self, slot)
        child_fds: dict[int, int | str] = {1: "r", 2: "r", CONTROL_IN: "w", CONTROL_OUT: "r"}
        sockets = {}
        number = FIRST_SOCKET
        for key, sock in self.sockets[slot].items():
            child_fds[number] = sock.fileno()
            sockets[key] = [number, int(sock.family)]
            number += 1
        salt_fd = None
        if self.salt_fd is not None:
            child_fds[number] = self.salt_fd
            salt_fd = number
        overrides = dict(self.overrides)
        if self.metrics_dir is not None:
            from ssx.workers.metrics import worker_endpoint

            path = self._metrics_socket(slot)
            # A dead predecessor's socket file would stop the bind.
            if os.path.lexists(path):
                os.unlink(path)
            overrides["metrics"] = worker_endpoint(path)
        hello = {
            "command": self.command, "argv": self.argv, "cwd": self.cwd, "rundir": os.getcwd(), "slot": slot,
            "sockets": sockets, "salt_fd": salt_fd, "overrides": overrides,
        }
        env = dict(os.environ)
        # The workers import ssx from where this process did.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self.reactor.spawnProcess(
            worker, sys.executable, [sys.executable, "-m", "ssx.workers.worker"], env=env, path=os.getcwd(),
            childFDs=child_fds,
        )
        worker.started = self.reactor.seconds()
        self.workers[slot] = worker
        self._update_metrics_sockets()
        worker.send(hello_line(hello))
        _log.info("{command}: worker {slot} started (pid {pid})", command=self.command, slot=slot, pid=worker.pid)

    def worker_ended(self, worker: _Worker, reason: Failure) -> None:
        if self.workers.get(worker.slot) is worker:
            del self.workers[worker.slot]
        self.totals.retire(worker.slot)
        self._update_metrics_sockets()
        if self.reloading is not None:
            self.reloading.gone(worker.slot)
        how = _exit_description(reason)
        if self._stopping:
            _log.info("{command}: worker {slot} (pid {pid}) stopped: {how}", command=self.command, slot=worker.slot,
                      pid=worker.pid, how=how)
            return
        lived = self.reactor.seconds() - worker.started
        if lived >= STEADY:
            self.delays[worker.slot] = FIRST_DELAY
        delay = self.delays[worker.slot]
        self.delays[worker.slot] = min(MAX_DELAY, delay * 2)
        _log.warn("{command}: worker {slot} (pid {pid}) ended: {how}; restarting it in {delay:g} s",
                  command=self.command, slot=worker.slot, pid=worker.pid, how=how, delay=delay)
        self.restarts += 1
        self._restarts[worker.slot] = self.reactor.callLater(delay, self.start_worker, worker.slot)

    def stopService(self) -> defer.Deferred[None]:
        self._stopping = True
        if self.reloading is not None:
            self.reloading.stop()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
        workers = list(self.workers.values())
        for worker in workers:
            worker.signal("TERM")
        grace = self.config.limits.shutdown_grace
        def kill_all() -> None:
            for worker in workers:
                worker.signal("KILL")

        kill = self.reactor.callLater(grace + KILL_AFTER, kill_all)
        done = defer.gatherResults([w.ended for w in workers])

        def finished(_: Any) -> Any:
            if kill.active():
                kill.cancel()
            close_all(self.sockets)
            self.sockets = []
            if self.salt_fd is not None:
                os.close(self.salt_fd)
                self.salt_fd = None
            if self.metrics_dir is not None:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)
                self.metrics_dir = None
            _log.info("{command}: all workers stopped", command=self.command)
            return MultiService.stopService(self)

        return done.addCallback(finished)


def _address(address: Any) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _exit_description(reason: Failure) -> str:
    value = reason.value
    signal_number = getattr(value, "signal", None)
    if signal_number:
        try:
            return f"killed by {signal.Signals(signal_number).name}"
        except ValueError:
            return f"killed by signal {signal_number}"
    return f"exit status {getattr(value, 'exitCode', None)}"
