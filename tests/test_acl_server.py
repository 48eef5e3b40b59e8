"""
ssx-server with `--acl`: a black-listed client address gets silence, and
outbound-blocked targets (by name, by an address the name resolves to in
the hosts file, by IP literal) are refused, over TCP and UDP, each counted;
allowed ones still arrive, byte for byte.
"""

from __future__ import annotations

import hashlib
import os

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from ssx.wire.address import Address, encode_address
from tests import support
from tests.support import forged

METHOD = "aes-256-gcm"


class AclServerTests(unittest.TestCase):
    """An in-process ssx-server reading an ACL file, clients with forged requests from 127.0.0.1 and 127.0.0.2."""

    def setUp(self) -> None:
        self.echo = support.HashingEchoFactory()
        port = reactor.listenTCP(0, self.echo, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.echo_port = port.getHost().port
        # What must never be reached: 127.0.0.5, on the same port number.
        self.forbidden_target = support.CountingEchoFactory()
        other = reactor.listenTCP(self.echo_port, self.forbidden_target, interface="127.0.0.5")
        self.addCleanup(other.stopListening)
        self.udp_port, self.udp_echo = support.listen_udp_echo()
        self.addCleanup(self.udp_port.stopListening)
        hosts = self.mktemp()
        with open(hosts, "w") as f:
            f.write("127.0.0.1 fine.test blocked.test\n127.0.0.5 resolves-blocked.test\n")
        acl = self.mktemp()
        with open(acl, "w") as f:
            f.write("[accept_all]\n[black_list]\n127.0.0.2\n"
                    "[outbound_block_list]\n||blocked.test\n127.0.0.5\n")
        self.service, self.port = support.start_server(
            method=METHOD, password=forged.password_for(METHOD), acl=acl, hosts_file=hosts, mode="tcp_and_udp",
        )
        self.addCleanup(self.service.stopService)
        self.factory = self.service.factory
        self.relay = self.service.udp_relays[0]

    async def request(self, host: str, payload: bytes, source: str = "127.0.0.1") -> support.RawClient:
        """Open a connection from `source` with a request for host:echo port and `payload`; wait for its end."""
        stream = forged.tcp_request(METHOD, encode_address(Address(host, self.echo_port)), payload, reactor.seconds)
        client = support.RawClient(stream)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, bindAddress=(source, 0))
        await connectProtocol(endpoint, client)
        return client

    @support.coroutine_test
    async def test_allowed_target_arrives(self) -> None:
        """A name no rule refuses is relayed: the target gets the payload byte for byte."""
        payload = os.urandom(50_000)
        client = await self.request("fine.test", payload)
        await support.wait_for(lambda: self.echo.inbound and self.echo.inbound[0].size == len(payload), 10,
                               lambda: "the payload did not arrive")
        self.assertEqual(self.echo.inbound[0].digest.hexdigest(), hashlib.sha256(payload).hexdigest())
        client.transport.loseConnection()
        await client.closed
        self.assertEqual((self.factory.acl_refused, self.factory.acl_clients_refused), (0, 0))

    @support.coroutine_test
    async def test_blocked_name(self) -> None:
        """A name the block list names is refused before any look-up: closed, nothing reaches the target."""
        client = await self.request("www.blocked.test", b"GET / HTTP/1.0\r\n\r\n")
        await support.within(10, client.closed, "the server kept the refused connection open")
        self.assertEqual(self.factory.acl_refused, 1)
        self.assertEqual(client.received, b"")
        self.assertEqual(self.echo.inbound, [])

    @support.coroutine_test
    async def test_blocked_resolved_address(self) -> None:
        """A name that resolves (hosts file) to a blocked address is refused; so is the address itself."""
        first = await self.request("resolves-blocked.test", b"x")
        await support.within(10, first.closed, "the server kept the refused connection open")
        second = await self.request("127.0.0.5", b"x")
        await support.within(10, second.closed, "the server kept the refused connection open")
        self.assertEqual(self.factory.acl_refused, 2)
        self.assertEqual(self.forbidden_target.connections, 0)
        self.assertEqual(first.received + second.received, b"")

    @support.coroutine_test
    async def test_black_listed_client_gets_silence(self) -> None:
        """A client from a black-listed address is closed at accept: no byte back, no target reached."""
        client = await self.request("fine.test", b"GET / HTTP/1.0\r\n\r\n", source="127.0.0.2")
        await support.within(10, client.closed, "the server kept the black-listed client's connection open")
        self.assertEqual(client.received, b"")
        self.assertEqual(self.factory.acl_clients_refused, 1)
        self.assertEqual(self.echo.inbound, [])
        self.assertEqual(len(self.factory.connections), 0)

    @support.coroutine_test
    async def test_udp(self) -> None:
        """UDP: allowed datagrams reach the target; a blocked name, a blocked address and a black-listed client do not."""
        echo_port = self.udp_port.getHost().port
        sent = []

        class Sender(protocol.DatagramProtocol):
            pass

        senders = {}
        for source in ("127.0.0.1", "127.0.0.2"):
            sender = Sender()
            port = reactor.listenUDP(0, sender, interface=source)
            self.addCleanup(port.stopListening)
            senders[source] = port

        def send(host: str, source: str = "127.0.0.1") -> None:
            payload = os.urandom(100)
            sent.append(payload)
            datagram = forged.udp_datagram(METHOD, encode_address(Address(host, echo_port)), payload, reactor.seconds)
            senders[source].write(datagram, ("127.0.0.1", self.port))

        send("www.blocked.test")
        send("resolves-blocked.test")
        send("127.0.0.5")
        send("fine.test", source="127.0.0.2")
        send("fine.test")
        await support.wait_for(lambda: self.udp_echo.count >= 1, 10, lambda: "the allowed datagram did not arrive")
        await support.wait_for(
            lambda: (self.relay.acl_refused, self.relay.acl_clients_refused) == (3, 1), 10,
            lambda: f"refused: {self.relay.acl_refused} targets, {self.relay.acl_clients_refused} clients",
        )
        self.assertEqual(self.udp_echo.count, 1)
        self.assertEqual(self.udp_echo.received, [sent[-1]])
