"""
Keys from the implementations ssx replaces: each one ssx does not honour is
one start-up warning with its advice (`ssx.config.known_keys`), the ones it
can honour change what runs, and a config without a method is told that
the original's default differs.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import defer
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

import ssx.local.tap as local_tap
import ssx.server.tap as server_tap
from ssx.config import local_config, server_config
from ssx.config.known_keys import LOCAL_PEER_KEYS, SERVER_PEER_KEYS
from ssx.config.server import LOOPBACK_LOCAL_ADDRESS
from tests import support

SERVER = {"password": "pw", "method": "aes-256-gcm", "server_port": 0}
LOCAL = {"server": "192.0.2.1", "password": "pw", "method": "aes-256-gcm", "local_port": 0}


class PeerKeyWarningTests(unittest.SynchronousTestCase):
    """Every key of the table is one warning line, with its advice, logged when the service is built."""

    def warnings(self, end: str, values: dict[str, Any]) -> list[str]:
        """The warning lines logged while `end` builds its service from `values`."""
        log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        if end == "server":
            server_tap.build_service(MemoryReactorClock(), server_config({**SERVER, **values}))
        else:
            local_tap.build_service(MemoryReactorClock(), local_config({**LOCAL, **values}))
        return [formatEvent(e) for e in log if e["log_level"] == LogLevel.warn]

    def test_server_table(self):
        """ssx-server: each key of its table gives exactly its own line and no generic 'not used' line."""
        for key, advice in SERVER_PEER_KEYS.items():
            lines = self.warnings("server", {key: 1})
            self.assertEqual([line for line in lines if key in line], [f"config key {key}: {advice}"], key)
            self.assertFalse([line for line in lines if "config keys not used" in line], lines)

    def test_local_table(self):
        """ssx-local: each key of its table gives exactly its own line and no generic 'not used' line."""
        for key, advice in LOCAL_PEER_KEYS.items():
            lines = self.warnings("local", {key: 1})
            self.assertEqual([line for line in lines if key in line], [f"config key {key}: {advice}"], key)
            self.assertFalse([line for line in lines if "config keys not used" in line], lines)

    def test_advice_is_specific(self):
        """The advice the brief names: OTA obsolete, the cryptography library, twistd's flags, TCP_NODELAY."""
        # workers and reuse_port are ssx's own keys now.
        self.assertNotIn("workers", SERVER_PEER_KEYS)
        self.assertNotIn("reuse_port", SERVER_PEER_KEYS)
        self.assertIn("OTA was removed", SERVER_PEER_KEYS["one_time_auth"])
        for key in ("libopenssl", "libmbedtls", "libsodium"):
            self.assertIn("cryptography library", SERVER_PEER_KEYS[key])
        self.assertIn("--pidfile", SERVER_PEER_KEYS["pid-file"])
        self.assertIn("--logfile", SERVER_PEER_KEYS["log-file"])
        self.assertIn("--uid/--gid", SERVER_PEER_KEYS["user"])
        self.assertIn("always sets TCP_NODELAY", SERVER_PEER_KEYS["no_delay"])
        # Another branch is implementing Fast Open.
        self.assertNotIn("fast_open", SERVER_PEER_KEYS)

    def test_unknown_keys_stay_generic(self):
        """A key in no peer's config (often a misspelt one) stays in the one 'config keys not used' line."""
        for end in ("server", "local"):
            lines = self.warnings(end, {"pasword": "x", "mtu": 1400})
            self.assertIn(f"config keys not used by ssx-{end}: pasword", lines)
            self.assertEqual(len([line for line in lines if "mtu" in line]), 1, lines)

    def test_servers_entry(self):
        """A shadowsocks-rust servers entry's keys go through the same table, named by the entry."""
        lines = self.warnings("server", {"servers": [
            {"server": "127.0.0.1", "server_port": 0, "password": "pw", "remarks": "hk", "colour": "red"},
        ]})
        self.assertIn("config key servers[0].remarks: a label; ignored", lines)
        self.assertIn("servers[0]: keys not used: colour", lines)

    def test_no_method(self):
        """Without method each end warns that the original defaulted to aes-256-cfb; with one, it does not."""
        for end, values in (("server", SERVER), ("local", LOCAL)):
            without = {k: v for k, v in values.items() if k != "method"}
            log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
            if end == "server":
                server_tap.build_service(MemoryReactorClock(), server_config(without))
                server_tap.build_service(MemoryReactorClock(), server_config(values))
            else:
                local_tap.build_service(MemoryReactorClock(), local_config(without))
                local_tap.build_service(MemoryReactorClock(), local_config(values))
            lines = [formatEvent(e) for e in log if "aes-256-cfb" in formatEvent(e)]
            self.assertEqual(lines, [
                "no method given: ssx uses chacha20-ietf-poly1305, where the original shadowsocks defaulted to "
                "aes-256-cfb; set method (-m) to what the clients use",
            ], end)
            self.assertEqual([e["log_level"] for e in log if "aes-256-cfb" in formatEvent(e)], [LogLevel.warn])

    def test_no_method_servers_entries(self):
        """servers entries that each name a method need no warning; one without does."""
        named = server_config({"servers": [{"server_port": 0, "password": "pw", "method": "aes-128-gcm"}]})
        self.assertFalse([w for w in named.warnings if "no method" in w])
        unnamed = server_config({"servers": [{"server_port": 0, "password": "pw"}]})
        self.assertTrue([w for w in unnamed.warnings if "no method" in w])


class NoMethodKeysTests(unittest.SynchronousTestCase):
    def test_access_keys_need_no_method(self):
        """A port of access keys, each naming its cipher, gets no warning about a missing method."""
        keys = [{"id": "a", "port": 9000, "cipher": "aes-128-gcm", "secret": "x"}]
        self.assertFalse([w for w in server_config({"keys": keys}).warnings if "no method" in w])
        entry = server_config({"servers": [{"server_port": 9001, "keys": [{"id": "b", "cipher": "aes-128-gcm", "secret": "y"}]}]})
        self.assertFalse([w for w in entry.warnings if "no method" in w])


class Ipv6FirstTests(unittest.SynchronousTestCase):
    """libev's ipv6_first is ssx-server's prefer_ipv6."""

    def test_alias(self):
        """ipv6_first true makes the server's resolver prefer IPv6; prefer_ipv6, where given, wins."""
        config = server_config({**SERVER, "ipv6_first": True})
        self.assertTrue(config.prefer_ipv6)
        service = server_tap.build_service(MemoryReactorClock(), config)
        self.assertTrue(service.resolver_cache.resolver.prefer_ipv6)
        self.assertFalse(server_config({**SERVER, "ipv6_first": True, "prefer_ipv6": False}).prefer_ipv6)
        self.assertFalse([w for w in config.warnings if "ipv6_first" in w])
        self.assertNotIn("ipv6_first", config.ignored)

    def test_bad_value(self):
        """A non-boolean ipv6_first stops start-up naming it."""
        from ssx.errors import ConfigError

        with self.assertRaises(ConfigError) as caught:
            server_config({**SERVER, "ipv6_first": "yes"})
        self.assertEqual(caught.exception.key, "ipv6_first")


class OriginalTunnelTests(support.LoopbackCase):
    """The original's tunnel_port, tunnel_remote and tunnel_remote_port open a tunnel on ssx-local."""

    @support.coroutine_test
    async def test_tunnel_forwards(self):
        """Bytes sent to local_address:tunnel_port come back from the echo at tunnel_remote:tunnel_remote_port."""
        _, echo_port = self.counting_echo()
        _, server_port = self.server()
        tunnel_port = support.free_port()
        self.local(server_port, tunnel_port=tunnel_port, tunnel_remote="127.0.0.1", tunnel_remote_port=echo_port)
        client = await self.connect(tunnel_port, support.RawClient(b"through the tunnel"))
        await support.wait_until(lambda: bytes(client.received) == b"through the tunnel", 5)
        self.assertEqual(bytes(client.received), b"through the tunnel")
        client.transport.loseConnection()

    def test_defaults_and_no_port(self):
        """tunnel_port alone goes to the original's 8.8.8.8:53; without tunnel_port no tunnel opens, with a warning."""
        [tunnel] = local_config({**LOCAL, "tunnel_port": 5353}).tunnels
        self.assertEqual((tunnel.listen, tunnel.target.host, tunnel.target.port),
                         ("tcp:5353:interface=127.0.0.1", "8.8.8.8", 53))
        config = local_config({**LOCAL, "tunnel_remote": "1.1.1.1"})
        self.assertEqual(config.tunnels, ())
        self.assertIn("config key tunnel_remote: no tunnel opened without tunnel_port (the original's default port, "
                      "53, is not assumed); set tunnel_port to open it", config.warnings)

    def test_bad_values(self):
        """A bad tunnel_port or tunnel_remote_port stops start-up naming it."""
        from ssx.errors import ConfigError

        for values, key in (({"tunnel_port": "x"}, "tunnel_port"),
                            ({"tunnel_port": 5353, "tunnel_remote_port": 0}, "tunnel_remote_port"),
                            ({"tunnel_port": 5353, "tunnel_remote": ""}, "tunnel_remote")):
            with self.assertRaises(ConfigError) as caught:
                local_config({**LOCAL, **values})
            self.assertEqual(caught.exception.key, key)


class OriginalConfigTwistdTests(unittest.TestCase):
    """The original's example config.json, as it stands, under `twistd ssx-server`."""

    @support.coroutine_test
    async def test_warns_and_serves(self):
        """twistd ssx-server -c with one_time_auth, fast_open and libopenssl prints a line for each and relays (workers 1: one process)."""
        echo = support.listen_echo()
        self.addCleanup(echo.stopListening)
        server_port = support.free_port()
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            json.dump({
                "server": "127.0.0.1", "server_port": server_port, "local_address": "127.0.0.1", "local_port": 1080,
                "password": "barfoo!", "timeout": 300, "method": "aes-256-cfb", "fast_open": False, "workers": 1,
                "one_time_auth": False, "libopenssl": "/usr/lib/libcrypto.so", "forbidden_ip": "",
            }, f)
        child = await support.start_twistd(self, "-n", "--pidfile=", "ssx-server", "-c", path, ready=b"clients connect to")
        text = child.text()
        for key in ("one_time_auth", "libopenssl", "local_port"):
            self.assertIn(f"config key {key}: {SERVER_PEER_KEYS[key]}", text)
        # The shared config's loopback local_address is sslocal's: not a source address.
        self.assertIn(LOOPBACK_LOCAL_ADDRESS.format(address="127.0.0.1"), text)
        self.assertNotIn("config keys not used", text)  # fast_open is honoured
        local, socks_port = support.start_local(
            server_port, password="barfoo!", method="aes-256-cfb", server="127.0.0.1",
        )
        self.addCleanup(local.stopService)
        payload = os.urandom(100_000)
        reply, received = await support.socks_transfer(socks_port, "127.0.0.1", echo.getHost().port, payload)
        self.assertEqual(reply, 0)
        self.assertEqual(support.sha256(received), support.sha256(payload))
        await defer.maybeDeferred(local.stopService)
