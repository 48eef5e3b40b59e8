"""
The local end's health check of its servers.

Beside the data path: every `interval` seconds `HealthCheckService` opens a
Shadowsocks connection through each known server to the check target, sends
the check request (an HTTP GET) in the stream's first write, and waits for
the first decrypted byte of the answer.  It talks to the server through the
suite's client codec (`ICipherSuite.client_codec`), as the relays do, so
every method family is checked the same way.  The time that took is the
server's latency; no answer within the timeout, a refused connection or a
stream that fails authentication marks the server down.  Results go to the
`IServerPicker`, which ranks servers by them.  With fewer than two servers
there is nothing to choose, so nothing is sent.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, TimeoutError as DeferredTimeout
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ssx.wire.address import Address
from ssx.errors import ProtocolError
from ssx.interfaces import IServerPicker, ITcpClientCodec, IUpstream

__all__ = ["HealthCheckService", "probe"]

_log = Logger()


class _Probe(Protocol):
    """One check through one server: fires `done` with the latency, or fails."""

    # The server connection's: TCP, TLS or a Unix socket (`IUpstream.connect`).
    transport: Any

    def __init__(self, upstream: IUpstream, target: Address, request: bytes, clock: Any, started: float) -> None:
        self.codec: ITcpClientCodec = upstream.suite.client_codec()
        self.target = target
        self.request = request
        self.clock = clock
        self.started = started
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.codec.first(self.target, self.request))

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        try:
            plain = self.codec.decrypt(data)
        except ProtocolError as e:
            self.done.errback(Failure(e))
            self.transport.abortConnection()
            return
        if plain:
            self.done.callback(self.clock.seconds() - self.started)
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.errback(Failure(ConnectionError("closed before any answer")))


async def probe(clock: Any, upstream: IUpstream, target: Address, request: bytes, timeout: float) -> float:
    """The seconds from connecting to `upstream` to the first byte of `target`'s answer to `request`."""
    started = clock.seconds()
    protocol = _Probe(upstream, target, request, clock, started)
    connecting = upstream.connect(protocol)
    connecting.addTimeout(timeout, clock)
    await connecting
    timer = clock.callLater(max(0.0, timeout - (clock.seconds() - started)), protocol.done.cancel)
    try:
        return await protocol.done
    finally:
        if timer.active():
            timer.cancel()
        transport = protocol.transport
        if transport is not None and transport.connected and not transport.disconnecting:
            transport.abortConnection()


class HealthCheckService(Service):
    """Checks every server through the picker's list, every `interval` seconds."""

    def __init__(
        self, reactor: Any, picker: IServerPicker, target: Address, request: bytes, interval: float, timeout: float
    ) -> None:
        self.reactor = reactor
        self.picker = picker
        self.target = target
        self.request = request
        self.interval = interval
        self.timeout = timeout
        self._loop = LoopingCall(self.check_all)
        self._loop.clock = reactor
        self._running: Deferred | None = None
        # With metrics on: called with each check's server label and latency (None: failed).
        self.observe: Callable[[str, float | None], None] | None = None

    def check_all(self) -> Deferred | None:
        """One round: every server once, at the same time; fires when all are done."""
        upstreams = self.picker.upstreams()
        if len(upstreams) < 2:
            return None
        self._running = DeferredList([Deferred.fromCoroutine(self._check(u)) for u in upstreams], consumeErrors=True)
        return self._running

    async def _check(self, upstream: IUpstream) -> None:
        try:
            latency = await probe(self.reactor, upstream, self.target, self.request, self.timeout)
        except Exception as e:
            if not self.running:  # cancelled by stopService: nothing was learnt
                return
            if isinstance(e, (DeferredTimeout, CancelledError)):
                reason = f"no answer within {self.timeout:g} s"
            else:
                reason = str(e) or type(e).__name__
            _log.debug("health check through {server} failed: {reason}", server=upstream.label, reason=reason)
            self.picker.checked(upstream, None)
            if self.observe is not None:
                self.observe(upstream.label, None)
            return
        self.picker.checked(upstream, latency)
        if self.observe is not None:
            self.observe(upstream.label, latency)

    def startService(self) -> None:
        Service.startService(self)
        if self.interval > 0:
            self._loop.start(self.interval, now=True)

    def stopService(self) -> Any:
        Service.stopService(self)
        if self._loop.running:
            self._loop.stop()
        running, self._running = self._running, None
        if running is not None and not running.called:
            running.cancel()
        return None
