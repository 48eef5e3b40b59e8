"""
Transports other than plain TCP between and around the two ends: TLS
(`ssl:` on the server, `tls:` on the local end, with certificates from
`python -m ssx cert`) and Unix sockets, on loopback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from cryptography import x509
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint, connectProtocol, serverFromString
from twisted.trial import unittest

from ssx.wire import socks5
from ssx.crypto.certificate import endpoint_escape, write_pair
from ssx.config import local_config, server_config
import ssx.local.tap as local_tap
import ssx.server.tap as server_tap
from tests import support
from tests.support import HashingEchoFactory, WholeEchoTransfer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def transfer(endpoint: Any, host: str, port: int, payload: bytes) -> tuple[int | None, bytes]:
    """
    SOCKS5 CONNECT through `endpoint`, send `payload`, wait for its whole
    echo, close (no half-close: TLS hops cannot pass one on); bounded.
    """
    return await support.run_transfer(WholeEchoTransfer(host, port, payload), endpoint)


class TransportTestCase(unittest.TestCase):
    """A hashing echo target, the services a test starts, and the log events seen meanwhile."""

    def setUp(self) -> None:
        self.echo_factory = HashingEchoFactory()
        self.echo = reactor.listenTCP(0, self.echo_factory, interface="127.0.0.1")
        self.addCleanup(self.echo.stopListening)
        self.events = support.log_events(self)

    def directory(self) -> str:
        # Short, under /tmp: Unix socket paths are limited to about 100 bytes.
        path = tempfile.mkdtemp(prefix="ssx-")
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def start(self, build: Any, config: Any) -> Any:
        service = build(reactor, config)
        service.startService()
        self.addCleanup(service.stopService)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self.drained(service)))
        return service

    async def drained(self, service: Any, seconds: float = 6.0) -> None:
        """Wait until `service` and the echo hold no connection (a TLS hop ends only at the idle timeout)."""
        factories = getattr(service, "factories", None) or [service.factory]

        def busy() -> list:
            return [c for f in factories for c in f.connections] + [p for p in self.echo_factory.inbound if p.transport.connected]

        await support.wait_for(lambda: not busy(), seconds, lambda: f"connections still open: {busy()}")

    def assert_echoed(self, payload: bytes, reply: int | None, received: bytes) -> None:
        """The target got `payload` intact, and the client got it back intact."""
        self.assertEqual(reply, socks5.REP_SUCCEEDED)
        self.assertEqual(len(self.echo_factory.inbound), 1)
        target = self.echo_factory.inbound[0]
        self.assertEqual((target.size, target.digest.hexdigest()), (len(payload), support.sha256(payload)))
        self.assertEqual((len(received), support.sha256(received)), (len(payload), support.sha256(payload)))

    def assert_no_tracebacks(self) -> None:
        failures = [e for e in self.events if "log_failure" in e]
        self.assertEqual(failures, [], "a failure with a traceback was logged")


class TlsTests(TransportTestCase):
    """ssx-local -> tls: -> ssx-server on ssl:, the certificate made as `python -m ssx cert` makes it."""

    def tls_server(self, host: str = "localhost") -> tuple[int, str]:
        """ssx-server on ssl: with a fresh pair for `host`; returns its port and the certificate's path."""
        pair = write_pair(host, self.directory())
        description = (
            f"ssl:0:interface=127.0.0.1:privateKey={endpoint_escape(pair.key_path)}:certKey={endpoint_escape(pair.cert_path)}"
        )
        server = self.start(
            server_tap.build_service,
            server_config({
                "password": support.PASSWORD, "forbidden_ip": "", "method": "aes-256-gcm", "listen": description,
                # Over TLS a client's close reaches the server only as the idle timeout.
                "timeout": 2,
            }),
        )
        return server.listeners[0].port.getHost().port, pair.cert_path

    def pinned(self, cert_path: str) -> str:
        """A directory holding only `cert_path`: the local end's trustRoots."""
        directory = self.directory()
        shutil.copy(cert_path, os.path.join(directory, "server.pem"))
        return directory

    def tls_local(self, port: int, trust: str, host: str = "localhost") -> int:
        local = self.start(
            local_tap.build_service,
            local_config({
                "password": support.PASSWORD,
                "method": "aes-256-gcm",
                "timeout": 2,
                "listen": "tcp:0:interface=127.0.0.1",
                "server_endpoint": f"tls:host={host}:port={port}:trustRoots={endpoint_escape(trust)}",
            }),
        )
        return local.listeners[0].port.getHost().port

    async def _pinned(self) -> None:
        port, cert_path = self.tls_server()
        socks_port = self.tls_local(port, self.pinned(cert_path))
        payload = os.urandom(2 * 1024 * 1024)
        reply, received = await transfer(
            TCP4ClientEndpoint(reactor, "127.0.0.1", socks_port), "127.0.0.1", self.echo.getHost().port, payload
        )
        self.assert_echoed(payload, reply, received)
        self.assert_no_tracebacks()

    def test_pinned_certificate(self):
        """With the server's own certificate as the only trust root, 2 MiB each way arrive intact over TLS."""
        return defer.Deferred.fromCoroutine(self._pinned())

    async def _refused(self, trust_other_pair: bool, local_host: str = "localhost") -> None:
        port, cert_path = self.tls_server()
        if trust_other_pair:
            # Another certificate for the very same name: not the one pinned.
            trust = self.pinned(write_pair("localhost", self.directory()).cert_path)
        else:
            trust = self.pinned(cert_path)
        socks_port = self.tls_local(port, trust, host=local_host)
        reply, received = await transfer(
            TCP4ClientEndpoint(reactor, "127.0.0.1", socks_port), "127.0.0.1", self.echo.getHost().port, b"secret" * 100
        )
        self.assertEqual((reply, received), (socks5.REP_GENERAL_FAILURE, b""))
        self.assertEqual(self.echo_factory.inbound, [])
        self.assert_no_tracebacks()
        self.assertTrue(
            any("cannot reach server" in (e.get("log_format") or "") for e in self.events),
            "the failure was not logged",
        )

    def test_wrong_pinned_certificate(self):
        """A server whose certificate is not the pinned one: SOCKS5 general failure, no data, no traceback logged."""
        return defer.Deferred.fromCoroutine(self._refused(trust_other_pair=True))

    def test_wrong_host_name(self):
        """The pinned certificate, but for another name than the endpoint's host: refused the same way."""
        return defer.Deferred.fromCoroutine(self._refused(trust_other_pair=False, local_host="127.0.0.1"))

    def test_key_in_trust_roots_named(self):
        """A trustRoots directory holding a key stops start-up with the key named and the reason said."""
        pair = write_pair("localhost", self.directory())
        options = local_tap.Options()
        description = f"tls:host=localhost:port=1:trustRoots={os.path.dirname(pair.key_path)}"
        with self.assertRaises(SystemExit) as caught:
            options.parseOptions(["-s", "127.0.0.1", "-k", "pw", "--server-endpoint", description])
        message = str(caught.exception)
        self.assertIn("bad configuration: server_endpoint:", message)
        self.assertIn("must be a certificate", message)


class CertCommandTests(unittest.TestCase):
    """`python -m ssx cert --host NAME --out DIR`."""

    def run_cert(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "ssx", "cert", *args], capture_output=True, text=True, cwd=ROOT, timeout=30
        )

    def test_writes_pair_and_descriptions(self):
        """It writes key.pem (0600) and cert.pem naming the host, a year long, and prints working descriptions."""
        out_dir = os.path.join(tempfile.mkdtemp(prefix="ssx-"), "tls")
        self.addCleanup(shutil.rmtree, os.path.dirname(out_dir))
        result = self.run_cert("--host", "proxy.example.net", "--out", out_dir, "--port", "9443")
        self.assertEqual(result.returncode, 0, result.stderr)
        key_path, cert_path = os.path.join(out_dir, "key.pem"), os.path.join(out_dir, "cert.pem")
        self.assertEqual(os.stat(key_path).st_mode & 0o777, 0o600)
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(names.get_values_for_type(x509.DNSName), ["proxy.example.net"])
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        self.assertTrue(364 <= lifetime.days <= 366, lifetime)
        lines = result.stdout.splitlines()
        listen = next(w for line in lines for w in line.split() if w.startswith("ssl:"))
        self.assertEqual(listen, f"ssl:9443:privateKey={key_path}:certKey={cert_path}")
        serverFromString(reactor, listen)  # key and certificate load and match
        self.assertTrue(any("tls:host=proxy.example.net:port=9443:trustRoots=" in line for line in lines), lines)

    def test_keeps_existing_files(self):
        """A second run into the same directory changes nothing and fails, unless --force."""
        out_dir = tempfile.mkdtemp(prefix="ssx-")
        self.addCleanup(shutil.rmtree, out_dir)
        self.assertEqual(self.run_cert("--host", "a.example", "--out", out_dir).returncode, 0)
        with open(os.path.join(out_dir, "key.pem"), "rb") as f:
            key = f.read()
        again = self.run_cert("--host", "b.example", "--out", out_dir)
        self.assertEqual(again.returncode, 1)
        self.assertIn("exists", again.stderr)
        with open(os.path.join(out_dir, "key.pem"), "rb") as f:
            self.assertEqual(f.read(), key)
        self.assertEqual(self.run_cert("--host", "b.example", "--out", out_dir, "--force").returncode, 0)
        with open(os.path.join(out_dir, "key.pem"), "rb") as f:
            self.assertNotEqual(f.read(), key)

    def test_ip_address_host(self):
        """An IP address becomes an IP subjectAltName, which tls:host=IP checks."""
        out_dir = tempfile.mkdtemp(prefix="ssx-")
        self.addCleanup(shutil.rmtree, out_dir)
        write_pair("127.0.0.1", out_dir)
        with open(os.path.join(out_dir, "cert.pem"), "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual([str(ip) for ip in names.get_values_for_type(x509.IPAddress)], ["127.0.0.1"])


class UnixSocketTests(TransportTestCase):
    """unix: endpoints on both ends: the application -> SOCKS5 on a Unix socket -> ssx-server on a Unix socket."""

    async def _unix(self) -> None:
        directory = self.directory()
        server_path = os.path.join(directory, "server.sock")
        socks_path = os.path.join(directory, "socks.sock")
        self.start(
            server_tap.build_service,
            server_config({"password": support.PASSWORD, "forbidden_ip": "", "listen": f"unix:{server_path}"}),
        )
        self.start(
            local_tap.build_service,
            local_config({
                "password": support.PASSWORD,
                "server_endpoint": f"unix:path={server_path}",
                "listen": f"unix:{socks_path}",
            }),
        )
        payload = os.urandom(4 * 1024 * 1024)
        reply, received = await transfer(
            UNIXClientEndpoint(reactor, socks_path), "127.0.0.1", self.echo.getHost().port, payload
        )
        self.assert_echoed(payload, reply, received)
        self.assert_no_tracebacks()

    def test_unix_both_ends(self):
        """4 MiB each way arrive intact with SOCKS5 and the server both on Unix sockets."""
        return defer.Deferred.fromCoroutine(self._unix())

    async def _unix_udp(self) -> None:
        directory = self.directory()
        socks_path = os.path.join(directory, "socks.sock")
        self.start(
            local_tap.build_service,
            local_config({
                "password": support.PASSWORD, "server": "127.0.0.1", "server_port": 1, "mode": "tcp_and_udp",
                "listen": f"unix:{socks_path}",
            }),
        )
        got: defer.Deferred = defer.Deferred()

        class Associate(protocol.Protocol):
            buffer = b""

            def connectionMade(self):
                self.transport.write(b"\x05\x01\x00")

            def dataReceived(self, data):
                self.buffer += data
                if self.buffer == b"\x05\x00":
                    self.transport.write(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
                elif len(self.buffer) >= 12 and not got.called:
                    got.callback(self.buffer[2:])

            def connectionLost(self, reason=None):
                if not got.called:
                    got.callback(self.buffer[2:])

        client = await connectProtocol(UNIXClientEndpoint(reactor, socks_path), Associate())
        self.addCleanup(client.transport.loseConnection)
        timer = reactor.callLater(5, got.cancel)
        reply = await got
        timer.cancel()
        self.assertEqual(reply[:2], bytes([5, socks5.REP_COMMAND_NOT_SUPPORTED]))
        self.assertTrue(any("not an IP listener" in (e.get("log_format") or "") for e in self.events))
        self.assert_no_tracebacks()

    def test_no_udp_beside_unix_listener(self):
        """With -u, a SOCKS5 listener on a Unix socket has no UDP relay: UDP ASSOCIATE gets reply 7, not a crash."""
        return defer.Deferred.fromCoroutine(self._unix_udp())
