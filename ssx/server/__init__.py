"""
Everything only `twistd ssx-server` runs.

`tap` parses the options and builds the service tree, whose root and
named parts are `service`, with one `ports.ServerPort` per served port
(added and removed at run time by the `manager` API), whose keys and
their limits are one `credentials.PortCredentials` (the state of those
limits, connections and quota use by key id, is `key_limits`); `protocol` is one
client connection (decrypt,
check the target, connect, relay), bounded while unfinished by
`handshakes`, and `accounting` counts each user's and port's bytes; `udp` is the UDP
relay of both editions, whose 2022 sessions keep their replay windows
in `session_windows`; `forbidden` (with `host_addresses` and its
watcher) decides which destinations are refused (with the ACL's
outbound lists, `ssx.acl`, checked in `protocol` and `udp`, which also
refuse the ACL's clients); `url_file` writes the ss:// URL at start and
takes a generated password back from it; `metrics` is the Prometheus
registry of ``--metrics``, read from all of these at scrape time; `reload`
applies a SIGHUP's new configuration to the running tree.
"""
