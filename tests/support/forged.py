"""
Client requests carrying any plaintext, for every method family, and the
rule a server must judge their target headers by.

What a peer holding the key can put in front of the server's header
decoder, and, under a stream cipher, what a prober's random bytes decrypt
to.  Built by hand, because ssx's own encoders refuse to send what the
server must refuse.  `reference_check` is the validity rule of wire.md §2
written out independently of `ssx.wire.address`, for the tests to compare with.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Callable

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import strategies as st

from ssx.crypto import generate_psk, lookup_method, make_suite
from ssx.crypto.edition2022 import decode_psk, lookup_method_2022, session_subkey

__all__ = ["FAMILIES", "INVALID_HEADERS", "header_bytes", "password_for", "reference_check", "reference_name", "request_plaintext", "tcp_request", "udp_datagram"]

# One method per family: stream, AEAD-2017, 2022.
FAMILIES = {"stream": "aes-256-cfb", "aead": "aes-256-gcm", "aead2022": "2022-blake3-aes-128-gcm"}

# Target headers no client sends, each beside the rule it breaks.
INVALID_HEADERS = {
    "port 0, IPv4": b"\x01\x5d\xb8\xd8\x22\x00\x00",
    "port 0, IPv6": b"\x04" + bytes(15) + b"\x01\x00\x00",
    "port 0, name": b"\x03\x0bexample.com\x00\x00",
    "empty label": b"\x03\x0cexample..com\x00\x50",
    "leading dot": b"\x03\x0c.example.com\x00\x50",
    "64-byte label": b"\x03\x48" + b"a" * 64 + b".example\x00\x50",
    "254 bytes": b"\x03\xfe" + b".".join([b"a" * 63] * 3 + [b"a" * 62]) + b"\x00\x50",
    "space": b"\x03\x0cexa mple.com\x00\x50",
    "slash": b"\x03\x10example.com/path\x00\x50",
    "raw UTF-8": b"\x03\x0fb\xc3\xbccher.example\x00\x50",
    "IPv6 zone": b"\x03\x0cfe80::1%eth0\x00\x50",
    "IPv6 in brackets": b"\x03\x05[::1]\x00\x50",
    "ATYP 0x13 (OTA bit)": b"\x13\x0bexample.com\x00\x50",
    "ATYP 0x81": b"\x81\x5d\xb8\xd8\x22\x00\x50",
    "ATYP 0": b"\x00\x5d\xb8\xd8\x22\x00\x50",
}

# Header-shaped plaintext: what random bytes decrypt to under a stream
# cipher, weighted towards the shapes that get as far as the name and port.
_NAME_ALPHABET = "abz09-_.:% /\x00\u00fc"
header_bytes = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda atyp, rest: bytes([atyp]) + rest, st.sampled_from([1, 3, 4, 0x11, 0x13, 0x14, 0x83]), st.binary(max_size=30)),
    st.builds(
        lambda name, port: b"\x03" + bytes([len(name)]) + name + port,
        st.one_of(st.binary(min_size=1, max_size=80), st.text(_NAME_ALPHABET, min_size=1, max_size=80).map(lambda t: t.encode()[:255])),
        st.sampled_from([b"\x00\x00", b"\x00\x50", b"\xff\xff", b""]),
    ),
)

_PASSWORDS: dict[str, str] = {}

_LABEL_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def password_for(method: str) -> str:
    """A password for `method` (a base64 PSK for 2022 methods), the same for the whole run."""
    if method not in _PASSWORDS:
        _PASSWORDS[method] = generate_psk(method) if lookup_method(method).family == "aead2022" else "forged password"
    return _PASSWORDS[method]


def _nonce(counter: int) -> bytes:
    return counter.to_bytes(12, "little")


def tcp_request(method: str, header: bytes, payload: bytes, now: Callable[[], float]) -> bytes:
    """
    The stream a client with the key opens with to send `header` (taken as
    the target address header, whatever it holds) and `payload`.  For 2022
    the request is stamped with `now()` and padded when `payload` is empty.
    """
    password = password_for(method)
    plaintext = request_plaintext(method, header, payload)
    if lookup_method(method).family != "aead2022":
        return make_suite(method, password).tcp_encryptor().encrypt(plaintext)  # type: ignore[union-attr]
    spec = lookup_method_2022(method)
    psk = decode_psk(spec, password)
    salt = os.urandom(spec.salt_size)
    aead = spec.aead(session_subkey(psk, salt))
    fixed = b"\x00" + int(now()).to_bytes(8, "big") + len(plaintext).to_bytes(2, "big")
    return salt + aead.encrypt(_nonce(0), fixed, None) + aead.encrypt(_nonce(1), plaintext, None)


def request_plaintext(method: str, header: bytes, payload: bytes) -> bytes:
    """
    The plaintext `tcp_request` encrypts, in which the server looks for the
    target header: header and payload; for 2022 the variable-length header
    (header, padding length, padding, payload).
    """
    if lookup_method(method).family != "aead2022":
        return header + payload
    padding = b"" if payload else bytes(16)
    return header + len(padding).to_bytes(2, "big") + padding + payload


def udp_datagram(method: str, header: bytes, payload: bytes, now: Callable[[], float]) -> bytes:
    """The datagram a client with the key sends for `header` and `payload` (2022: AES methods only)."""
    password = password_for(method)
    if lookup_method(method).family != "aead2022":
        return make_suite(method, password).udp_seal(header + payload)  # type: ignore[union-attr]
    spec = lookup_method_2022(method)
    psk = decode_psk(spec, password)
    separate = os.urandom(8) + (1).to_bytes(8, "big")
    encrypted_separate = Cipher(algorithms.AES(psk), modes.ECB()).encryptor().update(separate)
    body = b"\x00" + int(now()).to_bytes(8, "big") + b"\x00\x00" + header + payload
    return encrypted_separate + AESGCM(session_subkey(psk, separate[:8])).encrypt(separate[4:], body, None)


def reference_check(plaintext: bytes) -> str:
    """
    What a server must make of a request whose plaintext starts with
    `plaintext`: "valid" (it may act on it), "invalid" (it must not) or
    "short" (the header has not all arrived).  Valid: ATYP 1 or 4, or ATYP 3
    with a host name (ASCII letters, digits, hyphen, underscore; dot-separated
    labels of 1..63; at most 253 bytes, one trailing dot allowed) or unscoped
    IPv6 text; and a port other than 0.
    """
    if not plaintext:
        return "short"
    atyp = plaintext[0]
    if atyp == 1:
        size = 7
    elif atyp == 4:
        size = 19
    elif atyp == 3:
        if len(plaintext) < 2:
            return "short"
        if plaintext[1] == 0:
            return "invalid"
        size = 4 + plaintext[1]
    else:
        return "invalid"
    if len(plaintext) < size:
        return "short"
    if plaintext[size - 2 : size] == b"\x00\x00":
        return "invalid"
    if atyp == 3 and not reference_name(plaintext[2 : size - 2]):
        return "invalid"
    return "valid"


def reference_name(name: bytes) -> bool:
    """Whether the name bytes of an ATYP 3 header pass the check (see `reference_check`)."""
    if b":" in name and b"%" not in name and name.isascii():
        try:
            ipaddress.IPv6Address(name.decode("ascii"))
            return True
        except ValueError:
            return False
    if name.endswith(b"."):
        name = name[:-1]
    if not 1 <= len(name) <= 253:
        return False
    for label in name.split(b"."):
        if not 1 <= len(label) <= 63 or not set(label) <= _LABEL_BYTES:
            return False
    return True
