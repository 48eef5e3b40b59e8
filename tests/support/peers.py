"""
Peers run as child processes: any executable (shadowsocks-libev, sing-box,
SIP003 plugins, curl), and ssx's own twistd commands with this checkout on
their path.  Tests that need a missing executable skip, naming it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from typing import Any, AsyncIterator, Callable

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from tests.support.waiting import sleep, wait_until

__all__ = [
    "ChildProcess",
    "spawn",
    "skip_without",
    "requires",
    "ROOT",
    "TWISTD",
    "twistd_env",
    "start_twistd",
    "sighup",
    "wait_for_port",
    "late_lines_quoted",
]


class ChildProcess(protocol.ProcessProtocol):
    """A peer binary run for a test; `stop()` ends it (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.output: list[bytes] = []
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value)

    def text(self) -> str:
        return b"".join(self.output).decode(errors="replace")

    async def stop(self) -> None:
        if self.ended.called:
            return
        try:
            self.transport.signalProcess("TERM")
        except Exception:
            pass
        waited = defer.Deferred()
        call = reactor.callLater(5, lambda: self.ended.called or self.transport.signalProcess("KILL"))
        self.ended.addBoth(lambda r: (waited.callback(None), r)[1])
        await waited
        if call.active():
            call.cancel()


def spawn(executable: str, args: list[str], env: dict[str, str] | None = None) -> ChildProcess:
    path = shutil.which(executable)
    assert path is not None, executable
    child = ChildProcess()
    reactor.spawnProcess(child, path, [executable, *args], env=env if env is not None else dict(os.environ))
    return child


def skip_without(*executables: str, package: str) -> str | None:
    """A skip reason naming the executables missing from PATH and the package that brings them; None if none is."""
    missing = [name for name in executables if shutil.which(name) is None]
    if not missing:
        return None
    return f"{', '.join(missing)} not on PATH: install {package} to run these tests"


def requires(*executables: str, package: str) -> Callable[[Any], Any]:
    """Marks a TestCase class or test method to skip, naming what is missing, unless `executables` are on PATH."""
    reason = skip_without(*executables, package=package)

    def mark(test: Any) -> Any:
        if reason is not None:
            test.skip = reason
        return test

    return mark


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TWISTD = ["-c", "from twisted.scripts.twistd import run; run()"]


def twistd_env() -> dict[str, str]:
    """The environment for twistd children: this checkout first on the path, no proxies."""
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=ROOT + (os.pathsep + path if path else ""), no_proxy="", NO_PROXY="")


async def start_twistd(testcase: Any, *args: str, ready: bytes, seconds: float = 10.0) -> ChildProcess:
    """Run `twistd ARGS` as a child until its output shows `ready`; stopped at the test's end."""
    # Each child runs in a directory of the test's own, so the files twistd and
    # ssx-server leave (the URL file, logs) go with trial's temporary tree.
    rundir = testcase.mktemp()
    os.makedirs(rundir)
    child = ChildProcess()
    reactor.spawnProcess(child, sys.executable, [sys.executable, *TWISTD, *args], env=twistd_env(), path=rundir)
    testcase.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
    await wait_until(lambda: ready in b"".join(child.output) or child.ended.called, seconds, step=0.05)
    if ready not in b"".join(child.output):
        raise AssertionError(f"twistd did not get ready: {child.text()}")
    return child


async def start_ss_local(
    testcase: Any, server_port: int, method: str, password: str, *extra: str
) -> tuple[ChildProcess, int]:
    """libev's ss-local (verbose) aimed at 127.0.0.1:`server_port`, once it accepts on its SOCKS port; stopped at the test's end."""
    from tests.support.targets import free_port

    port = free_port()
    child = spawn("ss-local", [
        "-s", "127.0.0.1", "-p", str(server_port), "-b", "127.0.0.1", "-l", str(port), "-k", password, "-m", method,
        *extra, "-v",
    ])
    testcase.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
    try:
        await wait_for_port(port)
    except Exception as e:
        raise AssertionError(f"ss-local never listened on {port} ({e!r}); its output:\n{child.text()}") from None
    return child, port
# The lines that end a reload of ssx-server or ssx-local (`ssx.net.reload`).
_RELOAD_ENDS = (b": reload done: ", b"(reload refused: ")


async def sighup(child: ChildProcess, seconds: float = 10.0) -> str:
    """Send SIGHUP to a twistd child and wait for the line that ends its reload (done or refused); returns that line."""

    def ended() -> list[bytes]:
        return [line for line in b"".join(child.output).splitlines() if any(end in line for end in _RELOAD_ENDS)]

    before = len(ended())
    child.transport.signalProcess("HUP")
    await wait_until(lambda: len(ended()) > before or child.ended.called, seconds, step=0.05)
    lines = ended()
    if len(lines) <= before:
        raise AssertionError(f"no reload finished after SIGHUP: {child.text()}")
    return lines[before].decode(errors="replace")


async def wait_for_port(port: int, host: str = "127.0.0.1", seconds: float = 10.0) -> None:
    """Wait until something accepts TCP connections on host:port."""
    deadline = reactor.seconds() + seconds
    while True:
        try:
            p = await connectProtocol(TCP4ClientEndpoint(reactor, host, port, timeout=1), protocol.Protocol())
            p.transport.loseConnection()
            return
        except Exception:
            if reactor.seconds() > deadline:
                raise
            await sleep(0.05)


@contextlib.asynccontextmanager
async def late_lines_quoted(text: Callable[[], str], quiet: float = 0.1, seconds: float = 2.0) -> AsyncIterator[None]:
    """
    When an assertion inside fails, wait until `text()` (a peer's output, a
    log) has stopped growing for `quiet` seconds (at most `seconds`) and add
    what came after the failure to its message: a peer's last lines may
    still be on their way when a failing test quotes them.
    """
    try:
        yield
    except AssertionError as e:
        at_failure = len(text())
        deadline = reactor.seconds() + seconds
        last = None
        while text() != last and reactor.seconds() < deadline:
            last = text()
            await sleep(quiet)
        late = text()[at_failure:]
        if not late:
            raise
        # The same exception type: callers may catch a TestCase's failureException.
        raise type(e)(f"{e}\n--- printed after the failure ---\n{late}") from None


def open_fds() -> int:
    """File descriptors this process holds."""
    return len(os.listdir("/proc/self/fd"))


def fd_table() -> dict[str, str]:
    """This process's file descriptors and what they are (for failure messages)."""
    table = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            table[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return table
