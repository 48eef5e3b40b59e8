"""
The seams of ssx that have several implementations or a fake in the tests,
declared in one place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.protocol import Protocol

    from ssx.config.upstreams import ServerEntry
    from ssx.crypto import SaltFilter
    from ssx.wire.address import Address

__all__ = [
    "ICipherSuite",
    "IServerPicker",
    "ITcpClientCodec",
    "ITcpServerCodec",
    "ITrafficCounter",
    "IUdpClientCodec",
    "IUserTrafficSink",
    "IUpstream",
]


class ICipherSuite(Interface):
    """
    One configured method and its keys, derived once: `CipherSuite` (stream,
    AEAD-2017, none) or `Suite2022` (SIP022).  Everything that speaks
    Shadowsocks for a connection or an application asks the suite for a
    fresh codec and uses only the codec's methods, so it works the same
    for every edition.  (The server's UDP relays differ by edition and pick
    their class by `spec.family`.)
    """

    spec = Attribute("The method's `MethodSpec`: name, family, key and salt sizes.")

    def client_codec() -> ITcpClientCodec:
        """The local end's codec for one new TCP connection to the server."""

    def server_codec(salt_filter: SaltFilter | None = None) -> ITcpServerCodec:
        """
        The server's codec for one new TCP connection from a client;
        `salt_filter` refuses replayed salts (the 2022 edition keeps its own).
        """

    def udp_client_codec() -> IUdpClientCodec:
        """The local end's codec for one application's datagrams."""


class ITcpClientCodec(Interface):
    """The local end's side of one TCP connection to a server."""

    def first(address: Address, payload: bytes) -> bytes:
        """The stream's opening bytes: the target's header and the first payload (possibly empty)."""

    def encrypt(data: bytes) -> bytes:
        """The bytes to send for `data` written after `first`."""

    def decrypt(data: bytes) -> bytes:
        """The target's bytes completed by `data` from the server (possibly b""); ProtocolError if bad."""


class ITcpServerCodec(Interface):
    """The server's side of one TCP connection from a client."""

    address = Attribute("The target (`Address`) once the request header is complete and valid, else None.")
    user = Attribute("The user's name (multi-user 2022 ports) once known, else None.")

    def decrypt(data: bytes) -> bytes:
        """
        The application's bytes after the header completed by `data` (b""
        until `address` is known); ProtocolError (AddressError for a target
        no client sends) if the stream is bad.
        """

    def encrypt(data: bytes) -> bytes:
        """The bytes to send the client for the target's `data`."""

    def data_path() -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
        """Once `address` is known: the bare (decrypt, encrypt) for relaying."""


class IUdpClientCodec(Interface):
    """The local end's side of one application's UDP traffic with a server."""

    def seal(plaintext: bytes) -> bytes:
        """A datagram for the server from ``ATYP ADDR PORT DATA``."""

    def open(packet: bytes) -> bytes:
        """``ATYP ADDR PORT DATA`` from a server's datagram; ProtocolError if bad."""


class IUpstream(Interface):
    """
    One server as the local end reaches it (`ssx.local.upstream.Upstream`):
    what the picker ranks, and what the local protocols and the health check
    connect through.
    """

    entry = Attribute("The server's `ServerEntry` as configured (host, port, method, password).")
    suite = Attribute("The server's `ICipherSuite`, its keys derived once.")
    label = Attribute("How the log names the server.")

    def connect(protocol: Protocol) -> Deferred:
        """
        Connect `protocol` to the server (straight, through a client
        endpoint, or through the SIP003 plugin); fires once connected, fails
        if the server cannot be reached; cancelling stops the attempt.
        """


class IServerPicker(Interface):
    """
    Chooses which server each new local-end connection goes to, and learns
    from what happened: connections that could not reach a server, and the
    health check's measurements.
    """

    def candidates() -> list[IUpstream]:
        """The `Upstream`s to try for one new connection, best first."""

    def upstreams() -> list[IUpstream]:
        """Every server currently known, in configuration order."""

    def health(upstream: IUpstream) -> tuple[bool, float | None, int]:
        """
        (up, average latency in seconds or None, consecutive failures) of a
        known server; KeyError for one no longer known.
        """

    def succeeded(upstream: IUpstream) -> None:
        """A connection reached `upstream`."""

    def failed(upstream: IUpstream, reason: str) -> None:
        """A connection could not reach `upstream`."""

    def checked(upstream: IUpstream, latency: float | None) -> None:
        """The health check went through `upstream` in `latency` seconds, or failed (None)."""

    def replace_dynamic(entries: Sequence[ServerEntry], build: Callable[[ServerEntry], IUpstream]) -> None:
        """
        Make the servers from an online config exactly `entries`, building an
        `Upstream` with `build(entry)` only for those not already known.
        """


class IUserTrafficSink(Interface):
    """
    The server's per-user accounting: where each connection of a user of
    a multi-user (2022) port reports the application bytes it relays.
    `ssx.server.accounting.UserTrafficTable` keeps running totals; the
    manager API and the metrics plug in here as further sinks.
    """

    def counter(user: str) -> ITrafficCounter:
        """`user`'s counter: asked once per connection, when its relay starts."""


class ITrafficCounter(Interface):
    """What one user's connections add the bytes they relay to."""

    def add_up(count: int) -> None:
        """`count` more application bytes went from the client to its target."""

    def add_down(count: int) -> None:
        """`count` more application bytes went from the target back to the client."""
