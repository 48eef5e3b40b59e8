"""
TCP Fast Open end to end, in a network namespace of its own: ssx-server
and ssx-local (twistd) with ``--fast-open`` relay a SOCKS5 client's bytes
to an echo service, and the namespace's kernel counters show data carried
in SYNs, sent by ssx-local (TCPFastOpenActive) and accepted by ssx-server
(TCPFastOpenPassive); the same pair without ``--fast-open`` leaves them
unchanged.

TCP Fast Open needs ``net.ipv4.tcp_fastopen`` to allow clients (1) and
servers (2): the test sets 3 inside its namespace (loopback only, removed
afterwards) and leaves the host's setting alone.  Needs root and `ip netns`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests import support
from tests.support import netns

METHOD = "aes-256-gcm"
CONNECTIONS = 5

# In the namespace: an echo service on a loopback port, and a SOCKS5 client
# that opens `count` connections through ssx-local to it, one after the
# other, each sending a random payload and reading it back.  Prints the
# SHA-256 of each payload as sent, as the echo received it and as it came
# back.
CLIENT = r"""
import hashlib, json, os, socket, struct, sys, threading
socks_port, count = int(sys.argv[1]), int(sys.argv[2])
echo = socket.socket()
echo.bind(("127.0.0.1", 0)); echo.listen(16)
echo_port = echo.getsockname()[1]
received = []

def serve(conn):
    digest = hashlib.sha256()
    while True:
        data = conn.recv(65536)
        if not data:
            break
        digest.update(data)
        conn.sendall(data)
    received.append(digest.hexdigest())
    conn.close()

def accept():
    while True:
        conn, _ = echo.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()

threading.Thread(target=accept, daemon=True).start()
sent, returned = [], []
for i in range(count):
    payload = os.urandom(200_000 + i)
    s = socket.create_connection(("127.0.0.1", socks_port), timeout=10)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", echo_port))
    reply = b""
    while len(reply) < 10:
        reply += s.recv(10 - len(reply))
    assert reply[1] == 0, reply
    s.sendall(payload)
    back = b""
    while len(back) < len(payload):
        data = s.recv(65536)
        if not data:
            break
        back += data
    s.close()
    sent.append(hashlib.sha256(payload).hexdigest())
    returned.append(hashlib.sha256(back).hexdigest())
for _ in range(100):
    if len(received) == count:
        break
    threading.Event().wait(0.05)
print(json.dumps({"sent": sent, "received": sorted(received), "returned": returned}), flush=True)
"""



def _host_fastopen() -> str:
    with open("/proc/sys/net/ipv4/tcp_fastopen") as f:
        return f.read().strip()


class FastOpenNamespaceTests(unittest.TestCase):
    """ssx-local and ssx-server with --fast-open exchange data in SYNs, in a namespace with tcp_fastopen=3."""

    timeout = 120

    def setUp(self) -> None:
        self.name = netns.new_namespace(self, "ssx-tfo")
        host = _host_fastopen()
        self.in_namespace("sysctl", "-w", "net.ipv4.tcp_fastopen=3")
        if _host_fastopen() != host:
            # A kernel whose setting is not per namespace: put the host's back.
            subprocess.run(["sysctl", "-w", f"net.ipv4.tcp_fastopen={host}"], capture_output=True)
            raise unittest.SkipTest("net.ipv4.tcp_fastopen is not per network namespace on this kernel")
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def in_namespace(self, *command: str) -> str:
        return netns.in_namespace(self.name, *command)

    def counters(self) -> dict[str, int]:
        """The namespace's TcpExt counters (/proc/net/netstat)."""
        lines = [line.split() for line in self.in_namespace("cat", "/proc/net/netstat").splitlines()]
        names, values = [pair for pair in zip(lines, lines[1:]) if pair[0][0] == "TcpExt:"][0]
        return {name: int(value) for name, value in zip(names[1:], values[1:])}

    def spawn(self, *args: str) -> support.ChildProcess:
        """Run `args` inside the namespace; stopped at the test's end."""
        child = support.ChildProcess()
        command = ["ip", "netns", "exec", self.name, *args]
        reactor.spawnProcess(child, shutil.which("ip"), command, env=support.twistd_env(), path=self.directory)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
        return child

    async def start_pair(self, server_port: int, local_port: int, *extra: str) -> None:
        """ssx-server and ssx-local (twistd) in the namespace, with `extra` options on both."""
        twistd = (sys.executable, *support.TWISTD, "-n", "--pidfile=")
        server = self.spawn(
            *twistd, "ssx-server", "-s", "127.0.0.1", "-p", str(server_port), "-k", support.PASSWORD, "-m", METHOD,
            "--forbidden-ip", "", "--url-file", "", *extra,
        )
        local = self.spawn(
            *twistd, "ssx-local", "-s", "127.0.0.1", "-p", str(server_port), "-b", "127.0.0.1", "-l", str(local_port),
            "-k", support.PASSWORD, "-m", METHOD, *extra,
        )
        for child in (server, local):
            await support.wait_until(lambda: "listening on" in child.text() or child.ended.called, 15)
            self.assertIn("listening on", child.text())

    async def relay(self, local_port: int) -> None:
        """Run the client through ssx-local: every payload reaches the echo and comes back whole."""
        client = self.spawn(sys.executable, "-c", CLIENT, str(local_port), str(CONNECTIONS))
        await client.ended
        try:
            result = json.loads(client.text().strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise AssertionError(f"the client failed: {client.text()}") from None
        self.assertEqual(len(result["sent"]), CONNECTIONS)
        self.assertEqual(result["returned"], result["sent"])
        self.assertEqual(result["received"], sorted(result["sent"]))

    async def _fast_open(self) -> None:
        # Without --fast-open: bytes relayed, no data in any SYN.
        before = self.counters()
        await self.start_pair(8389, 1081)
        await self.relay(1081)
        after = self.counters()
        for name in ("TCPFastOpenActive", "TCPFastOpenPassive"):
            self.assertEqual(after[name], before[name], name)

        # With it: the first connection fetches the cookie, the later ones
        # carry ssx-local's first write in the SYN, and ssx-server takes it.
        await self.start_pair(8388, 1080, "--fast-open")
        await self.relay(1080)
        final = self.counters()
        for name in ("TCPFastOpenActive", "TCPFastOpenPassive"):
            self.assertGreaterEqual(final[name] - after[name], CONNECTIONS - 1, name)

    def test_data_in_syn(self):
        """With --fast-open, ssx-local's connections after the first carry data in the SYN, which ssx-server takes."""
        return defer.Deferred.fromCoroutine(self._fast_open())
