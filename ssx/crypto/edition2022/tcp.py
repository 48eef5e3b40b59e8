"""
Shadowsocks 2022 TCP framing (SIP022 + SIP023 identity headers, wire.md
§7.2-§7.5, §7.8): sans-IO codecs for both ends of a connection.

Data path::

    ssx-local                                        ssx-server
    RequestEncoder.encode_header/encrypt  ------->  RequestDecoder.decrypt
    ResponseDecoder.decrypt               <-------  ResponseEncoder.encrypt

After their headers, all four are the chunk stream of `chunks`:
``seal(u16 len) || seal(payload)``, the nonce continuing from the header
chunks, payloads up to 0xFFFF bytes.  `encrypt`
and `decrypt` have the shapes of `ssx.crypto.TcpEncryptor`/`TcpDecryptor`,
so relays can pump 2022 streams like the older families once the header is
done.  Every failure on received bytes raises a `ProtocolError` subclass and
leaves the decoder dead; what to do about it (RST or drain) is the
protocol layer's business.  Time comes from the caller's ``now``.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from typing import Mapping

from ssx.wire.address import Address, decode_target, encode_address
from ssx.crypto.edition2022.chunks import (
    MAX_CHUNK,
    TAG_SIZE,
    Aead2022ChunkDecoder,
    Aead2022ChunkEncoder,
    nonce_bytes,
    seal_chunks,
)
from ssx.crypto.edition2022.keys import (
    AeadPrimitive,
    AesBlock,
    Method2022,
    PskChain,
    RandomSource,
    UserKey,
    hash16,
    identity_subkey,
    lookup_method_2022,
    require_key_size,
    session_subkey,
)
from ssx.crypto.edition2022.replay import Clock, ReplayError, SaltCheck, as_salt_check, check_timestamp
from ssx.errors import AuthenticationError, ConfigError, ProtocolError

__all__ = [
    "RequestHeader",
    "RequestEncoder",
    "RequestDecoder",
    "ResponseEncoder",
    "ResponseDecoder",
    "MAX_CHUNK",
    "MAX_PADDING",
]

#: Largest padding in a request's variable header.
MAX_PADDING = 900
IDENTITY_HEADER_SIZE = 16

TYPE_CLIENT_STREAM = 0
TYPE_SERVER_STREAM = 1

# type (1) | timestamp (8) | variable header length (2)
_FIXED_HEADER_SIZE = 1 + 8 + 2


def _random_padding_length(urandom: RandomSource) -> int:
    # 1..900: never 0, which strict servers (sing-box, ours) refuse when
    # there is no payload either.
    return int.from_bytes(urandom(2), "big") % MAX_PADDING + 1


@dataclass(frozen=True, slots=True)
class RequestHeader:
    """What a server learns from a request header, besides the payload."""

    address: Address
    #: The EIH user, or None on a single-user server.
    user: UserKey | None
    #: The client's salt (the response echoes it).
    salt: bytes
    timestamp: int
    padding_length: int


class RequestEncoder(Aead2022ChunkEncoder):
    """
    Client side, client-to-server stream.

    `encode_header` returns salt, identity headers, both header chunks and
    the first payload as one bytes object, to be written in one call (a
    fixed-size first segment would be a fingerprint); `encrypt` frames the
    rest.  `response_decoder` gives the matching decoder for the reply.
    """

    __slots__ = ("salt", "_spec", "_keys", "_now", "_urandom")

    def __init__(
        self,
        method: str | Method2022,
        keys: PskChain,
        *,
        now: Clock,
        urandom: RandomSource = os.urandom,
        salt: bytes | None = None,
    ) -> None:
        spec = lookup_method_2022(method)
        if keys.identity_keys and not spec.supports_identity_headers:
            raise ConfigError("password", f"{spec.name} does not support identity headers")
        require_key_size(spec, keys.user_key, *keys.identity_keys)
        if salt is None:
            salt = urandom(spec.salt_size)
        elif len(salt) != spec.salt_size:
            raise ValueError(f"{spec.name} salt must be {spec.salt_size} bytes")
        #: The salt this request sends; the response must echo it.
        self.salt = bytes(salt)
        self._spec = spec
        self._keys = keys
        self._now = now
        self._urandom = urandom
        self._seal = None
        self._nonce = 0

    def encode_header(
        self,
        address: Address,
        payload: bytes = b"",
        *,
        padding_length: int | None = None,
    ) -> bytes:
        """
        The first write: salt, [EIH], fixed and variable header, payload.

        Without payload the header gets 1..900 bytes of padding (unless
        `padding_length` says how much; 0 is refused then, since servers
        must reject it); payload beyond what fits in the variable header
        follows as ordinary chunks in the same bytes.
        """
        if self._seal is not None:
            raise RuntimeError("the request header was already encoded")
        if padding_length is None:
            padding_length = 0 if payload else _random_padding_length(self._urandom)
        if not 0 <= padding_length <= MAX_PADDING:
            raise ValueError(f"padding length must be 0..{MAX_PADDING}, not {padding_length}")
        if not payload and not padding_length:
            # Servers must refuse such a header (SIP022); never send one.
            raise ValueError("a request without payload needs padding")
        salt = self.salt
        keys = self._keys
        address_bytes = encode_address(address)
        room = MAX_CHUNK - len(address_bytes) - 2 - padding_length
        view = memoryview(payload)
        variable = b"".join(
            (
                address_bytes,
                padding_length.to_bytes(2, "big"),
                bytes(padding_length),
                view[:room],
            )
        )
        fixed = b"".join(
            (
                bytes((TYPE_CLIENT_STREAM,)),
                int(self._now()).to_bytes(8, "big"),
                len(variable).to_bytes(2, "big"),
            )
        )
        seal = self._spec.aead(session_subkey(keys.user_key, salt)).encrypt
        parts = [salt]
        identity_keys = keys.identity_keys
        for index, identity_key in enumerate(identity_keys):
            following = (
                identity_keys[index + 1] if index + 1 < len(identity_keys) else keys.user_key
            )
            block = AesBlock(identity_subkey(identity_key, salt))
            parts.append(block.encrypt(hash16(following)))
        parts.append(seal(nonce_bytes(0), fixed, None))
        parts.append(seal(nonce_bytes(1), variable, None))
        nonce = 2
        if len(view) > room:
            nonce = seal_chunks(seal, nonce, view[room:], parts)
        self._seal = seal
        self._nonce = nonce
        return b"".join(parts)

    def response_decoder(self) -> ResponseDecoder:
        """The decoder for the server's reply to this request."""
        return ResponseDecoder(self._spec, self._keys.user_key, self.salt, now=self._now)


class ResponseDecoder(Aead2022ChunkDecoder):
    """
    Client side, server-to-client stream.

    Checks type 1, the timestamp window and that the echoed salt is ours,
    then yields the payload.  Keyed with the user PSK.
    """

    __slots__ = ("salt", "_spec", "_key", "_request_salt", "_now")

    def __init__(
        self,
        method: str | Method2022,
        key: bytes,
        request_salt: bytes,
        *,
        now: Clock,
    ) -> None:
        spec = lookup_method_2022(method)
        size = spec.salt_size
        super().__init__(size + 1 + 8 + size + 2 + TAG_SIZE)
        #: The server's salt once received, else None.
        self.salt: bytes | None = None
        self._spec = spec
        self._key = key
        self._request_salt = bytes(request_salt)
        self._now = now

    def _read_header(self, view: memoryview, parts: list[bytes]) -> int:
        size = self._spec.salt_size
        end = size + 1 + 8 + size + 2 + TAG_SIZE
        if len(view) < end:
            self._need = end
            return 0
        salt = bytes(view[:size])
        aead = self._spec.aead(session_subkey(self._key, salt))
        header = aead.decrypt(nonce_bytes(0), view[size:end], None)
        if header[0] != TYPE_SERVER_STREAM:
            raise ProtocolError(f"2022 response header type {header[0]}, expected 1")
        check_timestamp(int.from_bytes(header[1:9], "big"), self._now())
        if not hmac.compare_digest(header[9 : 9 + size], self._request_salt):
            raise ProtocolError("2022 response echoes a different request salt")
        self.salt = salt
        self._open = aead.decrypt
        self._nonce = 1
        self._length = int.from_bytes(header[9 + size :], "big")
        return end


class RequestDecoder(Aead2022ChunkDecoder):
    """
    Server side, client-to-server stream, fed arbitrary fragments.

    Order (wire.md §7.5): salt, [identity header -> user], fixed header
    (type 0, timestamp window), then the salt-replay check, then the
    variable header (address, padding <= 900, payload or padding present,
    everything inside the declared length).  `header` is set by the
    `decrypt` call that completes it; that call returns the initial payload
    (plus whatever chunks arrived with it), later calls the chunk payloads.

    `salt_check` is shared by all connections of a port: a `SaltPool`, any
    object with ``check_and_add(salt) -> bool`` or such a callable (True =
    new).  With a `users` table (``hash16(uPSK) -> UserKey``, see
    `user_table`) every request must carry one identity header sealed with
    `psk`, and the user's key keys both directions.
    """

    __slots__ = (
        "header",
        "_spec",
        "_psk",
        "_users",
        "_salt_check",
        "_now",
        "_user",
        "_salt",
        "_timestamp",
        "_aead",
        "_variable_length",
    )

    def __init__(
        self,
        method: str | Method2022,
        psk: bytes,
        *,
        salt_check: SaltCheck,
        now: Clock,
        users: Mapping[bytes, UserKey] | None = None,
    ) -> None:
        spec = lookup_method_2022(method)
        if users and not spec.supports_identity_headers:
            raise ConfigError("users", f"{spec.name} does not support multiple users (EIH)")
        require_key_size(spec, psk)
        self._spec = spec
        self._psk = psk
        self._users = users or None
        self._salt_check = as_salt_check(salt_check)
        self._now = now
        super().__init__(self._first_size())
        #: The parsed request header once complete, else None.
        self.header: RequestHeader | None = None
        self._user: UserKey | None = None
        self._salt = b""
        self._timestamp = 0
        self._aead: AeadPrimitive | None = None
        self._variable_length = 0

    @property
    def salt(self) -> bytes | None:
        """The client's salt once its fixed header was accepted, else None."""
        return self._salt or None

    def response_encoder(
        self, *, urandom: RandomSource = os.urandom, salt: bytes | None = None
    ) -> ResponseEncoder:
        """The encoder for this request's response (user key with EIH)."""
        if self.header is None:
            raise RuntimeError("the request header is not complete yet")
        key = self._user.key if self._user is not None else self._psk
        return ResponseEncoder(
            self._spec, key, self.header.salt, now=self._now, urandom=urandom, salt=salt
        )

    def _first_size(self) -> int:
        eih = IDENTITY_HEADER_SIZE if self._users else 0
        return self._spec.salt_size + eih + _FIXED_HEADER_SIZE + TAG_SIZE

    def _read_header(self, view: memoryview, parts: list[bytes]) -> int:
        position = 0
        if self._aead is None:
            end = self._first_size()
            if len(view) < end:
                self._need = end
                return 0
            self._open_fixed_header(view, end)
            position = end
        end = position + self._variable_length + TAG_SIZE
        if len(view) < end:
            self._need = end - position
            return position
        aead = self._aead
        assert aead is not None
        variable = aead.decrypt(nonce_bytes(1), view[position:end], None)
        payload = self._parse_variable_header(variable)
        if payload:
            parts.append(payload)
        self._open = aead.decrypt
        self._nonce = 2
        self._length = -1
        return end

    def _open_fixed_header(self, view: memoryview, end: int) -> None:
        size = self._spec.salt_size
        salt = bytes(view[:size])
        key = self._psk
        position = size
        users = self._users
        if users is not None:
            block = AesBlock(identity_subkey(self._psk, salt))
            user = users.get(block.decrypt(view[size : size + IDENTITY_HEADER_SIZE]))
            if user is None:
                raise AuthenticationError("2022 identity header names no known user")
            self._user = user
            key = user.key
            position += IDENTITY_HEADER_SIZE
        aead = self._spec.aead(session_subkey(key, salt))
        fixed = aead.decrypt(nonce_bytes(0), view[position:end], None)
        if fixed[0] != TYPE_CLIENT_STREAM:
            raise ProtocolError(f"2022 request header type {fixed[0]}, expected 0")
        timestamp = int.from_bytes(fixed[1:9], "big")
        check_timestamp(timestamp, self._now())
        # Only now: checking before authentication would let anyone fill
        # the pool (rust #442).
        if not self._salt_check(salt):
            raise ReplayError("2022 request salt replayed")
        self._salt = salt
        self._timestamp = timestamp
        self._variable_length = int.from_bytes(fixed[9:11], "big")
        self._aead = aead

    def _parse_variable_header(self, variable: bytes) -> bytes:
        size = len(variable)
        decoded = decode_target(variable)
        if decoded is None:
            raise ProtocolError("2022 request header too short for its address")
        address, position = decoded
        if size < position + 2:
            raise ProtocolError("2022 request header too short for its padding length")
        padding_length = int.from_bytes(variable[position : position + 2], "big")
        if padding_length > MAX_PADDING:
            raise ProtocolError(f"2022 request padding {padding_length} > {MAX_PADDING}")
        position += 2 + padding_length
        if position > size:
            raise ProtocolError("2022 request padding overruns its header")
        if position == size and not padding_length:
            raise ProtocolError("2022 request header has neither payload nor padding")
        self.header = RequestHeader(
            address, self._user, self._salt, self._timestamp, padding_length
        )
        return variable[position:]


class ResponseEncoder(Aead2022ChunkEncoder):
    """
    Server side, server-to-client stream.

    The first non-empty `encrypt` sends a new salt, the response header
    (type 1, timestamp, the request's salt, first length) and the first
    payload; later calls send ordinary chunks.  Responses carry no padding.
    """

    __slots__ = ("salt", "_spec", "_request_salt", "_now", "_key")

    def __init__(
        self,
        method: str | Method2022,
        key: bytes,
        request_salt: bytes,
        *,
        now: Clock,
        urandom: RandomSource = os.urandom,
        salt: bytes | None = None,
    ) -> None:
        spec = lookup_method_2022(method)
        if salt is None:
            salt = urandom(spec.salt_size)
        elif len(salt) != spec.salt_size:
            raise ValueError(f"{spec.name} salt must be {spec.salt_size} bytes")
        #: The salt this direction sends.
        self.salt = bytes(salt)
        self._spec = spec
        self._key = key
        self._request_salt = bytes(request_salt)
        self._now = now
        self._seal = None
        self._nonce = 0

    def encrypt(self, data: bytes) -> bytes:
        """Response bytes for `data`; the first non-empty call carries the header."""
        if self._seal is not None:
            return Aead2022ChunkEncoder.encrypt(self, data)
        if not data:
            return b""
        seal = self._spec.aead(session_subkey(self._key, self.salt)).encrypt
        view = memoryview(data)
        first = view[:MAX_CHUNK]
        header = b"".join(
            (
                bytes((TYPE_SERVER_STREAM,)),
                int(self._now()).to_bytes(8, "big"),
                self._request_salt,
                len(first).to_bytes(2, "big"),
            )
        )
        parts = [self.salt, seal(nonce_bytes(0), header, None), seal(nonce_bytes(1), first, None)]
        nonce = 2
        if len(view) > MAX_CHUNK:
            nonce = seal_chunks(seal, nonce, view[MAX_CHUNK:], parts)
        self._seal = seal
        self._nonce = nonce
        return b"".join(parts)
