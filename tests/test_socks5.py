"""
Tests for `ssx.wire.socks5`, the server side of a SOCKS5 negotiation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from ssx.wire.address import Address, encode_address
from ssx.errors import ProtocolError, Socks5Error
from ssx.wire.socks5 import (
    CMD_BIND,
    CMD_CONNECT,
    CMD_UDP_ASSOCIATE,
    REP_ADDRESS_TYPE_NOT_SUPPORTED,
    REP_COMMAND_NOT_SUPPORTED,
    REP_CONNECTION_REFUSED,
    REP_GENERAL_FAILURE,
    REP_HOST_UNREACHABLE,
    REP_NETWORK_UNREACHABLE,
    REP_NOT_ALLOWED,
    REP_SUCCEEDED,
    REP_TTL_EXPIRED,
    Socks5Negotiation,
    Socks5Request,
    build_reply,
)

_settings = settings(max_examples=200, deadline=None, database=None)

_CREDENTIALS = (b"alice", b"s3cret")
_TARGET = Address("example.com", 80)
_REQUEST_TAIL = encode_address(_TARGET)
# The largest message a client can send (RFC 1929 with 255-byte fields).
_MAX_MESSAGE = 1 + 1 + 255 + 1 + 255

_REPLY_07 = bytes.fromhex("05070001000000000000")
_REPLY_08 = bytes.fromhex("05080001000000000000")
_REPLY_01 = bytes.fromhex("05010001000000000000")


def _greeting(*methods: int) -> bytes:
    return bytes((5, len(methods), *methods))


def _auth(username: bytes, password: bytes) -> bytes:
    return (
        bytes((1, len(username)))
        + username
        + bytes((len(password),))
        + password
    )


def _request(command: int, address: Address = _TARGET, rsv: int = 0) -> bytes:
    return bytes((5, command, rsv)) + encode_address(address)


def _split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(points, points[1:])]


@dataclass(frozen=True)
class _Outcome:
    """What a client sees from a run: everything written, and how it ended."""

    kind: str  # "request", "error" or "pending"
    written: bytes
    request: Socks5Request | None = None


class _Runner(SynchronousTestCase):
    """Shared driver: feed chunks the way the protocol would."""

    def run_chunks(
        self, negotiation: Socks5Negotiation, chunks: Sequence[bytes]
    ) -> _Outcome:
        """
        Feed `chunks` until the negotiation ends, checking the buffer bound.

        Bytes in chunks after the one that completed the request are
        appended to its `extra`, as the relay would receive them next.
        """
        written = bytearray()
        for index, chunk in enumerate(chunks):
            try:
                out, request = negotiation.feed(chunk)
            except Socks5Error as e:
                return _Outcome("error", bytes(written) + e.reply)
            self.assertLessEqual(len(negotiation._buffer), _MAX_MESSAGE)
            written += out
            if request is not None:
                rest = b"".join(chunks[index + 1 :])
                whole = Socks5Request(
                    request.command, request.address, request.extra + rest
                )
                return _Outcome("request", bytes(written), whole)
        return _Outcome("pending", bytes(written))

    def assertRefused(
        self, negotiation: Socks5Negotiation, data: bytes, reply: bytes
    ) -> None:
        """Feeding `data` whole raises Socks5Error carrying exactly `reply`."""
        e = self.assertRaises(Socks5Error, negotiation.feed, data)
        self.assertEqual(e.reply, reply)


class ConstantTests(SynchronousTestCase):
    """Wire values and reply building."""

    def test_values(self) -> None:
        """CMD and REP constants are the RFC 1928 values."""
        self.assertEqual((CMD_CONNECT, CMD_BIND, CMD_UDP_ASSOCIATE), (1, 2, 3))
        self.assertEqual(
            [
                REP_SUCCEEDED,
                REP_GENERAL_FAILURE,
                REP_NOT_ALLOWED,
                REP_NETWORK_UNREACHABLE,
                REP_HOST_UNREACHABLE,
                REP_CONNECTION_REFUSED,
                REP_TTL_EXPIRED,
                REP_COMMAND_NOT_SUPPORTED,
                REP_ADDRESS_TYPE_NOT_SUPPORTED,
            ],
            list(range(9)),
        )

    def test_build_reply_default(self) -> None:
        """The default reply binds 0.0.0.0:0 and is the full 10 bytes."""
        self.assertEqual(
            build_reply(REP_SUCCEEDED), bytes.fromhex("05000001000000000000")
        )

    def test_build_reply_bind(self) -> None:
        """BND.ADDR/BND.PORT carry the given address, IPv4, IPv6 or name."""
        self.assertEqual(
            build_reply(REP_SUCCEEDED, Address("127.0.0.1", 1080)),
            bytes.fromhex("050000017f0000010438"),
        )
        self.assertEqual(
            build_reply(REP_CONNECTION_REFUSED, Address("::1", 80)),
            bytes.fromhex("05050004" + "00" * 15 + "01" + "0050"),
        )
        self.assertEqual(
            build_reply(REP_HOST_UNREACHABLE, Address("example.com", 80)),
            b"\x05\x04\x00" + _REQUEST_TAIL,
        )


class NoAuthTests(_Runner):
    """Negotiations without credentials."""

    def test_connect_step_by_step(self) -> None:
        """Greeting gets 05 00, then the request comes back without a reply."""
        negotiation = Socks5Negotiation()
        self.assertEqual(negotiation.feed(_greeting(0)), (b"\x05\x00", None))
        self.assertEqual(
            negotiation.feed(_request(CMD_CONNECT)),
            (b"", Socks5Request(CMD_CONNECT, _TARGET, b"")),
        )

    def test_pipelined(self) -> None:
        """Greeting, request and first data in one piece work; data is extra."""
        negotiation = Socks5Negotiation()
        out, request = negotiation.feed(
            _greeting(0) + _request(CMD_CONNECT) + b"GET / HTTP/1.0\r\n"
        )
        self.assertEqual(out, b"\x05\x00")
        self.assertEqual(
            request, Socks5Request(CMD_CONNECT, _TARGET, b"GET / HTTP/1.0\r\n")
        )

    def test_byte_at_a_time(self) -> None:
        """One byte per feed gives the same replies and request."""
        data = _greeting(0x80, 0, 2) + _request(CMD_CONNECT)
        outcome = self.run_chunks(Socks5Negotiation(), [bytes((b,)) for b in data])
        self.assertEqual(
            outcome,
            _Outcome("request", b"\x05\x00", Socks5Request(CMD_CONNECT, _TARGET, b"")),
        )

    def test_empty_feed(self) -> None:
        """Feeding nothing writes nothing and completes nothing."""
        self.assertEqual(Socks5Negotiation().feed(b""), (b"", None))

    def test_selects_no_auth_among_others(self) -> None:
        """00 is selected when offered beside other methods."""
        self.assertEqual(
            Socks5Negotiation().feed(_greeting(1, 2, 0, 0xFE)), (b"\x05\x00", None)
        )

    def test_no_acceptable_method(self) -> None:
        """A client offering only 02 (or 01) gets 05 FF."""
        self.assertRefused(Socks5Negotiation(), _greeting(2), b"\x05\xff")
        self.assertRefused(Socks5Negotiation(), _greeting(1, 2, 3), b"\x05\xff")

    def test_zero_methods(self) -> None:
        """NMETHODS = 0 is refused with 05 FF as soon as it arrives."""
        self.assertRefused(Socks5Negotiation(), b"\x05\x00", b"\x05\xff")

    def test_greeting_version(self) -> None:
        """A greeting VER other than 5 is refused silently on its first byte."""
        for version in (4, 0, 1, 0x47):
            self.assertRefused(Socks5Negotiation(), bytes((version,)), b"")
        self.assertRefused(Socks5Negotiation(), b"\x04\x01\x00\x50", b"")

    def test_request_version(self) -> None:
        """A request VER other than 5 is refused silently."""
        negotiation = Socks5Negotiation()
        negotiation.feed(_greeting(0))
        self.assertRefused(negotiation, b"\x04" + _request(CMD_CONNECT)[1:], b"")

    def test_request_version_pipelined(self) -> None:
        """A bad request VER after a good greeting still sends the 05 00."""
        self.assertRefused(Socks5Negotiation(), _greeting(0) + b"\x04", b"\x05\x00")

    def test_rsv_ignored(self) -> None:
        """A non-zero RSV byte in the request is ignored."""
        negotiation = Socks5Negotiation()
        negotiation.feed(_greeting(0))
        _, request = negotiation.feed(_request(CMD_CONNECT, rsv=0xFF))
        self.assertEqual(request, Socks5Request(CMD_CONNECT, _TARGET, b""))

    def test_each_atyp(self) -> None:
        """IPv4, IPv6 and name targets all come through."""
        for address in (
            Address("8.8.8.8", 53),
            Address("2001:db8::1", 443),
            Address("example.com", 80),
        ):
            negotiation = Socks5Negotiation()
            _, request = negotiation.feed(_greeting(0) + _request(CMD_CONNECT, address))
            self.assertEqual(request, Socks5Request(CMD_CONNECT, address, b""))


class RequestRefusalTests(_Runner):
    """Requests refused with a full reply."""

    def _negotiated(self, **kwargs: object) -> Socks5Negotiation:
        negotiation = Socks5Negotiation(**kwargs)  # type: ignore[arg-type]
        self.assertEqual(negotiation.feed(_greeting(0)), (b"\x05\x00", None))
        return negotiation

    def test_bind(self) -> None:
        """BIND gets the full 10-byte reply with REP 07."""
        self.assertEqual(build_reply(REP_COMMAND_NOT_SUPPORTED), _REPLY_07)
        self.assertRefused(self._negotiated(), _request(CMD_BIND), _REPLY_07)

    def test_bind_early(self) -> None:
        """A bad command is refused before its address arrives."""
        self.assertRefused(self._negotiated(), b"\x05\x02", _REPLY_07)

    def test_unknown_commands(self) -> None:
        """CMD 0, 4 and 0xff get REP 07."""
        for command in (0, 4, 0xFF):
            self.assertRefused(self._negotiated(), _request(command), _REPLY_07)

    def test_udp_associate_not_enabled(self) -> None:
        """UDP ASSOCIATE gets REP 07 unless it is in `commands`."""
        self.assertRefused(self._negotiated(), _request(CMD_UDP_ASSOCIATE), _REPLY_07)

    def test_udp_associate_enabled(self) -> None:
        """UDP ASSOCIATE with an all-zero address is returned when enabled."""
        negotiation = self._negotiated(
            commands=frozenset({CMD_CONNECT, CMD_UDP_ASSOCIATE})
        )
        zero = Address("0.0.0.0", 0)
        self.assertEqual(
            negotiation.feed(_request(CMD_UDP_ASSOCIATE, zero)),
            (b"", Socks5Request(CMD_UDP_ASSOCIATE, zero, b"")),
        )

    def test_connect_not_enabled(self) -> None:
        """CONNECT is refused with REP 07 when `commands` leaves it out."""
        negotiation = self._negotiated(commands=frozenset({CMD_UDP_ASSOCIATE}))
        self.assertRefused(negotiation, _request(CMD_CONNECT), _REPLY_07)

    def test_bad_atyp(self) -> None:
        """ATYP 0, 2, 5 and 0x11 (OTA) get REP 08, as soon as ATYP arrives."""
        self.assertEqual(build_reply(REP_ADDRESS_TYPE_NOT_SUPPORTED), _REPLY_08)
        for atyp in (0, 2, 5, 0x11):
            self.assertRefused(
                self._negotiated(), bytes((5, CMD_CONNECT, 0, atyp)), _REPLY_08
            )

    def test_command_checked_before_atyp(self) -> None:
        """A request bad in both CMD and ATYP gets REP 07: CMD comes first."""
        self.assertRefused(self._negotiated(), b"\x05\x02\x00\x02", _REPLY_07)

    def test_empty_name(self) -> None:
        """A name of length 0 gets REP 01."""
        self.assertRefused(self._negotiated(), b"\x05\x01\x00\x03\x00", _REPLY_01)

    def test_bad_name_bytes(self) -> None:
        """A name with NUL or invalid UTF-8 gets REP 01."""
        for name in (b"a\x00b", b"\xff\xfe"):
            data = b"\x05\x01\x00\x03" + bytes((len(name),)) + name + b"\x00\x50"
            self.assertRefused(self._negotiated(), data, _REPLY_01)

    def test_refusal_pipelined(self) -> None:
        """A refused request in the same piece as the greeting keeps the 05 00."""
        self.assertRefused(
            Socks5Negotiation(),
            _greeting(0) + _request(CMD_BIND),
            b"\x05\x00" + _REPLY_07,
        )


class AuthTests(_Runner):
    """Negotiations with RFC 1929 username/password."""

    def test_success(self) -> None:
        """Method 02 is selected, right credentials get 01 00, then the request."""
        negotiation = Socks5Negotiation(_CREDENTIALS)
        self.assertEqual(negotiation.feed(_greeting(0, 2)), (b"\x05\x02", None))
        self.assertEqual(negotiation.feed(_auth(*_CREDENTIALS)), (b"\x01\x00", None))
        self.assertEqual(
            negotiation.feed(_request(CMD_CONNECT)),
            (b"", Socks5Request(CMD_CONNECT, _TARGET, b"")),
        )

    def test_pipelined(self) -> None:
        """Greeting, auth, request and data in one piece give both replies at once."""
        negotiation = Socks5Negotiation(_CREDENTIALS)
        out, request = negotiation.feed(
            _greeting(2) + _auth(*_CREDENTIALS) + _request(CMD_CONNECT) + b"hello"
        )
        self.assertEqual(out, b"\x05\x02\x01\x00")
        self.assertEqual(request, Socks5Request(CMD_CONNECT, _TARGET, b"hello"))

    def test_only_no_auth_offered(self) -> None:
        """With credentials required, a client offering only 00 gets 05 FF."""
        self.assertRefused(Socks5Negotiation(_CREDENTIALS), _greeting(0), b"\x05\xff")

    def test_wrong_password(self) -> None:
        """A wrong password gets 01 01."""
        negotiation = Socks5Negotiation(_CREDENTIALS)
        negotiation.feed(_greeting(2))
        self.assertRefused(negotiation, _auth(b"alice", b"guess"), b"\x01\x01")

    def test_wrong_username(self) -> None:
        """A wrong username with the right password gets 01 01."""
        negotiation = Socks5Negotiation(_CREDENTIALS)
        negotiation.feed(_greeting(2))
        self.assertRefused(negotiation, _auth(b"bob", b"s3cret"), b"\x01\x01")

    def test_empty_fields(self) -> None:
        """Zero-length username and password are just wrong credentials: 01 01."""
        negotiation = Socks5Negotiation(_CREDENTIALS)
        negotiation.feed(_greeting(2))
        self.assertRefused(negotiation, b"\x01\x00\x00", b"\x01\x01")

    def test_wrong_password_pipelined(self) -> None:
        """A wrong password in the same piece as the greeting keeps the 05 02."""
        self.assertRefused(
            Socks5Negotiation(_CREDENTIALS),
            _greeting(2) + _auth(b"alice", b"guess") + _request(CMD_CONNECT),
            b"\x05\x02\x01\x01",
        )

    def test_auth_version(self) -> None:
        """A sub-negotiation VER other than 1 is refused silently."""
        negotiation = Socks5Negotiation(_CREDENTIALS)
        negotiation.feed(_greeting(2))
        self.assertRefused(negotiation, b"\x05" + _auth(*_CREDENTIALS)[1:], b"")

    def test_longest_credentials(self) -> None:
        """255-byte username and password are accepted."""
        credentials = (b"u" * 255, b"p" * 255)
        negotiation = Socks5Negotiation(credentials)
        out, _ = negotiation.feed(_greeting(2) + _auth(*credentials))
        self.assertEqual(out, b"\x05\x02\x01\x00")

    def test_bad_configured_credentials(self) -> None:
        """Credentials that RFC 1929 cannot carry are refused up front."""
        for credentials in ((b"", b"p"), (b"u", b""), (b"u" * 256, b"p")):
            self.assertRaises(ValueError, Socks5Negotiation, credentials)


class LifecycleTests(_Runner):
    """What happens after the negotiation ends."""

    def test_feed_after_request(self) -> None:
        """Feeding after the request was returned raises ProtocolError."""
        negotiation = Socks5Negotiation()
        negotiation.feed(_greeting(0) + _request(CMD_CONNECT))
        e = self.assertRaises(ProtocolError, negotiation.feed, b"more")
        self.assertNotIsInstance(e, Socks5Error)

    def test_feed_after_failure(self) -> None:
        """Feeding after a refusal raises ProtocolError, not another reply."""
        negotiation = Socks5Negotiation()
        self.assertRaises(Socks5Error, negotiation.feed, b"\x04")
        e = self.assertRaises(ProtocolError, negotiation.feed, _greeting(0))
        self.assertNotIsInstance(e, Socks5Error)

    def test_bounded_buffer(self) -> None:
        """The largest legal message, fed a byte at a time, is all that is held."""
        credentials = (b"u" * 255, b"p" * 255)
        negotiation = Socks5Negotiation(credentials)
        negotiation.feed(_greeting(2))
        data = _auth(*credentials)
        for byte in data[:-1]:
            self.assertEqual(negotiation.feed(bytes((byte,))), (b"", None))
        self.assertEqual(len(negotiation._buffer), _MAX_MESSAGE - 1)
        self.assertEqual(negotiation.feed(data[-1:]), (b"\x01\x00", None))
        self.assertEqual(len(negotiation._buffer), 0)


# Conversations -----------------------------------------------------------

_names = st.binary(min_size=1, max_size=255)
_targets = st.one_of(
    st.builds(Address, st.ip_addresses(v=4).map(str), st.integers(0, 0xFFFF)),
    st.builds(
        Address,
        st.ip_addresses(v=6).map(lambda ip: ip.compressed),
        st.integers(0, 0xFFFF),
    ),
    st.builds(
        Address,
        st.from_regex(
            r"[a-z0-9-]{1,20}(\.[a-z0-9-]{1,20}){0,3}", fullmatch=True
        ).filter(lambda host: not host.replace(".", "").isdigit()),
        st.integers(0, 0xFFFF),
    ),
)
_commands = st.sampled_from([CMD_CONNECT, CMD_BIND, CMD_UDP_ASSOCIATE])


@st.composite
def _conversations(
    draw: st.DrawFn,
) -> tuple[Callable[[], Socks5Negotiation], bytes, bytes, Socks5Request]:
    """A valid client conversation and what the server should say and return."""
    credentials = draw(st.one_of(st.none(), st.tuples(_names, _names)))
    command = draw(_commands)
    commands = draw(st.frozensets(_commands)) | {command}
    wanted = 0 if credentials is None else 2
    others = draw(
        st.lists(st.integers(0, 0xFF).filter(lambda m: m != wanted), max_size=10)
    )
    methods = draw(st.permutations([wanted, *others]))
    target = draw(_targets)
    extra = draw(st.binary(max_size=64))

    data = _greeting(*methods)
    replies = bytes((5, wanted))
    if credentials is not None:
        data += _auth(*credentials)
        replies += b"\x01\x00"
    data += bytes((5, command, draw(st.integers(0, 0xFF)))) + encode_address(target)
    data += extra
    return (
        lambda: Socks5Negotiation(credentials, commands),
        data,
        replies,
        Socks5Request(command, target, extra),
    )


_structured_bytes = st.lists(
    st.sampled_from([0, 1, 2, 3, 4, 5, 0x11, 0xFF]), max_size=80
).map(bytes)


class PropertyTests(_Runner):
    """Properties over generated conversations and garbage."""

    @_settings
    @given(_conversations(), st.data())
    def test_conversation_any_split(
        self,
        conversation: tuple[
            Callable[[], Socks5Negotiation], bytes, bytes, Socks5Request
        ],
        data: st.DataObject,
    ) -> None:
        """A valid conversation split anywhere gives the same replies and request."""
        make_negotiation, wire, replies, expected = conversation
        out, request = make_negotiation().feed(wire)
        self.assertEqual((out, request), (replies, expected))

        cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=12))
        self.assertEqual(
            self.run_chunks(make_negotiation(), _split(wire, cuts)),
            _Outcome("request", replies, expected),
        )

    @_settings
    @given(
        st.one_of(st.none(), st.just(_CREDENTIALS)),
        st.frozensets(_commands),
        st.sampled_from(
            [b"", _greeting(0), _greeting(2), _greeting(2) + _auth(*_CREDENTIALS)]
        ),
        st.one_of(st.binary(max_size=600), _structured_bytes),
        st.data(),
    )
    def test_arbitrary_bytes(
        self,
        credentials: tuple[bytes, bytes] | None,
        commands: frozenset[int],
        prefix: bytes,
        garbage: bytes,
        data: st.DataObject,
    ) -> None:
        """Any bytes, split anywhere, end as when whole; only Socks5Error escapes."""
        wire = prefix + garbage
        whole = self.run_chunks(Socks5Negotiation(credentials, commands), [wire])
        cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=12))
        negotiation = Socks5Negotiation(credentials, commands)
        self.assertEqual(self.run_chunks(negotiation, _split(wire, cuts)), whole)
        if whole.kind != "pending":
            self.assertRaises(ProtocolError, negotiation.feed, b"\x05")


class UdpDatagramTests(SynchronousTestCase):
    """SOCKS5 UDP datagrams (RFC 1928 §7) to and from the Shadowsocks plaintext."""

    def test_strip_header(self):
        """RSV and FRAG are stripped; what remains is ATYP ADDR PORT DATA."""
        from ssx.wire.socks5 import udp_to_shadowsocks

        self.assertEqual(udp_to_shadowsocks(b"\x00\x00\x00\x01\x08\x08\x08\x08\x00\x35query"), b"\x01\x08\x08\x08\x08\x00\x35query")

    def test_refused(self):
        """Fragments, short datagrams and truncated addresses raise ProtocolError."""
        from ssx.errors import ProtocolError
        from ssx.wire.socks5 import udp_to_shadowsocks

        for datagram in (b"", b"\x00\x00\x00", b"\x00\x00\x01\x01\x08\x08\x08\x08\x00\x35x", b"\x00\x00\x00\x01\x08\x08", b"\x00\x00\x00\x09abc"):
            with self.assertRaises(ProtocolError, msg=datagram):
                udp_to_shadowsocks(datagram)

    def test_ip_addresses_checked_by_length(self):
        """IPv4 and IPv6 targets pass whole and are refused one byte short (port included)."""
        from ssx.errors import ProtocolError
        from ssx.wire.socks5 import udp_to_shadowsocks

        for address in (b"\x01" + bytes(4) + b"\x00\x35", b"\x04" + bytes(range(16)) + b"\x00\x35"):
            self.assertEqual(udp_to_shadowsocks(b"\x00\x00\x00" + address), address)
            self.assertEqual(udp_to_shadowsocks(b"\x00\x00\x00" + address + b"data"), address + b"data")
            with self.assertRaises(ProtocolError):
                udp_to_shadowsocks(b"\x00\x00\x00" + address[:-1])

    @given(st.binary(max_size=64))
    def test_arbitrary_bytes(self, datagram):
        """Arbitrary bytes give a plaintext starting with a whole address, or ProtocolError, nothing else."""
        from ssx.wire.address import decode_address
        from ssx.errors import ProtocolError
        from ssx.wire.socks5 import udp_to_shadowsocks

        try:
            plaintext = udp_to_shadowsocks(datagram)
        except ProtocolError:
            return
        self.assertIsNotNone(decode_address(plaintext))
