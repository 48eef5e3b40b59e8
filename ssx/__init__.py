"""
ssx: a Shadowsocks proxy suite built on Twisted.

`twistd ssx-server` is the server end (`ssx.server`); `twistd ssx-local` is
the local end that offers SOCKS5, SOCKS4 and HTTP to applications
(`ssx.local`).  Both stand on `ssx.net` (the Twisted plumbing they share),
`ssx.crypto` (every cipher and replay filter), `ssx.wire` (wire formats,
no Twisted), `ssx.acl` (ACL files, no Twisted) and `ssx.config`
(config.json and flags); the seams between them are declared in
`ssx.interfaces`, and `ssx.traffic` is the byte counter both ends keep.
`ssx.workers` runs either end as several processes (`--workers`).
`python -m ssx` is `ssx.cli`.
See README.rst.
"""

__version__ = "0.1.0"
