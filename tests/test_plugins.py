"""
SIP003 plugins as child processes of both ends, on loopback.

`PluginServiceTests` use small fake plugins written by the test (what the
plugin is given, start-up failures, logging).  The interop tests run the
real plugins Debian packages: simple-obfs (`obfs-local`, `obfs-server`) and
v2ray-plugin (`ss-v2ray-plugin` in Debian, `v2ray-plugin` upstream), between
ssx ends and against shadowsocks-libev's `ss-server`/`ss-local`.  Payloads
are hashed at the target and at the client.

simple-obfs, like libev, ends both directions when one side closes, so the
client here never half-closes: it waits for the whole echo, then closes.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tempfile
from typing import Any

from twisted.internet import defer, reactor
from twisted.logger import formatEvent
from twisted.trial import unittest
from twisted.web import resource, server as web_server

from ssx.config import local_config
import ssx.local.tap as local_tap
from ssx.wire import socks5
from ssx.net.plugin import PluginService
from ssx.wire.sip003 import Plugin
from tests import support
from tests.support import HashingEchoFactory, whole_echo_transfer

METHOD = "aes-256-gcm"
V2RAY = next((name for name in ("v2ray-plugin", "ss-v2ray-plugin") if shutil.which(name)), None)


def _skip(*names: str | None) -> str | None:
    missing = [n for n in names if n is None or shutil.which(n) is None]
    if not missing:
        return None
    return (
        f"not installed: {', '.join(str(n) for n in missing)}; install Debian's simple-obfs, "
        "shadowsocks-v2ray-plugin and shadowsocks-libev to run the plugin tests"
    )


FAKE_PLUGIN = """\
import json, os, socket, sys
role, record = sys.argv[1], sys.argv[2]
print("fake plugin on stdout", flush=True)
print("fake plugin on stderr", file=sys.stderr, flush=True)
with open(record, "w") as f:
    ss = {k: v for k, v in os.environ.items() if k.startswith("SS_")}
    json.dump({"env": ss, "argv": sys.argv, "stdin": sys.stdin.read()}, f)
side = "SS_LOCAL_" if role == "local" else "SS_REMOTE_"
host = os.environ[side + "HOST"].split("|")[0]
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, int(os.environ[side + "PORT"])))
s.listen()
while True:
    s.accept()[0].close()
"""


class PluginTestCase(unittest.TestCase):
    """A hashing echo target, a scratch directory, and the log events seen during the test."""

    def setUp(self) -> None:
        self.echo_factory = HashingEchoFactory()
        self.echo = reactor.listenTCP(0, self.echo_factory, interface="127.0.0.1")
        self.addCleanup(self.echo.stopListening)
        self.directory = tempfile.mkdtemp(prefix="ssx-plugin-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.events = support.log_events(self)

    def logged(self) -> str:
        return "\n".join(formatEvent(e) for e in self.events)

    def script(self, name: str, text: str) -> str:
        """An executable file `name` holding `text`."""
        path = os.path.join(self.directory, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
        return path

    def server(self, plugin: str, options: str, **values: Any) -> tuple[Any, int]:
        """ssx-server with `plugin` on a free loopback port; returns (service, public port)."""
        values.setdefault("method", METHOD)
        service, port = support.start_server(
            server="127.0.0.1", server_port=support.free_port(), listen=None, plugin=plugin, plugin_opts=options, **values
        )
        self.addCleanup(service.stopService)
        return service, port

    def local(self, server_port: int, plugin: str, options: str, **values: Any) -> tuple[Any, int]:
        """ssx-local with `plugin`, aimed at 127.0.0.1:server_port; returns (service, SOCKS port)."""
        values.setdefault("method", METHOD)
        service, port = support.start_local(server_port, plugin=plugin, plugin_opts=options, **values)
        self.addCleanup(service.stopService)
        return service, port

    async def echo_through(self, socks_port: int, size: int = 2 * 1024 * 1024, context: str = "") -> None:
        """`size` random bytes to the echo and back through `socks_port`; hashed at the echo and at the client."""
        payload = os.urandom(size)
        before = len(self.echo_factory.inbound)
        reply, received = await whole_echo_transfer(socks_port, "127.0.0.1", self.echo.getHost().port, payload)
        context = context or self.logged()
        # The children's last log lines may still be on their way: a failure waits for them.
        async with support.late_lines_quoted(self.logged):
            self.assertEqual(reply, socks5.REP_SUCCEEDED, context)
            self.assertEqual(len(self.echo_factory.inbound), before + 1, context)
            target = self.echo_factory.inbound[-1]
            self.assertEqual((target.size, target.digest.hexdigest()), (size, support.sha256(payload)), context)
            self.assertEqual((len(received), support.sha256(received)), (size, support.sha256(payload)), context)

    async def spawn_libev(self, executable: str, args: list[str], port: int) -> support.ChildProcess:
        """A libev binary (verbose), ready once something accepts on `port`."""
        child = support.spawn(executable, [*args, "-v"])
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
        try:
            await support.wait_for_port(port)
        except Exception as e:
            self.fail(f"{executable} never listened on {port} ({e!r}); its output:\n{child.text()}")
        return child


class PluginServiceTests(PluginTestCase):
    """What a plugin is given, and how its start-up fails, with fake plugins."""

    def fake(self) -> tuple[str, str]:
        """The fake plugin and the file it records its environment in."""
        return self.script("fake-plugin", f"#!{sys.executable}\n{FAKE_PLUGIN}"), os.path.join(self.directory, "record.json")

    def record(self, path: str) -> dict:
        with open(path) as f:
            return json.load(f)

    def test_local_side(self):
        """Local end: SS_REMOTE_* is the server, SS_LOCAL_* the picked loopback port; options verbatim, args appended, stdin empty."""
        path, record = self.fake()
        plugin = Plugin(path, r"obfs=http;obfs-host=a\;b", ("local", record))
        service = PluginService(reactor, plugin, "ssx-local", ("192.0.2.7", 8443))
        service.startService()
        self.addCleanup(service.stopService)
        seen = self.record(record)
        host, port = service.local_address
        self.assertEqual(
            seen["env"],
            {
                "SS_REMOTE_HOST": "192.0.2.7",
                "SS_REMOTE_PORT": "8443",
                "SS_LOCAL_HOST": "127.0.0.1",
                "SS_LOCAL_PORT": str(port),
                "SS_PLUGIN_OPTIONS": r"obfs=http;obfs-host=a\;b",
            },
        )
        self.assertEqual(host, "127.0.0.1")
        self.assertEqual(seen["argv"][1:], ["local", record])
        self.assertEqual(seen["stdin"], "")

    async def _server_side(self) -> None:
        path, record = self.fake()
        public = support.free_port()
        server, port = support.start_server(
            server="127.0.0.1", server_port=public, listen=None, plugin=path, plugin_args=["server", record]
        )
        self.addCleanup(server.stopService)
        seen = self.record(record)
        behind = server.listeners[0].port.getHost()
        self.assertEqual(port, public)
        self.assertEqual(behind.host, "127.0.0.1")
        self.assertEqual(
            seen["env"],
            {"SS_REMOTE_HOST": "127.0.0.1", "SS_REMOTE_PORT": str(public), "SS_LOCAL_HOST": "127.0.0.1",
             "SS_LOCAL_PORT": str(behind.port)},
        )
        # Its output lines reach the log, tagged with its name.
        await support.wait_until(lambda: "[fake-plugin] fake plugin on stderr" in self.logged(), 5)
        self.assertIn("[fake-plugin] fake plugin on stdout", self.logged())
        self.assertIn("[fake-plugin] fake plugin on stderr", self.logged())

    def test_server_side(self):
        """Server end: SS_REMOTE_* is the public address, SS_LOCAL_* ssx's loopback listener; the output is logged."""
        return defer.Deferred.fromCoroutine(self._server_side())

    def test_exits_at_once(self):
        """A plugin that exits before listening stops start-up with one line: its status and its last words."""
        path = self.script("bad-plugin", "#!/bin/sh\necho starting\necho 'fatal: unknown obfs mode' >&2\nexit 3\n")
        service = PluginService(reactor, Plugin(path), "ssx-local", ("127.0.0.1", 1))
        self.addCleanup(service.stopService)
        with self.assertRaises(SystemExit) as caught:
            service.startService()
        message = str(caught.exception.code)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith(f"ssx-local: plugin {path} exited (exit code 3) before it listened on 127.0.0.1:"), message)
        self.assertTrue(message.endswith("; it said: fatal: unknown obfs mode"), message)

    def test_never_listens(self):
        """A plugin that does not listen within the deadline stops start-up with one line, and is stopped."""
        path = self.script("mute-plugin", "#!/bin/sh\nexec sleep 30\n")
        service = PluginService(reactor, Plugin(path), "ssx-server", ("127.0.0.1", 1), deadline=0.5)
        with self.assertRaises(SystemExit) as caught:
            service.startService()
        self.assertIn(f"plugin {path} did not listen on 127.0.0.1:", str(caught.exception.code))
        self.assertIn("within 0.5 s", str(caught.exception.code))
        # stopService waits for the process to end; trial would fail the test on a leftover process.
        return service.stopService()

    def test_missing_executable(self):
        """A plugin that is not there stops start-up with one line naming plugin."""
        service = PluginService(reactor, Plugin("no-such-plugin-ssx"), "ssx-local", ("127.0.0.1", 1))
        with self.assertRaises(SystemExit) as caught:
            service.startService()
        self.assertEqual(
            str(caught.exception.code),
            "ssx-local: bad configuration: plugin: 'no-such-plugin-ssx' not found: no executable of that name on PATH",
        )

    async def _stop(self) -> None:
        path, record = self.fake()
        service = PluginService(reactor, Plugin(path, "", ("local", record)), "ssx-local", ("127.0.0.1", 1))
        service.startService()
        pid = service.monitor.protocols["fake-plugin"].transport.pid
        await service.stopService()
        self.assertEqual(service.monitor.protocols, {})
        with self.assertRaises(ProcessLookupError):
            os.kill(pid, 0)

    def test_stop_ends_process(self):
        """Stopping the service ends the plugin and waits for it; it is not restarted."""
        return defer.Deferred.fromCoroutine(self._stop())


class ObfsTests(PluginTestCase):
    """simple-obfs between ssx ends, and with shadowsocks-libev."""

    skip = _skip("obfs-local", "obfs-server")

    async def _ssx_both(self, mode: str) -> None:
        server, port = self.server("obfs-server", f"obfs={mode}")
        _, socks_port = self.local(port, "obfs-local", f"obfs={mode};obfs-host=www.bing.com")
        await self.echo_through(socks_port)
        await self.echo_through(socks_port, 1000)

    def test_http_ssx_both_ends(self):
        """ssx-local + obfs-local (obfs=http) -> obfs-server + ssx-server: 2 MiB each way intact, twice over."""
        return defer.Deferred.fromCoroutine(self._ssx_both("http"))

    def test_tls_ssx_both_ends(self):
        """ssx-local + obfs-local (obfs=tls) -> obfs-server + ssx-server: 2 MiB each way intact, twice over."""
        return defer.Deferred.fromCoroutine(self._ssx_both("tls"))

    async def _ss_server(self, mode: str) -> None:
        port = support.free_port()
        child = await self.spawn_libev(
            "ss-server",
            ["-s", "127.0.0.1", "-p", str(port), "-k", support.PASSWORD, "-m", METHOD,
             "--plugin", "obfs-server", "--plugin-opts", f"obfs={mode}"],
            port,
        )
        _, socks_port = self.local(port, "obfs-local", f"obfs={mode};obfs-host=www.bing.com")
        await self.echo_through(socks_port, context=f"--- ss-server ---\n{child.text()}")

    def test_http_against_ss_server(self):
        """ssx-local + obfs-local (obfs=http) -> libev's ss-server + obfs-server: 2 MiB each way intact."""
        return defer.Deferred.fromCoroutine(self._ss_server("http"))

    def test_tls_against_ss_server(self):
        """ssx-local + obfs-local (obfs=tls) -> libev's ss-server + obfs-server: 2 MiB each way intact."""
        return defer.Deferred.fromCoroutine(self._ss_server("tls"))

    async def _ss_local(self) -> None:
        _, port = self.server("obfs-server", "obfs=http")
        socks_port = support.free_port()
        child = await self.spawn_libev(
            "ss-local",
            ["-s", "127.0.0.1", "-p", str(port), "-b", "127.0.0.1", "-l", str(socks_port), "-k", support.PASSWORD,
             "-m", METHOD, "--plugin", "obfs-local", "--plugin-opts", "obfs=http;obfs-host=www.bing.com"],
            socks_port,
        )
        # ss-local listens before the obfs-local it starts does: a request
        # in between is refused. The plugin says when it listens.
        await support.wait_for(
            lambda: "[simple-obfs] INFO: listening at" in child.text(), 10,
            lambda: f"obfs-local never listened; ss-local's output:\n{child.text()}",
        )
        await self.echo_through(socks_port, context=f"--- ss-local ---\n{child.text()}")

    def test_libev_local_against_ssx_server(self):
        """libev's ss-local + obfs-local (obfs=http) -> obfs-server + ssx-server: 2 MiB each way intact."""
        return defer.Deferred.fromCoroutine(self._ss_local())


for _name in ("test_http_against_ss_server", "test_tls_against_ss_server", "test_libev_local_against_ssx_server"):
    getattr(ObfsTests, _name).skip = _skip("ss-server", "ss-local")
del _name


class V2rayTests(PluginTestCase):
    """v2ray-plugin (WebSocket mode) between ssx ends, and with shadowsocks-libev's ss-server."""

    skip = _skip(V2RAY)

    async def _ssx_both(self) -> None:
        assert V2RAY is not None
        _, port = self.server(V2RAY, "server;host=cdn.example.com;path=/ws")
        _, socks_port = self.local(port, V2RAY, "host=cdn.example.com;path=/ws")
        await self.echo_through(socks_port)
        await self.echo_through(socks_port, 1000)

    def test_websocket_ssx_both_ends(self):
        """ssx-local + v2ray-plugin -> v2ray-plugin (server) + ssx-server over WebSocket: 2 MiB each way intact, twice."""
        return defer.Deferred.fromCoroutine(self._ssx_both())

    async def _ss_server(self) -> None:
        assert V2RAY is not None
        port = support.free_port()
        child = await self.spawn_libev(
            "ss-server",
            ["-s", "127.0.0.1", "-p", str(port), "-k", support.PASSWORD, "-m", METHOD,
             "--plugin", V2RAY, "--plugin-opts", "server;path=/ws"],
            port,
        )
        _, socks_port = self.local(port, V2RAY, "path=/ws")
        await self.echo_through(socks_port, context=f"--- ss-server ---\n{child.text()}")

    def test_websocket_against_ss_server(self):
        """ssx-local + v2ray-plugin -> libev's ss-server + v2ray-plugin (server): 2 MiB each way intact."""
        return defer.Deferred.fromCoroutine(self._ss_server())

    test_websocket_against_ss_server.skip = _skip("ss-server")  # type: ignore[attr-defined]


class RestartTests(PluginTestCase):
    """A plugin that dies is started again, and traffic resumes."""

    skip = _skip("obfs-local", "obfs-server")

    async def _crash(self) -> None:
        server, port = self.server("obfs-server", "obfs=http")
        local, socks_port = self.local(port, "obfs-local", "obfs=http;obfs-host=www.bing.com")
        await self.echo_through(socks_port, 100_000)
        monitors = [(local.plugin.monitor, "obfs-local"), (server.plugin.monitor, "obfs-server")]
        old = [m.protocols[name].transport.pid for m, name in monitors]
        for monitor, name in monitors:
            monitor.protocols[name].transport.signalProcess("KILL")
        # ProcessMonitor starts each again (after 1 s: they had lived less
        # than its threshold); until then connections fail.
        deadline = reactor.seconds() + 15
        while True:
            try:
                await self.echo_through(socks_port, 300_000)
                break
            except self.failureException:
                if reactor.seconds() > deadline:
                    raise
                # A poll's step: try again until the restarted plugins listen.
                await support.sleep(0.2)
        new = [m.protocols[name].transport.pid for m, name in monitors]
        self.assertTrue(all(a != b for a, b in zip(old, new)), (old, new))
        self.assertIn("plugin obfs-local exited (signal 9); restarting in", self.logged())
        self.assertIn("plugin obfs-server exited (signal 9); restarting in", self.logged())

    def test_crash_restart(self):
        """Both plugins killed (SIGKILL) are restarted by the monitor, and 300 kB then go through intact."""
        return defer.Deferred.fromCoroutine(self._crash())


class UdpBesidePluginTests(PluginTestCase):
    """UDP does not go through a TCP-only plugin: it stays on the plain path, as with libev."""

    skip = _skip("obfs-local", "obfs-server")

    async def _udp(self) -> None:
        udp_port, echo = support.listen_udp_echo()
        self.addCleanup(udp_port.stopListening)
        server, port = self.server("obfs-server", "obfs=tls", mode="tcp_and_udp")
        _, socks_port = self.local(port, "obfs-local", "obfs=tls", mode="tcp_and_udp")
        # The server's UDP is bound on the public address and port, where the plugin listens for TCP.
        udp = [s for s in server.datagram_listeners if s.protocol in server.udp_relays]
        self.assertEqual([s.port.getHost().port for s in udp], [port])
        client = support.Socks5UdpClient()
        self.addCleanup(client.close)
        self.assertEqual(await client.open(socks_port), 0)
        payloads = [os.urandom(n) for n in (1, 100, 1400, 8000)]
        await client.exchange("127.0.0.1", udp_port.getHost().port, payloads)
        self.assertGreaterEqual(echo.count, len(payloads))
        await self.echo_through(socks_port, 100_000)

    def test_udp_plain_path(self):
        """With -u and obfs on both ends, UDP datagrams go straight to server:port and come back intact; TCP still works."""
        return defer.Deferred.fromCoroutine(self._udp())


class PluginPerServerTests(PluginTestCase):
    """Several servers, each behind its own plugin, in one ssx-local servers list."""

    skip = _skip("obfs-local", "obfs-server")

    def local_list(self, servers: list[tuple[int, str]]) -> Any:
        """ssx-local with a servers list: (port, obfs mode) each, obfs-local for every one; checked on request only."""
        check_port = support.listen_echo()
        self.addCleanup(check_port.stopListening)
        values = {
            "servers": [
                {"server": "127.0.0.1", "server_port": port, "password": support.PASSWORD, "method": METHOD,
                 "plugin": "obfs-local", "plugin_opts": f"obfs={mode};obfs-host=www.bing.com", "remarks": f"s{port}"}
                for port, mode in servers
            ],
            "listen": "tcp:0:interface=127.0.0.1",
            "health_check_interval": 3600,
            "health_check_url": f"http://127.0.0.1:{check_port.getHost().port}/",
        }
        service = local_tap.build_service(reactor, local_config(values))
        service.startService()
        self.addCleanup(service.stopService)
        return service, service.listeners[0].port.getHost().port

    async def _two(self) -> None:
        servers = {}
        for mode in ("http", "tls"):
            service, port = self.server("obfs-server", f"obfs={mode}")
            servers[port] = service
        local, socks_port = self.local_list([(port, mode) for port, mode in zip(servers, ("http", "tls"))])
        picker = local.picker
        first, second = picker.upstreams()
        # One obfs-local per server, each on its own loopback port, each aimed at its server.
        self.assertEqual(len(local.plugins), 2)
        self.assertEqual([p.remote for p in local.plugins], [("127.0.0.1", port) for port in servers])
        self.assertNotEqual(local.plugins[0].local_address, local.plugins[1].local_address)
        # The start-up health round went through both plugins.
        await support.wait_until(lambda: all(picker.health(u)[1] is not None for u in (first, second)), 10)
        self.assertTrue(all(picker.health(u)[0] for u in (first, second)), self.logged())

        # Bytes through each server's plugin: the other one marked down for the transfer.
        for upstream, other in ((first, second), (second, first)):
            picker.failed(other, "test: not this one")
            self.assertIs(picker.candidates()[0], upstream)
            await self.echo_through(socks_port, 512 * 1024)
            picker.succeeded(other)

        # The preferred server stops (server and its obfs-server): the health check marks it down and
        # new connections go through the other's plugin.
        preferred = picker.candidates()[0]
        survivor = second if preferred is first else first
        await servers[preferred.entry.port].stopService()
        await local.health.check_all()
        self.assertFalse(picker.health(preferred)[0], "the stopped server is not marked down")
        self.assertTrue(picker.health(survivor)[0])
        self.assertIs(picker.candidates()[0], survivor)
        await self.echo_through(socks_port, 512 * 1024)

    def test_two_servers_two_plugins(self):
        """Two ssx-servers behind obfs-server (http, tls), one ssx-local list with obfs-local each: bytes go through either, and through the survivor when one stops."""
        return defer.Deferred.fromCoroutine(self._two())


class _Document(resource.Resource):
    """Serves the SIP008 document the test puts in `body`."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.body = b""

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        return self.body


class OnlinePluginTests(PluginTestCase):
    """Online config servers with plugins: a plugin starts when its server appears and stops when it leaves."""

    skip = _skip("obfs-local", "obfs-server")

    def document(self, *servers: dict) -> None:
        self.config.body = json.dumps({"version": 1, "servers": list(servers)}).encode()

    def entry(self, port: int, **extra: Any) -> dict:
        return {"server": "127.0.0.1", "server_port": port, "password": support.PASSWORD, "method": METHOD,
                "remarks": f"s{port}", **extra}

    async def _online(self) -> None:
        key, cert = support.make_certificate(os.path.join(self.directory, "web"))
        self.config = _Document()
        web = support.listen_web(web_server.Site(self.config), key, cert)
        self.addCleanup(web.stopListening)
        _, obfs_port = self.server("obfs-server", "obfs=http")
        plain, plain_port = support.start_server(method=METHOD)
        self.addCleanup(plain.stopService)
        self.document(self.entry(obfs_port, plugin="obfs-local", plugin_opts="obfs=http;obfs-host=www.bing.com"))
        values = {"online_config": f"https://localhost:{web.getHost().port}/sip008", "online_config_ca": cert,
                  "listen": "tcp:0:interface=127.0.0.1", "health_check_interval": 0}
        local = local_tap.build_service(reactor, local_config(values))
        local.startService()
        self.addCleanup(local.stopService)
        socks_port = local.listeners[0].port.getHost().port
        online = local.online_upstreams
        await support.wait_until(lambda: bool(online.plugins), 10)
        [plugin] = online.plugins.values()
        self.assertEqual(plugin.remote, ("127.0.0.1", obfs_port))
        await support.wait_for_port(plugin.local_address[1])
        await self.echo_through(socks_port, 512 * 1024)

        # The server leaves the list (a plain one and one whose plugin is missing come in): its plugin stops.
        self.document(self.entry(plain_port), self.entry(obfs_port, plugin="ssx-no-such-plugin"))
        self.assertTrue(await local.online.refresh())
        self.assertEqual(online.plugins, {})
        self.assertEqual([u.entry.port for u in local.picker.upstreams()], [plain_port])
        await plugin.monitor.ended()
        self.assertFalse(plugin.running)
        self.assertEqual(plugin.monitor.protocols, {})
        self.assertIn("ssx-no-such-plugin", self.logged())
        await self.echo_through(socks_port, 512 * 1024)

    def test_plugin_follows_the_list(self):
        """An online server behind obfs gets obfs-local started and carries bytes; when it leaves the list, obfs-local stops."""
        return defer.Deferred.fromCoroutine(self._online())
