"""
ssx-local (a twistd child) with `--acl`: each target goes through
ssx-server or straight from ssx-local, as the ACL says, for SOCKS5, HTTP
CONNECT, SOCKS5 UDP, SOCKS4, plain HTTP and tunnels; `--acl-resolve`; and a
SIGHUP rereads the file.

The in-process ssx-server connects to targets from 127.0.0.9
(`outbound_address`), so each target knows exactly which way a connection
or datagram came: from 127.0.0.9 through the server, from 127.0.0.1 direct.
Payloads are hashed at the target and echoed back whole.
"""

from __future__ import annotations

import hashlib
import os

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web import server as web_server
from twisted.trial import unittest

from zope.interface.verify import verifyObject

from ssx.interfaces import IUpstream
from ssx.local.direct import DirectUpstream
from ssx.wire.address import Address
from tests import support
from tests.support.dns_servers import RecordingZone, ask, listen_dns

METHOD = "chacha20-ietf-poly1305"
SERVER_SOURCE = "127.0.0.9"
# Targets: 127.0.0.1 (named "localhost" by the tests), 127.0.0.2 and 127.0.0.3.
TARGETS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


class DirectUpstreamTests(unittest.SynchronousTestCase):
    """The direct way to a target is an upstream like a server's."""

    def test_interface(self) -> None:
        """DirectUpstream provides IUpstream, and its codec passes bytes through without a header."""
        upstream = DirectUpstream(reactor, Address("example.com", 443), 10.0)
        verifyObject(IUpstream, upstream)
        codec = upstream.suite.client_codec()
        self.assertEqual(codec.first(Address("example.com", 443), b"hello"), b"hello")
        self.assertEqual((codec.encrypt(b"a"), codec.decrypt(b"b")), (b"a", b"b"))


class DirectConnectTests(unittest.TestCase):
    """A direct target's resolved addresses, on loopback."""

    @support.coroutine_test
    async def test_next_address_when_the_first_refuses(self) -> None:
        """With --acl-resolve's addresses, a refused first address is not the end: the next one is connected to."""
        factory = support.HashingEchoFactory()
        listening = reactor.listenTCP(0, factory, interface="127.0.0.3")
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        upstream = DirectUpstream(reactor, Address("two.test", port), 5.0, ("127.0.0.2", "127.0.0.3"))
        payload = os.urandom(10_000)
        client = support.RawClient(payload)
        await upstream.connect(client)
        await support.wait_for(lambda: len(client.received) >= len(payload), 10, "no echo")
        client.transport.loseConnection()
        self.assertEqual(support.sha256(bytes(client.received)), support.sha256(payload))
        self.assertEqual(client.transport.getPeer().host, "127.0.0.3")


@support.requires("curl", package="curl")
class AclLocalTests(unittest.TestCase):
    """An ssx-local child between test clients and an in-process ssx-server, with loopback targets."""

    def setUp(self) -> None:
        self.tcp: dict[str, tuple[support.HashingEchoFactory, int]] = {}
        self.udp: dict[str, tuple[support.UdpEcho, int]] = {}
        for address in TARGETS:
            factory = support.HashingEchoFactory()
            port = reactor.listenTCP(0, factory, interface=address)
            self.addCleanup(port.stopListening)
            self.tcp[address] = (factory, port.getHost().port)
            udp_port, echo = support.listen_udp_echo(address)
            self.addCleanup(udp_port.stopListening)
            self.udp[address] = (echo, udp_port.getHost().port)
        hosts = self.mktemp()
        with open(hosts, "w") as f:
            f.write("127.0.0.1 localhost\n")
        self.server, self.server_port = support.start_server(
            method=METHOD, outbound_address=SERVER_SOURCE, mode="tcp_and_udp", hosts_file=hosts,
        )
        self.addCleanup(self.server.stopService)

    async def local(self, acl: str, *extra: str) -> tuple[support.ChildProcess, int, str]:
        """Start ssx-local with the ACL text `acl` (and `extra` options); returns (child, proxy port, ACL path)."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(acl)
        port = support.free_port()
        child = await support.start_twistd(
            self, "-n", "--pidfile=", "ssx-local", "-s", "127.0.0.1", "-p", str(self.server_port),
            "-k", support.PASSWORD, "-m", METHOD, "-l", str(port), "-u", "--acl", path, "-v", *extra,
            ready=b"listening on",
        )
        return child, port, path

    def arrived(self, address: str, payload: bytes) -> str:
        """The source address of the one connection to `address` that carried `payload` (checked by hash)."""
        factory, _ = self.tcp[address]
        digest = hashlib.sha256(payload).hexdigest()
        matching = [e for e in factory.inbound if e.digest.hexdigest() == digest]
        self.assertEqual(len(matching), 1, f"{address}: {len(factory.inbound)} connections, none carried the payload")
        return matching[0].transport.getPeer().host

    async def socks5(self, proxy: int, host: str, address: str) -> str:
        """A SOCKS5 transfer to host (which is `address`); returns where it came to the target from."""
        payload = os.urandom(200_000)
        reply, echoed = await support.socks_transfer(proxy, host, self.tcp[address][1], payload)
        self.assertEqual(reply, 0)
        self.assertEqual(hashlib.sha256(echoed).hexdigest(), hashlib.sha256(payload).hexdigest())
        return self.arrived(address, payload)

    async def http_connect(self, proxy: int, host: str, address: str) -> str:
        """An HTTP CONNECT transfer; returns where it came to the target from."""
        payload = os.urandom(100_000)
        head, echoed = await support.http_connect_echo(proxy, host, self.tcp[address][1], payload)
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
        self.assertEqual(hashlib.sha256(echoed).hexdigest(), hashlib.sha256(payload).hexdigest())
        return self.arrived(address, payload)

    async def udp_sources(self, proxy: int, address: str) -> set[str]:
        """SOCKS5 UDP datagrams to `address` (echoed byte for byte); returns the sources the target saw them from."""
        echo, port = self.udp[address]
        before = len(echo.sources)
        client = support.Socks5UdpClient()
        self.assertEqual(await client.open(proxy), 0)
        try:
            payloads = [os.urandom(n) for n in (1, 500, 1400, 8000)]
            await client.exchange(address, port, payloads)
        finally:
            client.close()
        for payload in payloads:
            self.assertIn(payload, echo.received)
        return {host for host, _ in echo.sources[before:]}

    async def check_routes(self, proxy: int, proxied: list[tuple[str, str]], direct: list[tuple[str, str]]) -> None:
        """Every (host, address) of `proxied` arrives from the server, every one of `direct` from ssx-local."""
        for host, address in proxied:
            self.assertEqual(await self.socks5(proxy, host, address), SERVER_SOURCE, f"SOCKS5 {host} not proxied")
            self.assertEqual(await self.http_connect(proxy, host, address), SERVER_SOURCE, f"CONNECT {host} not proxied")
        for host, address in direct:
            self.assertEqual(await self.socks5(proxy, host, address), "127.0.0.1", f"SOCKS5 {host} not direct")
            self.assertEqual(await self.http_connect(proxy, host, address), "127.0.0.1", f"CONNECT {host} not direct")

    @support.coroutine_test
    async def test_bypass_all_with_proxy_list(self) -> None:
        """[bypass_all] + [proxy_list]: listed targets cross the server, the rest go direct (TCP and UDP)."""
        child, proxy, _ = await self.local("[bypass_all]\n[proxy_list]\n127.0.0.2\n|localhost\n")
        await self.check_routes(
            proxy, proxied=[("127.0.0.2", "127.0.0.2"), ("localhost", "127.0.0.1")], direct=[("127.0.0.3", "127.0.0.3")],
        )
        self.assertEqual(await self.udp_sources(proxy, "127.0.0.2"), {SERVER_SOURCE})
        self.assertNotIn(SERVER_SOURCE, await self.udp_sources(proxy, "127.0.0.3"))
        self.assertIn("ACL: 127.0.0.3:", child.text())

    @support.coroutine_test
    async def test_proxy_all_with_bypass_list(self) -> None:
        """[proxy_all] + [bypass_list]: listed targets go direct, the rest cross the server (TCP and UDP)."""
        _, proxy, _ = await self.local("[proxy_all]\n[bypass_list]\n127.0.0.3\n||localhost\n")
        await self.check_routes(
            proxy, proxied=[("127.0.0.2", "127.0.0.2")], direct=[("127.0.0.3", "127.0.0.3"), ("localhost", "127.0.0.1")],
        )
        self.assertEqual(await self.udp_sources(proxy, "127.0.0.2"), {SERVER_SOURCE})
        self.assertNotIn(SERVER_SOURCE, await self.udp_sources(proxy, "127.0.0.3"))

    @support.coroutine_test
    async def test_socks4_plain_http_and_tunnels(self) -> None:
        """SOCKS4, plain HTTP proxying and TCP tunnels follow the ACL too: [proxy_list] targets cross the server."""
        web = {}
        for address in ("127.0.0.2", "127.0.0.3"):
            port = reactor.listenTCP(0, web_server.Site(support.DigestAndSource()), interface=address)
            self.addCleanup(port.stopListening)
            web[address] = port.getHost().port
        tunnels = {address: support.free_port() for address in ("127.0.0.2", "127.0.0.3")}
        args = [f"--tunnel={tunnels[a]}={a}:{self.tcp[a][1]}" for a in tunnels]
        _, proxy, _ = await self.local("[bypass_all]\n[proxy_list]\n127.0.0.2\n", *args)
        expected = {"127.0.0.2": SERVER_SOURCE, "127.0.0.3": "127.0.0.1"}
        body_path = os.path.abspath(self.mktemp())
        for address, source in expected.items():
            for how in (["--socks4", f"127.0.0.1:{proxy}"], ["-x", f"http://127.0.0.1:{proxy}"]):
                body = os.urandom(30_000)
                with open(body_path, "wb") as f:
                    f.write(body)
                out, err, code = await getProcessOutputAndValue(
                    "curl", ["-sS", "--max-time", "20", *how, "--data-binary", f"@{body_path}",
                             f"http://{address}:{web[address]}/"],
                    env=dict(os.environ, no_proxy="", NO_PROXY=""),
                )
                self.assertEqual(code, 0, err)
                self.assertEqual(out.decode(), f"{hashlib.sha256(body).hexdigest()} {source}", how)
            await support.wait_for_port(tunnels[address])
            payload = os.urandom(100_000)
            client = support.RawClient(payload)
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", tunnels[address]), client)
            await support.wait_for(lambda: len(client.received) >= len(payload), 10, lambda: "no whole echo")
            self.assertEqual(bytes(client.received), payload)
            client.transport.loseConnection()
            await client.closed
            self.assertEqual(self.arrived(address, payload), source)

    @support.coroutine_test
    async def test_acl_resolve(self) -> None:
        """--acl-resolve: a name no name rule matches goes direct when it resolves into [bypass_list]."""
        child, proxy, _ = await self.local("[proxy_all]\n[bypass_list]\n127.0.0.1\n::1\n", "--acl-resolve")
        self.assertEqual(await self.socks5(proxy, "localhost", "127.0.0.1"), "127.0.0.1")
        self.assertEqual(await self.socks5(proxy, "127.0.0.2", "127.0.0.2"), SERVER_SOURCE)
        self.assertIn("ACL: localhost:", child.text())
        self.assertIn("direct (resolved to", child.text())

    @support.coroutine_test
    async def test_without_acl_resolve_names_take_the_default(self) -> None:
        """Without --acl-resolve, a name no name rule matches takes the default, whatever it resolves to."""
        _, proxy, _ = await self.local("[proxy_all]\n[bypass_list]\n127.0.0.1\n::1\n")
        self.assertEqual(await self.socks5(proxy, "localhost", "127.0.0.1"), SERVER_SOURCE)
        self.assertEqual(await self.socks5(proxy, "127.0.0.1", "127.0.0.1"), "127.0.0.1")

    @support.coroutine_test
    async def test_sighup_reloads(self) -> None:
        """SIGHUP rereads the ACL with the config: a target that went direct goes through the server; a broken file refuses the reload, the rules stay."""
        child, proxy, path = await self.local("[bypass_all]\n")
        self.assertEqual(await self.socks5(proxy, "127.0.0.2", "127.0.0.2"), "127.0.0.1")
        with open(path, "w") as f:
            f.write("[bypass_all]\n[proxy_list]\n127.0.0.2\n")
        line = await support.sighup(child)
        self.assertIn("reload done: acl reread", line)
        self.assertIn("1 proxy/white", line)
        self.assertEqual(await self.socks5(proxy, "127.0.0.2", "127.0.0.2"), SERVER_SOURCE)
        with open(path, "w") as f:
            f.write("[bypass_all]\n[proxy_list]\n127.0.0.2/40\n")
        line = await support.sighup(child)
        self.assertIn("reload refused", line)
        self.assertIn(f"{path} line 3", line)
        self.assertEqual(await self.socks5(proxy, "127.0.0.2", "127.0.0.2"), SERVER_SOURCE)

    @support.coroutine_test
    async def test_hostile_name_against_backtracking_regex(self) -> None:
        """A DNS query whose name makes a list's regex backtrack exponentially is answered, and so are the next ones."""
        zones = {"local": RecordingZone("192.0.2.1"), "remote": RecordingZone("198.51.100.2")}
        served = {}
        for which, zone in zones.items():
            served[which] = listen_dns(zone)
            for port in served[which].listening:
                self.addCleanup(port.stopListening)
        dns_port = support.free_port()
        await self.local(
            "[proxy_all]\n[bypass_list]\n||direct.test\n^(a|aa)+\\.b\\.example\\.com$\n",
            "--dns-listen", f"127.0.0.1:{dns_port}", "--dns-local", f"127.0.0.1:{served['local'].port}",
            "--dns-remote", f"127.0.0.1:{served['remote'].port}",
        )
        await support.wait_for_port(dns_port)
        # Ends as the regex does (so it is tried), but cannot match: (a|aa)+ tries every split of the a's.
        hostile = "a" * 59 + "c.b.example.com"
        # Out of time, the regex counts as not matching: proxied, as by default.
        answer = await ask(dns_port, hostile)
        self.assertEqual([rr.payload.dottedQuad() for rr in answer.answers], ["198.51.100.2"])
        answer = await ask(dns_port, "www.direct.test")
        self.assertEqual([rr.payload.dottedQuad() for rr in answer.answers], ["192.0.2.1"])
        self.assertEqual((zones["remote"].names, zones["local"].names), ([hostile], ["www.direct.test"]))
