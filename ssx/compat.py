"""
The commands of the implementations ssx replaces, as drop-ins:
`ssx-ssserver` and `ssx-sslocal` take the original Python shadowsocks'
flags (`ssserver -c /etc/shadowsocks.json -d start`), `ssx-ss-server` and
`ssx-ss-local` shadowsocks-libev's.  Nothing runs differently: `translate`
turns such a command line into a `twistd` command line (daemonising, pid
file, log file, user) for `ssx-server` or `ssx-local` with their own
options, and `main` hands it to twistd's own runner.  A flag whose feature
ssx does not have is refused by name, never dropped.

The translation is pure (argv in, argv out) and needs no Twisted; only
`-d stop` touches a process (`stop_daemon`).
"""

from __future__ import annotations

import errno
import getopt
import os
import pwd
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ssx import __version__
from ssx.config.file import read_config_file
from ssx.config.known_keys import ORIGINAL_METHOD  # when neither -m nor the file names one
from ssx.errors import ConfigError

__all__ = [
    "COMMANDS",
    "Command",
    "Plan",
    "Refused",
    "UsageError",
    "main",
    "running",
    "ss_local",
    "ss_server",
    "sslocal",
    "ssserver",
    "stop_daemon",
    "translate",
]

# The original's defaults for daemon mode (shadowsocks/shell.py).
DEFAULT_PID_FILE = "/var/run/shadowsocks.pid"
DEFAULT_LOG_FILE = "/var/log/shadowsocks.log"
# libev's default idle timeout (ssx's is 300 s, the original's too).
LIBEV_TIMEOUT = "60"
# How long `-d stop` waits for the process to go: ssx's default shutdown
# grace (10 s) for running connections, and a margin.
STOP_SECONDS = 20.0


@dataclass(frozen=True)
class Command:
    """One drop-in command: whose flags it takes and which ssx end it runs."""

    name: str
    flavour: str  # "python" (the original) or "libev"
    end: str  # "server" or "local"

    @property
    def tap(self) -> str:
        return "ssx-server" if self.end == "server" else "ssx-local"


COMMANDS = {
    c.name: c
    for c in (
        Command("ssx-ssserver", "python", "server"),
        Command("ssx-sslocal", "python", "local"),
        Command("ssx-ss-server", "libev", "server"),
        Command("ssx-ss-local", "libev", "local"),
    )
}


class UsageError(Exception):
    """A command line the replaced command would not take either (exit status 2)."""


class Refused(UsageError):
    """A flag whose feature ssx does not have yet (exit status 2)."""

    def __init__(self, flag: str, what: str = "") -> None:
        detail = f" ({what})" if what else ""
        super().__init__(f"{flag}{detail} is not supported by ssx yet")
        self.flag = flag


@dataclass(frozen=True)
class Plan:
    """
    What to do: `action` is "run" (twistd with `twistd_args`), "stop",
    "restart" (stop the process in `pid_file`, then run), "help" or
    "version"; `warnings` are printed first.
    """

    action: str
    twistd_args: tuple[str, ...] = ()
    pid_file: str | None = None
    warnings: tuple[str, ...] = field(default=())


def default_user_lookup(name: str) -> tuple[int, int]:
    """A user name (or number) as the uid and primary gid twistd switches to."""
    try:
        entry = pwd.getpwuid(int(name)) if name.isascii() and name.isdigit() else pwd.getpwnam(name)
    except (KeyError, OverflowError, ValueError):  # ValueError: an embedded NUL
        raise UsageError(f"user {name!r}: no such user") from None
    return entry.pw_uid, entry.pw_gid


def translate(
    name: str,
    argv: Sequence[str],
    read_config: Callable[[str], Mapping[str, Any]] = read_config_file,
    lookup_user: Callable[[str], tuple[int, int]] = default_user_lookup,
) -> Plan:
    """The plan for command `name` run with the arguments `argv` (without the command itself)."""
    command = COMMANDS[name]
    if command.flavour == "python":
        return _Original(command, read_config, lookup_user).translate(list(argv))
    return _Libev(command, read_config, lookup_user).translate(list(argv))


class _Translation:
    """What both flavours share: the ssx options gathered and the twistd ones."""

    def __init__(
        self, command: Command, read_config: Callable[[str], Mapping[str, Any]],
        lookup_user: Callable[[str], tuple[int, int]],
    ) -> None:
        self.command = command
        self.read_config = read_config
        self.lookup_user = lookup_user
        self.ssx: list[str] = []
        self.warnings: list[str] = []
        self.config: Mapping[str, Any] = {}
        self.user: str | None = None

    def parse(self, argv: list[str], short: str, long: list[str], gnu: bool) -> list[tuple[str, str]]:
        try:
            parse = getopt.gnu_getopt if gnu else getopt.getopt
            pairs, rest = parse(argv, short, long)
        except getopt.GetoptError as e:
            raise UsageError(f"{e.msg} (-h for help)") from None
        if rest:
            raise UsageError(f"unexpected argument {rest[0]!r} (-h for help)")
        config = [value for flag, value in pairs if flag == "-c"]
        if config:
            # Read here only to learn whether it sets what the replaced
            # command defaults differently; ssx reads it again itself.
            try:
                self.config = self.read_config(config[-1])
            except ConfigError as e:
                raise UsageError(f"bad configuration: {e}") from None
        return pairs

    def obsolete(self, flag: str) -> None:
        self.warnings.append(f"{flag} is obsolete and ignored")

    def twistd_user(self) -> list[str]:
        user = self.user if self.user is not None else self.config.get("user")
        if user is None:
            return []
        if not isinstance(user, str) or not user:
            raise UsageError("user: expected a user name")
        uid, gid = self.lookup_user(user)
        return ["--uid", str(uid), "--gid", str(gid)]

    def url_file(self, password_given: bool) -> list[str]:
        # The replaced servers write no file with the ss:// URL; a server
        # whose password is given does not need one either.
        if self.command.end == "server" and password_given and "url_file" not in self.config:
            return ["--url-file="]
        return []

    def has_password(self, flags: set[str]) -> bool:
        return bool(flags & {"-k", "--password", "--key"}) or any(k in self.config for k in ("password", "key"))

    def plan(self, action: str, twistd: list[str], pid_file: str | None = None) -> Plan:
        args = (*twistd, self.command.tap, *self.ssx)
        return Plan(action, args, pid_file, tuple(self.warnings))


class _Original(_Translation):
    """The original Python shadowsocks: getopt flags of shadowsocks/shell.py."""

    def translate(self, argv: list[str]) -> Plan:
        server = self.command.end == "server"
        short = "hd:s:p:k:m:c:t:vqa" if server else "hd:s:b:p:k:l:m:c:t:vqa"
        long = ["help", "fast-open", "pid-file=", "log-file=", "user=", "libopenssl=", "libmbedtls=",
                "libsodium=", "version"]
        if server:
            long += ["workers=", "forbidden-ip=", "manager-address=", "prefer-ipv6"]
        pairs = self.parse(argv, short, long, gnu=False)
        direct = {"-c": "-c", "-s": "-s", "-p": "-p", "-k": "-k", "-m": "-m", "-t": "-t", "-b": "-b", "-l": "-l",
                  "--forbidden-ip": "--forbidden-ip"}
        # The original reads -d from the file too ("daemon": "start"); -d overrides it.
        daemon = self.config.get("daemon")
        if daemon is not None and daemon not in ("start", "stop", "restart"):
            raise UsageError(f"daemon {daemon!r}: expected start, stop or restart")
        pid_file = self.config.get("pid-file", DEFAULT_PID_FILE)
        log_file = self.config.get("log-file", DEFAULT_LOG_FILE)
        verbose = quiet = 0
        for flag, value in pairs:
            if flag in ("-h", "--help"):
                return Plan("help")
            if flag == "--version":
                return Plan("version")
            if flag in direct:
                self.ssx += [direct[flag], value]
            elif flag == "-d":
                if value not in ("start", "stop", "restart"):
                    raise UsageError(f"-d {value}: expected start, stop or restart")
                daemon = value
            elif flag == "--pid-file":
                pid_file = value
            elif flag == "--log-file":
                log_file = value
            elif flag == "--user":
                self.user = value
            elif flag == "-v":
                verbose += 1
            elif flag == "-q":
                quiet += 1
            elif flag == "--fast-open":
                self.ssx.append("--fast-open")
            elif flag == "--prefer-ipv6":
                self.ssx.append("--prefer-ipv6")
            elif flag == "--workers":
                if value != "1":
                    self.ssx += ["--workers", value]
            elif flag == "--manager-address":
                # The original's server is the manager: ssx-server's --manager-address.
                self.ssx += ["--manager-address", value]
            elif flag == "-a":
                self.obsolete("-a (one-time auth)")
            else:  # --libopenssl= and the like: ssx loads no C libraries
                self.obsolete(flag)
        if verbose:
            self.ssx.append("--verbose")
        if quiet:
            self.warnings.append("-q: ssx logs no line per connection unless -v is given; warnings and errors stay")
        flags = {flag for flag, _ in pairs}
        if "-m" not in flags and "method" not in self.config:
            self.ssx += ["-m", ORIGINAL_METHOD]
        if "mode" not in self.config:
            # The original always relays UDP beside TCP.
            self.ssx.append("-u")
        self.ssx += self.url_file(self.has_password(flags))
        user = self.twistd_user()
        if daemon is None:
            # In the foreground the original writes neither pid file nor log file.
            return self.plan("run", ["--nodaemon", "--pidfile=", *user])
        for key, path in (("pid-file", pid_file), ("log-file", log_file)):
            if not isinstance(path, str) or not path:
                raise UsageError(f"{key}: expected a path")
        twistd = ["--pidfile", pid_file, "--logfile", log_file, *user]
        action = {"start": "run", "stop": "stop", "restart": "restart"}[daemon]
        return self.plan(action, twistd, pid_file)


class _Libev(_Translation):
    """shadowsocks-libev's ss-server and ss-local (getopt_long, options anywhere)."""

    def translate(self, argv: list[str]) -> Plan:
        server = self.command.end == "server"
        short = "f:s:p:l:k:t:m:b:c:i:d:a:n:huUv6A" if server else "f:s:p:l:k:t:m:i:c:b:a:n:huUv6A"
        long = ["fast-open", "reuse-port", "no-delay", "acl=", "manager-address=", "mtu=", "mptcp", "plugin=",
                "plugin-opts=", "password=", "key=", "help"]
        pairs = self.parse(argv, short, long, gnu=True)
        params = {"-p": "-p", "-k": "-k", "--password": "-k", "-m": "-m", "-c": "-c", "-t": "-t",
                  "--plugin": "--plugin", "--plugin-opts": "--plugin-opts", "--key": "--key", "--acl": "--acl"}
        switches = {"-u": "-u", "-U": "-U", "--fast-open": "--fast-open", "--no-delay": "--no-delay",
                    "-v": "--verbose", "--reuse-port": "--reuse-port"}
        unsupported = {
            "-n": "raising the open-file limit",
            "--manager-address": "reporting traffic to an external ss-manager (ssx-server's own --manager-address answers the manager API itself)",
            "--mtu": "the UDP MTU",
            "--mptcp": "multipath TCP",
        }
        if server:
            params["-d"] = "--nameserver"
            switches["-6"] = "--prefer-ipv6"
            # The source address and interface of connections to targets.
            params.update({"-b": "--outbound-address", "-i": "--interface"})
        else:
            params.update({"-b": "-b", "-l": "-l"})
            unsupported["-i"] = "sending through a chosen interface on the local end"
            unsupported["-6"] = "preferring IPv6 on the local end"
        pid_file = None
        hosts: list[str] = []
        for flag, value in pairs:
            if flag in ("-h", "--help"):
                return Plan("help")
            if flag in unsupported:
                raise Refused(flag, unsupported[flag])
            if flag in params:
                self.ssx += [params[flag], value]
            elif flag in switches:
                self.ssx.append(switches[flag])
            elif flag == "-s":
                hosts.append(value)
            elif flag == "-a":
                self.user = value
            elif flag == "-f":
                pid_file = value
            elif flag == "-A":
                self.obsolete("-A (one-time auth)")
            elif flag == "-l":  # ss-server takes -l and does nothing with it
                self.obsolete("-l on the server")
        flags = {flag for flag, _ in pairs}
        self.ssx += self._hosts(hosts, pairs)
        if "-t" not in flags and "timeout" not in self.config:
            self.ssx += ["-t", LIBEV_TIMEOUT]
        # ssx-server reads ipv6_first itself; passed as -6 here, it would override the file's prefer_ipv6.
        if server and "-6" not in flags and self.config.get("ipv6_first") is True and "prefer_ipv6" not in self.config:
            self.ssx.append("--prefer-ipv6")
        self.ssx += self.url_file(self.has_password(flags))
        user = self.twistd_user()
        if pid_file is None:
            return self.plan("run", ["--nodaemon", "--pidfile=", *user])
        if not pid_file:
            raise UsageError("-f: expected the pid file's path")
        # Daemonised, libev logs to syslog.
        return self.plan("run", ["--pidfile", pid_file, "--syslog", "--prefix", self.command.name, *user], pid_file)

    def _hosts(self, hosts: list[str], pairs: list[tuple[str, str]]) -> list[str]:
        """-s is ssx's -s; repeated on the server, each address is bound apart (IPv6 ones IPv6-only beside IPv4, as libev does)."""
        if len(hosts) > 1 and self.command.end == "local":
            raise Refused("-s given more than once", "several servers on the command line; use --url for each")
        return [arg for host in hosts for arg in ("-s", host)]


def stop_daemon(pid_file: str, seconds: float = STOP_SECONDS, out: Any = None) -> int:
    """
    `-d stop`: SIGTERM to the process in `pid_file`, then wait until it is
    gone; its exit status (0 also when it was not running).
    """
    out = out if out is not None else sys.stderr
    try:
        with open(pid_file) as f:
            text = f.read().strip()
    except FileNotFoundError:
        print("not running", file=out)
        return 0
    except OSError as e:
        print(f"cannot read {pid_file}: {e.strerror or e}", file=out)
        return 1
    if not text.isdigit() or int(text) <= 0:
        print(f"{pid_file} does not hold a process id", file=out)
        return 1
    pid = int(text)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        print("not running", file=out)
        _remove(pid_file)
        return 0
    except PermissionError:
        print(f"not allowed to stop process {pid}", file=out)
        return 1
    deadline = time.monotonic() + seconds
    while running(pid):
        if time.monotonic() > deadline:
            print(f"timed out when stopping pid {pid}", file=out)
            return 1
        time.sleep(0.05)
    # twistd removes it on a clean exit; a killed one leaves it.
    _remove(pid_file)
    print("stopped", file=out)
    return 0


def running(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (the exited child of a parent yet to reap it) is gone too.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise


def _usage(command: Command) -> str:
    if command.flavour == "python":
        lines = [
            f"usage: {command.name} [OPTION]...",
            f"The original shadowsocks' {'ssserver' if command.end == 'server' else 'sslocal'} flags, "
            f"run as 'twistd {command.tap}' (see 'twistd {command.tap} --help').",
            "  -c CONFIG -s ADDR -p PORT -k PASSWORD -m METHOD [aes-256-cfb] -t TIMEOUT",
        ]
        if command.end == "local":
            lines.append("  -b LOCAL_ADDR -l LOCAL_PORT")
        else:
            lines.append("  --forbidden-ip LIST --prefer-ipv6 --workers N")
        lines += [
            "  -d start|stop|restart --pid-file PATH [/var/run/shadowsocks.pid] --log-file PATH "
            "[/var/log/shadowsocks.log] --user NAME",
            "  -v -q --fast-open --version -h; -a, --libopenssl/--libmbedtls/--libsodium: obsolete, ignored",
        ]
    else:
        lines = [
            f"usage: {command.name} [OPTION]...",
            f"shadowsocks-libev's {'ss-server' if command.end == 'server' else 'ss-local'} flags, "
            f"run as 'twistd {command.tap}' (see 'twistd {command.tap} --help').",
            "  -s ADDR -p PORT -k PASSWORD (--password) --key KEY -m METHOD -c CONFIG -t TIMEOUT [60]",
            "  -a USER -f PIDFILE (daemonise, log to syslog) -u -U -v --fast-open --no-delay "
            "--plugin NAME --plugin-opts OPTS",
        ]
        lines.append("  -d NAMESERVER -6" if command.end == "server" else "  -b LOCAL_ADDR -l LOCAL_PORT")
    lines.append("Not supported yet (refused): see README.rst, 'Drop-in commands'.")
    return "\n".join(lines)


def run_twistd(args: Sequence[str]) -> None:
    """Hand over to twistd's own runner, as `twistd ARGS` would."""
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *args]
    run()


def main(name: str, argv: Sequence[str] | None = None) -> int:
    """Run drop-in command `name` with `argv` (default: the process's arguments); its exit status."""
    command = COMMANDS[name]
    try:
        plan = translate(name, sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    for line in plan.warnings:
        print(f"{name}: warning: {line}", file=sys.stderr)
    if plan.action == "help":
        print(_usage(command))
        return 0
    if plan.action == "version":
        print(f"{name} (ssx) {__version__}")
        return 0
    if plan.action in ("stop", "restart"):
        assert plan.pid_file is not None
        status = stop_daemon(plan.pid_file)
        if plan.action == "stop" or status != 0:
            return status
    run_twistd(plan.twistd_args)
    return 0


def ssserver() -> None:
    """Console script `ssx-ssserver`."""
    raise SystemExit(main("ssx-ssserver"))


def sslocal() -> None:
    """Console script `ssx-sslocal`."""
    raise SystemExit(main("ssx-sslocal"))


def ss_server() -> None:
    """Console script `ssx-ss-server`."""
    raise SystemExit(main("ssx-ss-server"))


def ss_local() -> None:
    """Console script `ssx-ss-local`."""
    raise SystemExit(main("ssx-ss-local"))


if __name__ == "__main__":
    # python -m ssx.compat ssx-ssserver -c config.json -d start
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python -m ssx.compat {{{','.join(COMMANDS)}}} [OPTION]...", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(sys.argv[1], sys.argv[2:]))
