"""
Everything only `twistd ssx-local` runs.

`tap` parses the options and builds the service tree; `front` sniffs each
application connection and hands it to SOCKS5 (`protocol`), SOCKS4 or HTTP
(`http`); `protocol` also holds the relay through an upstream server and the
tunnels; `udp` carries SOCKS5 UDP and UDP tunnels; `picker` chooses the
upstream server, `health` measures them and `online` fetches SIP008 lists.
"""
