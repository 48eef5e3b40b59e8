"""
Bare TCP forwarders: the floors under ssx's connection cost.

    python benchmarks/forwarders.py KIND LISTEN_PORT TARGET_PORT

Each accepts on 127.0.0.1:LISTEN_PORT, connects every accepted connection
to 127.0.0.1:TARGET_PORT, relays both ways and passes half-closes on; no
SOCKS5, no Shadowsocks, no encryption.  Two in a row are what an ssx chain
would cost if ssx did nothing but move bytes.  KIND:

* ``twisted``: Twisted's `listenTCP`/`connectTCP` (Port, Connector, their
  transports), the 30-line forwarder of RESULTS.md;
* ``lean``: the same protocols on ssx's connection path (`ssx.net.lean`'s
  port and connector, `ssx.net.tcp`'s send-at-once transports, ssx's
  reactor `ssx.net.reactor`);
* ``epoll``: no Twisted: one `select.epoll` loop over non-blocking sockets,
  the limit of a Python process on this machine.

Prints ``ready`` once listening; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import errno
import select
import signal
import socket
import sys
from typing import Any


def run_twisted(listen: int, target: int, lean: bool) -> None:
    if lean:
        from ssx.net.reactor import install

        install()
    else:
        from twisted.internet import epollreactor

        epollreactor.install()
    from twisted.internet import protocol, reactor
    from twisted.internet.interfaces import IHalfCloseableProtocol
    from zope.interface import implementer

    @implementer(IHalfCloseableProtocol)
    class Side(protocol.Protocol):
        peer: Any = None

        def dataReceived(self, data: bytes) -> None:
            self.peer.transport.write(data)

        def readConnectionLost(self) -> None:
            self.peer.transport.loseWriteConnection()

        def writeConnectionLost(self) -> None:
            self.transport.loseConnection()

        def connectionLost(self, reason: Any = None) -> None:
            if self.peer is not None:
                self.peer.transport.loseConnection()

    class Out(Side):
        def connectionMade(self) -> None:
            self.peer.peer = self
            self.peer.transport.resumeProducing()

    class OutFactory(protocol.ClientFactory):
        noisy = False

        def __init__(self, inbound: Side) -> None:
            self.inbound = inbound

        def buildProtocol(self, addr: Any) -> Out:
            out = Out()
            out.peer = self.inbound
            return out

        def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
            self.inbound.transport.loseConnection()

    if lean:
        from ssx.net import lean as lean_path

        def connect(factory: OutFactory) -> None:
            lean_path.LeanConnector(reactor, "127.0.0.1", target, factory, 10).connect()
    else:
        def connect(factory: OutFactory) -> None:
            reactor.connectTCP("127.0.0.1", target, factory, timeout=10)

    class In(Side):
        def connectionMade(self) -> None:
            self.transport.pauseProducing()
            connect(OutFactory(self))

    class InFactory(protocol.Factory):
        noisy = False
        protocol = In

    if lean:
        lean_path.listen_port(reactor, listen, InFactory(), 1024, "127.0.0.1")
    else:
        reactor.listenTCP(listen, InFactory(), 1024, "127.0.0.1")
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(reactor.stop))
    reactor.callWhenRunning(lambda: print("ready", flush=True))
    reactor.run()


class _Side:
    """One socket of a raw pair: what waits to be sent to it, whether its peer's EOF came."""

    __slots__ = ("sock", "fd", "peer", "pending", "eof_in", "shut_out", "closed")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer: _Side | None = None
        self.pending = b""
        self.eof_in = False
        self.shut_out = False
        self.closed = False


def run_epoll(listen: int, target: int) -> None:
    ep = select.epoll()
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", listen))
    server.listen(1024)
    server.setblocking(False)
    ep.register(server.fileno(), select.EPOLLIN)
    sides: dict[int, _Side] = {}
    connecting: dict[int, _Side] = {}
    IN, OUT = select.EPOLLIN, select.EPOLLOUT
    running = [True]
    signal.signal(signal.SIGTERM, lambda *_: running.__setitem__(0, False))

    def close(side: _Side) -> None:
        for s in (side, side.peer):
            if s is not None and not s.closed:
                s.closed = True
                sides.pop(s.fd, None)
                connecting.pop(s.fd, None)
                try:
                    ep.unregister(s.fd)
                except OSError:
                    pass
                s.sock.close()

    def interest(side: _Side) -> None:
        mask = 0 if side.eof_in or (side.peer is not None and side.peer.pending) else IN
        if side.pending:
            mask |= OUT
        ep.modify(side.fd, mask)

    def send(side: _Side, data: bytes) -> None:
        if not side.pending:
            try:
                sent = side.sock.send(data)
            except BlockingIOError:
                sent = 0
            data = data[sent:]
        side.pending += data

    def maybe_finish(side: _Side) -> None:
        peer = side.peer
        assert peer is not None
        if side.eof_in and not peer.pending and not peer.shut_out:
            peer.shut_out = True
            peer.sock.shutdown(socket.SHUT_WR)
        if side.eof_in and peer.eof_in and side.shut_out and peer.shut_out:
            close(side)

    print("ready", flush=True)
    while running[0]:
        try:
            events = ep.poll(1.0)
        except InterruptedError:
            continue
        for fd, mask in events:
            if fd == server.fileno():
                for _ in range(64):
                    try:
                        client, _addr = server.accept()
                    except BlockingIOError:
                        break
                    client.setblocking(False)
                    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    out = socket.socket()
                    out.setblocking(False)
                    out.connect_ex(("127.0.0.1", target))
                    a, b = _Side(client), _Side(out)
                    a.peer, b.peer = b, a
                    sides[a.fd] = a
                    connecting[b.fd] = b
                    ep.register(b.fd, OUT)
                continue
            side = connecting.pop(fd, None)
            if side is not None:
                if side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    close(side)
                    continue
                side.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sides[fd] = side
                ep.modify(fd, IN)
                assert side.peer is not None
                ep.register(side.peer.fd, IN)
                continue
            side = sides.get(fd)
            if side is None:
                continue
            peer = side.peer
            assert peer is not None
            if mask & OUT and side.pending:
                try:
                    sent = side.sock.send(side.pending)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    close(side)
                    continue
                side.pending = side.pending[sent:]
                interest(side)
                interest(peer)
                maybe_finish(peer)
                if side.closed:
                    continue
            if mask & (IN | select.EPOLLHUP | select.EPOLLERR) and not side.eof_in:
                try:
                    data = side.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as e:
                    if e.errno != errno.EAGAIN:
                        close(side)
                    continue
                if data:
                    try:
                        send(peer, data)
                    except OSError:
                        close(side)
                        continue
                else:
                    side.eof_in = True
                interest(side)
                interest(peer)
                maybe_finish(side)


def main() -> None:
    kind, listen, target = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if kind == "epoll":
        run_epoll(listen, target)
    elif kind in ("twisted", "lean"):
        run_twisted(listen, target, lean=kind == "lean")
    else:
        sys.exit(f"unknown forwarder {kind!r}: twisted, lean or epoll")


if __name__ == "__main__":
    main()
