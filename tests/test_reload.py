"""
Live reload (SIGHUP) of real `twistd ssx-server` and `twistd ssx-local`
processes: the config file rewritten, SIGHUP sent to the child, and the
line that ends the reload waited for; clients relay through ssx-local or
to ssx-server started in the test's reactor, every transfer checked byte
for byte at both ends.
"""

from __future__ import annotations

import base64
import json
import os
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from ssx.crypto import Suite2022
from ssx.wire.address import Address
from tests import support
from tests.support import HashingEchoFactory, ManagerClient, RawClient, SocksClient

METHOD = "aes-128-gcm"
METHOD_2022 = "2022-blake3-aes-256-gcm"
# A relay must outlive a reload by a margin a loaded machine keeps.
GRACE = 60


class _ReloadCase(unittest.TestCase):
    """An echo target that hashes what reaches it, and a config file to rewrite."""

    def setUp(self) -> None:
        self.echo_factory = HashingEchoFactory()
        self.echo = reactor.listenTCP(0, self.echo_factory, interface="127.0.0.1")
        self.addCleanup(self.echo.stopListening)
        self.echo_port = self.echo.getHost().port
        self.path = os.path.abspath(self.mktemp())

    def write(self, values: Any) -> None:
        with open(self.path, "w") as f:
            f.write(values if isinstance(values, str) else json.dumps(values))

    def local(self, server_port: int, password: str) -> int:
        """An ssx-local in this reactor aimed at `server_port` with `password`; returns its SOCKS port."""
        service, port = support.start_local(server_port, password=password, method=METHOD)
        self.addCleanup(service.stopService)
        return port

    async def held(self, socks_port: int, first: bytes) -> SocksClient:
        """A relay to the echo target through `socks_port`, held open after `first` came back."""
        client = SocksClient("127.0.0.1", self.echo_port)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", socks_port), client)
        self.addCleanup(lambda: client.transport.abortConnection() if not client.closed.called else None)
        self.assertEqual(await client.replied, 0)
        client.send(first)
        await support.wait_for(lambda: client.count >= len(first) or client.closed.called, 10, "no echo")
        return client

    async def finish(self, client: SocksClient, first: bytes, rest: bytes) -> None:
        """Send `rest` on a held relay and check that all of `first + rest` went there and back byte for byte."""
        whole = first + rest
        client.send(rest)
        await support.wait_for(lambda: client.count >= len(whole) or client.closed.called, 20,
                               lambda: f"relay ended after {client.count} of {len(whole)} bytes")
        self.assertEqual(client.digest.hexdigest(), support.sha256(whole))
        self.assertIn(support.sha256(whole), [echo.digest.hexdigest() for echo in self.echo_factory.inbound])

    async def transfer(self, socks_port: int, size: int = 300_000) -> None:
        """A new connection through `socks_port` relays `size` random bytes there and back, byte for byte."""
        payload = os.urandom(size)
        reply, received = await support.whole_echo_transfer(socks_port, "127.0.0.1", self.echo_port, payload)
        self.assertEqual(reply, 0)
        self.assertEqual(support.sha256(received), support.sha256(payload))

    async def silence(self, socks_port: int) -> None:
        """A new connection through `socks_port` gets no byte back: the server reads, says nothing, closes at its timeout."""
        client = SocksClient("127.0.0.1", self.echo_port, payload=os.urandom(1000))
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", socks_port), client)
        await support.within(20, client.closed, "the server did not close a connection with a wrong key")
        self.assertEqual(client.count, 0)


class ServerReloadTests(_ReloadCase):
    """`twistd ssx-server -c FILE`, reloaded."""

    async def server(self, ports: dict[int, str], **values: Any) -> support.ChildProcess:
        self.write(self.ports_file(ports, **values))
        return await support.start_twistd(self, "-n", "--pidfile=", "ssx-server", "-c", self.path, ready=b"clients connect to")

    @staticmethod
    def ports_file(ports: dict[int, str], **values: Any) -> dict[str, Any]:
        return {
            "server": "127.0.0.1", "method": METHOD, "forbidden_ip": "", "url_file": "", "shutdown_grace": GRACE,
            # A wrong key's connection is closed (silently) this soon.
            "handshake_timeout": 2,
            "servers": [{"server_port": port, "password": password} for port, password in ports.items()],
            **values,
        }

    @support.coroutine_test
    async def test_port_added_and_port_removed(self):
        """A port added relays for new clients; a removed port's running relay finishes byte for byte, new connections are refused."""
        kept, removed, added = support.free_port(), support.free_port(), support.free_port()
        child = await self.server({kept: "kept", removed: "removed"})
        first, rest = os.urandom(100_000), os.urandom(200_000)
        running = await self.held(self.local(removed, "removed"), first)

        self.write(self.ports_file({kept: "kept", added: "added"}))
        line = await support.sighup(child)
        self.assertIn(f"port {removed} removed", line)
        self.assertIn(f"port {added} added", line)
        self.assertNotIn(str(kept), line)

        await self.finish(running, first, rest)
        await self.transfer(self.local(added, "added"))
        await self.transfer(self.local(kept, "kept"))
        with socket.socket() as probe:
            self.assertNotEqual(probe.connect_ex(("127.0.0.1", removed)), 0)

    @support.coroutine_test
    async def test_changed_password(self):
        """After a new password, old-password clients get silence, new-password ones relay, and a relay started before goes on."""
        port = support.free_port()
        child = await self.server({port: "old-secret"})
        first, rest = os.urandom(100_000), os.urandom(200_000)
        running = await self.held(self.local(port, "old-secret"), first)

        self.write(self.ports_file({port: "new-secret"}))
        line = await support.sighup(child)
        self.assertIn(f"port {port}: password", line)

        await self.finish(running, first, rest)
        await self.transfer(self.local(port, "new-secret"))
        await self.silence(self.local(port, "old-secret"))
        # The log names what changed, never the secret.
        self.assertNotIn("secret", child.text())

    @support.coroutine_test
    async def test_mode_change_restarts_the_port(self):
        """A port whose mode changed is restarted on its number: its running relay finishes byte for byte, new clients relay."""
        port = support.free_port()
        child = await self.server({port: "same"})
        first, rest = os.urandom(100_000), os.urandom(200_000)
        socks_port = self.local(port, "same")
        running = await self.held(socks_port, first)

        self.write(self.ports_file({port: "same"}, mode="tcp_and_udp"))
        line = await support.sighup(child)
        self.assertIn(f"port {port} restarted: mode", line)

        await self.finish(running, first, rest)
        await self.transfer(socks_port)

    async def replayed(self, port: int, request: bytes) -> bool:
        """Whether `request`, sent as a new connection's first bytes to `port`, reached the echo target."""
        before = len(self.echo_factory.inbound)
        client = RawClient(request)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        self.addCleanup(lambda: client.transport.abortConnection() if not client.closed.called else None)
        # Accepted: the echo answers; refused: silence until the handshake timeout closes it.
        await support.wait_for(lambda: client.received or client.closed.called, 20, "neither an echo nor a close")
        client.transport.loseConnection()
        await client.closed
        return len(self.echo_factory.inbound) > before

    @support.coroutine_test
    async def test_2022_replay_refused_after_reload(self):
        """A 2022 request captured before a reload, replayed after a rekey in place and after a restart of its port, is refused."""
        port = support.free_port()
        psk = base64.b64encode(os.urandom(32)).decode()
        values = {"method": METHOD_2022}
        child = await self.server({port: psk}, **values)
        suite = Suite2022(METHOD_2022, psk)
        request = suite.client_codec().first(Address("127.0.0.1", self.echo_port), os.urandom(100))
        self.assertTrue(await self.replayed(port, request))
        self.assertFalse(await self.replayed(port, request))

        self.write(self.ports_file({port: psk}, timeout=120, **values))
        line = await support.sighup(child)
        self.assertIn(f"port {port}: timeout", line)
        self.assertFalse(await self.replayed(port, request))

        self.write(self.ports_file({port: psk}, timeout=120, mode="tcp_and_udp", **values))
        line = await support.sighup(child)
        self.assertIn(f"port {port} restarted: mode", line)
        self.assertFalse(await self.replayed(port, request))

    @support.coroutine_test
    async def test_key_limit_holds_across_a_port_restart(self):
        """A key at its max_connections stays at it when a reload restarts its port: a second connection gets silence, the first finishes."""
        port = support.free_port()
        keys = {
            "server": "127.0.0.1", "forbidden_ip": "", "url_file": "", "shutdown_grace": GRACE, "handshake_timeout": 2,
            "keys": [{"id": "alice", "port": port, "cipher": METHOD, "secret": "alice", "max_connections": 1}],
        }
        self.write(keys)
        child = await support.start_twistd(self, "-n", "--pidfile=", "ssx-server", "-c", self.path, ready=b"no ss:// URL")
        first, rest = os.urandom(100_000), os.urandom(200_000)
        socks_port = self.local(port, "alice")
        running = await self.held(socks_port, first)

        self.write({**keys, "mode": "tcp_only"})
        line = await support.sighup(child)
        self.assertIn(f"port {port} restarted: mode", line)
        await self.silence(socks_port)
        await self.finish(running, first, rest)

    @support.coroutine_test
    async def test_old_key_relay_ends_after_the_grace(self):
        """A relay whose password was changed away is closed once the shutdown grace has passed, not before the reload."""
        port = support.free_port()
        child = await self.server({port: "old"}, shutdown_grace=3)
        running = await self.held(self.local(port, "old"), os.urandom(1000))

        self.write(self.ports_file({port: "new"}, shutdown_grace=3))
        await support.sighup(child)
        self.assertFalse(running.closed.called)
        await support.within(20, running.closed, "the old key's relay was not closed after the grace")
        await support.wait_for(lambda: "closing 1 connections whose key was removed" in child.text(), 10, child.text)

    @support.coroutine_test
    async def test_outline_keys_added_and_removed(self):
        """An Outline key file reloaded: an added key relays, a removed key's running relay finishes and its new connections get silence, a kept key relays."""
        port = support.free_port()
        self.path += ".yml"

        def keys(*entries: tuple[str, str]) -> str:
            return "keys:\n" + "".join(
                f"  - id: {key_id}\n    port: {port}\n    cipher: {METHOD}\n    secret: {secret}\n" for key_id, secret in entries
            )

        self.write(keys(("alice", "alice-secret"), ("bob", "bob-secret")))
        child = await support.start_twistd(
            self, "-n", "--pidfile=", "ssx-server", "-c", self.path, "-s", "127.0.0.1", "--forbidden-ip=",
            "--shutdown-grace", str(GRACE), "--handshake-timeout", "2", ready=b"listening on",
        )
        await support.wait_for_port(port)
        first, rest = os.urandom(100_000), os.urandom(200_000)
        running = await self.held(self.local(port, "bob-secret"), first)

        self.write(keys(("alice", "alice-secret"), ("carol", "carol-secret")))
        line = await support.sighup(child)
        self.assertIn("key carol added", line)
        self.assertIn("key bob removed", line)
        self.assertNotIn("alice", line)

        await self.finish(running, first, rest)
        await self.transfer(self.local(port, "carol-secret"))
        await self.transfer(self.local(port, "alice-secret"))
        await self.silence(self.local(port, "bob-secret"))
        self.assertNotIn("-secret", child.text())

    @support.coroutine_test
    async def test_broken_file_keeps_the_running_config(self):
        """A file that does not parse, or does not check, is refused with one line; the running config stays."""
        port = support.free_port()
        child = await self.server({port: "kept"})
        socks_port = self.local(port, "kept")

        self.write('{"servers": [')
        line = await support.sighup(child)
        self.assertIn("ssx-server: bad configuration: config: ", line)
        self.assertIn("not valid JSON", line)

        self.write(self.ports_file({port: "kept"}, method="no-such-cipher"))
        line = await support.sighup(child)
        self.assertIn("ssx-server: bad configuration: method: ", line)

        self.assertEqual(child.text().count("bad configuration"), 2, child.text())
        self.assertNotIn("Traceback", child.text())
        await self.transfer(socks_port)

    @support.coroutine_test
    async def test_manager_added_port_survives(self):
        """A port the manager API added is still served after a reload that changed the file."""
        configured, extra, added = support.free_port(), support.free_port(), support.free_port()
        manager = ("127.0.0.1", support.free_port())
        child = await self.server({configured: "configured"}, manager_address=f"{manager[0]}:{manager[1]}")
        client = ManagerClient()
        self.addCleanup(client.sock.close)
        request = {"server_port": added, "password": "by-manager", "method": METHOD}
        self.assertEqual(await client.ask(manager, b"add: " + json.dumps(request).encode()), b"ok")
        await self.transfer(self.local(added, "by-manager"))

        self.write(self.ports_file({configured: "configured", extra: "extra"},
                                   manager_address=f"{manager[0]}:{manager[1]}"))
        line = await support.sighup(child)
        self.assertIn(f"port {extra} added", line)
        self.assertNotIn(str(added), line)

        await self.transfer(self.local(added, "by-manager"))
        await self.transfer(self.local(extra, "extra"))
        listed = {entry["server_port"] for entry in json.loads(await client.ask(manager, b"list"))}
        self.assertEqual(listed, {str(configured), str(extra), str(added)})


class LocalReloadTests(_ReloadCase):
    """`twistd ssx-local -c FILE`, reloaded, with ssx-servers in this reactor."""

    def server(self) -> Any:
        service, port = support.start_server(method=METHOD, shutdown_grace=GRACE)
        self.addCleanup(service.stopService)
        return service, port

    def local_file(self, server_port: int, socks_port: int, tunnels: list[str] = ()) -> dict[str, Any]:  # type: ignore[assignment]
        return {
            "server": "127.0.0.1", "server_port": server_port, "password": support.PASSWORD, "method": METHOD,
            "local_address": "127.0.0.1", "local_port": socks_port, "shutdown_grace": GRACE, "tunnels": list(tunnels),
        }

    async def twistd_local(self, values: dict[str, Any]) -> support.ChildProcess:
        self.write(values)
        child = await support.start_twistd(self, "-n", "--pidfile=", "ssx-local", "-c", self.path, ready=b"listening on")
        await support.wait_for_port(values["local_port"])
        return child

    @support.coroutine_test
    async def test_changed_server(self):
        """After the server changes, new connections go to the new one and a running relay goes on with the old."""
        (old, old_port), (new, new_port) = self.server(), self.server()
        socks_port = support.free_port()
        child = await self.twistd_local(self.local_file(old_port, socks_port))
        first, rest = os.urandom(100_000), os.urandom(200_000)
        running = await self.held(socks_port, first)

        self.write(self.local_file(new_port, socks_port))
        line = await support.sighup(child)
        self.assertIn(f"server 127.0.0.1:{old_port} removed", line)
        self.assertIn(f"server 127.0.0.1:{new_port} added", line)

        await self.finish(running, first, rest)
        accepted = old.factory.accepted
        await self.transfer(socks_port)
        self.assertEqual(old.factory.accepted, accepted)
        self.assertEqual(new.factory.accepted, 1)

    @support.coroutine_test
    async def test_added_tunnel(self):
        """A tunnel added to the file forwards to its target, byte for byte, after the reload."""
        _, server_port = self.server()
        socks_port, tunnel_port = support.free_port(), support.free_port()
        child = await self.twistd_local(self.local_file(server_port, socks_port))

        self.write(self.local_file(server_port, socks_port, [f"127.0.0.1:{tunnel_port}=127.0.0.1:{self.echo_port}"]))
        line = await support.sighup(child)
        self.assertIn(f"tunnel tcp:{tunnel_port}:interface=127.0.0.1 to 127.0.0.1:{self.echo_port} added", line)

        payload = os.urandom(300_000)
        client = RawClient(payload)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", tunnel_port), client)
        await support.wait_for(lambda: len(client.received) >= len(payload) or client.closed.called, 20,
                               lambda: f"{len(client.received)} of {len(payload)} bytes came back")
        client.transport.loseConnection()
        self.assertEqual(support.sha256(bytes(client.received)), support.sha256(payload))
        self.assertEqual([echo.digest.hexdigest() for echo in self.echo_factory.inbound], [support.sha256(payload)])
        await self.transfer(socks_port)
