"""
The server side of a SOCKS5 negotiation (RFC 1928 + RFC 1929), sans-IO.

This is the first thing `ssx-local` runs on a connection from an
application: `Socks5Negotiation` eats the greeting, the optional
username/password sub-negotiation and the request, and hands back the target
as a `Socks5Request`.  The protocol that owns the transport writes what
`feed` returns, then opens the Shadowsocks connection and answers with
`build_reply` once it knows whether that worked (wire.md §1.4).  The target
address is the same header the Shadowsocks layer sends (`ssx.wire.address`).
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from enum import Enum, auto

from ssx.wire.address import ATYP_IPV4, ATYP_IPV6, Address, decode_address, encode_address
from ssx.errors import (
    AddressError,
    ProtocolError,
    Socks5Error,
    UnsupportedAddressType,
)

__all__ = [
    "CMD_CONNECT",
    "CMD_BIND",
    "CMD_UDP_ASSOCIATE",
    "REP_SUCCEEDED",
    "REP_GENERAL_FAILURE",
    "REP_NOT_ALLOWED",
    "REP_NETWORK_UNREACHABLE",
    "REP_HOST_UNREACHABLE",
    "REP_CONNECTION_REFUSED",
    "REP_TTL_EXPIRED",
    "REP_COMMAND_NOT_SUPPORTED",
    "REP_ADDRESS_TYPE_NOT_SUPPORTED",
    "Socks5Request",
    "build_reply",
    "Socks5Negotiation",
    "UDP_HEADER",
    "udp_to_shadowsocks",
    "associate_source_port",
]

CMD_CONNECT, CMD_BIND, CMD_UDP_ASSOCIATE = 1, 2, 3

# RSV(2) FRAG(1) of a standalone SOCKS5 UDP datagram (RFC 1928 §7); a reply
# to the application is this followed by the Shadowsocks plaintext.
UDP_HEADER = b"\x00\x00\x00"

(
    REP_SUCCEEDED,
    REP_GENERAL_FAILURE,
    REP_NOT_ALLOWED,
    REP_NETWORK_UNREACHABLE,
    REP_HOST_UNREACHABLE,
    REP_CONNECTION_REFUSED,
    REP_TTL_EXPIRED,
    REP_COMMAND_NOT_SUPPORTED,
    REP_ADDRESS_TYPE_NOT_SUPPORTED,
) = range(9)

_SOCKS_VERSION = 5
_AUTH_VERSION = 1
_METHOD_NO_AUTH = 0
_METHOD_USERNAME_PASSWORD = 2

_NO_ACCEPTABLE_METHODS = b"\x05\xff"
_AUTH_SUCCESS = b"\x01\x00"
_AUTH_FAILURE = b"\x01\x01"

# VER CMD RSV before the address header.
_REQUEST_PREFIX = 3


class _Stage(Enum):
    GREETING = auto()
    AUTH = auto()
    REQUEST = auto()
    DONE = auto()
    FAILED = auto()


@dataclass(frozen=True)
class Socks5Request:
    """
    What the client asked for.

    `extra` is whatever the client pipelined after the request in the same
    `feed` (usually nothing): it is the first application data and belongs
    to the relay.
    """

    command: int
    address: Address
    extra: bytes


def udp_to_shadowsocks(datagram: bytes) -> bytes:
    """
    The Shadowsocks UDP plaintext (`ATYP ADDR PORT DATA`) of an
    application's SOCKS5 UDP datagram: RSV and FRAG stripped.

    Fragments (FRAG != 0) are refused: no Shadowsocks local reassembles
    them.  A truncated or malformed address raises ProtocolError.
    """
    if len(datagram) < 4:
        raise ProtocolError("SOCKS5 UDP datagram too short")
    if datagram[2] != 0:
        raise ProtocolError("SOCKS5 UDP fragment (FRAG != 0)")
    plaintext = datagram[3:]
    atyp = plaintext[0] if plaintext else 0
    if atyp == ATYP_IPV4 or atyp == ATYP_IPV6:
        # Any bytes are an IP: the length is the whole check (no Address
        # built and thrown away for every datagram).
        if len(plaintext) < (7 if atyp == ATYP_IPV4 else 19):  # ATYP, the IP, the port
            raise AddressError("SOCKS5 UDP datagram truncated inside its address")
    elif decode_address(plaintext) is None:
        raise AddressError("SOCKS5 UDP datagram truncated inside its address")
    return plaintext


def associate_source_port(requested: Address, peer_host: str) -> int | None:
    """
    The UDP port an ASSOCIATE request says its datagrams will come from,
    or None when it does not say.

    RFC 1928 §6 puts in DST.ADDR:DST.PORT the address the client will send
    from, all zeros when it does not know yet.  The port counts only when
    it is non-zero and DST.ADDR is unspecified or the control connection's
    own IP: some clients put the target there instead, or a local address
    a NAT rewrites, and those must still work (their association learns
    its port from its first datagram).  The IP is always the control
    connection's, never DST.ADDR: an association cannot vouch for another
    host.
    """
    if requested.port == 0:
        return None
    try:
        named = _unmapped(ipaddress.ip_address(requested.host))
        peer = _unmapped(ipaddress.ip_address(peer_host.split("%", 1)[0]))
    except ValueError:
        return None
    if named.is_unspecified or named == peer:
        return requested.port
    return None


def _unmapped(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped if mapped is not None else ip


def build_reply(code: int, bind: Address = Address("0.0.0.0", 0)) -> bytes:
    """
    The full reply ``05 REP 00 ATYP BND.ADDR BND.PORT``.

    Always complete, failures included: libev's 4-byte error replies leave
    clients waiting for bytes that never come (wire.md §1.4).
    """
    return bytes((_SOCKS_VERSION, code, 0)) + encode_address(bind)


class Socks5Negotiation:
    """
    One SOCKS5 server-side negotiation, from greeting to request.

    `credentials` is ``(username, password)`` to require RFC 1929
    authentication, or None to accept only "no authentication".  `commands`
    is the set of CMD values to accept; any other gets REP 07.

    Every check looks only at bytes up to the one it is about, so a client
    gets the same answers however its bytes are split across reads.  At most
    one unfinished message is held between calls (513 bytes at worst, an
    RFC 1929 request with 255-byte name and password): a complete message is
    always consumed or refused before `feed` returns.
    """

    def __init__(
        self,
        credentials: tuple[bytes, bytes] | None = None,
        commands: frozenset[int] = frozenset({CMD_CONNECT}),
    ) -> None:
        if credentials is not None:
            for part in credentials:
                # RFC 1929 cannot carry an empty or over-long field, so such
                # credentials could never be matched.
                if not 1 <= len(part) <= 255:
                    raise ValueError(
                        "SOCKS5 username and password must be 1..255 bytes"
                    )
        self._credentials = credentials
        self._commands = frozenset(commands)
        self._stage = _Stage.GREETING
        self._buffer = bytearray()

    def feed(self, data: bytes) -> tuple[bytes, Socks5Request | None]:
        """
        Take bytes from the client.

        Returns the bytes to write to the client now and, once the request
        is complete, the `Socks5Request`; after that the negotiation is over
        and feeding it again raises `ProtocolError`.  A refusal raises
        `Socks5Error` whose `reply` is everything still to write before
        closing, including answers to earlier messages in the same `data`.
        """
        if self._stage is _Stage.DONE:
            raise ProtocolError("SOCKS5 negotiation already complete")
        if self._stage is _Stage.FAILED:
            raise ProtocolError("SOCKS5 negotiation already failed")
        self._buffer += data
        out = bytearray()
        try:
            while True:
                if self._stage is _Stage.GREETING:
                    step = self._greeting()
                elif self._stage is _Stage.AUTH:
                    step = self._auth()
                else:
                    return bytes(out), self._request()
                if step is None:
                    return bytes(out), None
                out += step
        except Socks5Error as e:
            self._stage = _Stage.FAILED
            self._buffer.clear()
            # The client must still see the answers to the messages that
            # came before the bad one, or its view of the exchange breaks.
            e.reply = bytes(out) + e.reply
            raise

    def _consume(self, count: int) -> None:
        del self._buffer[:count]

    def _greeting(self) -> bytes | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != _SOCKS_VERSION:
            # Not SOCKS5 at all; py and libev close without a word.
            raise Socks5Error(f"greeting version {buf[0]} is not 5")
        if len(buf) < 2:
            return None
        count = buf[1]
        if count == 0:
            raise Socks5Error("greeting offers no methods", _NO_ACCEPTABLE_METHODS)
        if len(buf) < 2 + count:
            return None
        methods = buf[2 : 2 + count]
        self._consume(2 + count)
        if self._credentials is not None:
            wanted = _METHOD_USERNAME_PASSWORD
            next_stage = _Stage.AUTH
        else:
            wanted = _METHOD_NO_AUTH
            next_stage = _Stage.REQUEST
        if wanted not in methods:
            raise Socks5Error(
                f"client offers none of the acceptable methods (wanted {wanted})",
                _NO_ACCEPTABLE_METHODS,
            )
        self._stage = next_stage
        return bytes((_SOCKS_VERSION, wanted))

    def _auth(self) -> bytes | None:
        assert self._credentials is not None
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != _AUTH_VERSION:
            # A client that does not speak RFC 1929 cannot read its status
            # byte either; treat it like a bad greeting version.
            raise Socks5Error(f"authentication version {buf[0]} is not 1")
        if len(buf) < 2:
            return None
        username_end = 2 + buf[1]
        if len(buf) < username_end + 1:
            return None
        password_end = username_end + 1 + buf[username_end]
        if len(buf) < password_end:
            return None
        username = bytes(buf[2:username_end])
        password = bytes(buf[username_end + 1 : password_end])
        self._consume(password_end)
        expected_username, expected_password = self._credentials
        # Both comparisons always run so the timing does not tell which
        # half was wrong.
        username_ok = hmac.compare_digest(username, expected_username)
        password_ok = hmac.compare_digest(password, expected_password)
        if not (username_ok & password_ok):
            raise Socks5Error("wrong SOCKS5 username or password", _AUTH_FAILURE)
        self._stage = _Stage.REQUEST
        return _AUTH_SUCCESS

    def _request(self) -> Socks5Request | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != _SOCKS_VERSION:
            raise Socks5Error(f"request version {buf[0]} is not 5")
        if len(buf) < 2:
            return None
        command = buf[1]
        if command not in self._commands:
            raise Socks5Error(
                f"SOCKS5 command {command} not supported",
                build_reply(REP_COMMAND_NOT_SUPPORTED),
            )
        # RSV (buf[2]) is ignored, as RFC 1928 clients are not all careful
        # to send zero there.
        try:
            decoded = decode_address(buf, _REQUEST_PREFIX)
        except UnsupportedAddressType as e:
            raise Socks5Error(
                str(e), build_reply(REP_ADDRESS_TYPE_NOT_SUPPORTED)
            ) from e
        except AddressError as e:
            raise Socks5Error(str(e), build_reply(REP_GENERAL_FAILURE)) from e
        if decoded is None:
            return None
        address, end = decoded
        extra = bytes(buf[end:])
        self._buffer = bytearray()
        self._stage = _Stage.DONE
        return Socks5Request(command, address, extra)
