"""twistd plugins: `twistd ssx-server` and `twistd ssx-local`."""

from twisted.application.service import ServiceMaker

ssxServer = ServiceMaker(
    "ssx-server",
    "ssx.tap.server",
    "Shadowsocks server: decrypts clients' streams and relays them to their destinations.",
    "ssx-server",
)

ssxLocal = ServiceMaker(
    "ssx-local",
    "ssx.tap.local",
    "Shadowsocks local end: offers SOCKS5 to applications and relays through an ssx/Shadowsocks server.",
    "ssx-local",
)
