"""
Per-connection codecs: the one face both Shadowsocks editions show the relays.

A configured method is a suite: `CipherSuite` (stream, AEAD-2017, none) or
`Suite2022` (SIP022).  For every TCP connection the local end asks its suite
for a `client_codec()` (`first(address, payload)` opens the stream, then
`encrypt`/`decrypt`), the server for a `server_codec()` (`decrypt` yields the
application's bytes once the target `address` is known, `encrypt` the
reply).  For UDP the local end keeps one `udp_client_codec()` per
application address (`seal`/`open` of ``ATYP ADDR PORT DATA``).  So the
protocols never know which edition they carry.  These faces are declared in
`ssx.interfaces` (`ICipherSuite` and the codec interfaces it hands out).  No
Twisted here.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

from zope.interface import implementer

from ssx.wire.address import Address, decode_address, decode_target, encode_address
from ssx.crypto.edition2022 import (
    PskChain,
    RequestDecoder,
    RequestEncoder,
    SaltPool,
    SlidingWindow,
    UdpClientSession,
    UdpServerDecoder,
    lookup_method_2022,
    parse_password,
    user_table,
)
from ssx.crypto._registry import MethodSpec, lookup_method
from ssx.errors import ProtocolError, ReplayError
from ssx.interfaces import ICipherSuite, ITcpClientCodec, ITcpServerCodec, IUdpClientCodec

__all__ = [
    "TcpClientCodec",
    "TcpServerCodec",
    "UdpClientCodec",
    "Suite2022",
    "LegacyClientCodec",
    "LegacyServerCodec",
    "LegacyUdpClientCodec",
]

Clock = Callable[[], float]

# The longest address header (ATYP 3, 255-byte name): a stream whose first
# plaintext bytes cannot start with an address within this is broken.
_MAX_ADDRESS = 1 + 1 + 255 + 2


# The faces of a suite's codecs, declared once in ssx.interfaces; the old
# names stay for the annotations that use them.
TcpClientCodec = ITcpClientCodec
TcpServerCodec = ITcpServerCodec
UdpClientCodec = IUdpClientCodec


@implementer(ITcpClientCodec)
class LegacyClientCodec:
    """Stream, AEAD-2017 and none: the address is the stream's first plaintext."""

    __slots__ = ("encrypt", "decrypt")

    def __init__(self, suite: Any) -> None:
        self.encrypt = suite.tcp_encryptor().encrypt
        self.decrypt = suite.tcp_decryptor().decrypt

    def first(self, address: Address, payload: bytes) -> bytes:
        return self.encrypt(encode_address(address) + payload)


@implementer(ITcpServerCodec)
class LegacyServerCodec:
    """
    Parses the address at the start of the decrypted stream.  With a salt
    filter, the client's salt is checked once the stream has authenticated
    (so garbage cannot fill the filter) and this server's own outgoing salts
    are remembered too (so a reflected response is refused as a replay).
    """

    __slots__ = ("address", "user", "_decryptor", "_decrypt", "_head", "_suite", "_encrypt", "_salts")

    def __init__(self, suite: Any, salt_filter: Any = None) -> None:
        self.address: Address | None = None
        self.user: str | None = None
        self._suite = suite
        self._decryptor = suite.tcp_decryptor()
        self._decrypt = self._decryptor.decrypt
        self._head = b""
        self._encrypt: Callable[[bytes], bytes] | None = None
        self._salts = salt_filter if suite.spec.salt_size else None

    def decrypt(self, data: bytes) -> bytes:
        plain = self._decrypt(data)
        if self.address is not None:
            return plain
        head = self._head + plain
        parsed = decode_target(head)
        if parsed is None:
            if len(head) >= _MAX_ADDRESS:
                raise ProtocolError("no address at the start of the stream")
            self._head = head
            return b""
        if self._salts is not None and not self._salts.check_and_add(self._decryptor.salt):
            raise ReplayError("salt seen before")
        self.address, end = parsed
        self._head = b""
        return head[end:]

    def _encryptor(self) -> Callable[[bytes], bytes]:
        if self._encrypt is None:
            salts = self._salts
            # With a filter, our own salts are made recognisable (a reflected
            # response is then refused as a replay).
            salt = salts.own_salt(self._suite.spec.salt_size) if salts is not None else None
            self._encrypt = self._suite.tcp_encryptor(salt).encrypt
        return self._encrypt

    def encrypt(self, data: bytes) -> bytes:
        return self._encryptor()(data)

    def data_path(self) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
        # After the address the decryptor's output is the application's, as is.
        return self._decrypt, self._encryptor()


@implementer(IUdpClientCodec)
class LegacyUdpClientCodec:
    """Stateless: each datagram sealed on its own."""

    __slots__ = ("seal", "open")

    def __init__(self, suite: Any) -> None:
        self.seal = suite.udp_seal
        self.open = suite.udp_open


@implementer(ITcpClientCodec)
class _Client2022Codec:
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
class _Server2022Codec:
    __slots__ = ("address", "user", "_request", "_response")

    def __init__(self, decoder: RequestDecoder) -> None:
        self.address: Address | None = None
        self.user: str | None = None
        self._request = decoder
        self._response: Any = None

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
class _Udp2022ClientCodec:
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

    def client_codec(self) -> _Client2022Codec:
        return _Client2022Codec(self.spec.name, self._keys, self._now)

    def server_codec(self, salt_filter: Any = None) -> _Server2022Codec:
        # 2022 keeps its own exact salt pool (bounded by the timestamp window).
        return _Server2022Codec(
            RequestDecoder(self.spec.name, self._psk, salt_check=self.salts, now=self._now, users=self._users)
        )

    def udp_client_codec(self) -> _Udp2022ClientCodec:
        return _Udp2022ClientCodec(self.spec.name, self._keys, self._now)

    def udp_server_decoder(self) -> UdpServerDecoder:
        return UdpServerDecoder(self.spec.name, self._psk, now=self._now, users=self._users)

    @staticmethod
    def replay_window() -> SlidingWindow:
        return SlidingWindow()

