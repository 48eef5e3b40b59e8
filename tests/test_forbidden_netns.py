"""
End to end, in a network namespace of its own: ssx-server (twistd) must not
relay to the addresses of its own host's interfaces, for TCP and UDP, by IP
and by name, by default; and must follow an address added while it runs.

The test creates a namespace with loopback and a veth pair carrying a
public-looking address, runs in it an echo service bound to 0.0.0.0 and ::,
two ssx-servers (default list, and ``--forbidden-ip special``, which leaves
out ``self``) and a small shadowsocks client, then removes the namespace.
The namespace has no route out: nothing leaves it.  Needs root and `ip netns`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from tests import support

# This namespace's own addresses: globally routable-looking, in no special-purpose range.
OWN_V4 = "11.22.33.44"
OWN_V6 = "2a01:4f8:1:2::3"
# Added while the servers run, outside the /24 so that before that nothing routes to it.
LATER_V4 = "11.22.44.55"
HOSTS = f"{OWN_V4} own4.ssx.test\n{OWN_V6} own6.ssx.test\n{LATER_V4} later.ssx.test\n"
METHOD = "aes-256-gcm"
DEFAULT_PORT = 8388
SPECIAL_PORT = 8389

# An echo service bound to the wildcard addresses, TCP and UDP, one port;
# prints one line per connection or datagram.
ECHO = r"""
import json, selectors, socket
sel = selectors.DefaultSelector()
t4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
t4.bind(("0.0.0.0", 0)); t4.listen(64)
port = t4.getsockname()[1]
t6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
t6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
t6.bind(("::", port)); t6.listen(64)
u4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u4.bind(("0.0.0.0", port))
u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1); u6.bind(("::", port))
for s in (t4, t6):
    sel.register(s, selectors.EVENT_READ, "accept")
for s in (u4, u6):
    sel.register(s, selectors.EVENT_READ, "udp")
print(json.dumps({"port": port}), flush=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if key.data == "accept":
            conn, _ = s.accept()
            print("tcp", conn.getsockname()[0], flush=True)
            sel.register(conn, selectors.EVENT_READ, "conn")
        elif key.data == "udp":
            data, peer = s.recvfrom(65535)
            print("udp", data.decode(errors="replace"), flush=True)
            s.sendto(data, peer)
        else:
            data = s.recv(65536)
            if data:
                s.sendall(data)
            else:
                sel.unregister(s); s.close()
"""

# A shadowsocks client (ssx's own codec): for each target, TCP or UDP, says
# whether the payload came back ("echoed"), the server closed ("closed"),
# or nothing came back in time; "udp-send" only sends.
CLIENT = r"""
import json, socket, sys
from ssx.wire.address import Address, encode_address
from ssx.crypto import CipherSuite
method, password, server_port, mode, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
suite = CipherSuite(method, password)
server = ("127.0.0.1", server_port)

def tcp(host):
    payload = ("tcp to " + host).encode()
    s = socket.create_connection(server, timeout=5)
    enc, dec = suite.tcp_encryptor(), suite.tcp_decryptor()
    s.sendall(enc.encrypt(encode_address(Address(host, port)) + payload))
    got = b""
    try:
        while payload not in got:
            data = s.recv(65536)
            if not data:
                return "closed" if not got else "closed after " + repr(got)
            got += dec.decrypt(data)
        return "echoed"
    except socket.timeout:
        return "timeout"
    finally:
        s.close()

def udp(host, send_only):
    payload = ("udp to " + host).encode()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1)
    for _ in range(1 if send_only else 3):
        s.sendto(suite.udp_seal(encode_address(Address(host, port)) + payload), server)
        if send_only:
            return "sent"
        try:
            if suite.udp_open(s.recv(65536)).endswith(payload):
                return "echoed"
        except socket.timeout:
            pass
    return "no reply"

results = {}
for host in sys.argv[6:]:
    results[host] = tcp(host) if mode == "tcp" else udp(host, mode == "udp-send")
print(json.dumps(results), flush=True)
"""


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


class _Namespace:
    """A network namespace with lo and a veth pair carrying this test's addresses; `close()` removes it."""

    def __init__(self) -> None:
        self.name = f"ssxfb-sec-forbidden-{secrets.token_hex(4)}"

    def create(self) -> None:
        made = _ip("netns", "add", self.name)
        if made.returncode != 0:
            raise unittest.SkipTest(f"cannot create a network namespace: {made.stderr.strip()}")
        for args in (
            ("link", "set", "lo", "up"),
            ("link", "add", "ssxfb0", "type", "veth", "peer", "name", "ssxfb1"),
            ("link", "set", "ssxfb0", "up"),
            ("link", "set", "ssxfb1", "up"),
            ("addr", "add", f"{OWN_V4}/24", "dev", "ssxfb0"),
            ("-6", "addr", "add", f"{OWN_V6}/64", "dev", "ssxfb0", "nodad"),
        ):
            self.run(*args)

    def run(self, *args: str) -> None:
        done = _ip("-n", self.name, *args)
        if done.returncode != 0:
            raise AssertionError(f"ip -n {self.name} {' '.join(args)}: {done.stderr.strip()}")

    def close(self) -> None:
        _ip("netns", "del", self.name)


class OwnAddressTests(unittest.TestCase):
    """ssx-server in a namespace of its own refuses that namespace's own addresses."""

    timeout = 120

    def setUp(self) -> None:
        if not sys.platform.startswith("linux"):
            raise unittest.SkipTest("network namespaces are Linux only")
        if os.geteuid() != 0:
            raise unittest.SkipTest("creating a network namespace needs root")
        if shutil.which("ip") is None or _ip("netns", "list").returncode != 0:
            raise unittest.SkipTest("`ip netns` (iproute2) is not available")
        self.netns = _Namespace()
        self.netns.create()
        self.addCleanup(self.netns.close)
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.hosts_file = os.path.join(self.directory, "hosts")
        with open(self.hosts_file, "w") as f:
            f.write(HOSTS)

    def spawn(self, *args: str) -> support.ChildProcess:
        """Run `args` inside the namespace; stopped at the test's end."""
        child = support.ChildProcess()
        command = ["ip", "netns", "exec", self.netns.name, *args]
        reactor.spawnProcess(child, shutil.which("ip"), command, env=support.twistd_env(), path=self.directory)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
        return child

    async def wait_for(self, what: str, condition: Any, child: support.ChildProcess, seconds: float = 15.0) -> None:
        deadline = reactor.seconds() + seconds
        while not condition():
            if child.ended.called:
                raise AssertionError(f"{what}: the process ended: {child.text()}")
            if reactor.seconds() > deadline:
                raise AssertionError(f"{what}: not within {seconds:g} s: {child.text()}")
            await deferLater(reactor, 0.05, lambda: None)

    async def start_server(self, port: int, *extra: str) -> support.ChildProcess:
        server = self.spawn(
            sys.executable, *support.TWISTD, "-n", "--pidfile=", "ssx-server", "-s", "127.0.0.1", "-p", str(port),
            "-k", support.PASSWORD, "-m", METHOD, "-u", "--hosts-file", self.hosts_file,
            "--nameserver", "127.0.0.1", "-v", *extra,
        )
        await self.wait_for(f"ssx-server on port {port} listening", lambda: b"listening on" in b"".join(server.output), server)
        return server

    async def client(self, server_port: int, mode: str, echo_port: int, *targets: str) -> dict[str, str]:
        """Run the shadowsocks client in the namespace; its verdict per target."""
        child = self.spawn(sys.executable, "-c", CLIENT, METHOD, support.PASSWORD, str(server_port), mode,
                           str(echo_port), *targets)
        await child.ended
        lines = child.text().strip().splitlines()
        try:
            return json.loads(lines[-1])
        except (IndexError, ValueError):
            raise AssertionError(f"the client failed: {child.text()}") from None

    def echoed(self, echo: support.ChildProcess, kind: str) -> list[str]:
        return [line for line in echo.text().splitlines() if line.startswith(kind + " ")]

    async def _own_addresses(self) -> None:
        echo = self.spawn(sys.executable, "-u", "-c", ECHO)
        await self.wait_for("echo ready", lambda: b"port" in b"".join(echo.output), echo)
        echo_port = json.loads(echo.text().splitlines()[0])["port"]
        guarded = await self.start_server(DEFAULT_PORT)
        targets = [OWN_V4, OWN_V6, f"::ffff:{OWN_V4}", "own4.ssx.test", "own6.ssx.test"]

        # TCP: every target is refused (the server closes, nothing reaches the echo).
        results = await self.client(DEFAULT_PORT, "tcp", echo_port, *targets)
        self.assertEqual(results, {t: "closed" for t in targets})
        self.assertEqual(self.echoed(echo, "tcp"), [], "a connection reached this host's own address")

        # UDP: each datagram is refused by the server, and none reaches the echo.
        await self.client(DEFAULT_PORT, "udp-send", echo_port, *targets)
        await self.wait_for(
            "the UDP datagrams refused",
            lambda: guarded.text().count("UDP: refused") >= len(targets) or self.echoed(echo, "udp"),
            guarded,
        )
        self.assertEqual(self.echoed(echo, "udp"), [], "a datagram reached this host's own address")

        # The control: the same server with 'special' alone, which leaves out
        # 'self': the same targets reach the echo.
        await self.start_server(SPECIAL_PORT, "--forbidden-ip", "special")
        results = await self.client(SPECIAL_PORT, "tcp", echo_port, *targets)
        self.assertEqual(results, {t: "echoed" for t in targets})
        self.assertEqual(sorted(set(self.echoed(echo, "tcp"))), sorted({f"tcp {OWN_V4}", f"tcp {OWN_V6}"}))
        results = await self.client(SPECIAL_PORT, "udp", echo_port, *targets)
        self.assertEqual(results, {t: "echoed" for t in targets})

        # An address the host gains while the server runs: first unreachable
        # (and so remembered as allowed), then refused once it is local.
        results = await self.client(DEFAULT_PORT, "tcp", echo_port, LATER_V4)
        self.assertEqual(results, {LATER_V4: "closed"})
        self.assertNotIn("forbidden address " + LATER_V4, guarded.text())
        self.netns.run("addr", "add", f"{LATER_V4}/32", "dev", "ssxfb0")
        await self.wait_for(
            "the new address seen",
            lambda: any("own addresses" in line and LATER_V4 in line for line in guarded.text().splitlines()),
            guarded,
        )
        before = len(self.echoed(echo, "tcp"))
        results = await self.client(DEFAULT_PORT, "tcp", echo_port, LATER_V4, "later.ssx.test")
        self.assertEqual(results, {LATER_V4: "closed", "later.ssx.test": "closed"})
        self.assertEqual(len(self.echoed(echo, "tcp")), before, "a connection reached the newly added address")
        self.assertIn("forbidden address " + LATER_V4, guarded.text())
        results = await self.client(SPECIAL_PORT, "tcp", echo_port, LATER_V4)
        self.assertEqual(results, {LATER_V4: "echoed"})

    def test_own_addresses_refused(self):
        """Through the default ssx-server, the host's own IPv4 and IPv6 addresses (literal, mapped, hosts-file name) are refused for TCP and UDP, an address added later too; with 'special' alone they are reached."""
        return defer.Deferred.fromCoroutine(self._own_addresses())
