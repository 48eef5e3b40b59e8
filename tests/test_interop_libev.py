"""
Interoperability with shadowsocks-libev (ss-server, ss-local) on loopback.

Each test puts one libev process in an ssx chain, in either position:
ssx-local -> ss-server -> echo, and ss-local -> ssx-server -> echo.  The echo
target hashes what reaches it, so each direction is checked on its own.

shadowsocks-libev has no TCP half-close: when either side of a relay reads
EOF it closes both connections at once, dropping whatever was still on its
way back (see `server_recv_cb` in libev's src/local.c and src/server.c).  The
client here therefore keeps its side open until the whole echo is back and
then closes (`support.WholeEchoTransfer`), instead of half-closing as
`support.SocksTransfer` does.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests import support
from tests.support import HashingEchoFactory, whole_echo_transfer

FOUR_MIB = 4 * 1024 * 1024
METHODS = (
    "aes-128-gcm", "aes-192-gcm", "aes-256-gcm", "chacha20-ietf-poly1305", "xchacha20-ietf-poly1305",
    "aes-256-cfb", "chacha20-ietf", "salsa20",
)

_missing = [name for name in ("ss-server", "ss-local") if shutil.which(name) is None]
SKIP = (
    f"shadowsocks-libev is not installed ({', '.join(_missing)} not on PATH); "
    "install the shadowsocks-libev package to run the interoperability tests"
    if _missing
    else None
)


class LibevTestCase(unittest.TestCase):
    """Starts a hashing echo target; spawns libev peers and stops them afterwards."""

    skip = SKIP

    def setUp(self) -> None:
        self.echo_factory = HashingEchoFactory()
        self.echo = reactor.listenTCP(0, self.echo_factory, interface="127.0.0.1")
        self.addCleanup(self.echo.stopListening)

    @property
    def echo_port(self) -> int:
        return self.echo.getHost().port

    async def spawn_libev(self, executable: str, args: list[str], port: int) -> support.ChildProcess:
        """Run a libev binary (verbose) and wait until it accepts connections on `port`."""
        child = support.spawn(executable, [*args, "-v"])
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
        try:
            await support.wait_for_port(port)
        except Exception as e:
            self.fail(f"{executable} never listened on {port} ({e!r}); its output:\n{child.text()}")
        return child

    async def echo_through(self, socks_port: int, child: support.ChildProcess, size: int, host: str = "127.0.0.1") -> None:
        """Send `size` random bytes to the echo through `socks_port`; both directions must arrive intact."""
        payload = os.urandom(size)
        reply, received = await whole_echo_transfer(socks_port, host, self.echo_port, payload)
        context = f"\n--- libev output ---\n{child.text()}"
        # The child's last log lines may still be on their way: a failure waits for them.
        async with support.late_lines_quoted(child.text):
            self.assertEqual(reply, 0, f"SOCKS5 reply {reply}{context}")
            self.assertEqual(len(self.echo_factory.inbound), 1, f"connections reaching the echo{context}")
            target = self.echo_factory.inbound[0]
            self.assertEqual(target.size, len(payload), f"bytes reaching the echo{context}")
            self.assertEqual(target.digest.hexdigest(), support.sha256(payload), f"upstream sha256{context}")
            self.assertEqual(len(received), len(payload), f"bytes echoed back{context}")
            self.assertEqual(support.sha256(received), support.sha256(payload), f"downstream sha256{context}")

    async def wait_for_output(self, child: support.ChildProcess, text: str, seconds: float = 5.0) -> None:
        await support.wait_for(lambda: text in child.text(), seconds, lambda: f"{text!r} not in libev output:\n{child.text()}")


class SsServerTests(LibevTestCase):
    """ssx-local -> ss-server -> echo: ssx's client side against libev's server."""

    async def ss_server(self, method: str, password: str = support.PASSWORD) -> tuple[support.ChildProcess, int]:
        port = support.free_port()
        child = await self.spawn_libev("ss-server", ["-s", "127.0.0.1", "-p", str(port), "-k", password, "-m", method], port)
        return child, port

    async def _bulk(self, method: str) -> None:
        child, server_port = await self.ss_server(method)
        local, socks_port = support.start_local(server_port, method=method)
        self.addCleanup(local.stopService)
        await self.echo_through(socks_port, child, FOUR_MIB)

    async def _domain(self) -> None:
        child, server_port = await self.ss_server("aes-256-gcm")
        local, socks_port = support.start_local(server_port, method="aes-256-gcm")
        self.addCleanup(local.stopService)
        await self.echo_through(socks_port, child, 300_000, host="localhost")
        # ss-server logs the target as it got it: a name, so the header was ATYP 3.
        await self.wait_for_output(child, f"connect to localhost:{self.echo_port}")

    def test_domain_target(self):
        """A domain target (localhost) sent by ssx-local as an ATYP 3 header is resolved and reached by ss-server."""
        return defer.Deferred.fromCoroutine(self._domain())


class SsLocalTests(LibevTestCase):
    """ss-local -> ssx-server -> echo: libev's client side against ssx's server."""

    async def ss_local(self, server_port: int, method: str, password: str = support.PASSWORD) -> tuple[support.ChildProcess, int]:
        port = support.free_port()
        child = await self.spawn_libev(
            "ss-local",
            ["-s", "127.0.0.1", "-p", str(server_port), "-b", "127.0.0.1", "-l", str(port), "-k", password, "-m", method],
            port,
        )
        return child, port

    async def _bulk(self, method: str) -> None:
        server, server_port = support.start_server(method=method)
        self.addCleanup(server.stopService)
        child, socks_port = await self.ss_local(server_port, method)
        await self.echo_through(socks_port, child, FOUR_MIB)

    async def _domain(self) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".hosts", delete=False) as f:
            f.write("127.0.0.1 echo.ssx.test\n")
        self.addCleanup(os.unlink, f.name)
        # An unreachable DNS server: only the hosts file can answer, so the
        # name must have arrived as a name.
        server, server_port = support.start_server(
            method="chacha20-ietf-poly1305", hosts_file=f.name, nameserver="127.0.0.1:9"
        )
        self.addCleanup(server.stopService)
        child, socks_port = await self.ss_local(server_port, "chacha20-ietf-poly1305")
        await self.echo_through(socks_port, child, 300_000, host="echo.ssx.test")

    def test_domain_target(self):
        """A domain target from ss-local (ATYP 3) is parsed by ssx-server and resolved from its hosts file."""
        return defer.Deferred.fromCoroutine(self._domain())

    async def _wrong_password(self) -> None:
        server, server_port = support.start_server(method="aes-256-gcm", password="one", timeout=2)
        self.addCleanup(server.stopService)
        child, socks_port = await self.ss_local(server_port, "aes-256-gcm", password="two")
        reply, received = await whole_echo_transfer(socks_port, "127.0.0.1", self.echo_port, b"hello" * 100)
        context = f"\n--- libev output ---\n{child.text()}"
        # ss-local answers the SOCKS request itself; ssx-server then discards
        # the stream until its timeout and closes, and ss-local closes too.
        self.assertEqual(reply, 0, context)
        self.assertEqual(received, b"", context)
        self.assertEqual(server.factory.handshake_failures, 1, context)
        self.assertEqual(self.echo_factory.inbound, [], context)

    def test_wrong_password(self):
        """ss-local with another password than ssx-server gets nothing back; ssx-server counts one handshake failure."""
        return defer.Deferred.fromCoroutine(self._wrong_password())


def _make_bulk_test(method: str, direction: str) -> Any:
    def test(self):
        return defer.Deferred.fromCoroutine(self._bulk(method))

    test.__doc__ = f"4 MiB each way through {direction} with {method} arrive intact (hashed at the echo and at the client)."
    return test


for _method in METHODS:
    _name = "test_" + _method.replace("-", "_")
    setattr(SsServerTests, _name, _make_bulk_test(_method, "ssx-local -> ss-server"))
    setattr(SsLocalTests, _name, _make_bulk_test(_method, "ss-local -> ssx-server"))
del _method, _name
