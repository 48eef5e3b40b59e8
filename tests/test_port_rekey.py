"""
`ServerPort.rekey` and `configure`, what a reload does to a running port
in place, on a port built in memory (`MemoryReactorClock`): new
credentials reach the factory and the UDP relays, and the running
connections whose key is gone are the ones handed back to be ended.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from ssx.config import server_config
from ssx.crypto import Suite2022
import ssx.server.tap as server_tap
from ssx.wire.address import Address

_USER_METHOD = "2022-blake3-aes-128-gcm"
_PSK = "AAECAwQFBgcICQoLDA0ODw=="
_ALICE = "EBESExQVFhcYGRobHB0eHw=="
_BOB = "ICEiIyQlJicoKSorLC0uLw=="


class _Connection:
    """A stand-in for a running server connection: only the user it authenticated as."""

    def __init__(self, user: str | None) -> None:
        self.user = user


def _port(reactor: Any = None, **values: Any) -> Any:
    config = server_config({
        "server": "127.0.0.1", "server_port": 8001, "mode": "tcp_and_udp", "forbidden_ip": "", "url_file": "",
        **values,
    })
    return server_tap.build_service(reactor or MemoryReactorClock(), config).ports[8001]


def _handshake(port: Any, request: bytes) -> None:
    """One client connection to `port`'s factory that sends `request` in one read."""
    protocol = port.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    protocol.makeConnection(StringTransport())
    protocol.dataReceived(request)


class RekeyTests(SynchronousTestCase):
    def test_removed_user_connections_only(self) -> None:
        """Removing a 2022 user hands back that user's connections and those not yet past their header, no others."""
        port = _port(method=_USER_METHOD, password=_PSK, users={"alice": _ALICE, "bob": _BOB})
        alice, bob, unfinished = _Connection("alice"), _Connection("bob"), _Connection(None)
        port.factory.connections.update({alice, bob, unfinished})
        before = port.factory.credentials
        stale = port.rekey(dataclasses.replace(port.config, users=(("alice", _ALICE),)))
        self.assertEqual(set(stale), {bob, unfinished})
        self.assertIsNot(port.factory.credentials, before)
        self.assertTrue(port.udp_relays)
        for relay in port.udp_relays:
            self.assertIs(relay.credentials, port.factory.credentials)

    def test_new_password_hands_back_every_connection(self) -> None:
        """A new port password hands back every running connection: none of them holds the new key."""
        port = _port(method="aes-128-gcm", password="old")
        running = {_Connection(None), _Connection(None)}
        port.factory.connections.update(running)
        self.assertEqual(set(port.rekey(dataclasses.replace(port.config, password="new"))), running)
        self.assertEqual(port.config.password, "new")

    def test_same_credentials_hand_back_nothing(self) -> None:
        """Credentials rebuilt unchanged (a timeout change) hand back no connection."""
        port = _port(method="aes-128-gcm", password="same")
        port.factory.connections.add(_Connection(None))
        self.assertEqual(port.rekey(dataclasses.replace(port.config, timeout=10.0)), [])

    def test_2022_replay_refused_after_rekey(self) -> None:
        """A 2022 request accepted before a reload is refused when replayed after it: the port's salts outlive its keys."""
        reactor = MemoryReactorClock()
        reactor.advance(1_000_000)
        port = _port(reactor, method=_USER_METHOD, password=_PSK)
        client = Suite2022(_USER_METHOD, _PSK, now=reactor.seconds)
        request = client.client_codec().first(Address("192.0.2.1", 80), b"hello")
        _handshake(port, request)
        self.assertEqual(port.factory.handshake_failures, 0)
        _handshake(port, request)
        self.assertEqual(port.factory.handshake_failures, 1)
        port.rekey(dataclasses.replace(port.config, timeout=10.0))
        _handshake(port, request)
        self.assertEqual(port.factory.handshake_failures, 2)

    def test_configure_applies_timeout_and_limits(self) -> None:
        """`configure` gives the factory the port's new timeout and the shared limits and bounds."""
        port = _port(method="aes-128-gcm", password="same")
        service_shared = server_tap.build_service(MemoryReactorClock(), server_config({
            "server": "127.0.0.1", "server_port": 8001, "password": "same", "method": "aes-128-gcm",
            "forbidden_ip": "10.0.0.0/8", "url_file": "", "max_connections": 40, "handshake_timeout": 5,
            "max_handshakes": 7, "verbose": True,
        })).reload.shared
        port.configure(dataclasses.replace(port.config, timeout=60.0), service_shared)
        factory = port.factory
        self.assertEqual((factory.timeout, factory.handshake_timeout, factory.max_connections), (60.0, 5.0, 40))
        self.assertEqual(factory.handshakes.limit, 7)
        self.assertTrue(factory.verbose)
        self.assertTrue(factory.forbidden.forbids("10.1.2.3"))
        self.assertTrue(all(relay.forbidden is factory.forbidden for relay in port.udp_relays))


class _ListeningPort:
    """A stand-in for a listening port: whether it reads (accepts)."""

    reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


class ConnectionLimitTests(SynchronousTestCase):
    def test_lower_limit_pauses_and_higher_resumes(self) -> None:
        """A limit lowered to the running connections stops accepting at once; raised or lifted, accepting resumes."""
        port = _port(method="aes-128-gcm", password="same")
        factory = port.factory
        listening = _ListeningPort()
        factory.ports.append(listening)
        factory.connections.update({_Connection(None), _Connection(None)})
        factory.set_limits(factory.timeout, 5.0, 2)
        self.assertFalse(listening.reading)
        factory.set_limits(factory.timeout, 5.0, 3)
        self.assertTrue(listening.reading)
        factory.set_limits(factory.timeout, 5.0, 2)
        factory.set_limits(factory.timeout, 5.0, 0)
        self.assertTrue(listening.reading)
