"""
Generated ACL files of real size, with the targets each should send
through the proxy and those it should bypass: for tests/test_acl.py and
benchmarks/acl.py.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field

__all__ = ["AclSamples", "large_acl"]


@dataclass
class AclSamples:
    """Targets (names and IP literals) the generated file proxies and bypasses."""

    proxied: list[str] = field(default_factory=list)
    bypassed: list[str] = field(default_factory=list)


def large_acl(cidrs: int, regexes: int, names: int, seed: int = 1, samples: int = 200) -> tuple[str, AclSamples]:
    """
    A `[proxy_all]` file whose `[bypass_list]` holds `cidrs` IPv4 networks
    (in 1.0.0.0-126.255.255.255, so 128.0.0.0 and above are never in one),
    `regexes` regular expressions (half in the `(^|\\.)name$` form kept in
    sets, half true patterns) and `names` `||` rules; with `samples` hits and
    misses of each kind.
    """
    rng = random.Random(seed)
    lines = ["# generated", "[proxy_all]", "[bypass_list]"]
    out = AclSamples()
    networks = []
    for _ in range(cidrs):
        prefix = rng.randint(12, 24)
        address = rng.randint(1 << 24, (127 << 24) - 1)
        network = ipaddress.ip_network((address, prefix), strict=False)
        networks.append(network)
        lines.append(str(network))
    for network in rng.sample(networks, min(samples, len(networks))):
        inside = int(network.network_address) + rng.randrange(network.num_addresses)
        out.bypassed.append(str(ipaddress.ip_address(inside)))
    for _ in range(samples):
        out.proxied.append(str(ipaddress.ip_address(rng.randint(128 << 24, (224 << 24) - 1))))
    simple = regexes // 2
    for i in range(simple):
        lines.append(f"(^|\\.)site{i}\\.example$")
    for i in range(regexes - simple):
        lines.append(f"^(cdn|img)[0-9]+\\.host{i}\\.net$")
    for i in range(names):
        lines.append(f"||name{i}.test")
    for _ in range(samples):
        i = rng.randrange(max(simple, 1))
        if simple:
            out.bypassed.append(f"www.site{i}.example")
            out.proxied.append(f"www.site{i}.example.org")
        j = rng.randrange(max(regexes - simple, 1))
        if regexes - simple:
            out.bypassed.append(f"img{rng.randint(0, 999)}.host{j}.net")
            out.proxied.append(f"www.host{j}.net")
        k = rng.randrange(max(names, 1))
        if names:
            out.bypassed.append(f"a.b.name{k}.test")
            out.proxied.append(f"name{k}.test.example")
    return "\n".join(lines) + "\n", out
