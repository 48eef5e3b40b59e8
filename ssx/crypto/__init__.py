"""
The cipher layer of ssx: method table, key derivation and the Shadowsocks
framing (AEAD-2017, legacy stream, none) for TCP streams and UDP datagrams.

Sans-IO and Twisted-free: the relays feed bytes in and write bytes out.
"""

from ssx.crypto._registry import METHODS, MethodSpec, lookup_method
from ssx.crypto._suite import CipherSuite, TcpDecryptor, TcpEncryptor

__all__ = [
    "METHODS",
    "MethodSpec",
    "lookup_method",
    "CipherSuite",
    "TcpEncryptor",
    "TcpDecryptor",
]
