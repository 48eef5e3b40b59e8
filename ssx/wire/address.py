"""
The Shadowsocks target address header: ``ATYP | ADDR | PORT`` (wire.md §2).

The same bytes appear in three places on the data path: the SOCKS5 request
that `ssx-local` parses from an application (wire.md §1.3), the head of the
decrypted client-to-server stream that `ssx-server` parses to learn where to
connect (§3), and the head of every UDP plaintext in both directions.  This
module is the one codec for all of them; it is sans-IO and knows nothing of
sockets or ciphers.

`decode_address` sits on the server's hot path and reads straight out of the
caller's receive buffer (``bytes``, ``bytearray`` or a byte ``memoryview``)
without copying more than the address itself.

`decode_target` is what every server-side decoder (TCP and UDP, every
method family) parses a request's header with: `decode_address` plus
`check_target`, which refuses a header no genuine client sends (a name
that is not a host name, port 0).  Under a stream cipher a prober's random
bytes decrypt to random headers; this check is what keeps the server from
resolving or connecting on the strength of most of them.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from functools import lru_cache

from ssx.errors import AddressError, UnsupportedAddressType

__all__ = [
    "is_ip_literal",
    "ATYP_IPV4",
    "ATYP_DOMAIN",
    "ATYP_IPV6",
    "Address",
    "encode_address",
    "decode_address",
    "address_size",
    "check_target",
    "decode_target",
    "is_hostname",
]

ATYP_IPV4 = 1
ATYP_DOMAIN = 3
ATYP_IPV6 = 4

_IPV4_SIZE = 1 + 4 + 2
_IPV6_SIZE = 1 + 16 + 2
# ATYP, LEN and PORT around the name itself.
_DOMAIN_OVERHEAD = 1 + 1 + 2
_MAX_DOMAIN = 255

# A name with control characters in it is never a host name; letting one
# through would hand a peer a way to smuggle line breaks or NULs into logs
# and into the resolver.
_ASCII_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_TEXT_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")

# A host name as clients send it (wire.md §2: ASCII, IDNA A-labels): the
# LDH letters plus the underscore that real names carry (``_dmarc``, some
# CDNs), dot-separated labels of 1..63, at most 253 bytes without the one
# trailing dot a fully qualified name may have.  The same set as
# shadowsocks-libev's validate_hostname.  Hyphens may start or end a label:
# such names exist and browsers resolve them.
_HOSTNAME_BYTES = re.compile(r"[A-Za-z0-9_.-]+\Z")
_MAX_HOSTNAME = 253
_MAX_LABEL = 63


@dataclass(frozen=True, slots=True)
class Address:
    """
    A target: an IP literal or a domain name, and a port.

    `host` is dotted-quad IPv4, IPv6 text without brackets (compressed form
    when it comes from `decode_address`), or a domain name.  Nothing is
    checked here: `encode_address` refuses what cannot go on the wire.
    """

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def encode_address(address: Address) -> bytes:
    """
    The wire form of `address`.

    IP literals keep their own ATYP (1 or 4) so that a SOCKS client's choice
    survives the hop; anything else is sent as a name for the far end to
    resolve.  Raises `AddressError` for a port outside 0..65535, a scoped
    IPv6 literal, or a name that is empty, longer than 255 bytes once
    encoded, not IDNA-encodable, or contains control characters.
    """
    host = address.host
    port = address.port
    # bool is an int subclass; True as a port is a bug, not port 1.
    if isinstance(port, bool) or not isinstance(port, int):
        raise AddressError(f"port must be an integer, not {port!r}")
    if not 0 <= port <= 0xFFFF:
        raise AddressError(f"port {port} out of range 0..65535")
    return _encode_host(host) + port.to_bytes(2, "big")


@lru_cache(maxsize=4096)
def _encode_host(host: str) -> bytes:
    # ATYP and address, without the port: the same few hosts come back again
    # and again (the local end encodes each target more than once), and
    # parsing IP text is most of the cost.
    # IDNA first: its mapping can turn text such as fullwidth digits into an
    # IP literal, and that must go out with the same ATYP as the plain one.
    text = host if host.isascii() else _idna_encode(host)
    ip = _parse_ip_literal(text)
    if isinstance(ip, ipaddress.IPv4Address):
        return b"\x01" + ip.packed
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            # The 16 wire bytes cannot carry a zone; dropping it silently
            # would send the peer somewhere other than what was asked.
            raise AddressError(f"scoped IPv6 address {host!r} cannot be sent")
        return b"\x04" + ip.packed

    name = text.encode("ascii")
    if not 1 <= len(name) <= _MAX_DOMAIN:
        raise AddressError(
            f"domain name must be 1..{_MAX_DOMAIN} bytes, not {len(name)}"
        )
    if _ASCII_CONTROL.search(name) is not None:
        raise AddressError(f"control character in domain name {host!r}")
    return b"\x03" + bytes((len(name),)) + name


def address_size(
    data: bytes | bytearray | memoryview, offset: int = 0
) -> int | None:
    """
    The length of the address header starting at `offset`.

    Needs only the ATYP byte (and LEN for a name); returns None while those
    are not there yet.  Raises `UnsupportedAddressType` for an ATYP other
    than 1, 3 or 4 (the OTA bit 0x10 included) and `AddressError` for a name
    of length 0, as soon as the offending byte has arrived.
    """
    if offset < 0:
        raise ValueError(f"negative offset {offset}")
    available = len(data) - offset
    if available < 1:
        return None
    atyp = data[offset]
    if atyp == ATYP_IPV4:
        return _IPV4_SIZE
    if atyp == ATYP_IPV6:
        return _IPV6_SIZE
    if atyp == ATYP_DOMAIN:
        if available < 2:
            return None
        length = data[offset + 1]
        if length == 0:
            raise AddressError("domain name of length 0")
        return _DOMAIN_OVERHEAD + length
    raise UnsupportedAddressType(f"unsupported address type 0x{atyp:02x}")


def decode_address(
    data: bytes | bytearray | memoryview, offset: int = 0
) -> tuple[Address, int] | None:
    """
    Parse the address header that starts at `offset` in `data`.

    Returns ``(address, end)`` where `end` is the index just past the port,
    or None when `data` ends before the header does.  Malformed input raises
    an `AddressError` (`UnsupportedAddressType` for a bad ATYP) and nothing
    else.  A name is returned as sent (an IDNA A-label stays ``xn--…``);
    raw UTF-8 is accepted since some clients send it.
    """
    if 0 <= offset < len(data) and data[offset] == ATYP_IPV4:
        # The commonest header (every IPv4 target of a server, TCP or
        # UDP), parsed without `address_size`'s call.
        end = offset + _IPV4_SIZE
        if len(data) < end:
            return None
        return Address(socket.inet_ntoa(data[offset + 1 : offset + 5]), (data[end - 2] << 8) | data[end - 1]), end
    size = address_size(data, offset)
    if size is None:
        return None
    end = offset + size
    if len(data) < end:
        return None
    atyp = data[offset]
    port = (data[end - 2] << 8) | data[end - 1]
    host: str
    if atyp == ATYP_IPV4:
        # Dotted decimal, as an f-string of the four bytes would give, in one C call.
        host = socket.inet_ntoa(data[offset + 1 : offset + 5])
    elif atyp == ATYP_IPV6:
        host = ipaddress.IPv6Address(bytes(data[offset + 1 : end - 2])).compressed
    else:
        host = _decode_domain(bytes(data[offset + 2 : end - 2]))
    return Address(host, port), end


def _parse_ip_literal(
    host: str,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    # Pick the one parser that can match so a domain costs a single failed
    # parse rather than two.
    try:
        if ":" in host:
            return ipaddress.IPv6Address(host)
        return ipaddress.IPv4Address(host)
    except ValueError:
        return None


def _idna_encode(host: str) -> str:
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError as e:
        raise AddressError(f"cannot IDNA-encode host {host!r}: {e}") from e


def _decode_domain(raw: bytes) -> str:
    if raw.isascii():
        if _ASCII_CONTROL.search(raw) is not None:
            raise AddressError(f"control character in domain name {raw!r}")
        return raw.decode("ascii")
    try:
        host = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AddressError(f"domain name is not UTF-8: {raw!r}") from e
    if _TEXT_CONTROL.search(host) is not None:
        raise AddressError(f"control character in domain name {raw!r}")
    return host


def is_hostname(name: str) -> bool:
    """
    Whether `name` can be a DNS host name as a client sends it: ASCII
    letters, digits, hyphen and underscore in dot-separated labels of 1..63
    bytes, 253 bytes at most (one trailing dot allowed).  Non-ASCII names
    are not: clients send their IDNA A-label (``xn--…``).
    """
    if name.endswith("."):
        name = name[:-1]
    if not 1 <= len(name) <= _MAX_HOSTNAME or _HOSTNAME_BYTES.match(name) is None:
        return False
    return all(1 <= len(label) <= _MAX_LABEL for label in name.split("."))


def check_target(address: Address) -> None:
    """
    Raise `AddressError` unless `address` is a target a server may act on:
    a port other than 0, and a host that is an IP literal or a host name
    (`is_hostname`).
    """
    if address.port == 0:
        raise AddressError("target port 0")
    _check_host(address.host)


def decode_target(
    data: bytes | bytearray | memoryview, offset: int = 0
) -> tuple[Address, int] | None:
    """
    `decode_address` for a request a server is about to act on: the same
    result, None while incomplete, and `AddressError` (and nothing else)
    for a malformed header or a target `check_target` refuses.
    """
    parsed = decode_address(data, offset)
    if parsed is None:
        return None
    address = parsed[0]
    if address.port == 0:
        raise AddressError("target port 0")
    # ATYP 1 and 4 carry an IP by construction; only a name needs a look.
    if data[offset] == ATYP_DOMAIN:
        _check_host(address.host)
    return parsed


def _check_host(host: str) -> None:
    if is_hostname(host):
        return
    # IP literal text sent as a name (ATYP 3) is accepted, as
    # shadowsocks-libev does, but not with an IPv6 zone (``%eth0``): that
    # would name an interface of the server.
    if ":" in host and "%" not in host and _parse_ip_literal(host) is not None:
        return
    raise AddressError(f"target {host[:80]!r} is not a host name")


def is_ip_literal(host: str) -> bool:
    """Whether `host` is an IPv4 or IPv6 literal (cheaper than ipaddress)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            pass
    return False
