"""
Transparent proxying's parts that need no namespace: the kernel's socket
addresses and control messages parsed from captured bytes, the
destination of a diverted TCP connection, the loop guard (destinations
that are ssx-local's own listeners), the UDP relay's answers from the
original destination and from an ACL-bypassed one (on loopback), the config
keys (--redir, --tproxy, rust's redir `locals`, outbound_fwmark), what a
reload does with them, and the one-line start-up error without
CAP_NET_ADMIN.  The kernel paths themselves are in
tests/test_transparent_netns.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys

from hypothesis import given, strategies as st
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from tests import support
from ssx.config import local_config
from ssx.crypto import make_suite
from ssx.errors import ConfigError
from ssx.local import tap as local_tap
from ssx.acl import parse_acl
from ssx.local.redir import REDIRECT, TPROXY, OwnListeners, RedirFactory, RedirProtocol, TproxyUdpRelay
from ssx.local.routing import AclRouter
from ssx.net.acl_holder import AclHolder
from ssx.net.relay import connect_tcp
from ssx.net import transparent
from ssx.wire import sockaddr
from ssx.wire.address import Address, encode_address

# As the kernel returns them (recvmsg's control messages, getsockopt
# SO_ORIGINAL_DST): 10.18.9.9:7000, [fd18:9::9]:7000, [::ffff:10.18.9.9]:7000.
SOCKADDR_IN = bytes.fromhex("02001b580a1209090000000000000000")
SOCKADDR_IN6 = bytes.fromhex("0a001b5800000000fd18000900000000000000000000000900000000")
SOCKADDR_IN6_MAPPED = bytes.fromhex("0a001b5800000000" "00000000000000000000ffff0a120909" "00000000")
# recvmsg's ancillary data beside them: IP_TTL (level 0, type 2), then IP_ORIGDSTADDR.
ANCILLARY_IPV4 = [(0, 2, bytes.fromhex("40000000")), (0, 20, SOCKADDR_IN)]
ANCILLARY_IPV6 = [(41, 74, SOCKADDR_IN6)]

METHOD = "aes-128-gcm"
PASSWORD = "transparent test"


class SockaddrTests(unittest.SynchronousTestCase):
    """Kernel socket addresses and control messages to (IP, port)."""

    def test_sockaddr_in(self):
        """A sockaddr_in: family in host order, port in network order."""
        self.assertEqual(sockaddr.parse_sockaddr(SOCKADDR_IN), ("10.18.9.9", 7000))

    def test_sockaddr_in6(self):
        """A sockaddr_in6, flow info and scope skipped."""
        self.assertEqual(sockaddr.parse_sockaddr(SOCKADDR_IN6), ("fd18:9::9", 7000))

    def test_mapped(self):
        """An IPv4-mapped IPv6 address comes back as IPv4."""
        self.assertEqual(sockaddr.parse_sockaddr(SOCKADDR_IN6_MAPPED), ("10.18.9.9", 7000))

    def test_truncated_or_foreign(self):
        """Short bytes, or another family, are a ValueError, never an IndexError or struct.error."""
        for data in (b"", b"\x02", SOCKADDR_IN[:15], SOCKADDR_IN6[:27], b"\x01\x00" + SOCKADDR_IN[2:]):
            self.assertRaises(ValueError, sockaddr.parse_sockaddr, data)

    def test_ancillary(self):
        """The original destination is found among other control messages, for each family."""
        self.assertEqual(sockaddr.original_destination(ANCILLARY_IPV4), ("10.18.9.9", 7000))
        self.assertEqual(sockaddr.original_destination(ANCILLARY_IPV6), ("fd18:9::9", 7000))

    def test_no_destination(self):
        """Without the control message, or with a broken one, there is no destination."""
        self.assertIsNone(sockaddr.original_destination([]))
        self.assertIsNone(sockaddr.original_destination([(0, 2, b"\x40\x00\x00\x00")]))
        self.assertIsNone(sockaddr.original_destination([(0, 20, SOCKADDR_IN[:8])]))

    @given(st.binary(max_size=40), st.sampled_from([(0, 20), (41, 74), (0, 2)]))
    def test_fuzz(self, data, kind):
        """Any bytes give an address or ValueError, and any control message an address or None: nothing else."""
        try:
            host, port = sockaddr.parse_sockaddr(data)
        except ValueError:
            pass
        else:
            self.assertTrue(0 <= port <= 65535 and host)
        found = sockaddr.original_destination([(*kind, data)])
        self.assertTrue(found is None or isinstance(found, tuple))

    def test_not_redirected(self):
        """A connection the firewall did not redirect has no SO_ORIGINAL_DST: OSError."""
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        self.addCleanup(client.close)
        accepted, _ = listener.accept()
        self.addCleanup(accepted.close)
        self.assertRaises(OSError, transparent.redirected_destination, accepted)


class _Transport:
    """An accepted TCP transport as the redir protocol sees it."""

    def __init__(self, host: tuple[str, int], sock: socket.socket | None = None) -> None:
        self.host = IPv4Address("TCP", *host)
        self.sock = sock
        self.aborted = False

    def getHost(self) -> IPv4Address:
        return self.host

    def getHandle(self) -> socket.socket | None:
        return self.sock

    def abortConnection(self) -> None:
        self.aborted = True


class _Picker:
    def candidates(self) -> list:
        return []


class RedirProtocolTests(unittest.SynchronousTestCase):
    """Where a diverted connection goes."""

    def protocol(self, mode: str, transport: _Transport) -> RedirProtocol:
        protocol = RedirProtocol(RedirFactory(Clock(), _Picker(), mode))
        protocol.transport = transport
        return protocol

    def test_tproxy_destination(self):
        """Under TPROXY, the destination is the accepted socket's own address."""
        protocol = self.protocol(TPROXY, _Transport(("10.18.9.9", 7000)))
        self.assertEqual(protocol.destination(), ("10.18.9.9", 7000))

    def test_unredirected_closed(self):
        """A connection made straight to a REDIRECT port has no destination and is aborted, quietly."""
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        self.addCleanup(client.close)
        accepted, _ = listener.accept()
        self.addCleanup(accepted.close)
        transport = _Transport(accepted.getsockname(), accepted)
        protocol = self.protocol(REDIRECT, transport)
        self.assertIsNone(protocol.destination())
        protocol.factory.connection_opened = lambda p: None  # type: ignore[method-assign]
        protocol.connectionMade()
        self.assertTrue(transport.aborted)
        self.assertEqual(protocol.factory.unknown_destinations, 1)


class LoopGuardTests(unittest.SynchronousTestCase):
    """Destinations that are ssx-local's own listening addresses are refused, quietly and counted."""

    def test_own_listeners(self):
        """A listener's exact address, or its port on any of the host's addresses under a wildcard, is ours."""
        own = OwnListeners(
            lambda: [("127.0.0.1", 1080), ("0.0.0.0", 12345), ("::", 12346)], lambda: [("0.0.0.0", 5300)],
            is_local=lambda ip: ip in ("10.18.1.1", "fd18:1::1", "127.0.0.1"),
        )
        for destination in (("127.0.0.1", 1080), ("10.18.1.1", 12345), ("fd18:1::1", 12346), ("::ffff:127.0.0.1", 1080)):
            self.assertTrue(own.includes(destination), destination)
        for destination in (("127.0.0.2", 1080), ("192.0.2.1", 12345), ("10.18.1.1", 1080), ("10.18.1.1", 5300)):
            self.assertFalse(own.includes(destination), destination)
        self.assertTrue(own.includes(("10.18.1.1", 5300), udp=True))
        self.assertFalse(own.includes(("10.18.1.1", 12345), udp=True))

    def test_local_address(self):
        """The host's own addresses are told from others by binding them (nothing is sent)."""
        self.assertTrue(transparent.is_local_address("127.0.0.1"))
        self.assertFalse(transparent.is_local_address("not an address"))
        if not _nonlocal_bind():
            self.assertFalse(transparent.is_local_address("192.0.2.1"))

    def test_tproxy_to_own_port_refused(self):
        """TPROXY: a connection made straight to the port (its local address is the listener's) is aborted and counted."""
        factory = RedirFactory(Clock(), _Picker(), TPROXY)
        factory.own = OwnListeners(lambda: [("0.0.0.0", 12345)], lambda: [])
        factory.connection_opened = lambda p: None  # type: ignore[method-assign]
        opened = []
        protocol = RedirProtocol(factory)
        protocol.open_relay = opened.append  # type: ignore[method-assign]
        protocol.transport = transport = _Transport(("127.0.0.1", 12345))
        protocol.connectionMade()
        self.assertEqual((transport.aborted, factory.loops_refused, opened), (True, 1, []))
        # Another destination on the same port number, not ours, is relayed.
        other = RedirProtocol(factory)
        other.open_relay = opened.append  # type: ignore[method-assign]
        other.transport = _Transport(("192.0.2.1", 12345))
        other.connectionMade()
        self.assertEqual((other.transport.aborted, factory.loops_refused), (False, 1))
        self.assertEqual(opened, [Address("192.0.2.1", 12345)])

    def test_redirect_to_own_listener_refused(self):
        """REDIRECT: an original destination that is another of our listeners (the SOCKS port) is refused."""
        factory = RedirFactory(Clock(), _Picker(), REDIRECT)
        factory.own = OwnListeners(lambda: [("127.0.0.1", 1080), ("0.0.0.0", 12345)], lambda: [])
        factory.connection_opened = lambda p: None  # type: ignore[method-assign]
        protocol = RedirProtocol(factory)
        protocol.destination = lambda: ("127.0.0.1", 1080)  # type: ignore[method-assign]
        protocol.transport = transport = _Transport(("127.0.0.1", 12345))
        protocol.connectionMade()
        self.assertEqual((transport.aborted, factory.loops_refused), (True, 1))

    def test_udp_to_own_port_dropped(self):
        """TPROXY UDP: a datagram whose destination is one of our UDP ports is dropped and counted, no association made."""
        relay = TproxyUdpRelay(Clock(), make_suite(METHOD, PASSWORD), ("127.0.0.1", 9))
        relay.own = OwnListeners(lambda: [], lambda: [("0.0.0.0", 12345)])
        relay.diverted(b"x", ("10.18.1.2", 5000), ("127.0.0.1", 12345))
        self.assertEqual((relay.loops_refused, relay.dropped, len(relay.nat)), (1, 1, 0))


def _nonlocal_bind() -> bool:
    try:
        with open("/proc/sys/net/ipv4/ip_nonlocal_bind") as f:
            return f.read().strip() != "0"
    except OSError:
        return False


class TproxyUdpRelayTests(unittest.TestCase):
    """The UDP relay under TPROXY, on loopback: out with the destination in front, answers from that destination."""

    @support.coroutine_test
    async def test_round_trip(self):
        """A datagram goes to the server as destination + payload; the answer reaches the client from the destination."""
        problem = transparent.transparent_problem()
        if problem is not None:
            raise unittest.SkipTest(problem)
        suite = make_suite(METHOD, PASSWORD)
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(server.close)
        server.bind(("127.0.0.1", 0))
        server.setblocking(False)
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(client.close)
        client.bind(("127.0.0.1", 0))
        client.setblocking(False)
        # The "original destination": a loopback address nothing listens on.
        destination = ("127.0.0.1", support.free_port())
        relay = TproxyUdpRelay(reactor, suite, server.getsockname())
        relay.doStart()
        self.addCleanup(relay.doStop)
        payload = os.urandom(1000)
        relay.diverted(payload, client.getsockname(), destination)
        await support.wait_until(lambda: _readable(server), 5)
        packet, via = server.recvfrom(65535)
        self.assertEqual(suite.udp_open(packet), encode_address(Address(*destination)) + payload)
        answer = os.urandom(700)
        server.sendto(suite.udp_seal(encode_address(Address(*destination)) + answer), via)
        await support.wait_until(lambda: _readable(client), 5)
        data, source = client.recvfrom(65535)
        self.assertEqual((data, source), (answer, destination))
        self.assertEqual(list(relay.replies), [destination])

    @support.coroutine_test
    async def test_direct_round_trip(self):
        """ACL bypass: the datagram goes straight to its destination, whose answer reaches the client from its address."""
        problem = transparent.transparent_problem()
        if problem is not None:
            raise unittest.SkipTest(problem)
        suite = make_suite(METHOD, PASSWORD)
        target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(target.close)
        # The answering socket binds the target's address beside it.
        target.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        target.bind(("127.0.0.1", 0))
        target.setblocking(False)
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(client.close)
        client.bind(("127.0.0.1", 0))
        client.setblocking(False)
        router = AclRouter(reactor, AclHolder("unused.acl", parse_acl("[proxy_all]\n[bypass_list]\n127.0.0.0/8\n")))
        relay = TproxyUdpRelay(reactor, suite, ("127.0.0.1", support.free_port()), router=router)
        relay.doStart()
        self.addCleanup(relay.doStop)
        payload = os.urandom(1000)
        relay.diverted(payload, client.getsockname(), target.getsockname())
        await support.wait_until(lambda: _readable(target), 5)
        data, via = target.recvfrom(65535)
        self.assertEqual((data, relay.acl_direct, len(relay.nat)), (payload, 1, 0))
        answer = os.urandom(700)
        target.sendto(answer, via)
        await support.wait_until(lambda: _readable(client), 5)
        self.assertEqual(client.recvfrom(65535), (answer, target.getsockname()))

    def test_other_family_dropped(self):
        """An answer from an IPv6 source for an IPv4 client is dropped and counted, never sent."""
        suite = make_suite(METHOD, PASSWORD)
        relay = TproxyUdpRelay(Clock(), suite, ("127.0.0.1", 9))
        relay.nat.add(("127.0.0.1", 5000), _FakeServerSocket(suite))
        relay.from_server(("127.0.0.1", 5000), suite.udp_seal(encode_address(Address("::1", 53)) + b"x"))
        self.assertEqual((relay.dropped, len(relay.replies)), (1, 0))

    def test_replies_expire(self):
        """Answering sockets close after the UDP timeout without traffic, with the clients' NAT entries."""
        clock = Clock()
        suite = make_suite(METHOD, PASSWORD)
        relay = TproxyUdpRelay(clock, suite, ("127.0.0.1", 9), timeout=60.0)
        relay.doStart()
        self.addCleanup(relay.doStop)
        client, answering = _FakeServerSocket(suite), _FakeServerSocket(suite)
        relay.nat.add(("127.0.0.1", 5000), client)
        relay.replies.add(("192.0.2.1", 53), answering)  # type: ignore[arg-type]
        clock.advance(30)
        self.assertEqual((len(relay.nat), len(relay.replies)), (1, 1))
        clock.advance(45)
        self.assertEqual((len(relay.nat), len(relay.replies), client.closed, answering.closed), (0, 0, True, True))


class _FakeServerSocket:
    """A client's socket towards the server, as the relay's NAT holds it."""

    def __init__(self, suite) -> None:
        self.codec = suite.udp_client_codec()
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _readable(sock: socket.socket) -> bool:
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return False
    return True


class TransparentConfigTests(unittest.SynchronousTestCase):
    """--redir, --tproxy, rust's redir locals and outbound_fwmark."""

    def config(self, **values):
        return local_config({"server": "192.0.2.1", "password": "pw", **values})

    def test_options(self):
        """--redir and --tproxy are repeatable; a port alone is both wildcards; -u adds UDP (always TPROXY)."""
        options = local_tap.Options()
        options.parseOptions(["-s", "192.0.2.1", "-k", "pw", "-u", "--redir", "12345", "--tproxy", "[::1]:12346",
                              "--tproxy", "10.0.0.1:12347", "--outbound-fwmark", "0xff"])
        ports = [(p.host, p.port, p.tcp, p.udp) for p in options.config.transparent]
        self.assertEqual(ports, [("0.0.0.0", 12345, "redirect", True), ("::", 12345, "redirect", True),
                                 ("::1", 12346, "tproxy", True), ("10.0.0.1", 12347, "tproxy", True)])
        self.assertEqual(options.config.outbound_fwmark, 255)
        self.assertEqual(options.config.listen, ("tcp:1080:interface=127.0.0.1",))

    def test_modes(self):
        """tcp_only: no UDP; udp_only: no TCP."""
        [tcp] = self.config(tproxy="127.0.0.1:1").transparent
        [udp] = self.config(tproxy="127.0.0.1:1", mode="udp_only").transparent
        self.assertEqual([(tcp.tcp, tcp.udp), (udp.tcp, udp.udp)], [("tproxy", False), (None, True)])

    def test_rust_locals(self):
        """rust's locals: redir entries read with their tcp_redir, udp_redir and mode; others warned about."""
        config = self.config(locals=[
            {"local_address": "127.0.0.1", "local_port": 1081},
            {"protocol": "redir", "local_address": "0.0.0.0", "local_port": 60080, "mode": "tcp_and_udp"},
            {"protocol": "redir", "local_address": "::", "local_port": 60081, "tcp_redir": "tproxy"},
        ])
        ports = [(p.host, p.port, p.tcp, p.udp) for p in config.transparent]
        self.assertEqual(ports, [("0.0.0.0", 60080, "redirect", True), ("::", 60081, "tproxy", False)])
        self.assertEqual([w for w in config.warnings if "locals[0]" in w],
                         ["config key locals[0]: protocol 'socks' is not read from locals (only \"redir\"); "
                          "use the top-level keys or --listen/--tunnel; ignored"])

    def test_bad_values(self):
        """Bad values name their key."""
        cases = [
            ({"redir": "host.example:1"}, "redir"),
            ({"tproxy": "1.2.3.4:0"}, "tproxy"),
            ({"tproxy": []}, "tproxy"),
            ({"locals": {"protocol": "redir"}}, "locals"),
            ({"locals": [{"protocol": "redir", "local_port": 1, "tcp_redir": "pf"}]}, "locals[0].tcp_redir"),
            ({"locals": [{"protocol": "redir", "local_port": 1, "udp_redir": "redirect"}]}, "locals[0].udp_redir"),
            ({"locals": [{"protocol": "redir"}]}, "locals[0].local_port"),
            ({"outbound_fwmark": 0}, "outbound_fwmark"),
            ({"outbound_fwmark": 2**32}, "outbound_fwmark"),
            ({"outbound_fwmark": "0xzz"}, "outbound_fwmark"),
        ]
        for values, key in cases:
            with self.assertRaises(ConfigError, msg=str(values)) as caught:
                self.config(**values)
            self.assertEqual(caught.exception.key, key, str(values))


class TransparentReloadTests(unittest.SynchronousTestCase):
    """A reload and the transparent ports and mark, which only a restart changes."""

    def test_named_not_applied_and_mark_kept(self):
        """Changed redir/tproxy and mark are named as waiting for a restart; a listener the reload adds gets the start's mark."""
        values = {"server": "192.0.2.1", "password": "pw", "method": METHOD, "mode": "tcp_and_udp",
                  "local_address": "127.0.0.1", "local_port": 1080}
        old = local_config({**values, "tproxy": "127.0.0.1:12345", "outbound_fwmark": 255})
        top = local_tap.build_service(MemoryReactorClock(), old)
        transparent_ports = [factory for factory in top.factories if isinstance(factory, RedirFactory)]
        new = local_config({**values, "tproxy": "127.0.0.1:12346", "outbound_fwmark": 256, "tunnels": ["5353=192.0.2.2:53"]})
        notes = top.reload.apply(new)
        self.assertIn("not applied before a restart: redir/tproxy, outbound_fwmark", notes)
        self.assertEqual([f for f in top.factories if isinstance(f, RedirFactory)], transparent_ports)
        self.assertEqual(len(top.factories), 3)  # the proxy port, the transparent port, the new tunnel
        self.assertEqual({factory.mark for factory in top.factories}, {255})
        self.assertEqual({relay.mark for relay in top.udp_relays}, {255})


class CapabilityTests(unittest.TestCase):
    """Without CAP_NET_ADMIN (and CAP_NET_RAW, which the kernel also takes for IP_TRANSPARENT), start-up stops with one line."""

    timeout = 60

    async def first_lines(self, *options: str) -> list[str]:
        setpriv = shutil.which("setpriv")
        if setpriv is None or os.geteuid() != 0:
            raise unittest.SkipTest("needs root and setpriv (util-linux) to drop the capability")
        child = support.ChildProcess()
        command = [setpriv, "--inh-caps=-all", "--bounding-set=-net_admin,-net_raw", "--", sys.executable, *support.TWISTD,
                   "-n", "--pidfile=", "ssx-local", "-s", "127.0.0.1", "-k", "pw", "-m", METHOD, "-l", "0", *options]
        directory = self.mktemp()
        os.makedirs(directory)
        reactor.spawnProcess(child, setpriv, command, env=support.twistd_env(), path=directory)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
        await child.ended
        return child.text().splitlines()

    @support.coroutine_test
    async def test_tproxy(self):
        """--tproxy without the capability: one line naming it and the option."""
        lines = await self.first_lines("--tproxy", "127.0.0.1:12345")
        self.assertEqual(lines, ["ssx-local: bad configuration: tproxy: TPROXY needs CAP_NET_ADMIN "
                                 "(IP_TRANSPARENT not permitted): run as root or grant the capability"])

    @support.coroutine_test
    async def test_fwmark(self):
        """--outbound-fwmark without the capability: one line naming it and the option."""
        lines = await self.first_lines("--outbound-fwmark", "1")
        self.assertEqual(lines, ["ssx-local: bad configuration: outbound_fwmark: marking sockets needs CAP_NET_ADMIN "
                                 "(SO_MARK not permitted): run as root or grant the capability"])


class OutboundMarkReloadTests(unittest.SynchronousTestCase):
    """--outbound-fwmark across a reload: what a reload adds is marked as at start."""

    def config(self, **values):
        return local_config({
            "server": "192.0.2.1", "password": "pw", "mode": "tcp_and_udp", "local_address": "127.0.0.1",
            "local_port": 1080, "outbound_fwmark": 42, **values,
        })

    def test_added_port_udp_relay_marked(self):
        """The SOCKS5 UDP relay of a port a reload adds sends to the server with the mark."""
        top = local_tap.build_service(Clock(), self.config())
        top.reload.apply(self.config(local_port=1081))
        self.assertEqual(len(top.udp_relays), 1)
        self.assertEqual([relay.mark for relay in top.udp_relays], [42])


class MarkedConnectionTests(support.LeanTcp, unittest.TestCase):
    """--outbound-fwmark's connections (MarkingReactor) on the TCP path every other connection takes."""

    def setUp(self) -> None:
        super().setUp()
        if transparent.mark_problem(42) is not None:
            raise unittest.SkipTest("SO_MARK needs CAP_NET_ADMIN")
        self.accepted: list[support.KeepingProtocol] = []
        factory = Factory()
        factory.buildProtocol = lambda addr: self.accepted.append(support.KeepingProtocol()) or self.accepted[-1]
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.port = listening.getHost().port

    async def connected(self) -> support.KeepingProtocol:
        """A connection to the listener made through a MarkingReactor with mark 42 (closed at the test's end)."""
        made: defer.Deferred = defer.Deferred()
        protocol = support.KeepingProtocol(made)
        await connect_tcp(transparent.MarkingReactor(reactor, 42), "127.0.0.1", self.port, protocol, 5)
        await made
        await support.wait_until(lambda: self.accepted, 10)

        async def close() -> None:
            protocol.transport.loseConnection()
            await defer.DeferredList([protocol.lost, *(accepted.lost for accepted in self.accepted)])

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(close()))
        return protocol

    @support.coroutine_test
    async def test_marked_on_the_path(self):
        """A marked connection is made by this path's connector and its socket carries the mark."""
        protocol = await self.connected()
        self.assertIsInstance(protocol.transport, self.client_type)
        self.assertEqual(protocol.transport.socket.getsockopt(socket.SOL_SOCKET, transparent.SO_MARK), 42)


class MarkedConnectionOnTwistedTcpTests(support.TwistedTcp, MarkedConnectionTests):
    """The same on Twisted's Connector (SSX_TCP_PATH=twisted)."""
