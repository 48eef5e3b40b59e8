"""
The relay between two connections, shared by both ends.

Once a handshake is over (SOCKS5 on the local end, the Shadowsocks header on
the server end) two protocols are joined: whatever one reads, transformed by
its `forward` (encrypt or decrypt), is written to the other.  Each transport
is registered as the streaming producer of the other, so a slow reader pauses
reads on the fast side and neither end buffers without bound.  A read EOF on
one side becomes a write half-close on the other; a connection closes once
both of its halves are done, or at once when its peer goes away.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    ISSLTransport,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ssx.net import tcp
from ssx.errors import ProtocolError

__all__ = [
    "InboundProtocol",
    "OutboundProtocol",
    "RelayFactory",
    "RelayProtocol",
    "can_half_close",
    "connect_protocol",
    "connect_tcp",
    "set_no_delay",
]

_log = Logger()


def can_half_close(transport: object) -> bool:
    """
    Whether a write half-close can be passed on.  Twisted's TLS transport
    has none of its own (the call would reach the raw socket and cut the
    stream without close_notify), so over TLS the pair ends when the other
    direction does, or at the idle timeout.
    """
    return not ISSLTransport.providedBy(transport)


def set_no_delay(transport: object) -> None:
    """Turn Nagle off where the transport is TCP: a relay adds latency enough."""
    if ITCPTransport.providedBy(transport):
        try:
            transport.setTcpNoDelay(True)
        except OSError:
            pass


class _OneConnection(Factory):
    # Like the factory of twisted's connectProtocol, but without a
    # "Starting factory" log line for every relayed connection.
    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        return self._protocol


def connect_protocol(endpoint: IStreamClientEndpoint, protocol: Protocol) -> Deferred:
    """
    Connect `protocol` through `endpoint`; fires with it once connected
    (for an `OutboundProtocol`: once ready, so over TLS after the handshake,
    and with the connection's failure if it ends before that).
    """
    d: Deferred[Any] = endpoint.connect(_OneConnection(protocol))
    if isinstance(protocol, OutboundProtocol):
        d.addCallback(lambda connected: connected.ready)
    return d


class _OneTcpConnection(ClientFactory):
    noisy = False

    def __init__(self, protocol: Protocol, connected: Deferred) -> None:
        self._protocol: Protocol | None = protocol
        self._connected: Deferred | None = connected
        self.cancelled = False

    def buildProtocol(self, addr: object) -> Protocol | None:
        # Both let go of once built, as `_ReadyWhenConnected` does: the
        # connection's transport keeps its connector, which keeps this factory.
        protocol, self._protocol = self._protocol, None
        connected, self._connected = self._connected, None
        if connected is not None and not connected.called:
            connected.callback(protocol)
        return protocol

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        connected = self._connected
        if connected is not None and not connected.called and not self.cancelled:
            connected.errback(reason)


def connect_tcp(
    reactor: Any, host: str, port: int, protocol: Protocol, timeout: float, fast_open: bool = False,
    bind_address: tuple[str, int] | None = None, device: str | None = None,
) -> Deferred:
    """
    Connect `protocol` to an IP literal over TCP, as `connect_protocol`
    does through a TCP endpoint, but without the endpoint's wrapping
    protocol, which would add a call to every read for the connection's
    life.  The Deferred fails with the connect error; cancelling it stops
    the attempt.  With `fast_open`, the first write goes in the SYN where
    the kernel allows it (`ssx.net.tcp.connect`); `bind_address` and
    `device` set the source address and the interface sent through.
    """
    if isinstance(protocol, OutboundProtocol):
        # Its own `ready` is the answer: one Deferred a connection, not two chained.
        ready_factory = _ReadyWhenConnected(protocol)
        protocol.connector = tcp.connect(reactor, host, port, ready_factory, timeout, fast_open, bind_address, device)
        return protocol.ready
    connector: list[Any] = []

    def cancel(d: Deferred) -> None:
        factory.cancelled = True  # Deferred.cancel then fails it with CancelledError
        if connector:
            connector[0].stopConnecting()

    connected: Deferred = Deferred(cancel)
    factory = _OneTcpConnection(protocol, connected)
    connector.append(tcp.connect(reactor, host, port, factory, timeout, fast_open, bind_address, device))
    return connected


class _ReadyWhenConnected(ClientFactory):
    """Connects one `OutboundProtocol`, whose `ready` fails with the connect error."""

    noisy = False

    def __init__(self, protocol: "OutboundProtocol") -> None:
        self._protocol: OutboundProtocol | None = protocol

    def buildProtocol(self, addr: object) -> Protocol | None:
        # Let go of it: the connection's transport keeps its connector, and
        # the connector this factory, so keeping the protocol here would
        # make a reference cycle that only the garbage collector frees.
        protocol, self._protocol = self._protocol, None
        return protocol

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        protocol = self._protocol
        if protocol is None:
            return
        protocol.connector = None
        if not protocol.ready.called and not protocol.cancelled:
            protocol.ready.errback(reason)


@implementer(IHalfCloseableProtocol)
class RelayProtocol(Protocol):
    """
    One side of a relay.

    Subclasses handle their handshake in `dataReceived` and call `join` when
    the relay starts; from then on `relayReceived` carries the data.
    `transform` turns bytes read here into bytes for the peer.
    """

    def __init__(self) -> None:
        # Every attribute a relay side ever has is set here, so that Python
        # keeps instances in its compact form: one assigned later, outside
        # __init__, turns each instance's attributes into a dict of its own
        # (about 0.4 KiB per connection, measured).
        self.transport: Any = None
        self.connected = 0
        self.peer: RelayProtocol | None = None
        self.transform: Callable[[bytes], bytes] | None = None
        self._read_closed = False
        self._write_closed = False
        self._closed = False
        self._has_producer = False  # the peer's transport is registered as ours' producer
        # Set by join: the clock, and how long a side whose peer is gone may
        # take to flush before it is aborted (a peer that never reads must
        # not keep a connection open forever).
        self.clock: Any = None
        self.linger = 0.0
        self._linger_call: Any = None

    def join(self, peer: "RelayProtocol", clock: Any = None, linger: float = 0.0) -> None:
        """Start relaying between this protocol and `peer` (both connected)."""
        self.peer = peer
        peer.peer = self
        for side in (self, peer):
            if getattr(side.transport, "bufferSize", tcp.READ_SIZE) != tcp.READ_SIZE:
                side.transport.bufferSize = tcp.READ_SIZE  # ssx.net.tcp's transports have it already
        self.clock = peer.clock = clock
        self.linger = peer.linger = linger
        self.transport.registerProducer(peer.transport, True)
        peer.transport.registerProducer(self.transport, True)
        self._has_producer = peer._has_producer = True

    def release_producer(self) -> None:
        """Stop throttling the peer's reads by this transport's buffer (once)."""
        if self._has_producer:
            self._has_producer = False
            self.transport.unregisterProducer()

    def relayReceived(self, data: bytes) -> None:
        """Bytes read from this side while relaying."""
        peer = self.peer
        if peer is None or peer._closed:
            return
        transform = self.transform
        try:
            out = transform(data) if transform is not None else data
        except ProtocolError as e:
            self.relayFailed(e)
            return
        if out:
            peer.transport.write(out)
        self.activity()

    def relayFailed(self, error: ProtocolError) -> None:
        """The stream read on this side is broken: close both sides."""
        self.report_broken(error)
        self.close_both()

    def report_broken(self, error: ProtocolError) -> None:
        """Say that this relay's stream broke (the accepting side's factory decides how)."""
        _log.info("relay closed: {error}", error=error)

    def activity(self) -> None:
        """Data moved; subclasses reset their idle timer here."""

    # Every relayed connection ends through these: the checks that
    # `release_producer`, `can_half_close` and a "both halves closed" test
    # would make are written out, a call fewer each.

    def readConnectionLost(self) -> None:
        self._read_closed = True
        peer = self.peer
        if peer is not None and not peer._closed:
            if peer._has_producer:
                peer.release_producer()
            if peer._read_closed:
                # Both directions are done: one close sends what is left and
                # the FIN (a half-close first would cost another reactor turn).
                peer.transport.loseConnection()
            elif not ISSLTransport.providedBy(peer.transport):  # can_half_close
                peer.transport.loseWriteConnection()
        if self._write_closed:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self._write_closed = True
        if self._read_closed:
            self.transport.loseConnection()

    def close_both(self, abort: bool = False) -> None:
        """Close this side and its peer: each after its pending writes, or at once with `abort`."""
        for side in (self, self.peer):
            if side is not None and not side._closed:
                side.release_producer()
                if abort:
                    side.transport.abortConnection()
                else:
                    side.transport.loseConnection()

    def _abort(self) -> None:
        self._linger_call = None
        if not self._closed:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        if self._linger_call is not None:
            if self._linger_call.active():
                self._linger_call.cancel()
            self._linger_call = None
        peer = self.peer
        if peer is not None and peer._closed:
            # Both sides are done: their links to each other go, so that
            # reference counting frees the pair and all they hold at once
            # (a cycle waits for the garbage collector, which then has to
            # walk every object of every connection it frees).
            self.peer = peer.peer = None
            return
        if peer is not None:
            # Unregister first: a transport whose paused producer is gone
            # would otherwise wait for it before closing.
            if peer._has_producer:
                peer.release_producer()
            peer.transport.loseConnection()
            # A transport with nothing to send closes in the call (ssx.net.lean's).
            if not peer._closed and peer.clock is not None and peer.linger > 0 and peer._linger_call is None:
                peer._linger_call = peer.clock.callLater(peer.linger, peer._abort)


def _forget(result: object) -> None:
    """A callback that drops the result it is given."""
    return None


@implementer(IHandshakeListener)
class OutboundProtocol(RelayProtocol):
    """
    The connection a relay opens: to the target on the server end, to the
    server on the local end.  It reports itself to `on_connected` once
    ready, and from then on only relays.

    Ready means connected, or over TLS, handshaken: a server whose
    certificate does not verify is then a failed connection (`ready`
    errbacks) rather than a relay that opens and dies at once.
    """

    def __init__(self, on_connected: Callable[["OutboundProtocol"], None]) -> None:
        RelayProtocol.__init__(self)
        self._on_connected: Callable[["OutboundProtocol"], None] | None = on_connected
        self.ready: Deferred = Deferred(self._cancel)
        # While `connect_tcp` connects it: the connector (to stop), and
        # whether `ready` was cancelled (its failure is then CancelledError).
        self.connector: Any = None
        self.cancelled = False

    def connectionMade(self) -> None:
        self.connector = None
        set_no_delay(self.transport)
        if not ISSLTransport.providedBy(self.transport):
            self._ready()

    def handshakeCompleted(self) -> None:
        self._ready()

    def _ready(self) -> None:
        callback, self._on_connected = self._on_connected, None
        if callback is not None:
            callback(self)
        if not self.ready.called:
            self.ready.callback(self)

    def _cancel(self, ready: Deferred) -> None:
        self._on_connected = None
        self.cancelled = True
        if self.transport is not None:
            self.transport.abortConnection()
        elif self.connector is not None:
            connector, self.connector = self.connector, None
            connector.stopConnecting()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._on_connected = None
        ready = self.ready
        if not ready.called:
            ready.errback(reason if reason is not None else Failure(ConnectionDone()))
        elif ready.result is self:
            # Fired with this protocol, `ready` would hold it in a cycle
            # (see RelayProtocol.connectionLost); a later callback gets None.
            ready.addCallback(_forget)
        RelayProtocol.connectionLost(self, reason)

    # Only relays: every read goes straight to `relayReceived` (one call
    # fewer a read than a method calling it; a subclass that overrides
    # `relayReceived` must override this too).
    dataReceived = RelayProtocol.relayReceived

    def report_broken(self, error: ProtocolError) -> None:
        peer = self.peer
        if peer is not None:
            peer.report_broken(error)
        else:
            RelayProtocol.report_broken(self, error)

    def activity(self) -> None:
        peer = self.peer
        if peer is not None:
            peer.activity()


# How often a factory looks for connections past their idle timeout: they
# close at most this much later than their timeout says.
SWEEP_INTERVAL = 1.0


class RelayFactory(Factory[Any]):
    """
    What the accepted connections of one listener share: the clock, the
    handshake and idle timeouts, and the set of live connections.

    Idle timeouts take one timer per factory, not one per connection: while
    connections are open, every `SWEEP_INTERVAL` seconds it times out those
    whose `last_activity` is older than their `idle_limit`.  A read costs a
    connection a timestamp instead of a timer reset.

    With `max_connections`, reaching the limit pauses accepting on every
    port of this factory: new connections wait in the kernel's backlog,
    running ones are unaffected, and accepting resumes below the limit.
    `accept_batch` (0: Twisted's own, which grows under load) caps the
    connections a port accepts at once, before any of them is read.

    `verbose` asks for a log line per event that a peer can cause (failed
    handshakes, unreachable targets, the destinations themselves); without
    it such events are counted (and the server logs a periodic summary).
    """

    noisy = False

    def __init__(
        self,
        reactor: Any,
        timeout: float,
        handshake_timeout: float | None = None,
        max_connections: int = 0,
        verbose: bool = False,
    ) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.handshake_timeout = min(handshake_timeout or timeout, timeout)
        self.max_connections = max_connections
        self.accept_batch = 0
        self.verbose = verbose
        self.connections: set[Any] = set()
        self.ports: list[Any] = []
        self._paused = False
        self._sweep: Any = None
        self.accepted = 0

    def set_limits(self, timeout: float, handshake_timeout: float | None, max_connections: int) -> None:
        """
        New timeouts and connection limit (a reload): connections opened from
        now on take the timeouts; the limit applies at once, pausing or
        resuming accepting as it would have at the last connection.
        """
        self.timeout = timeout
        self.handshake_timeout = min(handshake_timeout or timeout, timeout)
        self.max_connections = max_connections
        full = bool(max_connections) and len(self.connections) >= max_connections
        if full != self._paused:
            self._paused = full
            for port in self.ports:
                port.stopReading() if full else port.startReading()

    def connection_opened(self, protocol: Any) -> None:
        """Track `protocol` (it has `idle_limit`, `last_activity` and `timeoutConnection`)."""
        self.connections.add(protocol)
        self.accepted += 1
        if self._sweep is None:
            self._sweep = self.reactor.callLater(SWEEP_INTERVAL, self._time_out_idle)
        if self.max_connections:
            if len(self.connections) >= self.max_connections and not self._paused:
                self._paused = True
                for port in self.ports:
                    port.stopReading()
                self.report_limit()
            self._limit_accepts()

    def swept(self, now: float) -> None:
        """Called after each sweep for idle connections (at `now`), while there are connections."""

    def report_limit(self) -> None:
        """Accepting has paused at the connection limit."""
        _log.warn("{count} connections: at the limit, new ones wait", count=len(self.connections))

    def relay_broken(self, error: ProtocolError) -> None:
        """A relayed stream of one of our connections failed to decrypt; both sides are closing."""
        _log.info("relay closed: {error}", error=error)

    def connection_closed(self, protocol: Any) -> None:
        self.connections.discard(protocol)
        if not self.connections and self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        if self.max_connections:
            if self._paused and len(self.connections) < self.max_connections:
                self._paused = False
                for port in self.ports:
                    port.startReading()
            self._limit_accepts()

    def _time_out_idle(self) -> None:
        self._sweep = None
        now = self.reactor.seconds()
        idle = [
            protocol
            for protocol in self.connections
            if protocol.idle_limit is not None and now - protocol.last_activity >= protocol.idle_limit
        ]
        try:
            for protocol in idle:
                protocol.idle_limit = None  # once, unless timeoutConnection sets it again
                try:
                    protocol.timeoutConnection()
                except Exception:
                    # One connection's failure must not spare the others.
                    _log.failure("timing out {protocol!r}", protocol=protocol)
            self.swept(now)
        finally:
            if self.connections and self._sweep is None:
                self._sweep = self.reactor.callLater(SWEEP_INTERVAL, self._time_out_idle)

    def _limit_accepts(self) -> None:
        # A TCP port accepts up to `numberAccepts` connections per readable
        # event without looking back at us: never more than there is room
        # for, nor more than `accept_batch`.
        room = self.accept_batch
        if self.max_connections:
            free = max(1, self.max_connections - len(self.connections))
            room = min(room, free) if room else free
        if not room:
            return
        for port in self.ports:
            if hasattr(port, "numberAccepts"):
                port.numberAccepts = room


class InboundProtocol(RelayProtocol):
    """
    An accepted connection: tracked by its factory, idle-timed by the
    factory's sweep on the factory's clock (so tests drive it with
    task.Clock).
    """

    factory: RelayFactory

    def __init__(self, factory: RelayFactory) -> None:
        RelayProtocol.__init__(self)
        self.factory = factory
        self.idle_limit: float | None = None
        self.last_activity = 0.0

    def set_idle_timeout(self, seconds: float | None) -> None:
        """Time out after `seconds` with nothing moving, counted from now (None: never)."""
        self.idle_limit = seconds
        self.last_activity = self.factory.reactor.seconds()

    def connectionMade(self) -> None:
        factory = self.factory
        factory.connection_opened(self)
        set_no_delay(self.transport)
        # Until the relay starts, the (shorter) handshake timeout applies
        # (`set_idle_timeout`, written out here and in `join`: every
        # connection passes through both).
        self.idle_limit = factory.handshake_timeout
        self.last_activity = factory.reactor.seconds()

    def join(self, peer: RelayProtocol, clock: Any = None, linger: float = 0.0) -> None:
        factory = self.factory
        reactor = factory.reactor
        RelayProtocol.join(self, peer, reactor, factory.timeout)
        self.idle_limit = factory.timeout
        self.last_activity = reactor.seconds()

    def activity(self) -> None:
        self.last_activity = self.factory.reactor.seconds()

    def timeoutConnection(self) -> None:
        # Idle means nothing moved either way: a peer that stopped reading
        # cannot be waited for, so abort rather than flush.
        self.close_both(abort=True)

    def report_broken(self, error: ProtocolError) -> None:
        self.factory.relay_broken(error)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.connection_closed(self)
        RelayProtocol.connectionLost(self, reason)
