"""
Everything only `twistd ssx-server` runs.

`tap` parses the options and builds the service tree; `protocol` is one
client connection (decrypt, check the target, connect, relay); `udp` is the
UDP relay of both editions; `forbidden` (with `host_addresses` and its
watcher) decides which destinations are refused.
"""
