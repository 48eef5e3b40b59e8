"""
The drop-in commands' translation (`ssx.compat.translate`): the original's
and libev's command lines in, twistd command lines for ssx-server and
ssx-local out, flag by flag; refused flags; `-d stop` on a real process.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from typing import Any, Mapping

from twisted.trial import unittest

from ssx import compat
from ssx.compat import Plan, Refused, UsageError, default_user_lookup, stop_daemon, translate

USERS = {"shadowsocks": (990, 985), "nobody": (65534, 65534)}


def plan(name: str, *argv: str, config: Mapping[str, Any] | None = None) -> Plan:
    """Translate with a fake config file and a fake user table."""

    def lookup(user: str) -> tuple[int, int]:
        if user not in USERS:
            raise UsageError(f"user {user!r}: no such user")
        return USERS[user]

    return translate(name, list(argv), read_config=lambda path: config or {}, lookup_user=lookup)


def split(p: Plan) -> tuple[list[str], str, list[str]]:
    """The twistd options, the command, and the command's options."""
    args = list(p.twistd_args)
    for tap in ("ssx-server", "ssx-local"):
        if tap in args:
            i = args.index(tap)
            return args[:i], tap, args[i + 1:]
    raise AssertionError(args)


def pairs(options: list[str]) -> list[tuple[str, str]]:
    """Adjacent (flag, value) pairs, to look one up."""
    return list(zip(options, options[1:]))


class OriginalServerTests(unittest.SynchronousTestCase):
    """ssx-ssserver takes ssserver's flags."""

    def test_common_flags(self):
        """-c -s -p -k -m -t go to ssx-server's options of the same letters, in the foreground without pid file."""
        p = plan("ssx-ssserver", "-c", "/etc/ss.json", "-s", "::", "-p", "8388", "-k", "pw", "-m", "aes-256-gcm",
                 "-t", "120")
        twistd, tap, ssx = split(p)
        self.assertEqual(p.action, "run")
        self.assertEqual(twistd, ["--nodaemon", "--pidfile="])
        self.assertEqual(tap, "ssx-server")
        self.assertEqual(ssx[:12], ["-c", "/etc/ss.json", "-s", "::", "-p", "8388", "-k", "pw", "-m", "aes-256-gcm",
                                    "-t", "120"])

    def test_original_default_method(self):
        """Without -m and without a method in the file, the original's aes-256-cfb; with either, none added."""
        self.assertIn(("-m", "aes-256-cfb"), pairs(split(plan("ssx-ssserver", "-k", "pw"))[2]))
        _, _, ssx = split(plan("ssx-ssserver", "-c", "f", config={"method": "aes-128-gcm"}))
        self.assertNotIn("-m", ssx)
        _, _, ssx = split(plan("ssx-ssserver", "-m", "rc4-md5"))
        self.assertEqual(ssx.count("-m"), 1)

    def test_udp_always(self):
        """The original relays UDP beside TCP: -u, unless the file sets a mode."""
        self.assertIn("-u", split(plan("ssx-ssserver"))[2])
        self.assertNotIn("-u", split(plan("ssx-ssserver", "-c", "f", config={"mode": "tcp_only"}))[2])

    def test_url_file_only_without_password(self):
        """With a password (flag or file) no URL file is written; without, ssx keeps the generated one in it."""
        self.assertIn("--url-file=", split(plan("ssx-ssserver", "-k", "pw"))[2])
        self.assertIn("--url-file=", split(plan("ssx-ssserver", "-c", "f", config={"password": "pw"}))[2])
        self.assertNotIn("--url-file=", split(plan("ssx-ssserver"))[2])
        self.assertNotIn("--url-file=", split(plan("ssx-ssserver", "-c", "f", config={"password": "p", "url_file": "u"}))[2])

    def test_daemon_start_defaults(self):
        """-d start daemonises with the original's default pid and log files."""
        p = plan("ssx-ssserver", "-d", "start")
        self.assertEqual(p.action, "run")
        self.assertEqual(split(p)[0], ["--pidfile", "/var/run/shadowsocks.pid", "--logfile", "/var/log/shadowsocks.log"])
        self.assertEqual(p.pid_file, "/var/run/shadowsocks.pid")

    def test_daemon_files(self):
        """--pid-file and --log-file become twistd's --pidfile and --logfile; the file's pid-file/log-file keys too."""
        p = plan("ssx-ssserver", "-d", "start", "--pid-file", "/tmp/x.pid", "--log-file", "/tmp/x.log")
        self.assertEqual(split(p)[0], ["--pidfile", "/tmp/x.pid", "--logfile", "/tmp/x.log"])
        p = plan("ssx-ssserver", "-c", "f", "-d", "start", config={"pid-file": "/a.pid", "log-file": "/a.log"})
        self.assertEqual(split(p)[0], ["--pidfile", "/a.pid", "--logfile", "/a.log"])

    def test_daemon_key(self):
        """The file's daemon key is -d, as in the original; -d on the command line wins; a bad value is a usage error."""
        p = plan("ssx-ssserver", "-c", "f", config={"daemon": "start", "pid-file": "/a.pid"})
        self.assertEqual((p.action, split(p)[0][:2]), ("run", ["--pidfile", "/a.pid"]))
        p = plan("ssx-ssserver", "-c", "f", "-d", "stop", config={"daemon": "start", "pid-file": "/a.pid"})
        self.assertEqual((p.action, p.pid_file), ("stop", "/a.pid"))
        with self.assertRaises(UsageError):
            plan("ssx-ssserver", "-c", "f", config={"daemon": "yes"})

    def test_ipv6_first_beside_prefer_ipv6(self):
        """libev's ipv6_first is not passed as -6 when the file also sets prefer_ipv6, which ssx-server lets win."""
        options = split(plan("ssx-ss-server", "-c", "f", config={"ipv6_first": True, "prefer_ipv6": False}))[2]
        self.assertNotIn("--prefer-ipv6", options)

    def test_daemon_stop_restart(self):
        """-d stop and -d restart name the pid file to stop; a bad -d value is a usage error."""
        p = plan("ssx-ssserver", "-d", "stop", "--pid-file", "/tmp/x.pid")
        self.assertEqual((p.action, p.pid_file), ("stop", "/tmp/x.pid"))
        p = plan("ssx-ssserver", "-d", "restart", "--pid-file", "/tmp/x.pid")
        self.assertEqual((p.action, p.pid_file), ("restart", "/tmp/x.pid"))
        self.assertIn("--pidfile", split(p)[0])
        with self.assertRaisesRegex(UsageError, "-d reload: expected start, stop or restart"):
            plan("ssx-ssserver", "-d", "reload")

    def test_pid_and_log_ignored_in_foreground(self):
        """As in the original, --pid-file and --log-file matter only with -d."""
        p = plan("ssx-ssserver", "--pid-file", "/tmp/x.pid", "--log-file", "/tmp/x.log")
        self.assertEqual(split(p)[0], ["--nodaemon", "--pidfile="])

    def test_user(self):
        """--user NAME (or the file's user) becomes twistd's --uid and --gid, resolved; an unknown one is refused."""
        self.assertEqual(split(plan("ssx-ssserver", "--user", "shadowsocks"))[0][2:], ["--uid", "990", "--gid", "985"])
        self.assertEqual(split(plan("ssx-ssserver", "-c", "f", config={"user": "nobody"}))[0][2:],
                         ["--uid", "65534", "--gid", "65534"])
        with self.assertRaisesRegex(UsageError, "user 'nosuch': no such user"):
            plan("ssx-ssserver", "--user", "nosuch")

    def test_real_user_lookup(self):
        """The default lookup resolves a name and a number from the system's table."""
        self.assertEqual(compat.default_user_lookup("root"), (0, 0))
        self.assertEqual(compat.default_user_lookup("0"), (0, 0))
        self.assertRaises(UsageError, compat.default_user_lookup, "no-such-user-ssx")

    def test_verbosity(self):
        """-v and -vv are --verbose; -q and -qq are accepted with a warning."""
        self.assertEqual(split(plan("ssx-ssserver", "-vv"))[2].count("--verbose"), 1)
        self.assertIn("--verbose", split(plan("ssx-ssserver", "-v"))[2])
        p = plan("ssx-ssserver", "-qq")
        self.assertNotIn("--verbose", split(p)[2])
        self.assertEqual(len(p.warnings), 1)
        self.assertIn("-q", p.warnings[0])

    def test_server_flags(self):
        """--fast-open, --prefer-ipv6 and --forbidden-ip pass through; --workers 1 is accepted."""
        _, _, ssx = split(plan("ssx-ssserver", "--fast-open", "--prefer-ipv6", "--forbidden-ip", "10.0.0.0/8",
                               "--workers", "1"))
        self.assertIn("--fast-open", ssx)
        self.assertIn("--prefer-ipv6", ssx)
        self.assertIn(("--forbidden-ip", "10.0.0.0/8"), pairs(ssx))
        self.assertNotIn("--workers", ssx)

    def test_workers(self):
        """--workers N>1 passes through to ssx-server's own --workers."""
        self.assertIn(("--workers", "4"), pairs(split(plan("ssx-ssserver", "--workers", "4"))[2]))

    def test_manager_address(self):
        """The original's --manager-address (the server answers the manager API) is ssx-server's."""
        _, _, ssx = split(plan("ssx-ssserver", "--manager-address", "127.0.0.1:6001"))
        self.assertIn(("--manager-address", "127.0.0.1:6001"), pairs(ssx))

    def test_user_not_a_number(self):
        """--user with a non-ASCII digit is looked up as a name (one usage error), not a traceback."""
        for name in ("\u00b2", "a\x00b"):
            with self.assertRaises(UsageError):
                default_user_lookup(name)

    def test_obsolete(self):
        """-a and --libopenssl=/--libmbedtls=/--libsodium= are accepted with a warning each, and not passed on."""
        p = plan("ssx-ssserver", "-a", "--libopenssl=/x", "--libmbedtls=/y", "--libsodium=/z")
        self.assertEqual(len(p.warnings), 4)
        self.assertTrue(all("obsolete" in w for w in p.warnings), p.warnings)
        for word in ("-a", "lib"):
            self.assertFalse([a for a in split(p)[2] if a.startswith(word)])

    def test_help_version(self):
        """-h, --help and --version are answered by the command itself."""
        self.assertEqual(plan("ssx-ssserver", "-h").action, "help")
        self.assertEqual(plan("ssx-ssserver", "--help").action, "help")
        self.assertEqual(plan("ssx-ssserver", "--version").action, "version")

    def test_local_only_flags(self):
        """ssserver has no -b or -l, and stray arguments are usage errors."""
        self.assertRaises(UsageError, plan, "ssx-ssserver", "-l", "1080")
        self.assertRaises(UsageError, plan, "ssx-ssserver", "-b", "127.0.0.1")
        self.assertRaises(UsageError, plan, "ssx-ssserver", "start")


class OriginalLocalTests(unittest.SynchronousTestCase):
    """ssx-sslocal takes sslocal's flags."""

    def test_flags(self):
        """-s -p -b -l -k -m -t go to ssx-local; -d start daemonises; server-only flags are usage errors."""
        p = plan("ssx-sslocal", "-s", "198.51.100.1", "-p", "8388", "-b", "0.0.0.0", "-l", "1081", "-k", "pw",
                 "-m", "aes-128-gcm", "-t", "60", "-d", "start", "--pid-file", "/tmp/l.pid")
        twistd, tap, ssx = split(p)
        self.assertEqual(tap, "ssx-local")
        self.assertEqual(twistd, ["--pidfile", "/tmp/l.pid", "--logfile", "/var/log/shadowsocks.log"])
        for pair in (("-s", "198.51.100.1"), ("-p", "8388"), ("-b", "0.0.0.0"), ("-l", "1081"), ("-k", "pw"),
                     ("-m", "aes-128-gcm"), ("-t", "60")):
            self.assertIn(pair, pairs(ssx))
        self.assertNotIn("--url-file=", ssx)
        self.assertRaises(UsageError, plan, "ssx-sslocal", "--workers", "1")
        self.assertRaises(UsageError, plan, "ssx-sslocal", "--forbidden-ip", "x")


class LibevServerTests(unittest.SynchronousTestCase):
    """ssx-ss-server takes ss-server's flags."""

    def test_common_flags(self):
        """-s -p -k -m -c -t --key --plugin --plugin-opts pass through, in the foreground, options anywhere."""
        p = plan("ssx-ss-server", "-s", "127.0.0.1", "-p", "8388", "-k", "pw", "-m", "aes-256-gcm", "-c", "f",
                 "-t", "30", "--plugin", "obfs-server", "--plugin-opts", "obfs=http", "--key", "a2V5")
        twistd, tap, ssx = split(p)
        self.assertEqual(twistd, ["--nodaemon", "--pidfile="])
        self.assertEqual(tap, "ssx-server")
        for pair in (("-s", "127.0.0.1"), ("-p", "8388"), ("-k", "pw"), ("-m", "aes-256-gcm"), ("-c", "f"),
                     ("-t", "30"), ("--plugin", "obfs-server"), ("--plugin-opts", "obfs=http"), ("--key", "a2V5")):
            self.assertIn(pair, pairs(ssx))
        self.assertIn(("-k", "pw"), pairs(split(plan("ssx-ss-server", "--password", "pw"))[2]))

    def test_libev_timeout(self):
        """Without -t or a timeout in the file, libev's 60 s."""
        self.assertIn(("-t", "60"), pairs(split(plan("ssx-ss-server"))[2]))
        self.assertNotIn("-t", split(plan("ssx-ss-server", "-c", "f", config={"timeout": 5}))[2])
        self.assertNotIn("-m", split(plan("ssx-ss-server"))[2])

    def test_repeated_server(self):
        """-s twice: ssx-server's repeatable -s, each address bound apart on -p."""
        _, _, ssx = split(plan("ssx-ss-server", "-s", "127.0.0.1", "-s", "::1", "-p", "9000"))
        self.assertEqual([value for flag, value in pairs(ssx) if flag == "-s"], ["127.0.0.1", "::1"])
        self.assertIn(("-p", "9000"), pairs(ssx))
        self.assertNotIn("--listen", ssx)

    def test_switches(self):
        """-u -U -6 -v --fast-open --no-delay become ssx-server's switches; -d is --nameserver."""
        _, _, ssx = split(plan("ssx-ss-server", "-u", "-U", "-6", "-v", "--fast-open", "--no-delay", "-d", "1.1.1.1"))
        for switch in ("-u", "-U", "--prefer-ipv6", "--verbose", "--fast-open", "--no-delay"):
            self.assertIn(switch, ssx)
        self.assertIn(("--nameserver", "1.1.1.1"), pairs(ssx))
        self.assertIn("--prefer-ipv6", split(plan("ssx-ss-server", "-c", "f", config={"ipv6_first": True}))[2])

    def test_daemon_and_user(self):
        """-f PIDFILE daemonises with that pid file, logging to syslog; -a USER is --uid/--gid."""
        p = plan("ssx-ss-server", "-f", "/run/ss.pid", "-a", "nobody")
        self.assertEqual(split(p)[0], ["--pidfile", "/run/ss.pid", "--syslog", "--prefix", "ssx-ss-server",
                                       "--uid", "65534", "--gid", "65534"])
        self.assertEqual(p.pid_file, "/run/ss.pid")

    def test_outbound(self):
        """-b (the source address of connections to targets) and -i (their interface) go to ssx-server."""
        _, _, ssx = split(plan("ssx-ss-server", "-b", "192.0.2.1", "-i", "eth0"))
        self.assertIn(("--outbound-address", "192.0.2.1"), pairs(ssx))
        self.assertIn(("--interface", "eth0"), pairs(ssx))

    def test_acl(self):
        """--acl FILE goes to either end as it is."""
        for command in ("ssx-ss-server", "ssx-ss-local"):
            self.assertIn(("--acl", "x.acl"), pairs(split(plan(command, "-k", "pw", "--acl", "x.acl"))[2]))

    def test_refused(self):
        """-n --manager-address --mtu --mptcp: refused, naming the flag; --reuse-port passes through."""
        self.assertIn("--reuse-port", split(plan("ssx-ss-server", "-k", "pw", "--reuse-port"))[2])
        cases = [["-n", "4096"],
                 ["--manager-address", "/tmp/m.sock"], ["--mtu", "1400"], ["--mptcp"]]
        for argv in cases:
            with self.assertRaises(Refused) as caught:
                plan("ssx-ss-server", "-k", "pw", *argv)
            self.assertEqual(caught.exception.flag, argv[0])

    def test_obsolete(self):
        """-A (one-time auth) is accepted with a warning."""
        self.assertEqual(len(plan("ssx-ss-server", "-A").warnings), 1)

    def test_help(self):
        """-h and --help."""
        self.assertEqual(plan("ssx-ss-server", "-h").action, "help")
        self.assertEqual(plan("ssx-ss-server", "--help").action, "help")


class LibevLocalTests(unittest.SynchronousTestCase):
    """ssx-ss-local takes ss-local's flags."""

    def test_flags(self):
        """-s -p -b -l -k -m -u go to ssx-local; -6, -i and a second -s are refused."""
        _, tap, ssx = split(plan("ssx-ss-local", "-s", "203.0.113.1", "-p", "8388", "-b", "127.0.0.1", "-l", "1080",
                                 "-k", "pw", "-m", "aes-128-gcm", "-u"))
        self.assertEqual(tap, "ssx-local")
        for pair in (("-s", "203.0.113.1"), ("-p", "8388"), ("-b", "127.0.0.1"), ("-l", "1080"), ("-k", "pw"),
                     ("-m", "aes-128-gcm")):
            self.assertIn(pair, pairs(ssx))
        self.assertIn("-u", ssx)
        self.assertRaises(Refused, plan, "ssx-ss-local", "-6")
        self.assertRaises(Refused, plan, "ssx-ss-local", "-i", "eth0")
        self.assertRaises(Refused, plan, "ssx-ss-local", "-s", "a", "-s", "b")
        self.assertRaises(UsageError, plan, "ssx-ss-local", "-d", "1.1.1.1")


class MainTests(unittest.SynchronousTestCase):
    """`main` prints one line for a refused flag and exits 2, before starting anything."""

    def setUp(self):
        self.err = io.StringIO()
        self.out = io.StringIO()
        self.patch(sys, "stderr", self.err)
        self.patch(sys, "stdout", self.out)
        self.patch(compat, "run_twistd", lambda args: self.fail(f"twistd run with {args}"))

    def test_refused_one_line(self):
        """A refused flag: one line naming it, exit status 2."""
        self.assertEqual(compat.main("ssx-ss-server", ["-k", "pw", "--mtu", "1400"]), 2)
        self.assertEqual(self.err.getvalue().splitlines(),
                         ["ssx-ss-server: --mtu (the UDP MTU) is not supported by ssx yet"])

    def test_unknown_flag(self):
        """A flag neither command knows: one line, exit status 2."""
        self.assertEqual(compat.main("ssx-ssserver", ["--bogus"]), 2)
        self.assertEqual(self.err.getvalue().splitlines(), ["ssx-ssserver: option --bogus not recognized (-h for help)"])

    def test_help_and_version(self):
        """-h prints the flags; --version the ssx version."""
        self.assertEqual(compat.main("ssx-ssserver", ["-h"]), 0)
        self.assertIn("--pid-file", self.out.getvalue())
        self.assertEqual(compat.main("ssx-sslocal", ["--version"]), 0)
        self.assertIn("(ssx)", self.out.getvalue())

    def test_runs_twistd(self):
        """A good command line goes to twistd's runner, warnings printed first."""
        ran: list = []
        self.patch(compat, "run_twistd", ran.append)
        self.assertEqual(compat.main("ssx-ss-server", ["-A", "-k", "pw"]), 0)
        self.assertEqual(ran[0][:3], ("--nodaemon", "--pidfile=", "ssx-server"))
        self.assertIn("warning: -A (one-time auth) is obsolete", self.err.getvalue())


class StopDaemonTests(unittest.SynchronousTestCase):
    """`-d stop` ends the process named in the pid file and waits for it."""

    def test_stop(self):
        """SIGTERM reaches the process, stop returns once it is gone and removes the pid file."""
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        self.addCleanup(lambda: child.poll() is None and child.kill())
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"{child.pid}\n")
        out = io.StringIO()
        self.assertEqual(stop_daemon(path, seconds=10, out=out), 0)
        self.assertEqual(child.wait(5), -15)
        self.assertFalse(os.path.exists(path))
        self.assertEqual(out.getvalue(), "stopped\n")

    def test_not_running(self):
        """No pid file, or a pid no longer running: 'not running', status 0."""
        out = io.StringIO()
        self.assertEqual(stop_daemon(self.mktemp(), out=out), 0)
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(str(child.pid))
        self.assertEqual(stop_daemon(path, out=out), 0)
        self.assertEqual(out.getvalue(), "not running\nnot running\n")
        self.assertFalse(os.path.exists(path))

    def test_garbage(self):
        """A pid file without a number: status 1, nothing signalled."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("-1")
        out = io.StringIO()
        self.assertEqual(stop_daemon(path, out=out), 1)
        self.assertIn("does not hold a process id", out.getvalue())
