"""
Real clients on the mixed port, through ssx-local -> ssx-server to local web
servers: curl in every proxy mode, a keep-alive client switching hosts, git
and pip.  Bodies are hashed at both ends.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest
from twisted.web import resource, server as web_server, static

from tests import support
from tests.support import ChainTestCase

NO_PROXY_ENV = {"no_proxy": "", "NO_PROXY": "", "http_proxy": "", "HTTP_PROXY": "", "https_proxy": "", "HTTPS_PROXY": "",
                "ALL_PROXY": "", "all_proxy": ""}


class _Chunked(resource.Resource):
    """Answers without a length, so HTTP/1.1 clients get it chunked."""

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render_GET(self, request):
        for i in range(0, len(self.body), 100_000):
            request.write(self.body[i:i + 100_000])
        request.finish()
        return web_server.NOT_DONE_YET


class _HashBody(resource.Resource):
    """Answers a POST with the SHA-256 of the body it received."""

    isLeaf = True

    def render_POST(self, request):
        return hashlib.sha256(request.content.read()).hexdigest().encode()


class _Host(resource.Resource):
    """Answers with the Host header it received."""

    isLeaf = True

    def render_GET(self, request):
        return request.getHeader(b"host") or b"(none)"


class ProxyClientTestCase(ChainTestCase):
    """A web site with a blob, a chunked blob, an upload hasher and a Host echo, and curl."""

    def setUp(self) -> None:
        super().setUp()
        self.body = os.urandom(3 * 1024 * 1024 + 17)
        root = resource.Resource()
        root.putChild(b"blob", support.Blob(self.body))
        root.putChild(b"chunked", _Chunked(self.body))
        root.putChild(b"hash", _HashBody())
        root.putChild(b"host", _Host())
        self.site = web_server.Site(root)
        port = support.listen_web(self.site)
        self.addCleanup(port.stopListening)
        self.web_port = port.getHost().port

    def curl(self, *args: str, env: dict | None = None) -> defer.Deferred:
        return getProcessOutputAndValue("curl", ["-sS", "--max-time", "30", *args], env={**os.environ, **NO_PROXY_ENV, **(env or {})})

    async def fetch(self, *args: str, url: str | None = None, **values) -> None:
        socks_port = self.chain(method=values.pop("method", "aes-256-gcm"), **values)
        out, err, code = await self.curl(*[a.replace("PORT", str(socks_port)) for a in args],
                                         url or f"http://localhost:{self.web_port}/blob")
        self.assertEqual(code, 0, err)
        self.assertEqual(support.sha256(out), support.sha256(self.body))
        self.assertGreater(self.server_service.factory.accepted, 0, "the client bypassed the proxy")


@support.requires("curl", package="curl")
class CurlModeTests(ProxyClientTestCase):
    """curl in each proxy mode, to one port."""

    def test_http_forward(self):
        """curl -x http:// with an http:// URL: plain forwarding, 3 MiB intact."""
        return defer.Deferred.fromCoroutine(self.fetch("-x", "http://127.0.0.1:PORT"))

    def test_http_forward_chunked(self):
        """Plain forwarding of a chunked response arrives intact."""
        return defer.Deferred.fromCoroutine(
            self.fetch("-x", "http://127.0.0.1:PORT", url=f"http://localhost:{self.web_port}/chunked")
        )

    def test_http_connect(self):
        """curl -x http:// --proxytunnel: HTTP CONNECT, 3 MiB intact."""
        return defer.Deferred.fromCoroutine(self.fetch("-x", "http://127.0.0.1:PORT", "--proxytunnel"))

    def test_socks4(self):
        """curl --socks4 (IPv4 resolved by curl), 3 MiB intact."""
        return defer.Deferred.fromCoroutine(self.fetch("--socks4", "127.0.0.1:PORT"))

    def test_socks4a(self):
        """curl --socks4a (name resolved by the server), 3 MiB intact."""
        return defer.Deferred.fromCoroutine(self.fetch("--socks4a", "127.0.0.1:PORT"))

    def test_socks5_hostname(self):
        """curl --socks5-hostname on the mixed port, 3 MiB intact."""
        return defer.Deferred.fromCoroutine(self.fetch("--socks5-hostname", "127.0.0.1:PORT", method="chacha20-ietf-poly1305"))

    async def _upload(self) -> None:
        socks_port = self.chain(method="aes-128-gcm")
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "upload.bin")
        payload = os.urandom(2 * 1024 * 1024 + 5)
        with open(path, "wb") as f:
            f.write(payload)
        for extra in ([], ["-H", "Transfer-Encoding: chunked"]):
            out, err, code = await self.curl(
                "-x", f"http://127.0.0.1:{socks_port}", "--data-binary", f"@{path}", *extra,
                f"http://localhost:{self.web_port}/hash",
            )
            self.assertEqual(code, 0, err)
            self.assertEqual(out.decode(), support.sha256(payload), extra)

    def test_http_forward_upload(self):
        """A 2 MiB POST body (with Content-Length, then chunked) reaches the origin intact through plain forwarding."""
        return defer.Deferred.fromCoroutine(self._upload())

    async def _https_proxy_env(self) -> None:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        key, cert = support.make_certificate(directory)
        tls = support.listen_web(self.site, key, cert)
        self.addCleanup(tls.stopListening)
        socks_port = self.chain(method="aes-256-gcm")
        out, err, code = await self.curl(
            "--cacert", cert, f"https://localhost:{tls.getHost().port}/blob",
            env={"HTTPS_PROXY": f"http://127.0.0.1:{socks_port}", "https_proxy": f"http://127.0.0.1:{socks_port}"},
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(support.sha256(out), support.sha256(self.body))
        self.assertEqual(self.server_service.factory.accepted, 1, "curl did not go through the proxy once")

    def test_https_proxy_env(self):
        """HTTPS_PROXY=http://local: curl tunnels TLS with CONNECT to an https:// site and gets 3 MiB intact."""
        return defer.Deferred.fromCoroutine(self._https_proxy_env())

    async def _two_hosts(self) -> None:
        socks_port = self.chain(method="aes-256-gcm")
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        other = support.listen_web(web_server.Site(support.Blob(self.body[::-1])))
        self.addCleanup(other.stopListening)
        first, second = os.path.join(directory, "1"), os.path.join(directory, "2")
        out, err, code = await self.curl(
            "-x", f"http://127.0.0.1:{socks_port}",
            f"http://localhost:{self.web_port}/blob", "-o", first,
            f"http://127.0.0.1:{other.getHost().port}/x", "-o", second,
        )
        self.assertEqual(code, 0, err)
        with open(first, "rb") as f:
            self.assertEqual(support.sha256(f.read()), support.sha256(self.body))
        with open(second, "rb") as f:
            self.assertEqual(support.sha256(f.read()), support.sha256(self.body[::-1]))

    def test_two_hosts_one_curl(self):
        """One curl run fetching from two hosts through the HTTP proxy gets both bodies intact."""
        return defer.Deferred.fromCoroutine(self._two_hosts())

    async def _http10_keep_alive(self) -> None:
        socks_port = self.chain(method="aes-256-gcm")
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        first, second = os.path.join(directory, "1"), os.path.join(directory, "2")
        # curl --http1.0 asks a proxy for Proxy-Connection: Keep-Alive.
        out, err, code = await self.curl(
            "--http1.0", "-x", f"http://127.0.0.1:{socks_port}", "-w", "%{num_connects} ",
            f"http://localhost:{self.web_port}/blob", "-o", first, f"http://localhost:{self.web_port}/blob", "-o", second,
        )
        self.assertEqual(code, 0, err)
        for path in (first, second):
            with open(path, "rb") as f:
                self.assertEqual(support.sha256(f.read()), support.sha256(self.body))
        self.assertEqual(out, b"1 0 ", "curl did not reuse its connection to the proxy")

    def test_http10_keep_alive(self):
        """curl --http1.0 fetching twice through the HTTP proxy reuses its one connection, and gets both bodies intact."""
        return defer.Deferred.fromCoroutine(self._http10_keep_alive())


@support.requires("curl", package="curl")
class CurlAuthTests(ProxyClientTestCase):
    """One credential setting for SOCKS5 and HTTP; SOCKS4 refused while it is set."""

    async def _auth(self) -> None:
        socks_port = self.chain(method="aes-128-gcm", socks_user="alice", socks_password="s3cret")
        url = f"http://localhost:{self.web_port}/blob"
        for args in (["-x", f"http://alice:s3cret@127.0.0.1:{socks_port}"],
                     ["-x", f"http://alice:s3cret@127.0.0.1:{socks_port}", "--proxytunnel"],
                     ["--socks5-hostname", f"alice:s3cret@127.0.0.1:{socks_port}"]):
            out, err, code = await self.curl(*args, url)
            self.assertEqual(code, 0, (args, err))
            self.assertEqual(support.sha256(out), support.sha256(self.body), args)
        out, err, code = await self.curl("-x", f"http://alice:wrong@127.0.0.1:{socks_port}", "-o", os.devnull,
                                         "-w", "%{http_code}", url)
        self.assertEqual(out, b"407")
        for args in (["-x", f"http://alice:wrong@127.0.0.1:{socks_port}", "--proxytunnel"],
                     ["--socks5-hostname", f"alice:wrong@127.0.0.1:{socks_port}"],
                     ["--socks4a", f"alice@127.0.0.1:{socks_port}"]):
            out, err, code = await self.curl(*args, url)
            self.assertNotEqual(code, 0, args)
            self.assertEqual(out, b"", args)

    def test_shared_credentials(self):
        """Right credentials pass over HTTP (forward and CONNECT) and SOCKS5; wrong ones get 407 or a refusal; SOCKS4a is refused."""
        return defer.Deferred.fromCoroutine(self._auth())


class _KeepAliveClient(protocol.Protocol):
    """Sends one request at a time on one connection and reads each Content-Length response, or a head without one (parsed here, not by ssx)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.waiting: defer.Deferred | None = None
        self.closed: defer.Deferred = defer.Deferred()

    def request(self, data: bytes) -> defer.Deferred:
        self.waiting = defer.Deferred()
        self.transport.write(data)
        return self.waiting

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.waiting is None or b"\r\n\r\n" not in self.buffer:
            return
        head, rest = self.buffer.split(b"\r\n\r\n", 1)
        found = re.search(rb"(?im)^content-length: *(\d+)", head)
        length = int(found.group(1)) if found else 0  # (none after CONNECT's answer)
        if len(rest) >= length:
            self.buffer = rest[length:]
            waiting, self.waiting = self.waiting, None
            waiting.callback((head, rest[:length]))

    def connectionLost(self, reason=None) -> None:
        self.closed.callback(None)
        if self.waiting is not None:
            waiting, self.waiting = self.waiting, None
            waiting.errback(reason)


class KeepAliveTests(ProxyClientTestCase):
    """Plain HTTP keep-alive across hosts on one client connection."""

    async def _switch(self) -> None:
        socks_port = self.chain(method="aes-256-gcm")
        other_body = os.urandom(1024 * 1024)
        other = support.listen_web(web_server.Site(support.Blob(other_body)))
        self.addCleanup(other.stopListening)
        client = _KeepAliveClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", socks_port), client)
        requests = [
            (f"http://localhost:{self.web_port}/blob", self.body),
            (f"http://127.0.0.1:{other.getHost().port}/", other_body),
            (f"http://localhost:{self.web_port}/blob", self.body),
        ]
        for url, expected in requests:
            host = url.split("/")[2]
            head, body = await client.request(f"GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
            self.assertEqual(support.sha256(body), support.sha256(expected), url)
            self.assertNotIn(b"connection: close", head.lower())
        self.assertFalse(client.closed.called, "the proxy closed the keep-alive connection")
        self.assertEqual(len(self.local_service.factory.connections), 1)
        # A, B, A: the server connection was replaced at each change of host.
        self.assertEqual(self.server_service.factory.accepted, 3)
        client.transport.loseConnection()
        await client.closed

    def test_keep_alive_two_hosts(self):
        """Three requests on one connection, to host A, host B, then A again: each response is whole and the connection stays."""
        return defer.Deferred.fromCoroutine(self._switch())

    async def _http10(self) -> None:
        socks_port = self.chain(method="aes-256-gcm")
        client = _KeepAliveClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", socks_port), client)
        url = f"http://localhost:{self.web_port}/blob"
        for header in ("Connection: keep-alive", "Proxy-Connection: Keep-Alive", "Connection: Keep-Alive"):
            head, body = await client.request(f"GET {url} HTTP/1.0\r\n{header}\r\n\r\n".encode())
            self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
            self.assertIn(b"\r\nconnection: keep-alive", head.lower())
            self.assertEqual(support.sha256(body), support.sha256(self.body), header)
        self.assertFalse(client.closed.called, "the proxy closed the keep-alive connection")
        self.assertEqual(len(self.local_service.factory.connections), 1)
        self.assertEqual(self.server_service.factory.accepted, 1, "the server connection was not kept")
        head, body = await client.request(f"GET {url} HTTP/1.0\r\n\r\n".encode())
        self.assertIn(b"\r\nconnection: close", head.lower())
        self.assertEqual(support.sha256(body), support.sha256(self.body))
        await support.within(10, client.closed, "the proxy kept an HTTP/1.0 connection that did not ask for it")

    def test_http10_keep_alive(self):
        """HTTP/1.0 requests asking for keep-alive (Connection or Proxy-Connection) share one connection; one that does not ask ends it."""
        return defer.Deferred.fromCoroutine(self._http10())


class MissingHostTests(ProxyClientTestCase):
    """Proxy requests without Host, as some clients send them: the request line names the target."""

    async def _missing_host(self) -> None:
        socks_port = self.chain(method="aes-256-gcm")
        target = f"127.0.0.1:{self.web_port}"
        client = _KeepAliveClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", socks_port), client)
        head, body = await client.request(f"GET http://{target}/host HTTP/1.1\r\nAccept: */*\r\n\r\n".encode())
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertEqual(body, target.encode(), "the origin did not get Host from the target")
        tunnel = _KeepAliveClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", socks_port), tunnel)
        head, _ = await tunnel.request(f"CONNECT {target} HTTP/1.1\r\nUser-Agent: t\r\n\r\n".encode())
        self.assertEqual(head, b"HTTP/1.1 200 Connection established")
        # Through the tunnel, straight to the origin.
        head, body = await tunnel.request(f"GET /blob HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertEqual(support.sha256(body), support.sha256(self.body))
        for each in (client, tunnel):
            each.transport.loseConnection()
            await each.closed

    def test_absolute_form_and_connect(self):
        """GET http://... and CONNECT host:port without Host, over real sockets: the origin gets Host from the target, the tunnel carries 3 MiB intact."""
        return defer.Deferred.fromCoroutine(self._missing_host())


class _Collect(protocol.Protocol):
    """A raw client: sends one request, keeps every byte until the proxy closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.closed: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason=None) -> None:
        if not self.closed.called:  # (timed out)
            self.closed.callback(self.received)


class _BadLengthOrigin(protocol.Protocol):
    """An origin answering a request head with a response whose Content-Length is the factory's `value`."""

    def __init__(self) -> None:
        self.head = b""

    def dataReceived(self, data: bytes) -> None:
        self.head += data
        if b"\r\n\r\n" in self.head:
            self.factory.requests += 1
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: " + self.factory.value + b"\r\n\r\nbody")
            self.head = b""


class BadContentLengthTests(ChainTestCase):
    """A Content-Length that is not a sane ASCII number, over real sockets: answered, that connection ended, nothing logged."""

    def setUp(self) -> None:
        super().setUp()
        self.events: list = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        factory = protocol.Factory.forProtocol(_BadLengthOrigin)
        factory.requests = 0
        self.origin_factory = factory
        self.origin = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.origin.stopListening)

    async def exchange(self, port: int, request: bytes) -> bytes:
        """Send `request` to `port`; everything received until the proxy closed (within 10 s)."""
        client = _Collect(request)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        client.closed.addTimeout(10, reactor)
        try:
            return await client.closed
        except defer.TimeoutError:
            client.transport.abortConnection()
            raise AssertionError(f"the proxy did not close the connection; it sent {client.received[:60]!r}") from None

    def assert_quiet(self) -> None:
        loud = [e for e in self.events if "log_failure" in e or e["log_level"] >= LogLevel.warn]
        self.assertEqual(loud, [])

    VALUES = ["\u00b2".encode(), b"9" * 5000, b"9" * 21]

    async def _requests(self) -> None:
        local_port = self.chain(method="aes-256-gcm")
        target = f"127.0.0.1:{self.origin.getHost().port}".encode()
        for value in self.VALUES:
            received = await self.exchange(
                local_port, b"POST http://" + target + b"/ HTTP/1.1\r\nHost: " + target + b"\r\nContent-Length: " + value + b"\r\n\r\n"
            )
            self.assertTrue(received.startswith(b"HTTP/1.1 400 Bad Request\r\n"), (value[:10], received[:60]))
        self.assertEqual(self.server_service.factory.accepted, 0)
        self.assertEqual(self.origin_factory.requests, 0)
        self.assert_quiet()

    def test_request_content_length(self):
        """A request whose Content-Length is ², 5,000 or 21 digits gets 400 and a close, reaches no server, and logs nothing."""
        return defer.Deferred.fromCoroutine(self._requests())

    async def _responses(self) -> None:
        local_port = self.chain(method="aes-256-gcm")
        target = f"127.0.0.1:{self.origin.getHost().port}".encode()
        for count, value in enumerate(self.VALUES, 1):
            self.origin_factory.value = value
            received = await self.exchange(local_port, b"GET http://" + target + b"/ HTTP/1.1\r\nHost: " + target + b"\r\n\r\n")
            self.assertTrue(received.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), (value[:10], received[:60]))
            self.assertNotIn(b"body", received)
            self.assertEqual(self.origin_factory.requests, count)
        self.assert_quiet()

    def test_response_content_length(self):
        """An origin's response whose Content-Length is ², 5,000 or 21 digits gets the client 502 and a close, and logs nothing."""
        return defer.Deferred.fromCoroutine(self._responses())


def _tool_env(directory: str, **extra: str) -> dict[str, str]:
    # Settings of this machine's user must not steer the tools: requests lets
    # REQUESTS_CA_BUNDLE override pip's --cert, PIP_* adds indexes.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIP_", "GIT_")) and k not in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")}
    env.update(NO_PROXY_ENV)
    env.update(HOME=directory, GIT_CONFIG_NOSYSTEM="1", GIT_TERMINAL_PROMPT="0", PIP_CONFIG_FILE=os.devnull,
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    env.update(extra)
    return env


class ToolTests(ChainTestCase):
    """git and pip through the proxy, as their users configure them."""

    def setUp(self) -> None:
        super().setUp()
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory)

    def _repository(self) -> tuple[str, str]:
        """A bare repository ready for git's dumb HTTP protocol; returns its path and HEAD commit."""
        work = os.path.join(self.directory, "work")
        env = _tool_env(self.directory)
        git = ["git", "-c", "user.name=ssx", "-c", "user.email=ssx@example.invalid", "-c", "init.defaultBranch=main"]
        subprocess.run([*git, "init", "-q", work], check=True, env=env, timeout=30)
        for i in range(20):
            with open(os.path.join(work, f"file{i}.bin"), "wb") as f:
                f.write(os.urandom(20_000))
        subprocess.run([*git, "-C", work, "add", "."], check=True, env=env, timeout=30)
        subprocess.run([*git, "-C", work, "commit", "-qm", "test"], check=True, env=env, timeout=30)
        bare = os.path.join(self.directory, "repo.git")
        subprocess.run([*git, "clone", "-q", "--bare", work, bare], check=True, env=env, timeout=30)
        subprocess.run(["git", "-C", bare, "update-server-info"], check=True, env=env, timeout=30)
        head = subprocess.run(["git", "-C", work, "rev-parse", "HEAD"], check=True, env=env, capture_output=True,
                              text=True, timeout=30).stdout.strip()
        return bare, head

    async def _git(self, scheme: str) -> None:
        if shutil.which("git") is None:
            raise unittest.SkipTest("git is not installed")
        bare, head = self._repository()
        root = resource.Resource()
        root.putChild(b"repo.git", static.File(bare))
        site = web_server.Site(root)
        proxy = None
        if scheme == "https":
            key, cert = support.make_certificate(os.path.join(self.directory, "tls"))
            web = support.listen_web(site, key, cert)
        else:
            web = support.listen_web(site)
        self.addCleanup(web.stopListening)
        socks_port = self.chain(method="chacha20-ietf-poly1305")
        proxy = f"http://127.0.0.1:{socks_port}"
        clone = os.path.join(self.directory, f"clone-{scheme}")
        if scheme == "https":
            env = _tool_env(self.directory, HTTPS_PROXY=proxy, https_proxy=proxy, GIT_SSL_CAINFO=cert)
            args = ["clone", "-q", f"https://localhost:{web.getHost().port}/repo.git", clone]
        else:
            env = _tool_env(self.directory)
            args = ["-c", f"http.proxy={proxy}", "clone", "-q", f"http://localhost:{web.getHost().port}/repo.git", clone]
        out, err, code = await getProcessOutputAndValue("git", args, env=env)
        self.assertEqual(code, 0, err)
        out, err, code = await getProcessOutputAndValue("git", ["-C", clone, "rev-parse", "HEAD"], env=env)
        self.assertEqual(out.decode().strip(), head)
        out, err, code = await getProcessOutputAndValue("git", ["-C", clone, "fsck", "--full"], env=env)
        self.assertEqual(code, 0, err)
        self.assertGreater(self.server_service.factory.accepted, 0, "git bypassed the proxy")

    def test_git_http_proxy(self):
        """git clone over dumb HTTP with http.proxy (plain forwarding, many keep-alive requests) gets the same commit."""
        return defer.Deferred.fromCoroutine(self._git("http"))

    def test_git_https_proxy(self):
        """git clone of an https:// repository with HTTPS_PROXY (CONNECT) gets the same commit."""
        return defer.Deferred.fromCoroutine(self._git("https"))

    def _wheel(self) -> bytes:
        """A minimal valid wheel of a package named ssxdemo."""
        files = {
            "ssxdemo/__init__.py": b"VALUE = 1\n",
            "ssxdemo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: ssxdemo\nVersion: 1.0\n\n",
            "ssxdemo-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: ssx-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n\n",
        }
        import base64

        record = "".join(
            f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
            for name, data in files.items()
        ) + "ssxdemo-1.0.dist-info/RECORD,,\n"
        files["ssxdemo-1.0.dist-info/RECORD"] = record.encode()
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for name, data in files.items():
                archive.writestr(name, data)
        return buffer.getvalue()

    async def _pip(self) -> None:
        wheel = self._wheel()
        name = "ssxdemo-1.0-py3-none-any.whl"
        root = resource.Resource()
        simple, project, files = resource.Resource(), resource.Resource(), resource.Resource()
        root.putChild(b"simple", simple)
        root.putChild(b"files", files)
        simple.putChild(b"ssxdemo", project)
        page = f'<html><body><a href="/files/{name}#sha256={hashlib.sha256(wheel).hexdigest()}">{name}</a></body></html>'
        project.putChild(b"", static.Data(page.encode(), "text/html"))
        files.putChild(name.encode(), static.Data(wheel, "application/octet-stream"))
        key, cert = support.make_certificate(os.path.join(self.directory, "tls"))
        web = support.listen_web(web_server.Site(root), key, cert)
        self.addCleanup(web.stopListening)
        socks_port = self.chain(method="aes-256-gcm")
        proxy = f"http://127.0.0.1:{socks_port}"
        destination = os.path.join(self.directory, "downloads")
        env = _tool_env(self.directory, HTTPS_PROXY=proxy, https_proxy=proxy)
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "pip", "download", "--no-deps", "--no-cache-dir", "--timeout", "20", "--cert", cert,
             "--index-url", f"https://localhost:{web.getHost().port}/simple/", "-d", destination, "ssxdemo"],
            env=env,
        )
        self.assertEqual(code, 0, err)
        with open(os.path.join(destination, name), "rb") as f:
            self.assertEqual(support.sha256(f.read()), support.sha256(wheel))
        self.assertGreater(self.server_service.factory.accepted, 0, "pip bypassed the proxy")

    def test_pip_https_proxy(self):
        """pip download from an https:// index with HTTPS_PROXY gets the wheel intact."""
        return defer.Deferred.fromCoroutine(self._pip())
