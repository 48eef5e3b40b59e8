"""
The ssx benchmark suite: ssx, its peers and the floor, side by side.

    python benchmarks/run.py [--quick] [--chains ssx,libev,pproxy,python,floor]
                             [--methods aes-128-gcm,...] [--runs N] [--out DIR]

For each run, each method and each chain (in an order that rotates from run
to run) it starts the chain (`chains`), measures every figure with a load
process of its own (`load`) against one far-end process (`targets`), checks
every byte that came back (`payload`), and stops the chain.  It then prints
the medians and the ratios against the peers measured in the same suite run,
and writes ``results.json`` and ``ratios.png`` to ``--out`` (`report`).
Processes' logs go to ``--out/logs``; the ssx chains run a copy of the
ssx package taken at the start, in ``--out/ssx-snapshot``.  Everything
stays on 127.0.0.1 and every load ends by itself.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import random
import select
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import chains as chains_module
import payload
import report
import steal
from chains import Chain, ChainError

HERE = Path(__file__).resolve().parent
LOAD = str(HERE / "load.py")
METHODS = ("aes-128-gcm", "aes-256-gcm", "chacha20-ietf-poly1305")
_GIB = 1 << 30
_MAX_ERROR_SHARE = 0.005  # failed connections tolerated in the connection-rate load


@dataclass(frozen=True)
class Settings:
    bulk_seconds: float = 3.0
    rr_seconds: float = 3.0
    rr_concurrency: int = 32
    udp_seconds: float = 2.0
    udp_window: int = 32
    idle_connections: int = 1000
    idle_settle: float = 1.0
    max_frames: int = 8192  # 8 GiB: a cap that a few seconds never reach here

    @classmethod
    def quick(cls) -> "Settings":
        return cls(bulk_seconds=1.5, rr_seconds=1.5, udp_seconds=1.0, idle_settle=0.5)


class FigureError(Exception):
    """A load failed or what it got back did not check out."""


@dataclass
class Far:
    """The far-end process and its ports."""

    popen: subprocess.Popen
    bulk: tuple[str, int]
    rr: tuple[str, int]
    udp: tuple[str, int]
    seed: int


def _start_far(seed: int, logdir: Path, lifetime: float) -> Far:
    logdir.mkdir(parents=True, exist_ok=True)
    popen = subprocess.Popen(
        [sys.executable, str(HERE / "targets.py"), "--seed", str(seed), "--lifetime", str(lifetime)],
        stdin=subprocess.PIPE,  # closes when we exit: the far end then stops too
        stdout=subprocess.PIPE,
        stderr=open(logdir / "targets.log", "wb"),
        start_new_session=True,
    )
    line = _readline(popen, 30.0)
    ports = json.loads(line)
    return Far(popen, *(("127.0.0.1", ports[k]) for k in ("bulk", "rr", "udp")), seed=seed)


def _readline(popen: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([popen.stdout], [], [], timeout)
    if not ready:
        raise FigureError("no answer from a helper process in time")
    line = popen.stdout.readline()
    if not line:
        raise FigureError(f"helper process exited ({popen.poll()})")
    return line.decode() if isinstance(line, bytes) else line


def _address(pair: tuple[str, int]) -> str:
    return f"{pair[0]}:{pair[1]}"


def _load(arguments: list[str], timeout: float) -> dict[str, Any]:
    try:
        done = subprocess.run([sys.executable, LOAD, *arguments], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FigureError(f"load {arguments[0]} did not finish in {timeout:.0f}s") from None
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise FigureError(f"load {arguments[0]} printed nothing: {done.stderr.strip()[-300:]}")
    result = json.loads(lines[-1])
    if result.get("status") == "error":
        raise FigureError(f"load {arguments[0]}: {result['error']}")
    return result


def _chain_args(chain: Chain) -> list[str]:
    return ["--socks", _address(chain.socks)] if chain.socks else []


class Measurement:
    """The figures of one chain in one run; a figure that fails is FAIL, the rest go on."""

    def __init__(self, chain: Chain, far: Far, settings: Settings, digests: payload.StreamDigests) -> None:
        self.chain = chain
        self.far = far
        self.settings = settings
        self.digests = digests
        self.figures: dict[str, Any] = {}
        self.details: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        # Hypervisor steal during each step, in % of the machine's CPU time.
        self.steal: dict[str, float | None] = {}

    def run(self) -> None:
        proxied = self.chain.socks is not None
        steps = [("idle", self.idle)] if proxied else []
        steps += [("bulk", self.bulk), ("paced", self.paced), ("conn", self.connections), ("udp", self.udp)]
        for name, step in steps:
            before = steal.read()
            try:
                step()
            except (FigureError, ChainError, OSError, ValueError) as e:
                self.errors[name] = str(e)
                for key in {
                    "idle": ["idle_kib"],
                    "bulk": ["bulk_up", "bulk_down", "cpu_per_gib"],
                    "paced": ["paced_up", "paced_down", "paced_cpu_per_gib"],
                    "conn": ["conn_rate", "conn_p50", "conn_p99", "cpu_per_conn"],
                    "udp": ["udp_rate"],
                }[name]:
                    self.figures.setdefault(key, report.FAIL)
            self.steal[name] = steal.percent(before, steal.read())
        if not proxied:
            self.figures.update(
                idle_kib=report.NA, cpu_per_gib=report.NA, paced_cpu_per_gib=report.NA, cpu_per_conn=report.NA
            )

    def _cpu(self) -> float:
        return self.chain.cpu_seconds() if self.chain.processes else 0.0

    # -- figures --

    def idle(self) -> None:
        """RSS of both proxy processes with N idle relayed connections, less before, per connection."""
        count = self.settings.idle_connections
        self._hold(min(50, count), settle=0.0)  # first-use allocations do not count
        time.sleep(0.5)
        baseline = self.chain.rss_kib()
        held = self._hold(count, self.settings.idle_settle)
        self.figures["idle_kib"] = (held - baseline) / count
        self.details["idle"] = {"baseline_kib": baseline, "held_kib": held, "connections": count}

    def _hold(self, count: int, settle: float) -> int:
        popen = subprocess.Popen(
            [sys.executable, LOAD, "idle", *_chain_args(self.chain), "--target", _address(self.far.rr),
             "--count", str(count), "--hold", "60"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            ready = json.loads(_readline(popen, 60.0))
            if ready.get("status") == "error":
                raise FigureError(f"idle: {ready['error']}")
            if ready.get("open") != count:
                raise FigureError(f"idle: only {ready.get('open')} of {count} connections opened")
            time.sleep(settle)
            rss = self.chain.rss_kib()
            self.chain.check_alive()
            out, _ = popen.communicate("release\n", timeout=30)
        finally:
            if popen.poll() is None:
                popen.kill()
                popen.wait()
        result = json.loads(out.strip().splitlines()[-1])
        if result.get("mismatches") or result.get("open_at_release") != count:
            raise FigureError(f"idle: connections broke while held: {result}")
        return rss

    def bulk(self) -> None:
        """One connection each way, the sender saturating the chain; MB/s, and proxy CPU per GiB."""
        self._transfers("bulk", "bulk", "cpu_per_gib")

    def paced(self) -> None:
        """The same, the sender paced by the receiver's acknowledgements."""
        self._transfers("paced", "paced", "paced_cpu_per_gib")

    def _transfers(self, load: str, prefix: str, cpu_key: str) -> None:
        cpu = 0.0
        relayed = 0
        for direction in ("up", "down"):
            before = self._cpu()
            result = _load(
                [load, *_chain_args(self.chain), "--target", _address(self.far.bulk), "--direction", direction,
                 "--seconds", str(self.settings.bulk_seconds), "--max-frames", str(self.settings.max_frames),
                 "--seed", str(self.far.seed)],
                timeout=self.settings.bulk_seconds + 90,
            )
            spent = self._cpu() - before
            self._check_bulk(f"{prefix} {direction}", result)
            self.figures[f"{prefix}_{direction}"] = result["bytes"] / result["seconds"] / 1e6
            self.details[f"{prefix}_{direction}"] = {**result, "cpu_seconds": spent}
            cpu += spent
            relayed += result["bytes"]
        if self.chain.processes:
            self.figures[cpu_key] = cpu / (relayed / _GIB)

    def _check_bulk(self, what: str, result: dict[str, Any]) -> None:
        frames = result["frames"]
        if frames < 1:
            raise FigureError(f"{what}: no frame got through")
        if result["frames_received"] != frames or result["bytes"] != result["bytes_sent"]:
            raise FigureError(f"{what}: sent {frames} frames, {result['frames_received']} arrived")
        if bytes.fromhex(result["digest"]) != self.digests.digest(frames):
            raise FigureError(f"{what}: SHA-256 of the {frames} frames received is wrong")

    def connections(self) -> None:
        """CONNECT + 100-byte request + 100-byte reply at N concurrent: rate, latency, CPU per connection."""
        before = self._cpu()
        result = _load(
            ["rr", *_chain_args(self.chain), "--target", _address(self.far.rr),
             "--seconds", str(self.settings.rr_seconds), "--concurrency", str(self.settings.rr_concurrency)],
            timeout=self.settings.rr_seconds + 60,
        )
        spent = self._cpu() - before
        self.details["conn"] = {**result, "cpu_seconds": spent}
        failed = sum(result["errors"].values())
        if result["mismatches"]:
            raise FigureError(f"conn: {result['mismatches']} replies did not match their requests")
        if not result["completed"] or failed > _MAX_ERROR_SHARE * result["attempts"]:
            raise FigureError(f"conn: {failed} of {result['attempts']} connections failed: {result['errors']}")
        self.figures.update(
            conn_rate=result["rate"],
            conn_p50=result["p50_ms"],
            conn_p99=result["p99_ms"],
        )
        if self.chain.processes:
            self.figures["cpu_per_conn"] = spent * 1000 / result["completed"]

    def udp(self) -> None:
        """Round trips per second with a window of datagrams in flight, each answer checked."""
        chain = self.chain
        arguments = ["udp", *_chain_args(chain), "--target", _address(self.far.udp),
                     "--seconds", str(self.settings.udp_seconds), "--window", str(self.settings.udp_window)]
        if chain.socks and chain.udp_mode is None:
            self.figures["udp_rate"] = report.NA
            return
        if chain.udp_mode == "direct":
            arguments += ["--udp-direct", f"127.0.0.1:{chain.udp_port}"]
        if chain.udp_bare_replies:
            arguments.append("--bare-replies")
        before = self._cpu()
        result = _load(arguments, timeout=self.settings.udp_seconds + 60)
        spent = self._cpu() - before
        self.details["udp"] = {**result, "cpu_seconds": spent}
        if result["status"] == "n/a":
            self.figures["udp_rate"] = report.NA
            return
        if result["mismatches"]:
            raise FigureError(f"udp: {result['mismatches']} answers did not match")
        if not result["round_trips"]:
            raise FigureError(f"udp: no round trip completed (lost {result['lost']})")
        self.figures["udp_rate"] = result["rate"]


def _machine(pythonpath: str | None) -> dict[str, Any]:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": chains_module.versions(),
        "ssx_source": chains_module.ssx_source(pythonpath),
    }


def _one(name: str, method: str | None, far: Far, settings: Settings, digests: payload.StreamDigests,
         logdir: Path, password: str, pythonpath: str | None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "chain": name,
        "method": method,
        "figures": {},
        "details": {},
        "errors": {},
        "steal": {},
        # The machine is shared: a high load average explains a slow run.
        "load_average": os.getloadavg()[0],
    }
    started = time.monotonic()
    try:
        with chains_module.start_chain(name, method, far.rr, logdir, password, pythonpath) as chain:
            measurement = Measurement(chain, far, settings, digests)
            measurement.run()
            try:
                chain.check_alive()
            except ChainError as e:
                measurement.errors["exit"] = str(e)
        record.update(
            figures=measurement.figures, details=measurement.details, errors=measurement.errors, steal=measurement.steal
        )
    except (ChainError, OSError) as e:
        record["errors"]["start"] = str(e)
        record["figures"] = {f.key: report.FAIL for f in report.FIGURES}
    record["seconds"] = round(time.monotonic() - started, 1)
    return record


def _progress(run: int, record: dict[str, Any]) -> None:
    f = record["figures"]

    def show(key: str, fmt: str) -> str:
        value = f.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) else str(value)

    line = (
        f"run {run + 1} {record['chain']:<6} {record['method'] or '-':<22} "
        f"up {show('bulk_up', '.0f')} down {show('bulk_down', '.0f')} MB/s, "
        f"{show('cpu_per_gib', '.2f')} CPU-s/GiB, paced up {show('paced_up', '.0f')} down "
        f"{show('paced_down', '.0f')} MB/s {show('paced_cpu_per_gib', '.2f')} CPU-s/GiB, {show('conn_rate', '.0f')} conn/s "
        f"({show('cpu_per_conn', '.3f')} CPU-ms), udp {show('udp_rate', '.0f')}/s, "
        f"idle {show('idle_kib', '.1f')} KiB/conn  [{record['seconds']}s, load {record['load_average']:.1f}]"
    )
    print(line, flush=True)
    high = {step: pct for step, pct in record["steal"].items() if pct is not None and pct > steal.HIGH}
    stolen = ", ".join(f"{step} {pct:.1f}%" for step, pct in record["steal"].items() if pct is not None)
    if stolen:
        print(f"    steal: {stolen}" + ("  << over 5 %: not a result, rerun" if high else ""), flush=True)
    for step, error in record["errors"].items():
        print(f"    {step}: {error}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one run, shorter loads (about 2 minutes)")
    parser.add_argument("--chains", default=",".join(chains_module.CHAINS),
                        help="comma-separated subset of %(default)s; ssx-wN for ssx with --workers N")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, default %(default)s")
    parser.add_argument("--runs", type=int, help="runs to take medians over (default 3, 1 with --quick)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output directory (default %(default)s)")
    args = parser.parse_args(argv)

    asked = [c for c in args.chains.split(",") if c]
    extra = [c for c in asked if c not in chains_module.CHAINS and chains_module.is_workers_chain(c)]
    chain_names = [c for c in chains_module.CHAINS if c in asked] + extra
    unknown = set(asked) - set(chains_module.CHAINS) - set(extra)
    if unknown:
        parser.error(f"unknown chains: {', '.join(sorted(unknown))}")
    for name in list(chain_names):
        why = chains_module.missing(name)
        if why:
            print(f"skipping chain {name}: {why}", file=sys.stderr)
            chain_names.remove(name)
    if importlib.util.find_spec("uvloop") is None:  # the loads and the far end run on it
        parser.error("uvloop is missing: pip install -e '.[bench]'")
    methods = [m for m in args.methods.split(",") if m]
    runs = args.runs or (1 if args.quick else 3)
    settings = Settings.quick() if args.quick else Settings()
    out: Path = args.out.resolve()
    logdir = out / "logs"
    out.mkdir(parents=True, exist_ok=True)

    seed = random.SystemRandom().randrange(1 << 31)
    password = f"bench-{seed:x}"
    digests = payload.StreamDigests(payload.Pattern(seed))
    started = datetime.datetime.now(datetime.timezone.utc)
    # Others may edit the checkout meanwhile: every ssx chain of this run
    # runs a copy of ssx taken now.
    ssx_chains = [c for c in chain_names if c == "ssx" or chains_module.is_workers_chain(c)]
    pythonpath = chains_module.snapshot_ssx(out / "ssx-snapshot") if ssx_chains else None
    machine = _machine(pythonpath)
    far = _start_far(seed, logdir, lifetime=3600.0)
    proxies = [c for c in chain_names if c != "floor"]
    records: list[dict[str, Any]] = []
    try:
        for run in range(runs):
            if "floor" in chain_names:
                record = _one("floor", None, far, settings, digests, logdir, password, pythonpath)
                record["run"] = run
                records.append(record)
                _progress(run, record)
            for method in methods:
                shift = run % max(1, len(proxies))
                for name in proxies[shift:] + proxies[:shift]:
                    record = _one(name, method, far, settings, digests, logdir, password, pythonpath)
                    record["run"] = run
                    records.append(record)
                    _progress(run, record)
    finally:
        far.popen.terminate()
        try:
            far.popen.wait(5)
        except subprocess.TimeoutExpired:
            far.popen.kill()
    finished = datetime.datetime.now(datetime.timezone.utc)

    summary = report.summarize(records, methods, chain_names)
    stolen = report.steal_summary(records, methods, chain_names)
    ratio_table = report.ratios(summary)
    targets = report.check_targets(summary, ratio_table)
    table = report.render_table(summary, ratio_table, targets, chain_names, stolen)
    print()
    print(f"medians of {runs} run(s); ratios are ssx / peer, measured in this suite run")
    print(table)
    document = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {**asdict(settings), "runs": runs, "methods": methods, "chains": chain_names},
        "summary": summary,
        "ratios": ratio_table,
        "targets": targets,
        # The highest hypervisor steal of any step, per method and chain (%),
        # and whether any step went over steal.HIGH: such figures are not results.
        "steal": stolen,
        "records": records,
    }
    report.write_json(out / "results.json", document)
    title = f"ssx against its peers, medians of {runs} run(s), {started:%Y-%m-%d}"
    why_not = report.write_png(out / "ratios.png", summary, ratio_table, title)
    print(f"wrote {out / 'results.json'}" + (f" (no PNG: {why_not})" if why_not else f" and {out / 'ratios.png'}"))
    broken = any(r["errors"] for r in records)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
