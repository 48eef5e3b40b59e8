"""
The local end's per-connection and per-datagram shortcuts give the
answers of the long ways they replace: the relayable-target check, the
offered SOCKS5 commands, the one-server candidate list, the UDP relay's
owner check.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from ssx.config.upstreams import ServerEntry
from ssx.crypto import CipherSuite
from ssx.errors import AddressError
from ssx.local.picker import ServerPicker
from ssx.local.relay import check_relayable
from ssx.local.socks import ProxyPortFactory
from ssx.local.udp import Socks5UdpRelay
from ssx.local.upstream import Upstream
from ssx.wire import socks5
from ssx.wire.address import Address, decode_target, encode_address

_HOSTS = st.one_of(
    st.sampled_from([
        "example.com", "a..b", "bad host", "", "x" * 256, "127.0.0.1", "::1", "fe80::1%eth0", "[::1]",
        "\uff11\uff12\uff17.0.0.1", "b\u00fccher.example", "a\x00b", "under_score.example", "-", "xn--bcher-kva.example",
        "1.2.3.4.5", "localhost.", "a." * 130,
    ]),
    st.text(max_size=40),
    st.from_regex(r"[a-z0-9.\-]{1,20}", fullmatch=True),
)
_PORTS = st.one_of(st.integers(min_value=-2, max_value=70000), st.sampled_from([0, 1, 65535, 65536, True, False]))


def _long_way(target: Address) -> str | None:
    """The error `decode_target(encode_address(target))` raises, or None."""
    try:
        decode_target(encode_address(target))
    except AddressError as e:
        return f"{type(e).__name__}: {e}"
    return None


def _short_way(target: Address) -> str | None:
    try:
        check_relayable(target)
    except AddressError as e:
        return f"{type(e).__name__}: {e}"
    return None


class CheckRelayableTests(unittest.SynchronousTestCase):
    """`check_relayable` and the encode-then-decode it replaces agree."""

    @settings(max_examples=200, deadline=None)
    @given(_HOSTS, _PORTS)
    def test_same_verdict_and_error(self, host: str, port: Any) -> None:
        """For any host and port, the same error (or none), asked once or again (cached)."""
        target = Address(host, port)
        expected = _long_way(target)
        self.assertEqual(_short_way(target), expected)
        self.assertEqual(_short_way(target), expected)

    def test_known_host_other_port(self) -> None:
        """A host that passed is still refused with port 0 or out of range, with the usual message."""
        check_relayable(Address("example.com", 443))
        for port in (0, 65536, -1):
            self.assertEqual(_short_way(Address("example.com", port)), _long_way(Address("example.com", port)))
            self.assertIsNotNone(_short_way(Address("example.com", port)))


class _FakeUdpRelay:
    def __init__(self, transport: object) -> None:
        self.transport = transport


class CommandsTests(unittest.SynchronousTestCase):
    """`ProxyPortFactory.commands` offers what it did when it built the set each time."""

    def test_every_combination(self) -> None:
        """CONNECT with TCP relayed, UDP ASSOCIATE with a listening UDP relay, in every combination."""
        for tcp in (False, True):
            for relay in (None, _FakeUdpRelay(None), _FakeUdpRelay(object())):
                factory = ProxyPortFactory(MemoryReactorClock(), ServerPicker(), udp_relay=relay, tcp=tcp)  # type: ignore[arg-type]
                expected = set()
                if tcp:
                    expected.add(socks5.CMD_CONNECT)
                if relay is not None and relay.transport is not None:
                    expected.add(socks5.CMD_UDP_ASSOCIATE)
                self.assertEqual(factory.commands, frozenset(expected), (tcp, relay))
                self.assertIsInstance(factory.commands, frozenset)


class OneServerCandidatesTests(unittest.SynchronousTestCase):
    """With one server, the picker's candidates are that server, in a list the caller owns."""

    def setUp(self) -> None:
        entry = ServerEntry("192.0.2.1", 8388, "chacha20-ietf-poly1305", "pw")
        self.upstream = Upstream(entry, CipherSuite("chacha20-ietf-poly1305", "pw"), lambda protocol: None)  # type: ignore[arg-type,return-value]
        self.picker = ServerPicker([self.upstream])

    def test_fresh_list(self) -> None:
        """Emptying the returned list (as the relay does) leaves the next one whole."""
        first = self.picker.candidates()
        self.assertEqual(first, [self.upstream])
        first.pop(0)
        self.assertEqual(self.picker.candidates(), [self.upstream])

    def test_offered_when_down(self) -> None:
        """A server marked down is still offered when it is the only one."""
        self.picker.failed(self.upstream, "refused")
        self.assertEqual(self.picker.candidates(), [self.upstream])


class AcceptsTests(unittest.SynchronousTestCase):
    """`Socks5UdpRelay.accepts` takes an owner's datagrams in every spelling of its address, and only those."""

    def test_owner_spellings(self) -> None:
        """Plain, IPv4-mapped and IPv6 socket tuples of an owned address are accepted; another port is not."""
        relay = Socks5UdpRelay(MemoryReactorClock(), CipherSuite("chacha20-ietf-poly1305", "pw"), ("192.0.2.1", 8388))
        relay.associate("127.0.0.1", 4000)
        relay.associate("::1", 4000)
        for client in (("127.0.0.1", 4000), ("::ffff:127.0.0.1", 4000), ("::ffff:127.0.0.1", 4000, 0, 0), ("::1", 4000, 0, 0)):
            self.assertTrue(relay.accepts(client), client)
        self.assertEqual(relay.unassociated, 0)
        for client in (("127.0.0.1", 4001), ("::ffff:127.0.0.2", 4000, 0, 0), ("::2", 4000, 0, 0)):
            self.assertFalse(relay.accepts(client), client)
        self.assertEqual(relay.unassociated, 3)
