"""
Transparent proxying through real kernel paths, in three network
namespaces the tests create and remove: a LAN client, a router and a
target, joined by two veth pairs (10.18.1.0/24 and fd18:1::/64 on the LAN,
10.18.2.0/24 and fd18:2::/64 between router and target).  The target holds
the "outside" addresses 10.18.9.9 and fd18:9::9, which the client reaches
through the router.  The router forwards nothing: nftables diverts the
client's traffic to ssx-local (REDIRECT, or TPROXY with policy routing),
which relays it through ssx-server in the target's namespace to a target
that records the bytes (their SHA-256) and the source it saw, and answers
with that digest.  The client checks each answer, and, for UDP, that it
came from the very address and port it sent to.  README's recipes
(nftables, TPROXY with policy routing, and REDIRECT) are loaded as written,
for the outside addresses 198.51.100.9 and 2001:db8:9::9 (which they do
not leave alone, unlike the private ranges).  With an ACL, ssx-local
connects to a bypassed destination (198.51.100.10, 2001:db8:9::10) itself:
the target sees the router's address as the source, not ssx-server's, and
ssx-local's own marked packets are not diverted back to it.  Needs root,
`ip netns` and nft.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests import support
from tests.support import netns

METHOD = "chacha20-ietf-poly1305"
PORT = 7000  # the target's TCP and UDP port
PROXY_PORT = 12345  # ssx-local's transparent port
MARK = 42
OUTSIDE = "10.18.9.9"
OUTSIDE6 = "fd18:9::9"
# Outside addresses that README's recipe does not leave alone (its bypass
# sets hold the private ranges): documentation ranges, inside the namespaces.
PUBLIC = "198.51.100.9"
PUBLIC6 = "2001:db8:9::9"
# Outside addresses the ACL test's [bypass_list] sends direct.
BYPASSED = "198.51.100.10"
BYPASSED6 = "2001:db8:9::10"
# In the outside range too, but not in the ACL tests' bypass list.
OUTSIDE_PROXIED = "10.18.9.10"
TARGETS = (OUTSIDE, OUTSIDE6, PUBLIC, PUBLIC6, BYPASSED, BYPASSED6, OUTSIDE_PROXIED)
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.rst")
SERVER = "10.18.2.2"
CLIENT_IP = "10.18.1.2"
CLIENT_IP6 = "fd18:1::2"
# The router's addresses: towards the target (a direct connection's source) and on the LAN.
ROUTER_WAN = ("10.18.2.1", "fd18:2::1")
ROUTER_LAN = "10.18.1.1"

# In the target's namespace: TCP and UDP on PORT at each address given;
# one JSON line per connection or datagram: its digest and its source.
TARGET = r"""
import hashlib, json, selectors, socket, sys
port, addresses = int(sys.argv[1]), sys.argv[2:]
selector = selectors.DefaultSelector()
for host in addresses:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port)); listener.listen(8)
    selector.register(listener, selectors.EVENT_READ, "tcp")
    udp = socket.socket(family, socket.SOCK_DGRAM); udp.bind((host, port))
    selector.register(udp, selectors.EVENT_READ, "udp")
print("target ready", flush=True)
while True:
    for key, _ in selector.select():
        if key.data == "udp":
            data, source = key.fileobj.recvfrom(65535)
            digest = hashlib.sha256(data).hexdigest()
            print(json.dumps({"udp": digest, "source": source[0]}), flush=True)
            key.fileobj.sendto(digest.encode(), source)
            continue
        connection, source = key.fileobj.accept()
        connection.settimeout(30)
        digest = hashlib.sha256()
        while True:
            chunk = connection.recv(65536)
            if not chunk:
                break
            digest.update(chunk)
        print(json.dumps({"tcp": digest.hexdigest(), "source": source[0]}), flush=True)
        connection.sendall(digest.hexdigest().encode())
        connection.close()
"""

# In the LAN client's namespace: TCP (256 KiB, then a half-close) or UDP
# (three datagrams) to HOST:PORT; prints what it sent and what came back.
CLIENT = r"""
import hashlib, json, os, socket, sys
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
if kind == "probe":
    # TCP straight to HOST:PORT: what comes back before the connection ends.
    reply = b""
    try:
        sock = socket.create_connection((host, port), timeout=20)
        sock.sendall(os.urandom(1024))
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass  # closed at once (an abort can come before connect returns)
    print(json.dumps({"received": len(reply)}), flush=True)
elif kind == "tcp":
    payload = os.urandom(256 * 1024)
    sock = socket.create_connection((host, port), timeout=20)
    peer = sock.getpeername()[:2]
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    reply = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        reply += chunk
    print(json.dumps({"sent": [hashlib.sha256(payload).hexdigest()], "replies": [reply.decode()],
                      "sources": [list(peer)]}), flush=True)
else:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.settimeout(3)
    sent, replies, sources = [], [], []
    for size in (1, 1200, 8000):
        payload = os.urandom(size)
        for attempt in range(5):
            sock.sendto(payload, (host, port))
            try:
                reply, source = sock.recvfrom(65535)
                break
            except socket.timeout:
                continue
        else:
            reply, source = b"", ("", 0)
        sent.append(hashlib.sha256(payload).hexdigest())
        replies.append(reply.decode())
        sources.append(list(source[:2]))
    print(json.dumps({"sent": sent, "replies": replies, "sources": sources}), flush=True)
"""

# In the LAN client's namespace: TCP, then UDP, to HOST:PORT; prints how
# many bytes came back on the connection and whether a datagram came back.
OWN_PORT_CLIENT = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
try:
    # Refused at once: the reset may come as early as connect's return.
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(b"x" * 100)
    reply = sock.recv(100)
except OSError:
    reply = b""
print("tcp", len(reply), flush=True)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.settimeout(2)
udp.sendto(b"y" * 100, (host, port))
try:
    print("udp", len(udp.recv(100)), flush=True)
except socket.timeout:
    print("udp none", flush=True)
"""

TPROXY_RULES = f"""
table inet ssx_test {{
    chain divert {{
        type filter hook prerouting priority mangle; policy accept;
        iifname "lan1" ip daddr 10.18.9.0/24 meta l4proto {{ tcp, udp }} tproxy ip to :{PROXY_PORT} meta mark set 1 accept
        iifname "lan1" ip6 daddr fd18:9::/64 meta l4proto {{ tcp, udp }} tproxy ip6 to :{PROXY_PORT} meta mark set 1 accept
    }}
    chain own {{
        type filter hook output priority filter; policy accept;
        ip daddr {SERVER} meta mark != {MARK} counter drop
        ip daddr 10.18.9.0/24 meta mark != {MARK} counter drop
        ip6 daddr fd18:9::/64 meta mark != {MARK} counter drop
    }}
}}
"""

REDIRECT_RULES = f"""
table inet ssx_test {{
    chain divert {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "lan1" ip daddr 10.18.9.0/24 tcp dport {PORT} redirect to :{PROXY_PORT}
        iifname "lan1" ip6 daddr fd18:9::/64 tcp dport {PORT} redirect to :{PROXY_PORT}
    }}
}}
"""


WATCH_RULES = f"""
table inet ssx_watch {{
    counter recaptured {{
    }}
    chain prerouting {{
        type filter hook prerouting priority mangle - 10; policy accept;
        iifname "lo" ip daddr {BYPASSED} counter name "recaptured"
        iifname "lo" ip6 daddr {BYPASSED6} counter name "recaptured"
    }}
}}
"""


class TransparentNamespaceTests(unittest.TestCase):
    """A LAN client's TCP and UDP reach the target through ssx-local on a router, diverted by nftables."""

    timeout = 120

    def setUp(self) -> None:
        if shutil.which("nft") is None:
            raise unittest.SkipTest("nft not on PATH: install nftables to run these tests")
        prefix = f"ssx-transparent-{os.getpid()}"
        self.lan = netns.new_namespace(self, f"{prefix}-lan")
        self.router = netns.new_namespace(self, f"{prefix}-router")
        self.target = netns.new_namespace(self, f"{prefix}-target")
        netns.link_namespaces(self.lan, "lan0", self.router, "lan1")
        netns.link_namespaces(self.router, "wan0", self.target, "wan1")
        self.addresses(self.lan, "lan0", "10.18.1.2/24", "fd18:1::2/64")
        self.addresses(self.router, "lan1", "10.18.1.1/24", "fd18:1::1/64")
        self.addresses(self.router, "wan0", "10.18.2.1/24", "fd18:2::1/64")
        self.addresses(self.target, "wan1", "10.18.2.2/24", "fd18:2::2/64")
        self.addresses(self.target, "lo", f"{OUTSIDE}/32", f"{OUTSIDE6}/128")
        self.addresses(self.target, "lo", f"{PUBLIC}/32", f"{PUBLIC6}/128")
        self.addresses(self.target, "lo", f"{BYPASSED}/32", f"{BYPASSED6}/128")
        netns.in_namespace(self.target, "ip", "addr", "add", f"{OUTSIDE_PROXIED}/32", "dev", "lo")
        netns.in_namespace(self.lan, "ip", "route", "add", "default", "via", "10.18.1.1")
        netns.in_namespace(self.lan, "ip", "-6", "route", "add", "default", "via", "fd18:1::1")
        netns.in_namespace(self.router, "ip", "route", "add", "10.18.9.0/24", "via", "10.18.2.2")
        netns.in_namespace(self.router, "ip", "-6", "route", "add", "fd18:9::/64", "via", "fd18:2::2")
        netns.in_namespace(self.router, "ip", "route", "add", f"{PUBLIC}/32", "via", "10.18.2.2")
        netns.in_namespace(self.router, "ip", "-6", "route", "add", f"{PUBLIC6}/128", "via", "fd18:2::2")
        netns.in_namespace(self.router, "ip", "route", "add", f"{BYPASSED}/32", "via", "10.18.2.2")
        netns.in_namespace(self.router, "ip", "-6", "route", "add", f"{BYPASSED6}/128", "via", "fd18:2::2")
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def addresses(self, name: str, device: str, ipv4: str, ipv6: str) -> None:
        netns.in_namespace(name, "ip", "addr", "add", ipv4, "dev", device)
        # nodad: usable at once, without duplicate address detection's wait.
        netns.in_namespace(name, "ip", "addr", "add", ipv6, "dev", device, "nodad")

    def firewall(self, rules: str, tproxy: bool) -> None:
        """Load `rules` into the router; for TPROXY, route marked packets to the router itself."""
        path = os.path.join(self.directory, "rules.nft")
        with open(path, "w") as f:
            f.write(rules)
        netns.in_namespace(self.router, "nft", "-f", path)
        if tproxy:
            for family in ("-4", "-6"):
                netns.in_namespace(self.router, "ip", family, "rule", "add", "fwmark", "1", "lookup", "100")
                netns.in_namespace(self.router, "ip", family, "route", "add", "local", "default", "dev", "lo", "table", "100")

    def spawn(self, name: str, *args: str) -> support.ChildProcess:
        """Run `args` inside namespace `name`; stopped at the test's end."""
        child = support.ChildProcess()
        command = ["ip", "netns", "exec", name, *args]
        reactor.spawnProcess(child, shutil.which("ip"), command, env=support.twistd_env(), path=self.directory)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(child.stop()))
        return child

    async def ready(self, child: support.ChildProcess, text: str) -> None:
        await support.wait_until(lambda: text in child.text() or child.ended.called, 20)
        if text not in child.text():
            raise AssertionError(f"not ready ({text!r}): {child.text()}")

    async def start(self, *local: str) -> tuple[support.ChildProcess, support.ChildProcess, support.ChildProcess]:
        """The target and ssx-server in the target's namespace, ssx-local with `local` options in the router's."""
        target = self.spawn(self.target, sys.executable, "-c", TARGET, str(PORT), *TARGETS)
        server = self.spawn(
            self.target, sys.executable, *support.TWISTD, "-n", "--pidfile=", "ssx-server", "-s", SERVER, "-p", "8388",
            "-k", support.PASSWORD, "-m", METHOD, "-u", "--forbidden-ip", "", "--url-file", "",
        )
        proxy = self.spawn(
            self.router, sys.executable, *support.TWISTD, "-n", "--pidfile=", "ssx-local", "-s", SERVER, "-p", "8388",
            "-k", support.PASSWORD, "-m", METHOD, "-b", "127.0.0.1", "-l", "1080", *local,
        )
        await self.ready(target, "target ready")
        await self.ready(server, "listening on")
        await self.ready(proxy, "listening on [::]")
        return target, server, proxy

    async def exchange(
        self, kind: str, host: str, *logs: support.ChildProcess, port: int = PORT,
    ) -> dict[str, Any]:
        """Run the LAN client once; what it sent and got back."""
        client = self.spawn(self.lan, sys.executable, "-c", CLIENT, kind, host, str(port))
        await client.ended
        try:
            return json.loads(client.text().strip().splitlines()[-1])
        except (IndexError, ValueError):
            others = "\n".join(child.text() for child in logs)
            raise AssertionError(f"the client failed: {client.text()}\n{others}") from None

    def seen(self, target: support.ChildProcess, kind: str) -> list[dict[str, str]]:
        """The target's records of one kind (tcp or udp)."""
        records = [json.loads(line) for line in target.text().splitlines() if line.startswith("{")]
        return [record for record in records if kind in record]

    async def check(
        self, kind: str, host: str, target: support.ChildProcess, *logs: support.ChildProcess,
        sources: tuple[str, ...] = TARGETS,
    ) -> None:
        """
        One exchange of `kind` with `host`: every payload arrives whole, every
        answer from `host`:PORT, and the target saw it come from one of `sources`.
        """
        before = len(self.seen(target, kind))
        result = await self.exchange(kind, host, target, *logs)
        self.assertEqual(result["replies"], result["sent"], "the target's digests of what the client sent")
        self.assertEqual(result["sources"], [[host, PORT]] * len(result["sent"]))
        records = self.seen(target, kind)[before:]
        # (A UDP datagram the client sent again after a lost answer is recorded twice.)
        self.assertEqual(sorted({record[kind] for record in records}), sorted(set(result["sent"])))
        # By default relayed by ssx-server from the target's own namespace, never the LAN client itself.
        self.assertTrue(all(record["source"] in sources for record in records), records)

    @support.coroutine_test
    async def test_redirect_tcp(self):
        """NAT REDIRECT: the client's TCP to an IPv4 and an IPv6 outside address arrives whole through the relay."""
        self.firewall(REDIRECT_RULES, tproxy=False)
        target, server, proxy = await self.start("--redir", str(PROXY_PORT))
        await self.check("tcp", OUTSIDE, target, server, proxy)
        await self.check("tcp", OUTSIDE6, target, server, proxy)

    @support.coroutine_test
    async def test_tproxy_ipv4(self):
        """TPROXY, IPv4: TCP and UDP arrive whole; UDP answers come from the address sent to; outbound is marked."""
        self.firewall(TPROXY_RULES, tproxy=True)
        target, server, proxy = await self.start("-u", "--tproxy", str(PROXY_PORT), "--outbound-fwmark", str(MARK))
        await self.check("tcp", OUTSIDE, target, server, proxy)
        await self.check("udp", OUTSIDE, target, server, proxy)

    @support.coroutine_test
    async def test_tproxy_ipv6(self):
        """TPROXY, IPv6: TCP and UDP arrive whole; UDP answers come from the address sent to; outbound is marked."""
        self.firewall(TPROXY_RULES, tproxy=True)
        target, server, proxy = await self.start("-u", "--tproxy", str(PROXY_PORT), "--outbound-fwmark", str(MARK))
        await self.check("tcp", OUTSIDE6, target, server, proxy)
        await self.check("udp", OUTSIDE6, target, server, proxy)

    @support.coroutine_test
    async def test_readme_recipe(self):
        """README's TPROXY recipe (nftables and policy routing), on the router as written: TCP and UDP, both families."""
        self.readme_tproxy()
        target, server, proxy = await self.start("-u", "--tproxy", str(PROXY_PORT), "--outbound-fwmark", "255")
        for host in (PUBLIC, PUBLIC6):
            await self.check("tcp", host, target, server, proxy)
            await self.check("udp", host, target, server, proxy)


    @support.coroutine_test
    async def test_acl_bypass(self):
        """
        TPROXY and README's recipe with an ACL: a bypassed destination is reached
        from the router itself, a proxied one through the server; TCP and UDP,
        both families, whole both ways, UDP answers from the address sent to;
        ssx-local's direct packets carry the mark and are never diverted back.
        """
        self.readme_tproxy()
        # Counts packets to the bypassed destinations that come back in
        # through lo: ssx-local's own, diverted again for want of the mark.
        watch = os.path.join(self.directory, "watch.nft")
        with open(watch, "w") as f:
            f.write(WATCH_RULES)
        netns.in_namespace(self.router, "nft", "-f", watch)
        acl = os.path.join(self.directory, "bypass.acl")
        with open(acl, "w") as f:
            f.write(f"[proxy_all]\n\n[bypass_list]\n{BYPASSED}/32\n{BYPASSED6}/128\n")
        target, server, proxy = await self.start(
            "-u", "--tproxy", str(PROXY_PORT), "--outbound-fwmark", "255", "--acl", acl,
        )
        for host in (BYPASSED, BYPASSED6):
            for kind in ("tcp", "udp"):
                await self.check(kind, host, target, server, proxy, sources=ROUTER_WAN)
        for host in (PUBLIC, PUBLIC6):
            for kind in ("tcp", "udp"):
                await self.check(kind, host, target, server, proxy, sources=(host,))
        counted = netns.in_namespace(self.router, "nft", "list", "counter", "inet", "ssx_watch", "recaptured")
        self.assertIn("packets 0 bytes 0", counted)

    def readme_tproxy(self) -> None:
        """README's TPROXY recipe (nftables and policy routing) on the router, for its LAN `lan1` and our server."""
        with open(README, encoding="utf-8") as f:
            text = f.read()
        routing = _literal_block(text, "ip rule add fwmark 1 lookup 100")
        rules = _literal_block(text, 'define LAN = "br-lan"', "tproxy ip to")
        path = os.path.join(self.directory, "readme.nft")
        with open(path, "w") as f:
            f.write(rules.replace('"br-lan"', '"lan1"').replace("203.0.113.5", SERVER))
        netns.in_namespace(self.router, "nft", "-f", path)
        for line in routing.splitlines():
            netns.in_namespace(self.router, *line.split())

    @support.coroutine_test
    async def test_readme_redirect_recipe(self):
        """README's NAT REDIRECT recipe (nftables), on the router as written: TCP, both families."""
        with open(README, encoding="utf-8") as f:
            rules = _literal_block(f.read(), 'define LAN = "br-lan"', "redirect to")
        path = os.path.join(self.directory, "readme.nft")
        with open(path, "w") as f:
            f.write(rules.replace('"br-lan"', '"lan1"').replace("203.0.113.5", SERVER))
        netns.in_namespace(self.router, "nft", "-f", path)
        target, server, proxy = await self.start("--redir", str(PROXY_PORT), "--outbound-fwmark", "255")
        for host in (PUBLIC, PUBLIC6):
            await self.check("tcp", host, target, server, proxy)

    @support.coroutine_test
    async def test_redirect_acl_bypass(self):
        """NAT REDIRECT with an ACL: a bypassed destination's TCP goes direct from the router."""
        self.firewall(REDIRECT_RULES, tproxy=False)
        acl = os.path.join(self.directory, "bypass.acl")
        with open(acl, "w") as f:
            f.write(f"[proxy_all]\n[bypass_list]\n{OUTSIDE}/32\n")
        target, server, proxy = await self.start("--redir", str(PROXY_PORT), "--acl", acl)
        await self.check("tcp", OUTSIDE, target, server, proxy, sources=ROUTER_WAN)
        await self.check("tcp", OUTSIDE_PROXIED, target, server, proxy)

    @support.coroutine_test
    async def test_reload_added_server_is_marked(self):
        """A server a SIGHUP adds is reached with --outbound-fwmark's mark (the firewall drops unmarked packets to it)."""
        self.firewall(TPROXY_RULES, tproxy=True)
        target = self.spawn(self.target, sys.executable, "-c", TARGET, str(PORT), *TARGETS)
        servers = [
            self.spawn(
                self.target, sys.executable, *support.TWISTD, "-n", "--pidfile=", "ssx-server", "-s", SERVER,
                "-p", str(port), "-k", support.PASSWORD, "-m", METHOD, "--forbidden-ip", "", "--url-file", "",
            )
            for port in (8388, 8389)
        ]
        path = os.path.join(self.directory, "local.json")

        def write(server_port: int) -> None:
            with open(path, "w") as f:
                json.dump({
                    "server": SERVER, "server_port": server_port, "password": support.PASSWORD, "method": METHOD,
                    "local_address": "127.0.0.1", "local_port": 1080, "tproxy": [PROXY_PORT], "outbound_fwmark": MARK,
                }, f)

        write(8388)
        proxy = self.spawn(self.router, sys.executable, *support.TWISTD, "-n", "--pidfile=", "ssx-local", "-c", path)
        await self.ready(target, "target ready")
        for server in servers:
            await self.ready(server, "listening on")
        await self.ready(proxy, "listening on [::]")
        await self.check("tcp", OUTSIDE, target, proxy, *servers)

        write(8389)
        line = await support.sighup(proxy)
        # The new server is the only one left: the relay can only go there.
        self.assertIn(f"server {SERVER}:8388 removed", line)
        self.assertIn(f"server {SERVER}:8389 added", line)
        await self.check("tcp", OUTSIDE, target, proxy, *servers)

    @support.coroutine_test
    async def test_own_port_not_relayed(self):
        """TPROXY with an ACL bypassing the LAN: TCP and UDP sent to the transparent port itself are refused there, never relayed."""
        self.firewall(TPROXY_RULES, tproxy=True)
        acl = os.path.join(self.directory, "bypass.acl")
        with open(acl, "w") as f:
            f.write("[proxy_all]\n[bypass_list]\n10.18.1.0/24\n")
        target, server, proxy = await self.start(
            "-u", "--tproxy", str(PROXY_PORT), "--outbound-fwmark", str(MARK), "--acl", acl, "-v",
        )
        client = self.spawn(self.lan, sys.executable, "-c", OWN_PORT_CLIENT, ROUTER_LAN, str(PROXY_PORT))
        await client.ended
        self.assertEqual(client.text().split(), ["tcp", "0", "udp", "none"], client.text())
        # Not one relay decision for the port itself: it never left ssx-local.
        self.assertEqual(proxy.text().count(f"ACL: {ROUTER_LAN}:{PROXY_PORT}"), 0)
        line = f"transparent connection to ssx-local's own {ROUTER_LAN}:{PROXY_PORT}: closed"
        await support.wait_until(lambda: line in proxy.text(), 10)
        self.assertEqual(self.seen(target, "tcp"), [])
        self.assertEqual(self.seen(target, "udp"), [])
        await self.check("tcp", OUTSIDE, target, server, proxy)


def _literal_block(text: str, start: str, containing: str = "") -> str:
    """The first of README's indented literal blocks that begins with `start` (and holds `containing`), dedented."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() != start or not line.startswith("    "):
            continue
        block = []
        for following in lines[i:]:
            if following and not following.startswith("    "):
                break
            block.append(following[4:])
        found = "\n".join(block).strip() + "\n"
        if containing in found:
            return found
    raise AssertionError(f"no literal block starting {start!r} in README.rst")
