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
    "Shadowsocks local end: offers SOCKS5, SOCKS4/4a and HTTP proxying on one port and relays through "
    "one or more ssx/Shadowsocks servers.",
    "ssx-local",
)
