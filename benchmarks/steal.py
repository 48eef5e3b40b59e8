"""
Hypervisor steal: the share of the machine's CPU time that the hypervisor
gave to other guests, from the first line of ``/proc/stat``.

The machine is shared: when steal is high, every chain's CPU and time
figures inflate, and unevenly, so figures taken then are flagged and must
not be read as results (`HIGH`).
"""

from __future__ import annotations

__all__ = ["HIGH", "percent", "read"]

HIGH = 5.0  # % of CPU time stolen during a step above which its figures are not results


def read() -> tuple[int, int] | None:
    """(all CPU time, stolen time) in clock ticks since boot, or None where /proc/stat lacks them."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice]:
    # guest time is already inside user and nice.
    ticks = [int(v) for v in fields[1:9]]
    return sum(ticks), ticks[7]


def percent(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Steal between two readings, in % of all CPU time that passed (None if unknown)."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return round(100.0 * (after[1] - before[1]) / (after[0] - before[0]), 2)
