"""
Where ssx spends its time: py-spy on both ssx processes under the suite's loads.

    python benchmarks/profile_ssx.py [--method aes-256-gcm] [--seconds 5] [--out DIR]

Starts the far end and the ssx chain exactly as the suite does, then for each
load (bulk upload, bulk download, connection rate, UDP round trips) samples ssx-local and
ssx-server with ``py-spy record --format raw --function`` for the length of
the load, and writes per process and load:

* ``profile-LOAD-ROLE.txt``: the collapsed stacks (feed them to
  flamegraph.pl or speedscope for a picture);
* ``profile.md``: the busy share of the process and its top functions by
  self time (the function on top of the Python stack, C calls it makes
  included) and by total time (anywhere on the stack), in % of the
  process's busy samples.

With ``--native`` py-spy samples the C frames too (it then pauses the
processes for each sample, so the figures of that run are lower), and
``profile.md`` also splits each process's samples by where the innermost
frame is: waiting in ``epoll_wait`` (which native sampling counts), the
cipher (OpenSSL inside cryptography's Rust module, or libcrypto), the C
library's socket system calls (reads and writes: the kernel's work), the
rest of the C library (memory copies, allocation), or elsewhere (the
interpreter, Python code), and gives the shares of the samples not
waiting.

py-spy must be allowed to read the processes' memory (root, or ptrace_scope 0).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import chains
import payload
import steal
from run import HERE, LOAD, _address, _start_far

_RATE = 200
# Frames under nearly every sample (twistd start-up, the reactor loop, the
# per-event dispatch wrappers): left out of the total-time list, which would
# otherwise open with them.
_BOOTSTRAP = re.compile(
    r"twisted/(application|scripts)/|\(<string>\)|ReactorBase\.(run|mainLoop) |EPollReactor\.doPoll "
    r"|^callWithLogger |^callWithContext |ContextTracker\.callWithContext |_PollLikeMixin\._doReadOrWrite "
)
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    file = match["file"]
    for marker in ("site-packages/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{match['function']} ({file})"


# Where a native sample's innermost frame is: the cipher lives in OpenSSL,
# which cryptography's wheels link into their Rust module.
_CIPHER_FILE = re.compile(r"_rust\.abi3\.so|libcrypto")
_LIBC_FILE = re.compile(r"libc\.so|libc-|libpthread")
# The C library's system-call wrappers that a relay's samples end in.
_SYSCALLS = {"recv", "send", "recvfrom", "sendto", "recvmsg", "sendmsg", "read", "write", "writev", "readv",
             "accept4", "connect", "close", "__libc_recv", "__libc_send"}


def _where(leaf: str) -> str:
    match = _FRAME.match(leaf)
    file = match["file"] if match else leaf
    if match and match["function"] == "epoll_wait":
        # Blocked until a socket is ready: py-spy's native mode samples it.
        return "waiting (epoll_wait)"
    if _CIPHER_FILE.search(file):
        return "cipher (OpenSSL)"
    if _LIBC_FILE.search(file):
        if match and match["function"] in _SYSCALLS:
            return "socket system calls (libc)"
        return "other libc (memory copies, allocation)"
    return "elsewhere (interpreter, Python)"


def summarize(raw: Path, seconds: float, top: int = 12) -> dict:
    """Busy share and the top functions (self, total) from a raw py-spy file."""
    self_time: collections.Counter[str] = collections.Counter()
    total_time: collections.Counter[str] = collections.Counter()
    where: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        where[_where(stack.split(";")[-1])] += count
        frames = [_short(f) for f in stack.split(";")]
        samples += count
        self_time[frames[-1]] += count
        for frame in set(frames):
            if not _BOOTSTRAP.search(frame):
                total_time[frame] += count

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(name, 100.0 * n / samples) for name, n in counter.most_common(top)] if samples else []

    return {
        "busy_percent": 100.0 * samples / (_RATE * seconds) if seconds else 0.0,
        "samples": samples,
        "self": share(self_time),
        "total": share(total_time),
        "where": share(where),
    }


def _record(pid: int, output: Path, native: bool = False) -> subprocess.Popen:
    # py-spy reads native stacks only from a paused process.
    mode = ["--native"] if native else ["--nonblocking"]
    return subprocess.Popen(
        ["py-spy", "record", "--pid", str(pid), "--rate", str(_RATE), "--format", "raw", "--function",
         *mode, "--output", str(output)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="aes-256-gcm")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each load")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--native", action="store_true", help="sample C frames too, and split by library")
    parser.add_argument("--loads", default="bulk-up,bulk-down,conn,udp", help="comma-separated subset")
    args = parser.parse_args()
    if shutil.which("py-spy") is None:
        parser.error("py-spy is not installed: pip install -e '.[bench]'")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    seed = random.SystemRandom().randrange(1 << 31)
    far = _start_far(seed, out / "logs", lifetime=600.0)
    digests = payload.StreamDigests(payload.Pattern(seed))
    seconds = str(args.seconds)
    report: dict[str, dict] = {}
    try:
        pythonpath = chains.snapshot_ssx(out / "ssx-snapshot")
        with chains.start_chain("ssx", args.method, far.rr, out / "logs", f"profile-{seed:x}", pythonpath) as chain:
            socks = ["--socks", _address(chain.socks)]
            loads = {
                "bulk-up": ["bulk", *socks, "--target", _address(far.bulk), "--direction", "up",
                            "--seconds", seconds, "--seed", str(seed)],
                "bulk-down": ["bulk", *socks, "--target", _address(far.bulk), "--direction", "down",
                              "--seconds", seconds, "--seed", str(seed)],
                "conn": ["rr", *socks, "--target", _address(far.rr), "--seconds", seconds, "--concurrency", "32"],
                "udp": ["udp", *socks, "--target", _address(far.udp), "--seconds", seconds, "--window", "32"],
            }
            wanted = args.loads.split(",")
            for name, arguments in loads.items():
                if name not in wanted:
                    continue
                recorders = {}
                for process in chain.processes:
                    raw = out / f"profile-{name}-ssx-{process.role}.txt"
                    recorders[process.role] = (raw, _record(process.popen.pid, raw, args.native))
                time.sleep(1.0)  # py-spy attaches
                started = time.monotonic()
                cpu_before = chain.cpu_seconds()
                steal_before = steal.read()
                done = subprocess.run([sys.executable, LOAD, *arguments], capture_output=True, text=True,
                                      timeout=args.seconds + 90)
                elapsed = time.monotonic() - started
                cpu = chain.cpu_seconds() - cpu_before
                stolen = steal.percent(steal_before, steal.read())
                for _, recorder in recorders.values():
                    recorder.send_signal(signal.SIGINT)
                for _, recorder in recorders.values():
                    try:
                        recorder.wait(30)
                    except subprocess.TimeoutExpired:
                        recorder.kill()
                result = json.loads(done.stdout.strip().splitlines()[-1])
                if result.get("status") in ("error", "n/a"):
                    figure = f"load {result['status']}: {result.get('error') or result.get('reason')}"
                elif name.startswith("bulk"):
                    ok = bytes.fromhex(result["digest"]) == digests.digest(result["frames"])
                    figure = f"{result['bytes'] / result['seconds'] / 1e6:.0f} MB/s, digest {'ok' if ok else 'WRONG'}"
                elif name == "udp":
                    figure = f"{result['rate']:.0f} round trips/s, {result['mismatches']} mismatches"
                else:
                    figure = f"{result['rate']:.0f} conn/s, {result['mismatches']} mismatches"
                report[name] = {
                    "figure": figure,
                    "proxy_cpu_seconds": round(cpu, 2),
                    "steal_percent": stolen,
                    "processes": {role: summarize(raw, elapsed + 1.0) for role, (raw, _) in recorders.items()},
                }
                print(f"{name}: {figure}", flush=True)
    finally:
        far.popen.terminate()
        far.popen.wait(10)

    kind = ", native frames" if args.native else ""
    lines = [f"# py-spy profile of ssx ({args.method}, {args.seconds:g}s loads, {_RATE} Hz{kind})", ""]
    for name, entry in report.items():
        lines.append(
            f"## {name}: {entry['figure']}, both ssx processes used {entry['proxy_cpu_seconds']} CPU-s, "
            f"steal {entry['steal_percent']}%"
        )
        for role, summary in entry["processes"].items():
            lines += [
                "",
                f"### ssx-{role}: busy {summary['busy_percent']:.0f}% of the sampled time ({summary['samples']} samples)",
                "",
                "| self % | function | | total % | function |",
                "|---:|---|---|---:|---|",
            ]
            for (s_name, s_pct), (t_name, t_pct) in zip(summary["self"], summary["total"]):
                lines.append(f"| {s_pct:.1f} | `{s_name}` | | {t_pct:.1f} | `{t_name}` |")
            if args.native:
                waiting = dict(summary["where"]).get("waiting (epoll_wait)", 0.0)
                working = 100.0 - waiting
                lines += ["", "| innermost frame in | % of samples | % of samples not waiting |", "|---|---:|---:|"]
                lines += [
                    f"| {w_name} | {w_pct:.1f} | {'' if w_name.startswith('waiting') or not working else f'{100 * w_pct / working:.1f}'} |"
                    for w_name, w_pct in summary["where"]
                ]
        lines.append("")
    (out / "profile.md").write_text("\n".join(lines) + "\n")
    (out / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'profile.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
