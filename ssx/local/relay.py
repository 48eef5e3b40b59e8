"""
The local end's relay of one application connection through a server: what
SOCKS5, SOCKS4, HTTP (`ssx.local.socks`, `ssx.local.http`) and tunnels
(`ssx.local.tunnel`) do once they know the target.

Data path: after the application's proxy handshake (or none, for a tunnel),
`LocalRelayProtocol.open_relay` asks the picker (`ssx.local.picker`) for
servers and connects to the best one, trying the next if it cannot be
reached; then the handshake's success reply, the target address header and
the application's first bytes in one encrypted write (`ssx.crypto`), then
relay (`ssx.net.relay`), encrypting upwards and decrypting downwards.

Counted on the factory: connections that moved on to the next server
(`failovers`, by the server left); with metrics on (`ssx.local.metrics`),
each server's payload bytes through `server_traffic` (one wrapper per
read) and, on the mixed port, connections by the protocol spoken
(`fronts`).
With an ACL, `open_relay` first asks the router (`ssx.local.routing`):
a direct target's one "server" is a `ssx.local.direct.DirectUpstream`,
whose codec passes bytes through.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from ssx.wire.address import Address, decode_target, encode_address
from ssx.errors import AddressError, ProtocolError
from ssx.interfaces import IServerPicker, ITcpClientCodec, ITrafficCounter, IUpstream
from ssx.net.relay import InboundProtocol, OutboundProtocol, RelayFactory, RelayProtocol
from ssx.local.direct import DirectUpstream
from ssx.local.routing import AclRouter, Route
from ssx.local.upstream import CONNECT_TIMEOUT

__all__ = [
    "ASSOCIATED",
    "CLOSED",
    "CONNECTING",
    "FIRST_DATA_WAIT",
    "MAX_ATTEMPTS",
    "RELAYING",
    "WAITING",
    "LocalFactory",
    "LocalRelayProtocol",
    "NoServerAvailable",
    "check_relayable",
]

_log = Logger()

# Where an application connection is (`LocalRelayProtocol._state`): waiting
# for its request (a handshake, or the HTTP proxy's next request), connecting
# to a server, relaying, holding a SOCKS5 UDP association (the connection
# then only keeps it alive), or closed.  Plain ints: compared on every read.
WAITING, CONNECTING, RELAYING, ASSOCIATED, CLOSED = range(5)

# How long to wait for the application's first bytes before sending the
# address header alone: short enough for server-speaks-first protocols, long
# enough that clients which speak first (nearly all) get one combined write.
FIRST_DATA_WAIT = 0.2

# Servers tried for one connection before the application is told it failed
# (each may take the connect timeout when it does not answer at all).
MAX_ATTEMPTS = 3


def check_relayable(target: Address) -> None:
    """
    Raise `AddressError` unless `target` can be sent (`encode_address`) and
    names something a server acts on (`decode_target`), with the error those
    raise.  A host that passed once is not encoded and decoded again for
    each connection to it: only its port is looked at.
    """
    port = target.port
    if type(port) is int and 0 < port <= 0xFFFF:
        _check_relayable_host(target.host)
    else:
        decode_target(encode_address(target))


@lru_cache(maxsize=4096)
def _check_relayable_host(host: str) -> None:
    # The port plays no part in the checks of the host, so any valid one
    # stands in; a host that raises is not cached.
    decode_target(encode_address(Address(host, 1)))


class NoServerAvailable(ConnectError):
    """No server is configured (yet: an online config may still be on its way)."""


class LocalFactory(RelayFactory):
    """What every application connection shares: the servers (and their keys), clock, timeout."""

    def __init__(
        self, reactor: Any, servers: IServerPicker, timeout: float = 300.0, router: AclRouter | None = None,
        **limits: Any,
    ) -> None:
        RelayFactory.__init__(self, reactor, timeout, **limits)
        self.servers = servers
        self.relays_broken = 0
        # Connections that could not reach a server and tried the next, by the server's label.
        self.failovers: dict[str, int] = {}
        # Metrics (None: off): each server's payload counter, and
        # connections by the protocol the application spoke.
        self.server_traffic: Callable[[IUpstream], ITrafficCounter] | None = None
        self.fronts: dict[str, int] | None = None
        # With an ACL: which targets go direct, and how many went each way.
        self.router = router
        self.acl_proxied = 0
        self.acl_direct = 0
        # --outbound-fwmark: the mark of the direct connections (None: unmarked).
        self.mark: int | None = None

    def relay_broken(self, error: ProtocolError) -> None:
        """
        A server's stream failed to decrypt: the first time a warning (a
        wrong password or method, most likely), then a line only with
        --verbose, since whatever sits on the path can cause it at will.
        """
        self.relays_broken += 1
        if self.relays_broken == 1:
            _log.warn("a stream from the server failed to decrypt (wrong password or method?): {error}; "
                      "further ones are counted, and logged with --verbose", error=error)
        elif self.verbose:
            _log.debug("relay closed: {error}", error=error)


class LocalRelayProtocol(InboundProtocol):
    """
    An application connection relayed through the server to one target:
    `open_relay(target)` connects to the best server, or to the next when
    one cannot be reached (nothing was sent yet, so the application never
    knows); subclasses say what the application hears when that succeeds
    (`relay_ready`) or fails (`relay_failed`).
    """

    factory: LocalFactory

    def __init__(self, factory: LocalFactory) -> None:
        InboundProtocol.__init__(self, factory)
        self._state = WAITING
        self._early = b""
        self._target: Address | None = None
        self._connecting: Deferred | None = None
        self._header_call: Any = None
        self._codec: ITcpClientCodec | None = None
        self._opened = False  # the stream's first write (target + first data) went out
        self._upstream: IUpstream | None = None
        self._candidates: list[IUpstream] = []
        # The counted encrypt and first write, with metrics on.
        self._encrypt: Callable[[bytes], bytes] | None = None
        self._first: Callable[[Address, bytes], bytes] | None = None
        self._held = False  # reads held until the server connection is up

    def dataReceived(self, data: bytes) -> None:
        if self._state == RELAYING:
            self.relayReceived(data)
        elif self._state == CONNECTING:
            self.keep_early(data)

    def keep_early(self, data: bytes) -> None:
        """
        Keep the application's `data` until the server connection is up, and
        hold further reads until then (which bounds what is kept to one
        read).  Reads are held only once such data comes, not from the
        request on: most applications wait for the reply first, and holding
        costs two epoll_ctl calls a connection.
        """
        self._early += data
        if not self._held:
            self._held = True
            self.transport.pauseProducing()

    def open_relay(self, target: Address, early: bytes = b"") -> None:
        """Connect through a server to `target`; `early` is the application's first data."""
        self._state = CONNECTING
        self._target = target
        self._early = early
        # Destinations are named in the log only with --verbose.
        try:
            # Refuse here, at once, what cannot be sent or what no server
            # acts on (a name that is not a host name, port 0): the server
            # would only keep silent until its handshake timeout.
            check_relayable(target)
        except AddressError as e:
            if self.factory.verbose:
                _log.debug("cannot relay to {target!r}: {error}", target=target.host, error=e)
            self._state = CLOSED
            self.relay_failed(Failure(e))
            return
        router = self.factory.router
        if router is None:
            self._through_servers()
            return
        route = router.route(target)
        if isinstance(route, Deferred):
            # A name being resolved for the ACL: hold the application's bytes.
            self.transport.pauseProducing()
            self._connecting = route
            route.addCallback(self._routed).addErrback(self._route_failed)
            return
        self._routed(route)

    def _routed(self, route: Route) -> None:
        self._connecting = None
        if self._closed or self._state != CONNECTING:
            return
        factory = self.factory
        if route.proxied:
            factory.acl_proxied += 1
            self._through_servers()
            return
        factory.acl_direct += 1
        assert self._target is not None
        self._candidates = [
            DirectUpstream(factory.reactor, self._target, CONNECT_TIMEOUT, route.addresses, factory.mark)
        ]
        self.transport.pauseProducing()
        self._try_next_server()

    def _route_failed(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            _log.failure("ACL decision failed", failure)
            self.transport.loseConnection()

    def _through_servers(self) -> None:
        self._candidates = self.factory.servers.candidates()[:MAX_ATTEMPTS]
        if not self._candidates:
            _log.warn("no server to relay a connection through")
            self._state = CLOSED
            self.relay_failed(Failure(NoServerAvailable("no server configured")))
            return
        self._try_next_server()

    def make_outbound(self) -> OutboundProtocol:
        """The protocol for the server connection (the HTTP proxy uses its own)."""
        return OutboundProtocol(self._server_connected)

    def _try_next_server(self) -> None:
        self._upstream = upstream = self._candidates.pop(0)
        d = upstream.connect(self.make_outbound())
        d.addErrback(self._server_failed)
        self._connecting = d

    def detach_relay(self) -> None:
        """
        End the server connection (or the attempt) but not the application's,
        so that `open_relay` may be called again: the HTTP proxy does this
        when a keep-alive client's next request goes to another host.
        """
        self._cancel_header_call()
        if self._connecting is not None:
            d, self._connecting = self._connecting, None
            d.cancel()
        peer = self.peer
        if peer is not None:
            self.release_producer()
            peer.release_producer()
            peer.peer = None
            self.peer = None
            if not peer._closed:
                peer.transport.loseConnection()
        self._state = WAITING
        self._codec = None
        self._encrypt = self._first = None
        self._opened = False
        self.transform = None
        self._early = b""
        self._held = False
        self._upstream = None
        self._candidates = []
        # Unregistering a producer does not resume it: reads may be paused
        # by the old server connection's full buffer.
        self.transport.resumeProducing()

    def relay_ready(self) -> None:
        """The server connection is up (the SOCKS5 end replies here)."""

    def relay_failed(self, failure: Failure) -> None:
        """The server could not be reached."""
        self.transport.loseConnection()

    def _server_failed(self, failure: Failure) -> None:
        self._connecting = None
        if failure.check(CancelledError) or self._closed:
            return
        upstream = self._upstream
        assert upstream is not None
        self.factory.servers.failed(upstream, failure.getErrorMessage())
        verbose = self.factory.verbose
        if self._candidates:
            failovers = self.factory.failovers
            failovers[upstream.label] = failovers.get(upstream.label, 0) + 1
            if verbose:
                _log.debug(
                    "cannot reach server {server} for {target} ({error}); trying {next}",
                    server=upstream.label, target=self._target, error=failure.getErrorMessage(),
                    next=self._candidates[0].label,
                )
            self._try_next_server()
            return
        if verbose:
            _log.debug(
                "cannot reach server {server} for {target}: {error}",
                server=upstream.label, target=self._target, error=failure.getErrorMessage(),
            )
        else:
            _log.info("cannot reach server {server}: {error}", server=upstream.label, error=failure.getErrorMessage())
        self._state = CLOSED
        self.relay_failed(failure)

    def _server_connected(self, server: OutboundProtocol) -> None:
        self._connecting = None
        if self._closed:
            server.transport.loseConnection()
            return
        assert self._upstream is not None
        self.factory.servers.succeeded(self._upstream)
        self._codec = codec = self._upstream.suite.client_codec()
        server.transform = codec.decrypt
        if self.factory.server_traffic is not None:
            self._count(server, self.factory.server_traffic(self._upstream))
        self._state = RELAYING
        self.relay_ready()
        self.join(server)
        if self._early:
            early, self._early = self._early, b""
            self._send_first(early)
        else:
            self.transform = self._first_transform
            self._header_call = self.factory.reactor.callLater(FIRST_DATA_WAIT, self._send_header_alone)
        self._held = False
        self.transport.resumeProducing()

    def _count(self, server: OutboundProtocol, counter: ITrafficCounter) -> None:
        """Count the payload bytes of this relay: what the application sends (up) and receives (down)."""
        codec = self._codec
        assert codec is not None
        decrypt, encrypt, first = codec.decrypt, codec.encrypt, codec.first
        add_up, add_down = counter.add_up, counter.add_down

        def counted_decrypt(data: bytes) -> bytes:
            out = decrypt(data)
            add_down(len(out))
            return out

        def counted_encrypt(data: bytes) -> bytes:
            add_up(len(data))
            return encrypt(data)

        def counted_first(target: Address, data: bytes) -> bytes:
            add_up(len(data))
            return first(target, data)

        server.transform = counted_decrypt
        self._encrypt = counted_encrypt
        self._first = counted_first

    def _first_transform(self, data: bytes) -> bytes:
        self._cancel_header_call()
        return self._start_stream(data)

    def _start_stream(self, data: bytes) -> bytes:
        codec = self._codec
        assert codec is not None and self._target is not None
        if self._encrypt is not None:
            self.transform, first = self._encrypt, self._first
            assert first is not None
            self._opened = True
            return first(self._target, data)
        self.transform = codec.encrypt
        self._opened = True
        return codec.first(self._target, data)

    def _send_first(self, data: bytes) -> None:
        assert self.peer is not None
        self.peer.transport.write(self._start_stream(data))

    def _send_header_alone(self) -> None:
        self._header_call = None
        if self.peer is not None and not self.peer._closed and not self._opened:
            self._send_first(b"")

    def _cancel_header_call(self) -> None:
        if self._header_call is not None:
            if self._header_call.active():
                self._header_call.cancel()
            self._header_call = None

    def readConnectionLost(self) -> None:
        if self._state == RELAYING:
            if not self._opened:
                # Half-closed before sending anything: the server still needs
                # the address to open the target.
                self._cancel_header_call()
                self._send_first(b"")
            RelayProtocol.readConnectionLost(self)
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_header_call()
        if self._connecting is not None:
            self._connecting.cancel()
        InboundProtocol.connectionLost(self, reason)
