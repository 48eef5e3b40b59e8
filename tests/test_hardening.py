"""
Hardening of ssx on real loopback sockets: replayed requests and datagrams
(wire.md §8.1), probe resistance (§8.4), the SSRF guard with the default
forbidden list, bounded resources (connection limit, handshake timeout, file
descriptors), 2,000 concurrent relays, and every server-side decoder fed
random, truncated and bit-flipped input.

The peers' faults (a server killed or stopped, a local end restarted,
unreachable targets) are in tests/test_faults.py.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import resource
import socket
import tempfile
from typing import Any, Awaitable, Callable

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet import defer, error, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.names import dns
from twisted.trial import unittest

from ssx.wire.address import Address, decode_address, encode_address
from ssx.crypto import METHODS, generate_psk, lookup_method, make_suite
from ssx.errors import ProtocolError, ReplayError
from ssx.net.relay import SWEEP_INTERVAL
from ssx.crypto import SaltFilter
from tests import support
from tests.support import RawClient, SocksClient, coroutine_test, sleep, wait_for, wait_until, fd_table, open_fds

# A short handshake timeout keeps the probe tests short; the windows below
# say how early/late (seconds) a close may come relative to it, and how far
# apart the probes' close times may be.  Timeouts are enforced by a sweep
# every SWEEP_INTERVAL: a close comes up to that much after its timeout.
HANDSHAKE = 1.5
EARLY = 0.05
LATE = SWEEP_INTERVAL + 0.5
SPREAD = SWEEP_INTERVAL + 0.3


# -- helpers ------------------------------------------------------------------


def new_fds(before: dict[str, str]) -> dict[str, str]:
    return {fd: what for fd, what in fd_table().items() if before.get(fd) != what}


class _Prebuilt(protocol.Factory):
    """Hands out one protocol built beforehand (for adopted connections)."""

    noisy = False

    def __init__(self, built: protocol.Protocol) -> None:
        self.built = built

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        return self.built


class LoopbackCase(support.LoopbackCase):
    """support.LoopbackCase, with the check that a probe saw what a failed handshake shows."""

    def assertSilentUntilTimeout(self, probe: RawClient, name: str, timeout: float = HANDSHAKE, fin: bool = True) -> None:
        """No byte, an orderly close (FIN unless `fin` is false), at the handshake timeout counted from connecting."""
        self.assertEqual(bytes(probe.received), b"", f"{name}: the server answered")
        if fin:
            self.assertEqual(probe.ending, "FIN", f"{name}: not closed with a FIN")
        self.assertGreaterEqual(probe.lifetime, timeout - EARLY, f"{name}: closed before the handshake timeout")
        self.assertLessEqual(probe.lifetime, timeout + LATE, f"{name}: closed long after the handshake timeout")


# -- 1. replay protection ----------------------------------------------------


class ReplayTests(LoopbackCase):
    """A captured first write or datagram, sent again, is refused exactly like a forged one (wire.md §8.1)."""

    async def _tcp(self, method: str) -> None:
        echo, echo_port = self.counting_echo()
        service, port = self.server(method=method, handshake_timeout=HANDSHAKE, timeout=30)
        factory = service.factory
        suite = make_suite(method, support.PASSWORD)
        codec = suite.client_codec()
        request = b"captured request"
        first = codec.first(Address("127.0.0.1", echo_port), request)

        original = await self.connect(port, RawClient(first))
        self.assertEqual(await self.read_plain(original, codec, len(request)), request)
        original.transport.loseConnection()
        await original.closed
        self.assertEqual(echo.connections, 1)

        # Beside the replay, streams that fail the way a forger's would: a
        # bad header under the right key, and (AEAD) the wrong key.
        bad_header = suite.tcp_encryptor().encrypt(b"\x07" + bytes(6))
        forged = {"replay": first, "bad header": bad_header}
        if lookup_method(method).family == "aead":
            wrong_key = make_suite(method, "not the password").client_codec()
            forged["wrong password"] = wrong_key.first(Address("127.0.0.1", echo_port), request)
        failures = factory.handshake_failures
        probes = {name: RawClient(data) for name, data in forged.items()}
        for probe in probes.values():
            await self.connect(port, probe)
        await defer.gatherResults([p.closed for p in probes.values()])

        for name, probe in probes.items():
            self.assertSilentUntilTimeout(probe, name)
        lifetimes = [p.lifetime for p in probes.values()]
        self.assertLess(max(lifetimes) - min(lifetimes), SPREAD, lifetimes)
        self.assertEqual(echo.connections, 1, "the replay reached the target")
        self.assertEqual(factory.handshake_failures, failures + len(probes))
        self.assertEqual(factory.salt_filter.replays, 1)

    @coroutine_test
    async def test_tcp_replay_aead(self):
        """aes-256-gcm: a replayed first write reaches nothing and gets the silence, counter and FIN of a failed authentication."""
        await self._tcp("aes-256-gcm")

    @coroutine_test
    async def test_tcp_replay_stream(self):
        """aes-256-cfb: a replayed first write reaches nothing and gets the silence, counter and FIN of a bad header."""
        await self._tcp("aes-256-cfb")

    def _udp_setup(self, method: str, **values: Any) -> tuple[Any, Any, Any, Address, Callable[[], tuple[Any, list[bytes]]]]:
        """An echo, a server with UDP, and a way to open client sockets that collect what they get."""
        echo_port, echo = support.listen_udp_echo()
        self.listen(echo_port)
        service, port = self.server(method=method, mode="tcp_and_udp", **values)
        target = Address("127.0.0.1", echo_port.getHost().port)

        def client_socket() -> tuple[Any, list[bytes]]:
            got: list[bytes] = []

            class Client(protocol.DatagramProtocol):
                def datagramReceived(self, data: bytes, addr: Any) -> None:
                    got.append(data)

            udp = self.listen(reactor.listenUDP(0, Client(), interface="127.0.0.1"))
            return (lambda packet: udp.write(packet, ("127.0.0.1", port))), got

        return service, service.udp_relays[0], echo, target, client_socket

    async def _udp(self, method: str, history: int | None = None) -> None:
        values = {} if history is None else {"replay_history": history}
        service, relay, echo, target, client_socket = self._udp_setup(method, **values)
        suite = make_suite(method, support.PASSWORD)
        packet = suite.udp_seal(encode_address(target) + b"captured datagram")
        send, replies = client_socket()
        send(packet)
        self.assertTrue(await wait_until(lambda: len(replies) == 1, 3), "the first datagram got no answer")
        # The copy comes from elsewhere, as an attacker's would.
        send_copy, copy_replies = client_socket()
        send_copy(packet)
        replayed = history == 0
        # The copy is dropped (counted at once) or relayed and echoed back.
        await wait_for(
            lambda: relay.received == 2 and relay.dropped + len(copy_replies) == 1, 3,
            lambda: f"the copy was neither dropped nor answered: {relay.received} received, {len(copy_replies)} answers",
        )
        self.assertEqual(relay.received, 2)
        self.assertEqual(echo.count, 1 + replayed)
        self.assertEqual((len(replies), len(copy_replies)), (1, int(replayed)))
        for reply in replies + copy_replies:
            self.assertEqual(suite.udp_open(reply), encode_address(target) + b"captured datagram")
        self.assertEqual(relay.dropped, 1 - replayed)

    @coroutine_test
    async def test_udp_replay_aead(self):
        """aes-256-gcm: a sealed datagram sent twice is relayed once; the copy is dropped and counted."""
        await self._udp("aes-256-gcm")

    @coroutine_test
    async def test_udp_replay_stream(self):
        """aes-256-cfb: a datagram sent twice (same IV) is relayed once."""
        await self._udp("aes-256-cfb")

    @coroutine_test
    async def test_tcp_reflected_response_refused(self):
        """aes-256-gcm: the server's own response stream sent back to it as a request reaches nothing (its outgoing salts are remembered)."""
        echo, echo_port = self.counting_echo()
        service, port = self.server(method="aes-256-gcm", handshake_timeout=HANDSHAKE, timeout=30)
        codec = make_suite("aes-256-gcm", support.PASSWORD).client_codec()
        # The echo sends back a request header, so the response parses as a request.
        inner = encode_address(Address("127.0.0.1", echo_port)) + b"reflected"
        client = await self.connect(port, RawClient(codec.first(Address("127.0.0.1", echo_port), inner)))
        self.assertEqual(await self.read_plain(client, codec, len(inner)), inner)
        client.transport.loseConnection()
        await client.closed
        reflected = await self.connect(port, RawClient(bytes(client.received)))
        await reflected.closed
        self.assertSilentUntilTimeout(reflected, "reflected response")
        self.assertEqual(echo.connections, 1)
        self.assertEqual(service.factory.salt_filter.replays, 1)

    @coroutine_test
    async def test_udp_reflected_reply_dropped(self):
        """aes-256-gcm: a reply datagram of the server's, sent back to it, is dropped like a replay instead of relayed to the address it names."""
        service, relay, echo, target, client_socket = self._udp_setup("aes-256-gcm")
        suite = make_suite("aes-256-gcm", support.PASSWORD)
        send, replies = client_socket()
        send(suite.udp_seal(encode_address(target) + b"ask"))
        self.assertTrue(await wait_until(lambda: len(replies) == 1, 3), "no answer")
        # The reply is sealed with the same key and names the echo as its
        # source: unless the server remembers its own salts, it opens as a
        # request to the echo.
        send_reflection, _ = client_socket()
        send_reflection(replies[0])
        # The reflection is dropped (counted at once) or relayed to the echo.
        await wait_for(lambda: relay.received == 2 and relay.dropped + echo.count == 2, 3, lambda: f"{relay.received} received")
        self.assertEqual(echo.count, 1, "the reflected reply was relayed to the target")
        self.assertEqual(relay.dropped, 1)

    @coroutine_test
    async def test_history_zero_accepts_replays(self):
        """With replay_history=0 the filter is off: a replayed first write and datagram are both relayed again."""
        echo, echo_port = self.counting_echo()
        service, port = self.server(method="aes-256-gcm", replay_history=0)
        self.assertIsNone(service.factory.salt_filter)
        codec = make_suite("aes-256-gcm", support.PASSWORD).client_codec()
        first = codec.first(Address("127.0.0.1", echo_port), b"again")
        for attempt in range(2):
            client = await self.connect(port, RawClient(first))
            self.assertTrue(await wait_until(lambda: len(client.received) > 0, 3), f"attempt {attempt}: no echo")
            client.transport.loseConnection()
            await client.closed
        self.assertEqual(echo.connections, 2)
        self.assertEqual(service.factory.handshake_failures, 0)
        await self._udp("aes-256-gcm", history=0)


# -- 2. probe resistance -----------------------------------------------------


class ProbeResistanceTests(LoopbackCase):
    """
    Whatever a prober sends (random bytes of any length, a cut-short valid
    header, a replayed one, nothing), it sees the same thing: no byte, the
    connection open and reading until the handshake timeout, then a FIN.
    """

    async def _probe(self, method: str, password: str) -> None:
        echo, echo_port = self.counting_echo()
        service, port = self.server(method=method, password=password, handshake_timeout=HANDSHAKE, timeout=30)
        suite = make_suite(method, password)
        codec = suite.client_codec()
        first = codec.first(Address("127.0.0.1", echo_port), b"q" * 40)
        original = await self.connect(port, RawClient(first))
        self.assertEqual(await self.read_plain(original, codec, 40), b"q" * 40)
        original.transport.loseConnection()
        await original.closed

        rng = random.Random()
        lengths = sorted({1, 2, 17, 33, 49, 50, 51, 99, 100, *rng.sample(range(1, 101), 5)})
        data = {f"{n} random bytes": os.urandom(n) for n in lengths}
        fresh = suite.client_codec().first(Address("127.0.0.1", echo_port), b"r" * 40)
        for cut in (1, 10, len(fresh) // 2, len(fresh) - 1):
            data[f"valid header cut at {cut} of {len(fresh)}"] = fresh[:cut]
        data["replayed header"] = first
        data["nothing"] = b""
        # Every probe goes on writing while it waits: a server that had
        # closed, or stopped reading, would answer these with a reset.
        later = ((0.4, os.urandom(64)), (HANDSHAKE - 0.3, os.urandom(64)))
        probes = {name: RawClient(payload, later) for name, payload in data.items()}
        failures = service.factory.handshake_failures
        await defer.gatherResults([defer.Deferred.fromCoroutine(self.connect(port, p)) for p in probes.values()])
        await defer.gatherResults([p.closed for p in probes.values()])

        for name, probe in probes.items():
            self.assertSilentUntilTimeout(probe, name)
        lifetimes = {name: round(p.lifetime, 3) for name, p in probes.items()}
        self.assertLess(max(lifetimes.values()) - min(lifetimes.values()), SPREAD, lifetimes)
        self.assertEqual(echo.connections, 1, "a probe reached the target")
        # Each ends in a failed handshake (the later bytes make even a
        # cut-short header fail), and none of them is left open.
        self.assertEqual(service.factory.handshake_failures - failures, len(probes))
        self.assertEqual(len(service.factory.connections), 0)

    @coroutine_test
    async def test_aead_2017_probes_identical(self):
        """aes-256-gcm: random 1..100 bytes, cut-short and replayed headers and silence all get no byte and a FIN at the handshake timeout, no reset."""
        await self._probe("aes-256-gcm", support.PASSWORD)

    @coroutine_test
    async def test_2022_probes_identical(self):
        """2022-blake3-aes-256-gcm: the same probes get the same silence and FIN at the handshake timeout (wire.md §7.5 option 2)."""
        method = "2022-blake3-aes-256-gcm"
        await self._probe(method, generate_psk(method))


# -- 3. SSRF guard -----------------------------------------------------------

HOSTS = """\
127.0.0.1 a.ssx.test
::1 aaaa.ssx.test
127.0.0.1 both.ssx.test
::1 both.ssx.test
192.168.7.7 private.ssx.test
fd00::7 private.ssx.test
"""

# The same kinds of names, answered by DNS rather than the hosts file.
DNS_RECORDS = {
    "dns-a.ssx.test": [(dns.A, "127.0.0.1")],
    "dns-aaaa.ssx.test": [(dns.AAAA, "::1")],
    "dns-both.ssx.test": [(dns.A, "10.1.2.3"), (dns.AAAA, "fd00::1:2:3")],
}


def socks5_domain_request(name: str, port: int) -> bytes:
    """A CONNECT naming `name` as a domain (ATYP 3), whatever it looks like."""
    raw = name.encode()
    return b"\x05\x01\x00\x03" + bytes([len(raw)]) + raw + port.to_bytes(2, "big")


class SsrfGuardTests(LoopbackCase):
    """With the default forbidden list, no literal, spelling or name reaches a loopback or private address."""

    async def _guarded_chain(self, **values: Any) -> tuple[Any, int]:
        hosts = self.hosts_file(HOSTS)
        self.dns, nameserver = self.fake_dns(DNS_RECORDS)
        # forbidden_ip=None: the default list (support.start_server turns it off otherwise).
        values = {"forbidden_ip": None, "hosts_file": hosts, "nameserver": nameserver, **values}
        server, server_port = self.server(method="aes-256-gcm", **values)
        local, socks_port = self.local(server_port, method="aes-256-gcm", mode=values.get("mode", "tcp_only"))
        return server, socks_port

    async def _refused(self, socks_port: int, requests: list[tuple[str, bytes]]) -> None:
        """Each request gets SOCKS success (the local end cannot know better), then a close with no data, promptly."""
        clients = [SocksClient("", 0, b"GET /secret HTTP/1.0\r\n\r\n", request=request) for _, request in requests]
        for client in clients:
            await self.connect(socks_port, client)
        self.assertTrue(await wait_until(lambda: all(c.closed.called for c in clients), 3), "a refused relay stayed open")
        for (name, _), client in zip(requests, clients):
            self.assertEqual((client.reply, bytes(client.received)), (0, b""), name)
            self.assertLess(client.lifetime, 1.5, name)

    @coroutine_test
    async def test_tcp_targets_refused(self):
        """Loopback, unspecified, mapped, private and link-local literals and hosts-file or DNS names (A, AAAA, both) reach nothing; each client just sees its connection close."""
        echo4, port4 = self.counting_echo("127.0.0.1")
        ipv6 = support.ipv6_loopback()
        echo6, port6 = self.counting_echo("::1") if ipv6 else (echo4, port4)
        server, socks_port = await self._guarded_chain()
        targets = [
            ("127.0.0.1", port4),
            ("::1", port6),
            ("0.0.0.0", port4),
            ("::", port6),
            ("::ffff:127.0.0.1", port4),
            ("10.0.0.1", 80),
            ("169.254.169.254", 80),
            ("a.ssx.test", port4),
            ("aaaa.ssx.test", port6),
            ("both.ssx.test", port4),
            ("private.ssx.test", 80),
            ("dns-a.ssx.test", port4),
            ("dns-aaaa.ssx.test", port6),
            ("dns-both.ssx.test", 80),
        ]
        await self._refused(socks_port, [(host, support.socks5_request(host, port)) for host, port in targets])
        self.assertEqual((echo4.connections, echo6.connections), (0, 0))
        self.assertEqual(server.factory.connections_refused, len(targets))
        self.assertEqual(server.factory.targets_unreachable, 0)
        asked = {name for name, _ in self.dns.queries}
        self.assertEqual(asked, set(DNS_RECORDS), "the hosts file did not answer first, or DNS was not asked")

        # The control: with the list off, the same chain reaches the echo,
        # so the counts above would have seen a connection.
        open_server, open_port = self.server(method="aes-256-gcm", forbidden_ip="", hosts_file=self.hosts_file(HOSTS))
        open_local, open_socks = self.local(open_port, method="aes-256-gcm")
        for host in ("127.0.0.1", "a.ssx.test"):
            reply, received = await support.socks_transfer(open_socks, host, port4, b"ping")
            self.assertEqual((reply, received), (0, b"ping"), host)
        self.assertEqual(echo4.connections, 2)

    @coroutine_test
    async def test_self_alone_refuses_this_host(self):
        """With forbidden_ip 'self' alone (or beside a CIDR), 0.0.0.0 and :: reach no loopback service, over TCP and UDP."""
        echo4, port4 = self.counting_echo("127.0.0.1")
        ipv6 = support.ipv6_loopback()
        echo6, port6 = self.counting_echo("::1") if ipv6 else (echo4, port4)
        udp_port, udp_echo = support.listen_udp_echo()
        self.listen(udp_port)
        targets = [("0.0.0.0", port4), ("::", port6), ("::ffff:0.0.0.0", port4)]
        for setting in ("self", "self,10.0.0.0/8"):
            server, socks_port = await self._guarded_chain(forbidden_ip=setting, mode="tcp_and_udp")
            await self._refused(socks_port, [(host, support.socks5_request(host, port)) for host, port in targets])
            self.assertEqual(server.factory.connections_refused, len(targets), setting)
            relay = server.udp_relays[0]
            client = support.Socks5UdpClient()
            self._udp_clients.append(client)
            self.assertEqual(await client.open(socks_port), 0)
            for host in ("0.0.0.0", "::"):
                client.send(host, udp_port.getHost().port, b"ping")
            self.assertTrue(await wait_until(lambda: relay.refused + relay.dropped + udp_echo.count >= 2, 3), setting)
            self.assertEqual((relay.refused, udp_echo.count), (2, 0), setting)
            client.close()
        self.assertEqual((echo4.connections, echo6.connections), (0, 0))

    @coroutine_test
    async def test_tcp_odd_spellings_refused(self):
        """Loopback spelled as a domain name (IP text, octal, decimal, short form, localhost) reaches nothing: refused as an IP or unresolvable."""
        echo, port = self.counting_echo("127.0.0.1")
        server, socks_port = await self._guarded_chain()
        # ("[::1]" is no host name: the server does not act on it at all, see
        # tests/test_server_protocol.py InvalidTargetTests.)
        names = ["127.0.0.1", "::1", "::ffff:127.0.0.1", "0177.0.0.1", "2130706433", "0x7f000001", "127.1", "localhost", "127.0.0.1.", "LOCALHOST"]
        await self._refused(socks_port, [(name, socks5_domain_request(name, port)) for name in names])
        self.assertEqual(echo.connections, 0)
        factory = server.factory
        self.assertEqual(factory.connections_refused + factory.targets_unreachable, len(names))
        self.assertGreaterEqual(factory.connections_refused, 3)

    @coroutine_test
    async def test_udp_targets_refused(self):
        """UDP through the chain to 127.0.0.1, ::ffff:127.0.0.1, a hosts-file and a DNS name is refused and counted; the loopback echo sees nothing."""
        echo_port, echo = support.listen_udp_echo()
        self.listen(echo_port)
        port = echo_port.getHost().port
        server, socks_port = await self._guarded_chain(mode="tcp_and_udp")
        relay = server.udp_relays[0]
        client = support.Socks5UdpClient()
        self._udp_clients.append(client)
        self.assertEqual(await client.open(socks_port), 0)
        targets = ("127.0.0.1", "::ffff:127.0.0.1", "a.ssx.test", "dns-a.ssx.test")
        for host in targets:
            client.send(host, port, b"ping")
        # Each datagram is refused, dropped or relayed to the echo.
        self.assertTrue(
            await wait_until(lambda: relay.refused + relay.dropped + echo.count >= len(targets), 3),
            (relay.received, relay.refused),
        )
        self.assertEqual((relay.received, relay.refused, relay.dropped), (len(targets), len(targets), 0))
        self.assertEqual(echo.count, 0)
        client.close()


# -- 4. bounded resources ----------------------------------------------------


class LimitTests(LoopbackCase):
    """Connection limits queue the excess, handshakes have their own timeout, and nothing leaks."""

    LIMIT = 20

    async def _served(self, clients: list[SocksClient], seconds: float) -> None:
        """Wait until each client has its SOCKS reply and its payload echoed."""
        await wait_until(lambda: all(c.echoed.called for c in clients), seconds)

    @staticmethod
    def _not_accepting(factory: Any) -> bool:
        """The factory's listening ports are paused: what waits in their backlog stays there."""
        readers = reactor.getReaders()
        return bool(factory.ports) and not any(port in readers for port in factory.ports)

    @coroutine_test
    async def test_limit_queues_and_resumes(self):
        """max_connections=20 on ssx-local: 10 more connections wait unanswered while 20 relay, get served when some close; fds return to baseline."""
        echo, echo_port = self.counting_echo()
        server, server_port = self.server(method="aes-256-gcm")
        local, socks_port = self.local(server_port, method="aes-256-gcm", max_connections=self.LIMIT)
        # Counted once the reactor runs (trial starts it, with its pipes,
        # only at a test's first wait), with the listeners open.
        await sleep(0)
        baseline, before = open_fds(), fd_table()
        served = []
        for i in range(self.LIMIT):
            client = await self.connect(socks_port, SocksClient("127.0.0.1", echo_port, os.urandom(1000 + i)))
            await client.echoed
            served.append(client)
        waiting = [SocksClient("127.0.0.1", echo_port, os.urandom(2000 + i)) for i in range(10)]
        for client in waiting:
            await self.connect(socks_port, client)
        # The running ones keep relaying meanwhile: a round trip through each
        # gives the listener every chance to accept an extra one.
        for client in served:
            client.send(b"more")
        self.assertTrue(await wait_until(lambda: all(c.count == len(c.payload) + 4 for c in served), 5))
        self.assertTrue(self._not_accepting(local.factory), "the listener still accepts at the limit")
        self.assertEqual(local.factory.accepted, self.LIMIT, "an extra connection was accepted")
        self.assertEqual([c.reply for c in waiting], [None] * 10, "an extra connection was served")
        self.assertEqual(len(local.factory.connections), self.LIMIT)
        for client in served[:10]:
            client.transport.loseConnection()
        await self._served(waiting, 5)
        self.assertEqual([c.reply for c in waiting], [0] * 10)
        for client in served[10:] + waiting:
            self.assertEqual(bytes(client.received[: len(client.payload)]), client.payload)
        self.assertLessEqual(len(local.factory.connections), self.LIMIT)

        for client in served[10:] + waiting:
            client.transport.loseConnection()
        await support.drained(server, local, seconds=5)
        self.assertTrue(await wait_until(lambda: open_fds() <= baseline, 5), new_fds(before))
        self.assertEqual(open_fds(), baseline)

    async def _burst(self, socks_port: int, echo_port: int, count: int) -> list[SocksClient]:
        """
        `count` clients whose connections all sit in the listen backlog
        before the reactor looks: connected here (the kernel completes a
        loopback handshake without the listener's accept), then adopted.
        """
        clients = [SocksClient("127.0.0.1", echo_port, os.urandom(500)) for _ in range(count)]
        sockets = [socket.create_connection(("127.0.0.1", socks_port)) for _ in clients]
        for sock, client in zip(sockets, clients):
            self._clients.append(client)
            sock.setblocking(False)
            reactor.adoptStreamConnection(sock.fileno(), socket.AF_INET, _Prebuilt(client))
            sock.close()  # the reactor holds its own copy of the descriptor
        await sleep(0)
        return clients

    @coroutine_test
    async def test_limit_holds_under_bursts(self):
        """max_connections=20 on ssx-local: neither 30 connections at once nor 15 then 15 more get more than 20 served; the rest wait their turn."""
        echo, echo_port = self.counting_echo()
        server, server_port = self.server(method="aes-256-gcm")
        local, socks_port = self.local(server_port, method="aes-256-gcm", max_connections=self.LIMIT)
        factory = local.factory

        clients = await self._burst(socks_port, echo_port, self.LIMIT + 10)
        # The first 20 are served (a round trip each), and then the listener waits.
        await wait_for(lambda: sum(c.echoed.called for c in clients) >= self.LIMIT, 5, "30 at once: 20 were not served")
        self.assertTrue(self._not_accepting(factory), "the listener still accepts at the limit")
        self.assertLessEqual(len(factory.connections), self.LIMIT, "30 at once: the limit was exceeded")
        self.assertEqual(sum(c.reply is not None for c in clients), self.LIMIT)
        for client in clients:
            if client.reply is not None:
                client.transport.loseConnection()
        await self._served([c for c in clients if c.reply is None], 5)
        for client in clients:
            client.transport.loseConnection()
        self.assertTrue(await wait_until(lambda: not factory.connections, 3))

        # Twisted's accept loop sizes its next batch by the last one: 15
        # accepted now must not let 15 more in while only 5 fit.
        first = await self._burst(socks_port, echo_port, 15)
        await self._served(first, 3)
        second = await self._burst(socks_port, echo_port, 15)
        await wait_for(lambda: sum(c.echoed.called for c in second) >= self.LIMIT - 15, 5, "15 then 15: 5 were not served")
        self.assertTrue(self._not_accepting(factory), "the listener still accepts at the limit")
        self.assertLessEqual(len(factory.connections), self.LIMIT, "15 then 15: the limit was exceeded")
        self.assertEqual(sum(c.reply is not None for c in second), self.LIMIT - 15)
        for client in first:
            client.transport.loseConnection()
        await self._served(second, 5)
        self.assertEqual([c.reply for c in second], [0] * 15)

    @coroutine_test
    async def test_server_limit_holds_under_bursts(self):
        """max_connections=20 on ssx-server: 15 connections at once, then 15 more, leave 20 accepted and 10 waiting in the backlog until some close."""
        echo, echo_port = self.counting_echo()
        server, port = self.server(method="aes-256-gcm", max_connections=self.LIMIT, handshake_timeout=30)
        factory = server.factory
        suite = make_suite("aes-256-gcm", support.PASSWORD)

        def burst(count: int) -> list[socket.socket]:
            # Connected at once, each with its header and nothing more:
            # relays that only the connection limit holds back (unfinished
            # handshakes have bounds of their own, see test_exhaustion).
            sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
            for sock in sockets:
                self.addCleanup(sock.close)
                sock.sendall(suite.client_codec().first(Address("127.0.0.1", echo_port), b""))
            return sockets

        first = burst(15)
        self.assertTrue(await wait_until(lambda: len(factory.connections) == 15, 2))
        # Twisted sizes an accept batch by the previous one: 15 accepted now
        # must not let 15 more in while only 5 fit.
        burst(15)
        await wait_for(
            lambda: len(factory.connections) >= self.LIMIT and self._not_accepting(factory), 2,
            lambda: f"{len(factory.connections)} connections, the listener accepting: {not self._not_accepting(factory)}",
        )
        self.assertEqual(len(factory.connections), self.LIMIT, "15 then 15: the limit was not kept")
        for sock in first:
            sock.close()
        self.assertTrue(await wait_until(lambda: len(factory.connections) == 15, 2), len(factory.connections))

    @coroutine_test
    async def test_server_limit_queues(self):
        """max_connections=5 on ssx-server: a sixth to eighth Shadowsocks client get nothing relayed until earlier ones close."""
        echo, echo_port = self.counting_echo()
        server, port = self.server(method="aes-256-gcm", max_connections=5)
        suite = make_suite("aes-256-gcm", support.PASSWORD)

        def client() -> tuple[RawClient, Any]:
            codec = suite.client_codec()
            return RawClient(codec.first(Address("127.0.0.1", echo_port), b"hello")), codec

        first = [client() for _ in range(5)]
        for raw, codec in first:
            await self.connect(port, raw)
            self.assertEqual(await self.read_plain(raw, codec, 5), b"hello")
        extra = [client() for _ in range(3)]
        for raw, _ in extra:
            await self.connect(port, raw)
        # At the limit the listener stops accepting: the extra ones wait in its backlog.
        await wait_for(lambda: self._not_accepting(server.factory), 2, "the listener still accepts at the limit")
        self.assertEqual(server.factory.accepted, 5, "an extra connection was accepted")
        self.assertEqual([bytes(raw.received) for raw, _ in extra], [b""] * 3)
        self.assertEqual(echo.connections, 5)
        for raw, _ in first[:3]:
            raw.transport.loseConnection()
        for raw, codec in extra:
            self.assertEqual(await self.read_plain(raw, codec, 5), b"hello")
        self.assertEqual(echo.connections, 8)

    @coroutine_test
    async def test_handshake_timeout_not_idle_timeout(self):
        """Handshake timeout 1 s, idle 30 s: unfinished handshakes (Shadowsocks header, SOCKS5 greeting) are closed after ~1 s, the server's with a FIN; a relay idle for 2 s lives on."""
        echo, echo_port = self.counting_echo()
        server, server_port = self.server(method="aes-256-gcm", handshake_timeout=1, timeout=30)
        local, socks_port = self.local(server_port, method="aes-256-gcm", handshake_timeout=1, timeout=30)
        first = make_suite("aes-256-gcm", support.PASSWORD).client_codec().first(Address("127.0.0.1", echo_port), b"x")
        stuck_server = await self.connect(server_port, RawClient(first[:20]))
        stuck_local = await self.connect(socks_port, RawClient(b"\x05\x02\x00"))
        relay = await self.connect(socks_port, SocksClient("127.0.0.1", echo_port, b"before"))
        await relay.echoed
        await wait_for(
            lambda: stuck_server.closed.called and stuck_local.closed.called, 1 + SWEEP_INTERVAL + 1,
            "an unfinished handshake outlived its timeout",
        )
        # What is tested: the relay, now older than the handshake timeout,
        # lives through the next sweep too.
        await sleep(SWEEP_INTERVAL + 0.2)
        self.assertSilentUntilTimeout(stuck_server, "ssx-server header", timeout=1.0)
        # The local end aborts (RST) at its handshake timeout: it need not
        # hide anything from its own applications.
        self.assertSilentUntilTimeout(stuck_local, "ssx-local greeting", timeout=1.0, fin=False)
        self.assertFalse(relay.closed.called, "an idle relay was closed at the handshake timeout")
        self.assertEqual((len(server.factory.connections), len(local.factory.connections)), (1, 1))
        relay.send(b"after")
        self.assertTrue(await wait_until(lambda: bytes(relay.received) == b"beforeafter", 3), relay.received)



# -- 7. concurrency ----------------------------------------------------------


class ConcurrencyTests(LoopbackCase):
    """Thousands of relays at once through ssx-local -> ssx-server -> echo, every byte checked."""

    COUNT = 2000
    # Per relay: the client, ssx-local's two sockets, ssx-server's two, the echo's.
    FDS_PER_RELAY = 6

    def _raise_fd_limit(self) -> None:
        need = open_fds() + self.COUNT * self.FDS_PER_RELAY + 256
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < need:
            if hard != resource.RLIM_INFINITY and hard < need:
                raise unittest.SkipTest(f"RLIMIT_NOFILE hard limit {hard} < {need} descriptors needed")
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))

    @coroutine_test
    async def test_2000_concurrent_relays(self):
        """2,000 relays open at once, each echoing its own 1-16 KiB random payload intact; then both connection sets empty and fds at baseline."""
        self._raise_fd_limit()
        echo = self.listen(support.listen_echo())
        server, server_port = self.server(method="aes-256-gcm")
        local, socks_port = self.local(server_port, method="aes-256-gcm")
        await sleep(0)  # the reactor (and trial's pipes with it) runs from the first wait on
        baseline, before = open_fds(), fd_table()
        rng = random.Random()
        clients = [
            SocksClient("127.0.0.1", echo.getHost().port, os.urandom(rng.randint(1024, 16384)))
            for _ in range(self.COUNT)
        ]
        started = reactor.seconds()
        # Opened in batches below the listen backlog (Twisted's default is
        # 50): a full backlog drops SYNs, and each retry costs a second.
        batch = 40
        for i in range(0, self.COUNT, batch):
            group = clients[i : i + batch]
            await defer.gatherResults([defer.Deferred.fromCoroutine(self.connect(socks_port, c)) for c in group])
            await defer.gatherResults([c.replied for c in group])
        self.assertTrue(
            await wait_until(lambda: all(c.echoed.called for c in clients), 40, step=0.1),
            f"{sum(not c.echoed.called for c in clients)} relays unfinished",
        )
        opened = reactor.seconds() - started
        self.assertEqual([c.reply for c in clients], [0] * self.COUNT)
        self.assertEqual((len(local.factory.connections), len(server.factory.connections)), (self.COUNT, self.COUNT))
        broken = [i for i, c in enumerate(clients) if bytes(c.received) != c.payload]
        self.assertEqual(broken, [])

        for client in clients:
            client.transport.loseConnection()
        self.assertTrue(
            await wait_until(lambda: not local.factory.connections and not server.factory.connections, 20, step=0.1),
            (len(local.factory.connections), len(server.factory.connections)),
        )
        self.assertTrue(await wait_until(lambda: open_fds() <= baseline, 10, step=0.1), new_fds(before))
        self.assertEqual(open_fds(), baseline)
        self.assertLess(reactor.seconds() - started, 50, f"opening and echoing took {opened:.1f} s")


# -- fuzzing every decoder on the server path --------------------------------

_PASSWORDS = {m: generate_psk(m) if lookup_method(m).family == "aead2022" else "fuzz password" for m in METHODS}
# The 2022 ChaCha method has no UDP relay (no XChaCha20-Poly1305 in cryptography).
UDP_METHODS = [m for m in METHODS if m != "2022-blake3-chacha20-poly1305"]
TARGETS = [Address("example.com", 443), Address("127.0.0.1", 22), Address("2001:db8::1", 53)]
KINDS = ["genuine", "random", "truncated", "flipped", "extended", "replayed"]


def _authenticated(method: str) -> bool:
    return lookup_method(method).family in ("aead", "aead2022")


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def _flip(data: bytes, bit: int) -> bytes:
    flipped = bytearray(data)
    flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)


def _mutate(kind: str, genuine: bytes, data: st.DataObject) -> bytes:
    # What is drawn must not depend on `genuine`, whose length varies from
    # run to run (random 2022 padding): positions are drawn, then reduced.
    if kind == "random":
        return data.draw(st.binary(max_size=600), label="random")
    if kind == "truncated":
        return genuine[: data.draw(st.integers(0, 2**20), label="cut") % len(genuine)]
    if kind == "flipped":
        return _flip(genuine, data.draw(st.integers(0, 2**24), label="bit") % (len(genuine) * 8))
    if kind == "extended":
        return genuine + data.draw(st.binary(min_size=1, max_size=200), label="tail")
    return genuine


class ServerDecoderFuzzTests(unittest.SynchronousTestCase):
    """
    Every decoder a server runs on a client's bytes, through the codec faces
    the server uses (`server_codec`, `udp_open`, `udp_server_decoder`), for
    every method: whatever the input, only ProtocolError subclasses escape,
    and the authenticated editions never release a byte they did not verify.
    """

    def _feed_tcp(self, suite: Any, stream: bytes, cuts: list[int], salts: SaltFilter) -> tuple[bytes, Any, Any]:
        """Feed `stream` as the server does: header first, then the relay's data path."""
        codec = suite.server_codec(salts)
        decrypt = codec.decrypt
        relaying = False
        out = bytearray()
        try:
            for piece in _pieces(stream, cuts):
                out += decrypt(piece)
                if not relaying and codec.address is not None:
                    relaying = True
                    decrypt, encrypt = codec.data_path()
                    encrypt(b"the target's reply")
        except ProtocolError as e:
            return bytes(out), codec.address, e
        return bytes(out), codec.address, None

    @settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(method=st.sampled_from(METHODS), kind=st.sampled_from(KINDS), data=st.data())
    def test_tcp_server_codecs(self, method: str, kind: str, data: st.DataObject) -> None:
        """Random, cut, bit-flipped, extended and replayed TCP streams through server_codec(): ProtocolError or a verified prefix, nothing else."""
        suite = make_suite(method, _PASSWORDS[method])
        target = data.draw(st.sampled_from(TARGETS), label="target")
        payload = data.draw(st.binary(max_size=300), label="payload")
        more = data.draw(st.binary(max_size=300), label="more")
        client = suite.client_codec()
        genuine = client.first(target, payload) + (client.encrypt(more) if more else b"")
        stream = _mutate(kind, genuine, data)
        cuts = data.draw(st.lists(st.integers(0, 2000), max_size=6), label="cuts")
        salts = SaltFilter(1000)
        if kind == "replayed":
            self.assertIsNone(self._feed_tcp(suite, genuine, [], salts)[2])
        out, address, failure = self._feed_tcp(suite, stream, cuts, salts)

        expected = payload + more
        if kind == "genuine":
            self.assertEqual((out, address, failure), (expected, target, None))
        elif kind == "truncated":
            # A stream cut short only waits for the rest.
            self.assertIsNone(failure)
            self.assertTrue(expected.startswith(out))
        elif kind == "replayed":
            if suite.spec.salt_size:
                self.assertIsInstance(failure, ReplayError)
                self.assertEqual(out, b"")
        elif _authenticated(method):
            if kind == "random":
                self.assertEqual((out, address), (b"", None))
                return
            self.assertTrue(expected.startswith(out), "unverified bytes released")
            if kind == "flipped":
                self.assertIsNotNone(failure, "a flipped bit went unnoticed")

    @settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(method=st.sampled_from(UDP_METHODS), kind=st.sampled_from(KINDS[:-1]), data=st.data())
    def test_udp_open_paths(self, method: str, kind: str, data: st.DataObject) -> None:
        """Random, cut, bit-flipped and extended datagrams through udp_open/udp_server_decoder: ProtocolError or the genuine content."""
        suite = make_suite(method, _PASSWORDS[method])
        target = data.draw(st.sampled_from(TARGETS), label="target")
        payload = data.draw(st.binary(max_size=600), label="payload")
        if lookup_method(method).family == "aead2022":
            genuine = suite.udp_client_codec().seal(encode_address(target) + payload)

            def open_packet(packet: bytes) -> Any:
                opened = suite.udp_server_decoder().decode(packet)
                return opened.address, opened.payload

        else:
            genuine = suite.udp_seal(encode_address(target) + payload)

            def open_packet(packet: bytes) -> Any:
                # As ShadowsocksUdpRelay does: open, then parse the address.
                plaintext = suite.udp_open(packet)
                parsed = decode_address(plaintext)
                if parsed is None:
                    return None
                address, end = parsed
                return address, plaintext[end:]

        packet = _mutate(kind, genuine, data)
        try:
            opened = open_packet(packet)
        except ProtocolError:
            opened = "refused"
        if kind == "genuine":
            self.assertEqual(opened, (target, payload))
        elif _authenticated(method):
            self.assertEqual(opened, "refused", kind)
