"""
What the tests connect to on loopback: TCP and UDP echo targets (plain,
counting, hashing), a twisted.web site, a self-signed certificate for it,
and DNS servers (a fake one on a UDP port, an authoritative zone for
twisted.names); and free loopback ports for child processes.
"""

from __future__ import annotations

import hashlib
import os
import socket
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.names import common, dns, error as dns_error
from twisted.web import resource
from zope.interface import implementer

__all__ = [
    "free_port",
    "ipv6_loopback",
    "Echo",
    "listen_echo",
    "CountingEchoFactory",
    "HashingEcho",
    "HashingEchoFactory",
    "UdpEcho",
    "listen_udp_echo",
    "make_certificate",
    "listen_web",
    "Blob",
    "DigestAndSource",
    "FakeDns",
    "Zone",
]


def free_port(family: int = socket.AF_INET, both_families: bool = False) -> int:
    """
    A port that was free a moment ago for both TCP and UDP (for child
    processes and managers that need a number: a server with UDP binds
    both). Taken from UDP, then checked for TCP: a TCP-only check handed
    out ports another process held for UDP.  With `both_families`, checked
    on ::1 and 127.0.0.1 alike (for a server listening on both: a number
    free in one family may be some connection's port in the other).
    """
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    addresses = [(socket.AF_INET6, "::1"), (socket.AF_INET, "127.0.0.1")] if both_families else [(family, host)]
    for _ in range(50):
        with socket.socket(family, socket.SOCK_DGRAM) as held:
            held.bind((host, 0))
            port: int = held.getsockname()[1]
            checks = [(f, a, socket.SOCK_STREAM) for f, a in addresses]
            checks += [(f, a, socket.SOCK_DGRAM) for f, a in addresses if (f, a) != (family, host)]
            if all(_binds(*check, port) for check in checks):
                return port
    raise AssertionError("no port free for both TCP and UDP")


def _binds(family: int, host: str, kind: int, port: int) -> bool:
    with socket.socket(family, kind) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@implementer(IHalfCloseableProtocol)
class Echo(protocol.Protocol):
    """Echoes everything; closes after the client's half-close."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


def listen_echo(address: str = "127.0.0.1") -> Any:
    factory = protocol.Factory.forProtocol(Echo)
    return reactor.listenTCP(0, factory, interface=address)


class CountingEchoFactory(protocol.Factory):
    """Echo, counting the connections it accepts (what reached the target)."""

    protocol = Echo
    noisy = False

    def __init__(self) -> None:
        self.connections = 0

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        self.connections += 1
        return protocol.Factory.buildProtocol(self, addr)


@implementer(IHalfCloseableProtocol)
class HashingEcho(protocol.Protocol):
    """Echoes everything and hashes what arrived, so the upstream direction is checked apart from the echo."""

    def connectionMade(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0
        self.factory.inbound.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.digest.update(data)
        self.size += len(data)
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class HashingEchoFactory(protocol.Factory):
    protocol = HashingEcho

    def __init__(self) -> None:
        self.inbound: list[HashingEcho] = []


class UdpEcho(protocol.DatagramProtocol):
    """Echoes every datagram to where it came from; counts them and keeps each one and its source."""

    def __init__(self) -> None:
        self.count = 0
        self.received: list[bytes] = []
        self.sources: list[tuple[str, int]] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.count += 1
        self.received.append(data)
        self.sources.append(addr)
        self.transport.write(data, addr)


def listen_udp_echo(address: str = "127.0.0.1") -> tuple[Any, UdpEcho]:
    echo = UdpEcho()
    return reactor.listenUDP(0, echo, interface=address, maxPacketSize=65535), echo


def make_certificate(directory: str, name: str = "localhost") -> tuple[str, str]:
    """
    A self-signed certificate for `name` (also valid for 127.0.0.1), made by
    ssx.crypto.certificate: returns the paths of its key and of the certificate, the
    latter alone in a directory of its own (Twisted's trustRoots loads every
    file there).
    """
    from ssx.crypto.certificate import make_self_signed

    key_pem, cert_pem, _ = make_self_signed(name, days=1, also=("127.0.0.1",))
    roots = os.path.join(directory, "roots")
    os.makedirs(roots, exist_ok=True)
    key_path, cert_path = os.path.join(directory, "key.pem"), os.path.join(roots, "cert.pem")
    for path, data in ((key_path, key_pem), (cert_path, cert_pem)):
        with open(path, "wb") as f:
            f.write(data)
    return key_path, cert_path


def listen_web(site: Any, key_path: str | None = None, cert_path: str | None = None) -> Any:
    """A twisted.web site on a free loopback port, over TLS when given a key and certificate."""
    if key_path is None:
        return reactor.listenTCP(0, site, interface="127.0.0.1")
    from twisted.internet import ssl

    with open(key_path, "rb") as f:
        key = f.read()
    with open(cert_path, "rb") as f:  # type: ignore[arg-type]
        cert = f.read()
    options = ssl.PrivateCertificate.loadPEM(key + cert).options()
    return reactor.listenSSL(0, site, options, interface="127.0.0.1")


class Blob(resource.Resource):
    """A web resource answering every GET, whatever its path, with the same body."""

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render_GET(self, request: Any) -> bytes:
        return self.body


class DigestAndSource(resource.Resource):
    """A web resource answering a POST with the SHA-256 of its body and the client's address: "HEX HOST"."""

    isLeaf = True

    def render_POST(self, request: Any) -> bytes:
        body = request.content.read()
        return f"{hashlib.sha256(body).hexdigest()} {request.getClientAddress().host}".encode()


class FakeDns(protocol.DatagramProtocol):
    """
    A DNS server on loopback that answers from `records` ({name: [(type,
    address)]}) at once, NXDOMAIN for other names, or, if `silent`, never.
    """

    def __init__(self, records: dict[str, list[tuple[int, str]]] | None = None, silent: bool = False) -> None:
        self.records = records or {}
        self.silent = silent
        self.queries: list[tuple[str, int]] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        query = dns.Message()
        query.fromStr(data)
        question = query.queries[0]
        name = question.name.name.decode()
        self.queries.append((name, question.type))
        if self.silent:
            return
        answer = dns.Message(id=query.id, answer=1, opCode=query.opCode, recDes=query.recDes, recAv=1, auth=1)
        answer.queries = query.queries
        if name not in self.records:
            answer.rCode = dns.ENAME
        for record_type, address in self.records.get(name, []):
            if record_type == question.type:
                payload = dns.Record_A(address, ttl=60) if record_type == dns.A else dns.Record_AAAA(address, ttl=60)
                answer.answers.append(dns.RRHeader(question.name.name, record_type, dns.IN, 60, payload))
        self.transport.write(answer.toStr(), addr)


class Zone(common.ResolverBase):
    """A tiny authoritative answerer that counts the queries reaching it."""

    RECORDS = {
        (b"www.ssx.test", dns.A): dns.Record_A("192.0.2.10", ttl=60),
        (b"forever.ssx.test", dns.A): dns.Record_A("192.0.2.40", ttl=2**31 - 1),
        (b"dual.ssx.test", dns.A): dns.Record_A("192.0.2.20", ttl=60),
        (b"dual.ssx.test", dns.AAAA): dns.Record_AAAA("2001:db8::20", ttl=60),
        (b"v6only.ssx.test", dns.AAAA): dns.Record_AAAA("2001:db8::6", ttl=60),
        (b"both.ssx.test", dns.A): dns.Record_A("192.0.2.30", ttl=60),
    }

    def __init__(self) -> None:
        common.ResolverBase.__init__(self)
        self.queries: list[tuple[bytes, int]] = []

    def _lookup(self, name, cls, type, timeout):
        self.queries.append((name, type))
        record = self.RECORDS.get((name, type))
        if record is not None:
            return defer.succeed(([dns.RRHeader(name, type, cls, record.ttl, record, auth=True)], [], []))
        if any(key[0] == name for key in self.RECORDS):
            return defer.succeed(([], [], []))
        return defer.fail(dns_error.DomainError(name))
