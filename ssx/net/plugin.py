"""
A SIP003 plugin as a service: the child process that carries Shadowsocks TCP
between loopback and the network (simple-obfs, v2ray-plugin, ...).

Who listens where (SIP003, spec §2.3):

* on the local end the plugin listens on a free loopback port that ssx
  picks, and connects to the server; ssx sends its Shadowsocks connections
  to that port (`PluginService.local_address`);
* on the server end the plugin listens on the public address and port, and
  connects to ssx's own listener, bound on a loopback port.

Twisted's `ProcessMonitor` runs the process: it logs each line the plugin
writes, and restarts it with back-off when it dies.  The first start is
checked before traffic: the service waits until the plugin accepts
connections, and stops start-up with one line if the executable is missing,
the plugin exits first, or it never listens.

That first wait blocks.  Under twistd, `startService` runs before the
reactor does, and only an exception from it stops start-up (a non-zero
exit, the status pipe of a daemon, the pid file removed); nothing is
accepted meanwhile, so no traffic can arrive before the plugin is there.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.runner.procmon import ProcessMonitor
from zope.interface import implementer

from ssx.errors import ConfigError
from ssx.net.tcp import on_process_exit
from ssx.wire.sip003 import Plugin, plugin_environment

__all__ = ["PluginMonitor", "PluginService", "find_plugin"]

_log = Logger()

LOOPBACK = "127.0.0.1"
# How long a plugin may take to listen at start-up.
START_DEADLINE = 10.0


def find_plugin(name: str) -> str:
    """The plugin executable's path; ConfigError naming `plugin` when there is none."""
    path = shutil.which(name)
    if path is None:
        where = "no such executable file" if os.sep in name else "no executable of that name on PATH"
        raise ConfigError("plugin", f"{name!r} not found: {where}")
    return path


class _OutputLogger(Logger):
    """
    ProcessMonitor logs each output line as info("[{tag}] {line}"): this
    strips the lines and drops blank ones (it adds one at every exit).
    """

    def info(self, format: str | None = None, **kwargs: object) -> None:
        line = kwargs.get("line")
        if isinstance(line, str):
            line = line.strip()
            if not line:
                return
            kwargs["line"] = line
        Logger.info(self, format, **kwargs)


@implementer(IReactorProcess, IReactorTime)
class _DevNullStdin:
    """
    The reactor, except that the processes it spawns read stdin from
    /dev/null (as SIP003 hosts start plugins), not from a pipe that only
    the running reactor could close.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def spawnProcess(self, protocol: Any, executable: Any, args: Any = (), env: Any = None, path: Any = None,
                     uid: Any = None, gid: Any = None, usePTY: Any = False, childFDs: Any = None) -> Any:
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            return self._reactor.spawnProcess(
                protocol, executable, args, env, path, uid, gid, usePTY, {0: null, 1: "r", 2: "r"}
            )
        finally:
            os.close(null)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


class PluginMonitor(ProcessMonitor):
    """
    `ProcessMonitor` for one plugin: it logs every start and exit, and says
    when the process has ended (`ended`), so a stop can wait for it.
    """

    # The back-off after quick deaths doubles from 1 s up to this, rather
    # than Twisted's hour: a proxy without its plugin carries nothing.
    maxRestartDelay = 60
    # The plugin's output lines are logged as "[name] line" by this logger.
    log = _OutputLogger()

    def __init__(self, reactor: Any) -> None:
        ProcessMonitor.__init__(self, _DevNullStdin(reactor))
        self._seconds: Callable[[], float] = reactor.seconds
        self._waiting: list[Deferred] = []
        on_process_exit(self, self._after_exit)

    def startProcess(self, name: str) -> None:
        ProcessMonitor.startProcess(self, name)
        protocol = self.protocols.get(name)
        if protocol is not None and protocol.transport is not None and protocol.transport.pid is not None:
            _log.info("plugin {name} started, pid {pid}", name=name, pid=protocol.transport.pid)

    def _after_exit(self, name: str, reason: Failure | None) -> None:
        # Twisted has forgotten the process and scheduled any restart.
        why = describe_exit(reason)
        restart = self.restart.get(name)
        if self.running and restart is not None and restart.active():
            _log.warn(
                "plugin {name} exited ({why}); restarting in {delay:g} s",
                name=name,
                why=why,
                delay=max(0.0, restart.getTime() - self._seconds()),
            )
        else:
            _log.info("plugin {name} ended ({why})", name=name, why=why)
        if not self.protocols:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def ended(self) -> Deferred:
        """Fires once no monitored process is running."""
        if not self.protocols:
            return succeed(None)
        d: Deferred = Deferred()
        self._waiting.append(d)
        return d


def describe_exit(reason: Failure | None) -> str:
    """'exit code 1', 'signal 9' or the error, for a process's end."""
    if reason is None:
        return "unknown status"
    error = reason.value
    if isinstance(error, (ProcessDone, ProcessTerminated)):
        if error.signal is not None:
            return f"signal {error.signal}"
        return f"exit code {error.exitCode}"
    return reason.getErrorMessage()


class PluginService(Service):
    """
    Runs `plugin` for one end.

    `listener` is given on the server end: the plugin listens on
    `remote` (the public address and port) and connects to the loopback
    port `listener` bound.  Without it (the local end) the plugin listens
    on a free loopback port, `local_address`, and connects to `remote`
    (the server).  With `wait` false the start does not wait for the plugin
    to listen (nor check its executable: the caller does, `find_plugin`);
    connections before it listens are refused, as when it restarts.
    """

    def __init__(
        self,
        reactor: Any,
        plugin: Plugin,
        label: str,
        remote: tuple[str, int],
        listener: Any = None,
        deadline: float = START_DEADLINE,
        wait: bool = True,
    ) -> None:
        self.reactor = reactor
        self.plugin = plugin
        self.label = label
        self.remote = remote
        self.listener = listener
        self.deadline = deadline
        # Block in startService until the plugin listens: at start-up, yes;
        # started later by a running reactor (an online config's server), no.
        self.wait = wait
        self.monitor = PluginMonitor(reactor)
        self.local_address: tuple[str, int] | None = None

    @property
    def process_name(self) -> str:
        return os.path.basename(self.plugin.name)

    def startService(self) -> None:
        try:
            path = find_plugin(self.plugin.name)
        except ConfigError as e:
            raise SystemExit(f"{self.label}: bad configuration: {e}") from None
        if self.listener is not None:
            bound = self.listener.port.getHost()
            local = (bound.host, bound.port)
            probe = (_reachable(self.remote[0].split("|")[0]), self.remote[1])
        else:
            local = (LOOPBACK, _free_port(LOOPBACK))
            probe = local
        self.local_address = local
        env = plugin_environment(os.environ, self.remote, local, self.plugin.options)
        self.monitor.addProcess(self.process_name, [path, *self.plugin.args], env=env)
        Service.startService(self)
        self.monitor.startService()
        if self.wait:
            self._wait_listening(probe)

    def stopService(self) -> Deferred:
        Service.stopService(self)
        if self.monitor.running:
            self.monitor.stopService()
        return self.monitor.ended()

    def _wait_listening(self, address: tuple[str, int]) -> None:
        where = _describe(address)
        deadline = time.monotonic() + self.deadline
        while True:
            status = self._exit_status()
            if status is not None:
                self._fail(f"plugin {self.plugin.name} exited ({status}) before it listened on {where}")
            try:
                socket.create_connection(address, timeout=0.5).close()
            except OSError:
                pass
            else:
                _log.info("{label}: plugin {name} is listening on {where}", label=self.label, name=self.plugin.name, where=where)
                return
            if time.monotonic() > deadline:
                self._fail(f"plugin {self.plugin.name} did not listen on {where} within {self.deadline:g} s")
            time.sleep(0.05)

    def _exit_status(self) -> str | None:
        """How the first process ended, or None while it runs (it is not reaped: Twisted does that)."""
        protocol = self.monitor.protocols.get(self.process_name)
        if protocol is None or protocol.transport is None:
            return "it could not be started"
        pid = protocol.transport.pid
        if pid is None:
            # Already reaped (Twisted waits for a child once as it spawns it).
            return _describe_status(getattr(protocol.transport, "status", None))
        if not hasattr(os, "waitid"):
            return None
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return "it ended"
        if info is None or info.si_pid == 0:
            return None
        if info.si_code == os.CLD_EXITED:
            return f"exit code {info.si_status}"
        return f"signal {info.si_status}"

    def _fail(self, message: str) -> None:
        output = self._last_output()
        self.monitor.stopService()
        raise SystemExit(f"{self.label}: {message}" + (f"; it said: {output}" if output else ""))

    def _last_output(self) -> str:
        """The last line the plugin wrote (stderr first), read straight from its pipes: the reactor may never run."""
        protocol = self.monitor.protocols.get(self.process_name)
        pipes = getattr(getattr(protocol, "transport", None), "pipes", {})
        for fd in (2, 1):
            reader = pipes.get(fd)
            if reader is None:
                continue
            chunks = []
            try:
                while True:
                    data = os.read(reader.fileno(), 65536)
                    if not data:
                        break
                    chunks.append(data)
            except OSError:  # nothing more to read now
                pass
            lines = [line.strip() for line in b"".join(chunks).decode(errors="replace").splitlines() if line.strip()]
            if lines:
                return lines[-1]
        return ""


def _describe_status(status: Any) -> str:
    """A wait status as 'exit code N' or 'signal N'."""
    if isinstance(status, int) and status >= 0:
        if os.WIFEXITED(status):
            return f"exit code {os.WEXITSTATUS(status)}"
        if os.WIFSIGNALED(status):
            return f"signal {os.WTERMSIG(status)}"
    return "it ended"


def _free_port(host: str) -> int:
    # Bind, read, close: the plugin gets the number (a race all SIP003 hosts accept).
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _reachable(host: str) -> str:
    """Where to reach a listener bound on `host`: loopback for the wildcard addresses."""
    if host in ("", "0.0.0.0"):
        return LOOPBACK
    if host == "::":
        return "::1"
    return host


def _describe(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
