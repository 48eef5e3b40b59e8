"""
Where ssx-server's connections and datagrams to targets leave from, in a
network namespace of its own: two addresses on the namespace's `lo`
(10.77.0.1, the target's, and 10.77.0.2), ssx-server (twistd) on
127.0.0.1, and a client that asks it for a TCP connection and a UDP
datagram to targets on 10.77.0.1.  The targets report the source address
they see: the kernel's choice (10.77.0.1 itself) by default, 10.77.0.2
with ``--outbound-address 10.77.0.2``, also when sent through ``lo`` with
``--interface lo``.  The same with fd77::1 and fd77::2 for IPv6: each
family's targets see that family's source address, and a family without
one is reached unbound.  Needs root and `ip netns`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests import support
from tests.support import netns

METHOD = "aes-256-gcm"
TARGET = "10.77.0.1"
SOURCE = "10.77.0.2"
TARGET6 = "fd77::1"
SOURCE6 = "fd77::2"

# In the namespace: a TCP and a UDP target on `target`, and a Shadowsocks
# client that asks the server on 127.0.0.1:`port` for each; prints the
# source addresses the targets saw.
CLIENT = r"""
import json, socket, sys
from ssx.crypto import make_suite
from ssx.wire.address import Address, encode_address
port, password, method, target = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
suite = make_suite(method, password)
family = socket.AF_INET6 if ":" in target else socket.AF_INET
listener = socket.socket(family); listener.bind((target, 0)); listener.listen(4); listener.settimeout(10)
udp = socket.socket(family, socket.SOCK_DGRAM); udp.bind((target, 0)); udp.settimeout(10)
client = socket.create_connection(("127.0.0.1", port), timeout=10)
client.sendall(suite.tcp_encryptor().encrypt(encode_address(Address(target, listener.getsockname()[1])) + b"hello"))
accepted, _ = listener.accept()
tcp_source = accepted.getpeername()[0]
sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sender.sendto(suite.udp_seal(encode_address(Address(target, udp.getsockname()[1])) + b"ping"), ("127.0.0.1", port))
_, source = udp.recvfrom(65536)
udp_source = source[0]
print(json.dumps({"tcp": tcp_source, "udp": udp_source}), flush=True)
"""



class OutboundNamespaceTests(unittest.TestCase):
    """The targets see the source address ssx-server is told to use, in a namespace with two addresses on lo."""

    timeout = 120

    def setUp(self) -> None:
        self.name = netns.new_namespace(self, "ssx-outbound")
        for address in (TARGET, SOURCE):
            self.in_namespace("ip", "addr", "add", f"{address}/32", "dev", "lo")
        for address in (TARGET6, SOURCE6):
            # nodad: usable at once, without duplicate address detection's wait.
            self.in_namespace("ip", "addr", "add", f"{address}/128", "dev", "lo", "nodad")
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def in_namespace(self, *command: str) -> str:
        return netns.in_namespace(self.name, *command)

    def spawn(self, *args: str) -> support.ChildProcess:
        """Run `args` inside the namespace; stopped at the test's end."""
        child = support.ChildProcess()
        command = ["ip", "netns", "exec", self.name, *args]
        reactor.spawnProcess(child, shutil.which("ip"), command, env=support.twistd_env(), path=self.directory)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
        return child

    def server(self, port: int, *extra: str) -> support.ChildProcess:
        """ssx-server (twistd, TCP and UDP) in the namespace, with `extra` options."""
        return self.spawn(
            sys.executable, *support.TWISTD, "-n", "--pidfile=", "ssx-server", "-s", "127.0.0.1", "-p", str(port),
            "-k", support.PASSWORD, "-m", METHOD, "-u", "--forbidden-ip", "", "--url-file", "", *extra,
        )

    async def sources(self, port: int, *extra: str, targets: tuple[str, ...] = (TARGET,)) -> list[dict[str, str]]:
        """
        The source addresses the TCP and UDP targets on each of `targets`
        see through one ssx-server started with `extra`.
        """
        server = self.server(port, *extra)
        await support.wait_until(lambda: "listening on" in server.text() or server.ended.called, 15)
        self.assertIn("listening on", server.text())
        seen = []
        for target in targets:
            client = self.spawn(sys.executable, "-c", CLIENT, str(port), support.PASSWORD, METHOD, target)
            await client.ended
            try:
                seen.append(json.loads(client.text().strip().splitlines()[-1]))
            except (IndexError, ValueError):
                raise AssertionError(f"the client failed: {client.text()}\nserver: {server.text()}") from None
        return seen

    @support.coroutine_test
    async def test_default_source(self):
        """Without the options, the kernel chooses: the target's own address on lo."""
        self.assertEqual(await self.sources(8388), [{"tcp": TARGET, "udp": TARGET}])

    @support.coroutine_test
    async def test_outbound_address(self):
        """With --outbound-address, both the TCP connection and the UDP datagram come from it."""
        self.assertEqual(await self.sources(8388, "--outbound-address", SOURCE), [{"tcp": SOURCE, "udp": SOURCE}])

    @support.coroutine_test
    async def test_interface(self):
        """--interface lo (SO_BINDTODEVICE, as root) still reaches the targets, from the configured address."""
        self.assertEqual(
            await self.sources(8388, "--outbound-address", SOURCE, "--interface", "lo"), [{"tcp": SOURCE, "udp": SOURCE}],
        )

    @support.coroutine_test
    async def test_both_families(self):
        """With an IPv4 and an IPv6 source address, each family's targets see their own."""
        seen = await self.sources(8388, "--outbound-address", f"{SOURCE},{SOURCE6}", targets=(TARGET, TARGET6))
        self.assertEqual(seen, [{"tcp": SOURCE, "udp": SOURCE}, {"tcp": SOURCE6, "udp": SOURCE6}])

    @support.coroutine_test
    async def test_other_family_unbound(self):
        """With an IPv6 source address only, IPv4 targets are reached unbound (the kernel's choice)."""
        seen = await self.sources(8388, "--outbound-address", SOURCE6, targets=(TARGET, TARGET6))
        self.assertEqual(seen, [{"tcp": TARGET, "udp": TARGET}, {"tcp": SOURCE6, "udp": SOURCE6}])

    @support.coroutine_test
    async def test_missing_interface(self):
        """An interface the namespace lacks stops start-up with one line naming the key."""
        server = self.server(8388, "--interface", "eth0")
        await server.ended
        lines = [line for line in server.text().splitlines() if "bad configuration" in line]
        self.assertEqual(lines, ["ssx-server: bad configuration: interface: no interface 'eth0' on this host"])
