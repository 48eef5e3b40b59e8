"""
Faults of the peers, on real loopback sockets: an ssx-server killed or
stopped (SIGTERM, graceful shutdown) mid-transfer, an ssx-local restarted,
targets that refuse connections or do not resolve.  The ends that get
killed run as twistd child processes, as users run them; the rest runs in
trial's reactor.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import tempfile
from typing import Any

from twisted.internet import defer, error, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import LoopingCall

from ssx.wire import socks5
from tests import support
from tests.support import LoopbackCase, SocksClient, coroutine_test, sleep, wait_until

METHOD = "aes-256-gcm"


class Source(protocol.Protocol):
    """
    A download: `piece` random bytes every `interval` seconds, `size` in all
    (None: until the connection ends), hashed as sent; closes when done.
    """

    def __init__(self, size: int | None, piece: int, interval: float) -> None:
        self.size = size
        self.piece = piece
        self.interval = interval
        self.sent = 0
        self.digest = hashlib.sha256()
        self.closed: defer.Deferred = defer.Deferred()
        self._call = LoopingCall(self._tick)

    def connectionMade(self) -> None:
        self._call.start(self.interval)

    def _tick(self) -> None:
        n = self.piece if self.size is None else min(self.piece, self.size - self.sent)
        data = os.urandom(n)
        self.digest.update(data)
        self.sent += n
        self.transport.write(data)
        if self.size is not None and self.sent >= self.size:
            self._call.stop()
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self._call.running:
            self._call.stop()
        self.closed.callback(None)


class SourceFactory(protocol.Factory):
    noisy = False

    def __init__(self, size: int | None, piece: int, interval: float) -> None:
        self.size, self.piece, self.interval = size, piece, interval
        self.sources: list[Source] = []

    def buildProtocol(self, addr: Any) -> Source:
        source = Source(self.size, self.piece, self.interval)
        self.sources.append(source)
        return source


class FaultCase(LoopbackCase):
    """Starts twistd children and download sources."""

    async def twistd(self, *args: str) -> support.ChildProcess:
        """Run `twistd -n <args>` until it logs that it listens."""
        child = support.ChildProcess()
        argv = [sys.executable, *support.TWISTD, "-n", "--pidfile=", *args]
        reactor.spawnProcess(child, sys.executable, argv, env=support.twistd_env(), path=tempfile.gettempdir())
        self._children.append(child)
        ready = await wait_until(lambda: b"listening on" in b"".join(child.output) or child.ended.called, 20, step=0.05)
        if not ready or child.ended.called:
            self.fail(f"twistd {args[0]} did not start: {child.text()}")
        return child

    def twistd_server(self, port: int, *extra: str) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(
            self.twistd(
                "ssx-server", "-s", "127.0.0.1", "-p", str(port), "-k", support.PASSWORD, "-m", METHOD,
                "--forbidden-ip=", *extra,
            )
        )

    def source(self, size: int | None, piece: int, interval: float) -> tuple[SourceFactory, int]:
        factory = SourceFactory(size, piece, interval)
        port = self.listen(reactor.listenTCP(0, factory, interface="127.0.0.1"))
        return factory, port.getHost().port

    async def download(self, socks_port: int, source_port: int, at_least: int) -> SocksClient:
        """A SOCKS client fetching from a source, once `at_least` bytes have arrived."""
        client = await self.connect(socks_port, SocksClient("127.0.0.1", source_port, keep=False))
        self.assertEqual(await client.replied, 0)
        self.assertTrue(await wait_until(lambda: client.count >= at_least, 10), client.count)
        return client

    async def echo_works(self, socks_port: int, echo_port: int, size: int = 256 * 1024) -> None:
        payload = os.urandom(size)
        reply, received = await support.socks_transfer(socks_port, "127.0.0.1", echo_port, payload)
        self.assertEqual(reply, 0)
        self.assertEqual(support.sha256(received), support.sha256(payload))


class ServerKilledTests(FaultCase):
    """An ssx-server that dies mid-transfer: the local end notices, says so, and recovers."""

    @coroutine_test
    async def test_sigkill_mid_download(self):
        """SIGKILL to a twistd ssx-server mid-download: the client's connection closes within 2 s, new requests get reply 05, a new server on the port works."""
        sources, source_port = self.source(None, 64 * 1024, 0.02)
        echo, echo_port = self.counting_echo()
        server_port = support.free_port()
        server = await self.twistd_server(server_port)
        local, socks_port = self.local(server_port, method=METHOD)
        await self.echo_works(socks_port, echo_port)

        download = await self.download(socks_port, source_port, 1024 * 1024)
        killed_at = reactor.seconds()
        server.transport.signalProcess("KILL")
        await server.ended
        self.assertTrue(await wait_until(lambda: download.closed.called, 5), "the client's connection stayed open")
        self.assertLess(download.closed_at - killed_at, 2.0)
        # The target's connection went with the server's process.
        self.assertTrue(await wait_until(lambda: sources.sources[0].closed.called, 3))
        self.assertTrue(await wait_until(lambda: not local.factory.connections, 3), local.factory.connections)

        reply, received = await support.socks_transfer(socks_port, "127.0.0.1", echo_port, b"anyone?")
        self.assertEqual((reply, received), (socks5.REP_CONNECTION_REFUSED, b""))

        await self.twistd_server(server_port)
        await self.echo_works(socks_port, echo_port)


class LocalRestartTests(FaultCase):
    """An ssx-local restarted on its port serves as if new, and the server lets go of the old one's relays."""

    @coroutine_test
    async def test_local_killed_and_restarted(self):
        """SIGKILL to a twistd ssx-local mid-download: the server closes that relay and its target; a new ssx-local on the same port relays at once."""
        sources, source_port = self.source(None, 64 * 1024, 0.02)
        echo, echo_port = self.counting_echo()
        server, server_port = self.server(method=METHOD)
        socks_port = support.free_port()
        local_args = ("ssx-local", "-s", "127.0.0.1", "-p", str(server_port), "-l", str(socks_port),
                      "-k", support.PASSWORD, "-m", METHOD)
        local = await self.twistd(*local_args)
        await self.echo_works(socks_port, echo_port)

        download = await self.download(socks_port, source_port, 512 * 1024)
        killed_at = reactor.seconds()
        local.transport.signalProcess("KILL")
        await local.ended
        self.assertTrue(await wait_until(lambda: download.closed.called, 2), "the client's connection stayed open")
        self.assertTrue(await wait_until(lambda: not server.factory.connections, 2), server.factory.connections)
        self.assertTrue(await wait_until(lambda: sources.sources[0].closed.called, 2), "the target's connection stayed open")
        self.assertLess(reactor.seconds() - killed_at, 2.5)

        await self.twistd(*local_args)
        await self.echo_works(socks_port, echo_port)
        download = await self.download(socks_port, source_port, 256 * 1024)
        download.transport.loseConnection()
        await download.closed
        self.assertTrue(await wait_until(lambda: not server.factory.connections, 2))


class UnreachableTargetTests(FaultCase):
    """
    Targets the server cannot reach.  Shadowsocks has no way to carry the
    server's connect or DNS error back: ssx-local answers SOCKS5 success as
    soon as it reaches the server, so all ssx can do is close the client's
    connection promptly, with no data; that is what is checked here.
    """

    @coroutine_test
    async def test_refused_and_unresolvable_close_promptly(self):
        """A refusing port and an NXDOMAIN name close the client's connection within 1 s with no data; a silent DNS server within its 7 s of retries."""
        nx, nx_address = self.fake_dns()
        silent, silent_address = self.fake_dns(silent=True)
        hosts = self.hosts_file("# nothing here\n")
        server, server_port = self.server(method=METHOD, hosts_file=hosts, nameserver=nx_address)
        local, socks_port = self.local(server_port, method=METHOD)
        mute_server, mute_port = self.server(method=METHOD, hosts_file=hosts, nameserver=silent_address)
        mute_local, mute_socks = self.local(mute_port, method=METHOD)

        async def timed(socks: int, host: str, port: int) -> tuple[int, bytes, float]:
            started = reactor.seconds()
            reply, received = await support.socks_transfer(socks, host, port, b"GET / HTTP/1.0\r\n\r\n")
            return reply, received, reactor.seconds() - started

        refused, missing, unanswered = await defer.gatherResults([
            defer.Deferred.fromCoroutine(timed(socks_port, "127.0.0.1", support.free_port())),
            defer.Deferred.fromCoroutine(timed(socks_port, "missing.ssx.test", 80)),
            defer.Deferred.fromCoroutine(timed(mute_socks, "silent.ssx.test", 80)),
        ])
        for name, (reply, received, took) in (("refused", refused), ("nxdomain", missing), ("silent dns", unanswered)):
            self.assertEqual((reply, received), (0, b""), name)
        self.assertLess(refused[2], 1.0)
        self.assertLess(missing[2], 1.0)
        self.assertIn("missing.ssx.test", {name for name, _ in nx.queries})
        # twisted.names tries 1 + 2 + 4 s (ssx.resolver.QUERY_TIMEOUTS).
        self.assertLess(unanswered[2], 7 + 1.5)
        self.assertTrue(silent.queries)
        self.assertEqual(server.factory.targets_unreachable, 2)
        self.assertEqual(mute_server.factory.targets_unreachable, 1)


class GracefulShutdownTests(FaultCase):
    """SIGTERM: stop listening at once, let running transfers finish for the grace period, then cut them and exit."""

    async def _first_refusal(self, port: int, seconds: float) -> float | None:
        """When a connect to `port` was first refused (any that got through are dropped at once)."""
        deadline = reactor.seconds() + seconds
        while reactor.seconds() < deadline:
            try:
                p = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=1), protocol.Protocol())
            except error.ConnectionRefusedError:
                return reactor.seconds()
            p.transport.abortConnection()
            await sleep(0.02)
        return None

    @coroutine_test
    async def test_sigterm_drains_then_cuts(self):
        """SIGTERM with --shutdown-grace 5: connects are refused at once, a 1.6 s transfer completes byte for byte, an endless one is cut at 5 s, and the process exits by itself."""
        short, short_port = self.source(3 * 1024 * 1024, 192 * 1024, 0.1)
        endless, endless_port = self.source(None, 64 * 1024, 0.05)
        server_port = support.free_port()
        server = await self.twistd_server(server_port, "--shutdown-grace", "5")
        local, socks_port = self.local(server_port, method=METHOD)
        finishing = await self.download(socks_port, short_port, 1)
        cut = await self.download(socks_port, endless_port, 1)

        term_at = reactor.seconds()
        server.transport.signalProcess("TERM")
        refused_at = await self._first_refusal(server_port, 2)
        self.assertIsNotNone(refused_at, "the port still accepted connections 2 s after SIGTERM")
        self.assertLess(refused_at - term_at, 0.5)

        self.assertTrue(await wait_until(lambda: finishing.closed.called, 3), "the short transfer did not finish")
        self.assertLess(finishing.closed_at - term_at, 2.5)
        self.assertEqual(finishing.count, 3 * 1024 * 1024)
        self.assertEqual(finishing.digest.hexdigest(), short.sources[0].digest.hexdigest())
        self.assertFalse(cut.closed.called, "the endless transfer was cut before the grace period ended")

        self.assertTrue(await wait_until(lambda: cut.closed.called, 7), "the endless transfer outlived the grace period")
        self.assertGreater(cut.closed_at - term_at, 5 - 0.3)
        self.assertLess(cut.closed_at - term_at, 5 + 1.0)
        self.assertGreater(cut.count, 0)
        ended = await server.ended
        self.assertLess(reactor.seconds() - term_at, 5 + 1.5)
        # twistd ends by re-raising the signal that stopped it (exit status = SIGTERM).
        self.assertIn((getattr(ended, "exitCode", None), getattr(ended, "signal", None)), [(0, None), (None, signal.SIGTERM)])
        self.assertIn("still running", server.text())
