"""
ssx-local's DNS server end to end: a real ssx-server (twistd child), the
DNS server on a loopback socket, and two upstream DNS servers built with
twisted.names that record what they are asked: names sent direct reach
only the "local" one, proxied names only the "remote" one, through the
server over the UDP relay or, in tcp_only mode, as DNS over TCP.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import protocol, reactor
from twisted.names import dns
from twisted.trial import unittest

from ssx.config import local_config
from ssx.local import dns as local_dns, tap as local_tap
from ssx.net import transparent
from tests import support
from tests.support import PASSWORD, LoopbackCase, coroutine_test
from tests.support.dns_servers import DnsUpstream, RecordingZone, ask, listen_dns

METHOD = "chacha20-ietf-poly1305"
LOCAL_ADDRESS = "192.0.2.1"
REMOTE_ADDRESS = "198.51.100.2"
MARK = 42


def _direct(name: str) -> bool:
    """The tests' routing: names under direct.test go direct, all others through the proxy."""
    return not (name == "direct.test" or name.endswith(".direct.test"))


def _addresses(message: dns.Message) -> list[str]:
    return [rr.payload.dottedQuad() for rr in message.answers if rr.type == dns.A]


class DnsThroughServerTests(LoopbackCase):
    """Each test: the fakes, an ssx-server child and an in-process ssx-local with --dns-listen."""

    def setUp(self) -> None:
        super().setUp()
        self.local_zone = RecordingZone(LOCAL_ADDRESS)
        self.remote_zone = RecordingZone(REMOTE_ADDRESS)
        self.local_dns = self._serve(self.local_zone)
        self.remote_dns = self._serve(self.remote_zone)

    def _serve(self, zone: RecordingZone) -> DnsUpstream:
        upstream = listen_dns(zone)
        for port in upstream.listening:
            self.listen(port)
        return upstream

    async def _server(self, *args: str) -> int:
        port = support.free_port()
        await support.start_twistd(
            self, "-n", "--pidfile=", "ssx-server", "-s", "127.0.0.1", "-p", str(port), "-k", PASSWORD, "-m", METHOD,
            "--shutdown-grace", "0", *args, ready=b"listening on",
        )
        return port

    def _local(self, server_port: int, mode: str, on: Any = reactor, **more: Any) -> tuple[Any, int]:
        values = {
            "password": PASSWORD, "method": METHOD, "server": "127.0.0.1", "server_port": server_port,
            "listen": "tcp:0:interface=127.0.0.1", "mode": mode, "dns_listen": "127.0.0.1:0",
            "dns_local": f"127.0.0.1:{self.local_dns.port}", "dns_remote": f"127.0.0.1:{self.remote_dns.port}",
            **more,
        }
        service = local_tap.build_service(on, local_config(values), should_proxy=_direct)
        service.startService()
        self._services.append(service)
        return service, service.dns_listener.port.getHost().port

    async def _routes(self, mode: str, client_tcp: bool, remote_transport: str) -> None:
        server_port = await self._server("-u", "--forbidden-ip=")
        _, dns_port = self._local(server_port, mode)
        direct = await ask(dns_port, "www.direct.test", tcp=client_tcp)
        self.assertEqual(_addresses(direct), [LOCAL_ADDRESS])
        self.assertEqual(self.local_zone.names, ["www.direct.test"])
        self.assertEqual(self.remote_zone.names, [])
        proxied = await ask(dns_port, "www.proxied.test", tcp=client_tcp)
        self.assertEqual(_addresses(proxied), [REMOTE_ADDRESS])
        self.assertEqual(self.remote_zone.names, ["www.proxied.test"])
        self.assertEqual(self.local_zone.names, ["www.direct.test"])
        self.assertEqual(self.remote_dns.transports, [remote_transport])

    @coroutine_test
    async def test_udp_relay_udp_client(self) -> None:
        """Over UDP to the DNS server, tcp_and_udp: direct names reach only the local fake, proxied ones only the remote, over the UDP relay."""
        await self._routes("tcp_and_udp", client_tcp=False, remote_transport="udp")

    @coroutine_test
    async def test_udp_relay_tcp_client(self) -> None:
        """Over TCP to the DNS server, tcp_and_udp: the same routes, the remote asked over the UDP relay."""
        await self._routes("tcp_and_udp", client_tcp=True, remote_transport="udp")

    @coroutine_test
    async def test_tcp_relay_udp_client(self) -> None:
        """Over UDP to the DNS server, tcp_only: proxied names reach the remote fake as DNS over TCP through the relay."""
        await self._routes("tcp_only", client_tcp=False, remote_transport="tcp")

    @coroutine_test
    async def test_tcp_relay_tcp_client(self) -> None:
        """Over TCP to the DNS server, tcp_only: the same routes, the remote asked over TCP through the relay."""
        await self._routes("tcp_only", client_tcp=True, remote_transport="tcp")

    @coroutine_test
    async def test_proxied_goes_through_the_server(self) -> None:
        """With a server that refuses loopback targets, a proxied name gets SERVFAIL and reaches neither fake."""
        server_port = await self._server("-u")  # loopback forbidden, the default
        service, dns_port = self._local(server_port, "tcp_only")
        service.dns.timeout = 1.0
        answer = await ask(dns_port, "www.proxied.test")
        self.assertEqual(answer.rCode, dns.ESERVER)
        self.assertEqual(self.remote_zone.names, [])
        self.assertEqual(self.local_zone.names, [])

    @coroutine_test
    async def test_negative_answers(self) -> None:
        """A proxied name that does not exist gets NXDOMAIN; one without records gets none, the second time from the cache."""
        server_port = await self._server("-u", "--forbidden-ip=")
        _, dns_port = self._local(server_port, "tcp_and_udp")
        missing = await ask(dns_port, "missing.proxied.test")
        self.assertEqual(missing.rCode, dns.ENAME)
        for _ in range(2):
            nodata = await ask(dns_port, "nodata.proxied.test")
            self.assertEqual((nodata.rCode, nodata.answers), (dns.OK, []))
        self.assertEqual(self.remote_zone.names, ["missing.proxied.test", "nodata.proxied.test"])
        self.assertEqual(self.local_zone.names, [])

    @coroutine_test
    async def test_tcp_clients_bounded(self) -> None:
        """300 TCP clients at once: 256 stay connected, the 44 newest are closed and counted, and UDP still answers."""
        service, dns_port = self._local(support.free_port(), "tcp_only")
        clients = []
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", dns_port))
            self.addCleanup(sock.close)
            sock.setblocking(False)
            clients.append(sock)
        factory = service.dns_listener.factory

        def closed() -> int:
            count = 0
            for sock in clients:
                try:
                    count += sock.recv(1) == b""
                except BlockingIOError:
                    pass
            return count

        await support.wait_for(lambda: service.dns.tcp_refused == 44, 10, "the clients beyond the bound were not refused")
        await support.wait_for(lambda: closed() == 44, 10, "the refused clients were not closed")
        self.assertEqual(len(factory.protocols), 256)
        direct = await ask(dns_port, "www.direct.test")
        self.assertEqual(_addresses(direct), [LOCAL_ADDRESS])
        self.assertEqual(closed(), 44)

    @coroutine_test
    async def test_udp_relay_marked(self) -> None:
        """With --outbound-fwmark, a proxied query's socket to the server carries the mark before it sends."""
        if transparent.mark_problem(MARK) is not None:
            raise unittest.SkipTest("SO_MARK needs CAP_NET_ADMIN")
        server_port = await self._server("-u", "--forbidden-ip=")
        seeing = _MarkSeeingReactor(reactor)
        _, dns_port = self._local(server_port, "tcp_and_udp", on=seeing, outbound_fwmark=MARK)
        proxied = await ask(dns_port, "www.proxied.test")
        self.assertEqual(_addresses(proxied), [REMOTE_ADDRESS])
        self.assertEqual(seeing.marks, [MARK])

    @coroutine_test
    async def test_local_resolvers_marked(self) -> None:
        """With --outbound-fwmark, a direct query's socket to the --dns-local resolver carries the mark before it sends."""
        if transparent.mark_problem(MARK) is not None:
            raise unittest.SkipTest("SO_MARK needs CAP_NET_ADMIN")
        seeing = _MarkSeeingReactor(reactor, watched=(("127.0.0.1", self.local_dns.port),))
        _, dns_port = self._local(support.free_port(), "tcp_only", on=seeing, outbound_fwmark=MARK)
        direct = await ask(dns_port, "www.direct.test")
        self.assertEqual(_addresses(direct), [LOCAL_ADDRESS])
        self.assertEqual(self.local_zone.names, ["www.direct.test"])
        self.assertEqual(seeing.marks, [MARK])

    @coroutine_test
    async def test_local_resolvers_marked_over_tcp(self) -> None:
        """With a mark, the local resolvers' TCP connections (truncated answers asked again) carry it before they connect."""
        if transparent.mark_problem(MARK) is not None:
            raise unittest.SkipTest("SO_MARK needs CAP_NET_ADMIN")
        echo = self.listen(support.listen_echo())
        marks: list[int] = []

        class Noting(protocol.Protocol):
            def connectionMade(self) -> None:
                marks.append(self.transport.getHandle().getsockopt(socket.SOL_SOCKET, transparent.SO_MARK))
                self.transport.loseConnection()

        factory = protocol.ClientFactory.forProtocol(Noting)
        local_dns._MarkedReactor(reactor, MARK).connectTCP("127.0.0.1", echo.getHost().port, factory)
        await support.wait_until(lambda: bool(marks), 5)
        self.assertEqual(marks, [MARK])


class _MarkSeeingReactor:
    """The reactor, noting the SO_MARK of each UDP socket it makes as that socket is connected or first sends to `watched`."""

    def __init__(self, real: Any, watched: tuple[tuple[str, int], ...] = ()) -> None:
        self._real = real
        self.watched = watched
        self.marks: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def listenUDP(self, *args: Any, **kwargs: Any) -> Any:
        port = self._real.listenUDP(*args, **kwargs)
        connect, write = port.connect, port.write
        seen: list[bool] = []

        def note() -> None:
            if not seen:
                seen.append(True)
                self.marks.append(port.socket.getsockopt(socket.SOL_SOCKET, transparent.SO_MARK))

        def connecting(host: str, number: int) -> Any:
            note()
            return connect(host, number)

        def writing(packet: bytes, addr: Any = None) -> Any:
            if addr is not None and tuple(addr) in self.watched:
                note()
            return write(packet, addr)

        port.connect, port.write = connecting, writing
        return port


class DnsOptionTests(unittest.TestCase):
    """`twistd ssx-local --dns-listen` starts the DNS server."""

    @coroutine_test
    async def test_dns_listen_option(self) -> None:
        """twistd ssx-local with --dns-listen/--dns-local/--dns-remote answers a proxied name from the remote fake through ssx-server."""
        await self._dns_listen()

    @coroutine_test
    async def test_dns_follows_the_acl(self) -> None:
        """twistd ssx-local with --acl and --dns-listen: a [bypass_list] name is asked of the local fake, the others through ssx-server, and a SIGHUP's new ACL applies."""
        acl = os.path.abspath(self.mktemp())
        with open(acl, "w") as f:
            f.write("[proxy_all]\n[bypass_list]\n||direct.test\n")
        dns_port, zones, child = await self._dns_listen("--acl", acl)
        answer = await ask(dns_port, "www.direct.test")
        self.assertEqual(_addresses(answer), [LOCAL_ADDRESS])
        self.assertEqual(zones["local"].names, ["www.direct.test"])
        self.assertEqual(zones["remote"].names, ["www.example.test"])
        # The ACL reread at a SIGHUP decides the next query.
        with open(acl, "w") as f:
            f.write("[proxy_all]\n[bypass_list]\n||example.test\n")
        self.assertIn("reload done: acl reread", await support.sighup(child))
        answer = await ask(dns_port, "other.example.test")
        self.assertEqual(_addresses(answer), [LOCAL_ADDRESS])
        self.assertEqual(zones["local"].names, ["www.direct.test", "other.example.test"])
        self.assertEqual(zones["remote"].names, ["www.example.test"])

    async def _dns_listen(self, *extra: str) -> tuple[int, dict[str, RecordingZone], Any]:
        """ssx-server and ssx-local (with `extra`) as twistd children; one proxied name asked and checked."""
        zones = {"local": RecordingZone(LOCAL_ADDRESS), "remote": RecordingZone(REMOTE_ADDRESS)}
        served = {}
        for which, zone in zones.items():
            served[which] = listen_dns(zone)
            for port in served[which].listening:
                self.addCleanup(port.stopListening)
        server_port = support.free_port()
        await support.start_twistd(
            self, "-n", "--pidfile=", "ssx-server", "-s", "127.0.0.1", "-p", str(server_port), "-k", PASSWORD,
            "-m", METHOD, "-u", "--shutdown-grace", "0", "--forbidden-ip=", ready=b"listening on",
        )
        dns_port = support.free_port()
        child = await support.start_twistd(
            self, "-n", "--pidfile=", "ssx-local", "-s", "127.0.0.1", "-p", str(server_port), "-k", PASSWORD,
            "-m", METHOD, "-u", "-l", str(support.free_port()), "--shutdown-grace", "0",
            "--dns-listen", f"127.0.0.1:{dns_port}", "--dns-local", f"127.0.0.1:{served['local'].port}",
            "--dns-remote", f"127.0.0.1:{served['remote'].port}", *extra, ready=b"ssx-local DNS relaying UDP on",
        )
        answer = await ask(dns_port, "www.example.test")
        self.assertEqual(_addresses(answer), [REMOTE_ADDRESS])
        self.assertEqual(zones["remote"].names, ["www.example.test"])
        self.assertEqual(zones["local"].names, [])
        self.assertEqual(served["remote"].transports, ["udp"])
        return dns_port, zones, child
