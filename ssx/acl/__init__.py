"""
Access control lists in the format of shadowsocks-libev and -rust, without
Twisted: which targets the local end sends through the proxy and which it
reaches directly, which clients the server serves and which destinations
it refuses.

`parser` reads a file into an `Acl` (`rules`), whose lists keep their
address rules as merged ranges searched with bisect (`networks`) and
their name rules in sets and a few combined regular expressions
(`names`, which also puts names in the punycode form rules match).
The ends hold the `Acl` in an `ssx.net.acl_holder.AclHolder`, which
reloads it.
"""

from ssx.acl.names import ascii_host
from ssx.acl.parser import load_acl, parse_acl
from ssx.acl.rules import Acl, RuleList

__all__ = ["Acl", "RuleList", "ascii_host", "load_acl", "parse_acl"]
