"""
What finding a connection's key costs on a port of many access keys
(`ssx.crypto.KeyRing`): a hit on the front key, a hit on the last key
and a miss (every key tried), with 1, 10, 100 and 1,000 keys, in
CPU microseconds per lookup of a stream's first bytes.  Keys are AEAD-2017
chacha20-ietf-poly1305, as Outline's are.

    python benchmarks/keys.py [--seconds 0.2]

Standalone and bounded: each figure is the best of 5 batches measured for
about `--seconds` in all (at least 2 lookups a batch), about 3 s in all at
the default, and no network.  It prints the hypervisor's steal time (from
/proc/stat) before and after, and the load average: figures taken while
steal climbs are not results.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssx.crypto import AccessKey, CipherSuite, KeyRing  # noqa: E402
from ssx.errors import AuthenticationError  # noqa: E402
from ssx.wire.address import Address  # noqa: E402

METHOD = "chacha20-ietf-poly1305"
SIZES = (1, 10, 100, 1000)


def steal_ticks() -> int | None:
    """The machine's steal time so far, in clock ticks (None where /proc/stat has none)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    return int(fields[8]) if len(fields) > 8 else None


def per_lookup(ring: KeyRing, request: bytes, front_id: str | None, seconds: float) -> float:
    """
    CPU microseconds per `ring.find(request)` (this process's CPU time, not
    the wall clock: the machine is shared), the best mean of 5 batches.  With
    `front_id`, the key matched is put back at the end after each lookup.
    """
    best = float("inf")
    for _ in range(5):
        count = 0
        spent = 0.0
        while spent < seconds / 5 or count < 2:
            started = time.process_time()
            try:
                ring.find(request)
            except AuthenticationError:
                pass
            spent += time.process_time() - started
            count += 1
            if front_id is not None:
                # Keep the measured key at the back: undo the move to the front.
                keys = ring._keys
                keys.append(keys.pop(0))
        best = min(best, spent / count * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=0.2, help="time per figure (default 0.2)")
    args = parser.parse_args()
    steal_before = steal_ticks()
    wall = time.monotonic()
    print(f"{'keys':>5}  {'hit, front':>12}  {'hit, last':>12}  {'miss':>12}   (CPU µs per lookup, {METHOD})")
    stranger = CipherSuite(METHOD, "no such key")
    miss = stranger.client_codec().first(Address("192.0.2.1", 443), b"x" * 100)
    for size in SIZES:
        keys = [AccessKey(f"key-{i}", CipherSuite(METHOD, f"secret {i}")) for i in range(size)]
        ring = KeyRing(keys)
        first, last = keys[0], keys[-1]
        front = per_lookup(ring, first.suite.client_codec().first(Address("192.0.2.1", 443), b"x" * 100), None, args.seconds)
        # The last key: after each lookup it is moved back to the end.
        back = per_lookup(ring, last.suite.client_codec().first(Address("192.0.2.1", 443), b"x" * 100), last.id, args.seconds)
        missed = per_lookup(ring, miss, None, args.seconds)
        print(f"{size:>5}  {front:>12.1f}  {back:>12.1f}  {missed:>12.1f}")
    steal_after = steal_ticks()
    ticks = os.sysconf("SC_CLK_TCK")
    if steal_before is not None and steal_after is not None:
        print(f"steal: {steal_before} -> {steal_after} ticks ({(steal_after - steal_before) / ticks:.2f} s of "
              f"{time.monotonic() - wall:.1f} s wall, all CPUs); load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
