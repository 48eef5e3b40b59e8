"""
The Twisted plumbing both ends share.

`tcp` holds the send-at-once transports of Twisted's TCP path and is the
one module that touches Twisted's private names (listed in
`tcp.TWISTED_PRIVATE_NAMES`, checked by tests/test_twisted_private.py);
`lean` accepts and connects below Twisted's `Port` and `Connector` (on
`IReactorFDSet`), serving each connection on `lean_transport`'s
`LeanTransport`, a TCP transport of ssx's own that does a fraction of the
calls per connection of Twisted's; `reactor` is the epoll reactor twistd
runs ssx on (no log context per event); `quiet_udp` is a UDP socket that logs
nothing; `listener` turns endpoints into services; `relay` joins two
connections with flow control and idle timeouts; `nat` is the expiring
table of the UDP relays; `resolver` is name resolution on twisted.names;
`plugin` runs a SIP003 plugin as a supervised child process; `outbound`
is the source address and interface of a server's connections to targets,
and the firewall mark (SO_MARK) of the local end's own traffic;
`metrics` serves an end's Prometheus registry at /metrics.
`summary` logs a periodic line of what counters rose (both ends' summaries).
`reload` is the SIGHUP handler both ends install to reload their config.
`transparent` builds the sockets of transparent proxying (original
destinations, IP_TRANSPARENT, SO_MARK) and reads TPROXY UDP with recvmsg.
`inherited` records the listening sockets a `--workers` worker was handed.
`acl_holder` keeps each end's ACL (`ssx.acl`) and rereads it on SIGHUP.
"""
