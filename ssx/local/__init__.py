"""
Everything only `twistd ssx-local` runs.

`tap` parses the options and builds the service tree; `front` sniffs each
application connection on the mixed port and hands it to SOCKS5 or SOCKS4
(`socks`) or HTTP (`http`); `tunnel` serves the port forwards; `redir`
the transparent ports (--redir, --tproxy: TCP and TPROXY UDP); all of them
relay through a server with `relay`; `udp` carries SOCKS5 UDP and UDP
tunnels.  `upstream` is one server as the local end reaches it, `picker`
chooses among them, `health` measures them and `online` fetches SIP008
lists of them (`online_upstreams` builds their servers and plugins).
`dns` is the local DNS server (`--dns-listen`): it routes each name
direct or through a server (`dns_remote`) and caches the answers
(`dns_cache`).  `metrics` is the Prometheus registry of ``--metrics``.
`reload` applies a SIGHUP's new configuration to the running tree.
With an ACL, `routing` decides per target whether it goes through a
server or direct, and `direct` is the upstream of direct targets.
"""
