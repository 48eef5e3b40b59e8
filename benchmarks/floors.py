"""
The cost of a new connection, with the floors under it, side by side.

    python benchmarks/floors.py [--runs 3] [--seconds 3] [--method aes-256-gcm] [--out DIR]

The suite's connection-rate load (`load.py rr`: 32 in flight, CONNECT +
100-byte request + 100-byte reply + close) against, in one run, in an
order that rotates from run to run:

* ``libev``: ss-local + ss-server (the reference);
* ``ssx``: ssx-local + ssx-server on ssx's connection path (`ssx.net.lean`);
* ``ssx-twisted``: the same with ``SSX_TCP_PATH=twisted`` (Twisted's Port,
  Connector and epoll reactor under ssx's transports);
* ``fwd-twisted``, ``fwd-lean``, ``fwd-epoll``: two bare forwarders in a
  row (`forwarders.py`), no SOCKS5 and no encryption: Twisted's path, ssx's
  path, and a raw `select.epoll` loop (the limit of Python here).

For each: conn/s and CPU-ms per connection (utime + stime of both
processes over the load, divided by the connections completed), and the
hypervisor steal of the whole machine over the load (from /proc/stat).
A figure taken at more than 5 % steal is flagged and left out of the
medians.  Every load is bounded (``--seconds``, at most 200,000
connections); every process is started and stopped here, by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import chains
from run import HERE, _address, _load, _start_far

NAMES = ("libev", "ssx", "ssx-twisted", "fwd-twisted", "fwd-lean", "fwd-epoll")
STEAL_LIMIT = 5.0


def _cpu_times() -> tuple[int, int]:
    """(steal, total) jiffies of the whole machine so far."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return fields[7], sum(fields[:8])


def _start_forwarders(kind: str, target: tuple[str, int], logdir: Path, pythonpath: str) -> chains.Chain:
    """Two forwarders of `kind` in a row in front of `target`; the load talks to the first."""
    chain = chains.Chain(f"fwd-{kind}", None)
    second, first = chains.free_port(), chains.free_port()
    env = dict(os.environ, PYTHONPATH=pythonpath)
    try:
        for role, listen, onward in (("second", second, target[1]), ("first", first, second)):
            log = logdir / f"fwd-{kind}-{role}.log"
            with open(log, "wb") as out:
                popen = subprocess.Popen(
                    [sys.executable, str(HERE / "forwarders.py"), kind, str(listen), str(onward)],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                    cwd=logdir, env=env,
                )
            chain.processes.append(chains.ProxyProcess(role, popen, log))
        deadline = time.monotonic() + 20
        chains._wait_listening(chain, second, deadline)
        chains._wait_listening(chain, first, deadline)
        chains.probe(None, ("127.0.0.1", first))
    except BaseException:
        chain.stop()
        raise
    chain.udp_port = first  # where the load goes
    return chain


def _start(name: str, far_rr: tuple[str, int], method: str, logdir: Path, password: str, pythonpath: str) -> chains.Chain:
    if name.startswith("fwd-"):
        return _start_forwarders(name[4:], far_rr, logdir, pythonpath)
    if name == "ssx-twisted":
        os.environ["SSX_TCP_PATH"] = "twisted"
        try:
            chain = chains.start_chain("ssx", method, far_rr, logdir, password, pythonpath)
        finally:
            del os.environ["SSX_TCP_PATH"]
        chain.name = name
        return chain
    return chains.start_chain(name, method, far_rr, logdir, password, pythonpath if name == "ssx" else None)


def _measure(chain: chains.Chain, far_rr: tuple[str, int], seconds: float) -> dict[str, Any]:
    if chain.socks:
        target = ["--socks", _address(chain.socks), "--target", _address(far_rr)]
    else:
        target = ["--target", f"127.0.0.1:{chain.udp_port}"]
    cpu = chain.cpu_seconds()
    steal, total = _cpu_times()
    result = _load(["rr", *target, "--seconds", str(seconds), "--concurrency", "32", "--max", "200000"], seconds + 60)
    steal_after, total_after = _cpu_times()
    spent = chain.cpu_seconds() - cpu
    chain.check_alive()
    failed = result["attempts"] - result["completed"]
    if result["mismatches"] or failed > 0.005 * max(1, result["attempts"]):
        raise RuntimeError(f"{chain.name}: {result['mismatches']} mismatches, {failed} failed: {result['errors']}")
    return {
        "rate": result["rate"],
        "cpu_ms_per_conn": spent * 1000 / max(1, result["completed"]),
        "steal_percent": 100 * (steal_after - steal) / max(1, total_after - total),
        "completed": result["completed"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--method", default="aes-256-gcm")
    parser.add_argument("--names", default=",".join(NAMES), help="comma-separated subset of %(default)s")
    parser.add_argument("--out", type=Path, default=HERE / "results-floors")
    args = parser.parse_args(argv)
    names = [n for n in NAMES if n in args.names.split(",")]
    out: Path = args.out.resolve()
    logdir = out / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    pythonpath = chains.snapshot_ssx(out / "ssx-snapshot")
    seed = int.from_bytes(os.urandom(4), "big") >> 1
    far = _start_far(seed, logdir, lifetime=1800.0)
    password = f"floors-{seed:x}"
    records: list[dict[str, Any]] = []
    try:
        for run in range(args.runs):
            shift = run % len(names)
            for name in names[shift:] + names[:shift]:
                with _start(name, far.rr, args.method, logdir, password, pythonpath) as chain:
                    figures = _measure(chain, far.rr, args.seconds)
                records.append({"run": run, "name": name, **figures})
                flag = "  STEAL > 5 %" if figures["steal_percent"] > STEAL_LIMIT else ""
                print(
                    f"run {run} {name:12} {figures['rate']:7.0f} conn/s {figures['cpu_ms_per_conn']:.3f} CPU-ms/conn "
                    f"steal {figures['steal_percent']:.1f} %{flag}",
                    flush=True,
                )
    finally:
        far.popen.terminate()
        far.popen.wait(5)

    def median(name: str, key: str) -> float | None:
        values = [r[key] for r in records if r["name"] == name and r["steal_percent"] <= STEAL_LIMIT]
        return statistics.median(values) if values else None

    libev = median("libev", "cpu_ms_per_conn")
    print(f"\nmedians over runs at <= {STEAL_LIMIT:g} % steal; x libev = CPU per connection / libev's, same run set")
    print(f"{'':14}{'conn/s':>9}{'CPU-ms/conn':>13}{'x libev':>9}{'runs':>6}")
    summary = {}
    for name in names:
        rate, cpu = median(name, "rate"), median(name, "cpu_ms_per_conn")
        kept = sum(1 for r in records if r["name"] == name and r["steal_percent"] <= STEAL_LIMIT)
        ratio = cpu / libev if cpu is not None and libev else None
        summary[name] = {"rate": rate, "cpu_ms_per_conn": cpu, "x_libev": ratio, "runs_kept": kept}
        show = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"{name:14}{show(rate, '9.0f')}{show(cpu, '13.3f')}{show(ratio, '9.2f')}{kept:6d}")
    (out / "floors.json").write_text(json.dumps({"method": args.method, "seconds": args.seconds, "records": records,
                                                 "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
