"""
Upstream DNS servers for the tests of ssx-local's DNS server: a
`twisted.names` answerer that records every name it is asked and gives each
its own address, served on UDP and TCP on one loopback port; and a DNS
client for either transport.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from twisted.internet import defer, reactor
from twisted.internet.error import CannotListenError
from twisted.names import client, common, dns, error as dns_error, server

__all__ = ["DnsUpstream", "RecordingZone", "ask", "listen_dns"]

# Names starting with this label do not exist (NXDOMAIN).
MISSING = b"missing."
# Names starting with this one have no records of any type (NODATA), with an
# SOA of this minimum.
NODATA = b"nodata."
SOA_MINIMUM = 30


class RecordingZone(common.ResolverBase):
    """
    Answers every A question with `address` (TTL `ttl`) and every other type
    with no records; names starting with ``missing.`` get NXDOMAIN, names
    starting with ``nodata.`` no records and an SOA in authority.  Every
    name asked is kept in `names`, in order.
    """

    def __init__(self, address: str, ttl: int = 60) -> None:
        common.ResolverBase.__init__(self)
        self.address = address
        self.ttl = ttl
        self.names: list[str] = []

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> defer.Deferred:
        self.names.append(name.decode())
        if name.startswith(MISSING):
            return defer.fail(dns_error.DomainError(name))
        if name.startswith(NODATA):
            soa = dns.Record_SOA(mname=b"ns.test", rname=b"root.test", minimum=SOA_MINIMUM, ttl=SOA_MINIMUM)
            return defer.succeed(([], [dns.RRHeader(b"test", dns.SOA, dns.IN, SOA_MINIMUM, soa)], []))
        if type != dns.A:
            return defer.succeed(([], [], []))
        record = dns.Record_A(self.address, ttl=self.ttl)
        return defer.succeed(([dns.RRHeader(name, dns.A, cls, self.ttl, record)], [], []))


class _RecordingFactory(server.DNSServerFactory):
    """A DNS server that notes the transport ("udp" or "tcp") of every message it receives."""

    noisy = False

    def __init__(self, resolver: Any) -> None:
        server.DNSServerFactory.__init__(self, clients=[resolver])
        self.transports: list[str] = []

    def messageReceived(self, message: dns.Message, proto: Any, address: Any = None) -> None:
        self.transports.append("tcp" if address is None else "udp")
        server.DNSServerFactory.messageReceived(self, message, proto, address)


class DnsUpstream(NamedTuple):
    """A served `RecordingZone`: its port (UDP and TCP), listening ports and the transports it was asked on."""

    port: int
    listening: list[Any]
    transports: list[str]


def listen_dns(resolver: Any, host: str = "127.0.0.1") -> DnsUpstream:
    """Serve `resolver` on UDP and TCP on one free port of `host`."""
    factory = _RecordingFactory(resolver)
    for _ in range(20):
        tcp = reactor.listenTCP(0, factory, interface=host)
        port = tcp.getHost().port
        try:
            udp = reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface=host)
        except CannotListenError:  # taken for UDP: try another
            tcp.stopListening()
            continue
        return DnsUpstream(port, [tcp, udp], factory.transports)
    raise AssertionError("no port free for both TCP and UDP")


def ask(port: int, name: str, tcp: bool = False, record_type: int = dns.A, host: str = "127.0.0.1") -> defer.Deferred:
    """The whole response `Message` of the DNS server at host:port to one question, over UDP or TCP."""
    resolver = client.Resolver(servers=[(host, port)], reactor=reactor)
    query = [dns.Query(name, record_type, dns.IN)]
    if not tcp:
        return resolver.queryUDP(query, timeout=(10,))

    def close(result: Any) -> Any:
        # The resolver keeps its TCP connection for more queries: none come.
        for connection in resolver.connections:
            connection.transport.loseConnection()
        return result

    return resolver.queryTCP(query, timeout=10).addBoth(close)
