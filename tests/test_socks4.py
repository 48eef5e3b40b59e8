"""The SOCKS4/4a request parser (sans-IO), against requests built by hand from the protocol documents."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from ssx.wire.address import Address
from ssx.errors import ProtocolError
from ssx.wire.socks4 import REP_GRANTED, REP_REJECTED, Socks4Error, Socks4Negotiation, build_reply

_settings = settings(max_examples=200, deadline=None, database=None)


def request4(ip: str, port: int, userid: bytes = b"") -> bytes:
    return b"\x04\x01" + struct.pack("!H", port) + bytes(int(x) for x in ip.split(".")) + userid + b"\0"


def request4a(host: bytes, port: int, userid: bytes = b"") -> bytes:
    return b"\x04\x01" + struct.pack("!H", port) + b"\0\0\0\x01" + userid + b"\0" + host + b"\0"


class Socks4Tests(unittest.SynchronousTestCase):
    """SOCKS4 and 4a CONNECT requests."""

    def test_socks4_ip(self):
        """A SOCKS4 request gives the IPv4 target, the user id, and nothing extra."""
        request = Socks4Negotiation().feed(request4("192.0.2.7", 443, b"alice"))
        self.assertEqual((request.address, request.userid, request.extra), (Address("192.0.2.7", 443), b"alice", b""))

    def test_socks4a_name(self):
        """A SOCKS4a request (IP 0.0.0.x) gives the host name that follows the user id."""
        request = Socks4Negotiation().feed(request4a(b"example.org", 80) + b"GET / HTTP/1.1\r\n")
        self.assertEqual(request.address, Address("example.org", 80))
        self.assertEqual(request.extra, b"GET / HTTP/1.1\r\n")

    def test_ip_zero_is_not_4a(self):
        """0.0.0.0 (last byte zero) is a plain SOCKS4 address, not the 4a marker."""
        request = Socks4Negotiation().feed(request4("0.0.0.0", 80))
        self.assertEqual(request.address, Address("0.0.0.0", 80))

    def test_bind_rejected(self):
        """BIND (CD=2) is refused with reply 91."""
        with self.assertRaises(Socks4Error) as caught:
            Socks4Negotiation().feed(b"\x04\x02\x00\x50\x7f\x00\x00\x01\x00")
        self.assertEqual(caught.exception.reply, build_reply(REP_REJECTED))

    def test_overlong_fields_rejected(self):
        """A user id or 4a host name longer than 255 bytes is refused before its NUL arrives."""
        for data in (b"\x04\x01\x00\x50\x01\x02\x03\x04" + b"u" * 256, request4a(b"", 80)[:-1] + b"h" * 256):
            with self.assertRaises(Socks4Error):
                Socks4Negotiation().feed(data)

    def test_port_zero_and_empty_name(self):
        """Port 0 and an empty 4a name are refused with 91."""
        for data in (request4("192.0.2.1", 0), request4a(b"", 80)):
            with self.assertRaises(Socks4Error) as caught:
                Socks4Negotiation().feed(data)
            self.assertEqual(caught.exception.reply[1], REP_REJECTED)

    def test_reply_format(self):
        """Replies are VN=0, CD, and six zero bytes."""
        self.assertEqual(build_reply(REP_GRANTED), b"\x00\x5a" + b"\x00" * 6)

    def test_fed_after_done(self):
        """Feeding a finished negotiation is a ProtocolError."""
        negotiation = Socks4Negotiation()
        negotiation.feed(request4("192.0.2.1", 1))
        with self.assertRaises(ProtocolError):
            negotiation.feed(b"x")

    @_settings
    @given(
        st.one_of(
            st.tuples(st.just("4"), st.ip_addresses(v=4).map(str).filter(lambda ip: not ip.startswith("0.0.0."))),
            st.tuples(st.just("4a"), st.from_regex(r"[a-z0-9.-]{1,60}", fullmatch=True)),
        ),
        st.integers(1, 65535),
        st.binary(max_size=40).map(lambda b: b.replace(b"\0", b"")),
        st.binary(max_size=30),
        st.data(),
    )
    def test_any_split(self, kind, port, userid, extra, data):
        """However the request is split across reads, the same target, user id and extra bytes come out."""
        version, host = kind
        raw = (request4(host, port, userid) if version == "4" else request4a(host.encode(), port, userid)) + extra
        cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=6)))
        negotiation = Socks4Negotiation()
        result = None
        pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]
        for i, piece in enumerate(pieces):
            result = negotiation.feed(piece)
            if result is not None:
                extra_seen = result.extra + b"".join(pieces[i + 1:])
                break
        self.assertIsNotNone(result)
        self.assertEqual((result.address, result.userid, extra_seen), (Address(host, port), userid, extra))

    @_settings
    @given(st.binary(max_size=600))
    def test_fuzz(self, raw):
        """Arbitrary bytes give a request, need more, or a Socks4Error: nothing else, and never more than 520 bytes held."""
        negotiation = Socks4Negotiation()
        try:
            negotiation.feed(raw)
        except Socks4Error:
            return
        self.assertLessEqual(len(negotiation._buffer), 8 + 256 + 256)
