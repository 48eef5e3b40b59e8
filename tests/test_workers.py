"""
`--workers`: a supervising twistd process and worker processes that all
serve one port, run for real as twistd children and watched from outside
(their pids from the supervisor's log, who holds which connection from
/proc).  Also `--reuse-port` (two servers on one port, as with libev) and
the shared replay filter and socket plumbing on their own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ProcessTerminated
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial import unittest

from ssx.config import server_config
from ssx.crypto import SharedSaltFilter, generate_psk
from ssx.errors import ConfigError
from ssx.workers.sockets import Listener, close_all, open_slot_sockets
from ssx.workers.supervisor import Supervisor, WorkerTotals
from tests import support

PASSWORD = "workers secret"
METHOD = "aes-256-gcm"
_BOUND = re.compile(rb"supervisor: TCP on 127\.0\.0\.1:(\d+)")


class SharedPartsTests(unittest.SynchronousTestCase):
    """The pieces without processes: config, the shared filter, the sockets, the totals."""

    def test_config(self):
        """workers takes a count, 0 or auto (one per core); a plugin or a non-TCP listener is refused, naming the key."""
        self.assertEqual(server_config({"password": "x"}).workers, 1)
        self.assertEqual(server_config({"password": "x", "workers": 3}).workers, 3)
        self.assertEqual(server_config({"password": "x", "workers": "auto"}).workers, len(os.sched_getaffinity(0)))
        self.assertEqual(server_config({"password": "x", "workers": 0}).workers, len(os.sched_getaffinity(0)))
        self.assertTrue(server_config({"password": "x", "reuse_port": True}).reuse_port)
        for bad in ({"workers": "many"}, {"workers": -1}, {"workers": 2, "listen": "unix:/tmp/x.sock"},
                    {"workers": 2, "plugin": "obfs-server"}):
            with self.assertRaises(ConfigError) as caught:
                server_config({"password": "x", **bad})
            self.assertEqual(caught.exception.key, "workers")

    def test_key_limits_refused(self):
        """Per-key max_connections or quota with workers above 1 is refused naming workers (each worker would count them apart)."""
        key = {"id": "alice", "cipher": METHOD, "secret": "x"}
        self.assertEqual(server_config({"keys": [key], "workers": 2}).workers, 2)
        for limit in ({"max_connections": 2}, {"quota": {"bytes": "1G", "period": "30d"}}):
            self.assertEqual(server_config({"keys": [{**key, **limit}]}).workers, 1)
            with self.assertRaises(ConfigError) as caught:
                server_config({"keys": [{**key, **limit}], "workers": 2})
            self.assertEqual(caught.exception.key, "workers")
            self.assertIn("alice", caught.exception.message)

    def test_metrics_refused(self):
        """--metrics with workers above 1 is refused naming workers (each worker would bind the metrics port)."""
        self.assertEqual(server_config({"password": "x", "metrics": "tcp:9100"}).workers, 1)
        with self.assertRaises(ConfigError) as caught:
            server_config({"password": "x", "metrics": "tcp:9100", "workers": 2})
        self.assertEqual(caught.exception.key, "workers")

    def test_shared_filter_refuses_across_processes_views(self):
        """A salt added through one mapping is refused through another; own salts too; history turns over."""
        fd = SharedSaltFilter.create(1000)
        self.addCleanup(os.close, fd)
        one, two = SharedSaltFilter(fd, 1000), SharedSaltFilter(fd, 1000)
        salt = os.urandom(32)
        self.assertTrue(one.check_and_add(salt))
        self.assertFalse(two.check_and_add(salt))
        self.assertFalse(one.check_and_add(two.own_salt(32)))
        for _ in range(1000):
            two.check_and_add(os.urandom(32))
        self.assertFalse(one.remembers(salt))

    def test_slot_sockets(self):
        """Port 0 is resolved once: every slot's TCP and UDP socket is bound to the same port, each its own socket."""
        slots = open_slot_sockets([Listener(description="tcp:0:interface=127.0.0.1", udp=True)], 2)
        self.addCleanup(close_all, slots)
        ports = {sock.getsockname()[1] for slot in slots for sock in slot.values()}
        self.assertEqual(len(ports), 1)
        self.assertEqual(len({sock.fileno() for slot in slots for sock in slot.values()}), 4)
        self.assertTrue(all(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for slot in slots
                            for sock in slot.values()))

    def test_restart_back_off(self):
        """A worker dying young is restarted after 1, 2, 4 ... at most 30 s; one that lived a minute after 1 s again."""
        reactor_ = _SpawningClock()
        supervisor = Supervisor(reactor_, "ssx-server", [], server_config({"password": "x", "workers": 1}), ".")
        supervisor.sockets = [{}]
        delays = []
        supervisor.start_worker(0)
        for lived in (0, 0, 0, 0, 0, 0, 0, 61, 0):
            reactor_.advance(lived)
            worker = supervisor.workers[0]
            worker.processEnded(Failure(ProcessTerminated(signal=9)))
            [call] = reactor_.getDelayedCalls()
            delays.append(call.getTime() - reactor_.seconds())
            reactor_.advance(delays[-1])
        self.assertEqual(delays, [1, 2, 4, 8, 16, 30, 30, 1, 2])
        self.assertEqual(len(reactor_.spawned), 10)

    def test_totals(self):
        """Totals sum the live workers' latest reports and keep a dead worker's bytes."""
        totals = WorkerTotals()
        totals.report(0, {8388: 100})
        totals.report(1, {8388: 50})
        totals.report(0, {8388: 120})
        self.assertEqual(totals.total(8388), 170)
        totals.retire(1)
        totals.report(1, {8388: 5})
        self.assertEqual(totals.total(8388), 175)
        totals.forget(8388)
        self.assertEqual(totals.total(8388), 0)


class _SpawningClock(MemoryReactorClock):
    """A clock whose spawnProcess connects the process protocol to a fake transport and keeps it."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[Any] = []

    def spawnProcess(self, protocol: Any, *args: Any, **kwargs: Any) -> None:
        transport = StringTransport()
        transport.pid = 1000 + len(self.spawned)  # type: ignore[attr-defined]
        transport.writeToChild = lambda fd, data: None  # type: ignore[attr-defined]
        protocol.makeConnection(transport)
        self.spawned.append(protocol)


class WorkersTests(unittest.TestCase):
    """ssx-server --workers 2 as a twistd child."""

    def setUp(self) -> None:
        self.echo_factory = support.HashingEchoFactory()
        self.echo = reactor.listenTCP(0, self.echo_factory, interface="127.0.0.1")
        self.addCleanup(self.echo.stopListening)

    async def start(self, *extra: str, method: str = METHOD, password: str = PASSWORD) -> tuple[Any, int, list[int]]:
        """The server with 2 workers, once both listen: (child, port, worker pids)."""
        child = await support.start_twistd(
            self, "--nodaemon", "--pidfile=", "ssx-server", "-s", "127.0.0.1", "-p", "0", "-k", password, "-m", method,
            "--forbidden-ip", "", "--url-file", "", "--workers", "2", "--shutdown-grace", "1", *extra,
            ready=b"supervising 2 workers", seconds=20,
        )
        await support.wait_for(lambda: child.text().count("ssx-server listening on") >= 2, 30,
                               lambda: f"the workers did not listen: {child.text()}")
        port = int(_BOUND.search(b"".join(child.output)).group(1))
        pids = [pid for _, pid in support.started_workers(child.text())]
        self.assertEqual(len(pids), 2)
        return child, port, pids

    def local(self, port: int, method: str = METHOD, password: str = PASSWORD) -> int:
        local, socks_port = support.start_local(port, method=method, password=password)
        self.addCleanup(local.stopService)
        return socks_port

    async def owners_of_echo_connections(self, socks_port: int, pids: list[int], count: int) -> set[int]:
        """Open `count` relayed connections at once and hold them; the worker pids that carry them."""
        clients = [support.SocksClient("127.0.0.1", self.echo.getHost().port, b"hello") for _ in range(count)]
        before = len(self.echo_factory.inbound)
        for client in clients:
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", socks_port), client)
        try:
            await defer.gatherResults([client.echoed for client in clients])
            inbound = self.echo_factory.inbound[before:]
            return {support.connection_owner(pids, echo.transport.getPeer().port) for echo in inbound} - {None}
        finally:
            for client in clients:
                client.transport.loseConnection()

    @support.coroutine_test
    async def test_both_workers_accept(self):
        """Relayed connections are carried by both workers (bounded: at most 40), bytes intact."""
        child, port, pids = await self.start()
        socks_port = self.local(port)
        seen: set[int] = set()
        for _ in range(5):
            seen |= await self.owners_of_echo_connections(socks_port, pids, 8)
            if seen == set(pids):
                break
        self.assertEqual(seen, set(pids))
        payload = os.urandom(300_000)
        reply, received = await support.whole_echo_transfer(socks_port, "127.0.0.1", self.echo.getHost().port, payload)
        self.assertEqual((reply, support.sha256(received)), (0, support.sha256(payload)))
        self.assertEqual(self.echo_factory.inbound[-1].digest.hexdigest(), support.sha256(payload))

    @support.coroutine_test
    async def test_replay_refused_by_every_worker(self):
        """A recorded first packet replayed 16 times reaches both workers; each replay gets silence and no target."""
        await self._replays(METHOD, PASSWORD)

    @support.coroutine_test
    async def test_2022_replay_refused_by_every_worker(self):
        """The same for a 2022 method, whose salts go to the shared filter too."""
        method = "2022-blake3-aes-256-gcm"
        await self._replays(method, generate_psk(method))

    async def _replays(self, method: str, password: str) -> None:
        child, port, pids = await self.start("--handshake-timeout", "2", method=method, password=password)
        recorder = support.Recorder(port)
        listening = recorder.listen()
        self.addCleanup(listening.stopListening)
        socks_port = self.local(listening.getHost().port, method, password)
        payload = os.urandom(5000)
        reply, received = await support.whole_echo_transfer(socks_port, "127.0.0.1", self.echo.getHost().port, payload)
        self.assertEqual((reply, support.sha256(received)), (0, support.sha256(payload)))
        [first] = recorder.recorded
        targets = len(self.echo_factory.inbound)
        replays = [support.RawClient(bytes(first)) for _ in range(16)]
        sources = []
        for client in replays:
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
            sources.append(client.transport.getHost().port)
        holders: dict[int, int | None] = {}

        def both_hold() -> bool:
            # A replay is seen in the worker holding it until that worker closes it at the handshake timeout.
            holders.update({source: support.connection_owner(pids, port, source) for source in sources
                            if holders.get(source) is None})
            return set(holders.values()) >= set(pids)

        await support.wait_for(both_hold, 10, lambda: f"replays not held by both workers: {holders}")
        for client in replays:
            await support.within(10, client.closed, "the server did not close a replay at its handshake timeout")
        self.assertEqual([bytes(client.received) for client in replays], [b""] * 16)
        self.assertEqual(len(self.echo_factory.inbound), targets)

    @support.coroutine_test
    async def test_killed_worker_replaced(self):
        """A worker killed with SIGKILL is restarted under a new pid; the port goes on serving."""
        child, port, pids = await self.start()
        os.kill(pids[0], signal.SIGKILL)
        await support.wait_for(lambda: len(support.started_workers(child.text())) == 3, 20,
                               lambda: f"no worker restarted: {child.text()}")
        slot, new = support.started_workers(child.text())[-1]
        self.assertEqual(slot, 0)
        self.assertNotIn(new, pids)
        self.assertIn("killed by SIGKILL", child.text())
        await support.wait_for(lambda: child.text().count("ssx-server listening on") >= 3, 20, "the new worker did not listen")
        socks_port = self.local(port)
        seen: set[int] = set()
        for _ in range(5):
            seen |= await self.owners_of_echo_connections(socks_port, [new, pids[1]], 8)
            if seen == {new, pids[1]}:
                break
        self.assertEqual(seen, {new, pids[1]})

    @support.coroutine_test
    async def test_sigterm_stops_everything(self):
        """SIGTERM to the supervisor stops both workers and then itself; no pid is left."""
        child, port, pids = await self.start()
        child.transport.signalProcess("TERM")
        await support.within(20, child.ended, "the supervisor did not exit")
        await support.wait_for(lambda: not any(support.alive(pid) for pid in pids), 5, "a worker outlived the supervisor")
        self.assertIn("all workers stopped", child.text())
        with socket.socket() as probe:
            self.assertNotEqual(probe.connect_ex(("127.0.0.1", port)), 0)

    @support.coroutine_test
    async def test_udp_through_workers(self):
        """UDP relays through the workers: several clients' datagrams all come back, byte for byte."""
        child, port, pids = await self.start("-u")
        udp_port, _ = support.listen_udp_echo()
        self.addCleanup(udp_port.stopListening)
        local, socks_port = support.start_local(port, method=METHOD, password=PASSWORD, mode="tcp_and_udp")
        self.addCleanup(local.stopService)
        for _ in range(4):
            client = support.Socks5UdpClient()
            self.addCleanup(client.close)
            self.assertEqual(await client.open(socks_port), 0)
            await client.exchange("127.0.0.1", udp_port.getHost().port, [os.urandom(n) for n in (1, 500, 1400, 8000)])

    @support.coroutine_test
    async def test_metrics_with_workers_one_line(self):
        """twistd ssx-server --workers 2 --metrics stops at start with one line naming workers, no worker started."""
        path = self.mktemp()
        os.makedirs(path)
        out, err, code = await getProcessOutputAndValue(
            sys.executable, [*support.TWISTD, "-n", "--pidfile=", "ssx-server", "-s", "127.0.0.1", "-p", "0", "-k", "pw",
                             "--url-file=", "--workers", "2", "--metrics", f"tcp:{support.free_port()}:interface=127.0.0.1"],
            env=support.twistd_env(), path=path,
        )
        lines = (out + err).decode().strip().splitlines()
        self.assertNotEqual(code, 0)
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("ssx-server: bad configuration: workers: "), lines[0])

    @support.coroutine_test
    async def test_sighup_passed_on(self):
        """SIGHUP to the supervisor reaches both workers, which reload and go on serving under the same pids."""
        child, port, pids = await self.start()
        child.transport.signalProcess("HUP")
        await support.wait_for(lambda: child.text().count("reload done: nothing changed") == 2, 10,
                               lambda: f"the workers did not both get SIGHUP: {child.text()}")
        self.assertTrue(all(support.alive(pid) for pid in pids))
        self.assertEqual(len(support.started_workers(child.text())), 2)

    async def start_from_file(self, ports: dict[int, str], *extra: str) -> tuple[Any, list[int]]:
        """The server with 2 workers from a config file of `ports` (number: password), once both listen: (child, pids)."""
        child = await support.start_twistd(
            self, "--nodaemon", "--pidfile=", "ssx-server", "-c", self.write_ports(ports), "--workers", "2", *extra,
            ready=b"supervising 2 workers", seconds=20,
        )
        await support.wait_for(lambda: child.text().count("ssx-server listening on") >= 2 * len(ports), 30,
                               lambda: f"the workers did not listen: {child.text()}")
        return child, [pid for _, pid in support.started_workers(child.text())]

    def write_ports(self, ports: dict[int, str]) -> str:
        """(Re)write the test's config file with `ports` (number: password); returns its path."""
        if not hasattr(self, "config_path"):
            self.config_path = os.path.abspath(self.mktemp())
        base = {"server": "127.0.0.1", "method": METHOD, "forbidden_ip": "", "url_file": "", "shutdown_grace": 1}
        with open(self.config_path, "w") as f:
            json.dump({**base, "servers": [{"server_port": n, "password": p} for n, p in ports.items()]}, f)
        return self.config_path

    @support.coroutine_test
    async def test_sighup_reloads_every_worker(self):
        """A port added to the file and SIGHUP to the supervisor: both workers reload and serve it, bytes intact."""
        kept, added = support.free_port(), support.free_port()
        child, pids = await self.start_from_file({kept: PASSWORD})
        self.write_ports({kept: PASSWORD, added: "added"})
        child.transport.signalProcess("HUP")
        await support.wait_for(lambda: child.text().count(f"port {added} added") >= 2, 10,
                               lambda: f"the workers did not both reload: {child.text()}")
        socks_port = self.local(added, password="added")
        seen: set[int] = set()
        for _ in range(5):
            seen |= await self.owners_of_echo_connections(socks_port, pids, 8)
            if seen == set(pids):
                break
        self.assertEqual(seen, set(pids))
        payload = os.urandom(100_000)
        reply, received = await support.whole_echo_transfer(socks_port, "127.0.0.1", self.echo.getHost().port, payload)
        self.assertEqual((reply, support.sha256(received)), (0, support.sha256(payload)))
        self.assertEqual(self.echo_factory.inbound[-1].digest.hexdigest(), support.sha256(payload))

    @support.coroutine_test
    async def test_port_removed_by_reload_refuses(self):
        """A port SIGHUP removes from the file is closed for good: new connections are refused, not left unanswered."""
        kept, removed = support.free_port(), support.free_port()
        child, pids = await self.start_from_file({kept: PASSWORD, removed: PASSWORD})
        self.write_ports({kept: PASSWORD})
        child.transport.signalProcess("HUP")
        await support.wait_for(lambda: child.text().count(f"port {removed} removed") >= 2, 10,
                               lambda: f"the workers did not both reload: {child.text()}")

        def refused() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", removed)) != 0

        await support.wait_for(refused, 10, "the removed port still accepts connections")
        payload = os.urandom(50_000)
        reply, received = await support.whole_echo_transfer(self.local(kept), "127.0.0.1", self.echo.getHost().port, payload)
        self.assertEqual((reply, support.sha256(received)), (0, support.sha256(payload)))

    @support.coroutine_test
    async def test_manager_follows_a_reload(self):
        """After SIGHUP adds one port and removes another, the supervisor's manager lists and pings the file's ports."""
        manager_port = support.free_port()
        removed, added = support.free_port(), support.free_port()
        child, pids = await self.start_from_file({removed: PASSWORD}, "--manager-address", f"127.0.0.1:{manager_port}")
        self.write_ports({added: "added"})
        child.transport.signalProcess("HUP")
        await support.wait_for(lambda: child.text().count(f"port {added} added") >= 2, 10,
                               lambda: f"the workers did not both reload: {child.text()}")
        manager = support.ManagerClient()
        self.addCleanup(manager.sock.close)
        address = ("127.0.0.1", manager_port)
        listed = await manager.ask(address, b"list")
        while listed.startswith(b"stat:"):
            listed = await manager.next()
        self.assertEqual([entry["server_port"] for entry in json.loads(listed)], [str(added)])
        pinged = await manager.ask(address, b"ping")
        self.assertEqual(list(json.loads(pinged[len(b"stat: "):])), [str(added)])

    @support.coroutine_test
    async def test_manager_add_reaches_every_worker(self):
        """A port added through the supervisor's manager is served by both workers; remove stops it everywhere."""
        manager_port = support.free_port()
        child, port, pids = await self.start("--manager-address", f"127.0.0.1:{manager_port}")
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.settimeout(5)
        added = support.free_port()

        def ask(request: bytes) -> bytes:
            """The reply to `request`, past any periodic stat: report (short: the supervisor answers at once)."""
            sock.sendto(request, ("127.0.0.1", manager_port))
            while True:
                reply = sock.recv(65536)
                if not reply.startswith(b"stat:"):
                    return reply

        self.assertEqual(ask(b'add: {"server_port": %d, "password": "added", "method": "chacha20-ietf-poly1305"}' % added),
                         b"ok")
        await support.wait_for(lambda: child.text().count(f"listening on 127.0.0.1:{added}") >= 2
                               or child.text().count(f"listening on 0.0.0.0:{added}") >= 2, 10,
                               lambda: f"the added port did not start in both workers: {child.text()}")
        socks_port = self.local(added, "chacha20-ietf-poly1305", "added")
        seen: set[int] = set()
        for _ in range(5):
            seen |= await self.owners_of_echo_connections(socks_port, pids, 8)
            if seen == set(pids):
                break
        self.assertEqual(seen, set(pids))
        self.assertEqual(ask(b'remove: {"server_port": %d}' % added), b"ok")

        def refused() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", added)) != 0

        await support.wait_for(refused, 10, "the removed port still accepts")

    @support.coroutine_test
    async def test_sigterm_drains(self):
        """After SIGTERM a running connection keeps relaying within the grace; the supervisor exits once it is done."""
        child, port, pids = await self.start("--shutdown-grace", "20")
        socks_port = self.local(port)
        client = support.SocksClient("127.0.0.1", self.echo.getHost().port, b"before")
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", socks_port), client)
        await support.within(10, client.echoed, "no echo before SIGTERM")
        child.transport.signalProcess("TERM")
        await support.wait_for(lambda: "letting 1 connections finish" in child.text(), 10,
                               lambda: f"no worker drained: {child.text()}")
        later = os.urandom(50_000)
        client.send(later)
        await support.wait_for(lambda: client.count >= len(b"before") + len(later), 10, "no echo after SIGTERM")
        self.assertEqual(bytes(client.received), b"before" + later)
        self.assertFalse(child.ended.called)
        client.transport.loseConnection()
        await support.within(15, child.ended, "the supervisor did not exit once the connection was done")
        self.assertFalse(any(support.alive(pid) for pid in pids))

    @support.coroutine_test
    async def test_supervisor_killed_workers_follow(self):
        """SIGKILL to the supervisor: the workers see their control pipe end and exit."""
        child, port, pids = await self.start()
        child.transport.signalProcess("KILL")
        await support.within(10, child.ended, "the supervisor did not die")
        await support.wait_for(lambda: not any(support.alive(pid) for pid in pids), 20,
                               "a worker outlived its killed supervisor")

    @support.coroutine_test
    async def test_manager_totals_over_both_workers(self):
        """ping's stat total is the sum of the encrypted bytes relayed by both workers, counted at the client."""
        manager_port = support.free_port()
        # A fixed port: the manager names ports by their configured number.
        child, port, pids = await self.start("--manager-address", f"127.0.0.1:{manager_port}", "-p", str(support.free_port()))
        recorder = support.Recorder(port)
        listening = recorder.listen()
        self.addCleanup(listening.stopListening)
        socks_port = self.local(listening.getHost().port)
        seen: set[int] = set()
        for _ in range(5):
            seen |= await self.owners_of_echo_connections(socks_port, pids, 8)
            if seen == set(pids):
                break
        self.assertEqual(seen, set(pids))
        payload = os.urandom(100_000)
        reply, received = await support.whole_echo_transfer(socks_port, "127.0.0.1", self.echo.getHost().port, payload)
        self.assertEqual(support.sha256(received), support.sha256(payload))
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.setblocking(False)
        totals: list[int] = []

        def asked() -> bool:
            try:
                while True:
                    reply = sock.recv(65536)
                    totals.append(json.loads(reply[len(b"stat: "):])[str(port)])
            except BlockingIOError:
                pass
            if totals and totals[-1] == recorder.total():
                return True
            sock.sendto(b"ping", ("127.0.0.1", manager_port))
            return False

        await support.wait_for(asked, 15, lambda: f"manager totals {totals[-3:]} never reached {recorder.total()}", step=0.2)


class LocalWorkersTests(unittest.TestCase):
    """ssx-local --workers 2 as a twistd child, before an in-process server."""

    @support.coroutine_test
    async def test_both_workers_relay(self):
        """Both local workers carry SOCKS5 connections to the server, bytes intact; SIGTERM leaves no worker."""
        echo_factory = support.HashingEchoFactory()
        echo = reactor.listenTCP(0, echo_factory, interface="127.0.0.1")
        self.addCleanup(echo.stopListening)
        server, server_port = support.start_server(method=METHOD, password=PASSWORD)
        self.addCleanup(server.stopService)
        child = await support.start_twistd(
            self, "--nodaemon", "--pidfile=", "ssx-local", "-s", "127.0.0.1", "-p", str(server_port), "-l", "0",
            "-b", "127.0.0.1", "-k", PASSWORD, "-m", METHOD, "--workers", "2", "--shutdown-grace", "1",
            ready=b"supervising 2 workers", seconds=20,
        )
        await support.wait_for(lambda: child.text().count("ssx-local listening on") >= 2, 30,
                               lambda: f"the workers did not listen: {child.text()}")
        socks_port = int(re.search(rb"supervisor: TCP on 127\.0\.0\.1:(\d+)", b"".join(child.output)).group(1))
        pids = [pid for _, pid in support.started_workers(child.text())]
        seen: set[int | None] = set()
        for _ in range(5):
            clients = [support.SocksClient("127.0.0.1", echo.getHost().port, b"hello") for _ in range(8)]
            for client in clients:
                await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", socks_port), client)
            await defer.gatherResults([client.echoed for client in clients])
            sources = [p.transport.getPeer().port for p in server.factory.connections]
            seen |= {support.connection_owner(pids, source) for source in sources}
            for client in clients:
                client.transport.loseConnection()
            if seen >= set(pids):
                break
        self.assertEqual(seen - {None}, set(pids))
        payload = os.urandom(200_000)
        reply, received = await support.whole_echo_transfer(socks_port, "127.0.0.1", echo.getHost().port, payload)
        self.assertEqual((reply, support.sha256(received)), (0, support.sha256(payload)))
        child.transport.signalProcess("TERM")
        await support.within(20, child.ended, "the supervisor did not exit")
        await support.wait_for(lambda: not any(support.alive(pid) for pid in pids), 5, "a worker outlived the supervisor")

    def test_socks_udp_refused(self):
        """Several workers with SOCKS5 UDP are refused, naming the key: an association's datagrams could reach another worker."""
        from ssx.config import local_config

        with self.assertRaises(ConfigError) as caught:
            local_config({"server": "127.0.0.1", "password": "x", "workers": 2, "mode": "tcp_and_udp"})
        self.assertEqual(caught.exception.key, "workers")
        self.assertEqual(local_config({"server": "127.0.0.1", "password": "x", "workers": 2}).workers, 2)


class ReusePortTests(unittest.TestCase):
    """--reuse-port: two single-process servers on one port, as libev's --reuse-port allows."""

    @support.coroutine_test
    async def test_two_servers_one_port(self):
        """Both servers bind the port with --reuse-port, and both carry connections."""
        echo_factory = support.HashingEchoFactory()
        echo = reactor.listenTCP(0, echo_factory, interface="127.0.0.1")
        self.addCleanup(echo.stopListening)
        port = support.free_port()
        common = ("--nodaemon", "--pidfile=", "ssx-server", "-s", "127.0.0.1", "-p", str(port), "-k", PASSWORD,
                  "-m", METHOD, "--forbidden-ip", "", "--url-file", "", "--reuse-port")
        one = await support.start_twistd(self, *common, ready=b"listening on", seconds=20)
        two = await support.start_twistd(self, *common, ready=b"listening on", seconds=20)
        pids = [one.transport.pid, two.transport.pid]
        local, socks_port = support.start_local(port, method=METHOD, password=PASSWORD)
        self.addCleanup(local.stopService)
        seen: set[int] = set()
        for _ in range(5):
            clients = [support.SocksClient("127.0.0.1", echo.getHost().port, b"hi") for _ in range(8)]
            before = len(echo_factory.inbound)
            for client in clients:
                await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", socks_port), client)
            await defer.gatherResults([client.echoed for client in clients])
            seen |= {support.connection_owner(pids, e.transport.getPeer().port) for e in echo_factory.inbound[before:]}
            for client in clients:
                client.transport.loseConnection()
            if seen >= set(pids):
                break
        self.assertEqual(seen - {None}, set(pids))
