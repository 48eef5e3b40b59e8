"""Which destinations the server refuses, and how it knows this host's own addresses."""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
import struct
import subprocess

from hypothesis import given, strategies as st
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

import ssx.server.host_addresses as host_addresses
from ssx.config import server_config
from ssx.errors import ConfigError
from ssx.server.forbidden import JUDGED_BY_CONTENT, SPECIAL_PURPOSE, embedded_ipv4, parse_forbidden
from ssx.server.host_address_watch import HostAddressWatcher
from ssx.server.host_addresses import HostAddresses, InterfaceAddress, NetlinkError, host_networks, parse_address_messages

# This host's addresses as the tests pretend them to be: public-looking, in
# no special-purpose range (strings only, never contacted).
OWN_V4 = "11.22.33.44"
OWN_V6 = "2a01:4f8:1:2::3"


def fake_host(*addresses: str) -> HostAddresses:
    """A HostAddresses that reads `addresses` (changed by assigning `.current`)."""
    host = HostAddresses(lambda: tuple(ipaddress.ip_network(a) for a in host.current))  # type: ignore[attr-defined]
    host.current = addresses  # type: ignore[attr-defined]
    return host


def default_forbidden():
    return parse_forbidden(None, host=fake_host(OWN_V4, OWN_V6))


# -- embeddings built from the RFC texts, independently of ssx.server.forbidden ----

def v4_bytes(ip: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, ip)


def v6(raw: bytes) -> str:
    return str(ipaddress.IPv6Address(raw))


def embeddings(ip: str) -> dict[str, str]:
    """Every IPv6 spelling that carries the IPv4 address `ip`, by name."""
    a = v4_bytes(ip)
    inverted = bytes(b ^ 0xFF for b in a)
    return {
        "mapped ::ffff:0:0/96 (RFC 4291)": v6(bytes(10) + b"\xff\xff" + a),
        "compatible ::/96 (RFC 4291)": v6(bytes(12) + a),
        "SIIT ::ffff:0:0:0/96 (RFC 2765)": v6(bytes(8) + b"\xff\xff\x00\x00" + a),
        "NAT64 64:ff9b::/96 (RFC 6052)": v6(bytes.fromhex("0064ff9b") + bytes(8) + a),
        # RFC 8215 local-use prefix, at each RFC 6052 §2.2 layout (u octet = bits 64-71 stays zero).
        "NAT64 64:ff9b:1::/48": v6(bytes.fromhex("0064ff9b0001") + a[:2] + b"\x00" + a[2:] + bytes(5)),
        "NAT64 64:ff9b:1:3::/56": v6(bytes.fromhex("0064ff9b000103") + a[:1] + b"\x00" + a[1:] + bytes(4)),
        "NAT64 64:ff9b:1:344::/64": v6(bytes.fromhex("0064ff9b00010344") + b"\x00" + a + bytes(3)),
        "NAT64 64:ff9b:1:344::/96": v6(bytes.fromhex("0064ff9b00010344") + bytes(4) + a),
        "6to4 2002::/16 (RFC 3056)": v6(b"\x20\x02" + a + bytes(10)),
        "Teredo server (RFC 4380)": v6(b"\x20\x01\x00\x00" + a + bytes.fromhex("8000ffff") + bytes(4)),
        "Teredo client, inverted (RFC 4380)": v6(b"\x20\x01\x00\x00" + v4_bytes("8.8.4.4") + bytes.fromhex("8000ffff") + inverted),
        "ISATAP 0:5efe (RFC 5214)": v6(bytes.fromhex("2a0102030405060700005efe") + a),
        "ISATAP 200:5efe (RFC 5214)": v6(bytes.fromhex("2a0102030405060702005efe") + a),
    }


# Forms whose range `special` refuses whatever they carry.
REFUSED_AS_RANGES = {
    "compatible ::/96 (RFC 4291)", "SIIT ::ffff:0:0:0/96 (RFC 2765)", "NAT64 64:ff9b:1::/48",
    "NAT64 64:ff9b:1:3::/56", "NAT64 64:ff9b:1:344::/64", "NAT64 64:ff9b:1:344::/96",
    "Teredo server (RFC 4380)", "Teredo client, inverted (RFC 4380)",
}


class EmbeddedIPv4Tests(unittest.SynchronousTestCase):
    """IPv6 forms that carry an IPv4 address are judged by it."""

    def test_rfc_examples_decoded(self):
        """The RFC examples decode to their IPv4 addresses: RFC 4380's Teredo address and RFC 6052 §2.4's layouts."""
        teredo = embedded_ipv4(ipaddress.IPv6Address("2001:0:4136:e378:8000:63bf:3fff:fdd2"))
        self.assertEqual({str(a) for a in teredo}, {"65.54.227.120", "192.0.2.45"})
        for spelled in ("64:ff9b:1:c000:2:2100::", "64:ff9b:1:3c0:0:221::", "64:ff9b:1:344:c0:2:2100:0",
                        "64:ff9b:1:344::192.0.2.33"):
            self.assertIn(ipaddress.IPv4Address("192.0.2.33"), embedded_ipv4(ipaddress.IPv6Address(spelled)), spelled)
        self.assertEqual(embedded_ipv4(ipaddress.IPv6Address("2606:4700::1111")), ())

    def test_each_form_refused_by_default(self):
        """Every form carrying 10.0.0.1, 127.0.0.1, 169.254.169.254 or this host's IPv4 address is refused by default."""
        forbidden = default_forbidden()
        for inner in ("10.0.0.1", "127.0.0.1", "169.254.169.254", "192.168.1.1", OWN_V4):
            for name, spelled in embeddings(inner).items():
                self.assertTrue(forbidden.forbids(spelled), f"{name}: {spelled} carries {inner}")

    def test_nat64_example_from_the_finding(self):
        """64:ff9b::a00:1 is 10.0.0.1 behind a NAT64 gateway: refused; 64:ff9b::808:808 is 8.8.8.8: allowed."""
        forbidden = default_forbidden()
        self.assertTrue(forbidden.forbids("64:ff9b::a00:1"))
        self.assertFalse(forbidden.forbids("64:ff9b::808:808"))

    def test_public_inside_allowed_forms(self):
        """A public IPv4 address in a form whose range is not refused (mapped, NAT64 well-known, 6to4, ISATAP) passes."""
        forbidden = default_forbidden()
        for name, spelled in embeddings("8.8.8.8").items():
            self.assertEqual(forbidden.forbids(spelled), name in REFUSED_AS_RANGES, f"{name}: {spelled}")

    def test_custom_list_applies_to_every_form(self):
        """With only 10.0.0.0/8 refused, every form carrying 10.0.0.1 is refused, and the same forms carrying 8.8.8.8 are not."""
        forbidden = parse_forbidden("10.0.0.0/8")
        for name, spelled in embeddings("10.0.0.1").items():
            self.assertTrue(forbidden.forbids(spelled), f"{name}: {spelled}")
        for name, spelled in embeddings("8.8.8.8").items():
            self.assertFalse(forbidden.forbids(spelled), f"{name}: {spelled}")

    @given(st.ip_addresses(v=4))
    def test_every_form_same_as_ipv4(self, ip):
        """
        Under an IPv4-only list, each embedding of any IPv4 address gets the
        IPv4 address's answer; in the local-use NAT64 prefix, whose layout
        is unknown, a refused IPv4 address is refused at every layout.
        """
        forbidden = parse_forbidden("10.0.0.0/8,127.0.0.0/8,192.168.0.0/16,172.16.0.0/12,0.0.0.0/8")
        expected = forbidden.forbids(str(ip))
        # (The Teredo client's server half, 8.8.4.4, is allowed: its client half decides.)
        for name, spelled in embeddings(str(ip)).items():
            if name.startswith("NAT64 64:ff9b:1:"):
                self.assertTrue(forbidden.forbids(spelled) or not expected, name)
            else:
                self.assertEqual(forbidden.forbids(spelled), expected, name)

    @given(st.ip_addresses(v=4))
    def test_mapped_same_as_ipv4(self, ip):
        """By default an IPv4-mapped IPv6 address gets the same answer as its IPv4 address."""
        forbidden = default_forbidden()
        self.assertEqual(forbidden.forbids(f"::ffff:{ip}"), forbidden.forbids(str(ip)))


# Addresses of the special-purpose ranges, written out here rather than
# taken from the table: first, inner and last addresses.
SPECIAL_ADDRESSES = [
    # IPv4 Special-Purpose Address Registry
    "0.0.0.0", "0.1.2.3", "0.255.255.255",  # this network
    "10.0.0.0", "10.1.2.3", "10.255.255.255",  # RFC 1918
    "100.64.0.0", "100.100.100.100", "100.127.255.255",  # shared address space
    "127.0.0.1", "127.8.9.10", "127.255.255.255",  # loopback
    "169.254.0.1", "169.254.169.254",  # link local
    "172.16.0.1", "172.31.255.255",  # RFC 1918
    "192.0.0.0", "192.0.0.1", "192.0.0.7", "192.0.0.8", "192.0.0.11", "192.0.0.170", "192.0.0.171",
    "192.0.0.255",  # IETF protocol assignments
    "192.0.2.0", "192.0.2.1", "192.0.2.255",  # TEST-NET-1
    "192.168.0.0", "192.168.1.1", "192.168.255.255",  # RFC 1918
    "198.18.0.0", "198.18.0.1", "198.19.255.255",  # benchmarking
    "198.51.100.0", "198.51.100.7", "198.51.100.255",  # TEST-NET-2
    "203.0.113.0", "203.0.113.9", "203.0.113.255",  # TEST-NET-3
    "240.0.0.0", "240.0.0.1", "250.1.2.3", "255.255.255.254",  # reserved
    "255.255.255.255",  # limited broadcast
    "224.0.0.1", "239.255.255.250",  # multicast
    # IPv6 Special-Purpose Address Registry
    "::", "::1",  # unspecified, loopback
    "64:ff9b:1::", "64:ff9b:1:ffff:ffff:ffff:ffff:ffff",  # local-use translation
    "100::", "100::1", "100::ffff:ffff:ffff:ffff",  # discard-only
    "100:0:0:1::1",  # dummy prefix
    "2001::", "2001::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    "2001:1::4", "2001:2::1", "2001:2:0:ffff::1",  # protocol assignments, benchmarking
    "2001:10::1", "2001:1f::1",  # ORCHID
    "2001:20::1", "2001:2f:ffff::1",  # ORCHIDv2
    "2001:30::1",  # DETs
    "2001:100::1", "2001:1ff:ffff::1",  # rest of 2001::/23
    "2001:db8::", "2001:db8::1", "2001:db8:ffff::1",  # documentation
    "3fff::", "3fff:fff:ffff::1",  # documentation (RFC 9637)
    "5f00::1",  # SRv6 SIDs
    "fc00::1", "fd00::1", "fdff:ffff::1",  # unique local
    "fe80::1", "fe80::1%eth0", "febf::1",  # link local
    "fec0::1", "feff::1",  # formerly site-local
    "ff02::1", "ff0e::1",  # multicast
    # IPv6 Address Space Registry: outside 2000::/3
    "::2", "1::1", "200::1", "400::1", "800::1", "1000::1", "1fff:ffff::1", "4000::1", "6000::1", "8000::1",
    "a000::1", "c000::1", "e000::1", "f000::1", "f800::1", "fe00::1",
]

# Public, or in a special-purpose range the registries call globally
# reachable: strings only, never contacted.
ALLOWED_ADDRESSES = [
    "8.8.8.8", "1.1.1.1", "9.9.9.9", "93.184.216.34",
    "2606:4700::1111", "2001:4860:4860::8888", "2a00:1450:4001::1",
    # neighbours of refused ranges
    "1.0.0.0", "9.255.255.255", "11.0.0.0", "100.63.255.255", "100.128.0.0", "126.255.255.255", "128.0.0.0",
    "169.253.255.255", "169.255.0.0", "172.15.255.255", "172.32.0.0", "191.255.255.255", "192.0.1.255",
    "192.0.3.0", "192.167.255.255", "192.169.0.0", "198.17.255.255", "198.20.0.0", "198.51.99.255",
    "198.51.101.0", "203.0.112.255", "203.0.114.0", "223.255.255.255",
    "2000::1", "2001:200::1", "2001:db7:ffff::1", "2001:db9::1", "2003::1", "3ffe::1", "3fff:1000::1",
    # globally reachable special-purpose entries
    "192.0.0.9", "192.0.0.10", "192.31.196.1", "192.52.193.1", "192.175.48.1",
    "2001:1::1", "2001:1::2", "2001:1::3", "2001:3::1", "2001:4:112::1", "2620:4f:8000::1",
    # carrying a public IPv4 address
    "::ffff:8.8.8.8", "64:ff9b::8.8.8.8", "2002:808:808::1",
]


class DefaultForbiddenTests(unittest.SynchronousTestCase):
    """The default list: the special-purpose table and this host's addresses."""

    def setUp(self) -> None:
        self.forbidden = default_forbidden()

    def test_special_purpose_refused(self):
        """Every special-purpose range that is not globally reachable, and the reserved IPv6 space, is refused."""
        for ip in SPECIAL_ADDRESSES:
            self.assertTrue(self.forbidden.forbids(ip), ip)

    def test_allowed(self):
        """Public addresses pass, including neighbours of the closed ranges and the globally reachable special ones."""
        for ip in ALLOWED_ADDRESSES:
            self.assertFalse(self.forbidden.forbids(ip), ip)

    def test_table_matches_itself(self):
        """The first and last address of every table entry is refused unless a globally reachable entry holds it."""
        reachable = [ipaddress.ip_network(n) for n, _, _ in JUDGED_BY_CONTENT]
        for text, name, reference in SPECIAL_PURPOSE:
            self.assertTrue(reference.startswith("RFC"), text)
            network = ipaddress.ip_network(text)
            for address in (network.network_address, network.broadcast_address):
                if any(address in r for r in reachable):
                    continue
                self.assertTrue(self.forbidden.forbids(str(address)), f"{address} ({name})")

    def test_own_addresses_refused(self):
        """This host's addresses are refused, in their own spelling and in IPv6 forms that carry them."""
        for ip in (OWN_V4, OWN_V6, f"::ffff:{OWN_V4}", f"64:ff9b::{OWN_V4}", "2002:0b16:212c::1"):
            self.assertTrue(self.forbidden.forbids(ip), ip)
        self.assertFalse(self.forbidden.forbids("11.22.33.45"))

    def test_not_an_ip_is_forbidden(self):
        """Anything that is not an IP literal is refused, failing closed."""
        self.assertTrue(self.forbidden.forbids("localhost"))
        self.assertTrue(self.forbidden.forbids(""))


class HostAddressChangeTests(unittest.SynchronousTestCase):
    """The `self` entry follows the host's addresses, whatever was asked before."""

    def test_change_is_seen_despite_cache(self):
        """After a refresh, an address the host gained is refused and one it lost is allowed, though both were asked (and cached) before."""
        host = fake_host(OWN_V4)
        forbidden = parse_forbidden("default", host=host)
        self.assertTrue(forbidden.forbids(OWN_V4))
        self.assertFalse(forbidden.forbids("11.22.33.55"))
        self.assertFalse(forbidden.forbids("::ffff:11.22.33.55"))
        host.current = ("11.22.33.55",)  # type: ignore[attr-defined]
        host.refresh()
        self.assertFalse(forbidden.forbids(OWN_V4))
        self.assertTrue(forbidden.forbids("11.22.33.55"))
        self.assertTrue(forbidden.forbids("::ffff:11.22.33.55"))

    def test_read_on_first_use(self):
        """Without any watcher, the addresses are read at the first check, never taken as empty."""
        host = fake_host(OWN_V4)
        self.assertFalse(host.known)
        self.assertTrue(parse_forbidden(None, host=host).forbids(OWN_V4))
        self.assertTrue(host.known)

    def test_failed_read_keeps_last(self):
        """A failing re-read keeps the addresses last read and says why."""
        host = fake_host(OWN_V4)
        host.networks  # noqa: B018 (the first read)

        def broken():
            raise OSError("netlink went away")

        host.reader = broken
        self.assertEqual(host.refresh(), (ipaddress.ip_network(OWN_V4),))
        self.assertEqual(host.problem, "netlink went away")


class ParseTests(unittest.SynchronousTestCase):
    """The forbidden_ip setting."""

    def test_custom_list(self):
        """A custom list replaces the defaults."""
        forbidden = parse_forbidden("203.0.113.0/24, 2001:db8::/32,198.51.100.7")
        self.assertTrue(forbidden.forbids("203.0.113.9"))
        self.assertTrue(forbidden.forbids("2001:db8::1"))
        self.assertTrue(forbidden.forbids("198.51.100.7"))
        self.assertFalse(forbidden.forbids("127.0.0.1"))
        self.assertIsNone(forbidden.host)

    def test_words(self):
        """'default' is 'special' plus 'self'; 'special' alone lets the host's addresses through, 'self' alone only refuses them."""
        host = fake_host(OWN_V4)
        default = parse_forbidden("default", host=host)
        special = parse_forbidden("special", host=host)
        own = parse_forbidden("self", host=host)
        self.assertEqual(default.entries, ("special", "self"))
        self.assertEqual(default, parse_forbidden(None, host=host))
        self.assertEqual(parse_forbidden(["Special", "SELF"], host=host), default)
        self.assertEqual((default.forbids(OWN_V4), special.forbids(OWN_V4), own.forbids(OWN_V4)), (True, False, True))
        self.assertEqual((default.forbids("10.0.0.1"), special.forbids("10.0.0.1"), own.forbids("10.0.0.1")),
                         (True, True, False))
        self.assertIsNone(special.host)

    def test_self_refuses_this_host_whatever_the_interfaces(self):
        """'self', alone or in a list, refuses 0.0.0.0/8, :: and loopback in every spelling, whatever the interfaces' addresses read."""
        this_host = ("0.0.0.0", "0.1.2.3", "::", "::ffff:0.0.0.0", "127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1")
        for text in ("self", "self,10.0.0.0/8", "10.0.0.0/8,SELF"):
            # The kernel's read; one with a public address only; an empty one.
            for host in (None, fake_host(OWN_V4), HostAddresses(lambda: ())):
                forbidden = parse_forbidden(text, host=host)
                for ip in this_host:
                    self.assertTrue(forbidden.forbids(ip), (text, ip))
            self.assertFalse(parse_forbidden(text, host=fake_host(OWN_V4)).forbids("192.0.2.1"))
        self.assertFalse(parse_forbidden("10.0.0.0/8").forbids("0.0.0.0"))

    def test_default_plus(self):
        """'default,8.8.8.0/24' adds to the defaults."""
        forbidden = parse_forbidden("default,8.8.8.0/24", host=fake_host(OWN_V4))
        for ip in ("8.8.8.8", "10.0.0.1", OWN_V4, "::ffff:8.8.8.8"):
            self.assertTrue(forbidden.forbids(ip), ip)
        self.assertFalse(forbidden.forbids("8.8.4.4"))

    def test_explicit_entry_beats_reachable_exception(self):
        """An explicit entry refuses an address the table leaves open (192.0.0.9, 64:ff9b::/96)."""
        forbidden = parse_forbidden("special,192.0.0.9,64:ff9b::/96")
        self.assertTrue(forbidden.forbids("192.0.0.9"))
        self.assertTrue(forbidden.forbids("64:ff9b::8.8.8.8"))
        self.assertFalse(forbidden.forbids("192.0.0.10"))

    def test_empty_allows_all(self):
        """An empty setting turns the check off."""
        self.assertFalse(parse_forbidden("").forbids("127.0.0.1"))
        self.assertFalse(parse_forbidden([]).forbids("10.0.0.1"))
        self.assertTrue(parse_forbidden("").off)

    def test_bad_entries(self):
        """A bad entry names the forbidden_ip key."""
        for value in ("10.0.0.0/33", "localhost", "defaults", "me", 42, ["1.2.3.4", 5]):
            with self.assertRaises(ConfigError) as caught:
                parse_forbidden(value)
            self.assertEqual(caught.exception.key, "forbidden_ip")

    def test_warning_without_self(self):
        """A server list without 'self' warns that the host's own services are reachable; the default does not."""
        self.assertFalse([w for w in server_config({"password": "x"}).warnings if "self" in w])
        self.assertFalse([w for w in server_config({"password": "x", "forbidden_ip": ""}).warnings if "self" in w])
        warned = server_config({"password": "x", "forbidden_ip": "127.0.0.0/8,10.0.0.0/8"}).warnings
        self.assertEqual(len([w for w in warned if "'self'" in w]), 1, warned)


# -- reading the addresses --------------------------------------------------

def rtattr(kind: int, value: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(value), kind) + value
    return data + bytes(-len(data) % 4)


def nlmsg(kind: int, body: bytes, flags: int = 2) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, flags, 1, 0) + body + bytes(-len(body) % 4)


def newaddr(family: int, prefix: int, index: int, *attributes: bytes) -> bytes:
    return nlmsg(20, struct.pack("=BBBBI", family, prefix, 0, 0, index) + b"".join(attributes))


class NetlinkParseTests(unittest.SynchronousTestCase):
    """The RTM_GETADDR dump parser, on messages laid out as linux/if_addr.h says."""

    def test_dump(self):
        """Addresses of both families come out; IFA_LOCAL wins over IFA_ADDRESS (a point-to-point peer); NLMSG_DONE ends."""
        data = (
            newaddr(socket.AF_INET, 8, 1, rtattr(1, v4_bytes("127.0.0.1")), rtattr(2, v4_bytes("127.0.0.1")))
            + newaddr(socket.AF_INET, 24, 2, rtattr(1, v4_bytes("11.22.33.44")), rtattr(2, v4_bytes("11.22.33.44")),
                      rtattr(4, v4_bytes("11.22.33.255")), rtattr(3, b"eth0\0"))
            + newaddr(socket.AF_INET, 32, 3, rtattr(1, v4_bytes("11.0.0.2")), rtattr(2, v4_bytes("11.0.0.1")))
            + newaddr(socket.AF_INET6, 64, 2, rtattr(1, socket.inet_pton(socket.AF_INET6, OWN_V6)))
            + newaddr(17, 0, 2, rtattr(1, b"\1\2\3\4\5\6"))  # AF_PACKET: skipped
            + nlmsg(3, struct.pack("=i", 0))
        )
        found, finished, interrupted = parse_address_messages(data)
        self.assertEqual((finished, interrupted), (True, False))
        self.assertEqual([(a.index, str(a.address), a.prefix_length) for a in found],
                         [(1, "127.0.0.1", 8), (2, OWN_V4, 24), (3, "11.0.0.1", 32), (2, OWN_V6, 64)])
        self.assertEqual(str(found[1].broadcast), "11.22.33.255")
        self.assertEqual(
            [str(n) for n in host_networks(found)],
            ["11.0.0.1/32", "11.22.33.44/32", "11.22.33.255/32", "127.0.0.0/8", f"{OWN_V6}/128"],
        )

    def test_whole_prefix_on_loopback_device(self):
        """An IPv4 prefix on the loopback device (ifindex 1) is local as a whole; elsewhere only the address is."""
        on_lo = InterfaceAddress(1, ipaddress.IPv4Address("11.5.0.1"), 24)
        on_eth = InterfaceAddress(2, ipaddress.IPv4Address("11.6.0.1"), 24)
        v6_on_lo = InterfaceAddress(1, ipaddress.IPv6Address(OWN_V6), 64)
        self.assertEqual([str(n) for n in host_networks([on_lo, on_eth, v6_on_lo])],
                         ["11.5.0.0/24", "11.6.0.1/32", f"{OWN_V6}/128"])

    def test_interrupted_and_partial(self):
        """A dump flagged NLM_F_DUMP_INTR is reported as interrupted; one without NLMSG_DONE as not finished."""
        part = newaddr(socket.AF_INET, 24, 2, rtattr(2, v4_bytes(OWN_V4)))
        self.assertEqual(parse_address_messages(part)[1:], (False, False))
        flagged = nlmsg(20, part[16:], flags=2 | 0x10)
        self.assertEqual(parse_address_messages(flagged)[1:], (False, True))

    def test_errors(self):
        """NLMSG_ERROR with an errno raises NetlinkError; so does a message whose length runs past the data."""
        with self.assertRaises(NetlinkError) as caught:
            parse_address_messages(nlmsg(2, struct.pack("=i", -1) + bytes(16)))
        self.assertEqual(caught.exception.errno, 1)
        with self.assertRaises(NetlinkError):
            parse_address_messages(struct.pack("=IHHII", 400, 20, 2, 1, 0) + bytes(8))

    @given(st.binary(max_size=200))
    def test_garbage(self, data):
        """Any bytes either parse or raise NetlinkError, nothing else."""
        try:
            parse_address_messages(data)
        except NetlinkError:
            pass


class LiveReadTests(unittest.SynchronousTestCase):
    """The reader against this machine's kernel."""

    def test_same_as_ip_addr(self):
        """The netlink dump lists the same addresses as `ip -j addr`."""
        if not host_addresses.netlink_available():
            raise unittest.SkipTest("no rtnetlink on this system")
        ip = shutil.which("ip")
        if ip is None:
            raise unittest.SkipTest("no `ip` command to compare with")
        listed = json.loads(subprocess.run([ip, "-j", "addr"], capture_output=True, check=True, text=True).stdout)
        expected = {(link["ifindex"], info["local"]) for link in listed for info in link.get("addr_info", [])}
        ours = {(a.index, str(a.address)) for a in host_addresses.read_interface_addresses()}
        self.assertEqual(ours, expected)
        self.assertIn(ipaddress.ip_network("127.0.0.0/8"), host_addresses.read_host_networks())


class _FakeSubscription:
    """A socketpair standing in for the netlink notification socket."""

    def __init__(self) -> None:
        self.ours, self.kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.ours.setblocking(False)

    def __call__(self) -> socket.socket:
        return self.ours

    def close(self) -> None:
        self.ours.close()
        self.kernel.close()


class WatcherTests(unittest.TestCase):
    """HostAddressWatcher re-reads the addresses when the kernel says they changed."""

    def test_notification_triggers_read(self):
        """A notification on the subscribed socket makes the watcher re-read, and the forbidden check follows."""
        host = fake_host(OWN_V4)
        forbidden = parse_forbidden(None, host=host)
        subscription = _FakeSubscription()
        self.addCleanup(subscription.close)
        watcher = HostAddressWatcher(reactor, host, subscribe=subscription)
        watcher.startService()
        self.addCleanup(watcher.stopService)
        self.assertEqual(watcher.refreshes, 1)
        self.assertTrue(forbidden.forbids(OWN_V4))
        changed: defer.Deferred = defer.Deferred()
        host.listeners.append(lambda networks: changed.called or changed.callback(networks))
        host.current = ("11.22.33.55",)  # type: ignore[attr-defined]
        subscription.kernel.send(newaddr(socket.AF_INET, 32, 2, rtattr(2, v4_bytes("11.22.33.55"))))

        def check(networks):
            self.assertEqual(networks, (ipaddress.ip_network("11.22.33.55/32"),))
            self.assertTrue(forbidden.forbids("11.22.33.55"))
            self.assertFalse(forbidden.forbids(OWN_V4))

        return changed.addCallback(check)

    def test_polls_without_netlink(self):
        """When it cannot subscribe, the watcher re-reads every poll_interval seconds on the reactor's clock."""
        clock = Clock()
        host = fake_host(OWN_V4)

        def no_netlink():
            raise OSError("no rtnetlink on this system")

        watcher = HostAddressWatcher(clock, host, subscribe=no_netlink)
        watcher.startService()
        self.assertEqual(watcher.refreshes, 1)
        host.current = ("11.22.33.55",)  # type: ignore[attr-defined]
        clock.advance(watcher.poll_interval)
        self.assertEqual(watcher.refreshes, 2)
        self.assertEqual(host.networks, (ipaddress.ip_network("11.22.33.55/32"),))
        watcher.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_real_subscription_opens(self):
        """On Linux the real notification socket opens and is watched by the reactor until the service stops."""
        if not host_addresses.netlink_available():
            raise unittest.SkipTest("no rtnetlink on this system")
        watcher = HostAddressWatcher(reactor, HostAddresses())
        watcher.startService()
        self.assertIn(watcher, reactor.getReaders())
        watcher.stopService()
        self.assertNotIn(watcher, reactor.getReaders())
        self.assertTrue(watcher.addresses.known)
