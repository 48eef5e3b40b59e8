"""
UDP interoperability with shadowsocks-libev (ss-server, ss-local, ss-tunnel)
on loopback.

Each test puts one libev process with -u in an ssx chain with UDP enabled:
ssx-local -> ss-server -> UDP echo, ss-local -> ssx-server -> UDP echo (both
through SOCKS5 UDP ASSOCIATE, every echoed datagram checked byte for byte),
and ss-tunnel -> ssx-server -> a twisted.names DNS server.

Sizes: libev 3.3.5 reads every UDP datagram with one recvfrom into a buffer
of `buf_size` bytes, twice DEFAULT_PACKET_SIZE (1,397: a 1,492-byte MTU less
95 bytes of headers), so 2,794 bytes (src/udprelay.c; with -v a longer read
is logged as "fragmentation, MTU at least be: 2889", the buffer plus 95).
A longer datagram is truncated: sealed, it no longer opens ("suspicious UDP
packet").  A payload to an IPv4 target therefore fits through libev only up
to 2,794 minus salt (or IV), tag and the 7-byte address: 2,739 bytes with
aes-256-gcm, where ssx alone carries 65,452.  The exchanges below use sizes
from 1 to 1,400 bytes plus the largest libev accepts for each method, and
one test pins the limit down.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
from typing import Any

from twisted.internet import defer, reactor
from twisted.names import client as dns_client, dns, server as dns_server
from twisted.trial import unittest

from tests import support
from tests.support import Zone, mixed_payloads

METHODS = (
    "aes-128-gcm", "aes-192-gcm", "aes-256-gcm", "chacha20-ietf-poly1305", "xchacha20-ietf-poly1305",
    "aes-256-cfb", "salsa20",
)

# What sealing adds to a Shadowsocks UDP plaintext: salt and tag (AEAD), or IV (stream).
OVERHEAD = {
    "aes-128-gcm": 16 + 16,
    "aes-192-gcm": 24 + 16,
    "aes-256-gcm": 32 + 16,
    "chacha20-ietf-poly1305": 32 + 16,
    # Its 24-byte nonce is the zero one of §6.4, never sent.
    "xchacha20-ietf-poly1305": 32 + 16,
    "aes-256-cfb": 16,
    "salsa20": 8,
}
IPV4_ADDRESS = 7  # ATYP, 4 address bytes, port
# What libev 3.3.5 reads of one datagram (see the module docstring).
LIBEV_UDP_BUFFER = 2 * 1397


def largest_payload(method: str) -> int:
    """The largest payload to an IPv4 target whose sealed datagram libev reads whole."""
    return LIBEV_UDP_BUFFER - OVERHEAD[method] - IPV4_ADDRESS


def udp_payloads(method: str, seed: int = 1) -> list[bytes]:
    """200 distinct payloads: 1 to 1,400 bytes, plus the largest libev accepts (and 1 and 100 bytes less)."""
    return mixed_payloads(200, largest_payload(method), seed=seed)


def udp_port_taken(port: int) -> bool:
    """Whether a UDP socket is bound to 127.0.0.1:port (ours, without SO_REUSEADDR, cannot bind beside it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def _skip_without(*executables: str) -> str | None:
    missing = [name for name in executables if shutil.which(name) is None]
    if not missing:
        return None
    return (
        f"shadowsocks-libev is not installed ({', '.join(missing)} not on PATH); "
        "install the shadowsocks-libev package to run the UDP interoperability tests"
    )


class LibevUdpTestCase(unittest.TestCase):
    """Spawns libev peers with UDP relay and stops them afterwards; a UDP echo target."""

    def setUp(self) -> None:
        port, self.udp_echo = support.listen_udp_echo()
        self.addCleanup(port.stopListening)
        self.echo_port = port.getHost().port
        self.children: list[support.ChildProcess] = []

    def quoting(self, test: Any) -> defer.Deferred:
        """Run a test coroutine; if it fails, the libev output that came after the failure is added."""

        async def run() -> None:
            async with support.late_lines_quoted(lambda: "".join(child.text() for child in self.children)):
                await test

        return defer.Deferred.fromCoroutine(run())

    async def spawn_libev(self, executable: str, args: list[str], port: int) -> support.ChildProcess:
        """Run a libev binary with -u -v and wait until its UDP relay has bound 127.0.0.1:`port`."""
        child = support.spawn(executable, [*args, "-u", "-v"])
        self.children.append(child)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
        # Not a TCP probe: to ss-tunnel that would be a tunnelled connection.
        await support.wait_until(lambda: udp_port_taken(port) or child.ended.called, 10, step=0.05)
        if not udp_port_taken(port):
            self.fail(f"{executable} never bound UDP port {port}; its output:\n{child.text()}")
        return child

    async def wait_for_output(self, child: support.ChildProcess, text: str, seconds: float = 5.0) -> None:
        await support.wait_for(lambda: text in child.text(), seconds, lambda: f"{text!r} not in libev output:\n{child.text()}")

    async def context(self, child: support.ChildProcess, relays: list | None = None) -> str:
        """What to quote when an assertion fails: ssx's UDP counters and the libev child's output (`quoting` adds later lines)."""
        counters = ""
        if relays is not None:
            counters = "\nssx UDP relays (received/dropped/refused): " + ", ".join(
                f"{r.received}/{r.dropped}/{getattr(r, 'refused', '-')}" for r in relays
            )
        return f"\nechoed by the target: {self.udp_echo.count}{counters}\n--- libev output ---\n{child.text()}"

    async def associate(self, socks_port: int, child: support.ChildProcess) -> support.Socks5UdpClient:
        client = support.Socks5UdpClient()
        self.addCleanup(client.close)
        reply = await client.open(socks_port)
        self.assertEqual(reply, 0, f"UDP ASSOCIATE reply {reply}{await self.context(child)}")
        return client

    async def exchange(
        self, client: support.Socks5UdpClient, child: support.ChildProcess, relays: list, host: str, payloads: list[bytes],
        reply_host: str | None = None,
    ) -> None:
        """Every payload to the echo at `host` and back, intact; loopback loses (almost) nothing."""
        try:
            resent = await client.exchange(host, self.echo_port, payloads, reply_host=reply_host)
        except AssertionError as e:
            self.fail(f"{e}{await self.context(child, relays)}")
        context = await self.context(child, relays)
        self.assertGreaterEqual(self.udp_echo.count, len(payloads), context)
        self.assertLessEqual(resent, 10, f"datagrams sent again{context}")
        for relay in relays:
            self.assertEqual(relay.dropped, 0, f"datagrams ssx dropped{context}")


class SsServerUdpTests(LibevUdpTestCase):
    """ssx-local -u -> ss-server -u -> UDP echo: ssx's client side against libev's server."""

    skip = _skip_without("ss-server")

    async def chain(self, method: str) -> tuple[support.ChildProcess, Any, int]:
        """ss-server -u and an ssx-local (tcp_and_udp) aimed at it; returns (child, ssx-local, SOCKS port)."""
        server_port = support.free_port()
        child = await self.spawn_libev(
            "ss-server", ["-s", "127.0.0.1", "-p", str(server_port), "-k", support.PASSWORD, "-m", method], server_port
        )
        local, socks_port = support.start_local(server_port, method=method, mode="tcp_and_udp")
        self.addCleanup(local.stopService)
        return child, local, socks_port

    async def _echo(self, method: str) -> None:
        child, local, socks_port = await self.chain(method)
        client = await self.associate(socks_port, child)
        # As libev's ss-local does (SsLocalUdpTests): the address the
        # application reached, with the listening port the UDP relay shares.
        self.assertEqual(client.relay, ("127.0.0.1", socks_port))
        await self.exchange(client, child, local.udp_relays, "127.0.0.1", udp_payloads(method))
        # ss-server really relayed them: it logs each new client/target pair.
        await self.wait_for_output(child, f"[udp] cache miss: 127.0.0.1:{self.echo_port} <-> 127.0.0.1:")

    async def _buffer_limit(self) -> None:
        method = "aes-256-gcm"
        child, local, socks_port = await self.chain(method)
        client = await self.associate(socks_port, child)
        await self.exchange(client, child, local.udp_relays, "127.0.0.1", [os.urandom(largest_payload(method))])
        # One byte more: ssx-local seals and sends it (65,507 would be its
        # own limit); ss-server reads 2,794 bytes of it, which do not open.
        client.send("127.0.0.1", self.echo_port, os.urandom(largest_payload(method) + 1))
        # ss-server has dropped it: nothing more reaches the echo or comes back.
        await self.wait_for_output(child, "suspicious UDP packet")
        context = await self.context(child, local.udp_relays)
        self.assertIn(f"MTU at least be: {LIBEV_UDP_BUFFER + 95}", child.text(), f"libev's read size{context}")
        self.assertEqual(self.udp_echo.count, 1, f"datagrams reaching the echo{context}")
        relay = local.udp_relays[0]
        self.assertEqual((relay.received, relay.dropped), (2, 0), f"ssx-local's counters{context}")
        self.assertEqual(client.udp.queue.pending, [], f"datagrams answered{context}")

    def test_libev_buffer_limit(self):
        """ss-server reads at most 2,794 bytes of a datagram: one byte over, ssx-local's datagram is lost at libev."""
        return self.quoting(self._buffer_limit())


class SsLocalUdpTests(LibevUdpTestCase):
    """ss-local -u -> ssx-server -u -> UDP echo: libev's client side against ssx's server."""

    skip = _skip_without("ss-local")

    async def ss_local(self, server_port: int, method: str, password: str = support.PASSWORD) -> tuple[support.ChildProcess, int]:
        """ss-local -u aimed at ssx-server's port; returns (child, its SOCKS5 port)."""
        port = support.free_port()
        child = await self.spawn_libev(
            "ss-local",
            ["-s", "127.0.0.1", "-p", str(server_port), "-b", "127.0.0.1", "-l", str(port), "-k", password, "-m", method],
            port,
        )
        return child, port

    async def _echo(self, method: str) -> None:
        server, server_port = support.start_server(method=method, mode="tcp_and_udp")
        self.addCleanup(server.stopService)
        child, socks_port = await self.ss_local(server_port, method)
        client = await self.associate(socks_port, child)
        # libev answers UDP ASSOCIATE with its control connection's local
        # address and its listening port, where its UDP relay is bound too.
        self.assertEqual(client.relay, ("127.0.0.1", socks_port), await self.context(child))
        await self.exchange(client, child, server.udp_relays, "127.0.0.1", udp_payloads(method))
        relay = server.udp_relays[0]
        self.assertGreaterEqual(relay.received, 200, await self.context(child, server.udp_relays))
        self.assertEqual(relay.refused, 0, await self.context(child, server.udp_relays))

    async def _domain(self) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".hosts", delete=False) as f:
            f.write("127.0.0.1 udp.ssx.test\n")
        self.addCleanup(os.unlink, f.name)
        # An unreachable DNS server: only the hosts file can answer, so the
        # name must have arrived as a name.
        server, server_port = support.start_server(
            method="chacha20-ietf-poly1305", mode="tcp_and_udp", hosts_file=f.name, nameserver="127.0.0.1:9"
        )
        self.addCleanup(server.stopService)
        child, socks_port = await self.ss_local(server_port, "chacha20-ietf-poly1305")
        client = await self.associate(socks_port, child)
        payloads = mixed_payloads(50, 1400, seed=2)
        # The reply names the IP the echo answered from, as ssx-server resolved it.
        await self.exchange(client, child, server.udp_relays, "udp.ssx.test", payloads, reply_host="127.0.0.1")
        # ss-local passed the name on (ATYP 3): it logs the target as it got it.
        await self.wait_for_output(child, f"[udp] cache miss: udp.ssx.test:{self.echo_port} <-> 127.0.0.1:")

    def test_domain_target(self):
        """A domain UDP target from ss-local (ATYP 3) is resolved from ssx-server's hosts file; replies name its IP."""
        return self.quoting(self._domain())

    async def _wrong_password(self) -> None:
        server, server_port = support.start_server(method="aes-256-gcm", mode="tcp_and_udp", password="one")
        self.addCleanup(server.stopService)
        child, socks_port = await self.ss_local(server_port, "aes-256-gcm", password="two")
        client = await self.associate(socks_port, child)
        relay = server.udp_relays[0]
        for i in range(5):
            client.send("127.0.0.1", self.echo_port, b"wrong key %d" % i)
        # Each is dropped (counted at once) or relayed to the echo.
        await support.wait_until(lambda: relay.received >= 5 and relay.dropped + self.udp_echo.count >= 5, 3)
        context = await self.context(child, server.udp_relays)
        self.assertEqual(relay.received, 5, f"datagrams reaching ssx-server{context}")
        self.assertEqual(relay.dropped, 5, f"datagrams ssx-server dropped{context}")
        self.assertEqual(relay.refused, 0, context)
        self.assertEqual(len(relay.nat), 0, f"NAT entries for a client that failed authentication{context}")
        self.assertEqual(self.udp_echo.count, 0, f"datagrams reaching the echo{context}")
        self.assertEqual(client.udp.queue.pending, [], f"datagrams answered{context}")

    def test_wrong_password(self):
        """Datagrams from ss-local with another password are dropped and counted by ssx-server; none reach the echo."""
        return self.quoting(self._wrong_password())


class SsTunnelUdpTests(LibevUdpTestCase):
    """ss-tunnel -u -> ssx-server -u -> a twisted.names DNS server."""

    skip = _skip_without("ss-tunnel")

    async def _dns(self, method: str) -> None:
        zone = Zone()
        factory = dns_server.DNSServerFactory(authorities=[zone])
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        dns_port = udp.getHost().port
        server, server_port = support.start_server(method=method, mode="tcp_and_udp")
        self.addCleanup(server.stopService)
        tunnel_port = support.free_port()
        child = await self.spawn_libev(
            "ss-tunnel",
            ["-s", "127.0.0.1", "-p", str(server_port), "-b", "127.0.0.1", "-l", str(tunnel_port),
             "-L", f"127.0.0.1:{dns_port}", "-k", support.PASSWORD, "-m", method],
            tunnel_port,
        )
        resolver = dns_client.Resolver(servers=[("127.0.0.1", tunnel_port)], reactor=reactor)
        try:
            answers, _, _ = await resolver.lookupAddress("www.ssx.test", timeout=[3])
        except Exception as e:
            self.fail(f"no DNS answer through ss-tunnel ({e!r}), queries at the server: {zone.queries}"
                      f"{await self.context(child, server.udp_relays)}")
        context = await self.context(child, server.udp_relays)
        self.assertEqual([a.payload.dottedQuad() for a in answers], ["192.0.2.10"], context)
        self.assertEqual(zone.queries, [(b"www.ssx.test", dns.A)], context)
        relay = server.udp_relays[0]
        self.assertEqual((relay.received, relay.dropped, relay.refused), (1, 0, 0), context)


def _make_test(runner: str, method: str, doc: str) -> Any:
    def test(self):
        return self.quoting(getattr(self, runner)(method))

    test.__doc__ = doc
    return test


for _method in METHODS:
    _name = "test_" + _method.replace("-", "_")
    setattr(SsServerUdpTests, _name, _make_test(
        "_echo", _method, f"200 datagrams (1 byte to {largest_payload(_method):,}) through ssx-local -> ss-server with {_method} come back intact."))
    setattr(SsLocalUdpTests, _name, _make_test(
        "_echo", _method, f"200 datagrams (1 byte to {largest_payload(_method):,}) through ss-local -> ssx-server with {_method} come back intact."))
    setattr(SsTunnelUdpTests, _name, _make_test(
        "_dns", _method, f"A DNS query to ss-tunnel -> ssx-server with {_method} is answered by a twisted.names server."))
del _method, _name
