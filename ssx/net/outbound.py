"""
Where the server's outgoing traffic leaves from: a source address per
address family (libev's server-side `local_address`, `-b`) and an
interface to send through (libev's `-i`, SO_BINDTODEVICE), and the
firewall mark (SO_MARK) that ssx-local's --outbound-fwmark puts on its own
connections and datagrams (`set_mark`; `ssx.net.transparent` says why).  The server
end's TCP connections to targets (`ssx.net.relay.connect_tcp`) and the UDP
relay's per-association sockets (`ssx.server.udp`) take one `Outbound`;
without one, they are made as before, with nothing to look at.  No Twisted
here.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

__all__ = ["SO_MARK", "Outbound", "bind_device", "device_problem", "set_mark"]

# Linux's value; Python's socket module names it only where the platform does.
SO_BINDTODEVICE: int = getattr(socket, "SO_BINDTODEVICE", 25)
SO_MARK: int = getattr(socket, "SO_MARK", 36)


@dataclass(frozen=True)
class Outbound:
    """A source address for IPv4 targets, one for IPv6 targets, and a device (each optional)."""

    ipv4: str | None = None
    ipv6: str | None = None
    device: str | None = None

    def source_for(self, ip: str) -> str | None:
        """The source address for a connection to `ip` (None: the kernel chooses)."""
        return self.ipv6 if ":" in ip else self.ipv4

    def bind_address(self, ip: str) -> tuple[str, int] | None:
        """Twisted's `bindAddress` for a connection to `ip`, if it has a source address."""
        source = self.source_for(ip)
        return (source, 0) if source is not None else None


def bind_device(sock: socket.socket, device: str) -> None:
    """Send and receive `sock`'s traffic through `device` only (SO_BINDTODEVICE; OSError if refused)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, device.encode())


def set_mark(sock: socket.socket, mark: int) -> None:
    """Mark `sock`'s packets with `mark` (SO_MARK) for the firewall (OSError if refused)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)


def device_problem(device: str) -> str | None:
    """Why sockets cannot be bound to `device` here, or None if they can (tried on a fresh socket)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            bind_device(sock, device)
        except OSError as e:
            if e.errno in (errno.EPERM, errno.EACCES):
                return f"sending through interface {device!r} needs root or CAP_NET_RAW (SO_BINDTODEVICE)"
            if e.errno == errno.ENODEV:
                return f"no interface {device!r} on this host"
            return f"cannot send through interface {device!r}: {e.strerror or e}"
    return None
