"""
The server end's UDP relay (full-cone NAT).

`UdpRelay` is what both editions share; `ShadowsocksUdpRelay` (stream and
AEAD-2017) and `Shadowsocks2022UdpRelay` open and seal datagrams in their
edition's framing, and `udp_relay_for` picks one for a suite.

Each datagram from a client is opened with the port's keys (the
`KeyRing` of its `PortCredentials`, which tries each key on a port of
several; the key that opened it seals the replies), its target
address parsed, resolved and checked against the ACL's outbound lists and
the forbidden networks (a client the ACL refuses is dropped unread), and its
payload sent from the client's own outgoing socket.  Whatever arrives on that
socket, from any source, goes back to the client sealed with the source's
address in front.  Clients live in a `NatTable` (bounded, idle entries swept
on the reactor clock), so a flood of client addresses costs at most its
capacity in sockets.  Target names are looked up through `UdpLookups`,
which bounds the look-ups in flight (each costs sockets) and lets datagrams
for the same name wait on one.  Bad datagrams are dropped and counted,
never answered.  The payloads of a named key's or user's datagrams are
counted under its id in the per-user accounting, as its TCP bytes are.
With metrics on (`ssx.server.metrics`), each datagram's key search is
timed through `observe_key_search`; off, it costs an attribute test.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import filterfalse
import time
from typing import Any, Callable, Generic, TypeVar

from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ssx.wire.address import ATYP_DOMAIN, Address, decode_target, encode_address
from ssx.crypto import CipherSuite, Suite2022
from ssx.errors import ProtocolError, ReplayError
from ssx.interfaces import ITrafficCounter, IUserTrafficSink
from ssx.server.credentials import PortCredentials, credentials_of
from ssx.server.session_windows import SessionState, SessionWindows
from ssx.net.acl_holder import AclHolder
from ssx.server.forbidden import ForbiddenNetworks
from ssx.wire.address import is_ip_literal
from ssx.net.nat import MAX_DATAGRAM, READ_SIZE, SweptNatProtocol, datagram_sender
from ssx.net.resolver import TargetResolver
from ssx.net.outbound import Outbound
from ssx.net.quiet_udp import listen_udp

__all__ = [
    "Shadowsocks2022UdpRelay",
    "ShadowsocksUdpRelay",
    "UdpLookups",
    "UdpRelay",
    "udp_relay_for",
]

_log = Logger()



class _ClientSockets:
    """A client's outgoing sockets, one per address family, opened on first use."""

    def __init__(self, relay: "UdpRelay", client: tuple) -> None:
        self.relay = relay
        self.client = client
        # The suite of the key the client's latest datagram opened with (AEAD-2017).
        self.suite: Any = None
        # That key's per-user counter (keys with an id), else None.
        self.user: ITrafficCounter | None = None
        # The key's id, for the metrics' labels ("" where a port has one key).
        self.user_name = ""
        self._ports: dict[int, Any] = {}
        # version -> that port's `datagram_sender`: one call per datagram.
        self._senders: dict[int, Callable[[bytes, tuple], Any]] = {}

    def send(self, payload: bytes, ip: str, port: int) -> None:
        version = 6 if ":" in ip else 4
        sendto = self._senders.get(version)
        if sendto is None:
            protocol = _Upstream(self)
            try:
                # Quiet: one per association a client starts, which must not cost log lines.
                outbound = self.relay.outbound
                if outbound is None:
                    transport = listen_udp(
                        self.relay.reactor, 0, protocol, interface="::" if version == 6 else "0.0.0.0",
                        maxPacketSize=READ_SIZE,
                    )
                else:
                    # From the configured source address of the family, on a port the OS picks.
                    source = outbound.ipv6 if version == 6 else outbound.ipv4
                    transport = listen_udp(
                        self.relay.reactor, 0, protocol,
                        interface=source if source is not None else "::" if version == 6 else "0.0.0.0",
                        maxPacketSize=READ_SIZE, device=outbound.device,
                    )
            except CannotListenError as e:
                relay = self.relay
                relay.dropped += 1
                relay.socket_failures += 1
                # Clients can cause this over and over (out of descriptors):
                # the first is worth a line, the rest are in the summary.
                if relay.socket_failures == 1 or relay.verbose:
                    _log.warn("UDP: cannot open an outgoing socket: {error}", error=e.socketError)
                return
            self._ports[version] = transport
            sendto = self._senders[version] = datagram_sender(transport)
        try:
            sendto(payload, (ip, port))
        except OSError:
            self.relay.dropped += 1

    def close(self) -> None:
        self._senders = {}
        ports, self._ports = self._ports, {}
        for port in ports.values():
            port.stopListening()


class _Upstream(DatagramProtocol):
    """Replies from targets to one client, relayed back sealed with their source address."""

    noisy = False

    def __init__(self, sockets: _ClientSockets) -> None:
        self.sockets = sockets

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.sockets.relay.reply(self.sockets.client, _source_address(addr[0], addr[1]), data)


@lru_cache(maxsize=1024)
def _source_address(host: str, port: int) -> Address:
    # A target's answers come from the same few addresses over and over:
    # the plain IP text (IPv4-mapped as IPv4, no IPv6 zone) is made once.
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return Address(host.split("%", 1)[0], port)


@lru_cache(maxsize=1024)
def _reply_header(host: str, port: int) -> bytes:
    # The wire form of `_source_address`'s results, made once for each
    # (cached by host and port: hashing those is done in C, hashing an
    # `Address` calls its Python `__hash__`).
    return encode_address(Address(host, port))


# The bounds of `UdpLookups`.  A name in flight costs two sockets (A and
# AAAA are asked at once) for at most the query timeouts; a waiting
# datagram costs its payload, up to 64 KiB.  A legitimate association
# rarely waits on more than a few new names at once (names it used lately
# come from the cache, uncounted).
MAX_LOOKUPS = 64
MAX_WAITING_PER_ASSOCIATION = 16
MAX_WAITING = 512


class UdpLookups:
    """
    The target-name look-ups of one server's UDP relays.

    Datagrams naming a name already being looked up wait on that look-up
    (one query for any number of datagrams).  At most `limit` names are
    looked up at once, at most `per_association` datagrams of one
    association (a relay's NAT key) wait, and at most `waiting_limit` in
    all; a datagram beyond any bound is dropped and counted by its relay.
    Names the resolver knows without DNS (hosts file, cache) go through at
    once and count against nothing.

    twisted.names opens a socket for every query, on a random source port.
    That is kept, rather than one socket shared by all queries: the random
    port adds about 16 bits to the 16-bit query ID that an off-path
    attacker must guess to forge an answer (and so steer a client's
    datagrams where it likes), and the bound on names in flight already
    bounds those sockets, at 2 * `limit` (a retry closes its socket before
    opening the next).
    """

    def __init__(
        self,
        resolver: TargetResolver,
        limit: int = MAX_LOOKUPS,
        per_association: int = MAX_WAITING_PER_ASSOCIATION,
        waiting_limit: int = MAX_WAITING,
    ) -> None:
        self.resolver = resolver
        self.limit = limit
        self.per_association = per_association
        self.waiting_limit = waiting_limit
        # name -> the datagrams waiting on its look-up
        self._names: dict[str, list[tuple[UdpRelay, Any, Address, bytes]]] = {}
        self._per_association: dict[tuple[UdpRelay, Any], int] = {}
        self.waiting = 0

    def __len__(self) -> int:
        """Names being looked up."""
        return len(self._names)

    def route(self, relay: "UdpRelay", key: Any, target: Address, payload: bytes) -> None:
        """Send `payload` for `relay`'s association `key` to the domain-name `target`, once it resolves."""
        ips = self.resolver.known(target.host)
        if ips is not None:
            relay._send(key, target, ips, payload)
            return
        association = (relay, key)
        held = self._per_association.get(association, 0)
        name = target.host.lower()
        waiters = self._names.get(name)
        if (
            held >= self.per_association
            or self.waiting >= self.waiting_limit
            or (waiters is None and len(self._names) >= self.limit)
        ):
            relay.dropped += 1
            return
        start = waiters is None
        if waiters is None:
            waiters = self._names[name] = []
        waiters.append((relay, key, target, payload))
        self._per_association[association] = held + 1
        self.waiting += 1
        if start:
            self.resolver.resolve(target.host).addBoth(self._resolved, name)

    def _resolved(self, result: Any, name: str) -> None:
        for relay, key, target, payload in self._names.pop(name, []):
            association = (relay, key)
            left = self._per_association.pop(association) - 1
            if left:
                self._per_association[association] = left
            self.waiting -= 1
            if isinstance(result, Failure):
                relay._unresolved()
                continue
            try:
                relay._send(key, target, result, payload)
            except Exception:
                # One datagram's failure must not strand the others.
                _log.failure("UDP: sending a datagram whose target was looked up")


_Suite = TypeVar("_Suite", CipherSuite, Suite2022)


class UdpRelay(SweptNatProtocol, DatagramProtocol, Generic[_Suite]):
    """
    The server's UDP port, one instance per bound address, whichever the
    edition: the NAT of clients' outgoing sockets, target look-ups, the
    forbidden check and the counters.  Subclasses open clients' datagrams
    with their edition's `suite` and seal the replies.
    """

    noisy = False

    def __init__(
        self,
        reactor: Any,
        suite: _Suite | PortCredentials,
        resolver: TargetResolver,
        forbidden: ForbiddenNetworks,
        timeout: float = 60.0,
        capacity: int = 1024,
        salt_filter: Any = None,
        lookups: UdpLookups | None = None,
        verbose: bool = False,
        traffic: ITrafficCounter | None = None,
        outbound: Outbound | None = None,
        user_traffic: IUserTrafficSink | None = None,
        acl: AclHolder | None = None,
    ) -> None:
        self.setup_nat(reactor, timeout, capacity)
        # The ACL's client and outbound lists, read at each decision (reloadable).
        self.acl = acl
        # Datagrams refused by the ACL: from refused clients, to refused targets.
        self.acl_clients_refused = 0
        self.acl_refused = 0
        # Where the associations' sockets send from (None: the wildcard address).
        self.outbound = outbound
        # The port's counter of encrypted bytes (the manager API's), if any.
        self.traffic = traffic
        # Where the payloads of named keys and users are counted, by id (as their TCP is).
        self.user_traffic = user_traffic
        # Replayed datagrams (same salt/IV) are dropped like forged ones;
        # the 2022 edition keeps a replay window per session instead.
        #: The port's keys; may be replaced while the relay runs.
        self.credentials = credentials_of(suite)
        spec = self.credentials.spec
        self.salt_filter = salt_filter if spec.family != "aead2022" and spec.salt_size else None
        self.resolver = resolver
        self.forbidden = forbidden
        # Shared by a server's relays, so that its bounds are the server's.
        self.lookups = lookups if lookups is not None else UdpLookups(resolver)
        self.verbose = verbose
        self.refused = 0
        self.socket_failures = 0
        # Datagrams whose target name did not resolve (also in `dropped`).
        self.unresolvable = 0
        # With metrics on: where each key's payload bytes to and from
        # targets are counted (None: not counted).
        self.payload_traffic: IUserTrafficSink | None = None
        # With metrics on: told how long each datagram's key search took
        # and whether a key opened it (None: not timed).
        self.observe_key_search: Callable[[float, bool], None] | None = None

    @property
    def suite(self) -> _Suite:
        """The suite of the port's first key (of its only key, on most ports)."""
        return self.credentials.ring.suite  # type: ignore[return-value]

    def reply(self, client: Any, source: Address, data: bytes) -> None:
        """A target's datagram for the NAT entry `client`, to be sealed and sent back."""
        raise NotImplementedError

    def _client_refused(self, addr: Any) -> bool:
        """Whether the ACL refuses the client at `addr` (its datagram is then dropped unread)."""
        acl = self.acl.acl if self.acl is not None else None
        if acl is None or not acl.checks_clients or acl.client_allowed(addr[0]):
            return False
        self.acl_clients_refused += 1
        return True

    def _acl_refuses(self, target: Address, ips: list[str] | None) -> bool:
        """The ACL's outbound check of `target`'s name (`ips` None: before resolving) or of its addresses."""
        if self.acl is None or not self.acl.refuses_target(target.host, ips):
            return False
        if self.verbose:
            _log.debug("UDP: refused {target}: ACL", target=target)
        self.acl_refused += 1
        return True

    def _route(self, key: Any, target: Address, payload: bytes) -> None:
        """Send `payload` for the NAT entry `key` to `target`, resolving a name first."""
        if self.acl is not None and not is_ip_literal(target.host) and self._acl_refuses(target, None):
            return
        if is_ip_literal(target.host):
            self._send(key, target, [target.host], payload)
        else:
            self.lookups.route(self, key, target, payload)

    def _unresolved(self) -> None:
        self.dropped += 1
        self.unresolvable += 1

    def _send(self, client: tuple, target: Address, ips: list[str], payload: bytes) -> None:
        if self.acl is not None and self._acl_refuses(target, ips):
            return
        # [ip for ip in ips if not forbids(ip)], in C: this runs for every datagram.
        allowed = list(filterfalse(self.forbidden.forbids, ips))
        if not allowed:
            # Counted for the summary; the destination is named only with verbose.
            if self.verbose:
                _log.debug("UDP: refused {target}: forbidden address {ips}", target=target, ips=",".join(ips))
            self.refused += 1
            return
        sockets = self.nat.peek(client)
        if sockets is not None:
            sockets.send(payload, allowed[0], target.port)
            if self.payload_traffic is not None:
                self.payload_traffic.counter(sockets.user_name).add_up(len(payload))


class ShadowsocksUdpRelay(UdpRelay[CipherSuite]):
    """The UDP port of the stream and AEAD-2017 methods: one salt (or IV) per datagram."""

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.received += 1
        if self.acl is not None and self._client_refused(addr):
            return
        try:
            if self.observe_key_search is None:
                key, plaintext = self.credentials.ring.open_datagram(data)
            else:
                key, plaintext = self._timed_open(data, self.observe_key_search)
            parsed = decode_target(plaintext)
        except ProtocolError:
            self.dropped += 1
            return
        if parsed is None:
            self.dropped += 1
            return
        suite = key.suite
        if self.salt_filter is not None and not self.salt_filter.check_and_add(data[: suite.spec.salt_size]):
            self.dropped += 1
            return
        target, end = parsed
        payload = plaintext[end:]
        sockets = self.nat.get(addr)
        if sockets is None:
            sockets = _ClientSockets(self, addr)
            self.nat.add(addr, sockets)
        sockets.suite = suite
        if key.id is not None:
            sockets.user_name = key.id
            if self.user_traffic is not None:
                sockets.user = self.user_traffic.counter(key.id)
                sockets.user.add_up(len(payload))
        if self.traffic is not None:
            self.traffic.add_up(len(data))
        if plaintext[0] == ATYP_DOMAIN:
            self._route(addr, target, payload)
        else:
            # ATYP 1 and 4 carry an IP by construction: no look-up, no parse.
            self._send(addr, target, [target.host], payload)

    def _timed_open(self, data: bytes, observe: Callable[[float, bool], None]) -> tuple[Any, bytes]:
        # open_datagram, timed for the metrics: the keys tried until one opens `data`, or all of them.
        started = time.perf_counter()
        try:
            opened = self.credentials.ring.open_datagram(data)
        except ProtocolError:
            observe(time.perf_counter() - started, False)
            raise
        observe(time.perf_counter() - started, True)
        return opened

    def reply(self, client: tuple, source: Address, data: bytes) -> None:
        """A target's datagram for `client`: sealed with its source address and sent back."""
        # One look-up that also marks the entry as used.
        sockets = self.nat.get(client) if self.transport is not None else None
        if sockets is None:
            return
        suite = sockets.suite
        # Our own salts are recognisable: a captured reply sent back is a replay.
        salt = self.salt_filter.own_salt(suite.spec.salt_size) if self.salt_filter is not None else None
        # The suite's bound sealer itself: one call fewer per datagram than `udp_seal`.
        packet = suite._seal(_reply_header(source.host, source.port) + data, salt)
        if len(packet) > MAX_DATAGRAM:
            self.dropped += 1
            return
        try:
            (self._sendto or self.bind_sender())(packet, client)
        except OSError:
            self.dropped += 1
            return
        if sockets.user is not None:
            sockets.user.add_down(len(data))
        if self.traffic is not None:
            self.traffic.add_down(len(packet))
        if self.payload_traffic is not None:
            self.payload_traffic.counter(sockets.user_name).add_down(len(data))


class _Session:
    """A 2022 client session held by one relay: its latest address, sockets and shared state."""

    def __init__(self, relay: "Shadowsocks2022UdpRelay", key: tuple, state: SessionState) -> None:
        self.relay = relay
        self.key = key
        self.state = state
        self.client: tuple | None = None
        self.sockets = _ClientSockets(relay, key)
        # The user's counter (multi-user ports), else None.
        self.user: ITrafficCounter | None = None
        # The user's name, for the metrics' labels ("" on a single-user port).
        self.user_name = ""

    def send(self, payload: bytes, ip: str, port: int) -> None:
        self.sockets.send(payload, ip, port)

    def close(self) -> None:
        self.sockets.close()
        self.relay.sessions.close(self.key, self.state, self.relay.reactor.seconds())


class Shadowsocks2022UdpRelay(UdpRelay[Suite2022]):
    """
    The 2022 edition's UDP port: sessions are keyed by the user a packet
    authenticated as and the client's session ID, not its address, so a
    client that moves keeps its session (replies go to the latest address
    that sent a valid packet); each session drops replayed or too old
    packet IDs.  The session ID travels under the port's PSK, which every
    user of a multi-user port holds: without the user in the key, one user
    could move another's session (and its replies) to itself.
    """

    def __init__(self, *args: Any, sessions: SessionWindows | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ring = self.credentials.ring
        self._decoder = self._ring.udp_server_decoder()
        # Shared by a server's 2022 relays, so a packet captured on one
        # address is refused on another.
        self.sessions = sessions if sessions is not None else SessionWindows(self.suite.replay_window, self.nat.capacity)

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.received += 1
        if self.acl is not None and self._client_refused(addr):
            return
        if self.credentials.ring is not self._ring:
            # The port's keys were replaced: new sessions are opened with the new ones.
            self._ring = self.credentials.ring
            self._decoder = self._ring.udp_server_decoder()
        observe = self.observe_key_search
        started = time.perf_counter() if observe is not None else 0.0
        try:
            packet = self._decoder.decode(data)
        except ProtocolError:
            if observe is not None:
                observe(time.perf_counter() - started, False)
            self.dropped += 1
            return
        if observe is not None:
            # The user's identity header looked up, the packet opened.
            observe(time.perf_counter() - started, True)
        key = (packet.user, packet.session_id)
        session = self.nat.get(key)
        if session is None:
            now = self.reactor.seconds()
            try:
                state = self.sessions.open(key, now, lambda: self._decoder.session(packet))
            except ReplayError:
                self.dropped += 1
                return
            if not state.window.accept(packet.packet_id):
                self.sessions.close(key, state, now)
                self.dropped += 1
                return
            session = _Session(self, key, state)
            if packet.user is not None:
                session.user_name = packet.user.name
                if self.user_traffic is not None:
                    session.user = self.user_traffic.counter(packet.user.name)
            self.nat.add(key, session)
        elif not session.state.window.accept(packet.packet_id):
            self.dropped += 1
            return
        state = session.state
        if packet.timestamp > state.newest:
            state.newest = packet.timestamp
        session.client = addr
        if session.user is not None:
            session.user.add_up(len(packet.payload))
        if self.traffic is not None:
            self.traffic.add_up(len(data))
        target = packet.address
        self._route(key, target, packet.payload)

    def reply(self, client: Any, source: Address, data: bytes) -> None:
        session = self.nat.peek(client)
        if self.transport is None or session is None or session.client is None:
            return
        self.nat.touch(client)
        packet = session.state.reply_session.encode(source, data)
        if len(packet) > MAX_DATAGRAM:
            self.dropped += 1
            return
        try:
            (self._sendto or self.bind_sender())(packet, session.client)
        except OSError:
            self.dropped += 1
            return
        if session.user is not None:
            session.user.add_down(len(data))
        if self.traffic is not None:
            self.traffic.add_down(len(packet))
        if self.payload_traffic is not None:
            self.payload_traffic.counter(session.user_name).add_down(len(data))


def udp_relay_for(suite: CipherSuite | Suite2022 | PortCredentials) -> type[UdpRelay[Any]]:
    """The server UDP relay class for a suite's edition."""
    return Shadowsocks2022UdpRelay if suite.spec.family == "aead2022" else ShadowsocksUdpRelay
