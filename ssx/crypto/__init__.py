"""
The cipher layer of ssx: method table, key derivation, the Shadowsocks
framing of every edition for TCP streams and UDP datagrams, and the replay
filters.

Sans-IO and Twisted-free: the relays feed bytes in and write bytes out.
Both suites, `CipherSuite` (stream, AEAD-2017, none) and `Suite2022`
(SIP022), provide `ssx.interfaces.ICipherSuite`: the TCP relays, the local
end's UDP and the health check use only what it declares (the server's UDP
relays also use their edition's own datagram methods, choosing by
`spec.family`).

Layout: `_registry` (the method table), `_suite` (`CipherSuite` and its
codecs) over `_aead`, `_stream`, `_plain` and `_kdf`; `_chunks` (the AEAD
chunk loop both editions share); `_xchacha` (XChaCha20-Poly1305, for
AEAD-2017's xchacha20-ietf-poly1305 and the 2022 ChaCha method's UDP);
`_salt_filter` (the servers' replay filter
for stream and AEAD-2017 salts); `_shared_salt_filter` (the same filter in
a file the processes of `--workers` share); `_keyring` (`KeyRing`, a server port's
keys, found per connection and datagram by trial decryption when there are
several: `make_key_ring`); `edition2022/` (everything of the 2022
edition, its own replay checks included); `certificate` (TLS keys for the
`ssl:` endpoints, not Shadowsocks).
"""

import time
from typing import Callable, Mapping, Sequence

from ssx.crypto.edition2022 import MAX_TIME_DIFF, Suite2022, generate_psk
from ssx.crypto._registry import METHODS, MethodSpec, lookup_method
from ssx.crypto._keyring import AccessKey, KeyRing
from ssx.crypto._salt_filter import SaltFilter
from ssx.crypto._shared_salt_filter import SharedSaltFilter
from ssx.crypto._suite import CipherSuite, TcpDecryptor, TcpEncryptor
from ssx.errors import ConfigError

__all__ = [
    "METHODS",
    "MethodSpec",
    "lookup_method",
    "CipherSuite",
    "Suite2022",
    "TcpEncryptor",
    "TcpDecryptor",
    "SaltFilter",
    "SharedSaltFilter",
    "generate_psk",
    "make_suite",
    "AccessKey",
    "KeyRing",
    "make_key_ring",
    "MAX_TIME_DIFF",
]


def make_suite(
    method: str,
    password: str,
    *,
    key: bytes | None = None,
    users: Mapping[str, str] | None = None,
    now: Callable[[], float] = time.time,
) -> CipherSuite | Suite2022:
    """
    The suite for a configured method: keys derived (or PSKs decoded) once
    here, for every connection to share.  `now` is the clock 2022 headers
    are stamped and checked with (the reactor's, in the services).
    """
    spec = lookup_method(method)
    if spec.family == "aead2022":
        if key is not None:
            raise ConfigError("key", f"{spec.name} takes its base64 key as the password (-k), not --key")
        return Suite2022(spec.name, password, users=users, now=now)
    if users:
        raise ConfigError("users", f"several users on one port need a 2022 method, not {spec.name}")
    if key is not None:
        return CipherSuite.from_key(spec.name, key)
    return CipherSuite(spec.name, password)


def make_key_ring(
    method: str,
    password: str,
    *,
    key: bytes | None = None,
    users: Mapping[str, str] | None = None,
    keys: Sequence[tuple[str, str, str]] = (),
    now: Callable[[], float] = time.time,
) -> KeyRing:
    """
    A server port's keys: each of `keys` ((id, method, secret), as
    outline-ss-server lists them), or for a 2022 ChaCha method the `users`
    (it has no identity header: each user's key is tried), or else the
    one suite of `method` and `password` (with its 2022 identity-header
    users, if any).
    """
    if keys:
        return KeyRing([AccessKey(id, make_suite(cipher, secret, now=now)) for id, cipher, secret in keys])
    spec = lookup_method(method)
    if users and spec.family == "aead2022" and spec.name == "2022-blake3-chacha20-poly1305":
        make_suite(method, password, key=key, now=now)  # the port's own PSK is checked as ever
        return KeyRing([AccessKey(name, Suite2022(spec.name, psk, now=now)) for name, psk in users.items()])
    return KeyRing([AccessKey(None, make_suite(method, password, key=key, users=users, now=now))])
