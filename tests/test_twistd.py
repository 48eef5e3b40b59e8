"""
The commands as users run them: `twistd ssx-server` and `twistd ssx-local` in
child processes, curl through them.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
from unittest import skipUnless

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from twisted.web import resource, server as web_server

from ssx.wire.sip002 import parse_url
from tests import support

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = ["-c", "from twisted.scripts.twistd import run; run()"]


def twistd_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=ROOT + (os.pathsep + path if path else ""), no_proxy="", NO_PROXY="")


def run_twistd(*args: str) -> defer.Deferred:
    """Run twistd to completion: (stdout, stderr, exit code)."""
    return getProcessOutputAndValue(sys.executable, [*TWISTD, *args], env=twistd_env(), path=tempfile.gettempdir())


class TwistdHelpTests(unittest.TestCase):
    """twistd knows both commands and explains them."""

    @defer.inlineCallbacks
    def test_plugins_listed(self):
        """`twistd --help` lists ssx-local and ssx-server."""
        out, err, code = yield run_twistd("--help")
        self.assertEqual(code, 0, err)
        self.assertIn(b"ssx-local", out)
        self.assertIn(b"ssx-server", out)

    @defer.inlineCallbacks
    def test_command_help(self):
        """Each command's --help describes its options and the methods."""
        out, err, code = yield run_twistd("ssx-server", "--help")
        self.assertEqual(code, 0, err)
        for word in (b"--password", b"--forbidden-ip", b"--nameserver", b"--listen", b"aes-256-gcm"):
            self.assertIn(word, out)
        out, err, code = yield run_twistd("ssx-local", "--help")
        self.assertEqual(code, 0, err)
        # usage.Options wraps long words at their hyphens.
        out = re.sub(rb"-\n\s+", b"-", out)
        for word in (b"--server-endpoint", b"--socks-user", b"--local-port", b"chacha20-ietf-poly1305", b"--url",
                     b"--health-check-interval", b"SOCKS4/4a and HTTP", b"trustRoots"):
            self.assertIn(word, out)
        for command in ("ssx-server", "ssx-local"):
            out, err, code = yield run_twistd(command, "--help")
            for word in (b"--plugin=", b"--plugin-opts=", b"UDP"):
                self.assertIn(word, out, command)

    @defer.inlineCallbacks
    def test_bad_method_one_line(self):
        """An unknown method stops start-up with exactly one line naming the key, and a non-zero status."""
        out, err, code = yield run_twistd("-n", "--pidfile=", "ssx-server", "-m", "rot13")
        self.assertNotEqual(code, 0)
        lines = (out + err).decode().strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("ssx-server: bad configuration: method: unknown method 'rot13'"), lines)

    @defer.inlineCallbacks
    def test_local_without_server_one_line(self):
        """ssx-local with no server says so in one line naming the key."""
        out, err, code = yield run_twistd("-n", "--pidfile=", "ssx-local", "-k", "pw")
        self.assertNotEqual(code, 0)
        lines = (out + err).decode().strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("server: required", lines[0])


    @defer.inlineCallbacks
    def test_missing_plugin_one_line(self):
        """A --plugin that is not installed stops start-up with one line naming plugin."""
        out, err, code = yield run_twistd("-n", "--pidfile=", "ssx-server", "--plugin", "no-such-plugin-ssx")
        self.assertNotEqual(code, 0)
        lines = (out + err).decode().strip().splitlines()
        self.assertEqual(
            lines, ["ssx-server: bad configuration: plugin: 'no-such-plugin-ssx' not found: no executable of that name on PATH"]
        )

    @defer.inlineCallbacks
    def test_plugin_exits_at_once(self):
        """A plugin that exits at start-up stops twistd with a non-zero status and one line saying why, no traceback."""
        directory = tempfile.mkdtemp(prefix="ssx-")
        self.addCleanup(shutil.rmtree, directory)
        plugin = os.path.join(directory, "broken-obfs")
        with open(plugin, "w") as f:
            f.write("#!/bin/sh\necho 'fatal: unknown obfs mode' >&2\nexit 3\n")
        os.chmod(plugin, 0o755)
        out, err, code = yield run_twistd(
            "-n", "--pidfile=", "ssx-local", "-s", "127.0.0.1", "-k", "pw", "-l", "0", "--plugin", plugin,
        )
        text = (out + err).decode()
        self.assertNotEqual(code, 0, text)
        self.assertNotIn("Traceback", text)
        reasons = [line for line in text.splitlines() if "exited (exit code 3)" in line]
        self.assertEqual(len(reasons), 1, text)
        self.assertRegex(
            reasons[0],
            rf"ssx-local: plugin {re.escape(plugin)} exited \(exit code 3\) before it listened on 127\.0\.0\.1:\d+; "
            r"it said: fatal: unknown obfs mode$",
        )


class TwistdChainTests(unittest.TestCase):
    """The README's commands, end to end."""

    async def _start(self, *args: str, ready: bytes, cwd: str | None = None) -> support.ChildProcess:
        child = support.ChildProcess()
        reactor.spawnProcess(
            child, sys.executable, [sys.executable, *TWISTD, *args], env=twistd_env(), path=cwd or tempfile.gettempdir()
        )
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
        await support.wait_until(lambda: ready in b"".join(child.output) or child.ended.called, 10, step=0.05)
        if ready in b"".join(child.output):
            return child
        self.fail(f"twistd did not get ready: {child.text()}")

    async def _default_server(self) -> None:
        body = os.urandom(1024 * 1024)
        root = resource.Resource()
        leaf = resource.Resource()
        leaf.isLeaf = True
        leaf.render_GET = lambda request: body  # type: ignore[method-assign]
        root.putChild(b"file", leaf)
        web = reactor.listenTCP(0, web_server.Site(root), interface="127.0.0.1")
        self.addCleanup(web.stopListening)

        server_port = support.free_port()
        # No password: the server generates one and writes the ss:// URL
        # to ssx-server.url in its working directory.
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        server = await self._start(
            "-n", "--pidfile=", "ssx-server", "-p", str(server_port), "--forbidden-ip=", ready=b"clients connect to",
            cwd=directory,
        )
        with open(os.path.join(directory, "ssx-server.url")) as f:
            match = re.fullmatch(r"ss://([A-Za-z0-9_-]+)@([^:\s]+):(\d+)\n", f.read())
        self.assertIsNotNone(match)
        userinfo = base64.urlsafe_b64decode(match.group(1) + "=" * (-len(match.group(1)) % 4)).decode()
        method, password = userinfo.split(":", 1)
        self.assertEqual(method, "chacha20-ietf-poly1305")
        self.assertEqual(int(match.group(3)), server_port)
        self.assertNotIn(password, server.text())
        self.assertNotIn(match.group(1), server.text())

        socks_port = support.free_port()
        await self._start(
            "-n", "--pidfile=", "ssx-local", "-s", "127.0.0.1", "-p", str(server_port), "-l", str(socks_port),
            "-k", password, "-m", method, ready=b"listening on",
        )
        out, err, code = await getProcessOutputAndValue(
            "curl", ["-sS", "--max-time", "20", "--socks5-hostname", f"127.0.0.1:{socks_port}",
                     f"http://localhost:{web.getHost().port}/file"],
            env=twistd_env(),
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(support.sha256(out), support.sha256(body))

    @support.requires("curl", package="curl")
    def test_default_server_and_local(self):
        """`twistd -n ssx-server` with no password writes an ss:// URL it does not log; ssx-local with it carries curl's download intact."""
        return defer.Deferred.fromCoroutine(self._default_server())

    async def _url_chain(self) -> None:
        body = os.urandom(1024 * 1024)
        root = resource.Resource()
        leaf = resource.Resource()
        leaf.isLeaf = True
        leaf.render_GET = lambda request: body  # type: ignore[method-assign]
        root.putChild(b"file", leaf)
        web = reactor.listenTCP(0, web_server.Site(root), interface="127.0.0.1")
        self.addCleanup(web.stopListening)

        server_port = support.free_port()
        url_file = os.path.abspath(self.mktemp()) + ".url"
        await self._start(
            "-n", "--pidfile=", "ssx-server", "-s", "127.0.0.1", "-p", str(server_port), "-k", "pass word:@/x",
            "-m", "aes-128-gcm", "--forbidden-ip=", "--url-file", url_file, ready=b"clients connect to",
        )
        with open(url_file) as f:
            url = f.read().strip()
        self.assertTrue(url.startswith("ss://") and url.endswith(f"@127.0.0.1:{server_port}"), url)
        proxy_port = support.free_port()
        await self._start("-n", "--pidfile=", "ssx-local", "--url", url, "-l", str(proxy_port), ready=b"listening on")
        out, err, code = await getProcessOutputAndValue(
            "curl", ["-sS", "--max-time", "20", "-x", f"http://127.0.0.1:{proxy_port}",
                     f"http://localhost:{web.getHost().port}/file"],
            env=twistd_env(),
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(support.sha256(out), support.sha256(body))

    @support.requires("curl", package="curl")
    def test_server_url_into_local(self):
        """The URL ssx-server writes for a given password, passed to ssx-local --url, carries curl's HTTP-proxy download intact."""
        return defer.Deferred.fromCoroutine(self._url_chain())

    @defer.inlineCallbacks
    def test_malformed_url_one_line(self):
        """A malformed --url stops ssx-local with one line naming url, without repeating the URL."""
        out, err, code = yield run_twistd("-n", "--pidfile=", "ssx-local", "--url", "ss://YWVzLTEyOC1nY206c2VjcmV0LXBhc3N3b3Jk@h")
        self.assertNotEqual(code, 0)
        lines = (out + err).decode().strip().splitlines()
        self.assertEqual(lines, ["ssx-local: bad configuration: url: the ss:// URL has no port"])

class BadNumberTests(unittest.TestCase):
    """Numbers that str.isdigit() or float() would take but are no plain number stop twistd with one line."""

    @defer.inlineCallbacks
    def test_bad_numbers_one_line(self):
        """'²', '٣', NaN and bad ports inside strings: one line naming the key, a non-zero status, no traceback."""
        local = ["ssx-local", "-s", "127.0.0.1", "-k", "pw"]
        cases = [
            (["ssx-server", "--max-connections", "²"], "ssx-server", "max_connections"),
            (["ssx-server", "-p", "٣"], "ssx-server", "server_port"),
            (["ssx-server", "--udp-timeout", "nan"], "ssx-server", "udp_timeout"),
            (["ssx-server", "--nameserver", "1.1.1.1:²"], "ssx-server", "nameserver"),
            ([*local, "-l", "²"], "ssx-local", "local_port"),
            ([*local, "--online-config", "https://example.org:²/list"], "ssx-local", "online_config"),
            ([*local, "--health-check-url", "http://example.org:²/"], "ssx-local", "health_check_url"),
        ]
        for args, command, key in cases:
            out, err, code = yield run_twistd("-n", "--pidfile=", *args)
            text = (out + err).decode()
            self.assertNotEqual(code, 0, args)
            self.assertNotIn("Traceback", text)
            lines = text.strip().splitlines()
            self.assertEqual(len(lines), 1, lines)
            self.assertTrue(lines[0].startswith(f"{command}: bad configuration: {key}: expected "), lines)


# Runs the rest of the command line with umask 0, so that only the modes
# ssx asks for keep a file from others.
UMASK_ZERO = "import os, sys; os.umask(0); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"


class UrlFileTests(unittest.TestCase):
    """ssx-server's ss:// URL goes to a 0600 file, never to the log, which twistd may leave readable by all."""

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="ssx-url-")
        self.addCleanup(shutil.rmtree, self.directory)
        self.url_file = os.path.join(self.directory, "ssx-server.url")

    async def _start(self, *args: str, log: str | None = None, rundir: bool = False) -> support.ChildProcess:
        """
        twistd -n ssx-server ARGS with umask 0, in the temporary directory (or
        elsewhere, with --rundir naming it), until it says where the URL is.
        """
        child = support.ChildProcess()
        argv = [sys.executable, "-c", UMASK_ZERO, *TWISTD, "-n", "--pidfile="]
        argv += [f"--logfile={log}"] if log else []
        argv += [f"--rundir={self.directory}"] if rundir else []
        argv += ["ssx-server", "-s", "127.0.0.1", "-p", "0", *args]
        cwd = tempfile.gettempdir() if rundir else self.directory
        reactor.spawnProcess(child, sys.executable, argv, env=twistd_env(), path=cwd)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
        for _ in range(200):
            text = child.text()
            if log and os.path.exists(log):
                with open(log, errors="replace") as f:
                    text = f.read()
            if "clients connect" in text:
                return child
            if child.ended.called:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.fail(f"twistd did not get ready: {child.text()}")

    def _url(self) -> str:
        info = os.lstat(self.url_file)
        self.assertTrue(stat.S_ISREG(info.st_mode))
        self.assertEqual(stat.S_IMODE(info.st_mode), 0o600)
        with open(self.url_file) as f:
            return f.read().strip()

    async def _given_password(self) -> None:
        log = os.path.join(self.directory, "twistd.log")
        await self._start("-k", "pass word:@/x", "-m", "aes-128-gcm", log=log)
        with open(log) as f:
            text = f.read()
        userinfo = base64.urlsafe_b64encode(b"aes-128-gcm:pass word:@/x").decode().rstrip("=")
        for secret in ("pass word", userinfo):
            self.assertNotIn(secret, text)
        self.assertNotRegex(text, r"ss://\S*@")
        self.assertIn(f"the ss:// URL they import (it carries the password) is in {self.url_file}", text)
        url = self._url()
        self.assertEqual(parse_url(url).password, "pass word:@/x")
        self.assertEqual(url.partition("@")[0], "ss://" + userinfo)

    def test_given_password_not_logged(self):
        """With -k, under umask 0, the URL file is 0600 and twistd's log file names it without the password."""
        return defer.Deferred.fromCoroutine(self._given_password())

    async def _generated_kept(self) -> None:
        first = await self._start(rundir=True)
        url = self._url()
        password = parse_url(url).password
        self.assertNotIn(password, first.text())
        self.assertNotIn(url.partition("@")[0], first.text())
        self.assertIn("no password given: generated one", first.text())
        await first.stop()
        second = await self._start(rundir=True)
        self.assertEqual(parse_url(self._url()).password, password)
        self.assertNotIn(password, second.text())
        self.assertIn("no password given: kept the one generated at an earlier start", second.text())

    def test_generated_password_kept(self):
        """A generated password is written to ssx-server.url (0600) in twistd's --rundir and used again at the next start."""
        return defer.Deferred.fromCoroutine(self._generated_kept())

    async def _planted_by_another_user(self) -> None:
        planted = "ss://" + base64.urlsafe_b64encode(b"aes-128-gcm:planted-secret").decode().rstrip("=") + "@vm:8388"
        with open(self.url_file, "w") as f:
            f.write(planted + "\n")
        os.chmod(self.url_file, 0o600)
        os.chown(self.url_file, 65534, 65534)
        child = await self._start("-m", "aes-128-gcm", rundir=True)
        self.assertIn(f"{self.url_file} not used (open to other users, or owned by another): generated a new password", child.text())
        self.assertIn("no password given: generated one", child.text())
        self.assertNotEqual(parse_url(self._url()).password, "planted-secret")
        self.assertEqual(os.lstat(self.url_file).st_uid, os.geteuid())

    @skipUnless(os.geteuid() == 0, "chown to another user needs root")
    def test_root_ignores_another_users_file(self):
        """Run as root without a password, ssx-server does not take the password of a 0600 URL file another user owns: it warns and generates one."""
        return defer.Deferred.fromCoroutine(self._planted_by_another_user())

    async def _planted_link(self) -> None:
        victim = os.path.join(self.directory, "victim")
        with open(victim, "w") as f:
            f.write("untouched\n")
        os.chmod(victim, 0o644)
        os.symlink(victim, self.url_file)
        await self._start("-k", "pw-planted", "--url-file", self.url_file)
        with open(victim) as f:
            self.assertEqual(f.read(), "untouched\n")
        self.assertEqual(parse_url(self._url()).password, "pw-planted")
        self.assertEqual(sorted(os.listdir(self.directory)), ["ssx-server.url", "victim"])

    def test_planted_link_not_followed(self):
        """A symbolic link planted at the URL file's path is replaced, not written through: its target stays as it was."""
        return defer.Deferred.fromCoroutine(self._planted_link())


# Sets what systemd sets for an activated service, in the process that then
# becomes twistd (LISTEN_PID must be the pid of the process that reads it).
SYSTEMD_WRAPPER = (
    "import os, sys; os.environ['LISTEN_PID'] = str(os.getpid()); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


class SystemdActivationTests(unittest.TestCase):
    """ssx-server with --listen systemd:..., given its listening socket as systemd does."""

    async def _activated(self) -> None:
        echo = support.listen_echo()
        self.addCleanup(echo.stopListening)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        port = sock.getsockname()[1]
        env = dict(twistd_env(), LISTEN_FDS="1", LISTEN_FDNAMES="ssx")
        child = support.ChildProcess()
        args = [
            sys.executable, "-c", SYSTEMD_WRAPPER, *TWISTD, "-n", "--pidfile=", "ssx-server",
            "--listen", "systemd:domain=INET:index=0", "-k", support.PASSWORD, "-m", "aes-256-gcm", "--forbidden-ip=",
            "--url-file=",
        ]
        try:
            # The socket becomes the child's fd 3, the first systemd passes.
            reactor.spawnProcess(
                child, sys.executable, args, env=env, path=tempfile.gettempdir(), childFDs={0: "w", 1: "r", 2: "r", 3: sock.fileno()}
            )
        finally:
            sock.close()  # from now on only the child holds it
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
        await support.wait_until(lambda: b"listening on" in b"".join(child.output) or child.ended.called, 10, step=0.05)
        self.assertIn(f"ssx-server listening on 127.0.0.1:{port}", child.text())
        local, socks_port = support.start_local(port, method="aes-256-gcm")
        self.addCleanup(local.stopService)
        payload = os.urandom(1024 * 1024)
        reply, received = await support.socks_transfer(socks_port, "127.0.0.1", echo.getHost().port, payload)
        self.assertEqual(reply, 0, child.text())
        self.assertEqual((len(received), support.sha256(received)), (len(payload), support.sha256(payload)))

    def test_socket_activation(self):
        """ssx-server adopts the inherited socket (LISTEN_FDS=1, fd 3) and relays 1 MiB each way intact through it."""
        return defer.Deferred.fromCoroutine(self._activated())
