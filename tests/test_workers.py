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
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial import unittest

from ssx.config import server_config
from ssx.crypto import SharedSaltFilter, generate_psk
from ssx.errors import ConfigError
from ssx.net.inherited import stream_key
from ssx.wire.manager import parse_request
from ssx.workers.metrics import sum_families
from ssx.workers.control import reload_line
from ssx.workers.reload import REPORT_WAIT, SupervisorReload
from ssx.workers.sockets import Listener, close_all, open_slot_sockets, release_removed
from ssx.workers.supervisor import Supervisor, WorkerTotals
from tests import support
from tests.support.dns_servers import RecordingZone, ask, listen_dns

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

    def test_shared_filter_of_another_layout_is_refused(self):
        """A worker refuses a shared filter file laid out by another ssx version (its header names the layout)."""
        fd = SharedSaltFilter.create(1000)
        self.addCleanup(os.close, fd)
        os.pwrite(fd, b"ssxslt01", 8 + 8 + 32)  # the layout's name, after index, count and key
        with self.assertRaises(ValueError) as caught:
            SharedSaltFilter(fd, 1000)
        self.assertIn("another version of ssx", str(caught.exception))

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


    def test_release_removed(self):
        """A reload's listeners keep their sockets; every slot's sockets of a listener gone (TCP and the UDP beside it) are closed."""
        kept, gone = Listener(description="tcp:0:interface=127.0.0.1"), Listener(description="tcp:0:interface=127.0.0.2", udp=True)
        slots = open_slot_sockets([kept, gone], 2)
        self.addCleanup(close_all, slots)
        removed_sockets = [sock for slot in slots for key, sock in slot.items() if "127.0.0.2" in key]
        released = release_removed(slots, [kept])
        self.assertEqual(len(released), 2)
        self.assertEqual([list(slot) for slot in slots], [[stream_key(kept.description)]] * 2)
        self.assertEqual([sock.fileno() for sock in removed_sockets], [-1] * 4)
        self.assertEqual(release_removed(slots, [kept]), [])

    def test_metrics_sums(self):
        """Two workers' expositions: counters, histograms and held gauges add up; configuration gauges and _created do not."""
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
        from prometheus_client.parser import text_string_to_metric_families

        texts = []
        for count, created in ((3, 100.0), (4, 50.0)):
            registry = CollectorRegistry()
            counter = Counter("ssx_server_data_bytes", "bytes", ["port"], registry=registry)
            counter.labels(port="8388").inc(count * 100)
            counter.labels(port="8388")._created = created
            Gauge("ssx_server_connections_active", "open", registry=registry).set(count)
            Gauge("ssx_server_ports", "ports", registry=registry).set(2)
            Histogram("ssx_server_handshake_seconds", "h", registry=registry, buckets=(0.1, 1.0)).observe(0.5 * count)
            texts.append(generate_latest(registry).decode())
        registry = CollectorRegistry(auto_describe=False)

        class Summed:
            def collect(self):
                return sum_families(texts + ["not an exposition {"])

        registry.register(Summed())  # type: ignore[arg-type]
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
        self.assertEqual(samples[("ssx_server_data_bytes_total", (("port", "8388"),))], 700)
        self.assertEqual(samples[("ssx_server_data_bytes_created", (("port", "8388"),))], 50)
        self.assertEqual(samples[("ssx_server_connections_active", ())], 7)
        self.assertEqual(samples[("ssx_server_ports", ())], 2)
        self.assertEqual(samples[("ssx_server_handshake_seconds_count", ())], 2)
        self.assertEqual(samples[("ssx_server_handshake_seconds_sum", ())], 3.5)
        self.assertEqual(samples[("ssx_server_handshake_seconds_bucket", (("le", "1.0"),))], 0)
        self.assertEqual(samples[("ssx_server_handshake_seconds_bucket", (("le", "+Inf"),))], 2)


class SupervisorReloadTests(unittest.SynchronousTestCase):
    """The supervisor's side of a reload, with fake workers and a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.config = server_config({"password": "x", "workers": 2, "server_port": 8388})
        self.supervisor = _FakeSupervisor(self.clock, self.config)
        self.loaded: list[Any] = []
        self.reload = SupervisorReload(self.supervisor, self.load, lambda e: f"ssx-server: bad configuration: {e}")
        self.events = support.log_events(self)

    def load(self) -> Any:
        if isinstance(self.config, ConfigError):
            raise self.config
        self.loaded.append(self.config)
        return self.config

    def lines(self) -> list[str]:
        return support.event_texts(self.events)

    def test_refused_file_reaches_no_worker(self):
        """A file that does not load is refused with one line; nothing is sent to any worker."""
        self.config = ConfigError("method", "unknown method 'x'")  # type: ignore[assignment]
        self.reload.reload()
        self.assertEqual([line for line in self.lines() if "bad configuration" in line],
                         ["ssx-server: bad configuration: method: unknown method 'x' (reload refused: the running configuration stays)"])
        self.assertEqual([w.sent for w in self.supervisor.workers.values()], [[], []])

    def test_done_once_every_worker_reported(self):
        """Each worker gets the reload request; the line comes once both reported, and a SIGHUP in between reloads again after."""
        self.reload.reload()
        self.assertEqual([w.sent for w in self.supervisor.workers.values()], [[reload_line([])]] * 2)
        self.reload.reload()
        self.reload.reported(0, True, "")
        self.assertFalse(any("reload done" in line for line in self.lines()))
        self.reload.reported(1, True, "")
        self.assertIn("ssx-server: reload done in every worker (2)", self.lines())
        self.assertEqual(len(self.loaded), 2)
        self.assertEqual([len(w.sent) for w in self.supervisor.workers.values()], [2, 2])

    def test_refusal_end_and_silence_named(self):
        """A worker's refusal, a worker's end and a worker's silence are each named in a line of their own."""
        self.reload.reload()
        self.reload.reported(0, False, "ssx-server: bad configuration: x")
        self.reload.gone(1)
        self.assertIn("ssx-server: reload: worker 0 refused it: ssx-server: bad configuration: x", self.lines())
        self.assertTrue(any(line.startswith("ssx-server: reload: worker 1 ended before it reported") for line in self.lines()))
        self.reload.reload()
        self.clock.advance(REPORT_WAIT)
        self.assertEqual([line for line in self.lines() if "did not report" in line],
                         [f"ssx-server: reload: worker {slot} did not report within {REPORT_WAIT:g} s" for slot in (0, 1)])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SupervisorManagerTests(unittest.SynchronousTestCase):
    """The manager API the supervisor answers: its `add` checked as the workers will apply it."""

    def setUp(self) -> None:
        self.values = {"server_port": 8388, "password": "x", "method": "aes-128-gcm", "workers": 2,
                       "manager_address": "127.0.0.1:6001"}
        self.supervisor = Supervisor(MemoryReactorClock(), "ssx-server", [], server_config(self.values), ".")
        self.worker = _FakeWorker()
        self.supervisor.workers = {0: self.worker}
        self.protocol = self.supervisor.manager_protocol

    def answer(self, line: bytes) -> bytes:
        return self.protocol.answer(parse_request(line))

    def test_add_takes_the_reloaded_defaults(self):
        """After a SIGHUP that changes the top-level method, an added port is listed with the new method the workers use."""
        key = generate_psk("2022-blake3-aes-128-gcm")
        new = server_config({**self.values, "method": "2022-blake3-aes-128-gcm", "password": key})
        for apply in self.supervisor.reloaded:
            apply(new)
        self.assertEqual(self.answer(b'add: {"server_port": 8390, "password": "%s"}' % key.encode()), b"ok")
        listed = json.loads(self.answer(b"list"))
        self.assertIn({"server_port": "8390", "password": key, "method": "2022-blake3-aes-128-gcm"}, listed)
        with self.assertRaises(ConfigError):
            self.answer(b'add: {"server_port": 8391, "password": "not a 2022 key"}')

    def test_add_with_plugin_refused(self):
        """`add` with a plugin is refused naming plugin, as --workers refuses one at start; no worker is asked."""
        with self.assertRaises(ConfigError) as caught:
            self.answer(b'add: {"server_port": 8390, "password": "p", "plugin": "obfs-server"}')
        self.assertEqual(caught.exception.key, "plugin")
        self.assertEqual(self.worker.sent, [])
        self.assertNotIn(8390, self.supervisor.manager_protocol.server.ports)


class _FakeWorker:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, line: bytes) -> None:
        self.sent.append(line)


class _FakeSupervisor:
    """What `SupervisorReload` reads of a supervisor: two workers that keep the lines sent to them, no sockets."""

    command = "ssx-server"
    count = 2

    def __init__(self, reactor: Any, config: Any) -> None:
        self.reactor = reactor
        self.config = config
        self.sockets: list[Any] = [{}, {}]
        self.workers = {0: _FakeWorker(), 1: _FakeWorker()}
        self.listener_fn = lambda config: []
        # What the supervisor keeps of a reloaded configuration (its manager's ports).
        self.reloaded: list[Any] = []


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


class _WorkersCase(unittest.TestCase):
    """An echo target that hashes what reaches it; clients through an in-process ssx-local."""

    def setUp(self) -> None:
        self.echo_factory = support.HashingEchoFactory()
        self.echo = reactor.listenTCP(0, self.echo_factory, interface="127.0.0.1")
        self.addCleanup(self.echo.stopListening)

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

    async def carried_by(self, socks_port: int, pids: list[int]) -> set[int]:
        """The worker pids seen carrying relayed connections, until all of `pids` are (at most 5 rounds of 8)."""
        seen: set[int] = set()
        for _ in range(5):
            seen |= await self.owners_of_echo_connections(socks_port, pids, 8)
            if seen == set(pids):
                break
        return seen

    async def relayed_by_both(self, port: int, pids: list[int]) -> support.Recorder:
        """Through a recorder in front of `port`: connections until both workers carried some, then 100 kB echoed intact."""
        recorder = support.Recorder(port)
        listening = recorder.listen()
        self.addCleanup(listening.stopListening)
        socks_port = self.local(listening.getHost().port)
        self.assertEqual(await self.carried_by(socks_port, pids), set(pids))
        payload = os.urandom(100_000)
        reply, received = await support.whole_echo_transfer(socks_port, "127.0.0.1", self.echo.getHost().port, payload)
        self.assertEqual(support.sha256(received), support.sha256(payload))
        return recorder


class WorkersTests(_WorkersCase):
    """ssx-server --workers 2 as a twistd child."""

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
        """A worker killed with SIGKILL is restarted under a new pid; the port goes on serving, the metrics count the restart."""
        metrics_port = support.free_port()
        child, port, pids = await self.start("--metrics", f"127.0.0.1:{metrics_port}")
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
        # The new worker serves its metrics where its predecessor did.
        samples = await support.scrape_until(metrics_port, lambda s: s.get("ssx_server_supervisor_workers_scraped") == 2)
        self.assertEqual(samples.value("ssx_server_supervisor_workers_scraped"), 2)
        self.assertEqual(samples.value("ssx_server_supervisor_worker_restarts_total"), 1)

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
    async def test_sighup_reloads_every_worker(self):
        """SIGHUP to the supervisor has both workers reload (no file: nothing changes); same pids, one line when both are done."""
        child, port, pids = await self.start()
        line = await support.reload_workers(child)
        self.assertIn("ssx-server: reload done in every worker (2)", line)
        self.assertEqual(child.text().count("reload done: nothing changed"), 2, child.text())
        self.assertTrue(all(support.alive(pid) for pid in pids))
        self.assertEqual(len(support.started_workers(child.text())), 2)
        os.kill(pids[0], signal.SIGHUP)
        await support.wait_for(lambda: "SIGHUP ignored" in child.text(), 10, lambda: f"no line for the worker's SIGHUP: {child.text()}")
        self.assertTrue(support.alive(pids[0]))
        self.assertEqual(child.text().count("reloading the configuration"), 3, child.text())

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
        recorder = await self.relayed_by_both(port, pids)
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

    @support.coroutine_test
    async def test_metrics_sum_both_workers(self):
        """The supervisor's /metrics sums both workers: encrypted bytes equal what the clients sent and got, connections their count."""
        metrics_port = support.free_port()
        # A fixed port: the metrics name ports by their configured number.
        child, port, pids = await self.start("--metrics", f"127.0.0.1:{metrics_port}", "-p", str(support.free_port()))
        recorder = await self.relayed_by_both(port, pids)
        await support.wait_for(lambda: len(recorder.returned) == len(recorder.recorded), 10, "a connection did not finish")

        def data(samples: support.Samples) -> float:
            return sum(samples.get("ssx_server_data_bytes_total", port=str(port), proto="tcp", dir=way) or 0
                       for way in ("c>p", "p>c"))

        samples = await support.scrape_until(metrics_port, lambda s: data(s) == recorder.total(), 15)
        self.assertEqual(data(samples), recorder.total(), samples.text[:3000] + child.text()[-3000:])
        self.assertEqual(samples.value("ssx_server_connections_opened_total", port=str(port)), len(recorder.recorded))
        self.assertEqual(samples.value("ssx_server_supervisor_workers"), 2)
        self.assertEqual(samples.value("ssx_server_supervisor_workers_scraped"), 2)
        self.assertEqual(samples.value("ssx_server_supervisor_worker_restarts_total"), 0)
        # Configuration every worker sees alike is not doubled.
        self.assertEqual(samples.value("ssx_server_ports"), 1)


    @support.coroutine_test
    async def test_acl_in_every_worker(self):
        """--acl: each worker refuses a blocked target (nothing reaches it), lets others through; a reload rereads it in both."""
        blocked = support.CountingEchoFactory()
        other = reactor.listenTCP(self.echo.getHost().port, blocked, interface="127.0.0.5")
        self.addCleanup(other.stopListening)
        acl = os.path.abspath(self.mktemp())
        with open(acl, "w") as f:
            f.write("[accept_all]\n[outbound_block_list]\n127.0.0.5\n")
        child, port, pids = await self.start("--acl", acl)
        self.assertEqual(child.text().count("ssx-server: ACL "), 2, child.text())
        socks_port = self.local(port)
        self.assertEqual(await self.carried_by(socks_port, pids), set(pids))
        clients = [support.SocksClient("127.0.0.5", self.echo.getHost().port, b"blocked?") for _ in range(8)]
        for client in clients:
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", socks_port), client)
        for client in clients:
            await support.within(10, client.closed, "a connection to a blocked target stayed open")
        self.assertEqual([client.count for client in clients], [0] * 8)
        self.assertEqual(blocked.connections, 0)

        with open(acl, "w") as f:
            f.write("[accept_all]\n")
        line = await support.reload_workers(child)
        self.assertIn("reload done in every worker (2)", line)
        self.assertEqual(child.text().count("reload done: acl reread"), 2, child.text())
        payload = os.urandom(50_000)
        reply, received = await support.whole_echo_transfer(socks_port, "127.0.0.5", self.echo.getHost().port, payload)
        self.assertEqual((reply, support.sha256(received)), (0, support.sha256(payload)))
        self.assertEqual(blocked.connections, 1)


class WorkersReloadTests(_WorkersCase):
    """ssx-server -c FILE --workers 2 as a twistd child: SIGHUP reloads the file in every worker."""

    async def start_file(self, ports: dict[int, str], *extra: str) -> tuple[Any, list[int]]:
        """The server with 2 workers on the file's `ports` (number -> password), once both listen: (child, worker pids)."""
        self.path = os.path.abspath(self.mktemp())
        self.write(ports)
        child = await support.start_twistd(
            self, "--nodaemon", "--pidfile=", "ssx-server", "-c", self.path, "--workers", "2", *extra,
            ready=b"supervising 2 workers", seconds=20,
        )
        await support.wait_for(lambda: child.text().count("ssx-server listening on") >= 2 * len(ports), 30,
                               lambda: f"the workers did not listen: {child.text()}")
        pids = [pid for _, pid in support.started_workers(child.text())]
        self.assertEqual(len(pids), 2)
        return child, pids

    def write(self, ports: dict[int, str] | str) -> None:
        with open(self.path, "w") as f:
            if isinstance(ports, str):
                f.write(ports)
                return
            json.dump({
                "server": "127.0.0.1", "method": METHOD, "forbidden_ip": "", "url_file": "", "shutdown_grace": 1,
                # A wrong key's connection is closed (silently) this soon.
                "handshake_timeout": 2,
                "servers": [{"server_port": port, "password": password} for port, password in ports.items()],
            }, f)

    async def silence(self, socks_port: int) -> None:
        """8 connections at once through `socks_port` get no byte back and reach no target: the server closes each at its timeout."""
        targets = len(self.echo_factory.inbound)
        clients = [support.SocksClient("127.0.0.1", self.echo.getHost().port, payload=os.urandom(1000)) for _ in range(8)]
        for client in clients:
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", socks_port), client)
        for client in clients:
            await support.within(20, client.closed, "the server did not close a connection with a wrong key")
        self.assertEqual([client.count for client in clients], [0] * 8)
        self.assertEqual(len(self.echo_factory.inbound), targets)

    async def transfer(self, socks_port: int) -> None:
        payload = os.urandom(300_000)
        reply, received = await support.whole_echo_transfer(socks_port, "127.0.0.1", self.echo.getHost().port, payload)
        self.assertEqual((reply, support.sha256(received)), (0, support.sha256(payload)))
        self.assertEqual(self.echo_factory.inbound[-1].digest.hexdigest(), support.sha256(payload))

    @support.coroutine_test
    async def test_changed_password(self):
        """A new password reaches both workers: new-password clients relay through both, old-password ones get silence."""
        port = support.free_port()
        child, pids = await self.start_file({port: "old-secret"})
        self.write({port: "new-secret"})
        line = await support.reload_workers(child)
        self.assertIn("ssx-server: reload done in every worker (2)", line)
        self.assertEqual(child.text().count(f"reload done: port {port}: password"), 2, child.text())
        new = self.local(port, password="new-secret")
        self.assertEqual(await self.carried_by(new, pids), set(pids))
        await self.transfer(new)
        await self.silence(self.local(port, password="old-secret"))

    @support.coroutine_test
    async def test_broken_file_refused_once(self):
        """A broken file is refused by the supervisor with one line and never reaches the workers; the old config keeps relaying."""
        port = support.free_port()
        child, pids = await self.start_file({port: "kept"})
        self.write('{"servers": [')
        line = await support.reload_workers(child)
        self.assertIn("ssx-server: bad configuration: config: ", line)
        self.assertIn("(reload refused: the running configuration stays)", line)
        self.assertEqual(child.text().count("bad configuration"), 1, child.text())
        self.assertEqual(child.text().count("reloading the configuration"), 1, child.text())
        self.assertNotIn("Traceback", child.text())
        socks_port = self.local(port, password="kept")
        self.assertEqual(await self.carried_by(socks_port, pids), set(pids))
        await self.transfer(socks_port)

    @support.coroutine_test
    async def test_port_added_and_removed(self):
        """A reload's added port is served by both workers, a removed one refuses connections (no socket left to queue them), a kept one relays."""
        kept, removed, added = support.free_port(), support.free_port(), support.free_port()
        child, pids = await self.start_file({kept: "kept", removed: "removed"})
        self.write({kept: "kept", added: "added"})
        line = await support.reload_workers(child)
        self.assertIn("reload done in every worker (2)", line)
        self.assertEqual(child.text().count(f"port {added} added"), 2, child.text())
        socks_port = self.local(added, password="added")
        self.assertEqual(await self.carried_by(socks_port, pids), set(pids))
        await self.transfer(socks_port)

        def refused() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", removed)) != 0

        await support.wait_for(refused, 10, lambda: f"the removed port still accepts: {child.text()}")
        # Several tries: with SO_REUSEPORT each one is hashed to a socket anew.
        self.assertTrue(all(refused() for _ in range(16)))
        await self.transfer(self.local(kept, password="kept"))


class LocalWorkersTests(unittest.TestCase):
    """ssx-local --workers 2 as a twistd child, before an in-process server."""

    @support.coroutine_test
    async def test_both_workers_relay(self):
        """Both local workers carry SOCKS5 connections to the server, bytes intact, summed in the supervisor's metrics; SIGTERM leaves no worker."""
        echo_factory = support.HashingEchoFactory()
        echo = reactor.listenTCP(0, echo_factory, interface="127.0.0.1")
        self.addCleanup(echo.stopListening)
        server, server_port = support.start_server(method=METHOD, password=PASSWORD)
        self.addCleanup(server.stopService)
        metrics_port = support.free_port()
        child = await support.start_twistd(
            self, "--nodaemon", "--pidfile=", "ssx-local", "-s", "127.0.0.1", "-p", str(server_port), "-l", "0",
            "-b", "127.0.0.1", "-k", PASSWORD, "-m", METHOD, "--workers", "2", "--shutdown-grace", "1",
            "--metrics", f"127.0.0.1:{metrics_port}", ready=b"supervising 2 workers", seconds=20,
        )
        await support.wait_for(lambda: child.text().count("ssx-local listening on") >= 2, 30,
                               lambda: f"the workers did not listen: {child.text()}")
        socks_port = int(re.search(rb"supervisor: TCP on 127\.0\.0\.1:(\d+)", b"".join(child.output)).group(1))
        pids = [pid for _, pid in support.started_workers(child.text())]
        seen: set[int | None] = set()
        opened = 0
        for _ in range(5):
            clients = [support.SocksClient("127.0.0.1", echo.getHost().port, b"hello") for _ in range(8)]
            opened += len(clients)
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
        # Payload both ways: 5 bytes per small connection, and the transfer's.
        relayed = 2 * (5 * opened + len(payload))

        def data(samples: support.Samples) -> float:
            return sum(samples.get("ssx_local_data_bytes_total", server=f"127.0.0.1:{server_port}", proto="tcp", dir=way)
                       or 0 for way in ("c>p", "p>c", "p>t", "t>p"))

        samples = await support.scrape_until(metrics_port, lambda s: data(s) == relayed, 15)
        self.assertEqual(data(samples), relayed, samples.text)
        self.assertEqual(samples.value("ssx_local_connections_total", front="socks5"), opened + 1)
        self.assertEqual(samples.value("ssx_local_supervisor_workers_scraped"), 2)
        child.transport.signalProcess("TERM")
        await support.within(20, child.ended, "the supervisor did not exit")
        await support.wait_for(lambda: not any(support.alive(pid) for pid in pids), 5, "a worker outlived the supervisor")

    @support.coroutine_test
    async def test_reload_adds_tunnel(self):
        """A tunnel added to the file at a SIGHUP is served by both local workers, byte for byte."""
        echo_factory = support.HashingEchoFactory()
        echo = reactor.listenTCP(0, echo_factory, interface="127.0.0.1")
        self.addCleanup(echo.stopListening)
        server, server_port = support.start_server(method=METHOD, password=PASSWORD)
        self.addCleanup(server.stopService)
        socks_port, tunnel_port = support.free_port(), support.free_port()
        path = os.path.abspath(self.mktemp())

        def write(tunnels: list[str]) -> None:
            with open(path, "w") as f:
                json.dump({"server": "127.0.0.1", "server_port": server_port, "password": PASSWORD, "method": METHOD,
                           "local_address": "127.0.0.1", "local_port": socks_port, "shutdown_grace": 1,
                           "tunnels": tunnels}, f)

        write([])
        child = await support.start_twistd(self, "--nodaemon", "--pidfile=", "ssx-local", "-c", path, "--workers", "2",
                                           ready=b"supervising 2 workers", seconds=20)
        await support.wait_for(lambda: child.text().count("ssx-local listening on") >= 2, 30,
                               lambda: f"the workers did not listen: {child.text()}")
        pids = [pid for _, pid in support.started_workers(child.text())]
        write([f"127.0.0.1:{tunnel_port}=127.0.0.1:{echo.getHost().port}"])
        line = await support.reload_workers(child)
        self.assertIn("ssx-local: reload done in every worker (2)", line)
        self.assertEqual(child.text().count(f"tunnel tcp:{tunnel_port}:interface=127.0.0.1 to "), 2, child.text())
        seen: set[int | None] = set()
        for _ in range(5):
            clients = [support.RawClient(b"hello") for _ in range(8)]
            for client in clients:
                await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", tunnel_port), client)
            await support.wait_for(lambda: all(len(c.received) == 5 for c in clients), 10, "a tunnel did not echo")
            seen |= {support.connection_owner(pids, tunnel_port, c.transport.getHost().port) for c in clients}
            for client in clients:
                client.transport.loseConnection()
            if seen >= set(pids):
                break
        self.assertEqual(seen - {None}, set(pids))
        payload = os.urandom(300_000)
        client = support.RawClient(payload)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", tunnel_port), client)
        await support.wait_for(lambda: len(client.received) >= len(payload) or client.closed.called, 20,
                               lambda: f"{len(client.received)} of {len(payload)} bytes came back")
        client.transport.loseConnection()
        self.assertEqual(support.sha256(bytes(client.received)), support.sha256(payload))
        self.assertEqual(echo_factory.inbound[-1].digest.hexdigest(), support.sha256(payload))

    @support.coroutine_test
    async def test_transparent_and_dns_ports_in_every_worker(self):
        """--redir and --dns-listen under --workers 2: both workers listen on each (none restarted), and DNS answers over UDP and TCP."""
        zone = RecordingZone("192.0.2.7")
        upstream = listen_dns(zone)
        for port in upstream.listening:
            self.addCleanup(port.stopListening)
        acl = self.mktemp()
        with open(acl, "w") as f:
            f.write("[bypass_all]\n")
        dns_port, redir_port = support.free_port(), support.free_port()
        child = await support.start_twistd(
            self, "--nodaemon", "--pidfile=", "ssx-local", "-s", "127.0.0.1", "-p", "9", "-l", "0", "-b", "127.0.0.1",
            "-k", PASSWORD, "-m", METHOD, "--workers", "2", "--shutdown-grace", "1", "--acl", os.path.abspath(acl),
            "--dns-listen", f"127.0.0.1:{dns_port}", "--dns-local", f"127.0.0.1:{upstream.port}",
            "--dns-remote", "127.0.0.1:9", "--redir", f"127.0.0.1:{redir_port}",
            ready=b"supervising 2 workers", seconds=20,
        )
        await support.wait_for(
            lambda: child.text().count("ssx-local redir listening on") >= 2
            and child.text().count("ssx-local DNS relaying UDP on") >= 2, 30,
            lambda: f"the workers did not both listen: {child.text()}",
        )
        for tcp in (False, True, False, True):
            answer = await ask(dns_port, "a.test", tcp=tcp)
            self.assertEqual([record.payload.dottedQuad() for record in answer.answers], ["192.0.2.7"])
        self.assertNotIn("cannot listen", child.text())
        self.assertNotIn("restarting it", child.text())

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
