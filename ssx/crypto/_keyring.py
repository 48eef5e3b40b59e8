"""
`KeyRing`: the keys one server port accepts, and how it finds a
connection's or a datagram's key among them.

A port with one key (a password, a 2022 PSK with or without identity
headers) is a ring of one: its codecs are that key's suite's, with
nothing tried.  A port with several keys (outline-ss-server's access keys,
or the users of a 2022 ChaCha port, which has no identity header) finds a
TCP connection's key by trial decryption: once the stream holds the
longest salt of the ring and the first sealed chunk after it, each key in
turn derives its subkey from the salt and tries to open that chunk (the
2-byte length of AEAD-2017, the fixed request header of 2022).  A UDP
datagram is opened with each key in turn.  The key that matched moves to
the front, so a busy key costs one try.

No key matching is an `AuthenticationError`, as a bad tag is with one key:
the caller treats both alike.  A miss has tried every key, so its cost
grows with the ring (about 4 µs a key here, see benchmarks/RESULTS.md),
as outline-ss-server's does; a prober learns from the time only how many
keys the port has, never whether a key exists.  No Twisted here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence, Union

from zope.interface import implementer

from ssx.crypto._registry import MethodSpec
from ssx.crypto._salt_filter import SaltFilter
from ssx.crypto._suite import CipherSuite
from ssx.crypto.edition2022 import Suite2022, UdpClientPacket, UdpServerDecoder, UdpServerSession, UserKey
from ssx.crypto.edition2022.replay import SlidingWindow
from ssx.errors import AuthenticationError, ConfigError, ProtocolError
from ssx.interfaces import ITcpServerCodec
from ssx.wire.address import Address

__all__ = ["AccessKey", "KeyRing"]

Suite = Union[CipherSuite, Suite2022]


@dataclass(frozen=True, eq=False)
class AccessKey:
    """One key of a port: its id (None for a port's only, unnamed key) and its suite."""

    id: str | None
    suite: Suite

    def __repr__(self) -> str:
        return f"<AccessKey id={self.id!r} method={self.suite.spec.name!r}>"


class KeyRing:
    """
    A port's keys in the order they are tried, the most recently matched
    first.  Every key of a ring of several has an id and an AEAD method
    of one edition (AEAD-2017, or 2022 without identity headers).
    """

    def __init__(self, keys: Sequence[AccessKey]) -> None:
        if not keys:
            raise ConfigError("keys", "a port needs at least one key")
        families = {key.suite.spec.family for key in keys}
        if len(keys) > 1:
            for key in keys:
                spec = key.suite.spec
                if spec.family not in ("aead", "aead2022"):
                    raise ConfigError("keys", f"several keys on one port need AEAD methods, not {spec.name}")
                if key.id is None:
                    raise ConfigError("keys", "every key of a port with several keys needs an id")
                if isinstance(key.suite, Suite2022) and key.suite.has_users:
                    raise ConfigError("keys", "a 2022 key with users cannot share its port with other keys")
            if len(families) > 1:
                raise ConfigError("keys", "a port's keys are all AEAD-2017 or all 2022 methods, not both")
        self._keys: list[AccessKey] = list(keys)
        #: The first key's method: the edition the port's relays speak.
        self.spec: MethodSpec = keys[0].suite.spec
        # A stream is tried once it holds what its largest-salt key needs.
        self.first_size = max(getattr(key.suite, "first_chunk_size", 0) for key in keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"<KeyRing of {len(self._keys)} keys, method={self.spec.name!r}>"

    @property
    def keys(self) -> tuple[AccessKey, ...]:
        """The keys, in the order the next lookup tries them."""
        return tuple(self._keys)

    @property
    def suite(self) -> Suite:
        """The first key's suite (for a ring of one: the port's suite)."""
        return self._keys[0].suite

    def _matched(self, index: int) -> AccessKey:
        keys = self._keys
        key = keys[index]
        if index:
            # Move to front: a list of a thousand moves in about a microsecond.
            del keys[index]
            keys.insert(0, key)
        return key

    def find(self, data: bytes | memoryview) -> AccessKey:
        """
        The key whose subkey opens the first chunk of a stream starting
        with `data` (at least `first_size` bytes), moved to the front;
        AuthenticationError when none does, after trying every key.
        """
        if len(data) < self.first_size:
            raise ValueError(f"a lookup needs {self.first_size} bytes, not {len(data)}")
        view = memoryview(data)
        for index, key in enumerate(self._keys):
            if key.suite.opens_first_chunk(view):
                return self._matched(index)
        raise AuthenticationError("no key of the port opens the stream")

    def server_codec(self, salt_filter: SaltFilter | None = None) -> ITcpServerCodec:
        """The server's codec for one new TCP connection; `salt_filter` refuses replayed salts."""
        if len(self._keys) == 1:
            return _KeyedCodec(self._keys[0], salt_filter)
        return _TrialCodec(self, salt_filter)

    def open_datagram(self, packet: bytes) -> tuple[AccessKey, bytes]:
        """
        (the key, the plaintext) of one AEAD-2017 (or stream, none)
        datagram, trying each key; AuthenticationError (or ProtocolError)
        if none opens it.
        """
        keys = self._keys
        if len(keys) == 1:
            key = keys[0]
            # The suite's bound opener itself: one call fewer per datagram than `udp_open`.
            return key, key.suite._open(packet)  # type: ignore[union-attr]
        for index, key in enumerate(keys):
            try:
                plaintext = key.suite.udp_open(packet)  # type: ignore[union-attr]
            except ProtocolError:
                continue
            return self._matched(index), plaintext
        raise AuthenticationError("no key of the port opens the datagram")

    def udp_server_decoder(self) -> UdpServerDecoder | _TrialUdpDecoder:
        """The 2022 datagram decoder of the port: its only suite's, or one that tries each key."""
        if len(self._keys) == 1:
            suite = self._keys[0].suite
            assert isinstance(suite, Suite2022)
            return suite.udp_server_decoder()
        return _TrialUdpDecoder(self)

    @staticmethod
    def replay_window() -> SlidingWindow:
        return SlidingWindow()


@implementer(ITcpServerCodec)
class _KeyedCodec:
    """A key's own server codec, with the key's id as the user where the suite names none."""

    __slots__ = ("address", "user", "key", "_inner", "decrypt", "encrypt", "data_path")

    def __init__(self, key: AccessKey, salt_filter: SaltFilter | None) -> None:
        self.address: Address | None = None
        self.user: str | None = None
        #: The connection's key.
        self.key = key
        inner = key.suite.server_codec(salt_filter)
        self._inner = inner
        self.encrypt = inner.encrypt
        self.data_path = inner.data_path
        # Until the header is in; then the suite's own, with no layer between.
        self.decrypt = self._header

    def _header(self, data: bytes) -> bytes:
        inner = self._inner
        out: bytes = inner.decrypt(data)
        if inner.address is not None:
            self.address = inner.address
            self.user = inner.user if inner.user is not None else self.key.id
            self.decrypt = inner.decrypt
        return out


@implementer(ITcpServerCodec)
class _TrialCodec:
    """A connection to a port of several keys: buffers the stream's start until its key is found."""

    __slots__ = ("address", "user", "key", "_ring", "_salt_filter", "_head", "_inner")

    def __init__(self, ring: KeyRing, salt_filter: SaltFilter | None) -> None:
        self.address: Address | None = None
        self.user: str | None = None
        self.key: AccessKey | None = None
        self._ring = ring
        self._salt_filter = salt_filter
        self._head = b""
        self._inner: _KeyedCodec | None = None

    def decrypt(self, data: bytes) -> bytes:
        inner = self._inner
        if inner is None:
            head = self._head + data
            if len(head) < self._ring.first_size:
                self._head = head
                return b""
            self._head = b""
            self.key = self._ring.find(head)
            inner = self._inner = _KeyedCodec(self.key, self._salt_filter)
            data = head
        out = inner.decrypt(data)
        if self.address is None and inner.address is not None:
            self.address, self.user = inner.address, inner.user
        return out

    def encrypt(self, data: bytes) -> bytes:
        if self._inner is None:
            raise RuntimeError("no key found yet")
        return self._inner.encrypt(data)

    def data_path(self) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
        if self._inner is None:
            raise RuntimeError("no key found yet")
        return self._inner.data_path()


class _TrialUdpDecoder:
    """The 2022 datagrams of a port of several keys (ChaCha users): each key's decoder in turn."""

    def __init__(self, ring: KeyRing) -> None:
        self._ring = ring
        self._decoders: dict[int, tuple[UdpServerDecoder, UserKey]] = {}
        # By key id (unique on a port): a session's replies are sealed by
        # the decoder of the key that opened it, in that key's method.
        self._by_id: dict[str, UdpServerDecoder] = {}
        for key in ring.keys:
            suite = key.suite
            assert isinstance(suite, Suite2022) and key.id is not None
            decoder = suite.udp_server_decoder()
            self._decoders[id(key)] = (decoder, UserKey(key.id, suite.psk))
            self._by_id[key.id] = decoder

    def decode(self, packet: bytes) -> UdpClientPacket:
        ring = self._ring
        for index, key in enumerate(ring._keys):
            decoder, user = self._decoders[id(key)]
            try:
                decoded = decoder.decode(packet)
            except ProtocolError:
                continue
            ring._matched(index)
            # The user's key makes any decoder's `session` the user's.
            return replace(decoded, user=user)
        raise AuthenticationError("no key of the port opens the datagram")

    def session(self, packet: UdpClientPacket) -> UdpServerSession:
        """The reply side of `packet`'s session, in the method of the key that opened it."""
        assert packet.user is not None
        return self._by_id[packet.user.name].session(packet)
