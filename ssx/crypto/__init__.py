"""
The cipher layer of ssx: method table, key derivation and the Shadowsocks
framing (AEAD-2017, legacy stream, none) for TCP streams and UDP datagrams.

Sans-IO and Twisted-free: the relays feed bytes in and write bytes out.
Both suites, `CipherSuite` and `Suite2022`, provide
`ssx.interfaces.ICipherSuite`: the TCP relays, the local end's UDP and the
health check use only what it declares (the server's UDP relays also use
their edition's own datagram methods, choosing by `spec.family`).
"""

import time
from typing import Callable, Mapping

from ssx.crypto.edition2022 import Suite2022, generate_psk
from ssx.crypto._registry import METHODS, MethodSpec, lookup_method
from ssx.crypto._suite import CipherSuite, TcpDecryptor, TcpEncryptor
from ssx.errors import ConfigError
from ssx.interfaces import ITcpClientCodec, ITcpServerCodec, IUdpClientCodec

__all__ = [
    "METHODS",
    "MethodSpec",
    "lookup_method",
    "CipherSuite",
    "Suite2022",
    "TcpEncryptor",
    "TcpDecryptor",
    "TcpClientCodec",
    "TcpServerCodec",
    "UdpClientCodec",
    "generate_psk",
    "make_suite",
]

# The faces of a suite's codecs, declared once in ssx.interfaces; the old
# names stay for the annotations that use them.
TcpClientCodec = ITcpClientCodec
TcpServerCodec = ITcpServerCodec
UdpClientCodec = IUdpClientCodec


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
