"""
ssx: a Shadowsocks proxy suite built on Twisted.

`twistd ssx-server` is the server end; `twistd ssx-local` is the local end that
offers SOCKS5 to applications.  See README.rst.
"""

__version__ = "0.1.0"
