"""
Tests for the Shadowsocks 2022 codecs (`ssx.crypto.edition2022`): the known-answer
vectors of test-vectors.md §5-§8 with the clock and randomness pinned,
client/server round trips under arbitrary fragmentation, every rejection
rule of wire.md §7, and garbage/tamper resistance (only ProtocolError
subclasses ever escape a decoder).
"""

from __future__ import annotations

import base64
import itertools
from typing import Callable

import blake3
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from ssx.wire.address import Address, encode_address
from ssx.crypto.edition2022 import (
    MAX_CHUNK,
    METHODS_2022,
    WINDOW_SIZE,
    PskChain,
    ReplayError,
    RequestDecoder,
    RequestEncoder,
    ResponseDecoder,
    ResponseEncoder,
    SaltPool,
    SlidingWindow,
    StaleTimestampError,
    UdpClientSession,
    UdpServerDecoder,
    UdpServerSession,
    UserKey,
    decode_psk,
    generate_psk,
    hash16,
    identity_subkey,
    lookup_method_2022,
    parse_password,
    session_subkey,
    user_table,
)
from ssx.crypto.edition2022.keys import IDENTITY_SUBKEY_CONTEXT
from ssx.crypto.edition2022.udp import SERVER_SESSIONS_KEPT
from ssx.crypto._xchacha import XChaCha20Poly1305
from ssx.errors import AuthenticationError, ConfigError, ProtocolError

h = bytes.fromhex

_FEW = settings(max_examples=60, deadline=None, database=None)
_SOME = settings(max_examples=300, deadline=None, database=None)

AES128 = "2022-blake3-aes-128-gcm"
AES256 = "2022-blake3-aes-256-gcm"
CHACHA = "2022-blake3-chacha20-poly1305"
AES_METHODS = (AES128, AES256)

TS = 1700000000
ADDR443 = Address("example.com", 443)
DNS53 = Address("8.8.8.8", 53)

IPSK = h("6465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f80818283")
UPSK = h("c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7")
CLIENT_SID = h("0102030405060708")
SERVER_SID = h("a1a2a3a4a5a6a7a8")


def _size(method: str) -> int:
    return lookup_method_2022(method).key_size


def _psk(method: str) -> bytes:
    return bytes(range(_size(method)))


def _salt(method: str, start: int) -> bytes:
    return bytes(range(start, start + _size(method)))


def _clock(t: float = TS) -> Callable[[], float]:
    return lambda: t


class _Clock:
    """A settable fake clock."""

    def __init__(self, t: float = TS) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _counter_random() -> Callable[[int], bytes]:
    """Deterministic 'random' bytes: 0, 1, 2, ... continuing across calls."""
    counter = itertools.count(7)

    def urandom(n: int) -> bytes:
        return bytes(next(counter) % 256 for _ in range(n))

    return urandom


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` split at the given offsets (any order, duplicates allowed)."""
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def _server(method: str, psk: bytes | None = None, **kwargs: object) -> RequestDecoder:
    now = kwargs.pop("now", _clock())
    return RequestDecoder(
        method,
        _psk(method) if psk is None else psk,
        salt_check=kwargs.pop("salt_check", SaltPool(now)),  # type: ignore[arg-type]
        now=now,  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


def _client(method: str, keys: PskChain | None = None, **kwargs: object) -> RequestEncoder:
    return RequestEncoder(
        method,
        PskChain((), _psk(method)) if keys is None else keys,
        now=kwargs.pop("now", _clock()),  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


def _hand_request(
    method: str,
    variable: bytes,
    *,
    salt: bytes | None = None,
    kind: int = 0,
    timestamp: int = TS,
    declared: int | None = None,
) -> bytes:
    """A request stream built by hand, to send what our encoder refuses to."""
    spec = lookup_method_2022(method)
    salt = _salt(method, 0x40) if salt is None else salt
    aead = spec.aead(session_subkey(_psk(method), salt))
    length = len(variable) if declared is None else declared
    fixed = bytes((kind,)) + timestamp.to_bytes(8, "big") + length.to_bytes(2, "big")
    return (
        salt
        + aead.encrypt(bytes(12), fixed, None)
        + aead.encrypt((1).to_bytes(12, "little"), variable, None)
    )


def _hand_udp(method: str, body: bytes, session_id: bytes = CLIENT_SID) -> bytes:
    """A client UDP packet with an arbitrary (correctly sealed) body."""
    psk = _psk(method)
    separate = session_id + bytes(8)
    header = Cipher(algorithms.AES(psk), modes.ECB()).encryptor().update(separate)
    aead = AESGCM(session_subkey(psk, session_id))
    return header + aead.encrypt(separate[4:], body, None)


def _hand_sealed(
    method: str, key: bytes, separate: bytes, body: bytes, *, identity: bytes | None = None
) -> bytes:
    """
    A UDP packet of any method sealed correctly around an arbitrary body:
    `key` seals it (a client's uPSK, a server's PSK), `identity` is the
    first-hop iPSK of a client packet with an identity header.
    """
    if lookup_method_2022(method).udp_xchacha:
        nonce = bytes(range(24))
        return nonce + XChaCha20Poly1305(key).encrypt(nonce, separate + body, None)
    first = identity if identity is not None else key
    header = Cipher(algorithms.AES(first), modes.ECB()).encryptor().update(separate)
    if identity is not None:
        mask = bytes(a ^ b for a, b in zip(hash16(key), separate))
        header += Cipher(algorithms.AES(identity), modes.ECB()).encryptor().update(mask)
    aead = AESGCM(session_subkey(key, separate[:8]))
    return header + aead.encrypt(separate[4:], body, None)


# -- known answers -----------------------------------------------------------


class KeyDerivationVectorTests(SynchronousTestCase):
    """test-vectors.md §5 and the key parts of §8."""

    def test_urban_spork_session_subkey(self) -> None:
        """The published urban-spork session subkey is reproduced (§5.1)."""
        psk = base64.b64decode("Lc3tTx0BY6ZJ/fCwOx3JvF0I/anhwJBO5p2+FA5Vce4=")
        salt = base64.b64decode("3oFO0VyLyGI4nFN0M9P+62vPND/L6v8IingaPJWTbJA=")
        self.assertEqual(
            base64.b64encode(session_subkey(psk, salt)),
            b"EdNE+4U8dVnHT0+poAFDK2bdlwfrHT61sUNr9WYPh+E=",
        )

    def test_urban_spork_identity_context(self) -> None:
        """The identity context goes to BLAKE3 key derivation mode (§5.2)."""
        material = b"Personal search-enabled assistant for programmers"
        expected = base64.b64decode("nb91ZIjdNzFcPmGRS3Lg7m+muVqat549+RSDluyVN4c=")
        self.assertEqual(
            blake3.blake3(material, derive_key_context=IDENTITY_SUBKEY_CONTEXT).digest(),
            expected,
        )
        # identity_subkey derives from psk || salt, as long as the psk.
        self.assertEqual(identity_subkey(material[:32], material[32:]), expected)

    def test_computed_subkeys(self) -> None:
        """Every row of the §5.3 table (TCP salts and UDP session IDs)."""
        p16, p32 = bytes(range(16)), bytes(range(32))
        rows = [
            (p16, bytes(range(0x40, 0x50)), "80e542bc94fbfe0078a6469c1e09a7cf"),
            (p16, bytes(range(0x80, 0x90)), "722b3033c5d021365a8521bfb41157a3"),
            (
                p32,
                bytes(range(0x40, 0x60)),
                "cb4edecf23461aaaeee9dcb3c1eb1be555c77e3661c7dd58c96bd5c3bcb6a064",
            ),
            (
                p32,
                bytes(range(0x80, 0xA0)),
                "11289b9d205255930f83932405c2b0a38ec32be703fe33f290ff25ffeff402f9",
            ),
            (p16, CLIENT_SID, "b8473b44792f673ee36a405dfa755cc4"),
            (
                p32,
                CLIENT_SID,
                "b8208bed66846bcbb2876c8c9db990da1da0a6c39bbeaf132686bbab1a5e1bb4",
            ),
            (p16, SERVER_SID, "a6437aa5d84dbadd2b82760cde5c6fd7"),
            (
                p32,
                SERVER_SID,
                "77e6a082d3c7bab7d640341dbffef3595e96bf984782ab9a04fbccb1796c7311",
            ),
        ]
        for psk, salt, expected in rows:
            self.assertEqual(session_subkey(psk, salt).hex(), expected)

    def test_psk_base64_forms(self) -> None:
        """The §5.3 base64 PSKs decode to 00..0f and 00..1f."""
        self.assertEqual(decode_psk(AES128, "AAECAwQFBgcICQoLDA0ODw=="), bytes(range(16)))
        self.assertEqual(
            decode_psk(AES256, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="),
            bytes(range(32)),
        )

    def test_eih_keys(self) -> None:
        """hash16(uPSK), identity and session subkeys of §8.1/§8.2/§8.3."""
        self.assertEqual(hash16(UPSK).hex(), "4e1e76a45fcd1dc58fa9f6be7667214a")
        salt32 = bytes(range(0x40, 0x60))
        self.assertEqual(
            identity_subkey(IPSK, salt32).hex(),
            "07ea4ba7a98fb911634cc7ebccaead5b03e779138cf7a13e3acf6e7a9cfae848",
        )
        self.assertEqual(
            session_subkey(UPSK, salt32).hex(),
            "4aac9ea2f1d48c70d5eeeb4602c1e7576db117abab8b8e52be0c55cb877c70a3",
        )
        self.assertEqual(
            identity_subkey(IPSK[:16], bytes(range(0x40, 0x50))).hex(),
            "ecfab879564590f588f7bb7ccc89240c",
        )
        self.assertEqual(
            session_subkey(UPSK, CLIENT_SID).hex(),
            "834f0bbd6fd4a7fb689c96688034ec8e6544d108ce0cf60c6c2e6115c8dedbcf",
        )

    def test_eih_password(self) -> None:
        """The §8 client password parses into iPSK and uPSK."""
        keys = parse_password(
            AES256,
            "ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1+f4CBgoM=:"
            "yMnKy8zNzs/Q0dLT1NXW19jZ2tvc3d7f4OHi4+Tl5uc=",
        )
        self.assertEqual(keys, PskChain((IPSK,), UPSK))


_TCP_VECTORS = {
    AES128: (
        "b3ccc846e965a2bc87758fe11a35fba8f1e940e11f7bcae0a405a5"
        "8e82336bec7e9e904137e0303e5233fa9c12a230e1bd6897348fa6faf9a132c79da71f5d0404",
        "a9b3b54be8a46e29c69b9ff96330c5b7ca2756ee559236551ec8702601ebd7170491e8e14c05a4",
        "a242d2422f3788104c8fce040ece0f63aa86b5e11d588dc3fbb75d72f01d41910dae24bc4ae5d5"
        "4a219d985db7a7578ff7e6a54eec131f24fe7733104c8adacc",
    ),
    AES256: (
        "6974e6d351c385cfdec572595666496ee3eb1a2b4263b2bda00729"
        "ed3499844b80f5523efaa7b5482cbca5b29e3dc843e551fbd01ee44a31dc3e14015e3ba4a938",
        "a76582b0db9976fb5b3e4dd1b47200253cc111e7312c1febc92e9e87ad1064c82bfe42cc7ce1ab",
        "4fe13038514af6dc2b1958af4e03effefdcdf39fc0496326a6e9f87e078d11d9c89e6958fd73a0"
        "40419b1c895e92c0eb74338cd3426c541772b1ff10252812e23265ed43a6be814fd77ad909be4cc2ca",
    ),
    CHACHA: (
        "d9b69a4c76f623b46df88c5277c6ab63f8ecd53932179d8cbbfb69"
        "bdc348e91a09d00d34d82a775e86e374edb19239d544b88e6c1b0bb50e0d08ba5db6f5d34337",
        "98e11167245abb8969a69fcd9f2a682d5226b8ad77e5a74d5430ae5155adf9d3a9bc98261b5e43",
        "3a39f1281acc419b3da88ca656f936729f46245a61a2cfe095bf9588e8d62e07a0e0053e946ec6"
        "8f8ae0848c8353c0da0dc31c4b541761de349ae86078e87141b0a99111c6529c3504094aa769bb7567",
    ),
}


class TcpVectorTests(SynchronousTestCase):
    """test-vectors.md §6 and §8.1/§8.2, byte-exact both ways."""

    def _request(self, method: str) -> tuple[RequestEncoder, bytes, bytes]:
        encoder = _client(method, salt=_salt(method, 0x40))
        return encoder, encoder.encode_header(ADDR443, b"hello"), encoder.encrypt(b"again")

    def test_request_encode(self) -> None:
        """The request stream and the next chunk match §6 for every method."""
        for method, (headers, chunk, _) in _TCP_VECTORS.items():
            _, first, second = self._request(method)
            self.assertEqual(first.hex(), _salt(method, 0x40).hex() + headers, method)
            self.assertEqual(second.hex(), chunk, method)

    def test_request_decode(self) -> None:
        """The server reads ADDR443, 'hello', then 'again' from the §6 bytes."""
        for method, (headers, chunk, _) in _TCP_VECTORS.items():
            server = _server(method)
            stream = _salt(method, 0x40) + h(headers)
            self.assertEqual(server.decrypt(stream), b"hello")
            header = server.header
            assert header is not None
            self.assertEqual(header.address, ADDR443)
            self.assertEqual(header.timestamp, TS)
            self.assertEqual(header.padding_length, 0)
            self.assertIsNone(header.user)
            self.assertEqual(header.salt, _salt(method, 0x40))
            self.assertEqual(server.decrypt(h(chunk)), b"again")

    def test_response_encode(self) -> None:
        """The server's 'world' response matches §6 for every method."""
        for method, (headers, _, response) in _TCP_VECTORS.items():
            server = _server(method)
            server.decrypt(_salt(method, 0x40) + h(headers))
            encoder = server.response_encoder(salt=_salt(method, 0x80))
            self.assertEqual(
                encoder.encrypt(b"world").hex(), _salt(method, 0x80).hex() + response
            )

    def test_response_decode(self) -> None:
        """The client reads 'world' from the §6 response, byte by byte."""
        for method, (_, _, response) in _TCP_VECTORS.items():
            encoder, _, _ = self._request(method)
            decoder = encoder.response_decoder()
            stream = _salt(method, 0x80) + h(response)
            out = b"".join(decoder.decrypt(stream[i : i + 1]) for i in range(len(stream)))
            self.assertEqual(out, b"world")
            self.assertEqual(decoder.salt, _salt(method, 0x80))

    def test_eih_aes256_request(self) -> None:
        """The §8.1 EIH request is produced exactly and the server finds the user."""
        salt = bytes(range(0x40, 0x60))
        encoder = _client(AES256, PskChain((IPSK,), UPSK), salt=salt)
        stream = encoder.encode_header(ADDR443, b"hello")
        self.assertEqual(
            stream.hex(),
            "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f"
            "feaa691001482756e23846d6140bf47e"
            "1e27b381b35dca69b493ba3c1ea2f0e2c24f960b41b2e2e62f9533"
            "7b14cfd4d23886b6a560f56771a23c9db1dd8d68e617d377e87e01ad4cebfd0990654867564e",
        )
        users = {hash16(UPSK): UserKey("alice", UPSK)}
        server = _server(AES256, IPSK, users=users)
        self.assertEqual(server.decrypt(stream), b"hello")
        assert server.header is not None
        self.assertEqual(server.header.user, UserKey("alice", UPSK))

    def test_eih_aes128_identity_header(self) -> None:
        """The §8.2 EIH (16-byte keys) sits right after the salt."""
        keys = PskChain((IPSK[:16],), UPSK[:16])
        encoder = _client(AES128, keys, salt=bytes(range(0x40, 0x50)))
        stream = encoder.encode_header(ADDR443, b"hello")
        self.assertEqual(stream[16:32].hex(), "434726d86b046b5349d41760b134ed8f")


_UDP_VECTORS = {
    AES128: (
        "18ba69bb4661fee5a7cc9ec1a731e2780f887748f59fbaddc74035aaf8f09848191050d2799a273c"
        "1ba732e720497b6dd288823a",
        "3090bbb60eeae6697834a3bb6cd69caf2356624adc6b036124df26ffc136ef5f8cdcd681666f82e3"
        "97a67c879e60831c011b22f0c6ee29123bee5e2e",
    ),
    AES256: (
        "65627bd127f455618ff9d0f081df2db47e41c363d48a26c057fcafd6e859fdb90a8ab86359ec66cd"
        "004983243759a996e13e832e",
        "a853a740f5bb73b4daaa037d6d11500feec45bb2cab127d78b24c576891b5a07927b37ae3f7fe16d"
        "086f48c2fa8c1d31c752458de38b6e86217c7d09",
    ),
}


class UdpVectorTests(SynchronousTestCase):
    """test-vectors.md §7 and §8.3."""

    def test_client_packets(self) -> None:
        """Client packets match §7.1/§7.2 and the server decodes them."""
        for method, (client_hex, _) in _UDP_VECTORS.items():
            session = UdpClientSession(
                method, PskChain((), _psk(method)), now=_clock(), session_id=CLIENT_SID
            )
            packet = session.encode(DNS53, h("abcd"))
            self.assertEqual(packet.hex(), client_hex, method)
            self.assertEqual(session.packet_id, 1)
            decoded = UdpServerDecoder(method, _psk(method), now=_clock()).decode(packet)
            self.assertEqual(
                (decoded.session_id, decoded.packet_id, decoded.timestamp),
                (CLIENT_SID, 0, TS),
            )
            self.assertEqual((decoded.address, decoded.payload), (DNS53, h("abcd")))

    def test_server_packets(self) -> None:
        """Server replies match §7.1/§7.2 and the client decodes them."""
        for method, (client_hex, server_hex) in _UDP_VECTORS.items():
            server = UdpServerDecoder(method, _psk(method), now=_clock())
            reply = server.session(server.decode(h(client_hex)), session_id=SERVER_SID)
            packet = reply.encode(DNS53, h("abcd"))
            self.assertEqual(packet.hex(), server_hex, method)
            client = UdpClientSession(
                method, PskChain((), _psk(method)), now=_clock(), session_id=CLIENT_SID
            )
            decoded = client.decode(packet)
            self.assertEqual(
                (decoded.session_id, decoded.packet_id, decoded.client_session_id),
                (SERVER_SID, 0, CLIENT_SID),
            )
            self.assertEqual((decoded.address, decoded.payload), (DNS53, h("abcd")))

    def test_eih_packet(self) -> None:
        """The §8.3 EIH packet is produced exactly and the server finds the user."""
        session = UdpClientSession(
            AES256, PskChain((IPSK,), UPSK), now=_clock(), session_id=CLIENT_SID
        )
        packet = session.encode(DNS53, h("abcd"))
        self.assertEqual(
            packet.hex(),
            "7d5d8130c5037ae993d7d9fdd10482fdcbc2f050b2000e7e4fc016e72af7064e"
            "7a0ac7005c74513cfe8a1b570c9ad451fe08474df6f2ff2fcea51f71bd46431b2eaade87",
        )
        server = UdpServerDecoder(
            AES256, IPSK, now=_clock(), users={hash16(UPSK): UserKey("alice", UPSK)}
        )
        decoded = server.decode(packet)
        self.assertEqual(decoded.user, UserKey("alice", UPSK))
        self.assertEqual(decoded.payload, h("abcd"))
        # Replies are keyed with the user's PSK and carry no identity header.
        reply = server.session(decoded, session_id=SERVER_SID).encode(DNS53, b"ok")
        self.assertEqual(session.decode(reply).payload, b"ok")

    def test_chacha_udp_vectors(self) -> None:
        """ChaCha UDP (XChaCha20-Poly1305 keyed with the PSK, §7.3): both packets byte-exact, and decoded back."""
        psk = bytes(range(32))
        keys = PskChain((), psk)
        client_nonce = iter([bytes(range(0xC0, 0xD8))])
        session = UdpClientSession(
            CHACHA, keys, now=_clock(), urandom=lambda n: next(client_nonce), session_id=h("0102030405060708")
        )
        packet = session.encode(DNS53, h("abcd"), padding_length=0)
        self.assertEqual(packet, h(
            "c0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7f19c89d79910929be5c3daf754682db0a20d4b538cdde992581099"
            "ad666ff5b3cd433dd03ee1060ba6c6005a2311af92f80eac27"
        ))
        server = UdpServerDecoder(CHACHA, psk, now=_clock())
        decoded = server.decode(packet)
        self.assertEqual((decoded.address, decoded.payload, decoded.packet_id), (DNS53, h("abcd"), 0))
        server_nonce = iter([bytes(range(0xE0, 0xF8))])
        reply = server.session(decoded, urandom=lambda n: next(server_nonce), session_id=h("a1a2a3a4a5a6a7a8")).encode(
            DNS53, h("abcd")
        )
        self.assertEqual(reply, h(
            "e0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3f4f5f6f7e5595ec63140b9a7e9cd317a29da9bce2f3008e09b0cc1863b3d"
            "f1d89488b7d95419779640f2e1166e2700e7f5d041742de4bb19d1a20b23ac5cd041"
        ))
        self.assertEqual(session.decode(reply).payload, h("abcd"))

    def test_chacha_udp_tampering(self) -> None:
        """A flipped bit anywhere in a ChaCha UDP packet fails authentication."""
        keys = PskChain((), _psk(CHACHA))
        packet = UdpClientSession(CHACHA, keys, now=_clock()).encode(DNS53, b"payload")
        server = UdpServerDecoder(CHACHA, _psk(CHACHA), now=_clock())
        for i in range(0, len(packet) * 8, 7):
            bad = bytearray(packet)
            bad[i // 8] ^= 1 << (i % 8)
            with self.assertRaises(ProtocolError):
                server.decode(bytes(bad))


# -- round trips ---------------------------------------------------------------


def _eih_setups(method: str) -> list[tuple[PskChain, bytes, dict[bytes, UserKey] | None]]:
    """(client keys, server psk, server users) without and with identity headers."""
    size = _size(method)
    setups: list[tuple[PskChain, bytes, dict[bytes, UserKey] | None]] = [
        (PskChain((), _psk(method)), _psk(method), None)
    ]
    if lookup_method_2022(method).supports_identity_headers:
        user = UPSK[:size]
        other = bytes(range(0xA0, 0xA0 + size))
        users = user_table(
            method,
            {
                "bob": base64.b64encode(other).decode(),
                "alice": base64.b64encode(user).decode(),
            },
        )
        setups.append((PskChain((IPSK[:size],), user), IPSK[:size], users))
    return setups


class TcpRoundTripTests(SynchronousTestCase):
    """Client and server codecs agree for every method, however TCP splits."""

    @_FEW
    @given(
        payload=st.binary(max_size=3000),
        more=st.lists(st.binary(min_size=1, max_size=2000), max_size=4),
        cuts=st.lists(st.integers(min_value=0), max_size=12),
        back=st.lists(st.binary(min_size=1, max_size=2000), min_size=1, max_size=4),
        back_cuts=st.lists(st.integers(min_value=0), max_size=12),
    )
    def test_fragmented(
        self,
        payload: bytes,
        more: list[bytes],
        cuts: list[int],
        back: list[bytes],
        back_cuts: list[int],
    ) -> None:
        """Request and response survive any fragmentation, with and without EIH."""
        for method in METHODS_2022:
            for keys, psk, users in _eih_setups(method):
                client = _client(method, keys)
                stream = client.encode_header(ADDR443, payload) + b"".join(
                    client.encrypt(piece) for piece in more
                )
                server = _server(method, psk, users=users)
                got = b"".join(server.decrypt(piece) for piece in _chunks(stream, cuts))
                self.assertEqual(got, payload + b"".join(more))
                assert server.header is not None
                self.assertEqual(server.header.address, ADDR443)
                if users is not None:
                    assert server.header.user is not None
                    self.assertEqual(server.header.user.name, "alice")
                encoder = server.response_encoder()
                response = b"".join(encoder.encrypt(piece) for piece in back)
                decoder = client.response_decoder()
                got = b"".join(
                    decoder.decrypt(piece) for piece in _chunks(response, back_cuts)
                )
                self.assertEqual(got, b"".join(back))

    def test_large_writes(self) -> None:
        """Writes above 0xFFFF bytes split into full chunks in both directions."""
        big = bytes(range(256)) * 700  # 179200 bytes
        for method in METHODS_2022:
            client = _client(method)
            server = _server(method)
            first = client.encode_header(ADDR443, big)
            self.assertEqual(server.decrypt(first), big)
            self.assertEqual(server.decrypt(client.encrypt(big)), big)
            encoder = server.response_encoder()
            decoder = client.response_decoder()
            response = encoder.encrypt(big) + encoder.encrypt(big)
            self.assertEqual(decoder.decrypt(response), big + big)
            # 179200 bytes = 2 * 0xFFFF + 48130: three chunks per write, the
            # first one's length travelling in the response header.
            self.assertEqual(len(big) - 2 * MAX_CHUNK, 48130)
            size = _size(method)
            header = size + (1 + 8 + size + 2 + 16)
            self.assertEqual(len(response), header + 2 * len(big) + 16 + 5 * (18 + 16))

    def test_no_payload_pads(self) -> None:
        """Without payload the header carries 1..900 bytes of padding."""
        for seed in range(20):
            urandom = _counter_random()
            for _ in range(seed):
                urandom(3)
            client = _client(AES256, urandom=urandom)
            server = _server(AES256)
            self.assertEqual(server.decrypt(client.encode_header(DNS53)), b"")
            assert server.header is not None
            self.assertTrue(1 <= server.header.padding_length <= 900)
            self.assertEqual(server.header.address, DNS53)

    def test_payload_not_padded(self) -> None:
        """With payload the header carries no padding unless asked."""
        client = _client(AES128)
        server = _server(AES128)
        server.decrypt(client.encode_header(ADDR443, b"x"))
        assert server.header is not None
        self.assertEqual(server.header.padding_length, 0)

    def test_encoder_refuses_bad_padding(self) -> None:
        """The encoder never builds a header a strict server must reject."""
        self.assertRaises(
            ValueError, _client(AES128).encode_header, ADDR443, b"", padding_length=0
        )
        self.assertRaises(
            ValueError, _client(AES128).encode_header, ADDR443, b"x", padding_length=901
        )

    def test_encoder_order(self) -> None:
        """encrypt before the header, or a second header, is a programming error."""
        client = _client(AES128)
        self.assertRaises(RuntimeError, client.encrypt, b"x")
        self.assertEqual(client.encrypt(b""), b"")
        client.encode_header(ADDR443, b"x")
        self.assertRaises(RuntimeError, client.encode_header, ADDR443, b"x")
        self.assertRaises(RuntimeError, _server(AES128).response_encoder)

    def test_response_empty_write(self) -> None:
        """An empty write sends nothing, not even the response header."""
        encoder = ResponseEncoder(AES128, _psk(AES128), bytes(16), now=_clock())
        self.assertEqual(encoder.encrypt(b""), b"")
        self.assertTrue(encoder.encrypt(b"x").startswith(encoder.salt))

    def test_two_hop_identity_headers(self) -> None:
        """With iPSK0:iPSK1:uPSK a relay strips EIH0 and the server finds the user."""
        relay_psk = bytes(range(0x10, 0x30))
        keys = PskChain((relay_psk, IPSK), UPSK)
        stream = _client(AES256, keys).encode_header(ADDR443, b"hop")
        salt = stream[:32]
        relay_block = Cipher(
            algorithms.AES(identity_subkey(relay_psk, salt)), modes.ECB()
        ).decryptor()
        self.assertEqual(relay_block.update(stream[32:48]), hash16(IPSK))
        server = _server(AES256, IPSK, users={hash16(UPSK): UserKey("alice", UPSK)})
        self.assertEqual(server.decrypt(salt + stream[48:]), b"hop")

    def test_user_key_keys_the_response(self) -> None:
        """With EIH the response is keyed with the uPSK, not the identity PSK."""
        keys, psk, users = _eih_setups(AES256)[1]
        client = _client(AES256, keys)
        server = _server(AES256, psk, users=users)
        server.decrypt(client.encode_header(ADDR443, b"x"))
        response = server.response_encoder().encrypt(b"pong")
        self.assertEqual(client.response_decoder().decrypt(response), b"pong")
        wrong = ResponseDecoder(AES256, psk, client.salt, now=_clock())
        self.assertRaises(AuthenticationError, wrong.decrypt, response)


class UdpRoundTripTests(SynchronousTestCase):
    """UDP client and server codecs agree, with and without EIH."""

    @_FEW
    @given(payloads=st.lists(st.binary(max_size=1500), min_size=1, max_size=5))
    def test_round_trip(self, payloads: list[bytes]) -> None:
        """Packets and replies decode to what was sent; packet IDs count up."""
        for method in AES_METHODS:
            for keys, psk, users in _eih_setups(method):
                client = UdpClientSession(method, keys, now=_clock())
                server = UdpServerDecoder(method, psk, now=_clock(), users=users)
                reply_side: UdpServerSession | None = None
                for index, payload in enumerate(payloads):
                    decoded = server.decode(client.encode(DNS53, payload))
                    self.assertEqual(decoded.payload, payload)
                    self.assertEqual(decoded.packet_id, index)
                    self.assertEqual(decoded.session_id, client.session_id)
                    if reply_side is None:
                        reply_side = server.session(decoded)
                    reply = client.decode(reply_side.encode(ADDR443, payload))
                    self.assertEqual((reply.address, reply.payload), (ADDR443, payload))
                    self.assertEqual(reply.session_id, reply_side.session_id)
                    self.assertEqual(reply.packet_id, index)

    def test_empty_payload_padded(self) -> None:
        """An empty UDP payload goes out padded and comes back empty."""
        client = UdpClientSession(AES128, PskChain((), _psk(AES128)), now=_clock())
        decoded = UdpServerDecoder(AES128, _psk(AES128), now=_clock()).decode(
            client.encode(DNS53, b"")
        )
        self.assertEqual(decoded.payload, b"")
        self.assertTrue(1 <= decoded.padding_length <= 900)

    def test_server_session_id_differs(self) -> None:
        """The server session ID is never the client's, even if random says so."""
        draws = iter([CLIENT_SID, CLIENT_SID, SERVER_SID])
        session = UdpServerSession(
            AES128, _psk(AES128), CLIENT_SID, now=_clock(), urandom=lambda n: next(draws)
        )
        self.assertEqual(session.session_id, SERVER_SID)

    def test_two_hop_identity_headers(self) -> None:
        """A relay re-sealing the separate header lets the server find the user."""
        relay_psk = bytes(range(0x10, 0x30))
        session = UdpClientSession(
            AES256, PskChain((relay_psk, IPSK), UPSK), now=_clock(), session_id=CLIENT_SID
        )
        packet = session.encode(DNS53, b"hop")
        relay = Cipher(algorithms.AES(relay_psk), modes.ECB()).decryptor()
        separate = relay.update(packet[:16])
        eih0 = relay.update(packet[16:32])
        self.assertEqual(bytes(a ^ b for a, b in zip(eih0, separate)), hash16(IPSK))
        resealed = Cipher(algorithms.AES(IPSK), modes.ECB()).encryptor().update(separate)
        server = UdpServerDecoder(
            AES256, IPSK, now=_clock(), users={hash16(UPSK): UserKey("alice", UPSK)}
        )
        self.assertEqual(server.decode(resealed + packet[32:]).payload, b"hop")


# -- rejections ----------------------------------------------------------------


class TcpRejectionTests(SynchronousTestCase):
    """Every rule of wire.md §7.3-§7.5 refuses bad requests and responses."""

    def _request(self, method: str = AES256, **kwargs: object) -> tuple[RequestEncoder, bytes]:
        client = _client(method, **kwargs)
        return client, client.encode_header(ADDR443, b"hello")

    def test_timestamp_window_server(self) -> None:
        """A request 31 s off either way is stale; 30 s off is fine."""
        for skew, ok in ((30, True), (-30, True), (31, False), (-31, False)):
            _, stream = self._request(now=_clock(TS + skew))
            server = _server(AES256)
            if ok:
                self.assertEqual(server.decrypt(stream), b"hello")
            else:
                self.assertRaises(StaleTimestampError, server.decrypt, stream)

    def test_timestamp_window_client(self) -> None:
        """A response 31 s off either way is stale; 30 s off is fine."""
        for skew, ok in ((30, True), (-30, True), (31, False), (-31, False)):
            client, stream = self._request()
            server = _server(AES256)
            server.decrypt(stream)
            response = ResponseEncoder(
                AES256, _psk(AES256), client.salt, now=_clock(TS + skew)
            ).encrypt(b"r")
            decoder = client.response_decoder()
            if ok:
                self.assertEqual(decoder.decrypt(response), b"r")
            else:
                self.assertRaises(StaleTimestampError, decoder.decrypt, response)

    def test_replayed_salt(self) -> None:
        """A request replayed on one SaltPool is refused for as long as it is fresh."""
        clock = _Clock(TS + 0.9)
        pool = SaltPool(clock)
        # Stamped 30 s ahead: still fresh 60 s (plus truncation) later.
        _, stream = self._request(now=_clock(TS + 30))
        self.assertEqual(_server(AES256, salt_check=pool, now=clock).decrypt(stream), b"hello")
        for later in (1, 30, 60.9):
            clock.t = TS + later
            self.assertRaises(
                ReplayError, _server(AES256, salt_check=pool, now=clock).decrypt, stream
            )

    def test_salt_recorded_only_after_authentication(self) -> None:
        """Bad tags and stale timestamps never put a salt in the pool."""
        pool = SaltPool(_clock())
        _, stream = self._request()
        forged = stream[:40] + bytes([stream[40] ^ 1]) + stream[41:]
        self.assertRaises(
            AuthenticationError, _server(AES256, salt_check=pool).decrypt, forged
        )
        _, stale = self._request(now=_clock(TS - 100))
        self.assertRaises(StaleTimestampError, _server(AES256, salt_check=pool).decrypt, stale)
        self.assertEqual(len(pool), 0)

    def test_salt_check_callable(self) -> None:
        """A plain callable works as the replay checker; False means replay."""
        seen: list[bytes] = []
        _, stream = self._request()
        server = _server(AES256, salt_check=lambda salt: seen.append(salt) or True)
        self.assertEqual(server.decrypt(stream), b"hello")
        self.assertEqual(seen, [stream[:32]])
        refusing = _server(AES256, salt_check=lambda salt: False)
        self.assertRaises(ReplayError, refusing.decrypt, stream)

    def test_wrong_psk(self) -> None:
        """A request sealed with another PSK fails authentication."""
        _, stream = self._request()
        server = _server(AES256, bytes(32))
        self.assertRaises(AuthenticationError, server.decrypt, stream)
        # The decoder stays dead afterwards.
        self.assertRaises(ProtocolError, server.decrypt, b"more")

    def test_unknown_user(self) -> None:
        """An identity header naming no configured user fails authentication."""
        keys, psk, users = _eih_setups(AES256)[1]
        stranger = PskChain(keys.identity_keys, bytes(range(0xE0, 0x100)))
        stream = _client(AES256, stranger).encode_header(ADDR443, b"x")
        server = _server(AES256, psk, users=users)
        self.assertRaises(AuthenticationError, server.decrypt, stream)

    def test_missing_identity_header(self) -> None:
        """A multi-user server refuses a request without identity header."""
        _, psk, users = _eih_setups(AES256)[1]
        stream = _client(AES256, PskChain((), psk)).encode_header(ADDR443, b"x")
        self.assertRaises(ProtocolError, _server(AES256, psk, users=users).decrypt, stream)

    def test_no_payload_no_padding(self) -> None:
        """A variable header with neither payload nor padding is refused."""
        variable = encode_address(ADDR443) + b"\x00\x00"
        stream = _hand_request(AES256, variable)
        self.assertRaises(ProtocolError, _server(AES256).decrypt, stream)

    def test_padding_limit(self) -> None:
        """Padding of 900 bytes passes, 901 is refused."""
        for padding, ok in ((900, True), (901, False)):
            variable = encode_address(ADDR443) + padding.to_bytes(2, "big") + bytes(padding)
            server = _server(AES256)
            if ok:
                self.assertEqual(server.decrypt(_hand_request(AES256, variable)), b"")
            else:
                stream = _hand_request(AES256, variable)
                self.assertRaises(ProtocolError, server.decrypt, stream)

    def test_truncated_variable_header(self) -> None:
        """Address or padding running past the declared header length is refused."""
        address = encode_address(ADDR443)
        for variable in (
            address[:-1],
            address + b"\x00",
            address + b"\x00\x05abcd",
            b"",
        ):
            self.assertRaises(
                ProtocolError, _server(AES256).decrypt, _hand_request(AES256, variable)
            )

    def test_truncated_stream_waits(self) -> None:
        """Every strict prefix of a request is simply not complete yet."""
        _, stream = self._request()
        for end in range(len(stream)):
            server = _server(AES256)
            self.assertEqual(server.decrypt(stream[:end]), b"")
            self.assertIsNone(server.header)

    def test_wrong_type(self) -> None:
        """A request header of type 1 is refused."""
        variable = encode_address(ADDR443) + b"\x00\x00hi"
        self.assertRaises(
            ProtocolError, _server(AES256).decrypt, _hand_request(AES256, variable, kind=1)
        )

    def test_response_for_other_request(self) -> None:
        """A response echoing another salt is refused."""
        client, _ = self._request()
        response = ResponseEncoder(AES256, _psk(AES256), bytes(32), now=_clock()).encrypt(b"r")
        self.assertRaises(ProtocolError, client.response_decoder().decrypt, response)

    def test_request_is_not_a_response(self) -> None:
        """A request stream fed to the response decoder is refused."""
        client, stream = self._request()
        self.assertRaises(ProtocolError, client.response_decoder().decrypt, stream + bytes(64))

    @_SOME
    @given(data=st.data())
    def test_bit_flips(self, data: st.DataObject) -> None:
        """Flipping any bit of request, chunk or response is always detected."""
        method = data.draw(st.sampled_from(METHODS_2022))
        eih = data.draw(st.booleans()) and method != CHACHA
        keys, psk, users = _eih_setups(method)[1 if eih else 0]
        client = _client(method, keys)
        request = client.encode_header(ADDR443, b"hello") + client.encrypt(b"again")
        server = _server(method, psk, users=users)
        server.decrypt(request)
        encoder = server.response_encoder()
        response = encoder.encrypt(b"world") + encoder.encrypt(b"!")
        which = data.draw(st.booleans())
        stream = request if which else response
        bit = data.draw(st.integers(0, len(stream) * 8 - 1))
        flipped = bytearray(stream)
        flipped[bit // 8] ^= 1 << (bit % 8)
        decoder = _server(method, psk, users=users) if which else client.response_decoder()
        with self.assertRaises(ProtocolError):
            decoder.decrypt(bytes(flipped))

    @_SOME
    @given(
        method=st.sampled_from(METHODS_2022),
        eih=st.booleans(),
        garbage=st.binary(min_size=0, max_size=400),
        cuts=st.lists(st.integers(min_value=0), max_size=4),
    )
    def test_random_bytes(
        self, method: str, eih: bool, garbage: bytes, cuts: list[int]
    ) -> None:
        """Random bytes make the decoders wait or raise a ProtocolError, nothing else."""
        eih = eih and method != CHACHA
        keys, psk, users = _eih_setups(method)[1 if eih else 0]
        for decoder in (
            _server(method, psk, users=users),
            ResponseDecoder(method, psk, bytes(_size(method)), now=_clock()),
        ):
            try:
                for piece in _chunks(garbage, cuts):
                    decoder.decrypt(piece)
            except ProtocolError:
                pass

    @_SOME
    @given(
        variable=st.one_of(
            st.binary(max_size=300),
            st.builds(
                lambda address, padding, rest: address + padding.to_bytes(2, "big") + rest,
                st.sampled_from(
                    [encode_address(ADDR443), encode_address(DNS53), b"\x03\x00", b"\x04"]
                ),
                st.integers(0, 1200),
                st.binary(max_size=1200),
            ),
        )
    )
    def test_random_variable_headers(self, variable: bytes) -> None:
        """Any authentic variable header is accepted or refused with ProtocolError."""
        try:
            _server(AES128).decrypt(_hand_request(AES128, variable))
        except ProtocolError:
            pass


class UdpRejectionTests(SynchronousTestCase):
    """Bad UDP packets are refused (wire.md §7.6, §7.8)."""

    def _pair(
        self, method: str = AES256, client_now: float = TS, server_now: float = TS
    ) -> tuple[UdpClientSession, UdpServerDecoder]:
        client = UdpClientSession(method, PskChain((), _psk(method)), now=_clock(client_now))
        return client, UdpServerDecoder(method, _psk(method), now=_clock(server_now))

    def test_timestamp_window(self) -> None:
        """Packets 31 s off are stale in both directions; 30 s off pass."""
        for skew, ok in ((30, True), (-30, True), (31, False), (-31, False)):
            client, server = self._pair(client_now=TS + skew)
            packet = client.encode(DNS53, b"q")
            if ok:
                self.assertEqual(server.decode(packet).payload, b"q")
            else:
                self.assertRaises(StaleTimestampError, server.decode, packet)
            client, server = self._pair()
            reply_side = UdpServerSession(
                AES256, _psk(AES256), client.session_id, now=_clock(TS + skew)
            )
            reply = reply_side.encode(DNS53, b"a")
            if ok:
                self.assertEqual(client.decode(reply).payload, b"a")
            else:
                self.assertRaises(StaleTimestampError, client.decode, reply)

    def test_wrong_psk(self) -> None:
        """A packet sealed with another PSK fails authentication."""
        client, _ = self._pair()
        server = UdpServerDecoder(AES256, bytes(32), now=_clock())
        self.assertRaises(AuthenticationError, server.decode, client.encode(DNS53, b"q"))

    def test_unknown_user(self) -> None:
        """An identity header naming no configured user fails authentication."""
        keys, psk, users = _eih_setups(AES256)[1]
        stranger = PskChain(keys.identity_keys, bytes(range(0xE0, 0x100)))
        packet = UdpClientSession(AES256, stranger, now=_clock()).encode(DNS53, b"q")
        server = UdpServerDecoder(AES256, psk, now=_clock(), users=users)
        self.assertRaises(AuthenticationError, server.decode, packet)

    def test_reply_for_other_session(self) -> None:
        """A reply addressed to another client session is refused."""
        client, _ = self._pair()
        other = UdpServerSession(AES256, _psk(AES256), CLIENT_SID, now=_clock())
        self.assertRaises(ProtocolError, client.decode, other.encode(DNS53, b"a"))

    def test_client_packet_is_not_a_reply(self) -> None:
        """A client packet fed back to a client is refused (wrong type or tag)."""
        client, _ = self._pair()
        self.assertRaises(ProtocolError, client.decode, client.encode(DNS53, b"q" * 20))

    def test_truncated(self) -> None:
        """Every strict prefix of a packet is refused with ProtocolError."""
        client, server = self._pair()
        packet = client.encode(DNS53, b"q")
        for end in range(len(packet)):
            self.assertRaises(ProtocolError, server.decode, packet[:end])

    def test_bad_bodies(self) -> None:
        """Wrong type, padding overrun and cut address are refused."""
        ts = TS.to_bytes(8, "big")
        for body in (
            b"\x01" + ts + b"\x00\x00" + encode_address(DNS53),
            b"\x00" + ts + b"\x00\x09" + encode_address(DNS53),
            b"\x00" + ts + b"\x00\x00" + encode_address(DNS53)[:-1],
            b"\x00" + ts + b"\x00\x00\x07",
        ):
            server = UdpServerDecoder(AES128, _psk(AES128), now=_clock())
            self.assertRaises(ProtocolError, server.decode, _hand_udp(AES128, body))

    def test_replayed_packet(self) -> None:
        """The session's window refuses a packet ID it already accepted."""
        client, server = self._pair()
        packet = client.encode(DNS53, b"q")
        window = SlidingWindow()
        self.assertTrue(window.accept(server.decode(packet).packet_id))
        self.assertFalse(window.accept(server.decode(packet).packet_id))
        self.assertRaises(ReplayError, window.require, 0)

    def test_replayed_reply(self) -> None:
        """A client session refuses a server reply it already accepted (same server session and packet ID)."""
        for method in METHODS_2022:
            client, server = self._pair(method)
            reply_side = server.session(server.decode(client.encode(DNS53, b"q")))
            first = reply_side.encode(DNS53, b"a")
            self.assertEqual(client.decode(first).payload, b"a")
            with self.assertRaises(ReplayError, msg=method):
                client.decode(first)
            # The session goes on: the next reply is accepted.
            self.assertEqual(client.decode(reply_side.encode(DNS53, b"b")).payload, b"b")

    def test_reply_window_order(self) -> None:
        """Replies may arrive out of order, each once; one older than the window is refused."""
        client, _ = self._pair()
        reply_side = UdpServerSession(AES256, _psk(AES256), client.session_id, now=_clock())
        replies = {}
        for packet_id in (0, 1, 2, WINDOW_SIZE + 10):
            reply_side.packet_id = packet_id
            replies[packet_id] = reply_side.encode(DNS53, str(packet_id).encode())
        for packet_id in (2, 0, 1):
            self.assertEqual(client.decode(replies[packet_id]).packet_id, packet_id)
        self.assertRaises(ReplayError, client.decode, replies[1])
        client.decode(replies[WINDOW_SIZE + 10])
        self.assertRaises(ReplayError, client.decode, replies[2])

    def test_reply_windows_per_server_session(self) -> None:
        """A new server session starts its packet IDs again; each server session's replays are still refused."""
        client, _ = self._pair()
        first = UdpServerSession(AES256, _psk(AES256), client.session_id, now=_clock())
        second = UdpServerSession(AES256, _psk(AES256), client.session_id, now=_clock())
        old = first.encode(DNS53, b"1")
        new = second.encode(DNS53, b"2")
        self.assertEqual(client.decode(old).packet_id, 0)
        self.assertEqual(client.decode(new).packet_id, 0)
        self.assertRaises(ReplayError, client.decode, old)
        self.assertRaises(ReplayError, client.decode, new)

    def test_server_sessions_bounded(self) -> None:
        """A client session keeps a bounded number of server windows, forgetting one only once its replies are all stale."""
        clock = _Clock()
        client = UdpClientSession(AES256, PskChain((), _psk(AES256)), now=clock)

        def server_session() -> UdpServerSession:
            return UdpServerSession(AES256, _psk(AES256), client.session_id, now=clock)

        sessions = [server_session() for _ in range(SERVER_SESSIONS_KEPT)]
        captured = []
        for session in sessions:
            captured.append(session.encode(DNS53, b"x"))
            client.decode(captured[-1])
        # Every window is recent: one more server session is refused, and
        # a replay of the oldest's reply still is too.
        one_more = server_session()
        self.assertRaises(ProtocolError, client.decode, one_more.encode(DNS53, b"y"))
        clock.t += 30
        self.assertRaises(ReplayError, client.decode, captured[0])
        # The others keep talking; the first goes quiet for 61 s and is forgotten.
        for session in sessions[1:]:
            client.decode(session.encode(DNS53, b"z"))
        clock.t += 31
        self.assertEqual(client.decode(one_more.encode(DNS53, b"y")).payload, b"y")
        # Its captured reply cannot come back through a fresh window: it is stale.
        self.assertRaises(StaleTimestampError, client.decode, captured[0])

    def test_refused_reply_keeps_its_id(self) -> None:
        """A reply refused for its content does not use up its packet ID."""
        client, _ = self._pair()
        separate = SERVER_SID + bytes(8)
        cut = b"\x01" + TS.to_bytes(8, "big") + client.session_id + b"\x00\x00" + encode_address(DNS53)[:-1]
        self.assertRaises(ProtocolError, client.decode, _hand_sealed(AES256, _psk(AES256), separate, cut))
        good = b"\x01" + TS.to_bytes(8, "big") + client.session_id + b"\x00\x00" + encode_address(DNS53) + b"ok"
        self.assertEqual(client.decode(_hand_sealed(AES256, _psk(AES256), separate, good)).payload, b"ok")

    @_SOME
    @given(data=st.data())
    def test_bit_flips(self, data: st.DataObject) -> None:
        """Flipping any bit of a packet or reply is always detected."""
        method = data.draw(st.sampled_from(AES_METHODS))
        keys, psk, users = _eih_setups(method)[data.draw(st.integers(0, 1))]
        client = UdpClientSession(method, keys, now=_clock())
        server = UdpServerDecoder(method, psk, now=_clock(), users=users)
        packet = client.encode(DNS53, b"query")
        reply = server.session(server.decode(packet)).encode(DNS53, b"answer")
        to_server = data.draw(st.booleans())
        target = bytearray(packet if to_server else reply)
        bit = data.draw(st.integers(0, len(target) * 8 - 1))
        target[bit // 8] ^= 1 << (bit % 8)
        with self.assertRaises(ProtocolError):
            (server.decode if to_server else client.decode)(bytes(target))

    @_SOME
    @given(garbage=st.binary(max_size=200), eih=st.booleans())
    def test_random_bytes(self, garbage: bytes, eih: bool) -> None:
        """Random datagrams raise ProtocolError subclasses only."""
        keys, psk, users = _eih_setups(AES256)[1 if eih else 0]
        server = UdpServerDecoder(AES256, psk, now=_clock(), users=users)
        client = UdpClientSession(AES256, keys, now=_clock())
        for decode in (server.decode, client.decode):
            with self.assertRaises(ProtocolError):
                decode(garbage)

    @_SOME
    @given(tail=st.binary(max_size=120))
    def test_random_bodies(self, tail: bytes) -> None:
        """Any authentic body is accepted or refused with ProtocolError."""
        body = b"\x00" + TS.to_bytes(8, "big") + tail
        try:
            server = UdpServerDecoder(AES128, _psk(AES128), now=_clock())
            server.decode(_hand_udp(AES128, body))
        except ProtocolError:
            pass


class UdpDecoderFuzzTests(SynchronousTestCase):
    """
    Whatever arrives, the UDP decoders of both ends return a packet or
    raise ProtocolError (a subclass included), and never anything else;
    a client session never accepts one server packet ID twice.
    """

    @_SOME
    @given(
        method=st.sampled_from(METHODS_2022),
        garbage=st.binary(max_size=300),
        eih=st.booleans(),
    )
    def test_random_datagrams(self, method: str, garbage: bytes, eih: bool) -> None:
        """Random datagrams of every method are refused with ProtocolError by both ends."""
        keys, psk, users = _eih_setups(method)[-1 if eih else 0]
        decoders = (
            UdpServerDecoder(method, psk, now=_clock(), users=users).decode,
            UdpClientSession(method, keys, now=_clock()).decode,
        )
        for decode in decoders:
            with self.assertRaises(ProtocolError):
                decode(garbage)

    @_SOME
    @given(
        method=st.sampled_from(METHODS_2022),
        to_server=st.booleans(),
        eih=st.booleans(),
        prefix=st.integers(0, 3),
        tail=st.binary(max_size=120),
        packet_id=st.integers(0, 2**64 - 1),
    )
    @example(AES128, True, True, 2, b"\x00\x00" + encode_address(DNS53) + b"ok", 3)
    @example(CHACHA, False, False, 3, b"\x00\x01\x00" + encode_address(ADDR443), 0)
    def test_authentic_bodies(
        self, method: str, to_server: bool, eih: bool, prefix: int, tail: bytes, packet_id: int
    ) -> None:
        """Arbitrary bodies sealed with the right keys are decoded or refused with ProtocolError, on both ends."""
        keys, psk, users = _eih_setups(method)[-1 if eih else 0]
        client = UdpClientSession(method, keys, now=_clock())
        kind = b"\x00" if to_server else b"\x01"
        # How much of a valid header comes before the random bytes.
        heads = [b"", kind, kind + TS.to_bytes(8, "big")]
        heads.append(heads[2] + (b"" if to_server else client.session_id))
        body = heads[prefix] + tail
        separate = (client.session_id if to_server else SERVER_SID) + packet_id.to_bytes(8, "big")
        try:
            if to_server:
                identity = psk if users is not None else None
                packet = _hand_sealed(method, keys.user_key, separate, body, identity=identity)
                decoded = UdpServerDecoder(method, psk, now=_clock(), users=users).decode(packet)
            else:
                decoded = client.decode(_hand_sealed(method, keys.user_key, separate, body))
        except ProtocolError:
            return
        self.assertEqual(decoded.packet_id, packet_id)

    @_SOME
    @given(
        method=st.sampled_from(METHODS_2022),
        steps=st.lists(
            st.tuples(
                st.booleans(),
                st.integers(0, 50),
                st.integers(0, 40),
                st.integers(-1, 400),
                st.integers(0, 700),
            ),
            max_size=40,
        ),
    )
    def test_reply_sequences(self, method: str, steps: list[tuple[bool, int, int, int, int]]) -> None:
        """Replies from several server sessions, replayed, reordered, corrupted and late: no datagram is accepted twice."""
        clock = _Clock()
        client = UdpClientSession(method, PskChain((), _psk(method)), now=clock)
        servers = [
            UdpServerSession(method, _psk(method), client.session_id, now=clock)
            for _ in range(SERVER_SESSIONS_KEPT + 2)
        ]
        sent: list[bytes] = []
        accepted: set[bytes] = set()
        for replay, index, packet_id, flip, wait in steps:
            clock.t += wait / 10
            if replay and sent:
                packet = bytearray(sent[index % len(sent)])
            else:
                server = servers[index % len(servers)]
                server.packet_id = packet_id
                packet = bytearray(server.encode(DNS53, b"r"))
                sent.append(bytes(packet))
            if flip >= 0:
                packet[flip % len(packet)] ^= 1 << (flip % 8)
            try:
                client.decode(bytes(packet))
            except ProtocolError:
                continue
            self.assertNotIn(bytes(packet), accepted)
            accepted.add(bytes(packet))


# -- replay filters ---------------------------------------------------------------


class SaltPoolTests(SynchronousTestCase):
    """The exact, time-bounded salt pool."""

    def test_retention(self) -> None:
        """A salt is remembered for at least 60 s and forgotten afterwards."""
        clock = _Clock(1000.5)
        pool = SaltPool(clock)
        self.assertTrue(pool.check_and_add(b"a" * 16))
        self.assertFalse(pool.check_and_add(b"a" * 16))
        clock.t += 60.9
        self.assertFalse(pool.check_and_add(b"a" * 16))
        self.assertIn(b"a" * 16, pool)
        clock.t += 1
        self.assertTrue(pool.check_and_add(b"b" * 16))
        self.assertNotIn(b"a" * 16, pool)
        self.assertEqual(len(pool), 1)

    def test_bounded_by_time(self) -> None:
        """Old salts leave the pool as time passes, whatever the traffic."""
        clock = _Clock()
        pool = SaltPool(clock)
        for index in range(1000):
            clock.t += 0.5
            self.assertTrue(pool.check_and_add(index.to_bytes(16, "big")))
        self.assertLessEqual(len(pool), 123)

    def test_short_retention_refused(self) -> None:
        """A retention under 60 s would let replays through: refused."""
        self.assertRaises(ValueError, SaltPool, _clock(), 59.0)


class SlidingWindowTests(SynchronousTestCase):
    """The UDP packet-ID window."""

    def test_in_order_and_duplicates(self) -> None:
        """IDs are accepted once each, in any order inside the window."""
        window = SlidingWindow()
        for packet_id in (0, 2, 1, 5, 3):
            self.assertTrue(window.accept(packet_id))
        for packet_id in (0, 1, 2, 3, 5):
            self.assertFalse(window.accept(packet_id))
        self.assertTrue(window.accept(4))

    def test_too_old(self) -> None:
        """An ID older than newest - 8064 is refused, one inside is accepted."""
        self.assertGreaterEqual(WINDOW_SIZE, 8064)
        window = SlidingWindow()
        self.assertTrue(window.accept(20000))
        self.assertFalse(window.check(20000 - WINDOW_SIZE - 1))
        self.assertTrue(window.accept(20000 - WINDOW_SIZE))
        self.assertFalse(window.accept(20000 - WINDOW_SIZE))

    def test_big_jump_clears(self) -> None:
        """A jump beyond the window forgets everything older."""
        window = SlidingWindow()
        self.assertTrue(window.accept(1))
        self.assertTrue(window.accept(1 + 3 * WINDOW_SIZE))
        self.assertFalse(window.accept(1))
        self.assertTrue(window.accept(3 * WINDOW_SIZE))

    def test_check_does_not_record(self) -> None:
        """check() alone never marks an ID as seen."""
        window = SlidingWindow()
        self.assertTrue(window.check(7))
        self.assertTrue(window.check(7))
        window.add(7)
        self.assertFalse(window.check(7))

    @_FEW
    @given(ids=st.lists(st.integers(0, 20000), max_size=200))
    def test_matches_model(self, ids: list[int]) -> None:
        """The window agrees with a set-based model of the rule."""
        window = SlidingWindow()
        seen: set[int] = set()
        newest = 0
        for packet_id in ids:
            expected = packet_id not in seen and packet_id + WINDOW_SIZE >= newest
            self.assertEqual(window.accept(packet_id), expected)
            if expected:
                seen.add(packet_id)
                newest = max(newest, packet_id)


# -- configuration ----------------------------------------------------------------


class ConfigurationTests(SynchronousTestCase):
    """PSK parsing, user tables, generation and method lookup."""

    def test_psk_length(self) -> None:
        """A key of the wrong length is a ConfigError on 'password'."""
        for method, text in (
            (AES128, base64.b64encode(bytes(32)).decode()),
            (AES256, base64.b64encode(bytes(16)).decode()),
            (CHACHA, "password"),
        ):
            with self.assertRaises(ConfigError) as caught:
                decode_psk(method, text)
            self.assertEqual(caught.exception.key, "password")

    def test_psk_not_base64(self) -> None:
        """Text that is not base64 is a ConfigError, not a crash."""
        with self.assertRaises(ConfigError) as caught:
            decode_psk(AES128, "not base64 at all!")
        self.assertEqual(caught.exception.key, "password")

    def test_psk_padding_optional(self) -> None:
        """Missing '=' padding is accepted, as by rust."""
        self.assertEqual(decode_psk(AES128, "AAECAwQFBgcICQoLDA0ODw"), bytes(range(16)))

    def test_chacha_refuses_identity_headers(self) -> None:
        """iPSK:uPSK with ChaCha is a ConfigError (EIH is AES only)."""
        key = generate_psk(CHACHA)
        self.assertRaises(ConfigError, parse_password, CHACHA, f"{key}:{key}")
        self.assertRaises(ConfigError, user_table, CHACHA, {"a": key})

    def test_user_table(self) -> None:
        """Users are found by hash16 of their key; duplicate keys are refused."""
        key = base64.b64encode(UPSK).decode()
        table = user_table(AES256, {"alice": key})
        self.assertEqual(table, {hash16(UPSK): UserKey("alice", UPSK)})
        self.assertRaises(ConfigError, user_table, AES256, {"a": key, "b": key})
        with self.assertRaises(ConfigError) as caught:
            user_table(AES256, {"carol": "AAAA"})
        self.assertEqual(caught.exception.key, "users.carol")

    def test_generate_psk(self) -> None:
        """Generated keys are base64 of the method's key length and decode back."""
        for method in METHODS_2022:
            key = generate_psk(method)
            self.assertEqual(len(base64.b64decode(key)), _size(method))
            self.assertEqual(len(decode_psk(method, key)), _size(method))
        self.assertEqual(generate_psk(AES128, urandom=bytes), "AAAAAAAAAAAAAAAAAAAAAA==")

    def test_lookup(self) -> None:
        """Method names are case-insensitive; unknown ones are a ConfigError."""
        self.assertEqual(lookup_method_2022("2022-BLAKE3-AES-128-GCM").key_size, 16)
        self.assertRaises(ConfigError, lookup_method_2022, "aes-128-gcm")
        self.assertEqual(
            METHODS_2022, (AES128, AES256, CHACHA)
        )

    def test_raw_key_sizes(self) -> None:
        """Raw keys of the wrong size are refused when a codec is built."""
        short = PskChain((), bytes(16))
        self.assertRaises(ValueError, RequestEncoder, AES256, short, now=_clock())
        self.assertRaises(ValueError, UdpClientSession, AES256, short, now=_clock())
        self.assertRaises(ValueError, _server, AES256, bytes(16))
        self.assertRaises(ValueError, UdpServerDecoder, AES256, bytes(16), now=_clock())

    def test_keys_not_in_repr(self) -> None:
        """Key material never shows up in reprs (they end up in logs)."""
        self.assertEqual(repr(PskChain((IPSK,), UPSK)), "PskChain()")
        self.assertEqual(repr(UserKey("alice", UPSK)), "UserKey(name='alice')")


class XChaChaTests(SynchronousTestCase):
    """XChaCha20-Poly1305 from the library's ChaCha20, against the published draft vectors."""

    def test_hchacha20_vector(self) -> None:
        """HChaCha20 (draft-irtf-cfrg-xchacha-03 §2.2.1, test-vectors.md §3.4)."""
        from ssx.crypto._xchacha import hchacha20

        self.assertEqual(
            hchacha20(bytes(range(32)), h("000000090000004a0000000031415927")),
            h("82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"),
        )

    def test_aead_vector(self) -> None:
        """XChaCha20-Poly1305 (draft §A.3.1): ciphertext start and tag, and decryption back."""
        from ssx.crypto._xchacha import XChaCha20Poly1305

        key, nonce, aad = bytes(range(0x80, 0xA0)), bytes(range(0x40, 0x58)), h("50515253c0c1c2c3c4c5c6c7")
        text = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, "
                b"sunscreen would be it.")
        sealed = XChaCha20Poly1305(key).encrypt(nonce, text, aad)
        self.assertEqual(sealed[:32], h("bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"))
        self.assertEqual(sealed[-16:], h("c0875924c1c7987947deafd8780acf49"))
        self.assertEqual(XChaCha20Poly1305(key).decrypt(nonce, sealed, aad), text)
