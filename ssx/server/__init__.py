"""
Everything only `twistd ssx-server` runs.

`tap` parses the options and builds the service tree, whose root and
named parts are `service`, with one `ports.ServerPort` per served port
(added and removed at run time by the `manager` API); `protocol` is one
client connection (decrypt,
check the target, connect, relay), bounded while unfinished by
`handshakes`, and `accounting` counts each user's and port's bytes; `udp` is the UDP
relay of both editions, whose 2022 sessions keep their replay windows
in `session_windows`; `forbidden` (with `host_addresses` and its
watcher) decides which destinations are refused (with the ACL's
outbound lists, `ssx.acl`, checked in `protocol` and `udp`, which also
refuse the ACL's clients); `url_file` writes the
ss:// URL at start and takes a generated password back from it.
"""
