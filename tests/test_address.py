"""
Tests for `ssx.wire.address`, the Shadowsocks target address header codec.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.provisional import domains
from twisted.trial.unittest import SynchronousTestCase

from ssx.wire.address import (
    ATYP_DOMAIN,
    ATYP_IPV4,
    ATYP_IPV6,
    Address,
    address_size,
    check_target,
    decode_address,
    decode_target,
    encode_address,
    is_hostname,
)
from ssx.errors import AddressError, UnsupportedAddressType
from tests.support.forged import reference_check

_settings = settings(max_examples=300, deadline=None, database=None)

_EXAMPLE_COM = bytes.fromhex("030b6578616d706c652e636f6d0050")
_GOOGLE_DNS = bytes.fromhex("01080808080035")
_IPV6_HTTPS = bytes.fromhex("04" "20010db8000000000000000000000001" "01bb")

_KNOWN = [
    (Address("example.com", 80), _EXAMPLE_COM),
    (Address("8.8.8.8", 53), _GOOGLE_DNS),
    (Address("2001:db8::1", 443), _IPV6_HTTPS),
]


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


_ports = st.integers(0, 0xFFFF)
_ipv4_hosts = st.ip_addresses(v=4).map(str)
_ipv6_hosts = st.ip_addresses(v=6).map(lambda ip: ip.compressed)
# Printable ASCII without controls: anything a client could legally name.
_ascii_names = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=255
).filter(lambda host: not _is_ip_literal(host))
_hosts = st.one_of(_ipv4_hosts, _ipv6_hosts, domains(), _ascii_names)
_addresses = st.builds(Address, _hosts, _ports)
_buffers = st.sampled_from([bytes, bytearray, memoryview])


class KnownBytesTests(SynchronousTestCase):
    """Each address type against hand-checked wire bytes."""

    def test_encode_known(self) -> None:
        """Each ATYP encodes to its exact known bytes."""
        for address, wire in _KNOWN:
            self.assertEqual(encode_address(address), wire)

    def test_decode_known(self) -> None:
        """Each ATYP decodes from its known bytes, ending just past the port."""
        for address, wire in _KNOWN:
            self.assertEqual(decode_address(wire), (address, len(wire)))

    def test_decode_buffer_types(self) -> None:
        """bytearray and memoryview input decode exactly like bytes."""
        for address, wire in _KNOWN:
            for kind in (bytearray, memoryview):
                self.assertEqual(decode_address(kind(wire)), (address, len(wire)))

    def test_atyp_constants(self) -> None:
        """The ATYP constants are the wire values."""
        self.assertEqual((ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6), (1, 3, 4))
        self.assertEqual(_GOOGLE_DNS[0], ATYP_IPV4)
        self.assertEqual(_EXAMPLE_COM[0], ATYP_DOMAIN)
        self.assertEqual(_IPV6_HTTPS[0], ATYP_IPV6)

    def test_decode_at_offset(self) -> None:
        """A header inside a larger buffer decodes at its offset; end is absolute."""
        data = b"\xaa\xbb\xcc" + _EXAMPLE_COM + b"payload"
        self.assertEqual(
            decode_address(memoryview(data), 3),
            (Address("example.com", 80), 3 + len(_EXAMPLE_COM)),
        )

    def test_trailing_bytes_ignored(self) -> None:
        """Bytes after the port are left alone and end points at them."""
        address, end = decode_address(_GOOGLE_DNS + b"GET /") or (None, 0)
        self.assertEqual(address, Address("8.8.8.8", 53))
        self.assertEqual(end, len(_GOOGLE_DNS))

    def test_prefixes_need_more(self) -> None:
        """Every proper prefix of a valid header, at any offset, gives None."""
        for _, wire in _KNOWN:
            for cut in range(len(wire)):
                self.assertIsNone(decode_address(wire[:cut]))
                self.assertIsNone(decode_address(b"xy" + wire[:cut], 2))

    def test_offset_past_end(self) -> None:
        """An offset at or past the end of the buffer needs more bytes."""
        self.assertIsNone(decode_address(_GOOGLE_DNS, len(_GOOGLE_DNS)))
        self.assertIsNone(decode_address(_GOOGLE_DNS, 100))

    def test_ipv6_compressed(self) -> None:
        """IPv6 hosts come out in compressed text form."""
        wire = b"\x04" + b"\x00" * 15 + b"\x01" + b"\x00\x16"
        self.assertEqual(decode_address(wire), (Address("::1", 22), len(wire)))

    def test_ipv4_literal_kept(self) -> None:
        """A host that is an IPv4 literal is sent as ATYP 1, not as a name."""
        self.assertEqual(encode_address(Address("127.0.0.1", 1080))[0], ATYP_IPV4)

    def test_ipv4_like_name(self) -> None:
        """Something that only looks like IPv4 (leading zero) goes as a name."""
        self.assertEqual(encode_address(Address("010.0.0.1", 80))[0], ATYP_DOMAIN)

    def test_idna(self) -> None:
        """A non-ASCII name is sent as its IDNA A-label and decodes as such."""
        wire = encode_address(Address("bücher.example", 443))
        self.assertEqual(wire, b"\x03\x15xn--bcher-kva.example\x01\xbb")
        self.assertEqual(
            decode_address(wire), (Address("xn--bcher-kva.example", 443), len(wire))
        )

    def test_idna_to_ip_literal(self) -> None:
        """A non-ASCII host that IDNA maps to an IP literal is sent as that IP."""
        self.assertEqual(
            encode_address(Address("\uff11\uff12\uff17.0.0.1", 80)),
            encode_address(Address("127.0.0.1", 80)),
        )

    def test_raw_utf8_name(self) -> None:
        """A name sent as raw UTF-8 is accepted and decoded as text."""
        name = "bücher.example".encode("utf-8")
        wire = b"\x03" + bytes((len(name),)) + name + b"\x00\x50"
        self.assertEqual(
            decode_address(wire), (Address("bücher.example", 80), len(wire))
        )

    def test_longest_name(self) -> None:
        """A 255-byte name round-trips."""
        address = Address("a" * 255, 1)
        wire = encode_address(address)
        self.assertEqual(len(wire), 259)
        self.assertEqual(address_size(wire), 259)
        self.assertEqual(decode_address(wire), (address, 259))

    def test_str(self) -> None:
        """str() is host:port, with IPv6 bracketed."""
        self.assertEqual(str(Address("example.com", 80)), "example.com:80")
        self.assertEqual(str(Address("8.8.8.8", 53)), "8.8.8.8:53")
        self.assertEqual(str(Address("::1", 443)), "[::1]:443")

    def test_address_size(self) -> None:
        """address_size needs only ATYP (and LEN) to know the header length."""
        self.assertEqual(address_size(b"\x01"), 7)
        self.assertEqual(address_size(b"\x04"), 19)
        self.assertIsNone(address_size(b"\x03"))
        self.assertEqual(address_size(b"\x03\x0b"), 15)
        self.assertIsNone(address_size(b""))
        self.assertEqual(address_size(b"zz\x01", 2), 7)


class DecodeErrorTests(SynchronousTestCase):
    """Malformed headers are refused with the right error."""

    def test_bad_atyp(self) -> None:
        """ATYP 0, 2, 5, 0x11 (OTA) and 0xff are unsupported, even alone."""
        for atyp in (0, 2, 5, 0x11, 0x13, 0x14, 0xFF):
            for tail in (b"", b"\x08\x08\x08\x08\x00\x35"):
                with self.assertRaises(UnsupportedAddressType):
                    decode_address(bytes((atyp,)) + tail)
            with self.assertRaises(UnsupportedAddressType):
                address_size(bytes((atyp,)))

    def test_unsupported_is_address_error(self) -> None:
        """UnsupportedAddressType is an AddressError, so one except catches both."""
        self.assertTrue(issubclass(UnsupportedAddressType, AddressError))

    def test_empty_name(self) -> None:
        """A name of length 0 is refused as soon as LEN arrives."""
        for data in (b"\x03\x00", b"\x03\x00\x00\x50"):
            with self.assertRaises(AddressError):
                decode_address(data)

    def test_name_not_utf8(self) -> None:
        """Name bytes that are not UTF-8 are refused."""
        with self.assertRaises(AddressError):
            decode_address(b"\x03\x02\xff\xfe\x00\x50")

    def test_name_control_characters(self) -> None:
        """NUL, other C0 controls, DEL and C1 controls in a name are refused."""
        for name in (b"a\x00b", b"a\nb", b"\x1f", b"a\x7f", "a\x85b".encode()):
            wire = b"\x03" + bytes((len(name),)) + name + b"\x00\x50"
            with self.assertRaises(AddressError):
                decode_address(wire)


class EncodeErrorTests(SynchronousTestCase):
    """Addresses that cannot go on the wire are refused."""

    def test_bad_ports(self) -> None:
        """Ports outside 0..65535 and non-integer ports are refused."""
        for port in (-1, 65536, 1 << 40, True, 80.0, "80"):
            with self.assertRaises(AddressError):
                encode_address(Address("example.com", port))  # type: ignore[arg-type]

    def test_edge_ports(self) -> None:
        """Ports 0 and 65535 encode."""
        self.assertEqual(encode_address(Address("1.2.3.4", 0))[-2:], b"\x00\x00")
        self.assertEqual(encode_address(Address("1.2.3.4", 65535))[-2:], b"\xff\xff")

    def test_oversize_name(self) -> None:
        """A name longer than 255 bytes is refused."""
        with self.assertRaises(AddressError):
            encode_address(Address("a" * 256, 80))
        with self.assertRaises(AddressError):
            encode_address(Address(".".join(["a" * 63] * 4) + "a", 80))

    def test_oversize_idna_name(self) -> None:
        """A non-ASCII name whose A-label form is over 255 bytes is refused."""
        host = ".".join(["ü" + "a" * 50] * 5)
        with self.assertRaises(AddressError):
            encode_address(Address(host, 80))

    def test_empty_name(self) -> None:
        """An empty host is refused."""
        with self.assertRaises(AddressError):
            encode_address(Address("", 80))

    def test_unencodable_idna(self) -> None:
        """A non-ASCII name the IDNA codec rejects (label too long) is refused."""
        with self.assertRaises(AddressError):
            encode_address(Address("ü" + "a" * 70 + ".example", 80))

    def test_control_characters(self) -> None:
        """A host with control characters is refused."""
        for host in ("a\x00b", "exa\nmple.com", "a\x7f"):
            with self.assertRaises(AddressError):
                encode_address(Address(host, 80))

    def test_scoped_ipv6(self) -> None:
        """A scoped IPv6 literal is refused: the wire has no room for the zone."""
        with self.assertRaises(AddressError):
            encode_address(Address("fe80::1%eth0", 80))


class PropertyTests(SynchronousTestCase):
    """Properties over generated addresses and bytes."""

    @_settings
    @given(_addresses, _buffers, st.binary(max_size=8), st.binary(max_size=8))
    def test_round_trip(
        self, address: Address, kind: type, before: bytes, after: bytes
    ) -> None:
        """Any encodable address decodes back to itself from any buffer type."""
        wire = encode_address(address)
        data = kind(before + wire + after)
        self.assertEqual(address_size(data, len(before)), len(wire))
        self.assertEqual(
            decode_address(data, len(before)), (address, len(before) + len(wire))
        )

    @_settings
    @given(st.text(min_size=1, max_size=60), _ports)
    def test_encode_text(self, host: str, port: int) -> None:
        """Any text either encodes to a header that decodes, or raises AddressError."""
        try:
            wire = encode_address(Address(host, port))
        except AddressError:
            return
        decoded = decode_address(wire)
        assert decoded is not None
        self.assertEqual(decoded[1], len(wire))
        self.assertEqual(decoded[0].port, port)
        self.assertEqual(encode_address(decoded[0]), wire)

    @_settings
    @given(
        st.one_of(
            st.binary(max_size=40),
            st.tuples(st.sampled_from([1, 3, 4]), st.binary(max_size=40)).map(
                lambda t: bytes((t[0],)) + t[1]
            ),
        ),
        st.integers(0, 45),
        _buffers,
    )
    def test_decode_arbitrary(self, data: bytes, offset: int, kind: type) -> None:
        """Arbitrary bytes give None, a consistent result, or an AddressError."""
        try:
            result = decode_address(kind(data), offset)
        except AddressError:
            return
        if result is None:
            return
        address, end = result
        self.assertEqual(end, offset + (address_size(data, offset) or 0))
        self.assertLessEqual(end, len(data))
        self.assertIsInstance(address.host, str)
        self.assertTrue(0 <= address.port <= 0xFFFF)


# -- the validity check a server applies before acting on a header ---------


def _name_header(name: bytes, port: int = 80) -> bytes:
    return b"\x03" + bytes((len(name),)) + name + port.to_bytes(2, "big")


_label_chars = st.sampled_from("abcxyzABZ019-_")
_labels = st.text(_label_chars, min_size=1, max_size=63)
_hostnames = st.lists(_labels, min_size=1, max_size=8).map(".".join).filter(lambda n: len(n) <= 253)
# Name bytes a prober's luck (or a broken client) may produce: near-misses
# of host names as well as arbitrary bytes.
_name_bytes = st.one_of(
    st.binary(min_size=1, max_size=255),
    st.text(st.sampled_from("ab-_.:%/ *\x00\x7f\u00fc1"), min_size=1, max_size=80).map(lambda t: t.encode()[:255]),
    _hostnames.map(str.encode),
)


class TargetCheckTests(SynchronousTestCase):
    """decode_target: the headers a server acts on, and the ones it refuses with AddressError."""

    VALID = [
        "example.com",
        "example.com.",
        "xn--bcher-kva.example",
        "_dmarc.example.org",
        "r3---sn-abc.googlevideo.com",
        "foo-.blogspot.com",
        "localhost",
        "a",
        "1.2.3.4",
        "2001:db8::1",
        "::ffff:192.0.2.1",
        "a" * 63 + ".example",
        ".".join(["a" * 63] * 3 + ["a" * 61]),
        ".".join(["a" * 63] * 3 + ["a" * 61]) + ".",
    ]

    INVALID = [
        b".",
        b".example.com",
        b"example..com",
        b"example.com..",
        b"a" * 64 + b".example",
        b".".join([b"a" * 63] * 3 + [b"a" * 62]),
        b"exa mple.com",
        b"example.com/path",
        b"user@example.com",
        b"example.com:80",
        b"*.example.com",
        b"fe80::1%eth0",
        b"::1%lo",
        b"a:b",
        "bücher.example".encode("utf-8"),
        b"\xff\xfe",
        b"a\x00b",
    ]

    def test_valid_names(self) -> None:
        """Host names (LDH, underscore, IDNA A-labels, 63-byte labels, 253 bytes, a trailing dot) and IP text are accepted."""
        for name in self.VALID:
            wire = _name_header(name.encode())
            self.assertEqual(decode_target(wire), (Address(name, 80), len(wire)), name)
            self.assertEqual(reference_check(wire), "valid", name)

    def test_invalid_names(self) -> None:
        """Empty labels, long labels, over 253 bytes, other bytes, zones and raw UTF-8 are refused with AddressError."""
        for name in self.INVALID:
            self.assertEqual(reference_check(_name_header(name)), "invalid", name)
            with self.assertRaises(AddressError, msg=repr(name)):
                decode_target(_name_header(name))
        with self.assertRaises(AddressError):
            decode_target(b"\x03\x00\x00\x50")

    def test_port_zero(self) -> None:
        """Port 0 is refused for every address type."""
        for wire in (_GOOGLE_DNS, _EXAMPLE_COM, _IPV6_HTTPS):
            with self.assertRaises(AddressError):
                decode_target(wire[:-2] + b"\x00\x00")
            with self.assertRaises(AddressError):
                check_target(decode_address(wire[:-2] + b"\x00\x00")[0])  # type: ignore[index]

    def test_every_other_atyp(self) -> None:
        """Every ATYP but 1, 3 and 4 (high bits such as OTA's 0x10 included) is refused from its first byte."""
        for atyp in set(range(256)) - {ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6}:
            for tail in (b"", b"\x04abcd\x00\x50"):
                with self.assertRaises(UnsupportedAddressType, msg=hex(atyp)):
                    decode_target(bytes((atyp,)) + tail)

    def test_known_and_prefixes(self) -> None:
        """Valid headers decode as with decode_address; their proper prefixes need more bytes."""
        for address, wire in _KNOWN:
            self.assertEqual(decode_target(b"xy" + wire + b"GET", 2), (address, 2 + len(wire)))
            for cut in range(len(wire)):
                self.assertIsNone(decode_target(wire[:cut]))

    def test_check_target(self) -> None:
        """check_target and is_hostname take values, not bytes: IP literals and host names pass, the rest do not."""
        for host in ("8.8.8.8", "2001:db8::1", "example.com"):
            check_target(Address(host, 443))
        for host in ("", "a..b", "fe80::1%eth0", "bücher.example", "a b"):
            with self.assertRaises(AddressError, msg=host):
                check_target(Address(host, 443))
        self.assertEqual([is_hostname(n) for n in ("example.com.", "example.com..", "")], [True, False, False])

    @_settings
    @given(_hostnames, st.integers(1, 0xFFFF), st.booleans())
    def test_hostnames_accepted(self, name: str, port: int, dot: bool) -> None:
        """Any name of host name labels (with or without a trailing dot) and a port 1..65535 round-trips through decode_target."""
        name += "." if dot else ""
        wire = encode_address(Address(name, port))
        self.assertEqual(decode_target(wire), (Address(name, port), len(wire)))

    @_settings
    @given(
        st.one_of(
            st.binary(max_size=40),
            st.tuples(st.sampled_from([1, 3, 4, 0x11, 0x13, 0x83]), st.binary(max_size=40)).map(lambda t: bytes((t[0],)) + t[1]),
            st.tuples(_name_bytes, st.integers(0, 3)).map(lambda t: _name_header(t[0], t[1])),
        ),
        st.integers(0, 3),
        _buffers,
    )
    def test_decode_target_arbitrary(self, data: bytes, offset: int, kind: type) -> None:
        """Arbitrary bytes give None, AddressError, or decode_address's own result for a header the reference rule accepts."""
        try:
            lenient = decode_address(kind(data), offset)
        except AddressError:
            lenient = "refused"
        try:
            strict = decode_target(kind(data), offset)
        except AddressError:
            strict = "refused"
        if lenient is None or lenient == "refused":
            self.assertEqual(strict, lenient)
            self.assertEqual(reference_check(data[offset:]), "short" if lenient is None else "invalid")
            return
        self.assertEqual(strict, lenient if reference_check(data[offset:]) == "valid" else "refused")
