"""twistd plugins: `twistd ssx-server` and `twistd ssx-local`."""

from twisted.application.service import ServiceMaker


class _SsxServiceMaker(ServiceMaker):
    """
    A `ServiceMaker` that installs ssx's reactor (`ssx.net.reactor`) when
    twistd first asks for the command's options: before ssx's modules are
    imported, since importing some of Twisted's installs the default reactor.
    A reactor named with twistd's ``-r`` is installed by then and stays.
    """

    @property
    def options(self):  # type: ignore[no-untyped-def]
        try:
            from ssx.net.reactor import install_default
        except ImportError:
            pass  # no epoll on this system: twistd's default reactor
        else:
            install_default()
        return ServiceMaker.options.fget(self)  # type: ignore[attr-defined]


ssxServer = _SsxServiceMaker(
    "ssx-server",
    "ssx.server.tap",
    "Shadowsocks server: decrypts clients' streams and relays them to their destinations.",
    "ssx-server",
)

ssxLocal = _SsxServiceMaker(
    "ssx-local",
    "ssx.local.tap",
    "Shadowsocks local end: offers SOCKS5, SOCKS4/4a and HTTP proxying on one port and relays through "
    "one or more ssx/Shadowsocks servers.",
    "ssx-local",
)
