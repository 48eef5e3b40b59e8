"""
Tests for `ssx.crypto`: known-answer vectors (test-vectors.md §1-§4), round
trips under arbitrary fragmentation for every method, tamper and garbage
resistance of the AEAD framing, and the configuration errors.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from typing import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from zope.interface.verify import verifyClass, verifyObject

from ssx.wire.address import Address
from ssx.crypto import METHODS as ALL_METHODS, CipherSuite, MethodSpec, Suite2022, generate_psk, lookup_method, make_suite
from ssx.interfaces import ICipherSuite, ITcpClientCodec, ITcpServerCodec, IUdpClientCodec

# This file covers the CipherSuite families; the 2022 edition has its own
# suite and tests (tests/test_crypto_2022.py).
METHODS = tuple(m for m in ALL_METHODS if lookup_method(m).family != "aead2022")
METHODS_2022 = tuple(m for m in ALL_METHODS if lookup_method(m).family == "aead2022")
from ssx.crypto._kdf import derive_subkey, evp_bytes_to_key, hkdf_sha1, subkey_deriver
from ssx.crypto._xchacha import XChaCha20Poly1305
from ssx.errors import AuthenticationError, ConfigError, ProtocolError

h = bytes.fromhex

# Keep the whole module well under the brief's 30 s; no example database, so
# running the tests leaves nothing behind in the working tree.
_FEW = settings(max_examples=40, deadline=None, database=None)
_SOME = settings(max_examples=100, deadline=None, database=None)

AEAD_METHODS = tuple(m for m in METHODS if lookup_method(m).family == "aead")
STREAM_METHODS = tuple(m for m in METHODS if lookup_method(m).family == "stream")

PASSWORD_CN = "密码"
TEXT_12 = "这是原文".encode()
TEXT_64 = "Glib jocks quiz nymph to vex dwarf.1145141919810!这是原文！".encode()
REQUEST_52 = h(
    "030b6578616d706c652e636f6d0050474554202f20485454502f312e310d0a"
    "486f73743a206578616d706c652e636f6d0d0a0d0a"
)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` split at the given offsets (any order, duplicates allowed)."""
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def _decrypt_pieces(suite: CipherSuite, pieces: list[bytes]) -> bytes:
    decryptor = suite.tcp_decryptor()
    return b"".join(decryptor.decrypt(piece) for piece in pieces)


def _decrypt_bytewise(suite: CipherSuite, stream: bytes) -> bytes:
    return _decrypt_pieces(suite, [stream[i : i + 1] for i in range(len(stream))])


class MethodTableTests(SynchronousTestCase):
    """The method registry and its configuration errors."""

    def test_methods_aead_first(self) -> None:
        """METHODS lists the AEAD methods (2017, then 2022) before any insecure one."""
        families = [lookup_method(m).family for m in ALL_METHODS]
        self.assertEqual(families[:8], ["aead"] * 5 + ["aead2022"] * 3)
        self.assertFalse({"aead", "aead2022"} & set(families[8:]))

    def test_exact_method_set(self) -> None:
        """Exactly the methods of the brief are offered, libev's xchacha20-ietf-poly1305 and salsa20 included."""
        self.assertEqual(
            set(ALL_METHODS),
            {
                "aes-128-gcm", "aes-192-gcm", "aes-256-gcm", "chacha20-ietf-poly1305",
                "xchacha20-ietf-poly1305",
                "2022-blake3-aes-128-gcm", "2022-blake3-aes-256-gcm", "2022-blake3-chacha20-poly1305",
                "aes-128-cfb", "aes-192-cfb", "aes-256-cfb",
                "aes-128-ctr", "aes-192-ctr", "aes-256-ctr",
                "camellia-128-cfb", "camellia-192-cfb", "camellia-256-cfb",
                "chacha20-ietf", "chacha20", "salsa20", "rc4-md5", "bf-cfb", "none",
            },
        )

    def test_sizes(self) -> None:
        """Key and salt/IV sizes follow wire.md §5.2 and §6.1."""
        self.assertEqual(lookup_method("aes-192-gcm"), MethodSpec("aes-192-gcm", "aead", 24, 24))
        self.assertEqual(lookup_method("aes-192-cfb"), MethodSpec("aes-192-cfb", "stream", 24, 16))
        self.assertEqual(lookup_method("chacha20-ietf").salt_size, 12)
        self.assertEqual(lookup_method("chacha20").salt_size, 8)
        self.assertEqual(lookup_method("salsa20"), MethodSpec("salsa20", "stream", 32, 8))
        self.assertEqual(lookup_method("bf-cfb").salt_size, 8)
        self.assertEqual(lookup_method("none"), MethodSpec("none", "none", 0, 0))
        self.assertEqual(
            lookup_method("xchacha20-ietf-poly1305"), MethodSpec("xchacha20-ietf-poly1305", "aead", 32, 32)
        )

    def test_lookup_case_insensitive_and_alias(self) -> None:
        """Lookup ignores case and maps the alias plain to none."""
        self.assertEqual(lookup_method("AES-256-GCM").name, "aes-256-gcm")
        self.assertEqual(lookup_method("Plain").name, "none")

    def test_insecure(self) -> None:
        """Only AEAD methods (2017 and 2022) are not flagged insecure."""
        for method in ALL_METHODS:
            spec = lookup_method(method)
            self.assertEqual(spec.insecure, spec.family not in ("aead", "aead2022"), method)

    def test_2022_needs_its_suite(self) -> None:
        """CipherSuite refuses 2022 methods (they take PSKs, not EVP passwords), naming the key."""
        for method in METHODS_2022:
            with self.assertRaises(ConfigError) as caught:
                CipherSuite(method, "pw")
            self.assertEqual(caught.exception.key, "method")

    def test_unknown_method(self) -> None:
        """An unknown method is a ConfigError naming the method key and the choices."""
        for make in (lambda: lookup_method("table"), lambda: CipherSuite("rot13", "x")):
            error = self.assertRaises(ConfigError, make)
            self.assertEqual(error.key, "method")
            self.assertIn("aes-256-gcm", str(error))

    def test_from_key_wrong_length(self) -> None:
        """A raw key of the wrong length is a ConfigError naming the key key."""
        error = self.assertRaises(ConfigError, CipherSuite.from_key, "aes-256-gcm", bytes(16))
        self.assertEqual(error.key, "key")

    def test_from_key_equals_password(self) -> None:
        """from_key with the EVP key behaves like the password it came from."""
        by_password = CipherSuite("aes-128-gcm", "password")
        by_key = CipherSuite.from_key("aes-128-gcm", h("5f4dcc3b5aa765d61d8327deb882cf99"))
        salt = bytes(16)
        self.assertEqual(
            by_password.tcp_encryptor(salt).encrypt(b"x"),
            by_key.tcp_encryptor(salt).encrypt(b"x"),
        )

    def test_repr_hides_secrets(self) -> None:
        """repr() of a suite shows the method but neither password nor key."""
        password = "hunter2-secret"
        key = evp_bytes_to_key(password.encode(), 32)
        for suite in (CipherSuite("aes-256-gcm", password), CipherSuite.from_key("aes-256-gcm", key)):
            text = repr(suite)
            self.assertIn("aes-256-gcm", text)
            self.assertNotIn(password, text)
            self.assertNotIn(key.hex(), text)
            self.assertNotIn(repr(key)[2:-1], text)

    def test_import_is_clean(self) -> None:
        """Importing and using every method emits no warning and pulls in no Twisted."""
        script = (
            "import sys, ssx.crypto as c\n"
            "for m in c.METHODS:\n"
            "    if c.lookup_method(m).family == 'aead2022': continue\n"
            "    s = c.CipherSuite(m, 'pw')\n"
            "    s.tcp_decryptor().decrypt(s.tcp_encryptor().encrypt(b'x'))\n"
            "    s.udp_open(s.udp_seal(b'x'))\n"
            "assert not any(n.split('.')[0] == 'twisted' for n in sys.modules), 'twisted imported'\n"
        )
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        result = subprocess.run(
            [sys.executable, "-W", "error", "-c", script],
            cwd=root,
            capture_output=True,
            text=True,
        )
        self.assertEqual(result.returncode, 0, result.stderr)


class InterfaceTests(SynchronousTestCase):
    """Both suites, and every codec they hand out, provide the interfaces declared in ssx.interfaces."""

    def test_suite_classes(self) -> None:
        """CipherSuite and Suite2022 implement ICipherSuite, every declared method with its signature."""
        self.assertTrue(verifyClass(ICipherSuite, CipherSuite))
        self.assertTrue(verifyClass(ICipherSuite, Suite2022))

    def test_every_method(self) -> None:
        """For every method (stream, AEAD-2017, 2022, none) the suite and its TCP client, TCP server and UDP client codecs verify."""
        for method in ALL_METHODS:
            password = generate_psk(method) if lookup_method(method).family == "aead2022" else "pw"
            suite = make_suite(method, password)
            with self.subTest(method=method):
                self.assertTrue(verifyObject(ICipherSuite, suite))
                self.assertTrue(verifyObject(ITcpClientCodec, suite.client_codec()))
                self.assertTrue(verifyObject(ITcpServerCodec, suite.server_codec()))
                self.assertTrue(verifyObject(IUdpClientCodec, suite.udp_client_codec()))

    def test_codecs_interoperate_through_interfaces(self) -> None:
        """For one method of each family, a client codec's stream opens on a server codec using only interface methods."""
        target = Address("example.com", 443)
        for method in ("aes-256-cfb", "chacha20-ietf-poly1305", "2022-blake3-aes-128-gcm", "none"):
            password = generate_psk(method) if lookup_method(method).family == "aead2022" else "pw"
            suite = make_suite(method, password)
            client, server = ITcpClientCodec(suite.client_codec()), ITcpServerCodec(suite.server_codec())
            self.assertEqual(server.decrypt(client.first(target, b"ping") + client.encrypt(b"!")), b"ping!", method)
            self.assertEqual(server.address, target, method)
            self.assertEqual(client.decrypt(server.encrypt(b"pong")), b"pong", method)


class KeyDerivationTests(SynchronousTestCase):
    """EVP_BytesToKey and HKDF-SHA1 (test-vectors.md §1, §2)."""

    def test_evp_vectors(self) -> None:
        """§1.1: EVP_BytesToKey for four passwords at 16, 24 and 32 bytes."""
        table = {
            "foobar": "3858f62230ac3c915f300c664312c63f568378529614d22ddb49237d2f60bfdf",
            "barfoo!": "b3adc47839e047eb228870526dc8fc30b347287ffca3045dcea06b3fdf090acb",
            "password": "5f4dcc3b5aa765d61d8327deb882cf992b95990a9151374abd8ff8c5a7a0fe08",
            PASSWORD_CN: "a8105204604a0b11e916f3879aae3b0bce5c69f758514149da605abbf1680194",
        }
        for password, key32 in table.items():
            for size in (16, 24, 32):
                self.assertEqual(
                    evp_bytes_to_key(password.encode(), size), h(key32)[:size], password
                )

    def test_evp_published_prefixes(self) -> None:
        """§1.2: every key length 16..32 is the prefix of the published 32-byte key."""
        table = {
            "123中1文da18测)试abc!#$@(": "8c5ea5e7ade3b3133a479e6aff0506dd7952bf75984a26722070cd9e44a09353",
            "Imakethis_LongPassPhraseFor_safety_2019_0928@_@!": "4b01a2d762fada9ede4d1034a13dc69c3b528b738236b99cd3a472d2933580d6",
        }
        for password, key32 in table.items():
            for size in range(16, 33):
                self.assertEqual(evp_bytes_to_key(password.encode(), size), h(key32)[:size])

    def test_rfc5869_a4(self) -> None:
        """§2.1: RFC 5869 A.4 (HKDF-SHA1 basic case)."""
        okm = hkdf_sha1(h("0b" * 11), h("000102030405060708090a0b0c"), h("f0f1f2f3f4f5f6f7f8f9"), 42)
        self.assertEqual(
            okm,
            h("085a01ea1b10f36933068b56efa5ad81a4f14b822f5b091568a9cdd4f155fda2c22e422478d305f3f896"),
        )

    def test_ss_subkeys(self) -> None:
        """§2.2: the ss-subkey table."""
        k32 = evp_bytes_to_key(b"password", 32)
        rows = [
            (16, bytes(range(16)), "ed2a618d9490d1701de885d82aa80616"),
            (24, bytes(range(24)), "f542f92afe59abf1f7af97889b127549827646a9b6f31b82"),
            (32, bytes(range(32)), "ee187aed3f87574907a39db98606f60a526114831288097cac66054b33a9464f"),
            (32, bytes(range(0x40, 0x60)), "d680cdccaffafa1e9401e127a3889c00cd15f36867b8f245d3b352d1955ada45"),
        ]
        for size, salt, subkey in rows:
            self.assertEqual(derive_subkey(k32[:size], salt), h(subkey))

    def test_bound_deriver(self) -> None:
        """§2.2: subkey_deriver (the per-datagram path's HKDF) gives the ss-subkey table's subkeys."""
        k32 = evp_bytes_to_key(b"password", 32)
        rows = [
            (16, bytes(range(16)), "ed2a618d9490d1701de885d82aa80616"),
            (24, bytes(range(24)), "f542f92afe59abf1f7af97889b127549827646a9b6f31b82"),
            (32, bytes(range(32)), "ee187aed3f87574907a39db98606f60a526114831288097cac66054b33a9464f"),
            (32, bytes(range(0x40, 0x60)), "d680cdccaffafa1e9401e127a3889c00cd15f36867b8f245d3b352d1955ada45"),
        ]
        derivers = {size: subkey_deriver(k32[:size]) for size in (16, 24, 32)}
        for size, salt, subkey in rows:
            self.assertEqual(derivers[size](salt), h(subkey))


class AeadVectorTests(SynchronousTestCase):
    """AEAD-2017 known answers (test-vectors.md §3.1-§3.3)."""

    first_chunks = {
        "aes-128-gcm": (
            "5c1aa6a99fe1d47b5af4c815158133cbb319",
            "ff1a7ea18456ee41050a92f7f435fa36315b8158837e9ceea5d9c92755d199e85b2ca342db4d45dcac4c4644edfb8bf3e0cf62450d7a38ea95b875904a38ef352897c0e2",
            "f7d36ba51645dad8d4b901901b49f96798c0e6ba4b6150f4045785710a834d544b90a61c8b99",
        ),
        "aes-256-gcm": (
            "7e91fef206f0588a625b35e1bdb654e079c1",
            "f62bba0d4b25261b49e432d754aa72014a5129bd461251e924ec0c67983802c42d126508122152c2fd8b312f5cd4ba08197b4ab729dd0128eae8ab3d3541ae5bc9cbf3cf",
            "8e94114bfcd2320e233df713da0c03ba794d6f9e1290e0d684167cf5eb7bcd0762788e86d685",
        ),
        "chacha20-ietf-poly1305": (
            "ad7c8929287c121696078d9c81179c490949",
            "83c3ce5d825d5be9428b2bc98d01eea45c7fb1da8193ac2b754a322024f98b37b4d181cc9beda2aa8041ddd43b510afde214364566971c8dc8b0190926419b1b56fa712c",
            "ef97dc83a2888ed186b9512cd15c01a3e7ccd7f034e92943731766c4379446cfc57d8050f758",
        ),
        "xchacha20-ietf-poly1305": (
            "7839dbd9222833af9ff7aecdf74da1ec17ea",
            "e1f01f331e40ae57fd92f80dacc30264e95f287eb7560fa6fa00dc1d4646e2019318d9e18a74a8b567137c838b7d4db0dc8a76fdaeb6cf437d048ab972339fc691b97ba6",
            "53aced2df08abdaa3769b357f1c9b3fe64cd7a7f93733ba7a0cc69610cd32229a4da88450a22",
        ),
    }

    def test_tcp_first_and_second_chunk_encrypt(self) -> None:
        """§3.1: salt, first chunk and a second 'ping' chunk are byte-exact."""
        for method, (length, payload, second) in self.first_chunks.items():
            suite = CipherSuite(method, "password")
            salt = bytes(range(suite.spec.salt_size))
            encryptor = suite.tcp_encryptor(salt)
            self.assertEqual(encryptor.encrypt(REQUEST_52), salt + h(length + payload), method)
            self.assertEqual(encryptor.encrypt(b"ping"), h(second), method)

    def test_tcp_first_and_second_chunk_decrypt(self) -> None:
        """§3.1: the same stream decrypts, whole and one byte at a time."""
        for method, (length, payload, second) in self.first_chunks.items():
            suite = CipherSuite(method, "password")
            salt = bytes(range(suite.spec.salt_size))
            stream = salt + h(length + payload + second)
            decryptor = suite.tcp_decryptor()
            self.assertEqual(decryptor.decrypt(stream), REQUEST_52 + b"ping", method)
            self.assertEqual(decryptor.salt, salt)
            self.assertEqual(_decrypt_bytewise(suite, stream), REQUEST_52 + b"ping", method)

    udp_plaintext = h(
        "0108080808003512340100000100000000000003777777076578616d706c6503636f6d0000010001"
    )
    udp_packets = {
        "aes-256-gcm": "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5fa1934dbc2a99e8d5ee4fcedb27de41b8c0b442716ab95ff9fe49cc8e08b6e0a9de728a8c01d096c35d52e30dfbeafa82346b6ae4434e7567",
        "chacha20-ietf-poly1305": "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f560961fc5e043a91a8ea5ed75e4ba16515d91ae5242cc54aa14c9705fb497b8ad4fe8d2d4e827844001e1c1db487c3d13b7816bf0f518524",
        # Not in §3.2: computed with pycryptodome's own XChaCha20-Poly1305
        # (ChaCha20_Poly1305 with a 24-byte nonce, an implementation
        # independent of ours) from the §3.2 subkey and a zero 24-byte nonce.
        "xchacha20-ietf-poly1305": "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f734720b5b7011494e5ee233c541a9690ee1f1c0cc7ef75d770205fa1756c9654a72164a06f3c0ff576c1a3f17cb3036d6c973ca7f1ee2b84",
    }

    def test_udp_packets(self) -> None:
        """§3.2: UDP packets seal byte-exact with a fixed salt and open back."""
        for method, packet in self.udp_packets.items():
            suite = CipherSuite(method, "password")
            salt = bytes(range(0x40, 0x60))
            self.assertEqual(suite.udp_seal(self.udp_plaintext, salt), h(packet), method)
            self.assertEqual(suite.udp_open(h(packet)), self.udp_plaintext, method)

    published_streams = [
        ("aes-128-gcm", TEXT_12, "c3b3e419f8de8c2d4701d94f5258915a967bf7b27a9e97e4cee0c00d67caa7c992f4f41d83109f0a9a6710871501b64851ffa1588c0603c168e00a4ac50b4d729203aecfddd1475b78e338bfe943662fe25f2fe49afc1f5eb00389113d417e5e"),
        ("aes-192-gcm", TEXT_12, "c58266923546894ea26c786e1cb6e35a4a15ac9b5ba83cbdf43187f7b1d53bd0bb4e61821d519c71eb2fdcea0573aaaa0a7a0ba59a3e4e966b51750b2602c740f293720a31665f879332974ad715b0cd7a8e1428d9b7c4b71f5ed07c539f7f1a296dd39ffe354924"),
        ("aes-256-gcm", TEXT_12, "5648a2d3e86fe68d7c137ad894294f8e8b57ce55eb545cb7da69b93708e2a689a4a8798171d001ed9ef8d3e1b1c89d862604ce7e0803584719ea65e0c4025800187a0e0a2c5408519e93b2279358fb81842e9c913a76ee93ee25d4ddbfb4729fcc64411054411a01a4ada4f22c5e401e"),
        ("xchacha20-ietf-poly1305", TEXT_12, "1dca4629620bfecd77133488d3e34d9594155982cf514f554f8d0332a4007742979d66ac9524d52d03d82bad6594da985a20b53a52138b5dfc95e9ead17f1e7281568e90111b0b8d26dd11a74eb36457de35505dbb99d91ef4a4848fa9c4dffb1e5938c1a9537b3c09f1bcba762a2f64"),
        ("chacha20-ietf-poly1305", TEXT_12, "8bd996a259f861d54c4b27e740a6ad23381631dae3ab69e5c0377625752fa0f5dc68c4ae6a4c6b2c4f6bdda92ffad4e11fbf5b63bf05809d419cd0b562e927b370c627f14f42b18e146c832bfb6e6bd1f58cc71333ac60943d5592a8f8148687d6008defd21c791fc199efe26dc136e5"),
        ("aes-256-gcm", TEXT_64, "4fb44de9876054b81d156438024560fc0ef0118e294eb0950490acc0f2083595ba06df583bafcb96e7ac2916e7d064cc1f8e687aba688cb29e500cef11cb91223c17d62e0f8b7bc15d2ff7a18658f30e4e1b66a80cb3f70cfa110fceaa2c50a2271d533f3c15ba427a9ebf96cc7f0426d79c85e6dfbd3c7b26cd2a663629125feafe65659942d0fe29945e3a80b6a7e253bb400c7f0f0fcad0eb3e455d66d178af51f51a"),
        ("chacha20-ietf-poly1305", TEXT_64, "8094ac0782801abeb1e60778767df9b4310cacf43d6e52f19371e19fcc7716dd5ccf2b739de27db535ab0571ebeb2b30a3652ffedfaa77d47d9a97f21b015d056902d4aa198cc2e5588a8dddd36a8abd9dd3154c3837e86cf36f6471eead1166ed485cd4da93fd7caa27be5682788cf61e36371ab700803e18633b1011dd08df6553df8b7e5adc7bfc6c2f58b531039b044437f74f86a739dc70410f5db04b387988cc8e"),
    ]

    def test_published_streams_decrypt(self) -> None:
        """§3.3: the published two-chunk streams decrypt to their text."""
        for method, text, stream in self.published_streams:
            suite = CipherSuite(method, PASSWORD_CN)
            self.assertEqual(suite.tcp_decryptor().decrypt(h(stream)), text, method)
            self.assertEqual(_decrypt_bytewise(suite, h(stream)), text, method)

    def test_published_streams_reencrypt(self) -> None:
        """§3.3: same salt and 7+rest writes reproduce the published bytes."""
        for method, text, stream in self.published_streams:
            suite = CipherSuite(method, PASSWORD_CN)
            encryptor = suite.tcp_encryptor(h(stream)[: suite.spec.salt_size])
            self.assertEqual(
                encryptor.encrypt(text[:7]) + encryptor.encrypt(text[7:]), h(stream), method
            )


class StreamVectorTests(SynchronousTestCase):
    """Stream-cipher known answers (test-vectors.md §4.1, §4.2)."""

    published = {
        "rc4-md5": "6f1c36c5152ca8391e4360aa89085f3f100ad16e0ac5e94ca7ac084e",
        "aes-128-ctr": "9e939c64f9c2722ce897ceea294b49b275cd0b7c26e61a86c0f8f3c5",
        "aes-192-ctr": "4bb15994e15e8194b6665c1597bcbdc2c31c596d8dc8c33cc3cd0690",
        "aes-256-ctr": "519603d859e9da011e5d0a5a91ca38751744171ead9c0cc7a35c46aa",
        "aes-128-cfb": "6a9da19cda7a9d60a1ea7b092af62059d8eaf6b3a94c43dd47d5fa6d",
        "aes-192-cfb": "d7104b5592ecc8068fcfc7663cc1796f08ff6150de511e79f4326cb9",
        "aes-256-cfb": "8ad24b29c2b0ed9eda1393224ec816f8c2cefebf757c0cc68e61a6ec",
        "chacha20-ietf": "da5987eec8817053b20ed413c78da5bfad2a0991163bf476",
        "chacha20": "7bef09b2b9bd26d9f0a449bb3619085178e274f6",
        "salsa20": "35401af3185322b4c69e34909aa57b6963bb897e",
    }

    computed = {
        "aes-128-cfb": "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf7ce0d4a422064a1bbf74679bed0664c2f88144d8",
        "aes-256-cfb": "a0a1a2a3a4a5a6a7a8a9aaabacadaeaffe670fc234b0ecc7c8d755207ef047e80947071b",
        "aes-256-ctr": "a0a1a2a3a4a5a6a7a8a9aaabacadaeaffe670fc234b0ecc7c8d755207ef047e8571fddf6",
        "camellia-256-cfb": "a0a1a2a3a4a5a6a7a8a9aaabacadaeafffcc80ec632be2f49eaa5d09f28456047c7a426a",
        "chacha20-ietf": "a0a1a2a3a4a5a6a7a8a9aaab2765114fda090201e4c1f6fbda7ae795af043232",
        "chacha20": "a0a1a2a3a4a5a6a74ed1ed71ad1d5a7fc7acbfa54af619d14087c387",
        "salsa20": "a0a1a2a3a4a5a6a74535f8864dd761825322e4ca59043190d56bbc42",
        "rc4-md5": "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf0dd56b275a8145215d4899c1a528350078b14813",
        "bf-cfb": "a0a1a2a3a4a5a6a79456342da711d522922021baa9e3be90cd764ed1",
    }

    def _check(self, table: dict[str, str], password: str, plaintext: bytes) -> None:
        for method, expected_hex in table.items():
            suite = CipherSuite(method, password)
            expected = h(expected_hex)
            iv = expected[: suite.spec.salt_size]
            self.assertEqual(suite.tcp_encryptor(iv).encrypt(plaintext), expected, method)
            self.assertEqual(suite.tcp_decryptor().decrypt(expected), plaintext, method)
            self.assertEqual(_decrypt_bytewise(suite, expected), plaintext, method)
            self.assertEqual(suite.udp_seal(plaintext, iv), expected, method)
            self.assertEqual(suite.udp_open(expected), plaintext, method)

    def test_published(self) -> None:
        """§4.1: every method of ours in the published table, both directions."""
        self._check(self.published, PASSWORD_CN, TEXT_12)

    def test_computed(self) -> None:
        """§4.2: every method of ours in the computed table, both directions."""
        self._check(self.computed, "password", h("030b6578616d706c652e636f6d005068656c6c6f"))

    def test_salsa20_estream_vector(self) -> None:
        """salsa20's keystream is Bernstein's Salsa20/20: eSTREAM set 1 vector 0 (256-bit key), bytes 0..63 and 192..255."""
        key = h("80" + "00" * 31)
        suite = CipherSuite.from_key("salsa20", key)
        # Written in two pieces so that the keystream carries on across calls.
        encryptor = suite.tcp_encryptor(bytes(8))
        stream = encryptor.encrypt(bytes(100)) + encryptor.encrypt(bytes(156))
        self.assertEqual(stream[:8], bytes(8))
        keystream = stream[8:]
        self.assertEqual(
            keystream[:64],
            h(
                "e3be8fdd8beca2e3ea8ef9475b29a6e7003951e1097a5c38d23b7a5fad9f6844"
                "b22c97559e2723c7cbbd3fe4fc8d9a0744652a83e72a9c461876af4d7ef1a117"
            ),
        )
        self.assertEqual(
            keystream[192:256],
            h(
                "57be81f47b17d9ae7c4ff15429a73e10acf250ed3a90a93c711308a74c6216a9"
                "ed84cd126da7f28e8abf8bb63517e1ca98e712f4fb2e1a6aed9fdc73291faa17"
            ),
        )


class FramingTests(SynchronousTestCase):
    """Behaviour of the framing that the vectors do not pin down."""

    def test_bound_udp_functions_match_the_reference(self) -> None:
        """Every AEAD and stream method: the suite's bound seal equals aead_udp_seal/stream_udp_seal, and its open inverts both for bytes, bytearray and memoryview."""
        from ssx.crypto._aead import AEAD_PRIMITIVES, aead_udp_seal
        from ssx.crypto._stream import STREAM_CIPHERS, stream_udp_seal

        for method in METHODS:
            suite = CipherSuite(method, "pw")
            spec = suite.spec
            if spec.family == "none":
                continue
            salt = os.urandom(spec.salt_size)
            plaintext = os.urandom(300)
            if spec.family == "aead":
                reference = aead_udp_seal(AEAD_PRIMITIVES[method], suite._key, salt, plaintext)
            else:
                reference = stream_udp_seal(STREAM_CIPHERS[method], suite._key, salt, plaintext)
            self.assertEqual(suite.udp_seal(plaintext, salt), reference, method)
            for packet in (reference, bytearray(reference), memoryview(reference)):
                self.assertEqual(suite.udp_open(packet), plaintext, method)

    def test_empty_writes_emit_nothing(self) -> None:
        """Empty data encrypts to b'' for every method, not even the salt."""
        for method in METHODS:
            suite = CipherSuite(method, "pw")
            encryptor = suite.tcp_encryptor()
            self.assertEqual(encryptor.encrypt(b""), b"", method)
            first = encryptor.encrypt(b"a")
            self.assertEqual(len(first) - suite.spec.salt_size >= 1, True, method)
            self.assertEqual(encryptor.encrypt(b""), b"", method)
            self.assertEqual(suite.tcp_decryptor().decrypt(first), b"a", method)

    def test_chunk_boundary(self) -> None:
        """16383 bytes make one AEAD chunk, 16384 make two."""
        suite = CipherSuite("aes-128-gcm", "pw")
        self.assertEqual(len(suite.tcp_encryptor().encrypt(bytes(16383))), 16 + 16383 + 34)
        self.assertEqual(len(suite.tcp_encryptor().encrypt(bytes(16384))), 16 + 16384 + 68)

    def test_large_input(self) -> None:
        """1 MiB round trips for every method; AEAD output = pt + salt + 34 per chunk."""
        data = random.Random(1).randbytes(1 << 20)
        chunks = -(-len(data) // 0x3FFF)
        for method in METHODS:
            suite = CipherSuite(method, "pw")
            stream = suite.tcp_encryptor().encrypt(data)
            if suite.spec.family == "aead":
                self.assertEqual(len(stream), len(data) + suite.spec.salt_size + 34 * chunks)
            else:
                self.assertEqual(len(stream), len(data) + suite.spec.salt_size)
            self.assertEqual(suite.tcp_decryptor().decrypt(stream), data, method)

    def test_decryptor_accepts_memoryview_and_bytearray(self) -> None:
        """Decryptors take any bytes-like input, as transports may hand them."""
        for method in METHODS:
            suite = CipherSuite(method, "pw")
            stream = suite.tcp_encryptor().encrypt(b"hello world")
            decryptor = suite.tcp_decryptor()
            self.assertEqual(
                decryptor.decrypt(bytearray(stream[:5])) + decryptor.decrypt(memoryview(stream)[5:]),
                b"hello world",
                method,
            )

    def test_random_salts_differ(self) -> None:
        """Two encryptors of one suite pick different salts (and so ciphertexts)."""
        for method in METHODS:
            if method == "none":
                continue
            suite = CipherSuite(method, "pw")
            self.assertNotEqual(
                suite.tcp_encryptor().encrypt(b"same"), suite.tcp_encryptor().encrypt(b"same")
            )
            self.assertNotEqual(suite.udp_seal(b"same"), suite.udp_seal(b"same"))

    def test_none_is_identity(self) -> None:
        """The none method passes bytes through unchanged, TCP and UDP."""
        suite = CipherSuite("plain", "ignored")
        self.assertEqual(suite.spec.name, "none")
        self.assertEqual(suite.tcp_encryptor().encrypt(b"abc"), b"abc")
        self.assertEqual(suite.tcp_decryptor().decrypt(b"abc"), b"abc")
        self.assertEqual(suite.udp_seal(b"abc"), b"abc")
        self.assertEqual(suite.udp_open(b"abc"), b"abc")

    def test_bad_test_salt_length(self) -> None:
        """A fixed salt of the wrong length is refused rather than silently used."""
        suite = CipherSuite("aes-256-gcm", "pw")
        self.assertRaises(ValueError, suite.tcp_encryptor, bytes(16))
        self.assertRaises(ValueError, suite.udp_seal, b"x", bytes(16))


class AeadErrorTests(SynchronousTestCase):
    """Tampering and garbage on the AEAD framing."""

    def _forged_length_stream(self, method: str, length: int) -> tuple[CipherSuite, bytes]:
        suite = CipherSuite(method, "pw")
        salt = os.urandom(suite.spec.salt_size)
        primitive, nonce_size = {"aes": (AESGCM, 12), "cha": (ChaCha20Poly1305, 12), "xch": (XChaCha20Poly1305, 24)}[method[:3]]
        aead = primitive(derive_subkey(evp_bytes_to_key(b"pw", suite.spec.key_size), salt))
        return suite, salt + aead.encrypt(bytes(nonce_size), length.to_bytes(2, "big"), None)

    def test_bad_lengths(self) -> None:
        """A correctly sealed length of 0, 0x4000 or 0xFFFF is a ProtocolError, and fatal."""
        for method in AEAD_METHODS:
            for length in (0, 0x4000, 0xFFFF):
                suite, stream = self._forged_length_stream(method, length)
                decryptor = suite.tcp_decryptor()
                error = self.assertRaises(ProtocolError, decryptor.decrypt, stream)
                self.assertNotIsInstance(error, AuthenticationError)
                self.assertRaises(ProtocolError, decryptor.decrypt, bytes(100))

    def test_max_length_accepted(self) -> None:
        """A sealed length of exactly 0x3FFF is accepted and awaits its payload."""
        suite, stream = self._forged_length_stream("aes-256-gcm", 0x3FFF)
        self.assertEqual(suite.tcp_decryptor().decrypt(stream), b"")

    def test_dead_after_error(self) -> None:
        """After an error every further call raises ProtocolError, even with good data."""
        suite = CipherSuite("aes-128-gcm", "pw")
        stream = suite.tcp_encryptor().encrypt(b"hello")
        decryptor = suite.tcp_decryptor()
        broken = bytearray(stream)
        broken[-1] ^= 1
        self.assertRaises(AuthenticationError, decryptor.decrypt, bytes(broken))
        self.assertRaises(ProtocolError, decryptor.decrypt, b"")
        self.assertRaises(ProtocolError, decryptor.decrypt, stream)

    def test_udp_truncated(self) -> None:
        """UDP packets shorter than salt + tag (AEAD) or IV (stream) are ProtocolErrors."""
        for method in AEAD_METHODS + STREAM_METHODS:
            suite = CipherSuite(method, "pw")
            packet = suite.udp_seal(b"")
            for cut in (0, 1, len(packet) - 1):
                self.assertRaises(ProtocolError, suite.udp_open, packet[:cut])

    def test_udp_wrong_password(self) -> None:
        """A UDP packet sealed under another password fails authentication."""
        packet = CipherSuite("aes-256-gcm", "one").udp_seal(b"payload")
        self.assertRaises(AuthenticationError, CipherSuite("aes-256-gcm", "two").udp_open, packet)

    @_SOME
    @given(
        method=st.sampled_from(AEAD_METHODS),
        seed=st.integers(0, 2**32),
        size=st.integers(1, 40000),
        bit=st.integers(0, 2**31),
    )
    def test_tcp_bit_flip(self, method: str, seed: int, size: int, bit: int) -> None:
        """Flipping any one bit of an AEAD TCP stream raises AuthenticationError."""
        suite = CipherSuite(method, "pw")
        stream = bytearray(suite.tcp_encryptor().encrypt(random.Random(seed).randbytes(size)))
        bit %= len(stream) * 8
        stream[bit // 8] ^= 1 << (bit % 8)
        self.assertRaises(AuthenticationError, suite.tcp_decryptor().decrypt, bytes(stream))

    @_SOME
    @given(
        method=st.sampled_from(AEAD_METHODS),
        payload=st.binary(max_size=600),
        bit=st.integers(0, 2**31),
    )
    def test_udp_bit_flip(self, method: str, payload: bytes, bit: int) -> None:
        """Flipping any one bit of an AEAD UDP packet raises AuthenticationError."""
        suite = CipherSuite(method, "pw")
        packet = bytearray(suite.udp_seal(payload))
        bit %= len(packet) * 8
        packet[bit // 8] ^= 1 << (bit % 8)
        self.assertRaises(AuthenticationError, suite.udp_open, bytes(packet))

    @_SOME
    @given(
        method=st.sampled_from(AEAD_METHODS),
        garbage=st.binary(max_size=300),
        cuts=st.lists(st.integers(0, 300), max_size=6),
    )
    def test_garbage_raises_only_protocol_errors(
        self, method: str, garbage: bytes, cuts: list[int]
    ) -> None:
        """Random bytes, split anywhere, make an AEAD decryptor raise nothing but ProtocolError."""
        decryptor = CipherSuite(method, "pw").tcp_decryptor()
        try:
            for piece in _chunks(garbage, cuts):
                self.assertEqual(decryptor.decrypt(piece), b"")
        except ProtocolError:
            pass

    @_SOME
    @given(method=st.sampled_from(AEAD_METHODS), garbage=st.binary(max_size=300))
    def test_udp_garbage_raises_only_protocol_errors(self, method: str, garbage: bytes) -> None:
        """Random bytes given to udp_open raise nothing but ProtocolError."""
        self.assertRaises(ProtocolError, CipherSuite(method, "pw").udp_open, garbage)


def _tcp_round_trip_test(method: str) -> Callable[..., None]:
    @_FEW
    @given(
        seed=st.integers(0, 2**32),
        sizes=st.lists(
            st.one_of(st.integers(0, 300), st.integers(16000, 40000)), min_size=1, max_size=5
        ),
        data=st.data(),
    )
    def test(self: SynchronousTestCase, seed: int, sizes: list[int], data: st.DataObject) -> None:
        rng = random.Random(seed)
        suite = CipherSuite(method, "pw")
        writes = [rng.randbytes(size) for size in sizes]
        encryptor = suite.tcp_encryptor()
        stream = b"".join(encryptor.encrypt(write) for write in writes)
        cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts")
        self.assertEqual(_decrypt_pieces(suite, _chunks(stream, cuts)), b"".join(writes))

    test.__doc__ = f"{method}: random writes, re-split at random points, decrypt to the input."
    return test


def _udp_round_trip_test(method: str) -> Callable[..., None]:
    @_FEW
    @given(payload=st.binary(max_size=2000))
    def test(self: SynchronousTestCase, payload: bytes) -> None:
        suite = CipherSuite(method, "pw")
        self.assertEqual(suite.udp_open(suite.udp_seal(payload)), payload)

    test.__doc__ = f"{method}: udp_seal then udp_open returns the payload."
    return test


class RoundTripTests(SynchronousTestCase):
    """Round trips for every method (one generated test per method and transport)."""


for _method in METHODS:
    _slug = _method.replace("-", "_")
    setattr(RoundTripTests, f"test_tcp_{_slug}", _tcp_round_trip_test(_method))
    setattr(RoundTripTests, f"test_udp_{_slug}", _udp_round_trip_test(_method))
del _method, _slug
