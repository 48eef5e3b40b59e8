"""
The server side of a SOCKS4 and SOCKS4a CONNECT, sans-IO.

The mixed port hands a connection whose first byte is 4 to this: one
request (``VN=4 CD PORT IP USERID NUL``, and for 4a, where IP is
``0.0.0.x`` with x not 0, a host name and NUL after the user id) gives the
target, and `build_reply` answers granted (90) or rejected (91) once the
server connection is up or has failed.  SOCKS4 carries no password, so the
protocol that owns the transport refuses it when credentials are required.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from ssx.wire.address import Address
from ssx.errors import ProtocolError

__all__ = ["REP_GRANTED", "REP_REJECTED", "Socks4Error", "Socks4Negotiation", "Socks4Request", "build_reply"]

REP_GRANTED, REP_REJECTED = 90, 91
_CMD_CONNECT = 1
# The longest user id or 4a host name accepted (both end with NUL).
_MAX_FIELD = 255


class Socks4Error(ProtocolError):
    """A SOCKS4 request refused; `reply` is what to write before closing."""

    def __init__(self, message: str, reply: bytes = b"") -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True)
class Socks4Request:
    """The target, the user id, and any bytes pipelined after the request."""

    address: Address
    userid: bytes
    extra: bytes


def build_reply(code: int) -> bytes:
    """``VN=0 CD PORT IP``, with port and IP zero (clients ignore them for CONNECT)."""
    return bytes((0, code)) + b"\x00" * 6


class Socks4Negotiation:
    """One SOCKS4/4a request; `feed` until it returns the `Socks4Request`."""

    def __init__(self) -> None:
        self._buffer = b""
        self._done = False

    def feed(self, data: bytes) -> Socks4Request | None:
        if self._done:
            raise ProtocolError("SOCKS4 negotiation already over")
        buf = self._buffer = self._buffer + data
        if len(buf) < 8:
            return None
        if buf[0] != 4:
            self._done = True
            raise Socks4Error(f"version {buf[0]} is not 4")
        if buf[1] != _CMD_CONNECT:
            self._done = True
            raise Socks4Error(f"SOCKS4 command {buf[1]} not supported", build_reply(REP_REJECTED))
        port = struct.unpack("!H", buf[2:4])[0]
        userid_end = buf.find(b"\0", 8)
        if userid_end < 0:
            self._check_field(len(buf) - 8, "user id")
            return None
        self._check_field(userid_end - 8, "user id")
        userid = buf[8:userid_end]
        end = userid_end + 1
        if buf[4:7] == b"\0\0\0" and buf[7] != 0:
            name_end = buf.find(b"\0", end)
            if name_end < 0:
                self._check_field(len(buf) - end, "host name")
                return None
            self._check_field(name_end - end, "host name")
            name = buf[end:name_end]
            if not name:
                self._done = True
                raise Socks4Error("SOCKS4a request with an empty host name", build_reply(REP_REJECTED))
            try:
                host = name.decode("ascii")
            except UnicodeDecodeError:
                self._done = True
                raise Socks4Error("SOCKS4a host name is not ASCII", build_reply(REP_REJECTED)) from None
            end = name_end + 1
        else:
            host = socket.inet_ntop(socket.AF_INET, buf[4:8])
        if port == 0:
            self._done = True
            raise Socks4Error("SOCKS4 request for port 0", build_reply(REP_REJECTED))
        self._done = True
        self._buffer = b""
        return Socks4Request(Address(host, port), userid, buf[end:])

    def _check_field(self, length: int, what: str) -> None:
        if length > _MAX_FIELD:
            self._done = True
            raise Socks4Error(f"SOCKS4 {what} longer than {_MAX_FIELD} bytes", build_reply(REP_REJECTED))
