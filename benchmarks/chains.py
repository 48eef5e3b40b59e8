"""
The chains under test: start, check, measure and stop their proxy processes.

A chain is a local end offering SOCKS5 on 127.0.0.1 plus the Shadowsocks
server it talks to, both on free loopback ports:

* ``ssx``: ``twistd -n ssx-local`` + ``twistd -n ssx-server`` (epoll reactor);
* ``libev``: Debian's ``ss-local`` + ``ss-server`` (shadowsocks-libev);
* ``pproxy``: ``python -m pproxy`` twice (asyncio on uvloop, PyPI's peer);
* ``python``: the original Python shadowsocks (``sslocal`` + ``ssserver``
  of its 3.0 code, the one with AEAD ciphers, run from a checkout that
  ``SSX_BENCH_ORIGINAL`` names: it is not on PyPI and is not part of ssx);
* ``floor``: no proxy at all; the loads talk to the far end directly.

`start_chain` returns once a real request/reply has crossed the chain, and
`Chain.stop` ends exactly the processes it started (SIGTERM, then SIGKILL).
`Chain.cpu_seconds` and `Chain.rss_kib` read ``/proc/PID/stat`` and
``/proc/PID/status`` of the proxy processes, which is all the suite knows of
them: the same figures for a C program and for a Python one.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import load
import payload

__all__ = [
    "CHAINS",
    "Chain",
    "ChainError",
    "free_port",
    "is_workers_chain",
    "missing",
    "snapshot_ssx",
    "ssx_source",
    "start_chain",
    "versions",
]

CHAINS = ("ssx", "ssx-w2", "libev", "pproxy", "python", "floor")
# `ssx-wN`: ssx with --workers N on both ends (any N may be named with --chains).
# Where the original Python shadowsocks is checked out (the directory that
# holds its ``shadowsocks`` package).
ORIGINAL_ENV = "SSX_BENCH_ORIGINAL"
# Its 3.0 code predates Python 3.10, which moved MutableMapping out of
# collections: put the name back, then run its command's main().
_ORIGINAL = (
    "import collections, collections.abc, sys; "
    "collections.MutableMapping = collections.abc.MutableMapping; "
    "from shadowsocks import {module}; sys.argv[0] = {command!r}; {module}.main()"
)

_READY_TIMEOUT = 20.0
_STOP_TIMEOUT = 5.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_TWISTD = "from twisted.scripts.twistd import run; run()"


class ChainError(Exception):
    """A chain did not start or did not relay; the message carries its log's tail."""


def free_port() -> int:
    """A loopback port free for both TCP and UDP right now."""
    for _ in range(50):
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise ChainError("no free loopback port")


@dataclass
class ProxyProcess:
    role: str  # "local" or "server"
    popen: subprocess.Popen
    log: Path


@dataclass
class Chain:
    """A running chain; `socks` is None for the floor."""

    name: str
    method: str | None
    socks: tuple[str, int] | None = None
    #: "associate" (SOCKS5 UDP ASSOCIATE), "direct" (SOCKS5 UDP datagrams to
    #: `udp_port` without ASSOCIATE), or None (no UDP through this chain).
    udp_mode: str | None = None
    udp_port: int | None = None
    #: Answers come without the SOCKS5 UDP header (pproxy's do).
    udp_bare_replies: bool = False
    processes: list[ProxyProcess] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        """The proxy processes and their children (the workers of ``--workers``)."""
        pids = []
        for p in self.processes:
            pids.append(p.popen.pid)
            pids += _children(p.popen.pid)
        return pids

    def cpu_seconds(self) -> float:
        """User + system CPU time of the proxy processes so far."""
        total = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:  # a worker that ended meanwhile
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / _CLOCK_TICKS

    def rss_kib(self) -> int:
        """Resident memory of the proxy processes now."""
        total = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1])
            except OSError:
                continue
        return total

    def check_alive(self) -> None:
        for p in self.processes:
            if p.popen.poll() is not None:
                raise ChainError(f"{self.name} {p.role} exited with {p.popen.returncode}\n{_tail(p.log)}")

    def stop(self) -> None:
        for p in self.processes:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        for p in self.processes:
            try:
                p.popen.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()

    def __enter__(self) -> "Chain":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _children(pid: int) -> list[int]:
    """The child processes of `pid` now (none if the kernel does not list them)."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(child) for child in f.read().split()]
    except OSError:
        pass
    return found


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@functools.cache
def _ssx_has_udp(pythonpath: str | None) -> bool:
    """Whether both ssx commands take ``-u`` (UDP relay) in the ssx that `pythonpath` finds."""
    env = _environment(pythonpath)
    for command in ("ssx-server", "ssx-local"):
        out = subprocess.run(
            [sys.executable, "-c", _TWISTD, command, "--help"],
            capture_output=True, text=True, timeout=60, cwd="/", env=env,
        ).stdout
        if not re.search(r"^\s*-u[,\s]", out, re.MULTILINE):
            return False
    return True


def _environment(pythonpath: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def snapshot_ssx(destination: Path) -> str:
    """
    Copy the ssx package and its twistd plugin file to `destination`; the PYTHONPATH that runs them.

    Others may edit the checkout while a suite runs: every ssx chain of the
    run then uses this copy, taken at the start.
    """
    spec = importlib.util.find_spec("ssx")
    if spec is None or not spec.submodule_search_locations:
        raise ChainError("ssx is not installed")
    package = Path(list(spec.submodule_search_locations)[0]).resolve()
    destination = destination.resolve()
    if package.parent == destination:  # already running from this snapshot
        return os.environ.get("PYTHONPATH", "")
    if destination.exists():
        shutil.rmtree(destination)
    shutil.copytree(package, destination / "ssx", ignore=shutil.ignore_patterns("__pycache__"))
    plugin = package.parent / "twisted" / "plugins" / "ssx_plugins.py"
    if plugin.exists():
        (destination / "twisted" / "plugins").mkdir(parents=True)
        shutil.copy2(plugin, destination / "twisted" / "plugins")
    # What was copied, for ssx_source: the checkout may change right after.
    (destination / "SOURCE.json").write_text(json.dumps(_checkout_state(package)))
    return os.pathsep.join(filter(None, [str(destination), os.environ.get("PYTHONPATH")]))


def _commands(
    name: str, method: str, password: str, server_port: int, local_port: int, pythonpath: str | None
) -> tuple[list[str], list[str], str | None]:
    """(server argv, local argv, UDP mode) of one chain."""
    server_url = f"ss://{method}:{password}@127.0.0.1:{server_port}"
    if name == "ssx" or _workers(name):
        workers = _workers(name)
        udp = ["-u"] if _ssx_has_udp(pythonpath) else []
        twistd = [sys.executable, "-c", _TWISTD, "-n", "--pidfile="]
        server = twistd + [
            "ssx-server", "--listen", f"tcp:{server_port}:interface=127.0.0.1",
            "-k", password, "-m", method, "--forbidden-ip=",
        ] + udp
        local = twistd + [
            "ssx-local", "-s", "127.0.0.1", "-p", str(server_port), "-b", "127.0.0.1",
            "-l", str(local_port), "-k", password, "-m", method,
        ]
        if workers:
            # SOCKS5 UDP needs one process per association (ssx-local refuses
            # it with workers): the UDP figure reads n/a for these chains.
            server += ["--workers", str(workers)]
            local += ["--workers", str(workers)]
        else:
            local += udp
        # Without -u the association is still tried: ssx answers 07 and the
        # UDP figure reads n/a.
        return server, local, "associate"
    if name == "libev":
        server = ["ss-server", "-s", "127.0.0.1", "-p", str(server_port), "-k", password, "-m", method, "-u"]
        local = [
            "ss-local", "-s", "127.0.0.1", "-p", str(server_port), "-b", "127.0.0.1",
            "-l", str(local_port), "-k", password, "-m", method, "-u",
        ]
        return server, local, "associate"
    if name == "pproxy":
        pproxy = [sys.executable, "-m", "pproxy"]
        server = pproxy + ["-l", server_url, "-ul", server_url]
        # pproxy's SOCKS5 has no UDP ASSOCIATE; its -ul socks5 listener takes
        # SOCKS5 UDP datagrams directly, on the same port number.
        local = pproxy + [
            "-l", f"socks5://127.0.0.1:{local_port}", "-r", server_url,
            "-ul", f"socks5://127.0.0.1:{local_port}", "-ur", server_url,
        ]
        return server, local, "direct"
    if name == "python":
        original = [sys.executable, "-c"]
        server = original + [_ORIGINAL.format(module="server", command="ssserver"),
                             "-s", "127.0.0.1", "-p", str(server_port), "-k", password, "-m", method, "--forbidden-ip", "", "-q"]
        local = original + [_ORIGINAL.format(module="local", command="sslocal"),
                            "-s", "127.0.0.1", "-p", str(server_port), "-b", "127.0.0.1",
                            "-l", str(local_port), "-k", password, "-m", method, "-q"]
        # -q: by default it logs a line per connection and per datagram, a
        # cost an operator would turn off.  It relays UDP on both ends always, and its SOCKS5 takes UDP ASSOCIATE.
        return server, local, "associate"
    raise ValueError(f"unknown chain {name!r}")


def is_workers_chain(name: str) -> bool:
    """Whether `name` is ``ssx-wN``: ssx with --workers N on both ends."""
    return _workers(name) > 0


def _workers(name: str) -> int:
    """N of a chain named ``ssx-wN`` (ssx with --workers N), else 0."""
    if name.startswith("ssx-w") and name[5:].isdigit():
        return int(name[5:])
    return 0


def _wait_listening(chain: Chain, port: int, deadline: float) -> None:
    while True:
        chain.check_alive()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise ChainError(f"{chain.name}: nothing listens on port {port}")
            time.sleep(0.05)


def probe(socks: tuple[str, int] | None, rr_target: tuple[str, int]) -> None:
    """One request/reply through the chain, checked; raises on any failure."""
    sock = socket.create_connection(socks or rr_target, timeout=5)
    with sock:
        if socks:
            load.socks5_handshake(sock, load.CMD_CONNECT, *rr_target)
        request = payload.make_request(payload.MODE_REPLY, 1)
        sock.sendall(request)
        reply = b""
        while len(reply) < payload.REQUEST_SIZE:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        if reply != payload.reply_for(request):
            raise ChainError(f"probe reply wrong: {reply[:16]!r}...")


def start_chain(
    name: str,
    method: str | None,
    rr_target: tuple[str, int],
    logdir: Path,
    password: str,
    pythonpath: str | None = None,
) -> Chain:
    """Start chain `name` (its Python processes with `pythonpath`), wait until it relays a checked request."""
    if name == "floor":
        return Chain(name, None)
    logdir.mkdir(parents=True, exist_ok=True)
    server_port, local_port = free_port(), free_port()
    while local_port == server_port:
        local_port = free_port()
    server_argv, local_argv, udp_mode = _commands(name, method, password, server_port, local_port, pythonpath)
    chain = Chain(name, method, ("127.0.0.1", local_port), udp_mode, local_port, udp_mode == "direct")
    try:
        for role, argv in (("server", server_argv), ("local", local_argv)):
            log = logdir / f"{name}-{method}-{role}.log"
            environment = _environment(os.environ[ORIGINAL_ENV] if name == "python" else pythonpath)
            with open(log, "wb") as out:
                # cwd: not the checkout, whose ssx/ would shadow PYTHONPATH.
                popen = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                    cwd=logdir, env=environment,
                )
            chain.processes.append(ProxyProcess(role, popen, log))
        deadline = time.monotonic() + _READY_TIMEOUT
        _wait_listening(chain, server_port, deadline)
        _wait_listening(chain, local_port, deadline)
        while True:
            try:
                probe(chain.socks, rr_target)
                break
            except (OSError, ChainError, load.Socks5Refused) as e:
                chain.check_alive()
                if time.monotonic() > deadline:
                    raise ChainError(f"{name} {method}: does not relay: {e}") from None
                time.sleep(0.1)
    except BaseException:
        chain.stop()
        raise
    return chain


def missing(name: str) -> str | None:
    """Why chain `name` cannot run on this machine, or None if it can."""
    if (name == "ssx" or _workers(name)) and importlib.util.find_spec("ssx") is None:
        return "ssx is not installed (pip install -e .)"
    if name == "libev":
        for program in ("ss-server", "ss-local"):
            if shutil.which(program) is None:
                return f"{program} not found (apt-get install shadowsocks-libev)"
    if name == "pproxy" and importlib.util.find_spec("pproxy") is None:
        return "pproxy is not installed (pip install -e '.[bench]')"
    if name == "python":
        where = os.environ.get(ORIGINAL_ENV)
        if not where:
            return f"{ORIGINAL_ENV} is not set (see benchmarks/README.md)"
        if not (Path(where) / "shadowsocks" / "crypto" / "aead.py").exists():
            return f"{ORIGINAL_ENV}={where} is not a checkout of the original's 3.0 code (no shadowsocks/crypto/aead.py)"
    return None


def _checkout_state(package: Path) -> dict[str, object]:
    """The package's path and, if it is this checkout's, the commit and the uncommitted files."""
    state: dict[str, object] = {"package": str(package)}
    top = Path(__file__).resolve().parent.parent
    if package != top / "ssx":
        state["note"] = f"not the ssx of this checkout ({top})"
        return state
    try:
        head = subprocess.run(["git", "-C", str(top), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        status = subprocess.run(
            ["git", "-C", str(top), "status", "--porcelain", "--", "ssx", "twisted"],
            capture_output=True, text=True, timeout=30,
        )
        state["commit"] = head.stdout.strip()
        state["uncommitted"] = [line[3:] for line in status.stdout.splitlines()]
    except OSError:
        pass
    return state


def ssx_source(pythonpath: str | None = None) -> dict[str, object]:
    """
    Which ssx the chains run: the package that `pythonpath` imports and, for
    a snapshot, what it was copied from (commit and uncommitted files then).
    """
    imported = subprocess.run(
        [sys.executable, "-c", "import ssx; print(ssx.__file__)"],
        capture_output=True, text=True, timeout=60, cwd="/", env=_environment(pythonpath),
    )
    if imported.returncode:
        return {"error": imported.stderr.strip()[-300:]}
    package = Path(imported.stdout.strip()).resolve().parent
    marker = package.parent / "SOURCE.json"
    if marker.exists():
        return {"package": str(package), "snapshot_of": json.loads(marker.read_text())}
    return _checkout_state(package)


def versions() -> dict[str, str]:
    """Versions of what is measured, for the report."""
    found: dict[str, str] = {}
    for dist in ("ssx", "twisted", "cryptography", "pproxy", "uvloop", "pycryptodome"):
        try:
            from importlib.metadata import version

            found[dist] = version(dist)
        except Exception:
            found[dist] = "not installed"
    where = os.environ.get(ORIGINAL_ENV)
    if where:
        try:
            init = (Path(where) / "setup.py").read_text()
            match = re.search(r"version=['\"]([^'\"]+)", init)
            found["shadowsocks (original)"] = match.group(1) if match else "unknown"
        except OSError:
            found["shadowsocks (original)"] = "not found"
    try:
        out = subprocess.run(["ss-server", "-h"], capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"shadowsocks-libev ([\d.]+)", out)
        found["shadowsocks-libev"] = match.group(1) if match else "unknown"
    except OSError:
        found["shadowsocks-libev"] = "not installed"
    return found
