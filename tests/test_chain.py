"""
ssx-local -> ssx-server -> target, on real loopback sockets in trial's reactor.

Relaying with half-closes (`BulkTests`), backpressure (`SlowReaderTests`)
and aborts at the timeouts (`StalledPeerTests`) run on both connection
paths: ssx.net.lean's (the default) and Twisted's Port and Connector (the
`...OnTwistedTcpTests` twins).
"""

from __future__ import annotations

import base64
import os
import tempfile
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from twisted.web import server as web_server

from ssx.wire import socks5
from ssx.net.relay import SWEEP_INTERVAL
from ssx.wire.sip002 import parse_url
from tests import support
from tests.support import ChainTestCase

EIGHT_MIB = 8 * 1024 * 1024


def _make_bulk_test(method: str):
    @defer.inlineCallbacks
    def test(self):
        socks_port = self.chain(method=method)
        yield defer.Deferred.fromCoroutine(self.echo_through(socks_port, EIGHT_MIB))

    test.__doc__ = f"8 MiB each way through a {method} chain arrive intact (hashed at both ends)."
    return test


class BulkTests(support.LeanTcp, ChainTestCase):
    """Every AEAD method and two stream methods carry 8 MiB each way intact."""

    for _method in ("aes-128-gcm", "aes-192-gcm", "aes-256-gcm", "chacha20-ietf-poly1305", "aes-256-cfb", "chacha20-ietf"):
        locals()["test_" + _method.replace("-", "_")] = _make_bulk_test(_method)
    del _method


class BulkOnTwistedTcpTests(support.TwistedTcp, BulkTests):
    """The same, with both ends listening and connecting on Twisted's Port and Connector."""


class TargetTests(ChainTestCase):
    """Targets of every address type are reached."""

    async def _ipv6(self) -> None:
        echo6 = support.listen_echo("::1")
        self.addCleanup(echo6.stopListening)
        socks_port = self.chain(method="aes-256-gcm")
        await self.echo_through(socks_port, 100_000, host="::1", port=echo6.getHost().port)

    def test_ipv6_target(self):
        """An IPv6 literal target (::1) is reached through the chain."""
        if not support.ipv6_loopback():
            raise unittest.SkipTest("no IPv6 loopback on this machine")
        return defer.Deferred.fromCoroutine(self._ipv6())

    def test_domain_from_hosts_file(self):
        """A domain target is resolved by the server's twisted.names resolver from the test's hosts file."""
        with tempfile.NamedTemporaryFile("w", suffix=".hosts", delete=False) as f:
            f.write("127.0.0.1 echo.ssx.test\n")
        self.addCleanup(os.unlink, f.name)
        # An unreachable DNS server: only the hosts file can answer.
        socks_port = self.chain(method="chacha20-ietf-poly1305", hosts_file=f.name, nameserver="127.0.0.1:9")
        return defer.Deferred.fromCoroutine(self.echo_through(socks_port, 300_000, host="echo.ssx.test"))

    async def _unresolvable(self) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".hosts", delete=False) as f:
            f.write("127.0.0.1 echo.ssx.test\n")
        self.addCleanup(os.unlink, f.name)
        socks_port = self.chain(method="aes-128-gcm", hosts_file=f.name, nameserver="127.0.0.1:9")
        reply, received = await support.socks_transfer(socks_port, "missing.ssx.test", 80, b"x" * 10)
        # The local end cannot know the server failed to resolve: it replied
        # success, and the server closes the connection with nothing relayed.
        self.assertEqual(reply, 0)
        self.assertEqual(received, b"")

    def test_unresolvable_name_closes(self):
        """A name the server cannot resolve ends the connection with no data."""
        return defer.Deferred.fromCoroutine(self._unresolvable())

    async def _forbidden(self) -> None:
        socks_port = self.chain(method="aes-256-gcm", forbidden_ip=None)
        reply, received = await support.socks_transfer(socks_port, "127.0.0.1", self.echo.getHost().port, b"secret")
        self.assertEqual(reply, 0)
        self.assertEqual(received, b"")
        self.assertEqual(self.server_service.factory.connections_refused, 1)

    def test_default_forbidden_refuses_loopback(self):
        """With the default forbidden list, the server never connects to a loopback target."""
        return defer.Deferred.fromCoroutine(self._forbidden())


@support.requires("curl", package="curl")
class HttpTests(ChainTestCase):
    """A real client (curl) through the chain to a local HTTP server."""

    def _web(self, body: bytes) -> int:
        port = support.listen_web(web_server.Site(support.Blob(body)))
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def _curl(self, mode: str, **values) -> None:
        body = os.urandom(3 * 1024 * 1024 + 17)
        web_port = self._web(body)
        socks_port = self.chain(**values)
        out, err, code = await getProcessOutputAndValue(
            "curl",
            ["-sS", "--max-time", "30", mode, f"127.0.0.1:{socks_port}", f"http://localhost:{web_port}/blob"],
            env=dict(os.environ, no_proxy="", NO_PROXY=""),
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(support.sha256(out), support.sha256(body))

    def test_curl_socks5_hostname(self):
        """curl --socks5-hostname fetches 3 MiB through the chain intact (name resolved by the server)."""
        return defer.Deferred.fromCoroutine(self._curl("--socks5-hostname", method="aes-256-gcm"))

    def test_curl_socks5(self):
        """curl --socks5 (IP resolved by curl) fetches 3 MiB intact."""
        return defer.Deferred.fromCoroutine(self._curl("--socks5", method="chacha20-ietf-poly1305"))

    async def _curl_auth(self, user: str, password: str) -> tuple:
        body = b"authorised\n"
        web_port = self._web(body)
        socks_port = self.chain(method="aes-128-gcm", socks_user="alice", socks_password="s3cret")
        return await getProcessOutputAndValue(
            "curl",
            ["-sS", "--max-time", "10", "--socks5-hostname", f"{user}:{password}@127.0.0.1:{socks_port}",
             f"http://localhost:{web_port}/blob"],
            env=dict(os.environ, no_proxy="", NO_PROXY=""),
        )

    @defer.inlineCallbacks
    def test_curl_socks5_auth(self):
        """With --socks-user/--socks-password, curl with the right credentials gets through and wrong ones do not."""
        out, err, code = yield defer.Deferred.fromCoroutine(self._curl_auth("alice", "s3cret"))
        self.assertEqual((code, out), (0, b"authorised\n"))
        out, err, code = yield defer.Deferred.fromCoroutine(self._curl_auth("alice", "wrong"))
        self.assertNotEqual(code, 0)
        self.assertEqual(out, b"")


class ServerFailureTests(ChainTestCase):
    """What the application sees when the server cannot be reached."""

    async def _refused(self) -> None:
        dead_port = support.free_port()
        local, socks_port = support.start_local(dead_port, method="aes-256-gcm")
        self.addCleanup(local.stopService)
        reply, received = await support.socks_transfer(socks_port, "127.0.0.1", 80, b"")
        self.assertEqual(reply, socks5.REP_CONNECTION_REFUSED)
        self.assertEqual(received, b"")

    def test_server_down_connection_refused(self):
        """A server port that refuses connections gives SOCKS5 reply 05 (connection refused)."""
        return defer.Deferred.fromCoroutine(self._refused())

    async def _wrong_password(self) -> None:
        server, server_port = support.start_server(method="aes-256-gcm", password="one", timeout=2)
        self.addCleanup(server.stopService)
        local, socks_port = support.start_local(server_port, method="aes-256-gcm", password="two")
        self.addCleanup(local.stopService)
        reply, received = await support.socks_transfer(
            socks_port, "127.0.0.1", self.echo.getHost().port, b"hello" * 100
        )
        # The server discards the stream silently, so nothing comes back.
        self.assertEqual(reply, 0)
        self.assertEqual(received, b"")

    def test_wrong_password_relays_nothing(self):
        """A client with the wrong password gets nothing back and the target is never reached."""
        return defer.Deferred.fromCoroutine(self._wrong_password())


class SlowReaderTests(support.LeanTcp, ChainTestCase):
    """Backpressure: a target that stops reading stalls the sender instead of filling the proxies' memory."""

    async def _slow(self) -> None:
        from twisted.internet import protocol

        received: list[bytes] = []
        sinks: list = []
        finished = defer.Deferred()

        class Sink(protocol.Protocol):
            def connectionMade(self):
                sinks.append(self)
                self.transport.pauseProducing()

            def dataReceived(self, data):
                received.append(data)

            def connectionLost(self, reason=None):
                finished.callback(None)

        factory = protocol.Factory.forProtocol(Sink)
        sink_port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(sink_port.stopListening)
        socks_port = self.chain(method="aes-256-gcm")
        payload = os.urandom(64 * 1024 * 1024)
        client = support.SocksTransfer("127.0.0.1", sink_port.getHost().port, payload)
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", socks_port), client)
        # Let the sender run until it is stalled by the full pipe: paused,
        # and both proxies no longer reading what it sends.
        await support.wait_for(self._stalled(client), 30, lambda: f"not stalled: {client.sent} bytes sent, paused={client.paused}")
        buffered = self._buffered()
        self.assertLess(client.sent, len(payload) // 2, "the sender was never slowed down")
        self.assertLess(buffered, 4 * 1024 * 1024, f"proxies buffer {buffered} bytes")
        # Now let the target read: everything must still arrive, intact.
        sinks[0].transport.resumeProducing()
        await client.done
        await finished
        data = b"".join(received)
        self.assertEqual(len(data), len(payload))
        self.assertEqual(support.sha256(data), support.sha256(payload))

    def _stalled(self, client: support.SocksTransfer) -> Any:
        def stalled() -> bool:
            inbound = [p.transport for s in (self.server_service, self.local_service) for p in s.factory.connections]
            readers = reactor.getReaders()
            return client.paused and len(inbound) == 2 and not any(t in readers for t in inbound)

        return stalled

    def _buffered(self) -> int:
        total = 0
        for service in (self.server_service, self.local_service):
            for proto in service.factory.connections:
                for side in (proto, proto.peer):
                    if side is not None:
                        t = side.transport
                        total += support.buffered_bytes(t)
        return total

    def test_slow_reader_bounded(self):
        """64 MiB towards a target that does not read: the proxies hold under 4 MiB, and all bytes arrive later."""
        return defer.Deferred.fromCoroutine(self._slow())


class LogSecrecyTests(ChainTestCase):
    """
    Nothing logged while starting and relaying carries the password or the
    key, not even ssx-server's start-up line, which names the file holding
    the ss:// URL instead.
    """

    async def _relay_and_log(self) -> None:
        from twisted.logger import formatEvent, globalLogPublisher

        from ssx.crypto._kdf import evp_bytes_to_key

        password = "very-distinctive-password-4c1d"
        texts: list[str] = []

        def observe(event: dict) -> None:
            texts.append(formatEvent(event) + repr(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        socks_port = self.chain(method="aes-256-cfb", password=password)
        await self.echo_through(socks_port, 10_000)
        # A wrong password and a refused target log too (with verbose, a line each).
        server, server_port = support.start_server(
            method="aes-256-gcm", password=password, timeout=1, forbidden_ip=None, verbose=True
        )
        self.addCleanup(server.stopService)
        local, local_port = support.start_local(server_port, method="aes-256-gcm", password=password, verbose=True)
        self.addCleanup(local.stopService)
        await support.socks_transfer(local_port, "127.0.0.1", self.echo.getHost().port, b"x")
        self.assertTrue(any("insecure" in t for t in texts), "no warning for a stream method")
        self.assertTrue(any("forbidden address" in t for t in texts), "the refused target was not logged")
        key = evp_bytes_to_key(password.encode(), 32)
        encoded = [
            base64.urlsafe_b64encode(f"{method}:{password}".encode()).decode().rstrip("=")
            for method in ("aes-256-cfb", "aes-256-gcm")
        ]
        url_lines = 0
        for text in texts:
            self.assertNotRegex(text, r"ss://[A-Za-z0-9_%:.\[\]-]+@")
            url_lines += "clients connect to" in text
            self.assertNotIn(password, text)
            for form in encoded:
                self.assertNotIn(form, text)
            self.assertNotIn(key.hex(), text)
            self.assertNotIn(repr(key)[2:-1], text)
        self.assertEqual(url_lines, 2, "each server names its URL file exactly once")

    def test_no_secrets_in_logs(self):
        """Start-up (each server's URL line included), relaying, a stream-method warning and a refusal never log the password."""
        return defer.Deferred.fromCoroutine(self._relay_and_log())


class SlowReaderOnTwistedTcpTests(support.TwistedTcp, SlowReaderTests):
    """The same, with both ends listening and connecting on Twisted's Port and Connector."""


class StalledPeerTests(support.LeanTcp, ChainTestCase):
    """Peers that stop reading, or vanish, cannot hold connections open past the timeouts."""

    def _firehose(self) -> tuple:
        """A target that writes as fast as it may until told to stop; records its closing."""
        from twisted.internet import protocol
        from twisted.internet.interfaces import IPushProducer
        from zope.interface import implementer

        closed = defer.Deferred()

        @implementer(IPushProducer)
        class Firehose(protocol.Protocol):
            def connectionMade(self):
                self.paused = False
                self.transport.registerProducer(self, True)
                self.resumeProducing()

            def resumeProducing(self):
                self.paused = False
                while not self.paused and self.transport.connected:
                    self.transport.write(b"x" * 65536)

            def pauseProducing(self):
                self.paused = True

            def stopProducing(self):
                self.paused = True

            def connectionLost(self, reason=None):
                closed.callback(None)

        port = reactor.listenTCP(0, protocol.Factory.forProtocol(Firehose), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port, closed

    async def _stalled_download(self) -> None:
        import socket as socket_module

        target_port, target_closed = self._firehose()
        socks_port = self.chain(method="aes-128-gcm", timeout=1)
        s = socket_module.socket()
        s.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", socks_port))
        self.addCleanup(s.close)
        s.sendall(b"\x05\x01\x00" + support.socks5_request("127.0.0.1", target_port)[:])
        s.settimeout(5)
        self.assertEqual(await threads.deferToThread(s.recv, 2), b"\x05\x00")
        # ... and never read again: the client's window closes, the proxies' buffers fill.
        await self._within(6, target_closed)
        for service in (self.server_service, self.local_service):
            self.assertEqual(len(service.factory.connections), 0)

    def test_stalled_downloader_times_out(self):
        """A client that stops reading a download is cut off at the idle timeout, and the target is closed."""
        return defer.Deferred.fromCoroutine(self._stalled_download())

    async def _vanished_uploader(self) -> None:
        from twisted.internet import protocol

        class Deaf(protocol.Protocol):
            def connectionMade(self):
                self.transport.pauseProducing()

        port = reactor.listenTCP(0, protocol.Factory.forProtocol(Deaf), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        socks_port = self.chain(method="chacha20-ietf-poly1305", timeout=1)
        client = support.SocksTransfer("127.0.0.1", port.getHost().port, os.urandom(32 * 1024 * 1024))
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", socks_port), client)
        # The server's connections to the deaf target, while the upload is stalled.
        factory = self.server_service.factory
        await support.wait_for(lambda: any(p.peer is not None for p in factory.connections), 5, "the target was never reached")
        inbound = list(factory.connections)
        targets = [p.peer for p in inbound if p.peer is not None]
        self.assertEqual(len(targets), 1)
        local_sides = [side for p in self.local_service.factory.connections for side in (p, p.peer) if side is not None]
        client.transport.abortConnection()
        # A side that cannot flush lingers for the idle timeout (1 s), or
        # goes at the next sweep after it; each hop may wait its own.  A
        # linger timer may outlive the side it was set for: it must have run.
        def settled() -> bool:
            lingering = [c for c in reactor.getDelayedCalls() if getattr(c.func, "__name__", "") == "_abort"]
            return all(p._closed for p in inbound + targets + local_sides) and not lingering

        await support.wait_until(settled, 3 * (1 + SWEEP_INTERVAL))
        self.assertTrue(all(p._closed for p in inbound + targets), "the server still holds the stalled target")
        self.assertEqual(len(self.server_service.factory.connections), 0)

    def test_vanished_uploader_releases_target(self):
        """When a client vanishes mid-upload to a target that does not read, the target side is not kept forever."""
        return defer.Deferred.fromCoroutine(self._vanished_uploader())

    async def _within(self, seconds: float, d: defer.Deferred) -> None:
        await support.within(seconds, d, "not closed")


class StalledPeerOnTwistedTcpTests(support.TwistedTcp, StalledPeerTests):
    """The same, with both ends listening and connecting on Twisted's Port and Connector."""


class TlsTransportTests(ChainTestCase):
    """ssx-local -> tls: -> ssx-server on ssl:, with a certificate made by the test."""

    def _certificate(self) -> tuple[str, str]:
        directory = tempfile.mkdtemp()
        self.addCleanup(__import__("shutil").rmtree, directory)
        return support.make_certificate(directory)

    async def _tls(self) -> None:
        key_path, cert_path = self._certificate()
        server, _ = support.start_server(method="aes-256-gcm", timeout=2, listen=f"ssl:0:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}")
        self.addCleanup(server.stopService)
        port = server.listeners[0].port.getHost().port
        roots = os.path.dirname(cert_path)
        local, socks_port = support.start_local(
            port, method="aes-256-gcm", timeout=2, server_endpoint=f"tls:host=localhost:port={port}:trustRoots={roots}"
        )
        self.addCleanup(local.stopService)
        # The client half-closes after sending.  TLS (in Twisted) cannot carry
        # a half-close, so ssx does not pass it on: the whole echo must still
        # come back, and the client closes once it has it.
        payload = os.urandom(1024 * 1024)
        client = support.SocksTransfer("127.0.0.1", self.echo.getHost().port, payload)
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", socks_port), client)
        await support.wait_until(lambda: sum(len(b) for b in client.received) >= len(payload), 10)
        client.transport.loseConnection()
        await client.done
        self.assertEqual(client.reply, 0)
        self.assertEqual(support.sha256(b"".join(client.received)), support.sha256(payload))
        # The half-close never crossed TLS, so the chain ends at the idle
        # timeout (2 s here) and the sweep after it, not later.
        await support.wait_until(lambda: not server.factory.connections and not local.factory.connections, 2 + SWEEP_INTERVAL + 2)
        self.assertEqual((len(server.factory.connections), len(local.factory.connections)), (0, 0))

    def test_tls_half_close_keeps_reply(self):
        """Over ssl:/tls: a client's half-close does not cut the reply (1 MiB echoed intact); the chain ends by the idle timeout."""
        return defer.Deferred.fromCoroutine(self._tls())
