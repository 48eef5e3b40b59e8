"""
The 2022 edition (SIP022/SIP023) end to end on loopback: every method over
TCP and UDP, identity headers with per-user counters, and the replay,
freshness and packet-ID defences seen from outside.
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time

from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.task import deferLater
from twisted.trial import unittest

from ssx.wire.address import Address
from ssx.config import server_config
from ssx.crypto import generate_psk, make_suite
from ssx.crypto.edition2022 import UdpClientSession, parse_password
from ssx.errors import ConfigError
from tests import support
from tests.support import mixed_payloads

METHODS = ("2022-blake3-aes-128-gcm", "2022-blake3-aes-256-gcm", "2022-blake3-chacha20-poly1305")
EIGHT_MIB = 8 * 1024 * 1024


class Chain2022TestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.echo = support.listen_echo()
        self.addCleanup(self.echo.stopListening)

    def chain(self, method: str, server_password: str, local_password: str | None = None, **values) -> int:
        server, server_port = support.start_server(method=method, password=server_password, **values)
        self.addCleanup(server.stopService)
        local_values = {k: v for k, v in values.items() if k not in ("users",)}
        local, local_port = support.start_local(
            server_port, method=method, password=local_password or server_password, **local_values
        )
        self.addCleanup(local.stopService)
        self.addCleanup(support.drained, server, local)
        self.server_service, self.local_service, self.server_port = server, local, server_port
        return local_port

    async def echo_through(self, socks_port: int, size: int) -> None:
        payload = os.urandom(size)
        reply, received = await support.socks_transfer(socks_port, "127.0.0.1", self.echo.getHost().port, payload)
        self.assertEqual(reply, 0)
        self.assertEqual(len(received), len(payload))
        self.assertEqual(support.sha256(received), support.sha256(payload))


def _tcp_test(method: str):
    def test(self):
        psk = generate_psk(method)
        return defer.Deferred.fromCoroutine(self.echo_through(self.chain(method, psk), EIGHT_MIB))

    test.__doc__ = f"{method}: 8 MiB each way over TCP arrive intact (hashed at both ends)."
    return test


def _udp_test(method: str):
    async def run(self):
        psk = generate_psk(method)
        echo_port, echo = support.listen_udp_echo()
        self.addCleanup(echo_port.stopListening)
        socks_port = self.chain(method, psk, mode="tcp_and_udp")
        client = support.Socks5UdpClient()
        self.addCleanup(client.close)
        self.assertEqual(await client.open(socks_port), 0)
        await client.exchange("127.0.0.1", echo_port.getHost().port, mixed_payloads(300, 60000, seed=7))
        self.assertEqual(self.server_service.udp_relays[0].dropped, 0)

    def test(self):
        return defer.Deferred.fromCoroutine(run(self))

    test.__doc__ = f"{method}: 300 datagrams of mixed sizes over UDP come back intact."
    return test


class Methods2022Tests(Chain2022TestCase):
    """Every 2022 method through ssx-local -> ssx-server."""

    for _method in METHODS:
        locals()["test_tcp_" + _method.replace("-", "_")] = _tcp_test(_method)
        locals()["test_udp_" + _method.replace("-", "_")] = _udp_test(_method)
    del _method


class IdentityHeaderTests(Chain2022TestCase):
    """Several users on one port (SIP023): the server identifies each by its identity header."""

    async def _two_users(self) -> None:
        method = "2022-blake3-aes-256-gcm"
        server_psk, alice, bob = (generate_psk(method) for _ in range(3))
        users = [{"name": "alice", "password": alice}, {"name": "bob", "password": bob}]
        socks_alice = self.chain(method, server_psk, f"{server_psk}:{alice}", users=users)
        await self.echo_through(socks_alice, 300_000)
        local_bob, socks_bob = support.start_local(self.server_port, method=method, password=f"{server_psk}:{bob}")
        self.addCleanup(local_bob.stopService)
        await self.echo_through(socks_bob, 100_000)
        traffic = self.server_service.factory.user_traffic
        self.assertEqual((traffic["alice"].up, traffic["alice"].down), (300_000, 300_000))
        self.assertEqual((traffic["bob"].up, traffic["bob"].down), (100_000, 100_000))
        # A user the server does not know gets silence.
        stranger = generate_psk(method)
        local_x, socks_x = support.start_local(self.server_port, method=method, password=f"{server_psk}:{stranger}")
        self.addCleanup(local_x.stopService)
        reply, received = await support.socks_transfer(socks_x, "127.0.0.1", self.echo.getHost().port, b"hi")
        self.assertEqual(received, b"")
        self.assertEqual(self.server_service.factory.handshake_failures, 1)
        self.assertNotIn("stranger", traffic)

    def test_two_users_and_a_stranger(self):
        """alice and bob share a port, each counted apart; an unknown user's request gets silence."""
        return defer.Deferred.fromCoroutine(self._two_users())


class Defences2022Tests(Chain2022TestCase):
    """Replay, stale timestamps and reused UDP packet IDs, from a raw client."""

    method = "2022-blake3-aes-128-gcm"

    def start(self, **values) -> tuple[str, int, object]:
        psk = generate_psk(self.method)
        server, port = support.start_server(method=self.method, password=psk, timeout=1.5, **values)
        self.addCleanup(server.stopService)
        return psk, port, server

    def first_write(self, psk: str, now=time.time) -> bytes:
        codec = make_suite(self.method, psk, now=now).client_codec()
        return codec.first(Address("127.0.0.1", self.echo.getHost().port), b"ping")

    @staticmethod
    def _send(port: int, data: bytes) -> tuple[bytes, str]:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(data)
            s.settimeout(5)
            try:
                answer = s.recv(65536)
                return answer, "data" if answer else "fin"
            except ConnectionResetError:
                return b"", "rst"

    async def _replay(self) -> None:
        psk, port, server = self.start()
        captured = self.first_write(psk)
        answer, how = await threads.deferToThread(self._send, port, captured)
        self.assertEqual(how, "data")  # the echo's "ping", in a 2022 response
        answer, how = await threads.deferToThread(self._send, port, captured)
        self.assertEqual((answer, how), (b"", "fin"))
        self.assertEqual(server.factory.handshake_failures, 1)

    def test_replayed_request_is_silent(self):
        """A captured first packet replayed gets no byte back and reaches nothing; the original worked."""
        return defer.Deferred.fromCoroutine(self._replay())

    async def _stale(self) -> None:
        psk, port, server = self.start()
        old = self.first_write(psk, now=lambda: time.time() - 60)
        answer, how = await threads.deferToThread(self._send, port, old)
        self.assertEqual((answer, how), (b"", "fin"))
        self.assertEqual(server.factory.handshake_failures, 1)

    def test_stale_timestamp_is_silent(self):
        """A request stamped 60 s ago gets silence, like any failed authentication."""
        return defer.Deferred.fromCoroutine(self._stale())

    async def _packet_id(self) -> None:
        psk, port, server = self.start(mode="tcp_and_udp")
        echo_port, echo = support.listen_udp_echo()
        self.addCleanup(echo_port.stopListening)
        codec = make_suite(self.method, psk).udp_client_codec()
        packet = codec.seal(support.socks5_udp_header("127.0.0.1", echo_port.getHost().port)[3:] + b"once")
        relay = server.udp_relays[0]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(packet, ("127.0.0.1", port))
            s.sendto(packet, ("127.0.0.1", port))
            s.settimeout(3)
            # Each datagram is either dropped (counted at once) or relayed to the echo.
            await support.wait_for(
                lambda: relay.received == 2 and relay.dropped + echo.count == 2, 3,
                lambda: f"received {relay.received}, dropped {relay.dropped}, echoed {echo.count}",
            )
        self.assertEqual(echo.count, 1)
        self.assertEqual((relay.received, relay.dropped), (2, 1))

    def test_reused_packet_id_dropped(self):
        """A UDP packet sent twice (same session and packet ID) is relayed once; the copy is dropped."""
        return defer.Deferred.fromCoroutine(self._packet_id())


class _Inbox(protocol.DatagramProtocol):
    """A UDP socket's datagrams, in order of arrival."""

    def __init__(self) -> None:
        self.queue: defer.DeferredQueue = defer.DeferredQueue()

    def datagramReceived(self, data: bytes, addr: tuple) -> None:
        self.queue.put((data, addr))


async def next_datagram(inbox, seconds: float = 5.0) -> tuple[bytes, tuple]:
    """The next datagram of an inbox (anything with a DeferredQueue `queue`); AssertionError after `seconds`."""
    d = inbox.queue.get()
    timer = reactor.callLater(seconds, d.cancel)
    try:
        return await d
    except defer.CancelledError:
        raise AssertionError(f"no datagram within {seconds:g} s") from None
    finally:
        if timer.active():
            timer.cancel()


class UdpSessionOwnerTests(unittest.TestCase):
    """2022 UDP sessions belong to the user who opened them, and replies are checked for replays at ssx-local."""

    method = "2022-blake3-aes-256-gcm"

    def udp_socket(self) -> tuple[_Inbox, object]:
        inbox = _Inbox()
        port = reactor.listenUDP(0, inbox, interface="127.0.0.1", maxPacketSize=65535)
        self.addCleanup(port.stopListening)
        return inbox, port

    async def _takeover(self) -> None:
        method = self.method
        server_psk, alice, bob = (generate_psk(method) for _ in range(3))
        users = [{"name": "alice", "password": alice}, {"name": "bob", "password": bob}]
        server, port = support.start_server(method=method, password=server_psk, users=users, mode="tcp_and_udp")
        self.addCleanup(server.stopService)
        echo_port, _ = support.listen_udp_echo()
        self.addCleanup(echo_port.stopListening)
        target = Address("127.0.0.1", echo_port.getHost().port)
        to_server = ("127.0.0.1", port)
        alice_inbox, alice_socket = self.udp_socket()
        bob_inbox, bob_socket = self.udp_socket()
        alice_session = UdpClientSession(method, parse_password(method, f"{server_psk}:{alice}"), now=time.time)
        alice_socket.write(alice_session.encode(target, b"alice 1"), to_server)
        self.assertEqual(alice_session.decode((await next_datagram(alice_inbox))[0]).payload, b"alice 1")
        # Bob holds the port's PSK too, so he can read Alice's session ID off
        # her packets; he sends under it, his packet IDs far ahead of hers.
        bob_session = UdpClientSession(
            method, parse_password(method, f"{server_psk}:{bob}"), now=time.time, session_id=alice_session.session_id
        )
        bob_session.packet_id = 20_000
        bob_socket.write(bob_session.encode(target, b"bob 1"), to_server)
        # What comes back to Bob is his own session's reply, sealed with his
        # key: not a reply of Alice's session.
        self.assertEqual(bob_session.decode((await next_datagram(bob_inbox))[0]).payload, b"bob 1")
        # Alice's session still answers her, packet IDs and all.
        alice_socket.write(alice_session.encode(target, b"alice 2"), to_server)
        self.assertEqual(alice_session.decode((await next_datagram(alice_inbox))[0]).payload, b"alice 2")
        # And Bob got nothing of hers in between: his next datagram answers his next packet.
        bob_socket.write(bob_session.encode(target, b"bob 2"), to_server)
        self.assertEqual(bob_session.decode((await next_datagram(bob_inbox))[0]).payload, b"bob 2")
        relay = server.udp_relays[0]
        self.assertEqual((len(relay.nat), relay.dropped), (2, 0))

    def test_session_id_of_another_user(self):
        """On a multi-user port, user B sending under user A's session ID gets a session of his own: A's replies and window stay A's."""
        return defer.Deferred.fromCoroutine(self._takeover())

    async def _replayed_reply(self) -> None:
        method = self.method
        psk = generate_psk(method)
        # The test is the server: a UDP socket ssx-local sends to.
        server_inbox, server_socket = self.udp_socket()
        local, socks_port = support.start_local(
            server_socket.getHost().port, method=method, password=psk, mode="tcp_and_udp"
        )
        self.addCleanup(local.stopService)
        client = support.Socks5UdpClient()
        self.addCleanup(client.close)
        self.assertEqual(await client.open(socks_port), 0)
        client.send("127.0.0.1", 9, b"question")
        data, local_address = await next_datagram(server_inbox)
        decoder = make_suite(method, psk).udp_server_decoder()
        question = decoder.decode(data)
        self.assertEqual(question.payload, b"question")
        reply_side = decoder.session(question)
        header = support.socks5_udp_header("127.0.0.1", 9)
        first = reply_side.encode(Address("127.0.0.1", 9), b"answer 1")
        server_socket.write(first, local_address)
        self.assertEqual((await next_datagram(client.udp))[0], header + b"answer 1")
        # The same reply again (a replay), then a new one: only the new one
        # reaches the application.
        server_socket.write(first, local_address)
        server_socket.write(reply_side.encode(Address("127.0.0.1", 9), b"answer 2"), local_address)
        self.assertEqual((await next_datagram(client.udp))[0], header + b"answer 2")
        relay = local.udp_relays[0]
        self.assertEqual((relay.received, relay.dropped), (1, 1))

    def test_replayed_reply_dropped_by_local(self):
        """A server reply replayed to ssx-local is dropped and counted; the application sees it once."""
        return defer.Deferred.fromCoroutine(self._replayed_reply())


class Config2022Tests(unittest.SynchronousTestCase):
    """Keys as 2022 users give them."""

    def test_wrong_key_length(self):
        """A PSK of the wrong length stops start-up naming password; a bad user key names the user."""
        for values, key in [
            ({"method": "2022-blake3-aes-256-gcm", "password": base64.b64encode(os.urandom(16)).decode()}, "password"),
            ({"method": "2022-blake3-aes-128-gcm", "password": "not base64!"}, "password"),
            ({"method": "2022-blake3-aes-128-gcm", "password": generate_psk("2022-blake3-aes-128-gcm"),
              "users": [{"name": "u", "password": "short"}]}, "users.u"),
            ({"method": "aes-256-gcm", "password": "x", "users": {"u": "x"}}, "users"),
        ]:
            with self.assertRaises(ConfigError, msg=str(values)) as caught:
                server_config(values)
            self.assertEqual(caught.exception.key, key)

    def test_generated_psk(self):
        """With no password a 2022 server generates a PSK of the method's length."""
        config = server_config({"method": "2022-blake3-aes-128-gcm"})
        self.assertEqual(len(base64.b64decode(config.password)), 16)

    def test_genkey_command(self):
        """`python -m ssx genkey -m METHOD` prints a fresh base64 key of the right length."""
        out = subprocess.run([sys.executable, "-m", "ssx", "genkey", "-m", "2022-blake3-aes-256-gcm"],
                             capture_output=True, text=True, check=True).stdout.strip()
        self.assertEqual(len(base64.b64decode(out)), 32)
