"""
The transport of `ssx.net.lean`'s connections, standing on the reactor's
`IReactorFDSet` alone.

Twisted's `twisted.internet.tcp.Connection` spends much of a short
connection's CPU around the bytes rather than on them: `setblocking` in
its constructor, two calls per read (`doRead`, `_dataReceived`), an EOF
that goes through the reactor's `_disconnectSelectable` (a Failure lookup,
an interface check) and two adapter lookups, a close that calls
`removeReader` and `removeWriter` whatever is registered, `shutdown()`
before every `close()`, and a Failure built for the usual endings.
`LeanTransport` is the same `ITCPTransport` with that work cut:

- reads: one call per read; EOF and read errors are handled in `doRead`,
  not returned to the reactor to dispatch;
- writes go out at once (`send()` while nothing is queued; what the kernel
  does not take is buffered and sent on writability, as Twisted does), so
  a relay's write costs no reactor turn;
- `loseConnection` and `loseWriteConnection` act in the call when nothing
  is left to send (no buffered bytes, no producer): the protocol's
  `connectionLost` (`writeConnectionLost`) runs before they return, as
  Twisted's own transport does once its write side is closed;
- it knows whether it is registered for reading and for writing, and asks
  the reactor to forget only what it registered (every registration is
  still undone through the reactor, so the reactor's books stay right);
- whether a protocol class has `IHalfCloseableProtocol` is looked up once
  per class; the usual endings carry prebuilt Failures, as Twisted's
  reactor passes them (`ConnectionDone`, `ConnectionLost`,
  `ConnectionAborted`), to `connectionLost` exactly once;
- no `shutdown()` before `close()` once the peer's FIN has been read (see
  `connectionLost`).

What it keeps of Twisted's behaviour: producers and consumers (a push
producer is paused when more than `bufferSize` bytes wait, a pull producer
is asked for more each time the buffer drains), half-close on both sides
for protocols with `IHalfCloseableProtocol` (others have `connectionLost`
at EOF, with what was still buffered dropped, as on Twisted), an abort
that resets the connection and reports `ConnectionAborted` on the
reactor's next turn, and a protocol exception from `dataReceived` that
the reactor logs and ends the connection with.  TLS is not offered: TLS
listeners and `tls:` servers stay on Twisted's transports.

The subclasses `ssx.net.lean.LeanServer` and `LeanClient` add the
addresses (built when asked for, not per connection) and the connector's
notification.
"""

from __future__ import annotations

import _socket
import socket
import struct
from errno import ENOBUFS
from typing import Any, Callable, Iterable

from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableDescriptor,
    IHalfCloseableProtocol,
    ILoggingContext,
    IProducer,
    IPushProducer,
    IReadWriteDescriptor,
    ISystemHandle,
    ITCPTransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["LeanTransport", "READ_SIZE"]

_log = Logger()

#: Bytes read per `recv` by these transports and ssx.net.tcp's, and the
#: bytes buffered beyond which a push producer is paused.  Twisted reads
#: 65,536 bytes.  Relayed connections read 130,800: with AEAD framing
#: (eight chunks of at most 16,383 bytes) that is exactly 128 KiB on the
#: wire, so one read on one side is one read on the other.  Measured in
#: the benchmark suite: 65,400 saved about 8% CPU per GiB over Twisted's
#: size, and 130,800 about 4% more once writes went out at once.
READ_SIZE = 130800

# The endings' reasons, built once as Twisted's reactor builds its own.
_DONE = Failure(ConnectionDone())
_LOST = Failure(ConnectionLost())
_ABORTED = Failure(ConnectionAborted())

# SO_LINGER on, with no time: close() then sends a reset.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)

# Protocol classes, by whether they declare IHalfCloseableProtocol.
_HALF_CLOSEABLE: dict[type, bool] = {}


def _half_closeable(protocol: Any) -> Any:
    """`protocol` as an IHalfCloseableProtocol, or None (its class is looked up once)."""
    cls = protocol.__class__
    declared = _HALF_CLOSEABLE.get(cls)
    if declared is None:
        declared = _HALF_CLOSEABLE[cls] = IHalfCloseableProtocol.implementedBy(cls)
    if declared:
        return protocol
    # An instance's own declaration, or an adapter: as Twisted asks.
    return IHalfCloseableProtocol(protocol, None)


# The socket's C close: socket.socket.close wraps it in two Python calls
# that only matter to sockets with makefile() objects, which these never have.
_close = _socket.socket.close


def _closed_fileno() -> int:
    # What a closed descriptor answers the reactor (as Twisted's do).
    return -1


@implementer(
    ITCPTransport, ISystemHandle, IConsumer, IPushProducer, IReadWriteDescriptor, IHalfCloseableDescriptor,
    ILoggingContext,
)
class LeanTransport:
    """
    A connected, non-blocking TCP socket serving `protocol`, registered for
    reading from the start.  Call `protocol.makeConnection(transport)` next.
    """

    bufferSize = READ_SIZE

    def __init__(self, sock: socket.socket, protocol: Any, reactor: Any, replacing: Any = None) -> None:
        # Every attribute an instance ever has is set here: one set later
        # would give each instance a dict of its own (CPython's compact
        # instances share the names seen on the first ones).
        self.reactor = reactor
        self.socket: socket.socket | None = sock
        self.fileno = sock.fileno
        self.protocol = protocol
        # Twisted formats "Protocol,session,host" for every connection; the
        # protocol's name is enough to tell log lines apart.
        self.logstr: str = protocol.__class__.__name__
        # The reactor asks for the log prefix before every event: the
        # string's own __str__ answers without a Python call.
        self.logPrefix: Callable[[], str] = self.logstr.__str__
        self.connector: Any = None
        self.connected = 1
        self.disconnecting = 0
        self.disconnected = 0
        self.producer: Any = None  # an IPushProducer or IPullProducer
        self.streamingProducer = False
        self.producerPaused = False
        self._buffer: list[Any] = []  # bytes (or a memoryview of the rest of some) waiting to be sent
        self.buffered = 0  # their length: the bytes waiting to be sent
        self._reading = True
        self._writing = False
        self._read_done = False  # EOF came (or the reactor saw the socket hang up)
        self._eof_read = False  # recv() returned b"": nothing can be left unread
        self._write_closing = False  # loseWriteConnection was called
        self._write_closed = False  # ... and the FIN has gone
        self._aborting = False
        if replacing is None:
            reactor.addReader(self)
        else:
            # The descriptor registered for writing on this socket until now
            # (its connector), on a reactor with `hand_over` (ssx's).
            reactor.hand_over(replacing, self)

    # The reactor's side

    def doRead(self) -> None:
        try:
            data = self.socket.recv(self.bufferSize)  # type: ignore[union-attr]
        except BlockingIOError:
            return None
        except OSError:
            self.connectionLost(_LOST)
            return None
        if data:
            self.protocol.dataReceived(data)
            return None
        self._eof_read = True
        self._input_ended(_DONE)
        return None

    def doWrite(self) -> None:
        # The reactor may still hand a write event to a connection that
        # closed (or is aborting) while it handled the read of that event.
        if self.disconnected or self._aborting:
            return None
        buffer = self._buffer
        if buffer:
            data = buffer[0] if len(buffer) == 1 else b"".join(buffer)
            try:
                sent = self.socket.send(data)  # type: ignore[union-attr]
            except BlockingIOError:
                sent = 0
            except OSError as e:
                if e.errno != ENOBUFS:
                    self.connectionLost(_LOST)
                    return None
                sent = 0
            left = len(data) - sent
            if left:
                self._buffer = [memoryview(data)[sent:] if sent else data]
                self.buffered = left
                return None
            self._buffer = []
            self.buffered = 0
        # Drained.
        self._stop_writing()
        producer = self.producer
        if producer is not None and (not self.streamingProducer or self.producerPaused):
            self.producerPaused = False
            producer.resumeProducing()
        elif self.disconnecting:
            self.connectionLost(_DONE)
        elif self._write_closing and not self._write_closed:
            self._write_closed = True
            self._close_write()
        return None

    def readConnectionLost(self, reason: Failure) -> None:
        """The reactor saw the socket hang up while reading (it has stopped reading it)."""
        self._reading = False
        self._input_ended(reason)

    def writeConnectionLost(self, reason: Failure) -> None:
        self.connectionLost(reason)

    # Writing

    def write(self, data: bytes) -> None:
        if not isinstance(data, bytes):
            raise TypeError(f"Data must be bytes, not {type(data).__name__}")
        if not data or not self.connected or self._write_closed:
            return
        if (
            not self._buffer
            and not (self.disconnecting or self._write_closing or self._aborting)
            # A pull producer is asked for more only when the buffer
            # drains, so its writes go through the buffer.
            and (self.producer is None or self.streamingProducer)
        ):
            try:
                sent = self.socket.send(data)  # type: ignore[union-attr]
            except OSError:
                # Would block, or an error: doWrite meets it again and ends
                # the connection.
                sent = 0
            if sent == len(data):
                return
            if sent:
                data = data[sent:]
        self._buffer.append(data)
        self.buffered += len(data)
        producer = self.producer
        if producer is not None and self.streamingProducer and self.buffered > self.bufferSize:
            self.producerPaused = True
            producer.pauseProducing()
        self._start_writing()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        chunks = list(data)
        for chunk in chunks:
            if not isinstance(chunk, bytes):
                raise TypeError(f"Data must be bytes, not {type(chunk).__name__}")
        self.write(b"".join(chunks))

    # Ending

    def loseConnection(self) -> None:
        if not self.connected or self.disconnecting or self._aborting:
            return
        self.disconnecting = 1
        if self._write_closed or (not self._buffer and self.producer is None):
            # Nothing to wait for: close now.
            self.connectionLost(_DONE)
            return
        # After the buffer (and the producer: until it is unregistered).
        self._stop_reading()
        self._start_writing()

    def loseWriteConnection(self) -> None:
        if not self.connected or self._write_closing or self._aborting:
            return
        self._write_closing = True
        if not self._buffer and self.producer is None and not self.disconnecting:
            self._write_closed = True
            self._close_write()
            return
        self._start_writing()

    def abortConnection(self) -> None:
        """Drop what is buffered and reset the connection; `connectionLost` (ConnectionAborted) comes on the next turn."""
        if self.disconnected or self._aborting:
            return
        self._aborting = True
        self._stop_reading()
        self._stop_writing()
        self.reactor.callLater(0, self.connectionLost, _ABORTED)

    def connectionLost(self, reason: Failure) -> None:
        """Close the socket and tell the protocol (once, whoever calls)."""
        sock = self.socket
        if sock is None:
            return
        self.socket = None
        self.connected = 0
        self.disconnected = 1
        producer = self.producer
        if producer is not None:
            self.producer = None
            # As Twisted's transports: a producer's error must not keep the
            # socket open and registered, nor the protocol from hearing of the end.
            try:
                producer.stopProducing()
            except BaseException:
                _log.failure("stopping the producer of {transport!r}", transport=self)
        # Unregister before the descriptor closes (the reactor finds it by
        # its number), and only what is registered.
        if self._reading:
            self._reading = False
            self.reactor.removeReader(self)
        if self._writing:
            self._writing = False
            self.reactor.removeWriter(self)
        self.fileno = _closed_fileno
        self._buffer = []
        self.buffered = 0
        try:
            if self._aborting:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
            elif not self._eof_read:
                # close() with unread bytes sends a reset, not a FIN; the
                # shutdown first makes it a FIN, so that the server end
                # closes a prober's connection as it closes any other.
                # Once the peer's FIN has been read nothing can be left
                # unread (a peer sends no data after its FIN), so the
                # call is spared then: the usual end of a relayed
                # connection.
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        _close(sock)
        protocol = self.protocol
        self.protocol = None
        protocol.connectionLost(reason)
        connector = self.connector
        if connector is not None:
            connector.connection_lost(reason)

    # Producer and consumer

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError(
                f"Cannot register producer {producer}, because producer {self.producer} was never unregistered."
            )
        if self.disconnected:
            producer.stopProducing()
            return
        self.producer = producer
        self.streamingProducer = streaming
        if not streaming:
            producer.resumeProducing()  # type: ignore[attr-defined]  # a pull producer

    def unregisterProducer(self) -> None:
        self.producer = None
        if self.connected and self.disconnecting:
            self._start_writing()

    def stopConsuming(self) -> None:
        self.unregisterProducer()
        self.loseConnection()

    def pauseProducing(self) -> None:
        self._stop_reading()

    def resumeProducing(self) -> None:
        if self.connected and not self.disconnecting and not self._read_done:
            self._start_reading()

    def stopProducing(self) -> None:
        self.loseConnection()

    # Reading and writing registration (the IReadWriteDescriptor view)

    def startReading(self) -> None:
        self._start_reading()

    def stopReading(self) -> None:
        self._stop_reading()

    def startWriting(self) -> None:
        self._start_writing()

    def stopWriting(self) -> None:
        self._stop_writing()

    # Nothing registers again once an abort is under way: Twisted's
    # transports ignore reads and writes from the abort on, so a producer
    # resumed then (a relay's peer draining) must not bring reads back.
    def _start_reading(self) -> None:
        if not self._reading and self.socket is not None and not self._aborting:
            self._reading = True
            self.reactor.addReader(self)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self.reactor.removeReader(self)

    def _start_writing(self) -> None:
        if not self._writing and self.socket is not None and not self._aborting:
            self._writing = True
            self.reactor.addWriter(self)

    def _stop_writing(self) -> None:
        if self._writing:
            self._writing = False
            self.reactor.removeWriter(self)

    # Half-closes

    def _input_ended(self, reason: Failure) -> None:
        if self._reading:
            self._reading = False
            self.reactor.removeReader(self)
        self._read_done = True
        protocol = self.protocol
        half = protocol if _HALF_CLOSEABLE.get(protocol.__class__) else _half_closeable(protocol)
        if half is None:
            self.connectionLost(reason)
            return
        try:
            half.readConnectionLost()
        except BaseException:
            _log.failure("in readConnectionLost of {protocol!r}", protocol=protocol)
            self.connectionLost(Failure())

    def _close_write(self) -> None:
        try:
            self.socket.shutdown(socket.SHUT_WR)  # type: ignore[union-attr]
        except OSError:
            pass
        protocol = self.protocol
        half = protocol if _HALF_CLOSEABLE.get(protocol.__class__) else _half_closeable(protocol)
        if half is not None:
            try:
                half.writeConnectionLost()
            except BaseException:
                _log.failure("in writeConnectionLost of {protocol!r}", protocol=protocol)
                self.connectionLost(Failure())

    def startTLS(self, ctx: Any, normal: bool = True) -> None:
        raise NotImplementedError("TLS runs on Twisted's own transports, not on ssx.net.lean's")

    # Socket options and addresses

    def getHandle(self) -> socket.socket | None:
        """The socket (None once closed)."""
        return self.socket

    def getTcpNoDelay(self) -> bool:
        return bool(self.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))  # type: ignore[union-attr]

    def setTcpNoDelay(self, enabled: bool) -> None:
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, enabled)  # type: ignore[union-attr]
        except OSError:
            pass  # as Twisted: a small optimisation, which nobody could do anything about

    def getTcpKeepAlive(self) -> bool:
        return bool(self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))  # type: ignore[union-attr]

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, enabled)  # type: ignore[union-attr]

    def getHost(self) -> Any:
        raise NotImplementedError

    def getPeer(self) -> Any:
        raise NotImplementedError
