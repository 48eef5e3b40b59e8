"""
Instructions per connection and per UDP round trip, counted by callgrind:
figures that do not move with the machine's load.

    python benchmarks/instructions.py [--chains ssx,ssx-twisted,libev] [--connections 400]
                                      [--round-trips 1000] [--method aes-256-gcm] [--out DIR]

CPU seconds on a shared machine swing with the hypervisor's steal and with
what else runs; the instructions a process executes for the same work do
not.  For each chain this starts the server and the local end under
``valgrind --tool=callgrind`` (the same command lines as the suite's,
`chains.py`), warms them up, zeroes their counters (``callgrind_control
-z``), then drives

* ``--connections`` connections of the suite's connection load (`load.py
  rr`: SOCKS5 CONNECT, a 100-byte request, a 100-byte reply, close; 8 at
  a time), and
* ``--round-trips`` UDP round trips through SOCKS5 UDP ASSOCIATE, one at a
  time (one datagram per readiness event each way, so that the count does
  not depend on how datagrams batch up under valgrind's slowness),

dumps the counters after each, and prints each process's user-space
instructions per connection and per round trip.  Chains: ``ssx`` (ssx's
own path and reactor), ``ssx-twisted`` (``SSX_TCP_PATH=twisted``: Twisted's
port, connector, transports and reactor), ``libev`` (ss-server/ss-local).

What it leaves out: the kernel's work (the system calls, about 0.6x of
ssx's time per connection is libev's *system* time, see RESULTS.md), and
any difference in cost per instruction.  It is the tool for telling
whether a change to ssx's connection path made it cheaper, not a
replacement for the suite's CPU figures.  valgrind runs the processes
about 50 times slower: a default run takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import chains
from run import HERE, _address, _load, _start_far

NAMES = ("ssx", "ssx-twisted", "libev")
# valgrind makes start-up and every step slow.
_START_SECONDS = 300.0
_LOAD_SECONDS = 900.0


def _wait_accepting(port: int, popen: subprocess.Popen, deadline: float) -> None:
    while True:
        if popen.poll() is not None:
            raise chains.ChainError(f"a process under valgrind exited with {popen.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise chains.ChainError(f"nothing accepts on {port} after {_START_SECONDS:.0f} s") from None
            time.sleep(0.5)


def _callgrind(pid: int, command: str) -> None:
    subprocess.run(["callgrind_control", command, str(pid)], capture_output=True, timeout=120, check=False)


def _total(out: Path, role: str, pid: int, dump: int) -> int:
    """The instructions counted in a process's `dump`-th dump (callgrind numbers dumps from 1)."""
    path = out / f"callgrind.{role}.{pid}.{dump}"
    for line in path.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise chains.ChainError(f"no totals in {path}")


def measure(name: str, method: str, far: Any, out: Path, connections: int, round_trips: int,
            pythonpath: str) -> dict[str, Any]:
    command = "ssx" if name == "ssx-twisted" else name
    server_port, local_port = chains.free_port(), chains.free_port()
    server, local, _ = chains._commands(command, method, "instructions", server_port, local_port,
                                        pythonpath if command == "ssx" else None)
    if command == "libev":
        # Debian's binaries carry file capabilities, which valgrind will not
        # run: a plain copy of each does the same work.
        (out / "bin").mkdir(exist_ok=True)
        for argv in (server, local):
            copy = out / "bin" / Path(argv[0]).name
            shutil.copyfile(shutil.which(argv[0]) or argv[0], copy)
            copy.chmod(0o755)
            argv[0] = str(copy)
    env = chains._environment(pythonpath if command == "ssx" else None)
    if name == "ssx-twisted":
        env["SSX_TCP_PATH"] = "twisted"
    else:
        env.pop("SSX_TCP_PATH", None)
    processes: dict[str, subprocess.Popen] = {}
    try:
        for role, argv, port in (("server", server, server_port), ("local", local, local_port)):
            log = open(out / f"{name}-{role}.log", "wb")
            processes[role] = subprocess.Popen(
                ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/callgrind.{role}.%p", *argv],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out,
                start_new_session=True,
            )
            _wait_accepting(port, processes[role], time.monotonic() + _START_SECONDS)
        socks = ["--socks", f"127.0.0.1:{local_port}"]
        rr = ["rr", *socks, "--target", _address(far.rr), "--seconds", str(_LOAD_SECONDS), "--concurrency", "8"]
        udp = ["udp", *socks, "--target", _address(far.udp), "--seconds", str(_LOAD_SECONDS), "--window", "1"]
        # Warm-up: imports, caches and the first association happen here.
        _load([*rr, "--max", "50"], _LOAD_SECONDS)
        _load([*udp, "--max", "50"], _LOAD_SECONDS)
        figures: dict[str, Any] = {}
        for step, arguments, count_key, dump in (
            ("conn", [*rr, "--max", str(connections)], "completed", 1),
            ("udp", [*udp, "--max", str(round_trips)], "round_trips", 2),
        ):
            for popen in processes.values():
                _callgrind(popen.pid, "-z")
            result = _load(arguments, _LOAD_SECONDS + 60)
            for popen in processes.values():
                _callgrind(popen.pid, "-d")
            done = result.get(count_key) or 0
            if not done or result.get("mismatches"):
                raise chains.ChainError(f"{name} {step}: {result}")
            time.sleep(1)  # the dump is written asynchronously
            for role, popen in processes.items():
                figures[f"{step}_{role}"] = _total(out, role, popen.pid, dump) / done
            figures[f"{step}_count"] = done
        return figures
    finally:
        for popen in processes.values():
            if popen.poll() is None:
                popen.send_signal(signal.SIGTERM)
        for popen in processes.values():
            try:
                popen.wait(120)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chains", default=",".join(NAMES), help="comma-separated subset of %(default)s")
    parser.add_argument("--connections", type=int, default=400)
    parser.add_argument("--round-trips", type=int, default=1000)
    parser.add_argument("--method", default="aes-256-gcm")
    parser.add_argument("--out", type=Path, default=HERE / "results-instructions")
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("callgrind.*"):
        stale.unlink()
    pythonpath = chains.snapshot_ssx(out / "ssx-snapshot")
    far = _start_far(int.from_bytes(os.urandom(4), "big") >> 1, out, lifetime=3600.0)
    results: dict[str, Any] = {}
    try:
        for name in [n for n in NAMES if n in args.chains.split(",")]:
            results[name] = measure(name, args.method, far, out, args.connections, args.round_trips, pythonpath)
            figures = results[name]
            print(
                f"{name:12} per connection: server {figures['conn_server'] / 1e3:7.1f}k local "
                f"{figures['conn_local'] / 1e3:7.1f}k; per UDP round trip: server {figures['udp_server'] / 1e3:7.1f}k "
                f"local {figures['udp_local'] / 1e3:7.1f}k instructions",
                flush=True,
            )
    finally:
        far.popen.terminate()
        far.popen.wait(5)
    (out / "instructions.json").write_text(json.dumps({"method": args.method, "chains": results,
                                                       "ssx_source": chains.ssx_source(pythonpath)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
