"""
ACL load time and decisions per second at a real file's size.

    python benchmarks/acl.py [--cidrs 10000] [--regexes 5000] [--names 3000] [--seconds 2]

Generates a `[proxy_all]` file (tests/support/acl_files.py: `cidrs` IPv4
networks, `regexes` regular expressions, half in the `(^|\\.)name$` form
the parser keeps in sets and half true patterns such as
`^(cdn|img)[0-9]+\\.host42\\.net$`, and `names` `||` rules), loads it
`--loads` times (best and median), then asks `Acl.proxies` for IP
literals and names that hit and miss, each kind for about `--seconds`
seconds, and checks every answer.  Prints one table and the hypervisor's
steal time over the run (from /proc/stat): figures taken while steal is
high are not results.  Bounded: a few seconds of one core, no network.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssx.acl import parse_acl  # noqa: E402
from tests.support.acl_files import large_acl  # noqa: E402


def cpu_times() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return fields[7], sum(fields)


def rate(acl: object, hosts: list[str], expected: bool, seconds: float) -> float:
    """Decisions per second over `hosts`, repeated for about `seconds`; every answer checked."""
    proxies = acl.proxies  # type: ignore[attr-defined]
    done = 0
    start = time.perf_counter()
    while True:
        for host in hosts:
            if proxies(host) is not expected:
                raise SystemExit(f"wrong decision for {host}")
        done += len(hosts)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cidrs", type=int, default=10_000)
    parser.add_argument("--regexes", type=int, default=5_000)
    parser.add_argument("--names", type=int, default=3_000)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    steal0, total0 = cpu_times()
    text, samples = large_acl(args.cidrs, args.regexes, args.names, seed=1)
    loads = []
    for _ in range(args.loads):
        start = time.perf_counter()
        acl = parse_acl(text, "generated.acl")
        loads.append(time.perf_counter() - start)
    print(f"file: {args.cidrs} CIDRs, {args.regexes} regexes, {args.names} || names, {len(text) / 1024:.0f} KiB")
    print(f"load: best {min(loads) * 1000:.0f} ms, median {statistics.median(loads) * 1000:.0f} ms ({args.loads} loads)")
    kinds = {
        "IP hit (bypass)": ([h for h in samples.bypassed if h[0].isdigit()], False),
        "IP miss (proxy)": ([h for h in samples.proxied if h[0].isdigit()], True),
        "name hit, || rule": ([h for h in samples.bypassed if h.endswith(".test")], False),
        "name hit, (^|\\.) regex": ([h for h in samples.bypassed if h.endswith(".example")], False),
        "name hit, true regex": ([h for h in samples.bypassed if h.endswith(".net")], False),
        "name miss": ([h for h in samples.proxied if not h[0].isdigit()], True),
    }
    # Warm up: the patterns of regex tails compile on first use.
    for hosts, _ in kinds.values():
        for host in hosts:
            acl.proxies(host)
    for kind, (hosts, expected) in kinds.items():
        print(f"{kind:26} {rate(acl, hosts, expected, args.seconds):>10,.0f} decisions/s ({len(hosts)} targets)")
    steal1, total1 = cpu_times()
    print(f"steal: {100 * (steal1 - steal0) / max(1, total1 - total0):.1f}% of CPU time during the run "
          f"({steal1 - steal0} of {total1 - total0} jiffies)")


if __name__ == "__main__":
    main()
