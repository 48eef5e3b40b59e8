"""
The local end's UDP relays: SOCKS5 UDP ASSOCIATE and UDP tunnels.

An application's datagram is turned into the Shadowsocks UDP plaintext
(`ATYP ADDR PORT DATA`: the SOCKS5 header stripped, or the tunnel's fixed
target put in front), sealed (`IUdpClientCodec.seal`, a codec per
application) and sent to the server from a socket kept for that application
address in a `NatTable`, connected to the server so nothing else can answer
on it.  The server's datagrams come
back on that socket, are opened and handed to the application (with the
SOCKS5 header, or bare for a tunnel).  Bad datagrams are dropped and counted.

With a picker (`IServerPicker`), the server is chosen per application
address: the picker's best server with an address, when its socket is
opened.  When that server is marked down (health check, failed TCP
connections) and the picker prefers another, the application's next
datagram opens a socket to the other one; without a picker, every
datagram goes to the one server given.  UDP never goes through a SIP003
plugin: it goes to the server's own address and port.  With an ACL
(`ssx.local.routing`), datagrams to direct targets go from the
application's own socket towards them (`_DirectSocket`, in the `direct`
table), and their answers come back the same way.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable

from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from ssx.wire.address import Address, decode_address, encode_address, is_ip_literal
from ssx.interfaces import ICipherSuite, IServerPicker, ITrafficCounter, IUpstream
from ssx.errors import ProtocolError
from ssx.local.routing import AclRouter
from ssx.net.nat import MAX_DATAGRAM, READ_SIZE, NatTable, SweptNatProtocol, send_datagram
from ssx.net.transparent import set_mark
from ssx.wire.socks5 import UDP_HEADER, udp_to_shadowsocks

__all__ = ["LocalUdpRelay", "Socks5Association", "Socks5UdpRelay", "TunnelUdpRelay"]

_log = Logger()

# Datagrams held per application while the server's name resolves.
_PENDING_LIMIT = 32


class _ServerSocket(DatagramProtocol):
    """One application's socket towards the server."""

    noisy = False

    def __init__(
        self,
        relay: "LocalUdpRelay",
        client: tuple,
        suite: ICipherSuite,
        server: tuple[str, int],
        upstream: IUpstream | None = None,
    ) -> None:
        self.relay = relay
        self.client = client
        self.server = server
        # The picker's server this socket goes to (None: the relay's fixed one).
        self.upstream = upstream
        # Per application: 2022 sessions carry state (session and packet IDs).
        self.codec = suite.udp_client_codec()
        self.port: Any = None
        # The connected socket's own send once open: a datagram then costs
        # one call, not Twisted's checks in `Port.write`.
        self._send: Callable[[bytes], Any] | None = None
        self._pending: list[bytes] | None = []

    def open(self) -> None:
        d = self.relay.server_ip(self.server[0])
        d.addCallbacks(self._connect, self._unresolved)

    def _connect(self, ip: str) -> None:
        if self._pending is None:  # closed meanwhile
            return
        try:
            self.port = self.relay.reactor.listenUDP(
                0, self, interface="::" if ":" in ip else "0.0.0.0", maxPacketSize=READ_SIZE
            )
            if self.relay.mark is not None:
                set_mark(self.port.socket, self.relay.mark)
            self.port.connect(ip, self.server[1])
            sock = getattr(self.port, "socket", None)
            self._send = self.port.write if sock is None else sock.send
        except (CannotListenError, OSError) as e:
            _log.warn("UDP: cannot open a socket to the server: {error}", error=e)
            self.relay.dropped += len(self._pending)
            self.relay.nat.remove(self.client)
            return
        pending, self._pending = self._pending, []
        for packet in pending:
            self.send(packet)

    def _unresolved(self, failure: Any) -> None:
        if self._pending is not None:
            self.relay.dropped += len(self._pending)
            _log.info("UDP: cannot resolve the server {host}: {error}", host=self.server[0], error=failure.getErrorMessage())
            self.relay.nat.remove(self.client)

    def send(self, packet: bytes) -> None:
        send = self._send
        if send is None:
            if self.port is None and self._pending is not None and len(self._pending) < _PENDING_LIMIT:
                self._pending.append(packet)
            else:
                self.relay.dropped += 1
            return
        try:
            send(packet)
        except OSError:
            # Also a refusal (ICMP) reported for an earlier datagram: this one was not sent.
            self.relay.dropped += 1

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.relay.from_server(self.client, data)

    def connectionRefused(self) -> None:
        # ICMP port unreachable from the server: nothing to do but wait.
        pass

    def close(self) -> None:
        self._pending = None
        self._send = None
        if self.port is not None:
            port, self.port = self.port, None
            port.stopListening()


class _DirectSocket(DatagramProtocol):
    """
    One application's socket towards the targets the ACL sends direct: not
    connected (each datagram names its target), one port per address family,
    opened when first needed; a target's datagrams come back on it.
    """

    noisy = False

    def __init__(self, relay: "LocalUdpRelay", client: tuple) -> None:
        self.relay = relay
        self.client = client
        self._ports: dict[int, Any] = {}
        self._closed = False

    def send(self, target: Address, payload: bytes) -> None:
        if is_ip_literal(target.host):
            self._send_to(target.host, target.port, payload)
            return
        d = self.relay.reactor.resolve(target.host)
        d.addCallbacks(self._send_to, self._unresolved, callbackArgs=(target.port, payload))

    def _unresolved(self, failure: Any) -> None:
        self.relay.dropped += 1

    def _send_to(self, ip: str, port: int, payload: bytes) -> None:
        if self._closed:
            return
        family = 6 if ":" in ip else 4
        listening = self._ports.get(family)
        try:
            if listening is None:
                listening = self.relay.reactor.listenUDP(
                    0, _DirectPort(self), interface="::" if family == 6 else "0.0.0.0", maxPacketSize=READ_SIZE,
                )
                if self.relay.mark is not None:
                    # As the server sockets: unmarked, a transparent proxy's firewall would divert it back.
                    try:
                        set_mark(listening.socket, self.relay.mark)
                    except OSError:
                        listening.stopListening()
                        raise
                self._ports[family] = listening
            listening.write(payload, (ip, port))
        except (CannotListenError, OSError):
            self.relay.dropped += 1

    def from_target(self, data: bytes, addr: Any) -> None:
        self.relay.from_direct(self.client, Address(_plain_ip(addr[0]), addr[1]), data)

    def close(self) -> None:
        self._closed = True
        ports, self._ports = self._ports, {}
        for port in ports.values():
            port.stopListening()


class _DirectPort(DatagramProtocol):
    """One family's port of a `_DirectSocket` (a protocol per port: Twisted binds one to each)."""

    noisy = False

    def __init__(self, owner: _DirectSocket) -> None:
        self.owner = owner

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.owner.from_target(data, addr)

    def connectionRefused(self) -> None:
        pass


class LocalUdpRelay(SweptNatProtocol, DatagramProtocol):
    """
    The shared part of the local UDP relays; subclasses say which
    applications are accepted and how their datagrams map to Shadowsocks
    plaintext and back.
    """

    noisy = False
    # The firewall mark (SO_MARK) of the sockets to the servers and to
    # direct targets (None: unmarked).
    mark: int | None = None

    def __init__(
        self,
        reactor: Any,
        suite: ICipherSuite,
        server: tuple[str, int],
        timeout: float = 60.0,
        capacity: int = 1024,
        picker: IServerPicker | None = None,
        router: AclRouter | None = None,
    ) -> None:
        self.setup_nat(reactor, timeout, capacity)
        self.suite = suite
        self.server = server
        self.picker = picker
        self._server_ips: dict[str, str] = {}
        # With metrics on: each server's counter of the Shadowsocks
        # plaintext (target address and payload) sent and received.
        self.server_traffic: Callable[[IUpstream], ITrafficCounter] | None = None
        # With an ACL: the applications' sockets to direct targets, in a
        # table of their own, and how many datagrams went each way.
        self.router = router
        self.direct: NatTable[Any, _DirectSocket] = NatTable(
            reactor.seconds, timeout, capacity, on_evict=lambda key, value: value.close()
        )
        self._direct_sweeper: Any = None
        self.acl_proxied = 0
        self.acl_direct = 0

    def startProtocol(self) -> None:
        SweptNatProtocol.startProtocol(self)
        if self.router is not None:
            from twisted.internet.task import LoopingCall

            self._direct_sweeper = LoopingCall(self.direct.sweep)
            self._direct_sweeper.clock = self.reactor
            self._direct_sweeper.start(max(1.0, min(self.direct.timeout / 4, 15.0)), now=False)

    def stopProtocol(self) -> None:
        SweptNatProtocol.stopProtocol(self)
        if self._direct_sweeper is not None and self._direct_sweeper.running:
            self._direct_sweeper.stop()
        self.direct.clear()

    def server_ip(self, host: str | None = None) -> Any:
        """A Deferred IP for a server's host, the fixed server's by default (resolved once, then remembered)."""
        from twisted.internet.defer import succeed

        if host is None:
            host = self.server[0]
        known = self._server_ips.get(host)
        if known is not None:
            return succeed(known)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            d = self.reactor.resolve(host)

            def remember(ip: str) -> str:
                self._server_ips[host] = ip
                return ip

            return d.addCallback(remember)
        self._server_ips[host] = host
        return succeed(host)

    def choose(self) -> tuple[IUpstream | None, ICipherSuite, tuple[str, int]]:
        """Where a new application's datagrams go: the picker's best server with an address, or the fixed one."""
        if self.picker is not None:
            for upstream in self.picker.candidates():
                entry = upstream.entry
                if entry.host:  # not a --server-endpoint alone
                    return upstream, upstream.suite, (entry.host, entry.port)
        return None, self.suite, self.server

    def _still_chosen(self, sock: _ServerSocket) -> bool:
        """Whether an application's socket may go on to its server: up, or no better one."""
        if sock.upstream is None or self.picker is None:
            return True
        try:
            up = self.picker.health(sock.upstream)[0]
        except KeyError:  # dropped by an online config refresh
            return False
        return up or self.choose()[0] is sock.upstream

    # What subclasses decide.
    def accepts(self, client: tuple) -> bool:
        return True

    def to_server(self, datagram: bytes) -> bytes:
        """The Shadowsocks plaintext for an application's datagram (ProtocolError to drop it)."""
        raise NotImplementedError

    def to_client(self, plaintext: bytes) -> bytes:
        """The datagram for the application from the server's plaintext (ProtocolError to drop it)."""
        raise NotImplementedError

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.received += 1
        try:
            plaintext = self.to_server(data)
        except ProtocolError:
            self.dropped += 1
            return
        # After parsing: a malformed datagram must not claim an association.
        if not self.accepts(addr):
            self.dropped += 1
            return
        if self.router is not None and not self._through_server(addr, plaintext):
            return
        sock = self.nat.get(addr)
        if sock is not None and not self._still_chosen(sock):
            _log.info("UDP: {client} moves to server {server}", client=addr, server=self.choose()[2])
            self.nat.remove(addr)  # closes its socket
            sock = None
        if sock is None:
            upstream, suite, server = self.choose()
            sock = _ServerSocket(self, addr, suite, server, upstream)
            self.nat.add(addr, sock)
            sock.open()
        try:
            packet = sock.codec.seal(plaintext)
        except ProtocolError:
            self.dropped += 1
            return
        if len(packet) > MAX_DATAGRAM:
            self.dropped += 1
            return
        sock.send(packet)
        if self.server_traffic is not None and sock.upstream is not None:
            self.server_traffic(sock.upstream).add_up(len(plaintext))

    def _through_server(self, client: tuple, plaintext: bytes) -> bool:
        """Whether the datagram goes to the server; if the ACL sends it direct, send it."""
        assert self.router is not None
        parsed = decode_address(plaintext)
        if parsed is None:  # pragma: no cover (to_server built or checked it)
            return True
        target, end = parsed
        if self.router.route_now(target).proxied:
            self.acl_proxied += 1
            return True
        self.acl_direct += 1
        sock = self.direct.get(client)
        if sock is None:
            sock = _DirectSocket(self, client)
            self.direct.add(client, sock)
        sock.send(target, plaintext[end:])
        return False

    def from_direct(self, client: tuple, source: Address, data: bytes) -> None:
        """A direct target's datagram for the application at `client`."""
        if self.transport is None or self.direct.peek(client) is None:
            return
        try:
            datagram = self.to_client(encode_address(source) + data)
        except ProtocolError:
            self.dropped += 1
            return
        self.direct.touch(client)
        try:
            send_datagram(self.transport, datagram, client)
        except OSError:
            self.dropped += 1

    def from_server(self, client: tuple, packet: bytes) -> None:
        sock = self.nat.peek(client)
        if self.transport is None or sock is None:
            return
        try:
            plaintext = sock.codec.open(packet)
            datagram = self.to_client(plaintext)
        except ProtocolError:
            self.dropped += 1
            return
        if self.server_traffic is not None and sock.upstream is not None:
            self.server_traffic(sock.upstream).add_down(len(plaintext))
        self.nat.touch(client)
        try:
            (self._sendto or self.bind_sender())(datagram, client)
        except OSError:
            self.dropped += 1


class Socks5Association:
    """
    One SOCKS5 UDP ASSOCIATE: the application address (IP, port) whose
    datagrams it relays.  The IP is the control connection's; the port is
    the one the request named, or else that of the first datagram from the
    IP that no other association holds.
    """

    __slots__ = ("ip", "port")

    def __init__(self, ip: str, port: int | None) -> None:
        self.ip = ip
        #: None until known.
        self.port = port

    def __repr__(self) -> str:
        return f"<Socks5Association {self.ip} port {self.port}>"


class Socks5UdpRelay(LocalUdpRelay):
    """
    The UDP side of SOCKS5 UDP ASSOCIATE: each association (TCP control
    connection) owns one application address, and datagrams from any
    other address are dropped and counted in `unassociated`, so a process
    that did not authenticate cannot use another's association even from
    the same IP.  When the control connection ends, so does the
    association, with its NAT entry.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (IP, port) -> the association that owns the address.
        self._owners: dict[tuple[str, int], Socks5Association] = {}
        # IP -> associations that have not seen their first datagram, oldest first.
        self._waiting: dict[str, list[Socks5Association]] = {}
        #: Datagrams from an address no association owns.
        self.unassociated = 0

    def associate(self, ip: str, port: int | None = None) -> Socks5Association | None:
        """
        A new association for the application at `ip` sending from `port`
        (None: its first datagram will tell); None if another association
        owns that address already.
        """
        ip = _plain_ip(ip)
        if port is None:
            association = Socks5Association(ip, None)
            self._waiting.setdefault(ip, []).append(association)
            return association
        if (ip, port) in self._owners:
            return None
        association = Socks5Association(ip, port)
        self._owners[(ip, port)] = association
        return association

    def dissociate(self, association: Socks5Association) -> None:
        """End `association`: its address's datagrams are dropped from now on."""
        if association.port is None:
            waiting = self._waiting.get(association.ip, [])
            if association in waiting:
                waiting.remove(association)
            if not waiting:
                self._waiting.pop(association.ip, None)
            return
        address = (association.ip, association.port)
        if self._owners.get(address) is association:
            del self._owners[address]
            for table in (self.nat, self.direct):
                for client in table:
                    if _plain_address(client) == address:
                        table.remove(client)

    def active(self, association: Socks5Association) -> bool:
        """Whether `association`'s application used UDP within the timeout."""
        if association.port is None:
            return False
        address = (association.ip, association.port)
        return any(_plain_address(client) == address for client in (*self.nat, *self.direct))

    def accepts(self, client: tuple) -> bool:
        """Whether `client` owns an association, or now claims the oldest one waiting at its IP."""
        if client in self._owners:
            # An (IP, port) pair already in its plain form (the keys are,
            # and no other source tuple equals one): the common case.
            return True
        address = _plain_address(client)
        if address in self._owners:
            return True
        waiting = self._waiting.get(address[0])
        if not waiting:
            self.unassociated += 1
            return False
        association = waiting.pop(0)
        if not waiting:
            del self._waiting[address[0]]
        association.port = address[1]
        self._owners[address] = association
        return True

    def to_server(self, datagram: bytes) -> bytes:
        return udp_to_shadowsocks(datagram)

    def to_client(self, plaintext: bytes) -> bytes:
        return UDP_HEADER + plaintext


class TunnelUdpRelay(LocalUdpRelay):
    """A UDP port forward: every datagram goes to one fixed target through the server."""

    def __init__(self, reactor: Any, suite: ICipherSuite, server: tuple[str, int], target: Address, **kwargs: Any) -> None:
        super().__init__(reactor, suite, server, **kwargs)
        self.target = target
        self._header = encode_address(target)

    def to_server(self, datagram: bytes) -> bytes:
        return self._header + datagram

    def to_client(self, plaintext: bytes) -> bytes:
        parsed = decode_address(plaintext)
        if parsed is None:
            raise ProtocolError("server datagram truncated inside its address")
        return plaintext[parsed[1]:]


def _plain_ip(ip: str) -> str:
    """IPv4-mapped IPv6 as plain IPv4, so both spellings of a client match."""
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


def _plain_address(client: tuple) -> tuple[str, int]:
    """(IP, port) of a datagram's source, whatever its tuple's form."""
    return _plain_ip(client[0]), client[1]
