"""
The drop-in commands as units and scripts call them, in child processes
(`python -m ssx.compat NAME ...`, what the console scripts run):
`ssx-ssserver -d start|stop|restart` as a daemon, `ssx-sslocal`,
`ssx-ss-server` and `ssx-ss-local` in the foreground, shadowsocks-libev's
ss-local against them, bytes hashed at a loopback echo.
"""

from __future__ import annotations

import io
import json
import os
import pwd
import signal
import sys
from typing import Any
from unittest import skipUnless

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from ssx.compat import running, stop_daemon
from tests import support
from tests.support import HashingEchoFactory, whole_echo_transfer

METHOD = "aes-256-gcm"
PASSWORD = "compat pass"


def gone(pid: int) -> bool:
    # The daemon is no child of ours: once ended it may stay a zombie for a while.
    return not running(pid)


class CompatTestCase(unittest.TestCase):
    """A hashing echo on loopback, a directory of the test's own, and the commands run from this checkout."""

    def setUp(self) -> None:
        self.echo_factory = HashingEchoFactory()
        self.echo = reactor.listenTCP(0, self.echo_factory, interface="127.0.0.1")
        self.addCleanup(self.echo.stopListening)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def run_command(self, name: str, *args: str) -> defer.Deferred:
        """Run drop-in command `name` to completion: (stdout, stderr, exit code)."""
        return getProcessOutputAndValue(
            sys.executable, ["-m", "ssx.compat", name, *args], env=support.twistd_env(), path=self.directory
        )

    async def start(self, name: str, *args: str, ready: bytes) -> support.ChildProcess:
        """Run drop-in command `name` in the foreground until its output shows `ready`; stopped at the end."""
        child = support.ChildProcess()
        reactor.spawnProcess(
            child, sys.executable, [sys.executable, "-m", "ssx.compat", name, *args], env=support.twistd_env(),
            path=self.directory,
        )
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
        await support.wait_until(lambda: ready in b"".join(child.output) or child.ended.called, 10, step=0.05)
        if ready not in b"".join(child.output):
            self.fail(f"{name} did not get ready: {child.text()}")
        return child

    def read_pid(self, path: str) -> int:
        with open(path) as f:
            return int(f.read())

    def kill_at_end(self, pid: int) -> None:
        # A daemon is no child of the test: a failing test must still end it.
        self.addCleanup(lambda: None if gone(pid) else os.kill(pid, signal.SIGTERM))

    def config_file(self, **values: Any) -> str:
        path = os.path.join(self.directory, "shadowsocks.json")
        with open(path, "w") as f:
            json.dump(values, f)
        return path

    async def echo_through(self, socks_port: int, size: int = 300_000) -> None:
        """`size` random bytes through the SOCKS5 port to the echo and back, hashed both ways."""
        payload = os.urandom(size)
        reply, received = await whole_echo_transfer(socks_port, "127.0.0.1", self.echo.getHost().port, payload)
        self.assertEqual(reply, 0)
        target = self.echo_factory.inbound[-1]
        self.assertEqual(target.digest.hexdigest(), support.sha256(payload))
        self.assertEqual(support.sha256(received), support.sha256(payload))


class OriginalDaemonTests(CompatTestCase):
    """`ssx-ssserver -c FILE -d start|stop|restart` as the original's init scripts run it."""

    async def _daemon(self) -> None:
        server_port = support.free_port()
        # forbidden_ip "": the echo is on loopback, which ssx refuses by default.
        config = self.config_file(server="127.0.0.1", server_port=server_port, password=PASSWORD, method=METHOD,
                                  forbidden_ip="")
        pid_file = os.path.join(self.directory, "ss.pid")
        log_file = os.path.join(self.directory, "ss.log")
        daemon = ["-c", config, "--pid-file", pid_file, "--log-file", log_file]

        out, err, code = await self.run_command("ssx-ssserver", *daemon, "-d", "start")
        self.assertEqual(code, 0, (out, err))
        first = self.read_pid(pid_file)
        self.kill_at_end(first)
        self.assertNotEqual(first, os.getpid())
        await support.wait_for_port(server_port)

        socks_port = support.free_port()
        await self.start("ssx-sslocal", "-s", "127.0.0.1", "-p", str(server_port), "-l", str(socks_port),
                         "-k", PASSWORD, "-m", METHOD, ready=b"listening on")
        await self.echo_through(socks_port)
        with open(log_file) as f:
            self.assertIn(f"listening on 127.0.0.1:{server_port}", f.read())

        out, err, code = await self.run_command("ssx-ssserver", *daemon, "-d", "restart")
        self.assertEqual(code, 0, (out, err))
        second = self.read_pid(pid_file)
        self.kill_at_end(second)
        self.assertNotEqual(second, first)
        self.assertTrue(gone(first))
        await support.wait_for_port(server_port)
        await self.echo_through(socks_port)

        out, err, code = await self.run_command("ssx-ssserver", *daemon, "-d", "stop")
        self.assertEqual(code, 0, (out, err))
        self.assertTrue(gone(second))
        self.assertFalse(os.path.exists(pid_file))
        # Stopping what is not running is no error, as in the original.
        out, err, code = await self.run_command("ssx-ssserver", *daemon, "-d", "stop")
        self.assertEqual((code, err), (0, b"not running\n"))

    def test_start_restart_stop(self):
        """-d start daemonises a server that relays; restart gives a new pid; stop ends it and removes the pid file."""
        return defer.Deferred.fromCoroutine(self._daemon())


class LibevForegroundTests(CompatTestCase):
    """`ssx-ss-server -s -p -k -m` in the foreground, with libev's ss-local and with ssx-ss-local."""

    async def _foreground(self) -> None:
        server_port = support.free_port()
        config = self.config_file(forbidden_ip="")
        await self.start("ssx-ss-server", "-s", "127.0.0.1", "-p", str(server_port), "-k", PASSWORD, "-m", METHOD,
                         "-c", config, ready=b"listening on")
        socks_port = support.free_port()
        libev = support.spawn("ss-local", ["-s", "127.0.0.1", "-p", str(server_port), "-l", str(socks_port),
                                           "-k", PASSWORD, "-m", METHOD])
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(libev.stop()))
        await support.wait_for_port(socks_port)
        await self.echo_through(socks_port)

        ssx_socks_port = support.free_port()
        await self.start("ssx-ss-local", "-s", "127.0.0.1", "-p", str(server_port), "-l", str(ssx_socks_port),
                         "-k", PASSWORD, "-m", METHOD, ready=b"listening on")
        await self.echo_through(ssx_socks_port)

    @support.requires("ss-local", package="shadowsocks-libev")
    def test_foreground_relays(self):
        """ssx-ss-server relays for libev's ss-local and for ssx-ss-local."""
        return defer.Deferred.fromCoroutine(self._foreground())


class LibevDaemonTests(CompatTestCase):
    """`ssx-ss-server -f PIDFILE -a USER`: a daemon running as that user."""

    async def _daemon_as_user(self) -> None:
        os.chmod(self.directory, 0o755)
        server_port = support.free_port()
        pid_file = os.path.join(self.directory, "ss-server.pid")
        out, err, code = await self.run_command(
            "ssx-ss-server", "-s", "127.0.0.1", "-p", str(server_port), "-k", PASSWORD, "-m", METHOD,
            "-c", self.config_file(forbidden_ip=""), "-f", pid_file, "-a", "nobody",
        )
        self.assertEqual(code, 0, (out, err))
        pid = self.read_pid(pid_file)
        self.kill_at_end(pid)
        self.assertEqual(os.stat(f"/proc/{pid}").st_uid, pwd.getpwnam("nobody").pw_uid)
        await support.wait_for_port(server_port)
        socks_port = support.free_port()
        libev = support.spawn("ss-local", ["-s", "127.0.0.1", "-p", str(server_port), "-l", str(socks_port),
                                           "-k", PASSWORD, "-m", METHOD])
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(libev.stop()))
        await support.wait_for_port(socks_port)
        await self.echo_through(socks_port)
        # The user twistd switched to may not remove the pid file; stopping does.
        self.assertEqual(await deferToThread(stop_daemon, pid_file, 20, io.StringIO()), 0)
        self.assertTrue(gone(pid))
        self.assertFalse(os.path.exists(pid_file))

    @skipUnless(os.geteuid() == 0, "switching to another user needs root")
    @support.requires("ss-local", package="shadowsocks-libev")
    def test_daemon_as_user(self):
        """-f daemonises with that pid file, -a runs it as that user; it relays for libev's ss-local."""
        return defer.Deferred.fromCoroutine(self._daemon_as_user())


class RefusedTests(CompatTestCase):
    """A flag whose feature ssx lacks stops the command before anything starts."""

    @defer.inlineCallbacks
    def test_refused_flag(self):
        """One line naming the flag, exit status 2, for each command."""
        cases = [("ssx-ss-server", "--mptcp", []), ("ssx-ss-local", "--mtu", ["1400"])]
        for name, flag, extra in cases:
            out, err, code = yield self.run_command(name, "-k", "pw", flag, *extra)
            self.assertEqual(code, 2, (name, out, err))
            lines = (out + err).decode().splitlines()
            self.assertEqual(len(lines), 1, lines)
            self.assertTrue(lines[0].startswith(f"{name}: {flag} "), lines)
            self.assertTrue(lines[0].endswith("is not supported by ssx yet"), lines)
