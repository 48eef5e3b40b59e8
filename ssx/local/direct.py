"""
Targets the ACL sends direct: ssx-local connects to them itself.

`DirectUpstream` is an `IUpstream` for one target, so the relay
(`ssx.local.relay`) connects "through" it as through a server: its codec
passes bytes through unchanged and sends no address header.  The picker
does not know it, so its successes and failures change no server's health.
With --outbound-fwmark its connections carry the mark as the servers' do
(`ssx.net.transparent.MarkingReactor`), so a transparent proxy's firewall
does not divert them back to ssx-local.
UDP to such targets is `ssx.local.udp`'s (`_DirectSocket`).
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ssx.interfaces import ITcpClientCodec, IUpstream
from ssx.net.relay import connect_protocol, connect_tcp
from ssx.net.transparent import MarkingReactor
from ssx.wire.address import Address, is_ip_literal

__all__ = ["DIRECT", "DirectUpstream", "PassThroughCodec", "PassThroughSuite"]

# How the log names the way to a direct target.
DIRECT = "direct"


@implementer(ITcpClientCodec)
class PassThroughCodec:
    """The codec of a direct connection: the application's bytes as they are, no header."""

    __slots__ = ()

    def first(self, address: Address, payload: bytes) -> bytes:
        return payload

    def encrypt(self, data: bytes) -> bytes:
        return data

    def decrypt(self, data: bytes) -> bytes:
        return data


class PassThroughSuite:
    """What a `DirectUpstream` offers in place of a cipher suite: only `client_codec`."""

    _codec = PassThroughCodec()

    def client_codec(self) -> ITcpClientCodec:
        return self._codec


_SUITE = PassThroughSuite()


@implementer(IUpstream)
class DirectUpstream:
    """
    One target reached without a server: `connect` opens a TCP connection
    to it (to each of `addresses` in turn, until one answers, when they were
    resolved already, else to the name through Twisted's `HostnameEndpoint`); with `mark`
    (--outbound-fwmark) it carries that firewall mark, as the connections
    to the servers do, so a transparent proxy's rules do not divert it
    back to ssx-local.
    """

    entry = None
    suite = _SUITE
    label = DIRECT

    def __init__(
        self, reactor: Any, target: Address, timeout: float, addresses: Sequence[str] = (), mark: int | None = None,
    ) -> None:
        self._reactor = reactor if mark is None else MarkingReactor(reactor, mark)
        self.target = target
        self.timeout = timeout
        self.addresses = tuple(addresses)

    def __repr__(self) -> str:
        return f"<DirectUpstream {self.target.host}:{self.target.port}>"

    def connect(self, protocol: Protocol) -> Deferred:
        host, port = self.target.host, self.target.port
        if is_ip_literal(host):
            return connect_tcp(self._reactor, host, port, protocol, self.timeout)
        if self.addresses:
            return self._connect_each(self.addresses, protocol)
        endpoint = HostnameEndpoint(self._reactor, host, port, timeout=self.timeout)
        return connect_protocol(endpoint, protocol)

    def _connect_each(self, addresses: Sequence[str], protocol: Protocol) -> Deferred:
        """Connect to the first of `addresses`; if it fails, to the next (a cancel stops the attempt in progress)."""
        d = connect_tcp(self._reactor, addresses[0], self.target.port, protocol, self.timeout)
        if len(addresses) > 1:

            def next_one(failure: Failure) -> Deferred | Failure:
                if failure.check(CancelledError):
                    return failure
                return self._connect_each(addresses[1:], protocol)

            d.addErrback(next_one)
        return d
