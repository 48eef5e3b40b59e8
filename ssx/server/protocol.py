"""
The server end: one `ShadowsocksServerProtocol` per client connection.

Data path: the suite's server codec (`ssx.crypto`) decrypts the stream and
finds the target address in its header (either edition), then resolve it (`ssx.net.resolver`),
refuse what the ACL's outbound lists refuse (`ssx.acl`: the name before
resolving, every address after) and forbidden IPs (`ssx.server.forbidden`), connect, then relay (`ssx.net.relay`):
client bytes are decrypted towards the target, target bytes encrypted back.

The port's keys (`ssx.server.credentials.PortCredentials`, held by the
factory) give each connection its codec: the one key's, or on a port of
several keys one that finds the connection's key by trial decryption
(`ssx.crypto.KeyRing`).  A key's connections count under its id in the
per-user accounting, and its limits (`ssx.server.key_limits`) are
checked once the header is in.

Anything that fails before the relay starts because of the client's bytes
(a bad tag, no key matching, a malformed header, a key at its limit) gets silence: the connection keeps reading
and discarding until its timeout, then closes with a FIN, so a prober learns
nothing from how it closed, nor (below the bounds that follow) from when.
A client the ACL refuses is closed at accept, before a byte is read.

Connections that have not yet presented a valid header are bounded, per
source and in all (`ssx.server.handshakes`; with max_connections, to half its
slots): beyond a bound the oldest of them is closed as its handshake
timeout would close it.  A connection past its header is never closed to
make room.

Peers' failures are counted on the factory, not logged one by one (the
service logs a periodic summary); `verbose` logs them, destinations
included.  With metrics on (`ssx.server.metrics`), the factory's
`observer` also times each handshake, key search and connect, and its
`closed_by_status` counts how connections ended; without, neither costs
more than an attribute test.
"""

from __future__ import annotations

import time
from itertools import filterfalse
from typing import Any, Protocol as TypingProtocol

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
from ssx.server.credentials import PortCredentials, credentials_of
from ssx.server.key_limits import KeyUsage
from ssx.net.acl_holder import AclHolder
from ssx.server.forbidden import ForbiddenNetworks
from ssx.wire.address import is_ip_literal
from ssx.net.outbound import Outbound
from ssx.net.relay import InboundProtocol, OutboundProtocol, RelayFactory, RelayProtocol, can_half_close, connect_tcp
from ssx.net.resolver import NameResolutionError, TargetResolver
from ssx.server.handshakes import DEFAULT_MAX_HANDSHAKES, DEFAULT_MAX_HANDSHAKES_PER_IP, HandshakeTable, source_group

__all__ = ["ShadowsocksServerFactory", "ShadowsocksServerProtocol"]

_log = Logger()

_HEADER, _CONNECTING, _RELAY, _DISCARD = range(4)
# How a connection ended, by the state it was in (`closed_by_status`):
# before a whole header (client gone, handshake timeout, evicted), after
# bad data, before its target connected (refused, unreachable, client
# gone meanwhile), or after relaying.
CLOSED_STATUS = {_HEADER: "no_header", _DISCARD: "bad_data", _CONNECTING: "not_connected", _RELAY: "relayed"}


class HandshakeObserver(TypingProtocol):
    """What a port's metrics record per connection (`ssx.server.metrics.PortObserver`)."""

    def handshake(self, seconds: float) -> None:
        """From accept to a whole, valid header."""

    def connect(self, seconds: float) -> None:
        """From the header to the target connected (name look-up included)."""

    def key_search(self, seconds: float, found: bool) -> None:
        """The time to find the connection's key (or to fail to), and whether one was found."""


class ShadowsocksServerFactory(RelayFactory):
    """
    Holds what every server connection shares: keys, resolver, policy,
    clock.  `credentials` (a `PortCredentials`, or a bare suite for a port
    of one key) may be replaced while the port runs: new connections take
    the new keys, running ones keep theirs.
    """

    def __init__(
        self,
        reactor: Any,
        suite: CipherSuite | PortCredentials | Any,
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
        acl: AclHolder | None = None,
        **limits: Any,
    ) -> None:
        RelayFactory.__init__(self, reactor, timeout, **limits)
        # The ACL's client and outbound lists, read at each decision (reloadable).
        self.acl = acl
        # Where connections to targets leave from (None: as the kernel chooses).
        self.outbound = outbound
        self.salt_filter = salt_filter
        self.credentials: PortCredentials = credentials_of(suite)
        # Connections and quota use by key id: kept when the keys are replaced.
        self.key_usage = KeyUsage(reactor.seconds)
        self.resolver = resolver
        self.forbidden = forbidden
        self.connect_timeout = connect_timeout
        self.handshakes = HandshakeTable()
        self.set_handshake_bounds(max_handshakes, max_handshakes_per_ip)
        # Counters for logs and tests now, for per-user stats and metrics later.
        self.connections_refused = 0
        self.handshake_failures = 0
        self.targets_unreachable = 0
        self.handshakes_timed_out = 0
        self.handshakes_evicted = 0
        self.relays_broken = 0
        self.limit_reached = 0
        # Refused by the ACL: clients at accept, targets (by name or address).
        self.acl_clients_refused = 0
        self.acl_refused = 0
        # Where multi-user ports count each user's bytes.
        self.user_traffic: IUserTrafficSink = user_traffic if user_traffic is not None else UserTrafficTable()
        # Where the port's encrypted bytes are counted, all users together,
        # if anything asked (a wrapper per read: off by default).
        self.port_traffic = port_traffic
        # Target names that did not resolve (a part of those unreachable).
        self.targets_unresolvable = 0
        # Metrics (None: off).  `observer` times handshakes, key searches
        # and connects; `closed_by_status` counts ended connections by
        # `CLOSED_STATUS`; `default_user` is the name single-key
        # connections are counted under in `user_traffic` (None: not counted).
        self.observer: HandshakeObserver | None = None
        self.closed_by_status: dict[str, int] | None = None
        self.default_user: str | None = None

    def observe_key_search(self, seconds: float, found: bool) -> None:
        """
        Record the time a connection took to find its key (trial
        decryption included), or to find that none matched: a no-op with
        metrics off.
        """
        observer = self.observer
        if observer is not None:
            observer.key_search(seconds, found)

    def set_handshake_bounds(self, max_handshakes: int, max_handshakes_per_ip: int) -> None:
        """Bound the unfinished handshakes, in all and per source (0: no bound), from now on (a reload too)."""
        if self.max_connections:
            # Unfinished handshakes that have had their chance never hold
            # more than half the connection slots.
            half = max(1, self.max_connections // 2)
            max_handshakes = min(max_handshakes, half) if max_handshakes else half
        self.handshakes.limit = max_handshakes
        self.handshakes.per_source = max_handshakes_per_ip
        # Connections accepted together are read only after the next batch
        # is accepted: at most two batches are unread at any time, and the
        # table keeps up to twice its bounds of those.
        bounds = [bound for bound in (max_handshakes, max_handshakes_per_ip) if bound]
        self.accept_batch = min(bounds) if bounds else 0

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        acl = self.acl.acl if self.acl is not None else None
        if acl is not None and acl.checks_clients:
            host = getattr(addr, "host", None)
            if isinstance(host, str) and not acl.client_allowed(host):
                # None: the listening port closes the socket at once,
                # before a byte is read or written.
                self.acl_clients_refused += 1
                if self.verbose:
                    _log.debug("refused client {client}: ACL", client=host)
                return None
        # A ShadowsocksServerProtocol, typed as Factory's contract says:
        # RelayFactory is not generic over its protocol.
        return ShadowsocksServerProtocol(self)

    def handshake_started(self, protocol: "ShadowsocksServerProtocol") -> None:
        """A connection was accepted: bound the unfinished handshakes, closing the oldest beyond."""
        group = None
        if self.handshakes.per_source:
            # `ssx.net.lean`'s accepted transports keep the address their
            # factory was given: no object is built here.
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
        self._codec = factory.credentials.ring.server_codec(factory.salt_filter)
        # The key whose limits admitted this connection (to release at the end).
        self._admitted: str | None = None
        self._plain = bytearray()
        self._connecting: Deferred | None = None
        # Encrypted bytes taken before the relay, for the port's traffic.
        self._wire_in = 0
        # When the header was whole (with metrics on), for the connect time.
        self._header_at = 0.0
        # Reads held while the target is being connected.
        self._held = False

    @property
    def user(self) -> str | None:
        """The user the client authenticated as, on a multi-user port (None before, or on a single-key port)."""
        user: str | None = self._codec.user
        return user

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
        observer = self.factory.observer
        if observer is not None and state == _HEADER:
            self._timed_header(data)
            return
        try:
            self._plain += codec.decrypt(data)
        except ProtocolError as e:
            self._discard(e)
            return
        if state == _HEADER and codec.address is not None:
            self._header_done(codec.address)
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

    def _timed_header(self, data: bytes) -> None:
        # dataReceived's header path, with metrics on: the decrypt that
        # finds the key (or fails to) is timed, and the handshake.
        codec = self._codec
        factory = self.factory
        started = time.perf_counter()
        try:
            plain = codec.decrypt(data)
        except ProtocolError as e:
            factory.observe_key_search(time.perf_counter() - started, False)
            self._discard(e)
            return
        self._plain += plain
        if codec.address is not None:
            factory.observe_key_search(time.perf_counter() - started, True)
            self._header_done(codec.address)
        else:
            factory.handshake_fed(self)

    def _header_done(self, address: Address) -> None:
        if not self._admit():
            # From outside exactly a wrong key: silence until the timeout.
            self._state = _DISCARD
            self._plain = bytearray()
            self.factory.handshake_fed(self)
            return
        observer = self.factory.observer
        if observer is not None:
            # Nothing resets last_activity before the relay: it is the accept time.
            self._header_at = self.factory.reactor.seconds()
            observer.handshake(self._header_at - self.last_activity)
        self._state = _CONNECTING
        self.factory.handshakes.remove(self)
        self._open_target(address)

    def _admit(self) -> bool:
        """Whether the connection's key is within its limits (counted as open if so)."""
        key = getattr(self._codec, "key", None)
        if key is None or key.id is None:
            return True
        factory = self.factory
        limit = factory.credentials.limit(key)
        if not limit:
            return True
        if not factory.key_usage.admit(key.id, limit):
            return False
        self._admitted = key.id
        return True

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
        if self.factory.acl is not None and self._refused_by_acl(address):
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

    def _refused_by_acl(self, address: Address, ips: list[str] | None = None) -> bool:
        """
        Check the target's name (`ips` None: before resolving it) or each
        address it resolved to against the ACL; a refused one closes the
        connection as a forbidden one does.
        """
        factory = self.factory
        if factory.acl is None or not factory.acl.refuses_target(address.host, ips):
            return False
        factory.acl_refused += 1
        if factory.verbose:
            _log.debug("refused {target}: ACL", target=address)
        self.transport.loseConnection()
        return True

    def _connect_to(self, ips: list[str], address: Address) -> None:
        self._connecting = None
        factory = self.factory
        if factory.acl is not None and self._refused_by_acl(address, ips):
            return
        # [ip for ip in ips if not forbids(ip)], in C.
        allowed = list(filterfalse(factory.forbidden.forbids, ips))
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
        # Success is `_target_connected`'s (the target's `on_connected`,
        # called just before `d` fires): only the failure needs `d`.
        d.addErrback(self._unreachable, address)

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
        if failure.check(NameResolutionError):
            self.factory.targets_unresolvable += 1
        self.transport.loseConnection()

    def _target_connected(self, target: OutboundProtocol) -> None:
        self._connecting = None
        if self._closed or self._state != _CONNECTING:
            # Gone, or (over TLS, where reads can arrive while paused) the
            # stream failed authentication meanwhile.
            target.transport.loseConnection()
            return
        self._state = _RELAY
        factory = self.factory
        if factory.observer is not None:
            factory.observer.connect(factory.reactor.seconds() - self._header_at)
        decrypt, encrypt = self._codec.data_path()
        user = self._codec.user
        if user is None:
            user = factory.default_user
        if user is not None:
            # Multi-user ports count each user's application bytes;
            # single-user ports relay bare.
            counter = self.factory.user_traffic.counter(user)
            if self._admitted is not None:
                counter = self.factory.key_usage.counted_against(self._admitted, counter)
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
        state = self._state
        closed = self.factory.closed_by_status
        if closed is not None:
            status = CLOSED_STATUS[state]
            closed[status] = closed.get(status, 0) + 1
        if state == _HEADER or state == _DISCARD:
            # Past those, `_header_done` has removed it already.
            self.factory.handshakes.remove(self)
        if self._admitted is not None:
            self.factory.key_usage.release(self._admitted)
            self._admitted = None
        if self._connecting is not None:
            self._connecting.cancel()
        InboundProtocol.connectionLost(self, reason)
