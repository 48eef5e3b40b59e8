"""
`Suite2022`: one configured 2022 method (SIP022/SIP023) and its keys, and
the per-connection codecs it hands the relays.

The 2022 edition's side of the faces declared in `ssx.interfaces`
(`ICipherSuite` and its codecs), beside `CipherSuite` (`ssx.crypto._suite`)
for the older methods: the local end asks for a `client_codec()` per TCP
connection and a `udp_client_codec()` per application address, the server
for a `server_codec()` per TCP connection; the server's UDP relay uses
`udp_server_decoder()` and `replay_window()`, which only this edition has.
The codecs here only adapt the header codecs of `tcp` and `udp` to those
faces.  No Twisted here.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Mapping

from zope.interface import implementer

from ssx.wire.address import Address, decode_address, encode_address
from cryptography.exceptions import InvalidTag

from ssx.crypto.edition2022.chunks import TAG_SIZE, nonce_bytes
from ssx.crypto.edition2022.keys import PskChain, lookup_method_2022, parse_password, session_subkey, user_table
from ssx.crypto.edition2022.replay import Clock, SaltPool, SlidingWindow
from ssx.crypto.edition2022.tcp import _FIXED_HEADER_SIZE, RequestDecoder, RequestEncoder, ResponseEncoder
from ssx.crypto.edition2022.udp import UdpClientSession, UdpServerDecoder
from ssx.crypto._registry import MethodSpec, lookup_method
from ssx.errors import ProtocolError
from ssx.interfaces import ICipherSuite, ITcpClientCodec, ITcpServerCodec, IUdpClientCodec

if TYPE_CHECKING:
    from ssx.crypto._salt_filter import SaltFilter

__all__ = ["Suite2022"]


@implementer(ITcpClientCodec)
class Aead2022TcpClientCodec:
    """The local end's side of one TCP connection: a request encoder and its response decoder."""

    __slots__ = ("_request", "_response", "encrypt")

    def __init__(self, method: str, keys: PskChain, now: Clock) -> None:
        self._request = RequestEncoder(method, keys, now=now)
        self._response = self._request.response_decoder()
        self.encrypt = self._request.encrypt

    def first(self, address: Address, payload: bytes) -> bytes:
        return self._request.encode_header(address, payload)

    def decrypt(self, data: bytes) -> bytes:
        return self._response.decrypt(data)


@implementer(ITcpServerCodec)
class Aead2022TcpServerCodec:
    """The server's side of one TCP connection: a request decoder, then its response encoder."""

    __slots__ = ("address", "user", "_request", "_response")

    def __init__(self, decoder: RequestDecoder) -> None:
        self.address: Address | None = None
        self.user: str | None = None
        self._request = decoder
        self._response: ResponseEncoder | None = None

    def decrypt(self, data: bytes) -> bytes:
        out = self._request.decrypt(data)
        if self.address is None:
            header = self._request.header
            if header is None:
                return b""
            self.address = header.address
            self.user = header.user.name if header.user is not None else None
        return out

    def encrypt(self, data: bytes) -> bytes:
        if self._response is None:
            self._response = self._request.response_encoder()
        return self._response.encrypt(data)

    def data_path(self) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
        if self._response is None:
            self._response = self._request.response_encoder()
        return self._request.decrypt, self._response.encrypt


@implementer(IUdpClientCodec)
class Aead2022UdpClientCodec:
    """The local end's datagrams for one application address: one client session."""

    __slots__ = ("_session",)

    def __init__(self, method: str, keys: PskChain, now: Clock) -> None:
        self._session = UdpClientSession(method, keys, now=now)

    def seal(self, plaintext: bytes) -> bytes:
        parsed = decode_address(plaintext)
        if parsed is None:
            raise ProtocolError("datagram truncated inside its address")
        address, end = parsed
        return self._session.encode(address, plaintext[end:])

    def open(self, packet: bytes) -> bytes:
        reply = self._session.decode(packet)
        return encode_address(reply.address) + reply.payload


@implementer(ICipherSuite)
class Suite2022:
    """
    A 2022-edition method and its keys (SIP022/SIP023).

    The client side takes the password ``uPSK`` or ``iPSK:…:uPSK``; the
    server side its own PSK and, for several users on one port, a
    ``{name: uPSK}`` table.  Salts seen by this server are remembered (one
    pool per suite, so per listening port) for the replay check.
    """

    def __init__(
        self,
        method: str,
        password: str,
        *,
        users: Mapping[str, str] | None = None,
        now: Clock = time.time,
    ) -> None:
        self.spec: MethodSpec = lookup_method(method)
        self._method = lookup_method_2022(self.spec.name)
        self._now = now
        self._keys = parse_password(self._method, password)
        self._users = user_table(self._method, users) if users else None
        # On a server the password is its own PSK (with users: its iPSK).
        self._psk = self._keys.user_key
        self.salts = SaltPool(now)

    def __repr__(self) -> str:
        return f"<Suite2022 method={self.spec.name!r}>"

    @property
    def has_users(self) -> bool:
        """Whether the port knows its users by identity headers."""
        return self._users is not None

    @property
    def psk(self) -> bytes:
        """The server's own PSK (with users: its identity PSK)."""
        return self._psk

    @property
    def first_chunk_size(self) -> int:
        """Bytes a request's start needs for `opens_first_chunk`: the salt and the sealed fixed header."""
        return self._method.salt_size + _FIXED_HEADER_SIZE + TAG_SIZE

    def opens_first_chunk(self, data: bytes | memoryview) -> bool:
        """
        Whether this suite's own PSK opens the fixed request header after
        the salt at the start of `data`: how a port with several keys (or
        a ChaCha port's users, which have no identity header) finds a
        connection's.  Not for a suite with users (identity headers).
        """
        if self._users:
            raise ValueError("a suite with identity headers finds its users by them")
        size = self._method.salt_size
        view = memoryview(data)
        aead = self._method.aead(session_subkey(self._psk, bytes(view[:size])))
        try:
            aead.decrypt(nonce_bytes(0), view[size : size + _FIXED_HEADER_SIZE + TAG_SIZE], None)
        except InvalidTag:
            return False
        return True

    def client_codec(self) -> ITcpClientCodec:
        return Aead2022TcpClientCodec(self.spec.name, self._keys, self._now)

    def server_codec(self, salt_filter: SaltFilter | None = None) -> ITcpServerCodec:
        # 2022 keeps its own exact salt pool (bounded by the timestamp window).
        return Aead2022TcpServerCodec(
            RequestDecoder(self.spec.name, self._psk, salt_check=self.salts, now=self._now, users=self._users)
        )

    def udp_client_codec(self) -> IUdpClientCodec:
        return Aead2022UdpClientCodec(self.spec.name, self._keys, self._now)

    def udp_server_decoder(self) -> UdpServerDecoder:
        return UdpServerDecoder(self.spec.name, self._psk, now=self._now, users=self._users)

    @staticmethod
    def replay_window() -> SlidingWindow:
        return SlidingWindow()
