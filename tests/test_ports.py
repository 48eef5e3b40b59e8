"""
Many ports in one ssx-server: the forms existing deployments have
(`port_password`, a `server_port` list, shadowsocks-rust's `servers`, a
`server` list binding IPv4 and IPv6 apart, `dns_server`), checked as
configuration and then relayed through on real loopback sockets, with
libev's ss-local as the client on one port.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from ssx.config import server_config
from ssx.crypto import generate_psk
from ssx.errors import ConfigError
import ssx.server.tap as server_tap
from tests import support
from tests.support import netns
from tests.support import HashingEchoFactory, whole_echo_transfer

PAYLOAD_SIZE = 200_000


def _error(values: dict[str, Any]) -> ConfigError:
    try:
        server_config(values)
    except ConfigError as e:
        return e
    raise AssertionError(f"no ConfigError for {values!r}")


class PortConfigTests(unittest.SynchronousTestCase):
    """The forms that list several ports, read into one PortConfig each."""

    def test_port_password(self):
        """The original's port_password: one port each, server_port and password ignored with a warning, UDP on."""
        config = server_config({
            "server": "127.0.0.1", "server_port": 8388, "password": "unused", "method": "aes-256-cfb",
            "port_password": {"8381": "foobar1", "8382": "foobar2"},
        })
        self.assertEqual([(p.port, p.password, p.method) for p in config.ports],
                         [(8381, "foobar1", "aes-256-cfb"), (8382, "foobar2", "aes-256-cfb")])
        self.assertEqual([p.label for p in config.ports], ["port_password.8381", "port_password.8382"])
        self.assertIn("server_port and password ignored: port_password is set", config.warnings)
        self.assertTrue(all(p.relays.tcp and p.relays.udp for p in config.ports))
        self.assertEqual(config.port, 8381)

    def test_port_password_mode_kept(self):
        """A mode given beside port_password (or -u/-U) is kept."""
        config = server_config({"mode": "tcp_only", "port_password": {"8381": "a"}})
        self.assertFalse(config.ports[0].relays.udp)

    def test_server_port_list(self):
        """The original's test config: server_port [8384, 8345] shares one password."""
        config = server_config({"server_port": [8384, 8345], "password": "pw"})
        self.assertEqual([(p.port, p.password) for p in config.ports], [(8384, "pw"), (8345, "pw")])
        self.assertTrue(config.ports[1].relays.udp)

    def test_single_port_unchanged(self):
        """One port: one PortConfig, tcp_only by default, as before."""
        config = server_config({"server_port": 8388, "password": "pw"})
        self.assertEqual(len(config.ports), 1)
        self.assertEqual(config.ports[0].label, "")
        self.assertFalse(config.ports[0].relays.udp)
        self.assertFalse(config.ports[0].v6only)

    def test_servers_override_top_level(self):
        """Each servers entry's keys override the top-level ones, which the others keep."""
        psk = generate_psk("2022-blake3-aes-128-gcm")
        config = server_config({
            "method": "aes-128-gcm", "password": "top", "timeout": 100, "mode": "tcp_and_udp",
            "servers": [
                {"server": "127.0.0.1", "server_port": 8001},
                {"server": "127.0.0.1", "server_port": 8002, "password": "two", "method": "chacha20-ietf-poly1305",
                 "timeout": 7, "mode": "tcp_only"},
                {"server_port": 8003, "method": "2022-blake3-aes-128-gcm", "password": psk,
                 "users": [{"name": "u", "password": generate_psk("2022-blake3-aes-128-gcm")}]},
            ],
        })
        first, second, third = config.ports
        self.assertEqual((first.method, first.password, first.timeout, first.relays.udp), ("aes-128-gcm", "top", 100, True))
        self.assertEqual((second.method, second.password, second.timeout, second.relays.udp),
                         ("chacha20-ietf-poly1305", "two", 7, False))
        self.assertEqual((third.method, [name for name, _ in third.users]), ("2022-blake3-aes-128-gcm", ["u"]))

    def test_servers_unknown_key_warned(self):
        """A key ssx does not read in a servers entry is named in a warning."""
        config = server_config({"servers": [{"server_port": 8001, "password": "p", "colour": "blue"}]})
        self.assertIn("servers[0]: keys not used: colour", config.warnings)

    def test_fast_open_per_port(self):
        """fast_open applies to every port; a servers entry may set its own; a bad one is named after its entry."""
        config = server_config({"fast_open": True, "servers": [
            {"server_port": 8001, "password": "p"}, {"server_port": 8002, "password": "p", "fast_open": False}]})
        self.assertEqual([port.fast_open for port in config.ports], [True, False])
        config = server_config({"port_password": {"8001": "a", "8002": "b"}, "fast_open": True})
        self.assertEqual([port.fast_open for port in config.ports], [True, True])
        self.assertEqual([port.fast_open for port in server_config({}).port_configs()], [False])
        with self.assertRaises(ConfigError) as raised:
            server_config({"servers": [{"server_port": 8001, "password": "p", "fast_open": "on"}]})
        self.assertEqual(raised.exception.key, "servers[0].fast_open")

    def test_bad_entries_named(self):
        """A bad entry stops start-up with one line naming the entry and its key."""
        cases = [
            ({"servers": [{"server_port": 1, "password": "p"}, {"server_port": 2, "password": "p", "method": "nope"}]},
             "servers[1].method"),
            ({"servers": [{"server_port": 1}]}, "servers[0].password"),
            ({"servers": [{"password": "p"}]}, "servers[0].server_port"),
            ({"servers": ["8001"]}, "servers[0]"),
            ({"servers": [{"server_port": 1, "password": "p", "mode": "both"}]}, "servers[0].mode"),
            ({"port_password": {"8001": ""}}, "port_password.8001"),
            ({"port_password": {"80x1": "p"}}, "port_password.80x1"),
            ({"port_password": ["8001"]}, "port_password"),
            ({"server_port": [8001, "x"], "password": "p"}, "server_port[1]"),
            ({"server_port": [8001, 8002]}, "password"),
            ({"server_port": [8001, 8001], "password": "p"}, "server_port[1]"),
            ({"server_port": [8001, 8002], "password": "p", "listen": "tcp:1"}, "listen"),
            ({"servers": [], "password": "p"}, "servers"),
        ]
        for values, key in cases:
            error = _error(values)
            self.assertEqual(error.key, key, values)
            self.assertNotIn("\n", str(error))

    def test_bad_entry_one_line_from_twistd(self):
        """Through the command: one line naming the entry, nothing listens."""
        path = self.mktemp()
        with open(path, "w") as f:
            json.dump({"servers": [{"server_port": 8001, "password": "p"},
                                   {"server_port": 8002, "password": "p", "method": "aes-999-gcm"}]}, f)
        with self.assertRaises(SystemExit) as caught:
            server_tap.Options().parseOptions(["-c", path])
        message = str(caught.exception.code)
        self.assertTrue(message.startswith("ssx-server: bad configuration: servers[1].method: "), message)
        self.assertNotIn("\n", message)

    def test_missing_plugin_of_a_later_port(self):
        """A later servers entry's plugin that is not installed stops start-up naming that entry."""
        path = self.mktemp()
        with open(path, "w") as f:
            json.dump({"url_file": "", "servers": [
                {"server_port": 8001, "password": "p"},
                {"server_port": 8002, "password": "p", "plugin": "ssx-no-such-plugin"}]}, f)
        with self.assertRaises(SystemExit) as caught:
            server_tap.Options().parseOptions(["-c", path])
        self.assertTrue(str(caught.exception.code).startswith(
            "ssx-server: bad configuration: servers[1].plugin: 'ssx-no-such-plugin' not found"), caught.exception.code)

    def test_dns_server(self):
        """The original's dns_server, a string or a list, is read as nameserver; nameserver wins over it."""
        self.assertEqual(server_config({"dns_server": "1.1.1.1"}).nameservers, (("1.1.1.1", 53),))
        self.assertEqual(server_config({"dns_server": ["8.8.8.8", "9.9.9.9:5353"]}).nameservers,
                         (("8.8.8.8", 53), ("9.9.9.9", 5353)))
        both = server_config({"dns_server": "1.1.1.1", "nameserver": "8.8.4.4"})
        self.assertEqual(both.nameservers, (("8.8.4.4", 53),))
        self.assertEqual(_error({"dns_server": "not-an-ip"}).key, "dns_server")
        self.assertNotIn("dns_server", server_config({"dns_server": "1.1.1.1"}).ignored)

    def test_repeated_server_flag(self):
        """-s given twice binds both addresses; IPv6 sockets take IPv6 only when IPv4 is bound beside them."""
        options = server_tap.Options()
        options.parseOptions(["-s", "::0", "-s", "0.0.0.0", "-p", "8388", "-k", "pw", "--url-file", ""])
        self.assertEqual(options.config.hosts, ("::0", "0.0.0.0"))
        self.assertTrue(options.config.ports[0].v6only)
        options = server_tap.Options()
        options.parseOptions(["-s", "::", "-k", "pw", "--url-file", ""])
        self.assertFalse(options.config.ports[0].v6only)


class ManyPortsTests(unittest.TestCase):
    """Each form started in trial's reactor and relayed through on every port, TCP and UDP, bytes hashed."""

    def setUp(self) -> None:
        self.echo_factory = HashingEchoFactory()
        self.echo = reactor.listenTCP(0, self.echo_factory, interface="127.0.0.1")
        self.addCleanup(self.echo.stopListening)
        udp_port, self.udp_echo = support.listen_udp_echo()
        self.addCleanup(udp_port.stopListening)
        self.udp_echo_port = udp_port.getHost().port

    def start(self, values: dict[str, Any], count_traffic: bool = False) -> Any:
        values = {"forbidden_ip": "", "url_file": "", "server": "127.0.0.1", **values}
        service = server_tap.build_service(reactor, server_config(values), count_traffic=count_traffic)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    async def through(self, server_port: int, method: str, password: str, udp: bool = True, host: str = "127.0.0.1") -> None:
        """A hashed TCP echo (and UDP echoes) through ssx-local to `server_port`."""
        local, socks_port = support.start_local(
            server_port, method=method, password=password, server=host, mode="tcp_and_udp" if udp else "tcp_only"
        )
        self.addCleanup(local.stopService)
        await self.tcp_echo(socks_port)
        if udp:
            client = support.Socks5UdpClient()
            self.addCleanup(client.close)
            self.assertEqual(await client.open(socks_port), 0)
            payloads = [os.urandom(n) for n in (1, 500, 1400)]
            await client.exchange("127.0.0.1", self.udp_echo_port, payloads)

    async def tcp_echo(self, socks_port: int, size: int = PAYLOAD_SIZE) -> None:
        payload = os.urandom(size)
        before = len(self.echo_factory.inbound)
        reply, received = await whole_echo_transfer(socks_port, "127.0.0.1", self.echo.getHost().port, payload)
        self.assertEqual(reply, 0)
        target = self.echo_factory.inbound[before]
        self.assertEqual(target.digest.hexdigest(), support.sha256(payload))
        self.assertEqual(support.sha256(received), support.sha256(payload))

    def assertServed(self, service: Any, ports: list[int]) -> None:
        """The service's table holds each port, each with its own factory, and each relayed a connection."""
        self.assertEqual(sorted(service.ports), sorted(ports))
        factories = [service.ports[p].factory for p in ports]
        self.assertEqual(len(set(map(id, factories))), len(ports))
        self.assertEqual(service.factories, factories)

    async def _port_password(self) -> None:
        ports = [support.free_port(), support.free_port()]
        # As the original's example: no mode, a method beside port_password.
        service = self.start({"method": "aes-256-cfb", "port_password": {str(ports[0]): "foobar1", str(ports[1]): "foobar2"}})
        self.assertServed(service, ports)
        await self.through(ports[0], "aes-256-cfb", "foobar1")
        await self.through(ports[1], "aes-256-cfb", "foobar2")
        # A password of the other port is not taken.
        self.assertEqual(service.ports[ports[0]].factory.handshake_failures, 0)

    def test_port_password(self):
        """A port_password file with two ports relays TCP and UDP on both, each with its own password."""
        return defer.Deferred.fromCoroutine(self._port_password())

    async def _server_port_list(self) -> None:
        ports = [support.free_port(), support.free_port()]
        service = self.start({"server_port": ports, "password": "foobar", "method": "aes-128-gcm"})
        self.assertServed(service, ports)
        for port in ports:
            await self.through(port, "aes-128-gcm", "foobar")

    def test_server_port_list(self):
        """server_port [a, b] (the original's test config) relays on both ports with the shared password."""
        return defer.Deferred.fromCoroutine(self._server_port_list())

    async def _servers(self) -> None:
        ports = [support.free_port() for _ in range(3)]
        psk = generate_psk("2022-blake3-aes-256-gcm")
        service = self.start({"mode": "tcp_and_udp", "servers": [
            {"server_port": ports[0], "password": "one", "method": "aes-256-gcm"},
            {"server_port": ports[1], "password": "two", "method": "chacha20-ietf-poly1305", "mode": "tcp_only"},
            {"server_port": ports[2], "password": psk, "method": "2022-blake3-aes-256-gcm"},
        ]})
        self.assertServed(service, ports)
        await self.through(ports[0], "aes-256-gcm", "one")
        await self.through(ports[1], "chacha20-ietf-poly1305", "two", udp=False)
        self.assertEqual(service.ports[ports[1]].udp_relays, [])
        await self.through(ports[2], "2022-blake3-aes-256-gcm", psk)
        # The libev client on the first port.
        if shutil.which("ss-local") is None:
            raise unittest.SkipTest("ss-local (shadowsocks-libev) is not installed")
        socks_port = support.free_port()
        child = support.spawn("ss-local", [
            "-s", "127.0.0.1", "-p", str(ports[0]), "-b", "127.0.0.1", "-l", str(socks_port),
            "-k", "one", "-m", "aes-256-gcm", "-v",
        ])
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
        await support.wait_for_port(socks_port)
        await self.tcp_echo(socks_port)
        self.assertEqual(sum(f.handshake_failures for f in service.factories), 0, child.text())

    def test_servers_list(self):
        """A rust-style servers list, a method per port, relays on each (libev's ss-local on one of them)."""
        return defer.Deferred.fromCoroutine(self._servers())

    async def _traffic(self) -> None:
        ports = [support.free_port(), support.free_port()]
        service = self.start({"server_port": ports, "password": "pw", "method": "aes-128-gcm", "mode": "tcp_only"},
                             count_traffic=True)
        for port, size in zip(ports, (100_000, 30_000)):
            local, socks_port = support.start_local(port, method="aes-128-gcm", password="pw")
            self.addCleanup(local.stopService)
            await self.tcp_echo(socks_port, size)
        await support.drained(service)
        # The encrypted bytes: the payload plus a salt, an address header and
        # 34 bytes per AEAD chunk of at most 16383.
        for port, size in zip(ports, (100_000, 30_000)):
            traffic = service.ports[port].traffic
            self.assertTrue(size + 16 + 34 < traffic.down < size * 1.02 + 100, traffic.down)
            self.assertTrue(size + 16 + 34 + 7 < traffic.up < size * 1.02 + 100, traffic.up)
        # Off unless asked: single-user ports relay bare.
        self.assertIsNone(self.start({"server_port": 0, "password": "pw"}).ports[0].traffic)

    def test_traffic_per_port(self):
        """Asked to, each port counts the encrypted bytes it relays, up and down, as peers count them."""
        return defer.Deferred.fromCoroutine(self._traffic())

    async def _remove(self) -> None:
        ports = [support.free_port(), support.free_port()]
        service = self.start({"server_port": ports, "password": "pw", "method": "aes-128-gcm"})
        local, socks_port = support.start_local(ports[0], method="aes-128-gcm", password="pw")
        self.addCleanup(local.stopService)
        # A relay held open on the port to be removed.
        client = support.SocksClient("127.0.0.1", self.echo.getHost().port, b"x")
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", socks_port), client)
        await support.within(5, client.echoed, "no echo through the port to be removed")
        self.assertEqual(len(service.ports[ports[0]].factory.connections), 1)
        removed = service.remove_port(ports[0], grace=1.0)
        # The running relay goes on within the grace.
        client.send(b"more")
        await support.wait_until(lambda: bytes(client.received) == b"xmore", 5)
        self.assertEqual(bytes(client.received), b"xmore")
        self.assertFalse(client.closed.called)
        await removed
        self.assertEqual(list(service.ports), [ports[1]])
        self.assertEqual(len(service.factories), 1)
        self.assertEqual([l.port.getHost().port for l in service.listeners], [ports[1]])
        self.assertEqual([d.port.getHost().port for d in service.datagram_listeners], [ports[1]])
        # Past the grace the relay is aborted; ssx-local then closes the client's connection.
        await support.within(5, client.closed, "the relay on the removed port was not ended")
        with socket.socket() as probe:
            self.assertNotEqual(probe.connect_ex(("127.0.0.1", ports[0])), 0)
        await self.through(ports[1], "aes-128-gcm", "pw")

    def test_remove_port(self):
        """A port removed at run time stops listening, its relays go on for the grace then end; the other ports go on."""
        return defer.Deferred.fromCoroutine(self._remove())

    async def _dual_stack(self) -> None:
        if not support.ipv6_loopback():
            raise unittest.SkipTest("no IPv6 loopback")
        port = support.free_port(socket.AF_INET6, both_families=True)
        service = self.start({"server": ["::1", "127.0.0.1"], "server_port": port, "password": "pw",
                              "method": "aes-128-gcm", "mode": "tcp_and_udp"})
        self.assertEqual(len(service.listeners), 2)
        self.assertEqual(len(service.datagram_listeners), 2)
        for sockets in ([l.port.socket for l in service.listeners], [d.port.socket for d in service.datagram_listeners]):
            six = [s for s in sockets if s.family == socket.AF_INET6]
            self.assertEqual(len(six), 1)
            self.assertEqual(six[0].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY), 1)
        await self.through(port, "aes-128-gcm", "pw", host="::1")
        await self.through(port, "aes-128-gcm", "pw", host="127.0.0.1")

    def test_dual_stack(self):
        """server ["::1", "127.0.0.1"] binds both on one port, TCP and UDP, the IPv6 sockets IPV6_V6ONLY."""
        return defer.Deferred.fromCoroutine(self._dual_stack())

    def test_v6only_asked_of_the_sockets(self):
        """With both families each listener asks for IPV6_V6ONLY; with one family none does."""
        port = support.free_port(socket.AF_INET6, both_families=True) if support.ipv6_loopback() else 0
        service = self.start({"server": ["::1", "127.0.0.1"], "server_port": port,
                              "password": "pw", "mode": "tcp_and_udp"}) if support.ipv6_loopback() else None
        if service is None:
            raise unittest.SkipTest("no IPv6 loopback")
        self.assertEqual([l.endpoint.v6only for l in service.listeners], [True, True])
        self.assertEqual([d.v6only for d in service.datagram_listeners], [True, True])
        single = self.start({"server": "::1", "server_port": 0, "password": "pw", "mode": "tcp_and_udp"})
        self.assertEqual([l.endpoint.v6only for l in single.listeners], [False])
        self.assertEqual([d.v6only for d in single.datagram_listeners], [False])


class V6OnlySocketTests(unittest.SynchronousTestCase):
    """
    IPV6_V6ONLY on the listening sockets themselves, before they bind (Linux
    sets it by itself when a socket binds a specific IPv6 address such as
    ::1, so only the wildcard, which tests do not bind, needs it).
    """

    def test_tcp(self):
        """ssx's TCP port sets IPV6_V6ONLY on an IPv6 socket when asked, and leaves it alone otherwise."""
        from twisted.internet.protocol import Factory
        from ssx.net.tcp import Port

        for v6only, expected in ((True, 1), (False, _system_default())):
            port = Port(0, Factory(), 50, "::", reactor)
            port.v6only = v6only
            sock = port.createInternetSocket()
            self.addCleanup(sock.close)
            self.assertEqual(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY), expected)
        four = Port(0, Factory(), 50, "0.0.0.0", reactor)
        four.v6only = True
        sock = four.createInternetSocket()
        self.addCleanup(sock.close)
        self.assertEqual(sock.family, socket.AF_INET)

    def test_udp(self):
        """The UDP port of a dual-stack server sets IPV6_V6ONLY on its IPv6 socket."""
        from twisted.internet.protocol import DatagramProtocol
        from ssx.net.listener import _V6OnlyUdpPort

        port = _V6OnlyUdpPort(0, DatagramProtocol(), "::", 65535, reactor)
        sock = port.createInternetSocket()
        self.addCleanup(sock.close)
        self.assertEqual(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY), 1)


def _system_default() -> int:
    with open("/proc/sys/net/ipv6/bindv6only") as f:
        return int(f.read())


class WildcardDualStackTests(unittest.TestCase):
    """
    libev's dual-stack form, ``"server": ["::0", "0.0.0.0"]``, with a real
    ssx-server (twistd) in a network namespace of its own (loopback only,
    removed afterwards), since the wildcards bind every address.  Without
    IPV6_V6ONLY the IPv6 socket takes the IPv4 port too and the second bind
    fails with "address already in use".  Needs root and `ip netns`.
    """

    timeout = 60

    def setUp(self) -> None:
        self.name = netns.new_namespace(self, "ssx-ports")

    async def _wildcards(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = os.path.join(directory, "config.json")
        with open(config, "w") as f:
            json.dump({"server": ["::0", "0.0.0.0"], "server_port": 8388, "password": "pw",
                       "method": "aes-256-gcm", "mode": "tcp_and_udp", "url_file": ""}, f)
        child = support.ChildProcess()
        command = ["ip", "netns", "exec", self.name, sys.executable, *support.TWISTD, "-n", "--pidfile=",
                   "ssx-server", "-c", config]
        reactor.spawnProcess(child, shutil.which("ip"), command, env=support.twistd_env(), path=directory)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
        wanted = ["listening on [::]:8388", "listening on 0.0.0.0:8388",
                  "relaying UDP on [::]:8388", "relaying UDP on 0.0.0.0:8388"]
        await support.wait_until(lambda: all(w in child.text() for w in wanted) or child.ended.called, 15)
        for line in wanted:
            self.assertIn(line, child.text())
        self.assertFalse(child.ended.called, child.text())

    def test_wildcards_bind_side_by_side(self):
        """["::0", "0.0.0.0"] on one port starts, TCP and UDP on both, as libev's ss-server does."""
        return defer.Deferred.fromCoroutine(self._wildcards())



class UrlEntryTests(unittest.SynchronousTestCase):
    """`python -m ssx url -c` on a server's config with several ports."""

    def test_port_password_urls(self):
        """A port_password file gives one URL entry per port, each with its password."""
        from ssx.config.upstreams import config_entries

        entries = config_entries({"server": "0.0.0.0", "method": "aes-256-gcm",
                                  "port_password": {"8381": "foobar1", "8382": "foobar2"}})
        self.assertEqual([(e.port, e.password, e.method) for e in entries],
                         [(8381, "foobar1", "aes-256-gcm"), (8382, "foobar2", "aes-256-gcm")])
        entries = config_entries({"server_port": [8384, 8345], "password": "pw"})
        self.assertEqual([(e.port, e.password) for e in entries], [(8384, "pw"), (8345, "pw")])
