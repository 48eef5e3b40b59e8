"""
Shadowsocks 2022 UDP packets (wire.md §7.6-§7.8): sans-IO codecs for the
AES methods, identity headers on client-to-server packets included.

Data path::

    ssx-local: UdpClientSession.encode  ---->  ssx-server: UdpServerDecoder.decode
    ssx-local: UdpClientSession.decode  <----  ssx-server: UdpServerSession.encode

A packet is ``AES-ECB(sep) [EIH…] AEAD(session subkey, sep[4:16], body)``
with ``sep = session ID || packet ID``.  These classes hold the per-session
keys (derived once per session, not per packet) and counters.  On the
server the tables of sessions and their `SlidingWindow`s live in the
protocol layer, which commits a decoded packet's ID only after `decode`
returned it (decode has already checked the tag, the type and the
timestamp).  A client session checks the replies' packet IDs itself, one
window per server session (wire.md §7.6: replay protection on both ends).

`2022-blake3-chacha20-poly1305` seals each packet whole instead:
``nonce(24) XChaCha20-Poly1305(PSK, nonce, sep || body)`` (§7.7), with the
AEAD from `ssx.crypto._xchacha` (shared with AEAD-2017); it has no identity headers.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping

from cryptography.exceptions import InvalidTag

from ssx.wire.address import Address, check_target, decode_address, encode_address
from ssx.crypto._xchacha import XChaCha20Poly1305
from ssx.crypto.edition2022.keys import (
    AeadPrimitive,
    AesBlock,
    Method2022,
    PskChain,
    RandomSource,
    UserKey,
    hash16,
    lookup_method_2022,
    require_key_size,
    session_subkey,
)
from ssx.crypto.edition2022.replay import MAX_TIME_DIFF, Clock, SlidingWindow, check_timestamp
from ssx.errors import AuthenticationError, ConfigError, ProtocolError, ReplayError

__all__ = [
    "UdpClientPacket",
    "UdpServerPacket",
    "UdpClientSession",
    "UdpServerDecoder",
    "UdpServerSession",
]

TAG_SIZE = 16
SEPARATE_HEADER_SIZE = 16
IDENTITY_HEADER_SIZE = 16
SESSION_ID_SIZE = 8
TYPE_CLIENT_PACKET = 0
TYPE_SERVER_PACKET = 1
# type (1) | timestamp (8) | padding length (2)
_CLIENT_BODY_FIXED = 1 + 8 + 2
# type (1) | timestamp (8) | client session ID (8) | padding length (2)
_SERVER_BODY_FIXED = 1 + 8 + SESSION_ID_SIZE + 2
# Peers' AEAD subkeys kept per decoder: enough for every live session of a
# busy port without letting a flood of sessions grow memory without bound.
_SUBKEY_CACHE_SIZE = 4096
#: Server sessions whose reply windows one client session keeps.  A server
#: starts a new session when it restarts or forgets the client, so a few
#: are plenty; each window is about 1 KiB.
SERVER_SESSIONS_KEPT = 4
# A server session quiet for this long may be forgotten: every reply of it
# that was accepted carried a timestamp at most 30 s ahead of our clock, so
# none can pass the timestamp check again (the extra second covers
# truncating `now`).  Forgetting one sooner would let its replies be
# replayed into a fresh window.
_SERVER_SESSION_QUIET = 2 * MAX_TIME_DIFF + 1


# The ChaCha method's per-packet random nonce (§7.7).
XCHACHA_NONCE_SIZE = 24


def _xchacha_seal(aead: XChaCha20Poly1305, urandom: RandomSource, separate: bytes, body: bytes) -> bytes:
    """ChaCha method (§7.7): a random 24-byte nonce, then one AEAD over header and body."""
    nonce = urandom(XCHACHA_NONCE_SIZE)
    return nonce + aead.encrypt(nonce, separate + body, None)


def _xchacha_open(aead: XChaCha20Poly1305, packet: bytes, what: str) -> tuple[bytes, bytes]:
    view = memoryview(packet)
    try:
        plaintext = aead.decrypt(bytes(view[:XCHACHA_NONCE_SIZE]), view[XCHACHA_NONCE_SIZE:], None)
    except InvalidTag:
        raise AuthenticationError(f"2022 UDP {what} tag mismatch") from None
    return plaintext[:SEPARATE_HEADER_SIZE], plaintext[SEPARATE_HEADER_SIZE:]




def _xor16(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(16, "big")


def _padding_length(payload: bytes, urandom: RandomSource) -> int:
    # rust's policy: pad only packets with nothing in them.
    if payload:
        return 0
    return int.from_bytes(urandom(2), "big") % 900 + 1


def _new_session_id(urandom: RandomSource, avoid: bytes = b"") -> bytes:
    while True:
        session_id = urandom(SESSION_ID_SIZE)
        if len(session_id) != SESSION_ID_SIZE:
            raise ValueError("urandom returned the wrong number of bytes")
        if session_id != avoid:
            return session_id


class _AeadCache:
    """Session AEADs by (key, session ID), filled only after a packet opened."""

    __slots__ = ("_spec", "_entries")

    def __init__(self, spec: Method2022) -> None:
        self._spec = spec
        self._entries: OrderedDict[tuple[bytes, bytes], AeadPrimitive] = OrderedDict()

    def open(self, key: bytes, session_id: bytes, nonce: bytes, sealed: memoryview) -> bytes:
        entries = self._entries
        index = (key, session_id)
        aead = entries.get(index)
        if aead is not None:
            entries.move_to_end(index)
            return aead.decrypt(nonce, sealed, None)
        aead = self._spec.aead(session_subkey(key, session_id))
        plaintext = aead.decrypt(nonce, sealed, None)
        entries[index] = aead
        if len(entries) > _SUBKEY_CACHE_SIZE:
            entries.popitem(last=False)
        return plaintext


def _parse_tail(body: bytes, position: int) -> tuple[int, Address, bytes]:
    """Padding length, address and payload from `position` of a body."""
    size = len(body)
    padding_length = int.from_bytes(body[position - 2 : position], "big")
    position += padding_length
    if position > size:
        raise ProtocolError("2022 UDP padding overruns the packet")
    decoded = decode_address(body, position)
    if decoded is None:
        raise ProtocolError("2022 UDP packet too short for its address")
    address, position = decoded
    return padding_length, address, body[position:]


@dataclass(frozen=True, slots=True)
class UdpClientPacket:
    """A client-to-server packet as the server decoded it."""

    session_id: bytes
    packet_id: int
    timestamp: int
    address: Address
    payload: bytes
    #: The EIH user, or None on a single-user server.
    user: UserKey | None
    padding_length: int


@dataclass(frozen=True, slots=True)
class UdpServerPacket:
    """A server-to-client packet as the client decoded it."""

    #: The server's session ID (the client's window is per server session).
    session_id: bytes
    packet_id: int
    client_session_id: bytes
    timestamp: int
    address: Address
    payload: bytes
    padding_length: int


class UdpClientSession:
    """
    Client end of one UDP session (one per SOCKS client source address).

    Holds the random client session ID, the packet counter and the session
    AEAD.  `decode` opens replies, checks they are for this session and
    refuses a packet ID its server session already used (a sliding window
    per server session).  It accepts a new server session ID, since a
    restarted server starts a new one, as long as it keeps at most
    `SERVER_SESSIONS_KEPT` windows: one is forgotten only once it has been
    quiet long enough that its replies are all stale, and until then a
    further server session is refused.
    """

    __slots__ = (
        "session_id",
        "packet_id",
        "_spec",
        "_keys",
        "_now",
        "_urandom",
        "_header_block",
        "_identity",
        "_seal",
        "_reply_block",
        "_replies",
        "_xchacha",
        "_windows",
    )

    def __init__(
        self,
        method: str | Method2022,
        keys: PskChain,
        *,
        now: Clock,
        urandom: RandomSource = os.urandom,
        session_id: bytes | None = None,
    ) -> None:
        spec = lookup_method_2022(method)
        require_key_size(spec, keys.user_key, *keys.identity_keys)
        # ChaCha: every packet sealed whole with the PSK (§7.7), no session subkey.
        self._xchacha = XChaCha20Poly1305(keys.user_key) if spec.udp_xchacha else None
        #: This session's ID, random unless given (tests).
        self.session_id = _new_session_id(urandom) if session_id is None else bytes(session_id)
        if len(self.session_id) != SESSION_ID_SIZE:
            raise ValueError("a session ID is 8 bytes")
        #: The ID the next packet will carry.
        self.packet_id = 0
        self._spec = spec
        self._keys = keys
        self._now = now
        self._urandom = urandom
        identity_keys = keys.identity_keys
        # The separate header is sealed for the first hop: its iPSK, or the
        # server's (= user's) PSK without identity headers.
        self._header_block = AesBlock(identity_keys[0] if identity_keys else keys.user_key)
        following = identity_keys[1:] + (keys.user_key,)
        self._identity = tuple(
            (AesBlock(identity_key), hash16(next_key))
            for identity_key, next_key in zip(identity_keys, following)
        )
        self._seal = spec.aead(session_subkey(keys.user_key, self.session_id)).encrypt
        self._reply_block = AesBlock(keys.user_key)
        self._replies = _AeadCache(spec)
        # Server session ID -> [window, when it last accepted a reply],
        # least recently used first.
        self._windows: OrderedDict[bytes, list] = OrderedDict()

    def encode(
        self, address: Address, payload: bytes, *, padding_length: int | None = None
    ) -> bytes:
        """One datagram to the server; uses and advances `packet_id`."""
        if padding_length is None:
            padding_length = _padding_length(payload, self._urandom)
        packet_id = self.packet_id
        self.packet_id = packet_id + 1
        separate = self.session_id + packet_id.to_bytes(8, "big")
        body = b"".join(
            (
                bytes((TYPE_CLIENT_PACKET,)),
                int(self._now()).to_bytes(8, "big"),
                padding_length.to_bytes(2, "big"),
                bytes(padding_length),
                encode_address(address),
                payload,
            )
        )
        if self._xchacha is not None:
            return _xchacha_seal(self._xchacha, self._urandom, separate, body)
        parts = [self._header_block.encrypt(separate)]
        for block, next_hash in self._identity:
            parts.append(block.encrypt(_xor16(next_hash, separate)))
        parts.append(self._seal(separate[4:], body, None))
        return b"".join(parts)

    def decode(self, packet: bytes) -> UdpServerPacket:
        """Open a reply; ProtocolError (or a subclass) if it is not a good one."""
        extra = XCHACHA_NONCE_SIZE if self._xchacha is not None else 0
        if len(packet) < extra + SEPARATE_HEADER_SIZE + TAG_SIZE + _SERVER_BODY_FIXED:
            raise ProtocolError(f"2022 UDP reply too short ({len(packet)} bytes)")
        if self._xchacha is not None:
            separate, body = _xchacha_open(self._xchacha, packet, "reply")
            server_session_id = separate[:SESSION_ID_SIZE]
        else:
            view = memoryview(packet)
            separate = self._reply_block.decrypt(view[:SEPARATE_HEADER_SIZE])
            server_session_id = separate[:SESSION_ID_SIZE]
            try:
                body = self._replies.open(
                    self._keys.user_key,
                    server_session_id,
                    separate[4:],
                    view[SEPARATE_HEADER_SIZE:],
                )
            except InvalidTag:
                raise AuthenticationError("2022 UDP reply tag mismatch") from None
        if body[0] != TYPE_SERVER_PACKET:
            raise ProtocolError(f"2022 UDP reply type {body[0]}, expected 1")
        timestamp = int.from_bytes(body[1:9], "big")
        check_timestamp(timestamp, self._now())
        if body[9:17] != self.session_id:
            raise ProtocolError("2022 UDP reply for another client session")
        padding_length, address, payload = _parse_tail(body, _SERVER_BODY_FIXED)
        packet_id = int.from_bytes(separate[SESSION_ID_SIZE:], "big")
        # Last: only an authentic, fresh, well-formed reply uses up its ID.
        self._accept_reply(server_session_id, packet_id)
        return UdpServerPacket(
            server_session_id,
            packet_id,
            self.session_id,
            timestamp,
            address,
            payload,
            padding_length,
        )

    def _accept_reply(self, server_session_id: bytes, packet_id: int) -> None:
        """Record a reply's packet ID in its server session's window; ReplayError if it was used."""
        now = self._now()
        windows = self._windows
        entry = windows.get(server_session_id)
        if entry is None:
            if len(windows) >= SERVER_SESSIONS_KEPT:
                oldest_id, oldest = next(iter(windows.items()))
                if now - oldest[1] < _SERVER_SESSION_QUIET:
                    raise ProtocolError("2022 UDP reply from one server session too many within a minute")
                del windows[oldest_id]
            entry = windows[server_session_id] = [SlidingWindow(), now]
        elif not entry[0].check(packet_id):
            raise ReplayError(f"2022 UDP reply packet ID {packet_id} replayed or too old")
        entry[0].add(packet_id)
        entry[1] = now
        windows.move_to_end(server_session_id)


class UdpServerDecoder:
    """
    Server side: opens every client packet arriving on one port.

    With a `users` table the packets must carry one identity header and the
    user's key opens the body.  `session` then gives the reply encoder for
    a new client session.
    """

    __slots__ = ("_spec", "_psk", "_users", "_now", "_block", "_bodies", "_xchacha")

    def __init__(
        self,
        method: str | Method2022,
        psk: bytes,
        *,
        now: Clock,
        users: Mapping[bytes, UserKey] | None = None,
    ) -> None:
        spec = lookup_method_2022(method)
        if users and not spec.supports_identity_headers:
            raise ConfigError("users", f"{spec.name} does not support multiple users (EIH)")
        require_key_size(spec, psk)
        self._xchacha = XChaCha20Poly1305(psk) if spec.udp_xchacha else None
        self._spec = spec
        self._psk = psk
        self._users = users or None
        self._now = now
        self._block = AesBlock(psk)
        self._bodies = _AeadCache(spec)

    def decode(self, packet: bytes) -> UdpClientPacket:
        """Open a client packet; ProtocolError (or a subclass) if it is not a good one."""
        users = self._users
        if self._xchacha is not None:
            if len(packet) < XCHACHA_NONCE_SIZE + SEPARATE_HEADER_SIZE + TAG_SIZE + _CLIENT_BODY_FIXED:
                raise ProtocolError(f"2022 UDP packet too short ({len(packet)} bytes)")
            separate, body = _xchacha_open(self._xchacha, packet, "packet")
            return self._client_packet(separate, body, None)
        body_start = SEPARATE_HEADER_SIZE + (IDENTITY_HEADER_SIZE if users else 0)
        if len(packet) < body_start + TAG_SIZE + _CLIENT_BODY_FIXED:
            raise ProtocolError(f"2022 UDP packet too short ({len(packet)} bytes)")
        view = memoryview(packet)
        block = self._block
        separate = block.decrypt(view[:SEPARATE_HEADER_SIZE])
        user: UserKey | None = None
        key = self._psk
        if users is not None:
            identity = _xor16(block.decrypt(view[SEPARATE_HEADER_SIZE:body_start]), separate)
            user = users.get(identity)
            if user is None:
                raise AuthenticationError("2022 UDP identity header names no known user")
            key = user.key
        session_id = separate[:SESSION_ID_SIZE]
        try:
            body = self._bodies.open(key, session_id, separate[4:], view[body_start:])
        except InvalidTag:
            raise AuthenticationError("2022 UDP packet tag mismatch") from None
        return self._client_packet(separate, body, user)

    def _client_packet(self, separate: bytes, body: bytes, user: UserKey | None) -> UdpClientPacket:
        session_id = separate[:SESSION_ID_SIZE]
        if body[0] != TYPE_CLIENT_PACKET:
            raise ProtocolError(f"2022 UDP packet type {body[0]}, expected 0")
        timestamp = int.from_bytes(body[1:9], "big")
        check_timestamp(timestamp, self._now())
        padding_length, address, payload = _parse_tail(body, _CLIENT_BODY_FIXED)
        check_target(address)
        return UdpClientPacket(
            session_id,
            int.from_bytes(separate[SESSION_ID_SIZE:], "big"),
            timestamp,
            address,
            payload,
            user,
            padding_length,
        )

    def session(
        self,
        packet: UdpClientPacket,
        *,
        urandom: RandomSource = os.urandom,
        session_id: bytes | None = None,
    ) -> UdpServerSession:
        """The reply side of the client session `packet` belongs to."""
        key = packet.user.key if packet.user is not None else self._psk
        return UdpServerSession(
            self._spec,
            key,
            packet.session_id,
            now=self._now,
            urandom=urandom,
            session_id=session_id,
        )


class UdpServerSession:
    """
    Server end of one client session: seals replies to it.

    Holds a random server session ID (never equal to the client's), the
    server packet counter and the reply AEAD, keyed with the user's PSK
    (or the server PSK without identity headers).
    """

    __slots__ = ("session_id", "client_session_id", "packet_id", "_now", "_block", "_seal", "_xchacha", "_urandom")

    def __init__(
        self,
        method: str | Method2022,
        key: bytes,
        client_session_id: bytes,
        *,
        now: Clock,
        urandom: RandomSource = os.urandom,
        session_id: bytes | None = None,
    ) -> None:
        spec = lookup_method_2022(method)
        if session_id is None:
            session_id = _new_session_id(urandom, avoid=client_session_id)
        elif len(session_id) != SESSION_ID_SIZE or session_id == client_session_id:
            raise ValueError("a server session ID is 8 bytes and differs from the client's")
        #: This server session's ID.
        self.session_id = bytes(session_id)
        #: The client session the replies go to.
        self.client_session_id = bytes(client_session_id)
        #: The ID the next reply will carry.
        self.packet_id = 0
        self._now = now
        self._urandom = urandom
        self._xchacha = XChaCha20Poly1305(key) if spec.udp_xchacha else None
        self._block = AesBlock(key)
        self._seal = spec.aead(session_subkey(key, self.session_id)).encrypt

    def encode(
        self, address: Address, payload: bytes, *, padding_length: int = 0
    ) -> bytes:
        """One reply datagram carrying `payload` from `address`."""
        packet_id = self.packet_id
        self.packet_id = packet_id + 1
        separate = self.session_id + packet_id.to_bytes(8, "big")
        body = b"".join(
            (
                bytes((TYPE_SERVER_PACKET,)),
                int(self._now()).to_bytes(8, "big"),
                self.client_session_id,
                padding_length.to_bytes(2, "big"),
                bytes(padding_length),
                encode_address(address),
                payload,
            )
        )
        if self._xchacha is not None:
            return _xchacha_seal(self._xchacha, self._urandom, separate, body)
        return self._block.encrypt(separate) + self._seal(separate[4:], body, None)
