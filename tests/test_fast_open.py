"""
TCP Fast Open (`--fast-open`): the socket options on real loopback sockets
(TCP_FASTOPEN on ssx-server's listening sockets, TCP_FASTOPEN_CONNECT on
ssx-local's connections to its server, and the silent fall-back where the
kernel refuses them).  tests/test_fast_open_netns.py shows the kernel
carrying data in SYNs end to end.
"""

from __future__ import annotations

import hashlib
import os
import socket

from twisted.application.service import MultiService
from twisted.internet import defer, protocol, reactor
from twisted.internet.testing import EventLoggingObserver, MemoryReactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from ssx.net import listener, tcp
from ssx.net.relay import OutboundProtocol
from tests import support


# Read before any test patches them.
_TCP_FASTOPEN = tcp.TCP_FASTOPEN
_TCP_FASTOPEN_CONNECT = tcp.TCP_FASTOPEN_CONNECT


def _queue(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, _TCP_FASTOPEN)


def _connect_option(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, _TCP_FASTOPEN_CONNECT)


def _client_allowed() -> bool:
    """Whether this host's net.ipv4.tcp_fastopen lets clients use TCP Fast Open (bit 1)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_fastopen") as f:
            return bool(int(f.read()) & 1)
    except (OSError, ValueError):
        return False


class ListeningSocketTests(unittest.TestCase):
    """ssx-server's side: TCP_FASTOPEN on the listening socket."""

    def test_listen_sets_the_queue(self):
        """`listen(fast_open=N)` gives the listening socket a Fast Open queue of N; without it, none."""
        port = tcp.listen(reactor, 0, support.BuildingFactory(support.KeepingProtocol), interface="127.0.0.1", fast_open=tcp.FAST_OPEN_QUEUE)
        self.addCleanup(port.stopListening)
        self.assertEqual(_queue(port.socket), tcp.FAST_OPEN_QUEUE)
        plain = tcp.listen(reactor, 0, support.BuildingFactory(support.KeepingProtocol), interface="127.0.0.1")
        self.addCleanup(plain.stopListening)
        self.assertEqual(_queue(plain.socket), 0)

    def test_serve_keeps_it_after_raising_the_backlog(self):
        """`serve(fast_open=...)` listens with the queue set, still there after the backlog is raised."""
        top = MultiService()
        served = listener.serve(top, reactor, "tcp:0:interface=127.0.0.1", protocol.Factory.forProtocol(support.KeepingProtocol),
                                "test", fast_open=tcp.FAST_OPEN_QUEUE)
        top.privilegedStartService()
        top.startService()
        self.addCleanup(top.stopService)
        assert served.port is not None
        self.assertEqual(_queue(served.port.socket), tcp.FAST_OPEN_QUEUE)

    def test_ssx_server_fast_open(self):
        """ssx-server with fast_open sets the queue on its TCP listening sockets; without it, not."""
        for fast_open, queue in ((True, tcp.FAST_OPEN_QUEUE), (False, 0)):
            service, _ = support.start_server(fast_open=fast_open)
            self.addCleanup(service.stopService)
            self.assertEqual(_queue(service.listeners[0].port.socket), queue)

    def test_ssx_server_fast_open_per_port(self):
        """A servers entry's own fast_open decides for its port's listening socket."""
        from ssx.config import server_config
        from ssx.server import tap as server_tap

        entry = {"server": "127.0.0.1", "password": support.PASSWORD}
        config = server_config({"fast_open": True, "forbidden_ip": "", "url_file": "", "servers": [
            {**entry, "server_port": support.free_port()}, {**entry, "server_port": support.free_port(), "fast_open": False},
        ]})
        service = server_tap.build_service(reactor, config)
        service.startService()
        self.addCleanup(service.stopService)
        queues = [_queue(listener.port.socket) for listener in service.listeners]
        self.assertEqual(queues, [tcp.FAST_OPEN_QUEUE, 0])

    def test_refused_option_warns_and_listens(self):
        """Where the kernel refuses TCP_FASTOPEN, the port listens without it and one warning says so."""
        self.patch(tcp, "TCP_FASTOPEN", 9999)  # an option no kernel knows: ENOPROTOOPT
        log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        port = tcp.listen(reactor, 0, support.BuildingFactory(support.KeepingProtocol), interface="127.0.0.1", fast_open=tcp.FAST_OPEN_QUEUE)
        self.addCleanup(port.stopListening)
        self.assertEqual(len([e for e in log if "TCP Fast Open is not available" in e["log_format"]]), 1)
        raw = socket.create_connection(("127.0.0.1", port.getHost().port))
        raw.close()

    def test_other_reactors(self):
        """A reactor other than Twisted's POSIX ones gets plain listenTCP/connectTCP, fast_open or not."""
        memory = MemoryReactor()
        tcp.listen(memory, 8388, support.BuildingFactory(support.KeepingProtocol), fast_open=tcp.FAST_OPEN_QUEUE)
        tcp.connect(memory, "127.0.0.1", 8388, support.BuildingFactory(support.KeepingProtocol), 5, fast_open=True)
        self.assertEqual(len(memory.tcpServers), 1)
        self.assertEqual(len(memory.tcpClients), 1)


class OutgoingSocketTests(unittest.TestCase):
    """ssx-local's side: TCP_FASTOPEN_CONNECT on its connections to the server."""

    def _listen(self) -> tuple[int, list[support.KeepingProtocol]]:
        accepted: list[support.KeepingProtocol] = []

        def build() -> support.KeepingProtocol:
            accepted.append(support.KeepingProtocol())
            return accepted[-1]

        port = tcp.listen(reactor, 0, support.BuildingFactory(build), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port, accepted

    async def _relay(self, fast_open: bool) -> tuple[int, bytes, bytes]:
        """Connect with `fast_open`, send a payload, close: the option's value, the hashes sent and received."""
        number, accepted = self._listen()
        made: defer.Deferred = defer.Deferred()
        tcp.connect(reactor, "127.0.0.1", number, support.BuildingFactory(lambda: support.KeepingProtocol(made)), 5, fast_open=fast_open)
        client = await made
        option = _connect_option(client.transport.socket)
        payload = os.urandom(300_000)
        client.transport.write(payload)
        client.transport.loseConnection()
        await support.wait_until(lambda: bool(accepted) and accepted[0].lost.called, 10)
        self.assertTrue(accepted and accepted[0].lost.called, "the connection did not end")
        return option, hashlib.sha256(payload).digest(), hashlib.sha256(accepted[0].received).digest()

    def test_connect_sets_fast_open_connect(self):
        """`connect(fast_open=True)` sets TCP_FASTOPEN_CONNECT (where the host allows it) and relays whole."""
        async def run() -> None:
            option, sent, received = await self._relay(True)
            self.assertEqual(option, 1 if _client_allowed() else 0)
            self.assertEqual(sent, received)
            option, sent, received = await self._relay(False)
            self.assertEqual(option, 0)
            self.assertEqual(sent, received)

        return defer.Deferred.fromCoroutine(run())

    def test_refused_option_falls_back(self):
        """Where the kernel refuses TCP_FASTOPEN_CONNECT, the connection is an ordinary one and relays whole."""
        self.patch(tcp, "TCP_FASTOPEN_CONNECT", 9999)  # an option no kernel knows: ENOPROTOOPT

        async def run() -> None:
            option, sent, received = await self._relay(True)
            self.assertEqual(option, 0)
            self.assertEqual(sent, received)

        return defer.Deferred.fromCoroutine(run())

    def test_ssx_local_fast_open(self):
        """ssx-local with fast_open connects to a server (IP or host name) with TCP_FASTOPEN_CONNECT; without, not."""
        if not _client_allowed():
            raise unittest.SkipTest("net.ipv4.tcp_fastopen on this host does not allow clients (bit 1)")
        number, accepted = self._listen()

        async def run() -> None:
            for fast_open, option, server in ((True, 1, "127.0.0.1"), (False, 0, "127.0.0.1"),
                                              (True, 1, "localhost"), (False, 0, "localhost")):
                service, _ = support.start_local(number, fast_open=fast_open, server=server)
                self.addCleanup(service.stopService)
                upstream = service.picker.upstreams()[0]
                outbound = OutboundProtocol(lambda protocol: None)
                await upstream.connect(outbound)
                self.assertEqual(_connect_option(outbound.transport.socket), option)
                outbound.transport.abortConnection()

        return defer.Deferred.fromCoroutine(run())


class SysctlNoteTests(unittest.TestCase):
    """The start-up warning when the host's net.ipv4.tcp_fastopen does not allow an end TCP Fast Open."""

    def _sysctl(self, value: str) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(value + "\n")
        self.patch(tcp, "FAST_OPEN_SYSCTL", path)

    def test_note(self):
        """Bit 1 allows clients, bit 2 servers; a missing bit is named; no setting to read, no note."""
        self._sysctl("1")
        self.assertIsNone(tcp.fast_open_sysctl_note(server=False))
        note = tcp.fast_open_sysctl_note(server=True)
        assert note is not None
        self.assertIn("net.ipv4.tcp_fastopen is 1, which does not allow servers (2)", note)
        self._sysctl("2")
        self.assertIsNone(tcp.fast_open_sysctl_note(server=True))
        self.assertIn("does not allow clients (1)", tcp.fast_open_sysctl_note(server=False) or "")
        self._sysctl("3")
        self.assertIsNone(tcp.fast_open_sysctl_note(server=True))
        self.assertIsNone(tcp.fast_open_sysctl_note(server=False))
        self.patch(tcp, "FAST_OPEN_SYSCTL", self.mktemp())  # no such file
        self.assertIsNone(tcp.fast_open_sysctl_note(server=True))

    def test_both_ends_warn_at_start(self):
        """With fast_open on, each end logs one warning at start when the host does not allow its side; off, none."""
        from twisted.internet.testing import MemoryReactorClock
        from twisted.logger import LogLevel, formatEvent

        from ssx.config import local_config, server_config
        from ssx.local import tap as local_tap
        from ssx.server import tap as server_tap

        self._sysctl("0")
        for fast_open in (True, False):
            for build, tap, values in (
                (server_config, server_tap, {"password": "pw", "url_file": ""}),
                (local_config, local_tap, {"server": "192.0.2.1", "password": "pw"}),
            ):
                log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
                tap.build_service(MemoryReactorClock(), build({**values, "fast_open": fast_open}))
                named = [e for e in log if "net.ipv4.tcp_fastopen" in formatEvent(e)]
                self.assertEqual(len(named), 1 if fast_open else 0, [formatEvent(e) for e in log])
                if named:
                    self.assertEqual(named[0]["log_level"], LogLevel.warn)
