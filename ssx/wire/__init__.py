"""
Wire formats, without I/O and without Twisted: bytes in, values or bytes out.

The Shadowsocks target address (`address`); the proxy protocols the local
end speaks to applications: `socks5`, `socks4` and HTTP/1.1 (`http_codec`
on h11, `http_message` for targets, credentials and the proxy's own
answers); `ss://` URLs (`sip002`), plugin options (`sip003`) and online
configuration documents (`sip008`); the kernel's socket addresses that
transparent proxying reads (`sockaddr`).  Errors are `ssx.errors` exceptions;
these are the modules hypothesis fuzzes.
"""
