"""
The proxied side of the local DNS server (`ssx.local.dns`): queries sent
through a Shadowsocks server to the remote resolver (`--dns-remote`).

`RelayedUdpDns` seals each query as one Shadowsocks UDP datagram (the
remote resolver's address, then the DNS message) and sends it from a fresh
socket, connected to the server, that only that query's answer may use
(as a stub resolver picks a fresh source port per query).  `RelayedTcpDns`
opens one Shadowsocks TCP connection per query to the remote resolver and
speaks DNS over TCP on it (the two-byte length, then the message): with
no pooling there is no idle connection to keep alive or to lose under a
query, and the cache keeps the number of connections small.  A truncated
UDP answer is asked again over TCP when TCP is relayed.  The server is the
picker's choice at each query.

Both answer like `twisted.names` resolvers: the (answers, authority,
additional) sections, or a failure of `twisted.names.error` built from the
response code; cancelling a query closes its socket or connection.  The
DNS messages are `twisted.names.dns.Message`, read and written whole.
"""

from __future__ import annotations

import secrets
import struct
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol, Protocol, connectionDone
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.python.failure import Failure

from ssx.errors import ProtocolError
from ssx.interfaces import IServerPicker, ITcpClientCodec, IUdpClientCodec, IUpstream
from ssx.net.nat import READ_SIZE
from ssx.net.transparent import set_mark
from ssx.wire.address import Address, decode_address, encode_address, is_ip_literal

__all__ = ["NoServer", "RelayedTcpDns", "RelayedUdpDns", "message_for", "sections_of"]

_log = Logger()

# Servers tried for one query over TCP when one cannot be reached.
MAX_ATTEMPTS = 3
# Largest DNS message over TCP (its length prefix is two bytes).
_MAX_TCP_MESSAGE = 65535
_OPT = 41
_RCODE_ERRORS = ResolverBase()


class NoServer(Exception):
    """No server to send a proxied query through (none configured, or none with an address for UDP)."""


def message_for(query: dns.Query, message_id: int) -> dns.Message:
    """The DNS query message for `query`, recursion desired."""
    message = dns.Message(id=message_id, recDes=1)
    message.queries = [dns.Query(query.name.name, query.type, query.cls)]
    return message


def sections_of(message: dns.Message) -> tuple[list, list, list] | Failure:
    """What a `twisted.names` resolver gives for a response: its sections, or its error code's failure."""
    if message.rCode != dns.OK:
        return Failure(_RCODE_ERRORS.exceptionForCode(message.rCode)(message))
    # An OPT pseudo-record belongs to one hop, not to the answer we pass on.
    additional = [rr for rr in message.additional if rr.type != _OPT]
    return (message.answers, message.authority, additional)


def _parse(data: bytes, message_id: int, query: dns.Query) -> dns.Message | None:
    """The response in `data` if it is one to `query` (same ID and question), else None."""
    message = dns.Message()
    try:
        message.fromStr(data)
    except Exception:  # twisted.names raises a variety on bad input
        return None
    if not message.answer or message.id != message_id:
        return None
    if message.queries and (
        message.queries[0].name.name.lower() != query.name.name.lower() or message.queries[0].type != query.type
    ):
        return None
    return message


class _QuerySocket(DatagramProtocol):
    """One proxied query's socket towards the server: sends it, waits for its answer."""

    noisy = False

    def __init__(self, codec: IUdpClientCodec, message_id: int, query: dns.Query, done: Deferred) -> None:
        self.codec = codec
        self.message_id = message_id
        self.query = query
        self.done = done
        self.port: Any = None
        self.dropped = 0

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if self.done.called:
            return
        try:
            plaintext = self.codec.open(data)
        except ProtocolError:
            self.dropped += 1
            return
        parsed = decode_address(plaintext)
        message = _parse(plaintext[parsed[1]:], self.message_id, self.query) if parsed is not None else None
        if message is None:
            self.dropped += 1
            return
        self.done.callback(message)

    def connectionRefused(self) -> None:
        # ICMP port unreachable: the query's timeout ends it.
        pass

    def close(self) -> None:
        port, self.port = self.port, None
        if port is not None:
            port.stopListening()


class RelayedUdpDns:
    """
    Queries to `target` as Shadowsocks UDP through the picker's server
    (`tcp`: asked again there if truncated), from sockets carrying `mark`
    (--outbound-fwmark) if given.
    """

    def __init__(
        self, reactor: Any, picker: IServerPicker, target: Address, tcp: "RelayedTcpDns | None" = None,
        mark: int | None = None,
    ) -> None:
        self._reactor = reactor
        self.mark = mark
        self._picker = picker
        self.target = target
        self._header = encode_address(target)
        self._tcp = tcp
        self._server_ips: dict[str, str] = {}
        #: Datagrams from the server that were not the awaited answer.
        self.dropped = 0

    def _choose(self) -> IUpstream | None:
        for upstream in self._picker.candidates():
            if upstream.entry.host:  # not a --server-endpoint alone
                return upstream
        return None

    def _server_ip(self, host: str) -> Deferred:
        known = self._server_ips.get(host)
        if known is not None:
            return succeed(known)
        if is_ip_literal(host):
            self._server_ips[host] = host
            return succeed(host)

        def remember(ip: str) -> str:
            self._server_ips[host] = ip
            return ip

        return self._reactor.resolve(host).addCallback(remember)

    def query(self, query: dns.Query) -> Deferred:
        """The remote resolver's answer to `query`, through the server over UDP."""
        message_id = secrets.randbelow(65536)
        upstream = self._choose()
        if upstream is None:
            return fail(NoServer("no server with an address for UDP"))
        sock: _QuerySocket | None = None

        def cancel(d: Deferred) -> None:
            if sock is not None:
                sock.close()

        done: Deferred = Deferred(cancel)
        sock = _QuerySocket(upstream.suite.udp_client_codec(), message_id, query, done)
        request = message_for(query, message_id).toStr()

        def send(ip: str) -> None:
            if done.called:
                return
            assert sock is not None
            try:
                sock.port = self._reactor.listenUDP(
                    0, sock, interface="::" if ":" in ip else "0.0.0.0", maxPacketSize=READ_SIZE
                )
                if self.mark is not None:
                    set_mark(sock.port.socket, self.mark)
                sock.port.connect(ip, upstream.entry.port)
                sock.port.write(sock.codec.seal(self._header + request))
            except (CannotListenError, OSError, ProtocolError) as e:
                done.errback(Failure(e))

        def unresolved(failure: Failure) -> None:
            if not done.called:
                done.errback(failure)

        self._server_ip(upstream.entry.host).addCallbacks(send, unresolved)

        def finished(result: Any) -> Any:
            assert sock is not None
            self.dropped += sock.dropped
            sock.close()
            return result

        done.addBoth(finished)
        done.addCallback(self._answered, query)
        return done

    def _answered(self, message: dns.Message, query: dns.Query) -> Any:
        if message.trunc and self._tcp is not None:
            return self._tcp.query(query)
        return sections_of(message)


class _DnsOverTcp(Protocol):
    """One Shadowsocks TCP connection carrying one DNS query and its answer."""

    transport: Any

    def __init__(self, codec: ITcpClientCodec, target: Address, request: bytes, message_id: int, query: dns.Query) -> None:
        self.codec = codec
        self.target = target
        self.request = request
        self.message_id = message_id
        self.query = query
        self.answered: Deferred = Deferred()
        self._buffer = b""

    def connectionMade(self) -> None:
        self.transport.write(self.codec.first(self.target, struct.pack("!H", len(self.request)) + self.request))

    def dataReceived(self, data: bytes) -> None:
        if self.answered.called:
            return
        try:
            self._buffer += self.codec.decrypt(data)
        except ProtocolError as e:
            self._end(Failure(e))
            return
        if len(self._buffer) < 2:
            return
        (size,) = struct.unpack("!H", self._buffer[:2])
        if len(self._buffer) < 2 + size:
            return
        message = _parse(self._buffer[2:2 + size], self.message_id, self.query)
        if message is None:
            self._end(Failure(ProtocolError("not an answer to the query")))
        else:
            self.answered.callback(message)
            self.transport.loseConnection()

    def _end(self, failure: Failure) -> None:
        if not self.answered.called:
            self.answered.errback(failure)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.answered.called:
            self.answered.errback(Failure(ProtocolError("the connection closed before the answer")))


def _pass_to(result: Any, done: Deferred) -> None:
    """Fire `done` with `result` unless it fired already (cancelled)."""
    if done.called:
        return
    if isinstance(result, Failure):
        done.errback(result)
    else:
        done.callback(result)


class RelayedTcpDns:
    """Queries to `target` as DNS over TCP, one Shadowsocks TCP connection each, through the picker's server."""

    def __init__(self, picker: IServerPicker, target: Address) -> None:
        self._picker = picker
        self.target = target

    def query(self, query: dns.Query) -> Deferred:
        """The remote resolver's answer to `query`, through the server over TCP."""
        message_id = secrets.randbelow(65536)
        candidates = self._picker.candidates()[:MAX_ATTEMPTS]
        if not candidates:
            return fail(NoServer("no server configured"))
        request = message_for(query, message_id).toStr()
        state: dict[str, Any] = {"connecting": None, "protocol": None}

        def cancel(d: Deferred) -> None:
            connecting, protocol = state["connecting"], state["protocol"]
            if connecting is not None:
                connecting.cancel()
            if protocol is not None and protocol.transport is not None:
                protocol.transport.abortConnection()

        done: Deferred = Deferred(cancel)

        def attempt() -> None:
            upstream = candidates.pop(0)
            protocol = _DnsOverTcp(upstream.suite.client_codec(), self.target, request, message_id, query)
            state["protocol"] = protocol
            d = upstream.connect(protocol)
            state["connecting"] = d

            def connected(_: Any) -> None:
                state["connecting"] = None
                self._picker.succeeded(upstream)
                protocol.answered.addBoth(_pass_to, done)

            def failed(failure: Failure) -> None:
                state["connecting"] = None
                if done.called:
                    return
                self._picker.failed(upstream, failure.getErrorMessage())
                if candidates:
                    attempt()
                else:
                    done.errback(failure)

            d.addCallbacks(connected, failed)

        attempt()
        return done.addCallback(sections_of)
