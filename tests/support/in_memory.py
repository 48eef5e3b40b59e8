"""
In-memory stand-ins for protocol unit tests: a StringTransport that records
a half-close, and a fake server endpoint whose connection attempts a test
makes succeed or fail, with the decrypted view of what was sent through it.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from ssx.wire.address import Address, decode_address
from ssx.crypto import CipherSuite

__all__ = ["HalfCloseTransport", "Link", "FakeServer"]


class HalfCloseTransport(StringTransport):
    """A StringTransport that records a write half-close."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class Link:
    """A server connection that succeeded: what the local end sent (decrypted), and a way to answer."""

    def __init__(self, protocol, transport: HalfCloseTransport, suite: CipherSuite) -> None:
        self.protocol = protocol
        self.transport = transport
        self.suite = suite
        self._encrypt = suite.tcp_encryptor().encrypt

    def sent(self) -> bytes:
        return self.suite.tcp_decryptor().decrypt(self.transport.value())

    def target_and_data(self) -> tuple[Address, bytes]:
        plain = self.sent()
        address, end = decode_address(plain)
        return address, plain[end:]

    def answer(self, data: bytes) -> None:
        self.protocol.dataReceived(self._encrypt(data))

    def close(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


class FakeServer:
    """Stands in for one server's endpoint: records each connection attempt."""

    def __init__(self, suite: CipherSuite) -> None:
        self.suite = suite
        self.attempts: list[tuple[object, defer.Deferred]] = []

    def __call__(self, protocol: object) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.attempts.append((protocol, d))
        return d

    def succeed(self) -> Link:
        protocol, d = self.attempts[-1]
        transport = HalfCloseTransport()
        protocol.makeConnection(transport)  # type: ignore[attr-defined]
        d.callback(protocol)
        return Link(protocol, transport, self.suite)

    def fail(self, error: Exception) -> None:
        self.attempts[-1][1].errback(Failure(error))
