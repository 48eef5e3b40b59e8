"""
The server end's UDP relay (full-cone NAT).

Each datagram from a client is opened (`CipherSuite.udp_open`), its target
address parsed, resolved and checked against the forbidden networks, and its
payload sent from the client's own outgoing socket.  Whatever arrives on that
socket, from any source, goes back to the client sealed with the source's
address in front.  Clients live in a `NatTable` (bounded, idle entries swept
on the reactor clock), so a flood of client addresses costs at most its
capacity in sockets.  Bad datagrams are dropped and counted, never answered.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from ssx.wire.address import Address, decode_target, encode_address
from ssx.crypto import CipherSuite
from ssx.errors import ProtocolError
from ssx.server.forbidden import ForbiddenNetworks, is_ip_literal
from ssx.net.nat import SweptNatProtocol, send_datagram
from ssx.net.resolver import TargetResolver

__all__ = ["MAX_DATAGRAM", "READ_SIZE", "Shadowsocks2022UdpRelay", "ShadowsocksUdpRelay", "udp_relay_for"]

_log = Logger()

# The largest UDP payload an IPv4 datagram can carry.
MAX_DATAGRAM = 65507
# What every UDP socket of ours reads at once: Twisted's default (8192)
# would silently truncate larger datagrams.
READ_SIZE = 65535


class _ClientSockets:
    """A client's outgoing sockets, one per address family, opened on first use."""

    def __init__(self, relay: "ShadowsocksUdpRelay", client: tuple) -> None:
        self.relay = relay
        self.client = client
        self._ports: dict[int, Any] = {}

    def send(self, payload: bytes, ip: str, port: int) -> None:
        version = 6 if ":" in ip else 4
        transport = self._ports.get(version)
        if transport is None:
            protocol = _Upstream(self)
            try:
                transport = self.relay.reactor.listenUDP(
                    0, protocol, interface="::" if version == 6 else "0.0.0.0", maxPacketSize=READ_SIZE
                )
            except CannotListenError as e:
                self.relay.dropped += 1
                _log.warn("UDP: cannot open an outgoing socket: {error}", error=e.socketError)
                return
            self._ports[version] = transport
        try:
            send_datagram(transport, payload, (ip, port))
        except OSError:
            self.relay.dropped += 1

    def close(self) -> None:
        ports, self._ports = self._ports, {}
        for port in ports.values():
            port.stopListening()


class _Upstream(DatagramProtocol):
    """Replies from targets to one client, relayed back sealed with their source address."""

    noisy = False

    def __init__(self, sockets: _ClientSockets) -> None:
        self.sockets = sockets

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        host, port = addr[0], addr[1]
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        self.sockets.relay.reply(self.sockets.client, Address(host.split("%", 1)[0], port), data)


class ShadowsocksUdpRelay(SweptNatProtocol, DatagramProtocol):
    """The server's UDP port: one instance per bound address."""

    noisy = False

    def __init__(
        self,
        reactor: Any,
        suite: CipherSuite,
        resolver: TargetResolver,
        forbidden: ForbiddenNetworks,
        timeout: float = 60.0,
        capacity: int = 1024,
        salt_filter: Any = None,
    ) -> None:
        self.setup_nat(reactor, timeout, capacity)
        # Replayed datagrams (same salt/IV) are dropped like forged ones.
        self.salt_filter = salt_filter if suite.spec.family != "aead2022" and suite.spec.salt_size else None
        self.suite = suite
        self.resolver = resolver
        self.forbidden = forbidden
        self.refused = 0

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.received += 1
        try:
            plaintext = self.suite.udp_open(data)
            parsed = decode_target(plaintext)
        except ProtocolError:
            self.dropped += 1
            return
        if parsed is None:
            self.dropped += 1
            return
        if self.salt_filter is not None and not self.salt_filter.check_and_add(data[: self.suite.spec.salt_size]):
            self.dropped += 1
            return
        target, end = parsed
        payload = plaintext[end:]
        sockets = self.nat.get(addr)
        if sockets is None:
            sockets = _ClientSockets(self, addr)
            self.nat.add(addr, sockets)
        self._route(addr, target, payload)

    def _route(self, key: Any, target: Address, payload: bytes) -> None:
        """Send `payload` for the NAT entry `key` to `target`, resolving a name first."""
        if is_ip_literal(target.host):
            self._send(key, target, [target.host], payload)
        else:
            d = self.resolver.resolve(target.host)
            d.addCallbacks(lambda ips: self._send(key, target, ips, payload), lambda _: self._unresolved())

    def _unresolved(self) -> None:
        self.dropped += 1

    def _send(self, client: tuple, target: Address, ips: list[str], payload: bytes) -> None:
        allowed = [ip for ip in ips if not self.forbidden.forbids(ip)]
        if not allowed:
            _log.debug("UDP: refused {target}: forbidden address {ips}", target=target, ips=",".join(ips))
            self.refused += 1
            return
        sockets = self.nat.peek(client)
        if sockets is not None:
            sockets.send(payload, allowed[0], target.port)

    def reply(self, client: tuple, source: Address, data: bytes) -> None:
        """A target's datagram for `client`: sealed with its source address and sent back."""
        if self.transport is None or client not in self.nat:
            return
        self.nat.touch(client)
        # Our own salts are recognisable: a captured reply sent back is a replay.
        salt = self.salt_filter.own_salt(self.suite.spec.salt_size) if self.salt_filter is not None else None
        packet = self.suite.udp_seal(encode_address(source) + data, salt)
        if len(packet) > MAX_DATAGRAM:
            self.dropped += 1
            return
        try:
            send_datagram(self.transport, packet, client)
        except OSError:
            self.dropped += 1


class _Session:
    """A 2022 client session (key: user, session ID): its reply side, replay window, latest address and sockets."""

    def __init__(self, relay: "Shadowsocks2022UdpRelay", key: tuple, client: tuple, reply_session: Any) -> None:
        self.client = client
        self.reply_session = reply_session
        self.window = relay.suite.replay_window()
        self.sockets = _ClientSockets(relay, key)

    def send(self, payload: bytes, ip: str, port: int) -> None:
        self.sockets.send(payload, ip, port)

    def close(self) -> None:
        self.sockets.close()


class Shadowsocks2022UdpRelay(ShadowsocksUdpRelay):
    """
    The 2022 edition's UDP port: sessions are keyed by the user a packet
    authenticated as and the client's session ID, not its address, so a
    client that moves keeps its session (replies go to the latest address
    that sent a valid packet); each session drops replayed or too old
    packet IDs.  The session ID travels under the port's PSK, which every
    user of a multi-user port holds: without the user in the key, one user
    could move another's session (and its replies) to itself.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._decoder = self.suite.udp_server_decoder()

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.received += 1
        try:
            packet = self._decoder.decode(data)
        except ProtocolError:
            self.dropped += 1
            return
        key = (packet.user, packet.session_id)
        session = self.nat.get(key)
        if session is None:
            session = _Session(self, key, addr, self._decoder.session(packet))
            self.nat.add(key, session)
        if not session.window.accept(packet.packet_id):
            self.dropped += 1
            return
        session.client = addr
        target = packet.address
        self._route(key, target, packet.payload)

    def reply(self, client: Any, source: Address, data: bytes) -> None:
        session = self.nat.peek(client)
        if self.transport is None or session is None:
            return
        self.nat.touch(client)
        packet = session.reply_session.encode(source, data)
        if len(packet) > MAX_DATAGRAM:
            self.dropped += 1
            return
        try:
            send_datagram(self.transport, packet, session.client)
        except OSError:
            self.dropped += 1


def udp_relay_for(suite: Any) -> type[ShadowsocksUdpRelay]:
    """The server UDP relay class for a suite's edition."""
    return Shadowsocks2022UdpRelay if suite.spec.family == "aead2022" else ShadowsocksUdpRelay
