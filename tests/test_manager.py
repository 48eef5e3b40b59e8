"""
The manager API (`--manager-address`): the text protocol on its own, and
a running ssx-server driven by a client written from the spec (a plain
datagram socket sending text), with ssx-local relaying through the ports
it adds.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial import unittest

from ssx.config import server_config
from ssx.errors import ConfigError
from ssx.wire.manager import ManagerRequestError, parse_request, stat_reports
import ssx.server.tap as server_tap
from tests import support
from tests.support import HashingEchoFactory, ManagerClient, whole_echo_transfer


class TextProtocolTests(unittest.SynchronousTestCase):
    def test_requests(self):
        """`COMMAND` and `COMMAND: JSON` parse; the port may be a number or a numeric string."""
        self.assertEqual(parse_request(b"ping").command, "ping")
        self.assertEqual(parse_request(b"list\n").command, "list")
        self.assertEqual(parse_request(b'add: {"server_port": 8001, "password": "p"}').port(), 8001)
        self.assertEqual(parse_request(b'remove: {"server_port": "8001"}').port(), 8001)

    def test_bad_requests(self):
        """Bad JSON, unknown commands, a missing or bad port each raise with a one-line message."""
        for data in (b"add: {bad", b"bogus", b'add: ["x"]', b"remove", b"\xff\xfe", b"stat: {}"):
            with self.assertRaises(ManagerRequestError, msg=data):
                parse_request(data)
        for data in (b'remove: {}', b'remove: {"server_port": 0}', b'remove: {"server_port": "x"}',
                     'remove: {"server_port": "\u00b2"}'.encode(), b'remove: {"server_port": "' + b"9" * 5000 + b'"}'):
            with self.assertRaises(ManagerRequestError, msg=data):
                parse_request(data).port()
        # json.loads raises RecursionError (not a ValueError) for deep nesting.
        with self.assertRaises(ManagerRequestError):
            parse_request(b"add: " + b"[" * 5000)

    def test_stat_reports_at_most_50_ports(self):
        """The periodic report splits 120 ports into datagrams of 50, 50 and 20, ports as strings."""
        reports = stat_reports({8000 + i: i for i in range(120)})
        tables = [json.loads(r[len(b"stat: "):]) for r in reports]
        self.assertEqual([len(t) for t in tables], [50, 50, 20])
        self.assertEqual(tables[2]["8119"], 119)
        self.assertEqual(stat_reports({}), [])


class AddressTests(unittest.TestCase):
    def test_non_loopback_refused(self):
        """A non-loopback manager_address stops start-up naming the key, unless allowed explicitly."""
        with self.assertRaises(ConfigError) as caught:
            server_config({"password": "p", "manager_address": "0.0.0.0:6001"})
        self.assertEqual(caught.exception.key, "manager_address")
        allowed = server_config({"password": "p", "manager_address": "0.0.0.0:6001", "manager_allow_remote": True})
        self.assertEqual((allowed.manager.host, allowed.manager.port), ("0.0.0.0", 6001))
        self.assertEqual(server_config({"password": "p", "manager_address": "[::1]:6001"}).manager.host, "::1")
        self.assertEqual(server_config({"password": "p", "manager_address": "/run/ssx.sock"}).manager.path, "/run/ssx.sock")

    def test_non_loopback_one_line_from_twistd(self):
        """Through the command: one line naming manager_address; --manager-allow-remote lets it through."""
        with self.assertRaises(SystemExit) as caught:
            server_tap.Options().parseOptions(["-k", "p", "--url-file", "", "--manager-address", "192.0.2.1:6001"])
        message = str(caught.exception.code)
        self.assertTrue(message.startswith("ssx-server: bad configuration: manager_address: "), message)
        self.assertNotIn("\n", message)
        options = server_tap.Options()
        options.parseOptions(["-k", "p", "--url-file", "", "--manager-address", "192.0.2.1:6001", "--manager-allow-remote"])
        self.assertEqual(options.config.manager.host, "192.0.2.1")


def stat_table(reply: bytes) -> dict[str, int]:
    assert reply.startswith(b"stat: "), reply
    return json.loads(reply[len(b"stat: "):])


class ManagerTests(unittest.TestCase):
    """A running ssx-server with a manager, driven over loopback."""

    def setUp(self) -> None:
        self.echo_factory = HashingEchoFactory()
        self.echo = reactor.listenTCP(0, self.echo_factory, interface="127.0.0.1")
        self.addCleanup(self.echo.stopListening)
        udp_port, _ = support.listen_udp_echo()
        self.addCleanup(udp_port.stopListening)
        self.udp_echo_port = udp_port.getHost().port

    def start(self, manager_address: str, interval: float | None = None) -> tuple[Any, int]:
        configured = support.free_port()
        service = server_tap.build_service(reactor, server_config({
            "server": "127.0.0.1", "server_port": configured, "password": "first", "method": "aes-128-gcm",
            "forbidden_ip": "", "url_file": "", "manager_address": manager_address, "shutdown_grace": 1,
        }))
        if interval is not None:
            service.manager.interval = interval
        service.startService()
        self.addCleanup(service.stopService)
        return service, configured

    def client(self, *args: Any) -> ManagerClient:
        client = ManagerClient(*args)
        self.addCleanup(client.sock.close)
        return client

    async def _round_trip(self) -> None:
        manager = ("127.0.0.1", support.free_port())
        service, configured = self.start(f"127.0.0.1:{manager[1]}")
        client = self.client()
        port = support.free_port()
        add = {"server_port": port, "password": "added", "method": "chacha20-ietf-poly1305", "mode": "tcp_and_udp"}
        self.assertEqual(await client.ask(manager, b"add: " + json.dumps(add).encode()), b"ok")
        listed = json.loads(await client.ask(manager, b"list"))
        self.assertIn({"server_port": str(port), "password": "added", "method": "chacha20-ietf-poly1305"}, listed)
        self.assertIn({"server_port": str(configured), "password": "first", "method": "aes-128-gcm"}, listed)
        # Relay through the added port: TCP hashed, and UDP.
        local, socks_port = support.start_local(port, method="chacha20-ietf-poly1305", password="added",
                                                mode="tcp_and_udp")
        self.addCleanup(local.stopService)
        payload = os.urandom(200_000)
        reply, received = await whole_echo_transfer(socks_port, "127.0.0.1", self.echo.getHost().port, payload)
        self.assertEqual(reply, 0)
        self.assertEqual(support.sha256(received), support.sha256(payload))
        udp = support.Socks5UdpClient()
        self.addCleanup(udp.close)
        self.assertEqual(await udp.open(socks_port), 0)
        await udp.exchange("127.0.0.1", self.udp_echo_port, [os.urandom(1000)])
        await support.drained(service)
        table = stat_table(await client.ask(manager, b"ping"))
        # Both directions, encrypted: more than the payload twice, and the UDP datagrams.
        self.assertGreater(table[str(port)], 2 * 200_000 + 2 * 1000)
        self.assertLess(table[str(port)], 2 * 200_000 * 1.02 + 2 * 1100 + 200)
        self.assertEqual(table[str(configured)], 0)
        # Removed: new connections refused, the configured port goes on.
        self.assertEqual(await client.ask(manager, b'remove: {"server_port": %d}' % port), b"ok")
        await support.wait_until(lambda: port not in service.ports, 5)
        with socket.socket() as probe:
            self.assertNotEqual(probe.connect_ex(("127.0.0.1", port)), 0)
        self.assertNotIn(str(port), stat_table(await client.ask(manager, b"ping")))

    @support.coroutine_test
    async def test_reply_larger_than_a_datagram(self):
        """A `list` that cannot fit one datagram gets an error reply; the manager goes on answering."""
        manager = ("127.0.0.1", support.free_port())
        self.start(f"127.0.0.1:{manager[1]}")
        client = self.client()
        for _ in range(9):
            add = {"server_port": support.free_port(), "password": "p" * 7900, "mode": "tcp_only"}
            self.assertEqual(await client.ask(manager, b"add: " + json.dumps(add).encode()), b"ok")
        self.assertTrue((await client.ask(manager, b"list")).startswith(b"err: "))
        self.assertTrue((await client.ask(manager, b"ping")).startswith(b"stat: "))

    @support.coroutine_test
    async def test_add_relay_stat_list_remove(self):
        """add starts a port that relays TCP and UDP; ping and list show it; remove stops it accepting."""
        await self._round_trip()

    @support.coroutine_test
    async def test_list_port_of_access_keys(self):
        """`list` shows a port of access keys with an empty password string and its key ids, no key's secret."""
        manager = ("127.0.0.1", support.free_port())
        keyed = support.free_port()
        service = server_tap.build_service(reactor, server_config({
            "server": "127.0.0.1", "forbidden_ip": "", "url_file": "", "manager_address": f"127.0.0.1:{manager[1]}",
            "shutdown_grace": 1, "mode": "tcp_only", "servers": [{"server_port": keyed, "keys": [
                {"id": "alice", "cipher": "aes-128-gcm", "secret": "alice's secret"},
                {"id": "bob", "cipher": "chacha20-ietf-poly1305", "secret": "bob's secret"},
            ]}],
        }))
        service.startService()
        self.addCleanup(service.stopService)
        reply = await self.client().ask(manager, b"list")
        self.assertNotIn(b"secret", reply)
        self.assertEqual(json.loads(reply), [
            {"server_port": str(keyed), "password": "", "method": "aes-128-gcm", "keys": ["alice", "bob"]},
        ])

    @support.coroutine_test
    async def test_bad_requests(self):
        """Bad JSON, unknown commands, a port in use or absent, no password: one err line each, nothing changes."""
        manager = ("127.0.0.1", support.free_port())
        service, configured = self.start(f"127.0.0.1:{manager[1]}")
        client = self.client()
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        # UDP taken, TCP free: the TCP listener the port started is closed again.
        udp_taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(udp_taken.close)
        udp_taken.bind(("127.0.0.1", support.free_port()))
        half = udp_taken.getsockname()[1]
        free = support.free_port()
        bad = [
            b"add: {bad json",
            b"bogus",
            b'add: {"server_port": %d, "password": "x"}' % configured,
            b'add: {"server_port": %d, "password": "x"}' % taken.getsockname()[1],
            b'add: {"server_port": %d}' % free,
            b'add: {"server_port": %d, "password": "x", "method": "aes-999-gcm"}' % free,
            b'remove: {"server_port": %d}' % free,
            b'add: {"server_port": %d, "password": "x", "mode": "tcp_and_udp"}' % half,
        ]
        replies = []
        for request in bad:
            reply = await client.ask(manager, request)
            self.assertTrue(reply.startswith(b"err: "), (request, reply))
            self.assertNotIn(b"\n", reply)
            replies.append(reply)
        self.assertIn(b"already served", replies[2])
        self.assertIn(b"unavailable", replies[3])
        self.assertIn(b"password", replies[4])
        self.assertIn(b"UDP", replies[7])
        with socket.socket() as probe:
            self.assertNotEqual(probe.connect_ex(("127.0.0.1", half)), 0)
        self.assertEqual(sorted(service.ports), [configured])
        self.assertEqual(len(service.listeners), 1)
        # Still serving: the manager and the configured port.
        self.assertEqual(stat_table(await client.ask(manager, b"ping")), {str(configured): 0})
        local, socks_port = support.start_local(configured, method="aes-128-gcm", password="first")
        self.addCleanup(local.stopService)
        payload = os.urandom(10_000)
        reply, received = await whole_echo_transfer(socks_port, "127.0.0.1", self.echo.getHost().port, payload)
        self.assertEqual(support.sha256(received), support.sha256(payload))

    @support.coroutine_test
    async def test_unix_socket_and_periodic_report(self):
        """On a Unix datagram socket: add answers ok, and the last sender gets the periodic stat: report."""
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "manager.sock")
        service, configured = self.start(path, interval=0.2)
        client = self.client(socket.AF_UNIX, os.path.join(directory, "client.sock"))
        port = support.free_port()
        self.assertEqual(await client.ask(path, b'add: {"server_port": %d, "password": "u"}' % port), b"ok")
        local, socks_port = support.start_local(port, method=service.ports[port].config.method, password="u")
        self.addCleanup(local.stopService)
        payload = os.urandom(5_000)
        await whole_echo_transfer(socks_port, "127.0.0.1", self.echo.getHost().port, payload)
        await support.drained(service)
        # Reports carry the bytes since the last one, only for ports that moved any.
        reported = 0
        while reported <= 2 * 5_000:
            table = stat_table(await client.next())
            self.assertNotIn(str(configured), table)
            reported += table.get(str(port), 0)
        self.assertLess(reported, 2 * 5_000 + 500)

    @support.coroutine_test
    async def test_libev_client_on_an_added_port(self):
        """libev's ss-local relays through a port added by the API, and its bytes show in ping's table."""
        reason = support.skip_without("ss-local", package="shadowsocks-libev")
        if reason:
            raise unittest.SkipTest(reason)
        manager = ("127.0.0.1", support.free_port())
        service, _ = self.start(f"127.0.0.1:{manager[1]}")
        client = self.client()
        port = support.free_port()
        self.assertEqual(await client.ask(manager, b'add: {"server_port": "%d", "password": "lib", '
                                                   b'"method": "aes-256-gcm"}' % port), b"ok")
        socks_port = support.free_port()
        child = support.spawn("ss-local", [
            "-s", "127.0.0.1", "-p", str(port), "-b", "127.0.0.1", "-l", str(socks_port), "-k", "lib", "-m", "aes-256-gcm",
        ])
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
        await support.wait_for_port(socks_port)
        payload = os.urandom(50_000)
        reply, received = await whole_echo_transfer(socks_port, "127.0.0.1", self.echo.getHost().port, payload)
        self.assertEqual(support.sha256(received), support.sha256(payload), child.text())
        await support.drained(service)
        self.assertGreater(stat_table(await client.ask(manager, b"ping"))[str(port)], 2 * 50_000)
