"""
Many access keys on one port (outline-ss-server's), 2022 ChaCha users,
and per-key limits.

The key lookup (`ssx.crypto.KeyRing`) and the limits (`KeyUsage`) on
in-memory data; the config forms (JSON `keys`, a `servers` entry's keys,
Outline's YAML file); then end to end on loopback: a port of three keys
with a client per key (ssx-local in twistd, libev's ss-local, ssx-local
in-process), each counted under its id, a wrong key's silence, UDP per
key, an Outline YAML file served by `twistd ssx-server -c keys.yml`,
2022 ChaCha users, and a key past its limits.
"""

from __future__ import annotations

import base64
import os

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

from ssx.config import read_config_file, server_config
from ssx.crypto import AccessKey, CipherSuite, KeyRing, Suite2022, make_key_ring, make_suite
from ssx.errors import AuthenticationError, ConfigError
from ssx.server.key_limits import KeyLimit, KeyUsage
from ssx.server.ports import port_credentials
from ssx.server.accounting import UserTraffic
from ssx.wire.address import Address, encode_address
from tests import support
from tests.support import HashingEchoFactory, whole_echo_transfer

# Three keys on one port, two AEAD-2017 ciphers among them (and two salt sizes).
KEYS = [
    {"id": "alice", "cipher": "aes-128-gcm", "secret": "alice's secret"},
    {"id": "bob", "cipher": "chacha20-ietf-poly1305", "secret": "bob's secret"},
    {"id": "carol", "cipher": "aes-256-gcm", "secret": "carol's secret"},
]
CHACHA_2022 = "2022-blake3-chacha20-poly1305"


class _CountingSuite(CipherSuite):
    """A suite that counts how often a lookup tried it."""

    tries = 0

    def opens_first_chunk(self, data: bytes | memoryview) -> bool:
        self.tries += 1
        return super().opens_first_chunk(data)


def _ring(count: int, method: str = "aes-128-gcm") -> KeyRing:
    return KeyRing([AccessKey(f"k{i}", _CountingSuite(method, f"secret {i}")) for i in range(count)])


def _request(suite: CipherSuite | Suite2022, payload: bytes = b"hello") -> bytes:
    return suite.client_codec().first(Address("192.0.2.1", 80), payload)


class KeyRingTests(unittest.SynchronousTestCase):
    """The lookup of a connection's or a datagram's key, in memory."""

    def test_move_to_front(self):
        """A matched key moves to the front, the others keep their order, and the next lookup for it costs one try."""
        ring = _ring(4)
        found = ring.find(_request(ring.keys[2].suite))
        self.assertEqual(found.id, "k2")
        self.assertEqual([key.id for key in ring.keys], ["k2", "k0", "k1", "k3"])
        for key in ring.keys:
            key.suite.tries = 0  # type: ignore[union-attr]
        self.assertEqual(ring.find(_request(found.suite)).id, "k2")
        self.assertEqual([key.suite.tries for key in ring.keys], [1, 0, 0, 0])  # type: ignore[union-attr]

    def test_miss_tries_every_key(self):
        """A stream no key opens tried every key once, then fails as a bad tag does, leaving the order alone."""
        ring = _ring(5)
        stranger = CipherSuite("aes-128-gcm", "no such key")
        with self.assertRaises(AuthenticationError):
            ring.find(_request(stranger))
        self.assertEqual([key.suite.tries for key in ring.keys], [1] * 5)  # type: ignore[union-attr]
        self.assertEqual([key.id for key in ring.keys], [f"k{i}" for i in range(5)])

    def test_codec_waits_for_the_longest_salt(self):
        """Fed a byte at a time, a port's codec finds the key once the longest salt's first chunk is in, and decrypts."""
        ring = make_key_ring("", "", keys=[(k["id"], k["cipher"], k["secret"]) for k in KEYS])
        data = _request(make_suite("aes-128-gcm", "alice's secret"), b"payload")
        codec = ring.server_codec()
        out = b"".join(codec.decrypt(data[i:i + 1]) for i in range(len(data)))
        self.assertEqual((out, codec.address, codec.user), (b"payload", Address("192.0.2.1", 80), "alice"))

    def test_wrong_key_is_an_authentication_error(self):
        """A stream under no key of the port fails in the codec as a bad tag does with one key."""
        ring = make_key_ring("", "", keys=[(k["id"], k["cipher"], k["secret"]) for k in KEYS])
        with self.assertRaises(AuthenticationError):
            ring.server_codec().decrypt(_request(make_suite("aes-256-gcm", "wrong")))

    def test_one_key_is_the_suite_itself(self):
        """A password's port is a ring of one: no id, no user, its suite's codec decrypting as ever."""
        ring = make_key_ring("chacha20-ietf-poly1305", "pw")
        self.assertEqual(len(ring), 1)
        codec = ring.server_codec()
        self.assertEqual(codec.decrypt(_request(ring.suite)), b"hello")
        self.assertIsNone(codec.user)

    def test_datagrams(self):
        """Each datagram opens with its own key (moved to the front); no key opening it is an authentication error."""
        ring = make_key_ring("", "", keys=[(k["id"], k["cipher"], k["secret"]) for k in KEYS])
        carol = make_suite("aes-256-gcm", "carol's secret")
        key, plain = ring.open_datagram(carol.udp_seal(encode_address(Address("192.0.2.1", 53)) + b"q"))
        self.assertEqual((key.id, plain[-1:]), ("carol", b"q"))
        self.assertEqual(ring.keys[0].id, "carol")
        with self.assertRaises(AuthenticationError):
            ring.open_datagram(make_suite("aes-256-gcm", "x").udp_seal(b"\x01\x00\x00\x00\x00\x00\x35q"))

    def test_chacha_2022_users(self):
        """A 2022 ChaCha port with users finds each user's connection and datagram by trying the users' keys."""
        psks = {name: base64.b64encode(os.urandom(32)).decode() for name in ("ann", "ben")}
        ring = make_key_ring(CHACHA_2022, base64.b64encode(os.urandom(32)).decode(), users=psks)
        ben = Suite2022(CHACHA_2022, psks["ben"])
        codec = ring.server_codec()
        self.assertEqual(codec.decrypt(_request(ben)), b"hello")
        self.assertEqual(codec.user, "ben")
        packet = ben.udp_client_codec().seal(encode_address(Address("192.0.2.1", 53)) + b"q")
        decoded = ring.udp_server_decoder().decode(packet)
        self.assertEqual((decoded.user.name if decoded.user else None, decoded.payload), ("ben", b"q"))

    def test_mixed_editions_refused(self):
        """AEAD-2017 and 2022 keys on one port are a config error naming keys."""
        with self.assertRaises(ConfigError) as caught:
            make_key_ring("", "", keys=[("a", "aes-128-gcm", "x"), ("b", "2022-blake3-aes-128-gcm", "A" * 22 + "==")])
        self.assertEqual(caught.exception.key, "keys")


class KeyUsageTests(unittest.SynchronousTestCase):
    """Per-key limits on a Clock, their log lines captured."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.usage = KeyUsage(self.clock.seconds)
        self.events = support.log_events(self)

    def lines(self, key: str) -> list[str]:
        return [text for text in support.event_texts(self.events) if text.startswith(f"key {key}:")]

    def test_max_connections(self):
        """Beyond max_connections a key is refused (one line per episode); a closed connection makes room again."""
        limit = KeyLimit(max_connections=2)
        self.assertEqual([self.usage.admit("a", limit) for _ in range(4)], [True, True, False, False])
        self.assertEqual(len(self.lines("a")), 1)
        self.assertIn("max_connections", self.lines("a")[0])
        self.usage.release("a")
        self.assertTrue(self.usage.admit("a", limit))
        self.assertFalse(self.usage.admit("a", limit))
        self.assertEqual(len(self.lines("a")), 2)
        self.assertEqual(self.usage.refused, 3)

    def test_quota_per_period(self):
        """Past its quota a key is refused until its period ends, with one line that names the key and no secret."""
        limit = KeyLimit(quota_bytes=1000, quota_period=3600)
        self.assertTrue(self.usage.admit("a", limit))
        counter = self.usage.counted_against("a", UserTraffic())
        counter.add_up(600)
        counter.add_down(400)
        self.assertFalse(self.usage.admit("a", limit))
        self.assertFalse(self.usage.admit("a", limit))
        self.assertEqual(len(self.lines("a")), 1)
        self.assertIn("quota of 1000 bytes", self.lines("a")[0])
        self.clock.advance(3600)
        self.assertTrue(self.usage.admit("a", limit))
        self.assertEqual(self.usage.used("a"), 0)


class KeysConfigTests(unittest.SynchronousTestCase):
    """The forms of a keys list, and a bad entry's one line."""

    def test_outline_yaml(self):
        """Outline's YAML key list becomes one port per distinct port, each with its keys, TCP and UDP."""
        path = self.mktemp() + ".yml"
        with open(path, "w") as f:
            f.write(
                "keys:\n"
                "  - {id: user-0, port: 9000, cipher: chacha20-ietf-poly1305, secret: Secret0}\n"
                "  - {id: 1, port: 9000, cipher: aes-256-gcm, secret: Secret1}\n"
                "  - {id: user-2, port: 9001, cipher: aes-128-gcm, secret: Secret2}\n"
            )
        config = server_config(read_config_file(path))
        self.assertEqual([(p.port, [k.id for k in p.keys]) for p in config.ports], [(9000, ["user-0", "1"]), (9001, ["user-2"])])
        self.assertTrue(all(p.relays.tcp and p.relays.udp for p in config.ports))

    def test_yaml_by_content(self):
        """A config file whose text is not JSON is read as YAML, whatever its name."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("server_port: 8001\npassword: pw\n")
        self.assertEqual(read_config_file(path), {"server_port": 8001, "password": "pw"})

    def test_servers_entry_keys(self):
        """A servers entry's keys (without port) are that entry's port's, with their limits."""
        config = server_config({"servers": [{"server_port": 8001, "keys": [
            {"id": "a", "cipher": "aes-128-gcm", "secret": "x", "max_connections": 3,
             "quota": {"bytes": "10G", "period": "30d"}},
        ]}]})
        key = config.ports[0].keys[0]
        self.assertEqual((key.max_connections, key.quota_bytes, key.quota_period), (3, 10 << 30, 30 * 86400.0))

    def test_password_beside_keys_refused(self):
        """A password (or key) that keys would leave unused stops start-up naming it: top-level keys, or an entry's own."""
        key = {"id": "a", "cipher": "aes-128-gcm", "secret": "x"}
        for values, name in (
            ({"server_port": 8388, "password": "y", "keys": [{**key, "port": 9000}]}, "password"),
            ({"server_port": 9000, "password": "y", "keys": [key]}, "password"),
            ({"key": "A" * 22 + "==", "keys": [key]}, "key"),
            ({"servers": [{"server_port": 9000, "password": "y", "keys": [key]}]}, "servers[0].password"),
        ):
            with self.assertRaises(ConfigError) as caught:
                server_config(values)
            self.assertEqual(caught.exception.key, name, values)
        # A top-level password for other entries is no entry's own.
        config = server_config({"password": "y", "servers": [{"server_port": 9000, "keys": [key]}, {"server_port": 9001}]})
        self.assertEqual([(p.port, len(p.keys), p.password) for p in config.port_configs()], [(9000, 1, ""), (9001, 0, "y")])

    def test_alias_bomb_quoted_short(self):
        """A YAML alias bomb where a number belongs is refused naming the key, quoted without walking all of it."""

        class Deep:
            def __repr__(self) -> str:
                raise AssertionError("the error message walked the whole value")

        bomb: object = [Deep()] * 9
        for _ in range(8):
            bomb = [bomb] * 9
        for key in ("timeout", "local_address"):
            with self.assertRaises(ConfigError) as caught:
                server_config({"password": "x", key: bomb if key == "timeout" else [bomb]})
            self.assertEqual(caught.exception.key, key)
            self.assertLess(len(str(caught.exception)), 200)
        path = self.mktemp()
        with open(path + ".yml", "w") as f:
            f.write('a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n')
            for level in "bcdefghij":
                previous = chr(ord(level) - 1)
                f.write(f"{level}: &{level} [{', '.join(['*' + previous] * 9)}]\n")
            f.write("password: x\ntimeout: *j\n")
        with self.assertRaises(ConfigError) as caught:
            server_config(read_config_file(path + ".yml"))
        self.assertEqual(caught.exception.key, "timeout")

    def test_bad_entries(self):
        """Each bad key is one ConfigError naming the key and the entry."""
        good = {"id": "a", "cipher": "aes-128-gcm", "secret": "x"}
        cases = [
            ({"keys": [good, good, {**good, "cipher": "rot13"}]}, "keys[1].id"),
            ({"keys": [good, {**good, "id": "b", "cipher": "rot13"}]}, "keys[1].cipher"),
            ({"keys": [{**good, "cipher": "aes-128-cfb"}]}, "keys[0].cipher"),
            ({"keys": [{**good, "secret": ""}]}, "keys[0].secret"),
            ({"keys": [{**good, "quota": {"bytes": "lots", "period": "1d"}}]}, "keys[0].quota.bytes"),
            ({"keys": [{**good, "max_connection": 1}]}, "keys[0].max_connection"),
            ({"servers": [{"server_port": 1, "keys": [{**good, "port": 2}]}]}, "servers[0].keys[0].port"),
            ({"keys": [good], "port_password": {"1": "x"}}, "keys"),
        ]
        for values, key in cases:
            with self.assertRaises(ConfigError) as caught:
                server_config(values)
            self.assertEqual(caught.exception.key, key, values)
            self.assertNotIn("x'", caught.exception.message)


class _KeysCase(support.LoopbackCase):
    """A server of three keys on one port in trial's reactor, and a hashing echo."""

    def setUp(self) -> None:
        super().setUp()
        self.echo_factory = HashingEchoFactory()
        self.echo_port = self.listen(reactor.listenTCP(0, self.echo_factory, interface="127.0.0.1")).getHost().port

    async def relay_through(self, socks_port: int, size: int, context: str = "") -> None:
        """`size` random bytes to the echo through `socks_port` and back: checked byte for byte at both ends."""
        payload = os.urandom(size)
        before = len(self.echo_factory.inbound)
        reply, received = await whole_echo_transfer(socks_port, "127.0.0.1", self.echo_port, payload)
        self.assertEqual(reply, 0, context)
        self.assertEqual(len(self.echo_factory.inbound), before + 1, context)
        target = self.echo_factory.inbound[-1]
        self.assertEqual((target.size, target.digest.hexdigest()), (size, support.sha256(payload)), context)
        self.assertEqual(support.sha256(received), support.sha256(payload), context)


class ThreeKeysTests(_KeysCase):
    """Three keys on one port, a client per key."""

    async def _three_clients(self) -> None:
        server, port = self.server(keys=KEYS, timeout=30)
        alice, bob, carol = KEYS
        twistd_socks = support.free_port()
        child = await support.start_twistd(
            self, "-n", "--pidfile=", "ssx-local", "-s", "127.0.0.1", "-p", str(port), "-l", str(twistd_socks),
            "-k", alice["secret"], "-m", alice["cipher"], ready=b"listening on",
        )
        await self.relay_through(twistd_socks, 300_000, child.text())
        libev, libev_socks = await support.start_ss_local(self, port, bob["cipher"], bob["secret"])
        await self.relay_through(libev_socks, 200_000, libev.text())
        _, local_socks = self.local(port, method=carol["cipher"], password=carol["secret"])
        await self.relay_through(local_socks, 100_000)
        traffic = server.factory.user_traffic
        self.assertEqual({user: (traffic[user].up, traffic[user].down) for user in traffic}, {
            "alice": (300_000, 300_000), "bob": (200_000, 200_000), "carol": (100_000, 100_000),
        })
        self.assertEqual(server.factory.handshake_failures, 0)

    @support.requires("ss-local", package="shadowsocks-libev")
    def test_a_client_per_key(self):
        """ssx-local (twistd), ss-local and ssx-local, each with its own key of one port, relay intact, each counted under its key's id."""
        return defer.Deferred.fromCoroutine(self._three_clients())

    async def _wrong_key(self) -> None:
        server, port = self.server(keys=KEYS, timeout=30)
        stranger = make_suite("aes-256-gcm", "nobody's secret")
        client = await self.connect(port, support.RawClient(_request(stranger, os.urandom(100))))
        await support.wait_for(lambda: server.factory.handshake_failures == 1, 5, lambda: "no handshake failure counted")
        # Silence: no byte, the connection open, until the client closes it.
        self.assertEqual(bytes(client.received), b"")
        self.assertFalse(client.closed.called)
        client.transport.loseConnection()
        await client.closed
        self.assertEqual((bytes(client.received), client.ending), (b"", "FIN"))
        self.assertEqual(len(server.factory.user_traffic), 0)
        self.assertEqual(self.echo_factory.inbound, [])

    def test_wrong_key_silence(self):
        """A connection under no key of the port gets silence (open, no byte) until it closes, as a bad tag does."""
        return defer.Deferred.fromCoroutine(self._wrong_key())

    async def _udp(self) -> None:
        echo_port, echo = support.listen_udp_echo()
        self.listen(echo_port)
        server, port = self.server(keys=KEYS, mode="tcp_and_udp")
        sent = {key["id"]: 0 for key in KEYS}
        resent = 0
        for key in (KEYS[2], KEYS[0], KEYS[1], KEYS[0]):
            _, socks = self.local(port, method=key["cipher"], password=key["secret"], mode="tcp_and_udp")
            client = support.Socks5UdpClient()
            self._udp_clients.append(client)
            self.assertEqual(await client.open(socks), 0)
            payloads = [os.urandom(n) for n in (1, 100, 1400)]
            # Each echo comes back sealed with the sender's key, or its client could not open it.
            resent += await client.exchange("127.0.0.1", echo_port.getHost().port, payloads)
            sent[key["id"]] += sum(map(len, payloads))
            relay = server.udp_relays[0]
            self.assertEqual(relay.credentials.ring.keys[0].id, key["id"])
        self.assertEqual(server.udp_relays[0].dropped, 0)
        # Each key's payloads, both ways, under its id (more only if loopback lost a datagram).
        traffic = server.factory.user_traffic
        counted = {user: (traffic[user].up, traffic[user].down) for user in traffic}
        if resent:
            self.assertTrue(all(counted[user][0] >= n and counted[user][1] >= n for user, n in sent.items()), counted)
        else:
            self.assertEqual(counted, {user: (n, n) for user, n in sent.items()})

    def test_udp_per_key(self):
        """Datagrams of clients with different keys of one port each come back under their own key, counted under its id."""
        return defer.Deferred.fromCoroutine(self._udp())


class ReplaceKeysTests(_KeysCase):
    """A running port's keys replaced in place, as a reload does."""

    async def _replace(self) -> None:
        server, port = self.server(keys=KEYS[:2], timeout=30, mode="tcp_and_udp")
        alice, bob, carol = KEYS
        _, alice_socks = self.local(port, method=alice["cipher"], password=alice["secret"])
        await self.relay_through(alice_socks, 10_000)
        config = server_config({"server_port": port, "keys": [bob, carol]}).ports[0]
        (served,) = server.ports.values()
        new = port_credentials(config, reactor.seconds)
        served.replace_credentials(new)
        self.assertTrue(all(relay.credentials is new for relay in served.udp_relays))
        _, carol_socks = self.local(port, method=carol["cipher"], password=carol["secret"])
        await self.relay_through(carol_socks, 10_000)
        stranger = make_suite(alice["cipher"], alice["secret"])
        client = await self.connect(port, support.RawClient(_request(stranger)))
        await support.wait_for(lambda: server.factory.handshake_failures == 1, 5, lambda: "alice was not refused")
        self.assertEqual(bytes(client.received), b"")
        client.transport.loseConnection()
        await client.closed

    def test_replace_credentials(self):
        """After a port's credentials are replaced, an added key relays and a removed one gets silence."""
        return defer.Deferred.fromCoroutine(self._replace())


class OutlineFileTests(_KeysCase):
    """An Outline key file served by twistd."""

    async def _yaml(self) -> None:
        ports = [support.free_port(), support.free_port()]
        keys = [
            ("user-0", ports[0], "chacha20-ietf-poly1305", "Secret0"),
            ("user-1", ports[0], "aes-256-gcm", "Secret1"),
            ("user-2", ports[1], "chacha20-ietf-poly1305", "Secret2"),
            ("user-3", ports[1], "aes-128-gcm", "Secret3"),
        ]
        path = os.path.abspath(self.mktemp()) + ".yml"
        with open(path, "w") as f:
            f.write("keys:\n")
            for key_id, port, cipher, secret in keys:
                f.write(f"  - id: {key_id}\n    port: {port}\n    cipher: {cipher}\n    secret: {secret}\n")
        child = await support.start_twistd(
            self, "-n", "--pidfile=", "ssx-server", "-c", path, "--forbidden-ip=", "-s", "127.0.0.1", ready=b"listening on",
        )
        for port in ports:
            await support.wait_for_port(port)
        for key_id, port, cipher, secret in keys:
            _, socks = self.local(port, method=cipher, password=secret)
            await self.relay_through(socks, 100_000, f"{key_id}\n{child.text()}")
        self.assertNotIn("Secret", child.text())

    def test_outline_yaml_file(self):
        """`twistd ssx-server -c keys.yml` with Outline's key list serves every key on its port."""
        return defer.Deferred.fromCoroutine(self._yaml())


class Chacha2022UsersTests(_KeysCase):
    """2022 ChaCha users, found by trying each user's key."""

    async def _users(self) -> None:
        psks = {name: base64.b64encode(os.urandom(32)).decode() for name in ("ann", "ben", "cy")}
        server, port = self.server(
            method=CHACHA_2022, password=base64.b64encode(os.urandom(32)).decode(),
            users=[{"name": n, "password": p} for n, p in psks.items()],
        )
        for name in ("cy", "ann"):
            _, socks = self.local(port, method=CHACHA_2022, password=psks[name])
            await self.relay_through(socks, 100_000, name)
        traffic = server.factory.user_traffic
        self.assertEqual({user: (traffic[user].up, traffic[user].down) for user in traffic},
                         {"cy": (100_000, 100_000), "ann": (100_000, 100_000)})

    def test_chacha_users(self):
        """Users of a 2022-blake3-chacha20-poly1305 port relay intact, each counted under its name."""
        return defer.Deferred.fromCoroutine(self._users())

    async def _udp(self) -> None:
        echo_port, _ = support.listen_udp_echo()
        self.listen(echo_port)
        psks = {name: base64.b64encode(os.urandom(32)).decode() for name in ("ann", "ben")}
        server, port = self.server(
            method=CHACHA_2022, password=base64.b64encode(os.urandom(32)).decode(), mode="tcp_and_udp",
            users=[{"name": n, "password": p} for n, p in psks.items()],
        )
        for name in ("ben", "ann"):
            _, socks = self.local(port, method=CHACHA_2022, password=psks[name], mode="tcp_and_udp")
            client = support.Socks5UdpClient()
            self._udp_clients.append(client)
            self.assertEqual(await client.open(socks), 0)
            # The replies are sealed with the user's own key, or its client could not open them.
            resent = await client.exchange("127.0.0.1", echo_port.getHost().port, [os.urandom(n) for n in (1, 500, 1400)])
            self.assertEqual(server.udp_relays[0].credentials.ring.keys[0].id, name)
            if not resent:
                traffic = server.factory.user_traffic[name]
                self.assertEqual((traffic.up, traffic.down), (1901, 1901))
        self.assertEqual(server.udp_relays[0].dropped, 0)

    def test_chacha_users_udp(self):
        """Datagrams of two users of a 2022 ChaCha port come back under each user's key, counted under the user's name."""
        return defer.Deferred.fromCoroutine(self._udp())


class Mixed2022KeysTests(_KeysCase):
    """Access keys of different 2022 methods on one port."""

    async def _udp(self) -> None:
        echo_port, _ = support.listen_udp_echo()
        self.listen(echo_port)
        keys = [
            {"id": "aes128", "cipher": "2022-blake3-aes-128-gcm", "secret": base64.b64encode(os.urandom(16)).decode()},
            {"id": "aes256", "cipher": "2022-blake3-aes-256-gcm", "secret": base64.b64encode(os.urandom(32)).decode()},
            {"id": "chacha", "cipher": CHACHA_2022, "secret": base64.b64encode(os.urandom(32)).decode()},
        ]
        server, port = self.server(keys=keys, mode="tcp_and_udp")
        # The first key tried is another method's: the session must still be the sender's.
        for key in (keys[2], keys[1], keys[0], keys[2]):
            _, socks = self.local(port, method=key["cipher"], password=key["secret"], mode="tcp_and_udp")
            client = support.Socks5UdpClient()
            self._udp_clients.append(client)
            self.assertEqual(await client.open(socks), 0)
            # Each echo comes back sealed in the sender's method and key, or its client could not open it.
            await client.exchange("127.0.0.1", echo_port.getHost().port, [os.urandom(n) for n in (1, 700)])
            self.assertEqual(server.udp_relays[0].credentials.ring.keys[0].id, key["id"])
        self.assertEqual(server.udp_relays[0].dropped, 0)

    def test_udp_replies_in_each_keys_method(self):
        """UDP through a port of 2022 keys of three methods: each client's replies are sealed in its own key's method."""
        return defer.Deferred.fromCoroutine(self._udp())


class KeyLimitTests(_KeysCase):
    """A key past its limits gets silence; the operator gets one line."""

    async def silent(self, server: object, port: int, key: dict, failures: int) -> None:
        """A request under `key` gets silence: open, no byte, nothing reaches the echo."""
        suite = make_suite(key["cipher"], key["secret"])
        request = suite.client_codec().first(Address("127.0.0.1", self.echo_port), b"x" * 10)
        before = len(self.echo_factory.inbound)
        client = await self.connect(port, support.RawClient(request))
        await support.wait_for(lambda: server.factory.key_usage.refused == failures, 5,  # type: ignore[attr-defined]
                               lambda: "the connection was not refused")
        self.assertEqual(bytes(client.received), b"")
        self.assertFalse(client.closed.called)
        self.assertEqual(len(self.echo_factory.inbound), before)
        client.transport.loseConnection()
        await client.closed

    async def _connections(self) -> None:
        events = support.log_events(self)
        keys = [{**KEYS[0], "max_connections": 1}, KEYS[1]]
        server, port = self.server(keys=keys, timeout=30)
        alice = make_suite(keys[0]["cipher"], keys[0]["secret"])
        # One connection of alice's, open and relaying.
        first = await self.connect(port, support.RawClient(alice.client_codec().first(Address("127.0.0.1", self.echo_port), b"x")))
        await support.wait_for(lambda: len(self.echo_factory.inbound) == 1, 5, lambda: "the first connection never relayed")
        await self.silent(server, port, keys[0], 1)
        await self.silent(server, port, keys[0], 2)
        lines = [t for t in support.event_texts(events) if t.startswith("key alice:")]
        self.assertEqual(len(lines), 1, lines)
        self.assertNotIn(keys[0]["secret"], lines[0])
        # Another key of the port is not held back.
        _, socks = self.local(port, method=keys[1]["cipher"], password=keys[1]["secret"])
        await self.relay_through(socks, 10_000)
        first.transport.loseConnection()
        await first.closed

    def test_max_connections(self):
        """A key at its max_connections gets silence for its next connections, one log line names it, other keys go on."""
        return defer.Deferred.fromCoroutine(self._connections())

    async def _quota(self) -> None:
        events = support.log_events(self)
        keys = [{**KEYS[1], "quota": {"bytes": "100K", "period": "1d"}}]
        server, port = self.server(keys=keys, timeout=30)
        _, socks = self.local(port, method=keys[0]["cipher"], password=keys[0]["secret"])
        # 2 x 60 KB through: over the 100 KiB quota once this relay is done.
        await self.relay_through(socks, 60_000)
        await self.silent(server, port, keys[0], 1)
        await self.silent(server, port, keys[0], 2)
        lines = [t for t in support.event_texts(events) if t.startswith("key bob:")]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("quota of 102400 bytes", lines[0])

    def test_quota(self):
        """A key past its byte quota gets silence for new connections; one log line names the key and the quota."""
        return defer.Deferred.fromCoroutine(self._quota())
