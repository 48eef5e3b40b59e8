"""twistd plugins: `twistd ssx-server` and `twistd ssx-local`."""

from twisted.application.service import ServiceMaker

ssxServer = ServiceMaker(
    "ssx-server",
    "ssx.server.tap",
    "Shadowsocks server: decrypts clients' streams and relays them to their destinations.",
    "ssx-server",
)

ssxLocal = ServiceMaker(
    "ssx-local",
    "ssx.local.tap",
    "Shadowsocks local end: offers SOCKS5, SOCKS4/4a and HTTP proxying on one port and relays through "
    "one or more ssx/Shadowsocks servers.",
    "ssx-local",
)
