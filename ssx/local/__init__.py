"""
Everything only `twistd ssx-local` runs.

`tap` parses the options and builds the service tree; `front` sniffs each
application connection on the mixed port and hands it to SOCKS5 or SOCKS4
(`socks`) or HTTP (`http`); `tunnel` serves the port forwards; all of them
relay through a server with `relay`; `udp` carries SOCKS5 UDP and UDP
tunnels.  `upstream` is one server as the local end reaches it, `picker`
chooses among them, `health` measures them and `online` fetches SIP008
lists of them (`online_upstreams` builds their servers and plugins).
With an ACL, `routing` decides per target whether it goes through a
server or direct, and `direct` is the upstream of direct targets.
"""
