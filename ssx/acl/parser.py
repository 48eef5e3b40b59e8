"""
Reading an ACL file, in the format shadowsocks-libev and shadowsocks-rust
share: `[section]` lines, one rule a line, `#` to the end of the line a
comment (libev's reading).  Rules: an IPv4/IPv6 address or network,
`|name` (exactly that name), `||name` (the name and its subdomains), and
anything else a regular expression searched in the lower-case punycode
name.  Rules before any list header go to `[bypass_list]`/`[black_list]`,
and a mode header (`[proxy_all]`, ...) leaves the current list as it was,
as both of them do.  A line that cannot be a rule (a bad network, a name
that is no host name, a regular expression that does not compile, an
unknown section) is a `ConfigError` naming the file and the line.
"""

from __future__ import annotations

import ipaddress
import re

from ssx.acl.names import BadRegex, ascii_host, simple_regex
from ssx.acl.rules import Acl
from ssx.errors import ConfigError

__all__ = ["load_acl", "parse_acl"]

# Text that means to be an address or a network rather than a pattern.
_LOOKS_LIKE_ADDRESS = re.compile(r"[0-9.]+(/[0-9]+)?|[0-9a-fA-F:.]*:[0-9a-fA-F:.]*(/[0-9]+)?")
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


def load_acl(path: str, key: str = "acl") -> Acl:
    """Read and parse the ACL file at `path`; a `ConfigError` on `key` if it cannot be read or has a bad line."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(key, f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    return parse_acl(text, path, key)


def parse_acl(text: str, name: str = "<acl>", key: str = "acl") -> Acl:
    """The `Acl` that `text` (the content of the file called `name`) describes."""
    acl = Acl(name=name)
    lists = {
        "[bypass_list]": acl.bypass, "[black_list]": acl.bypass,
        "[proxy_list]": acl.proxy, "[white_list]": acl.proxy,
        "[outbound_block_list]": acl.outbound_block, "[outbound_allow_list]": acl.outbound_allow,
    }
    current = acl.bypass
    regexes: dict[int, list[tuple[int, str]]] = {id(rules): [] for rules in set(lists.values())}

    def bad(number: int, message: str) -> ConfigError:
        return ConfigError(key, f"{name} line {number}: {message}")

    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]") and re.fullmatch(r"\[[a-z_-]+\]", line):
            if line in lists:
                current = lists[line]
            elif line in ("[proxy_all]", "[accept_all]"):
                acl.proxy_all = True
            elif line in ("[bypass_all]", "[reject_all]"):
                acl.proxy_all = False
            elif line == "[outbound_allow_all]":
                acl.outbound_allow_all = True
            elif line == "[outbound_block_all]":
                acl.outbound_allow_all = False
            else:
                raise bad(number, f"unknown section {line}")
            continue
        if line.startswith("|"):
            suffix = line.startswith("||")
            host = _rule_host(line[2:] if suffix else line[1:])
            if host is None:
                raise bad(number, f"{line!r} is not a host name")
            (current.names.suffixes if suffix else current.names.exact).add(host)
            continue
        if _LOOKS_LIKE_ADDRESS.fullmatch(line):
            try:
                network = ipaddress.ip_network(line, strict=False)
            except ValueError as e:
                raise bad(number, f"bad address or network {line!r}: {e}") from None
            current.addresses.add(network)
            continue
        if not line.isascii():
            raise bad(number, f"non-ASCII regular expression {line!r}: names are matched in punycode, "
                              "write its xn-- form (or use a |name or ||name rule)")
        simple = simple_regex(line)
        if simple is not None:
            (current.names.suffixes if simple[0] == "suffix" else current.names.exact).add(simple[1])
        else:
            regexes[id(current)].append((number, line))

    for rules in set(lists.values()):
        rules.addresses.freeze()
        try:
            rules.names.compile(regexes[id(rules)])
        except BadRegex as e:
            raise bad(e.number, f"bad regular expression: {e}") from None
    return acl


def _rule_host(text: str) -> str | None:
    """The host name of a `|` or `||` rule in punycode, or None if it is not one."""
    host = ascii_host(text.strip())
    return host if _HOST_NAME.fullmatch(host) else None
