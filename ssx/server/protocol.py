"""
The server end: one `ShadowsocksServerProtocol` per client connection.

Data path: the suite's server codec (`ssx.crypto`) decrypts the stream and
finds the target address in its header (either edition), then resolve it (`ssx.net.resolver`),
refuse forbidden IPs (`ssx.server.forbidden`), connect, then relay (`ssx.net.relay`):
client bytes are decrypted towards the target, target bytes encrypted back.

Anything that fails before the relay starts because of the client's bytes
(a bad tag, a malformed header) gets silence: the connection keeps reading
and discarding until its timeout, then closes with a FIN, so a prober learns
nothing from how it closed, nor (below the bounds that follow) from when.

Connections that have not yet presented a valid header are bounded, per
source and in all (`ssx.server.handshakes`; with max_connections, to half its
slots): beyond a bound the oldest of them is closed as its handshake
timeout would close it.  A connection past its header is never closed to
make room.

Peers' failures are counted on the factory, not logged one by one (the
service logs a periodic summary); `verbose` logs them, destinations
included.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from ssx.wire.address import Address
from ssx.crypto import CipherSuite
from ssx.errors import ProtocolError
from ssx.interfaces import ITrafficCounter, IUserTrafficSink
from ssx.server.accounting import UserTrafficTable, counted, counted_wire
from ssx.server.forbidden import ForbiddenNetworks
from ssx.wire.address import is_ip_literal
from ssx.net.outbound import Outbound
from ssx.net.relay import InboundProtocol, OutboundProtocol, RelayFactory, RelayProtocol, can_half_close, connect_tcp
from ssx.net.resolver import NameResolutionError, TargetResolver
from ssx.server.handshakes import DEFAULT_MAX_HANDSHAKES, DEFAULT_MAX_HANDSHAKES_PER_IP, HandshakeTable, source_group

__all__ = ["ShadowsocksServerFactory", "ShadowsocksServerProtocol"]

_log = Logger()

_HEADER, _CONNECTING, _RELAY, _DISCARD = range(4)


class ShadowsocksServerFactory(RelayFactory):
    """Holds what every server connection shares: keys, resolver, policy, clock."""

    def __init__(
        self,
        reactor: Any,
        suite: CipherSuite,
        resolver: TargetResolver,
        forbidden: ForbiddenNetworks,
        timeout: float = 300.0,
        connect_timeout: float = 10.0,
        salt_filter: Any = None,
        max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
        max_handshakes_per_ip: int = DEFAULT_MAX_HANDSHAKES_PER_IP,
        user_traffic: IUserTrafficSink | None = None,
        port_traffic: ITrafficCounter | None = None,
        outbound: Outbound | None = None,
        **limits: Any,
    ) -> None:
        RelayFactory.__init__(self, reactor, timeout, **limits)
        # Where connections to targets leave from (None: as the kernel chooses).
        self.outbound = outbound
        self.salt_filter = salt_filter
        self.suite = suite
        self.resolver = resolver
        self.forbidden = forbidden
        self.connect_timeout = connect_timeout
        if self.max_connections:
            # Unfinished handshakes that have had their chance never hold
            # more than half the connection slots.
            half = max(1, self.max_connections // 2)
            max_handshakes = min(max_handshakes, half) if max_handshakes else half
        self.handshakes = HandshakeTable(max_handshakes, max_handshakes_per_ip)
        # Connections accepted together are read only after the next batch
        # is accepted: at most two batches are unread at any time, and the
        # table keeps up to twice its bounds of those.
        bounds = [bound for bound in (max_handshakes, max_handshakes_per_ip) if bound]
        self.accept_batch = min(bounds) if bounds else 0
        # Counters for logs and tests now, for per-user stats and metrics later.
        self.connections_refused = 0
        self.handshake_failures = 0
        self.targets_unreachable = 0
        self.handshakes_timed_out = 0
        self.handshakes_evicted = 0
        self.relays_broken = 0
        self.limit_reached = 0
        # Where multi-user ports count each user's bytes.
        self.user_traffic: IUserTrafficSink = user_traffic if user_traffic is not None else UserTrafficTable()
        # Where the port's encrypted bytes are counted, all users together,
        # if anything asked (a wrapper per read: off by default).
        self.port_traffic = port_traffic

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        # A ShadowsocksServerProtocol, typed as Factory's contract says:
        # RelayFactory is not generic over its protocol.
        return ShadowsocksServerProtocol(self)

    def handshake_started(self, protocol: "ShadowsocksServerProtocol") -> None:
        """A connection was accepted: bound the unfinished handshakes, closing the oldest beyond."""
        group = None
        if self.handshakes.per_source:
            group = source_group(getattr(protocol.transport.getPeer(), "host", ""))
        for old in self.handshakes.add(protocol, group, self.reactor.seconds()):
            old.evict()

    def handshake_fed(self, protocol: "ShadowsocksServerProtocol") -> None:
        """An unfinished handshake sent bytes: it has had its chance, and the bounds apply to it."""
        for old in self.handshakes.fed(protocol):
            old.evict()

    def swept(self, now: float) -> None:
        # Those that were too young to go when the bounds were passed.
        if len(self.handshakes):
            for old in self.handshakes.over(now):
                old.evict()

    def report_limit(self) -> None:
        # Clients can bring this about over and over: one line, then the
        # summary counts.
        self.limit_reached += 1
        if self.limit_reached == 1 or self.verbose:
            _log.warn(
                "{count} connections: at the limit, new ones wait (counted in the summary from now on)",
                count=len(self.connections),
            )

    def relay_broken(self, error: ProtocolError) -> None:
        self.relays_broken += 1
        if self.verbose:
            _log.debug("relay closed: {error}", error=error)


class ShadowsocksServerProtocol(InboundProtocol):
    """A client connection to the server, from the salt to the end of the relay."""

    factory: ShadowsocksServerFactory

    def __init__(self, factory: ShadowsocksServerFactory) -> None:
        InboundProtocol.__init__(self, factory)
        self._state = _HEADER
        self._codec = factory.suite.server_codec(factory.salt_filter)
        self._plain = bytearray()
        self._connecting: Deferred | None = None
        # Encrypted bytes taken before the relay, for the port's traffic.
        self._wire_in = 0
        # Reads held while the target is being connected.
        self._held = False

    # The idle timer starts at connectionMade and nothing resets it before
    # the relay starts: a client gets one timeout's worth of time to present
    # a valid header, however it trickles its bytes.

    def connectionMade(self) -> None:
        InboundProtocol.connectionMade(self)
        self.factory.handshake_started(self)

    def evict(self) -> None:
        """
        Close an unfinished handshake early to make room, exactly as its
        timeout would (no byte, a FIN), and stop counting it at once.
        """
        factory = self.factory
        factory.handshakes_evicted += 1
        factory.handshakes.remove(self)
        factory.connection_closed(self)
        self.idle_limit = None
        self._close_unfinished()

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state == _RELAY:
            self.relayReceived(data)
            return
        if state == _DISCARD:
            return
        self._wire_in += len(data)
        codec = self._codec
        try:
            self._plain += codec.decrypt(data)
        except ProtocolError as e:
            self._discard(e)
            return
        if state == _HEADER and codec.address is not None:
            self._state = _CONNECTING
            self.factory.handshakes.remove(self)
            self._open_target(codec.address)
        elif state == _HEADER:
            self.factory.handshake_fed(self)
        elif not self._held and self._connecting is not None:
            # More came before the target answered: hold further reads until
            # it does, which bounds what we buffer to this read.  (Not at the
            # header already: most clients wait for the target's first bytes,
            # and holding costs two epoll_ctl calls a connection.  Nor once
            # the target was refused: the connection is closing.)
            self._held = True
            self.transport.pauseProducing()

    def _discard(self, error: ProtocolError) -> None:
        if self.factory.verbose:
            peer = self.transport.getPeer()
            _log.debug(
                "{peer}: {error}; discarding until the timeout",
                peer=getattr(peer, "host", peer),
                error=type(error).__name__,
            )
        self._state = _DISCARD
        self._plain = bytearray()
        self.factory.handshake_failures += 1
        self.factory.handshake_fed(self)

    def _open_target(self, address: Address) -> None:
        # Callbacks rather than a coroutine: an IP literal (the common case)
        # goes straight to connect, with no resolver or coroutine machinery.
        if is_ip_literal(address.host):
            self._connect_to([address.host], address)
            return
        try:
            d = self.factory.resolver.resolve(address.host)
        except Exception as e:
            self._unreachable(Failure(e), address)
            return
        self._connecting = d
        d.addCallback(self._connect_to, address)
        # Also catches anything _connect_to raises.
        d.addErrback(self._unreachable, address)

    def _connect_to(self, ips: list[str], address: Address) -> None:
        self._connecting = None
        factory = self.factory
        allowed = [ip for ip in ips if not factory.forbidden.forbids(ip)]
        if not allowed:
            if factory.verbose:
                _log.debug("refused {target}: forbidden address {ips}", target=address, ips=",".join(ips))
            factory.connections_refused += 1
            self.transport.loseConnection()
            return
        outbound = OutboundProtocol(self._target_connected)
        try:
            source = factory.outbound
            if source is None:
                d = connect_tcp(factory.reactor, allowed[0], address.port, outbound, factory.connect_timeout)
            else:
                d = connect_tcp(
                    factory.reactor, allowed[0], address.port, outbound, factory.connect_timeout,
                    bind_address=source.bind_address(allowed[0]), device=source.device,
                )
        except Exception as e:  # e.g. socket.gaierror for an address the OS cannot use
            self._unreachable(Failure(e), address)
            return
        if not d.called:
            self._connecting = d
        d.addCallbacks(self._connected, self._unreachable, errbackArgs=(address,))

    def _connected(self, target: OutboundProtocol) -> None:
        self._connecting = None

    def _unreachable(self, failure: Failure, address: Address) -> None:
        self._connecting = None
        if failure.check(CancelledError):
            return
        if self.factory.verbose:
            if failure.check(NameResolutionError, ConnectError):
                _log.debug("cannot reach {target}: {error}", target=address, error=failure.value)
            else:
                _log.debug("cannot connect to {target}: {error!r}", target=address, error=failure.value)
        self.factory.targets_unreachable += 1
        self.transport.loseConnection()

    def _target_connected(self, target: OutboundProtocol) -> None:
        if self._closed or self._state != _CONNECTING:
            # Gone, or (over TLS, where reads can arrive while paused) the
            # stream failed authentication meanwhile.
            target.transport.loseConnection()
            return
        self._state = _RELAY
        decrypt, encrypt = self._codec.data_path()
        user = self._codec.user
        if user is not None:
            # Multi-user ports count each user's application bytes;
            # single-user ports relay bare.
            counter = self.factory.user_traffic.counter(user)
            counter.add_up(len(self._plain))  # the request's first payload
            decrypt, encrypt = counted(counter, decrypt, encrypt)
        port_traffic = self.factory.port_traffic
        if port_traffic is not None:
            # Encrypted bytes, as peers count them: the header's too.
            port_traffic.add_up(self._wire_in)
            decrypt, encrypt = counted_wire(port_traffic, decrypt, encrypt)
        self.transform, target.transform = decrypt, encrypt
        self.join(target)
        if self._plain:
            target.transport.write(bytes(self._plain))
        self._plain = bytearray()
        if self._read_closed:
            target.release_producer()
            if can_half_close(target.transport):
                target.transport.loseWriteConnection()
        elif self._held:
            self._held = False
            self.transport.resumeProducing()

    def timeoutConnection(self) -> None:
        if self._state == _RELAY:
            InboundProtocol.timeoutConnection(self)
        else:
            if self._state == _HEADER:
                # No whole header came: a failed handshake that the
                # decoder never saw fail.
                self.factory.handshakes_timed_out += 1
            self._close_unfinished()

    def _close_unfinished(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        if self._state == _RELAY:
            RelayProtocol.readConnectionLost(self)
        elif self._state == _CONNECTING:
            # The client is done sending; its data is buffered.  Finish the
            # half-close once the target is connected.
            self._read_closed = True
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.handshakes.remove(self)
        if self._connecting is not None:
            self._connecting.cancel()
        InboundProtocol.connectionLost(self, reason)
