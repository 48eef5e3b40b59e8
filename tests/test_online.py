"""
SIP008 online configuration: the document parser, and fetching over HTTPS
from a local server with a self-signed certificate that the test trusts
explicitly (and one it does not).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web import resource, server as web_server

from ssx.config import local_config
from ssx.errors import ConfigError
from ssx.local.online import OnlineConfigService, load_trust_root
from ssx.config.upstreams import ServerEntry
from ssx.wire.sip008 import MAX_DOCUMENT, parse_online_config
import ssx.local.tap as local_tap
from tests import support

_settings = settings(max_examples=200, deadline=None, database=None)

SECRET_PATH = b"subscription-7f3a9c"


def document(*servers: dict, **extra) -> bytes:
    return json.dumps({"version": 1, "servers": list(servers), **extra}).encode()


def server(host: str = "198.51.100.4", port: int = 8388, **extra) -> dict:
    values = {"id": "27b8a625-4f4b-4428-9f0f-8a2317db7c79", "remarks": "one", "server": host, "server_port": port,
              "password": "example", "method": "chacha20-ietf-poly1305"}
    values.update(extra)
    return values


class DocumentTests(unittest.SynchronousTestCase):
    """parse_online_config."""

    def test_spec_example(self):
        """The SIP008 example document gives its server; the usage figures are kept."""
        parsed = parse_online_config(document(server(), bytes_used=274877906944, bytes_remaining=824633720832))
        self.assertEqual(parsed.servers, (ServerEntry("198.51.100.4", 8388, "chacha20-ietf-poly1305", "example", name="one"),))
        self.assertEqual((parsed.bytes_used, parsed.bytes_remaining), (274877906944, 824633720832))

    def test_aliases_plugins_and_unknown_keys(self):
        """rust's address/port/name aliases are read, unknown keys ignored; plugin servers kept, unless their options are malformed."""
        parsed = parse_online_config(document(
            {"address": "2001:db8::1", "port": 443, "name": "v6", "password": "p", "method": "AES-256-GCM", "custom_key": 1},
            server(plugin="v2ray-plugin", plugin_opts="tls"),
            server(plugin="obfs-local", plugin_opts="obfs=http;;", remarks="bad"),
        ))
        self.assertEqual(parsed.servers, (
            ServerEntry("2001:db8::1", 443, "aes-256-gcm", "p", name="v6"),
            ServerEntry("198.51.100.4", 8388, "chacha20-ietf-poly1305", "example", plugin="v2ray-plugin", plugin_opts="tls", name="one"),
        ))
        self.assertEqual(len(parsed.skipped), 1)
        self.assertIn("servers[2] (bad): plugin_opts", parsed.skipped[0])

    def test_malformed(self):
        """Each malformed document is one ConfigError naming online_config and the problem."""
        cases = [
            (b"{not json", "not JSON"),
            (b"[]", "not a JSON object"),
            (json.dumps({"servers": []}).encode(), "version"),
            (json.dumps({"version": 2, "servers": [server()]}).encode(), "version"),
            (json.dumps({"version": True, "servers": [server()]}).encode(), "version"),
            (json.dumps({"version": 1}).encode(), "no servers list"),
            (document(), "no usable server"),
            (document(server(method="rot13")), "servers[0].method"),
            (document(server(), server(password="")), "servers[1].password"),
            (document(server(server_port=0)), "servers[0].server_port"),
            (document(server(server=None)), "servers[0].server"),
            (document(server(plugin="obfs-local", plugin_opts="a;;")), "no usable server"),
            (b" " * (MAX_DOCUMENT + 1), "larger"),
            # json.loads raises plain ValueError (int digit limit) and RecursionError for these
            (b'{"version": 1, "servers": [], "bytes_used": ' + b"9" * 5000 + b"}", "not JSON"),
            (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        ]
        for body, words in cases:
            with self.assertRaises(ConfigError, msg=body[:60]) as caught:
                parse_online_config(body)
            self.assertEqual(caught.exception.key, "online_config")
            self.assertIn(words, caught.exception.message)

    @_settings
    @given(st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(
            st.sampled_from(["version", "servers", "server", "server_port", "password", "method", "plugin", "x"]),
            children, max_size=6),
        max_leaves=20,
    ))
    def test_fuzz(self, value):
        """Any JSON value gives servers or a ConfigError naming online_config, nothing else."""
        for body in (json.dumps(value).encode(), json.dumps({"version": 1, "servers": [value]}).encode()):
            try:
                parsed = parse_online_config(body)
            except ConfigError as e:
                self.assertEqual(e.key, "online_config")
            else:
                self.assertTrue(parsed.servers)


class _Config(resource.Resource):
    """Serves whatever document the test puts in `body`."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.body = b""
        self.fetches = 0

    def render_GET(self, request):
        self.fetches += 1
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        return self.body


class FetchTests(unittest.TestCase):
    """Fetching the document over HTTPS with the real reactor."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory)
        key, self.cert = support.make_certificate(os.path.join(self.directory, "trusted"))
        _, self.other_cert = support.make_certificate(os.path.join(self.directory, "other"))
        self.config = _Config()
        root = resource.Resource()
        root.putChild(SECRET_PATH, self.config)
        web = support.listen_web(web_server.Site(root), key, self.cert)
        self.addCleanup(web.stopListening)
        self.url = f"https://localhost:{web.getHost().port}/{SECRET_PATH.decode()}"
        self.log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.received: list[tuple[ServerEntry, ...]] = []

    def service(self, ca: str, interval: float = 3600) -> OnlineConfigService:
        service = OnlineConfigService(reactor, self.url, interval, self.received.append, load_trust_root(ca), timeout=10)
        # After the service stops: its TLS connections must have finished closing.
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(
            support.wait_for(lambda: not support.outgoing_connections(), 5, "a TLS connection stayed open")))
        return service

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.log if "online config" in formatEvent(e)]

    async def _trusted(self) -> None:
        self.config.body = document(server(), server("198.51.100.5", remarks="two"))
        service = self.service(self.cert)
        self.assertTrue(await service.refresh())
        self.assertEqual([e.host for e in self.received[-1]], ["198.51.100.4", "198.51.100.5"])
        # A malformed document later: one clear line, and nothing handed on.
        self.config.body = document(server(method="rot13"))
        self.assertFalse(await service.refresh())
        self.assertEqual(len(self.received), 1)
        self.assertEqual(len(service.last_good.servers), 2)
        [rejected] = [line for line in self.lines() if "rejected" in line]
        self.assertIn("servers[0].method", rejected)
        self.assertIn("keeping the last good list (2 servers)", rejected)
        for line in self.lines():
            self.assertNotIn(SECRET_PATH.decode(), line)
            self.assertIn("https://localhost:", line)

    def test_trusted_certificate(self):
        """With the server's certificate trusted the list is fetched; a later malformed one is rejected in one log line."""
        return defer.Deferred.fromCoroutine(self._trusted())

    async def _untrusted(self) -> None:
        self.config.body = document(server())
        service = self.service(self.other_cert)
        self.assertFalse(await service.refresh())
        self.assertEqual(self.received, [])
        self.assertEqual(self.config.fetches, 0, "the document was served over an unverified connection")
        [line] = self.lines()
        self.assertIn("not fetched", line)
        self.assertIn("certificate verify failed", line)

    def test_untrusted_certificate(self):
        """With a certificate the client does not trust, the fetch fails before any request is sent."""
        return defer.Deferred.fromCoroutine(self._untrusted())

    async def _periodic(self) -> None:
        self.config.body = document(server())
        service = self.service(self.cert, interval=0.3)
        service.startService()
        self.addCleanup(service.stopService)
        await support.wait_until(lambda: bool(self.received), 5)
        self.config.body = b"<html>maintenance</html>"
        fetches = self.config.fetches
        await support.wait_until(lambda: self.config.fetches > fetches + 1, 5)
        self.assertEqual(len(self.received), 1)
        self.config.body = document(server("198.51.100.9"))
        await support.wait_until(lambda: len(self.received) > 1, 5)
        self.assertEqual([e.host for e in self.received[-1]], ["198.51.100.9"])

    def test_periodic_refresh(self):
        """The list is fetched again every interval: a bad document in between changes nothing, a new good one replaces it."""
        return defer.Deferred.fromCoroutine(self._periodic())

    async def _through(self) -> None:
        echo = support.listen_echo()
        self.addCleanup(echo.stopListening)
        ss, ss_port = support.start_server(method="aes-128-gcm", password="online-pw")
        self.addCleanup(ss.stopService)
        self.config.body = document(server("127.0.0.1", ss_port, password="online-pw", method="aes-128-gcm"))
        values = {"online_config": self.url, "online_config_ca": self.cert, "listen": "tcp:0:interface=127.0.0.1"}
        local = local_tap.build_service(reactor, local_config(values))
        local.startService()
        self.addCleanup(local.stopService)
        self.addCleanup(support.drained, local, ss)
        await support.wait_until(lambda: bool(local.picker.upstreams()), 5)
        payload = os.urandom(300_000)
        reply, received = await support.socks_transfer(local.listeners[0].port.getHost().port, "127.0.0.1",
                                                       echo.getHost().port, payload)
        self.assertEqual(reply, 0)
        self.assertEqual(support.sha256(received), support.sha256(payload))

    def test_local_end_uses_online_servers(self):
        """An ssx-local with only --online-config relays through the server the document names."""
        return defer.Deferred.fromCoroutine(self._through())


class ConfigTests(unittest.SynchronousTestCase):
    """The online config settings."""

    def test_rust_form_and_flags(self):
        """rust's {config_url, update_interval} object and the flat keys both work; only https:// is accepted."""
        config = local_config({"online_config": {"config_url": "https://example.org/x", "update_interval": 60}})
        self.assertEqual((config.online.url, config.online.interval), ("https://example.org/x", 60.0))
        config = local_config({"online_config": "https://example.org/x", "online_config_interval": "120"})
        self.assertEqual(config.online.interval, 120.0)
        for bad in ("http://example.org/x", "https://", 5):
            with self.assertRaises(ConfigError) as caught:
                local_config({"online_config": bad})
            self.assertEqual(caught.exception.key, "online_config")

    def test_bad_ca_file(self):
        """A CA file that is missing or holds no certificate stops start-up naming online_config_ca."""
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        empty = os.path.join(directory, "empty.pem")
        open(empty, "w").close()
        for path in (os.path.join(directory, "missing.pem"), empty):
            with self.assertRaises(ConfigError) as caught:
                load_trust_root(path)
            self.assertEqual(caught.exception.key, "online_config_ca")
