"""
What random headers can make a server do.

Under a stream cipher nothing authenticates the request, so a prober's
random bytes decrypt to a random target header; under AEAD methods a peer
holding the key can send any header it likes.  Either way the server must
not act on a header no client sends (a bad address type, a name that is not
a host name, port 0): no lookup, no connection, no datagram, and for TCP
the same silence and FIN at the handshake timeout as any other bad
request.  Here: the UDP relays of every method family on a fake reactor,
and random probes against a real stream-method server on loopback.
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import Any

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet import defer, error, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock, deferLater
from twisted.names import dns
from twisted.trial import unittest

from ssx.wire.address import decode_address
from ssx.crypto import make_suite
from ssx.server.forbidden import parse_forbidden
from ssx.server.udp import udp_relay_for
from tests import support
from tests.support import forged


class _FakeResolver:
    """Answers every name with one public address, recording the names asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def resolve(self, name: str) -> defer.Deferred:
        self.asked.append(name)
        return defer.succeed(["93.184.216.34"])

    def known(self, name: str) -> None:
        """Nothing is known without asking."""
        return None


class _FakePort:
    def __init__(self) -> None:
        self.written: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, addr: Any = None) -> None:
        self.written.append((data, addr))

    def stopListening(self) -> None:
        pass


class _UdpReactor(Clock):
    """A clock that hands out fake UDP ports, recording what is sent from them."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[_FakePort] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> _FakePort:
        fake = _FakePort()
        self.ports.append(fake)
        return fake


class UdpInvalidTargetTests(unittest.SynchronousTestCase):
    """Every method family's UDP relay drops a datagram whose header fails the check, before any lookup or send."""

    def _relay(self, method: str) -> tuple[_UdpReactor, _FakeResolver, Any]:
        reactor = _UdpReactor()
        reactor.advance(1_700_000_000)
        resolver = _FakeResolver()
        suite = make_suite(method, forged.password_for(method), now=reactor.seconds)
        relay = udp_relay_for(suite)(reactor, suite, resolver, parse_forbidden(None), timeout=60, capacity=100)
        relay.transport = _FakePort()
        relay.startProtocol()
        self.addCleanup(relay.stopProtocol)
        return reactor, resolver, relay

    def test_invalid_headers_dropped(self):
        """stream, AEAD-2017, 2022: each invalid header is dropped and counted, with no lookup, no socket and no answer; a valid one goes out."""
        for family, method in forged.FAMILIES.items():
            reactor, resolver, relay = self._relay(method)
            for n, header in enumerate(forged.INVALID_HEADERS.values()):
                relay.datagramReceived(forged.udp_datagram(method, header, b"query", reactor.seconds), ("198.51.100.1", 1000 + n))
            self.assertEqual(relay.dropped, len(forged.INVALID_HEADERS), family)
            self.assertEqual((resolver.asked, reactor.ports, relay.transport.written), ([], [], []), family)
            relay.datagramReceived(forged.udp_datagram(method, b"\x03\x0bexample.com\x00\x35", b"query", reactor.seconds), ("198.51.100.1", 999))
            self.assertEqual(resolver.asked, ["example.com"], family)
            self.assertEqual([p.written for p in reactor.ports], [[(b"query", ("93.184.216.34", 53))]], family)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(family=st.sampled_from(sorted(forged.FAMILIES)), header=forged.header_bytes, payload=st.binary(max_size=40))
    def test_sends_only_for_valid_headers(self, family, header, payload):
        """stream, AEAD-2017, 2022: an authentic datagram with any header raises nothing and is looked up or sent only if its header passes the check."""
        method = forged.FAMILIES[family]
        reactor, resolver, relay = self._relay(method)
        relay.datagramReceived(forged.udp_datagram(method, header, payload, reactor.seconds), ("198.51.100.1", 1000))
        acted = bool(resolver.asked or reactor.ports or relay.refused)
        verdict = forged.reference_check(header + payload)
        self.assertEqual(acted, verdict == "valid", verdict)
        self.assertEqual(relay.dropped, int(not acted))
        self.assertEqual(relay.transport.written, [])


# -- random probes against a real server ------------------------------------

HANDSHAKE = 1.5
# How much earlier than the handshake timeout a close may be measured (the
# client's clock starts a little after the server's).
EARLY = 0.05
PROBES = 300


class _RecordingDns(protocol.DatagramProtocol):
    """A DNS server on loopback that records each name asked and answers NXDOMAIN."""

    def __init__(self) -> None:
        self.names: list[bytes] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        query = dns.Message()
        query.fromStr(data)
        self.names.append(query.queries[0].name.name)
        answer = dns.Message(id=query.id, answer=1, opCode=query.opCode, recDes=query.recDes, recAv=1, rCode=dns.ENAME)
        answer.queries = query.queries
        self.transport.write(answer.toStr(), addr)


class _Probe(protocol.Protocol):
    """Sends its bytes on connecting; records what comes back and when and how the connection ends."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.received = b""
        self.lifetime: float | None = None
        self.ending: str | None = None
        self.closed: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.opened = reactor.seconds()
        self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lifetime = reactor.seconds() - self.opened
        self.ending = "FIN" if reason.check(error.ConnectionDone) else repr(reason.value)
        self.closed.callback(None)


def _probes(method: str, count: int, rng: random.Random) -> list[bytes]:
    """
    `count` random probes.  Half are plain random bytes; the other half
    spend their randomness where it matters: a random IV followed by the
    encryption of a random header-shaped plaintext, which is what random
    bytes decrypt to 3 times in 256 (to the server both halves are just
    bytes).
    """
    suite = make_suite(method, forged.password_for(method))
    shapes = list(forged.INVALID_HEADERS.values())
    probes = []
    for i in range(count):
        if i % 2:
            probes.append(os.urandom(rng.randint(1, 300)))
            continue
        kind = rng.randrange(4)
        if kind == 0:
            header = rng.choice(shapes)
        elif kind == 1:
            name = bytes(rng.choice(b"abz09-_.%: /\x00\xfc") for _ in range(rng.randint(1, 70)))
            header = b"\x03" + bytes([len(name)]) + name + rng.choice([b"\x00\x00", b"\x01\xbb"])
        elif kind == 2:
            header = bytes([rng.choice([1, 3, 4])]) + os.urandom(rng.randint(0, 40))
        else:
            header = os.urandom(rng.randint(1, 40))
        probes.append(suite.tcp_encryptor().encrypt(header + os.urandom(rng.randint(0, 60))))  # type: ignore[union-attr]
    return probes


class StreamProbeTests(unittest.TestCase):
    """Random probes against a real aes-256-cfb server on loopback, with a recording DNS server."""

    method = "aes-256-cfb"

    async def _probe_server(self) -> None:
        dns_server = _RecordingDns()
        dns_port = reactor.listenUDP(0, dns_server, interface="127.0.0.1")
        self.addCleanup(dns_port.stopListening)
        with tempfile.NamedTemporaryFile("w", suffix=".hosts", delete=False) as hosts:
            hosts.write("")
        self.addCleanup(os.unlink, hosts.name)
        # Every address forbidden: a header that passes the check still
        # reaches nothing (this test sends nothing beyond loopback).
        service, port = support.start_server(
            method=self.method,
            password=forged.password_for(self.method),
            handshake_timeout=HANDSHAKE,
            timeout=30,
            forbidden_ip="0.0.0.0/0,::/0",
            nameserver=f"127.0.0.1:{dns_port.getHost().port}",
            hosts_file=hosts.name,
        )
        self.addCleanup(service.stopService)
        factory = service.factory

        seed = random.randrange(2**32)
        probes = _probes(self.method, PROBES, random.Random(seed))
        decrypt = make_suite(self.method, forged.password_for(self.method))
        verdicts = [forged.reference_check(decrypt.tcp_decryptor().decrypt(p)) for p in probes]  # type: ignore[union-attr]
        clients: list[_Probe] = []
        # A hundred at a time keeps the descriptors this takes bounded.
        for start in range(0, len(probes), 100):
            batch = [_Probe(p) for p in probes[start : start + 100]]
            await defer.gatherResults(
                [connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), c) for c in batch]
            )
            clients += batch
            await defer.gatherResults([c.closed for c in batch])

        where = f"(seed {seed}; verdicts {sorted((v, verdicts.count(v)) for v in set(verdicts))})"
        answered = [i for i, c in enumerate(clients) if c.received]
        self.assertEqual(answered, [], f"probes that got bytes back {where}")
        early = [
            (i, verdicts[i], round(c.lifetime or 0, 3), c.ending)
            for i, c in enumerate(clients)
            if verdicts[i] != "valid" and ((c.lifetime or 0) < HANDSHAKE - EARLY or c.ending != "FIN")
        ]
        self.assertEqual(early, [], f"probes failing the check closed before the handshake timeout or without a FIN {where}")
        bad_names = [n for n in dns_server.names if not forged.reference_name(n)]
        self.assertEqual(bad_names, [], f"DNS queries for names that fail the check {where}")
        self.assertEqual(factory.handshake_failures, verdicts.count("invalid"), where)
        self.assertGreater(verdicts.count("invalid"), PROBES // 4, where)
        await support.drained(service)

    def test_random_probes(self):
        """300 random probes: none gets a byte; each whose header fails the check is closed with a FIN only at the handshake timeout; no DNS query names an invalid name."""
        return defer.Deferred.fromCoroutine(self._probe_server())
