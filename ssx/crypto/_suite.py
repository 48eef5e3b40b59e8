"""
`CipherSuite`: one configured stream, AEAD-2017 or none method plus its
master key, and the per-connection codecs it hands the relays.

The relays hold one suite per configured server/port and ask it for a fresh
codec per TCP connection (`client_codec`, `server_codec`) or per
application's datagrams (`udp_client_codec`): the faces declared in
`ssx.interfaces`, which `Suite2022` (`ssx.crypto.edition2022.suite`) shows
for the 2022 edition, so the protocols never know which edition they carry.
Underneath, the suite makes an encryptor and a decryptor per TCP direction
and seals/opens single UDP datagrams by dispatching to the family modules
(`_aead`, `_stream`, `_plain`); it does no cipher work itself.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Callable, Protocol

from zope.interface import implementer

from ssx.wire.address import Address, decode_target, encode_address
from cryptography.exceptions import InvalidTag

from ssx.crypto._aead import (
    AEAD_PRIMITIVES,
    TAG_SIZE,
    AeadTcpDecryptor,
    AeadTcpEncryptor,
    UdpOpen,
    UdpSeal,
    aead_udp_opener,
    aead_udp_sealer,
)
from ssx.crypto._kdf import derive_subkey, evp_bytes_to_key
from ssx.crypto._plain import PlainTcpDecryptor, PlainTcpEncryptor
from ssx.crypto._registry import MethodSpec, lookup_method
from ssx.crypto._salt_filter import SaltFilter
from ssx.crypto._stream import (
    STREAM_CIPHERS,
    StreamTcpDecryptor,
    StreamTcpEncryptor,
    stream_udp_opener,
    stream_udp_sealer,
)
from ssx.errors import ConfigError, ProtocolError, ReplayError
from ssx.interfaces import ICipherSuite, ITcpClientCodec, ITcpServerCodec, IUdpClientCodec

__all__ = [
    "CipherSuite",
    "TcpEncryptor",
    "TcpDecryptor",
    "Aead2017TcpClientCodec",
    "Aead2017TcpServerCodec",
    "Aead2017UdpClientCodec",
]

# The longest address header (ATYP 3, 255-byte name): a stream whose first
# plaintext bytes cannot start with an address within this is broken.
_MAX_ADDRESS = 1 + 1 + 255 + 2


class TcpEncryptor(Protocol):
    """Sending side of one TCP direction."""

    #: The salt/IV this direction sends (b"" for the none method).
    salt: bytes

    def encrypt(self, data: bytes) -> bytes:
        """Ciphertext for `data`; the first non-empty result starts with the salt."""


class TcpDecryptor(Protocol):
    """Receiving side of one TCP direction."""

    #: The peer's salt/IV once it has arrived, else None.
    salt: bytes | None

    def decrypt(self, data: bytes) -> bytes:
        """Plaintext completed by `data` (possibly b""); ProtocolError on bad input."""


@implementer(ITcpClientCodec)
class Aead2017TcpClientCodec:
    """
    The local end's side of one TCP connection in the AEAD-2017 framing,
    which the stream and none methods share: salt (IV), then a cipher
    stream whose first plaintext is the target's address.
    """

    __slots__ = ("encrypt", "decrypt")

    def __init__(self, suite: CipherSuite) -> None:
        self.encrypt = suite.tcp_encryptor().encrypt
        self.decrypt = suite.tcp_decryptor().decrypt

    def first(self, address: Address, payload: bytes) -> bytes:
        return self.encrypt(encode_address(address) + payload)


@implementer(ITcpServerCodec)
class Aead2017TcpServerCodec:
    """
    The server's side of one TCP connection in the AEAD-2017 framing (and
    the stream and none methods'): parses the address at the start of the
    decrypted stream.  With a salt
    filter, the client's salt is checked once the stream has authenticated
    (so garbage cannot fill the filter) and this server's own outgoing salts
    are remembered too (so a reflected response is refused as a replay).
    """

    __slots__ = ("address", "user", "_decryptor", "_decrypt", "_head", "_suite", "_encrypt", "_salts")

    def __init__(self, suite: CipherSuite, salt_filter: SaltFilter | None = None) -> None:
        self.address: Address | None = None
        self.user: str | None = None
        self._suite = suite
        self._decryptor = suite._new_decryptor()
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
        salts = self._salts
        if salts is not None:
            salt = self._decryptor.salt
            assert salt is not None  # it has yielded plaintext, so its salt is in
            if not salts.check_and_add(salt):
                raise ReplayError("salt seen before")
        self.address, end = parsed
        self._head = b""
        return head[end:]

    def _encryptor(self) -> Callable[[bytes], bytes]:
        if self._encrypt is None:
            salts = self._salts
            # With a filter, our own salts are made recognisable (a reflected
            # response is then refused as a replay).
            suite = self._suite
            size = suite.spec.salt_size
            salt = salts.own_salt(size) if salts is not None else os.urandom(size)
            self._encrypt = suite._new_encryptor(salt).encrypt
        return self._encrypt

    def encrypt(self, data: bytes) -> bytes:
        return self._encryptor()(data)

    def data_path(self) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
        # After the address the decryptor's output is the application's, as is.
        return self._decrypt, self._encryptor()


@implementer(IUdpClientCodec)
class Aead2017UdpClientCodec:
    """
    The local end's datagrams in the AEAD-2017 framing (and the stream and
    none methods'): stateless, each datagram sealed on its own.
    """

    __slots__ = ("seal", "open")

    def __init__(self, suite: CipherSuite) -> None:
        # The suite's bound per-datagram functions themselves: one call
        # fewer per datagram than its methods.
        self.seal = suite._seal
        self.open = suite._open


@implementer(ICipherSuite)
class CipherSuite:
    """One configured method and password; the master key is derived once here."""

    __slots__ = ("spec", "_key", "_seal", "_open", "_new_encryptor", "_new_decryptor")

    spec: MethodSpec
    _seal: UdpSeal
    _open: UdpOpen
    # A TCP direction's encryptor from its salt, and a decryptor.
    _new_encryptor: Callable[[bytes], TcpEncryptor]
    _new_decryptor: Callable[[], TcpDecryptor]

    def __init__(self, method: str, password: str | bytes) -> None:
        spec = lookup_method(method)
        if spec.family == "aead2022":
            raise ConfigError("method", f"{spec.name} is a 2022 method: use make_suite")
        secret = password.encode("utf-8") if isinstance(password, str) else password
        self.spec = spec
        self._key = evp_bytes_to_key(secret, spec.key_size)
        self._bind()

    @classmethod
    def from_key(cls, method: str, key: bytes) -> CipherSuite:
        """A suite from a raw master key (libev's `--key`, already decoded)."""
        spec = lookup_method(method)
        if spec.family == "aead2022":
            raise ConfigError("key", f"{spec.name} takes its base64 key as the password (-k), not --key")
        if len(key) != spec.key_size:
            raise ConfigError(
                "key",
                f"{spec.name} needs a {spec.key_size}-byte key, got {len(key)} bytes",
            )
        suite = cls.__new__(cls)
        suite.spec = spec
        suite._key = bytes(key)
        suite._bind()
        return suite

    def _bind(self) -> None:
        # The datagram path and the TCP directions' constructors, with the
        # method and key bound once (a datagram or a connection then costs
        # no family dispatch or table lookups).
        spec, key = self.spec, self._key
        if spec.family == "aead":
            algorithm = AEAD_PRIMITIVES[spec.name]
            self._seal = aead_udp_sealer(algorithm, key, spec.salt_size, spec.name)
            self._open = aead_udp_opener(algorithm, key, spec.salt_size)
            self._new_encryptor = partial(AeadTcpEncryptor, algorithm, key)
            self._new_decryptor = partial(AeadTcpDecryptor, algorithm, key, spec.salt_size)
        elif spec.family == "stream":
            cipher = STREAM_CIPHERS[spec.name]
            self._seal = stream_udp_sealer(cipher, key, spec.salt_size, spec.name)
            self._open = stream_udp_opener(cipher, key, spec.salt_size)
            self._new_encryptor = partial(StreamTcpEncryptor, cipher, key)
            self._new_decryptor = partial(StreamTcpDecryptor, cipher, key, spec.salt_size)
        else:
            self._seal = _plain_seal
            self._open = bytes
            self._new_encryptor = _plain_encryptor
            self._new_decryptor = PlainTcpDecryptor

    def __repr__(self) -> str:
        # Never show the key: suites end up in logs and tracebacks.
        return f"<CipherSuite method={self.spec.name!r}>"

    def _fresh_salt(self, salt: bytes | None) -> bytes:
        size = self.spec.salt_size
        if salt is None:
            return os.urandom(size)
        if len(salt) != size:
            raise ValueError(f"{self.spec.name} salt must be {size} bytes, not {len(salt)}")
        return bytes(salt)

    def tcp_encryptor(self, salt: bytes | None = None) -> TcpEncryptor:
        """A new sending direction; `salt` fixes the salt/IV (tests only)."""
        return self._new_encryptor(self._fresh_salt(salt))

    def tcp_decryptor(self) -> TcpDecryptor:
        """A new receiving direction."""
        return self._new_decryptor()

    @property
    def first_chunk_size(self) -> int:
        """Bytes a stream's start needs for `opens_first_chunk`: the salt and the sealed length."""
        return self.spec.salt_size + 2 + TAG_SIZE

    def opens_first_chunk(self, data: bytes | memoryview) -> bool:
        """
        Whether this key opens the sealed length after the salt at the
        start of `data` (at least `first_chunk_size` bytes): how a port
        with several keys finds a connection's (AEAD methods only).
        """
        spec = self.spec
        if spec.family != "aead":
            raise ValueError(f"{spec.name} has no tag to try a key on")
        algorithm = AEAD_PRIMITIVES[spec.name]
        size = spec.salt_size
        view = memoryview(data)
        subkey = derive_subkey(self._key, bytes(view[:size]))
        try:
            algorithm.factory(subkey).decrypt(bytes(algorithm.nonce_size), view[size : size + 2 + TAG_SIZE], None)
        except InvalidTag:
            return False
        return True

    def client_codec(self) -> ITcpClientCodec:
        """The local end's codec for one new TCP connection."""
        return Aead2017TcpClientCodec(self)

    def server_codec(self, salt_filter: SaltFilter | None = None) -> ITcpServerCodec:
        """The server's codec for one new TCP connection; `salt_filter` refuses replayed salts."""
        return Aead2017TcpServerCodec(self, salt_filter)

    def udp_client_codec(self) -> IUdpClientCodec:
        """The local end's codec for one application's datagrams."""
        return Aead2017UdpClientCodec(self)

    def udp_seal(self, plaintext: bytes, salt: bytes | None = None) -> bytes:
        """One encrypted datagram; `salt` fixes the salt/IV (tests only)."""
        return self._seal(plaintext, salt)

    def udp_open(self, packet: bytes) -> bytes:
        """The plaintext of one datagram; AuthenticationError/ProtocolError if bad."""
        return self._open(packet)


def _plain_seal(plaintext: bytes, salt: bytes | None = None) -> bytes:
    # The none method: no salt (a given one must be empty, as _fresh_salt says).
    if salt:
        raise ValueError(f"none salt must be 0 bytes, not {len(salt)}")
    return bytes(plaintext)


def _plain_encryptor(salt: bytes) -> PlainTcpEncryptor:
    # The none method's sending direction: it has no salt to take.
    return PlainTcpEncryptor()
