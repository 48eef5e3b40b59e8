"""
Keys of the Shadowsocks 2022 methods (SIP022/SIP023, wire.md §7.1 and §7.8).

Configuration time: `lookup_method_2022` names the method, `parse_password`
turns the password field (``uPSK`` or ``iPSK_0:…:uPSK``) into raw keys,
`user_table` builds a multi-user server's ``hash16(uPSK) -> user`` table and
`generate_psk` makes a new key.  Connection time: every TCP direction and
every UDP session derives its AEAD key with `session_subkey`, and identity
headers are sealed with `identity_subkey` and `AesBlock` (one AES block in
ECB mode).  Nothing here reads the clock or the network.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Union

import blake3
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ssx.errors import ConfigError

__all__ = [
    "METHODS_2022",
    "Method2022",
    "lookup_method_2022",
    "PskChain",
    "UserKey",
    "decode_psk",
    "parse_password",
    "user_table",
    "generate_psk",
    "session_subkey",
    "identity_subkey",
    "hash16",
    "AesBlock",
    "AeadPrimitive",
    "RandomSource",
    "require_key_size",
    "SESSION_SUBKEY_CONTEXT",
    "IDENTITY_SUBKEY_CONTEXT",
]

SESSION_SUBKEY_CONTEXT = "shadowsocks 2022 session subkey"
IDENTITY_SUBKEY_CONTEXT = "shadowsocks 2022 identity subkey"

AeadPrimitive = Union[AESGCM, ChaCha20Poly1305]
AeadFactory = Callable[[bytes], AeadPrimitive]
RandomSource = Callable[[int], bytes]


@dataclass(frozen=True, slots=True)
class Method2022:
    """The wire-visible parameters of one 2022 method."""

    name: str
    #: PSK length = salt length = session subkey length (L in wire.md).
    key_size: int
    #: AEAD of the TCP chunks, and of the UDP body for the AES methods.
    aead: AeadFactory = field(repr=False)
    #: True when UDP uses XChaCha20-Poly1305 keyed with the PSK (§7.7).
    udp_xchacha: bool = False

    @property
    def salt_size(self) -> int:
        """TCP salts are as long as the key."""
        return self.key_size

    @property
    def supports_identity_headers(self) -> bool:
        """SIP023 is defined for the AES methods only (ECB blocks)."""
        return not self.udp_xchacha


_SPECS: tuple[Method2022, ...] = (
    Method2022("2022-blake3-aes-128-gcm", 16, AESGCM),
    Method2022("2022-blake3-aes-256-gcm", 32, AESGCM),
    Method2022("2022-blake3-chacha20-poly1305", 32, ChaCha20Poly1305, udp_xchacha=True),
)
_BY_NAME: dict[str, Method2022] = {spec.name: spec for spec in _SPECS}

METHODS_2022: tuple[str, ...] = tuple(spec.name for spec in _SPECS)


def lookup_method_2022(method: str | Method2022) -> Method2022:
    """The spec of a 2022 method name (case-insensitive); ConfigError if unknown."""
    if isinstance(method, Method2022):
        return method
    try:
        return _BY_NAME[method.lower()]
    except KeyError:
        raise ConfigError(
            "method",
            f"unknown 2022 method {method!r}; choose one of: {', '.join(METHODS_2022)}",
        ) from None


@dataclass(frozen=True, slots=True)
class PskChain:
    """
    A client's keys: the identity PSKs of each hop, then the user's own PSK.

    `identity_keys` is empty for a plain single-user server.  The user key
    keys the session subkeys of both TCP directions and of UDP.
    """

    identity_keys: tuple[bytes, ...] = field(repr=False)
    user_key: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class UserKey:
    """One user of a multi-user (EIH) server: a name for logs and the uPSK."""

    name: str
    key: bytes = field(repr=False)


def decode_psk(method: str | Method2022, text: str, *, key: str = "password") -> bytes:
    """
    One base64 PSK of exactly the method's key length (padding optional).

    `key` names the configuration entry in the ConfigError; the message never
    contains the key itself.
    """
    spec = lookup_method_2022(method)
    stripped = text.strip()
    try:
        raw = base64.b64decode(stripped + "=" * (-len(stripped) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(
            key, f"{spec.name} needs a base64 key (e.g. from `openssl rand -base64 "
            f"{spec.key_size}`); this is not valid base64"
        ) from None
    if len(raw) != spec.key_size:
        raise ConfigError(
            key,
            f"{spec.name} needs a base64 key of exactly {spec.key_size} bytes, "
            f"got {len(raw)} bytes",
        )
    return raw


def parse_password(method: str | Method2022, password: str) -> PskChain:
    """
    A client password: ``uPSK`` or ``iPSK_0:…:iPSK_n-1:uPSK`` (SIP023).

    Identity headers need an AES method; asking for them with ChaCha is a
    ConfigError, as in rust and sing.
    """
    spec = lookup_method_2022(method)
    keys = [decode_psk(spec, part) for part in password.split(":")]
    if len(keys) > 1 and not spec.supports_identity_headers:
        raise ConfigError(
            "password",
            f"{spec.name} does not support identity headers (iPSK:uPSK); "
            "use a 2022-blake3-aes-* method",
        )
    return PskChain(tuple(keys[:-1]), keys[-1])


def user_table(method: str | Method2022, users: Mapping[str, str]) -> dict[bytes, UserKey]:
    """
    A multi-user server's lookup table ``hash16(uPSK) -> UserKey`` from
    ``{name: base64 uPSK}``.
    """
    spec = lookup_method_2022(method)
    if users and not spec.supports_identity_headers:
        raise ConfigError("users", f"{spec.name} does not support multiple users (EIH)")
    table: dict[bytes, UserKey] = {}
    for name, text in users.items():
        psk = decode_psk(spec, text, key=f"users.{name}")
        digest = hash16(psk)
        if digest in table:
            raise ConfigError(
                "users", f"users {table[digest].name!r} and {name!r} have the same key"
            )
        table[digest] = UserKey(name, psk)
    return table


def require_key_size(spec: Method2022, *keys: bytes) -> None:
    """ValueError unless every key is exactly L bytes (raw keys built in code)."""
    for key in keys:
        if len(key) != spec.key_size:
            raise ValueError(f"{spec.name} keys are {spec.key_size} bytes, not {len(key)}")


def generate_psk(method: str | Method2022, urandom: RandomSource = os.urandom) -> str:
    """A fresh PSK for `method`, base64 as it goes in the password field."""
    spec = lookup_method_2022(method)
    return base64.b64encode(urandom(spec.key_size)).decode("ascii")


def session_subkey(psk: bytes, salt: bytes) -> bytes:
    """
    The AEAD key of one TCP direction (salt) or one UDP session (session ID).

    BLAKE3 output is a stream, so taking ``len(psk)`` bytes equals cutting a
    longer output.
    """
    return blake3.blake3(psk + salt, derive_key_context=SESSION_SUBKEY_CONTEXT).digest(
        length=len(psk)
    )


def identity_subkey(psk: bytes, salt: bytes) -> bytes:
    """The AES key that seals a TCP identity header for the hop owning `psk`."""
    return blake3.blake3(psk + salt, derive_key_context=IDENTITY_SUBKEY_CONTEXT).digest(
        length=len(psk)
    )


def hash16(key: bytes) -> bytes:
    """The 16-byte name of a key in identity headers: plain BLAKE3, cut."""
    return blake3.blake3(key).digest(length=16)


class AesBlock:
    """
    One AES key used on single 16-byte blocks (ECB, no padding).

    Used for TCP identity headers and for the UDP separate header.  ECB has
    no state between blocks, so one encryptor and one decryptor context
    serve every block; callers always pass exactly 16 bytes.
    """

    __slots__ = ("encrypt", "decrypt")

    encrypt: Callable[[bytes | memoryview], bytes]
    decrypt: Callable[[bytes | memoryview], bytes]

    def __init__(self, key: bytes) -> None:
        cipher = Cipher(algorithms.AES(key), modes.ECB())
        self.encrypt = cipher.encryptor().update
        self.decrypt = cipher.decryptor().update
