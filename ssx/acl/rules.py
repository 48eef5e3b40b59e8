"""
The decisions an ACL file makes, once parsed (`ssx.acl.parser` builds it).

One `RuleList` per list of the file: the local end's `[bypass_list]` is
the server's `[black_list]` and `[proxy_list]` its `[white_list]` (one list
each, as in shadowsocks-libev and -rust); `[outbound_block_list]` and
`[outbound_allow_list]` are the server's destination lists.

Precedence, as shadowsocks-rust decides:
- local end, a name: a `[proxy_list]` name rule proxies it, else a
  `[bypass_list]` one bypasses it, else (when the caller resolves it, with
  `--acl-resolve`) its addresses decide: in `[proxy_all]` mode any address in
  `[bypass_list]` bypasses it, in `[bypass_all]` mode any address in
  `[proxy_list]` proxies it; else the mode;
- local end, an IP address: `[bypass_list]` first, then `[proxy_list]`,
  then the mode (name rules do not apply to an address);
- server, a client address: in `[accept_all]` mode refused only if in
  `[black_list]`, in `[reject_all]` mode refused unless in `[white_list]`;
- server, a destination name: an `[outbound_block_list]` name rule refuses
  it, else an `[outbound_allow_list]` one allows it (its addresses are then
  not checked against the ACL), else each address it resolves to is
  checked: block list, then allow list, then the outbound mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from ssx.acl.names import NameRules, ascii_host
from ssx.acl.networks import AddressRanges, parse_ip

__all__ = ["Acl", "RuleList"]


@dataclass(eq=False)
class RuleList:
    """One list of the file: its address ranges and its name rules."""

    addresses: AddressRanges = field(default_factory=AddressRanges)
    names: NameRules = field(default_factory=NameRules)

    def __len__(self) -> int:
        return len(self.addresses) + len(self.names)

    def address_matches(self, ip: str) -> bool:
        address = parse_ip(ip)
        return address is not None and self.addresses.contains(address)


@dataclass(eq=False)
class Acl:
    """
    A parsed ACL file.  `proxy_all` is the local mode (`[proxy_all]`, the
    default, or `[bypass_all]`), which is also the server's client mode
    (`[accept_all]` or `[reject_all]`); `outbound_allow_all` the outbound mode.
    """

    name: str = "<acl>"
    proxy_all: bool = True
    outbound_allow_all: bool = True
    bypass: RuleList = field(default_factory=RuleList)  # [bypass_list], [black_list]
    proxy: RuleList = field(default_factory=RuleList)  # [proxy_list], [white_list]
    outbound_block: RuleList = field(default_factory=RuleList)
    outbound_allow: RuleList = field(default_factory=RuleList)

    def __str__(self) -> str:
        lists = (self.bypass, self.proxy, self.outbound_block, self.outbound_allow)
        regexes = sum(rules.names.regex_count for rules in lists)
        return (
            f"{self.name}: {'proxy' if self.proxy_all else 'bypass'} by default, {len(self.bypass)} bypass/black, "
            f"{len(self.proxy)} proxy/white, {len(self.outbound_block)} outbound block, "
            f"{len(self.outbound_allow)} outbound allow rules ({regexes} regular expressions)"
        )

    # The local end.

    def proxies(self, host: str) -> bool:
        """True when `host` (a name or an IP literal) goes through the proxy, without resolving a name."""
        address = parse_ip(host)
        if address is not None:
            if self.bypass.addresses.contains(address):
                return False
            if self.proxy.addresses.contains(address):
                return True
            return self.proxy_all
        decided = self.name_proxies(host)
        return self.proxy_all if decided is None else decided

    def name_proxies(self, name: str) -> bool | None:
        """What the name rules say of `name`: True (proxy), False (bypass) or None (no rule matched)."""
        host = ascii_host(name)
        if self.proxy.names.matches(host):
            return True
        if self.bypass.names.matches(host):
            return False
        return None

    def resolving_decides(self, name: str) -> bool:
        """
        Whether `name`'s addresses could change its decision: no name rule
        matched and the list the mode looks at has address rules.
        """
        checked = self.bypass if self.proxy_all else self.proxy
        return bool(checked.addresses) and parse_ip(name) is None and self.name_proxies(name) is None

    def addresses_proxy(self, ips: Iterable[str]) -> bool:
        """The decision for a name no name rule matched, from the addresses it resolved to."""
        checked = self.bypass if self.proxy_all else self.proxy
        if any(checked.address_matches(ip) for ip in ips):
            return not self.proxy_all
        return self.proxy_all

    # The server.

    def client_allowed(self, ip: str) -> bool:
        """Whether a client connecting from `ip` is served."""
        if self.proxy_all:  # [accept_all]
            return not self.bypass.address_matches(ip)
        return self.proxy.address_matches(ip)

    def outbound_allowed(self, host: str) -> bool:
        """Whether the server may connect to `host` (an IP literal, or a name before it is resolved)."""
        address = parse_ip(host)
        if address is None:
            decided = self.outbound_name_allowed(host)
            return self.outbound_allow_all if decided is None else decided
        if self.outbound_block.addresses.contains(address):
            return False
        if self.outbound_allow.addresses.contains(address):
            return True
        return self.outbound_allow_all

    def outbound_addresses_allowed(self, host: str, ips: Iterable[str]) -> bool:
        """
        Whether the server may connect to the target `host` resolved to
        `ips`: every address must be allowed, unless an allow-list name rule
        names `host`.
        """
        if parse_ip(host) is None and self.outbound_name_allowed(host) is True:
            return True
        return all(self.outbound_allowed(ip) for ip in ips)

    def outbound_name_allowed(self, name: str) -> bool | None:
        """What the outbound name rules say of `name`: allowed, refused, or None (no rule matched)."""
        host = ascii_host(name)
        if self.outbound_block.names.matches(host):
            return False
        if self.outbound_allow.names.matches(host):
            return True
        return None

    @property
    def checks_clients(self) -> bool:
        """Whether any client address can be refused."""
        return not self.proxy_all or bool(self.bypass.addresses)

    @property
    def checks_outbound(self) -> bool:
        """Whether any destination can be refused."""
        return not self.outbound_allow_all or bool(self.outbound_block)
