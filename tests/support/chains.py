"""
ssx itself in trial's reactor: ssx-server and ssx-local services on free
loopback ports, a wait for their relays to empty, and the TestCase bases
that start chains and end whatever a test started.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from typing import Any, Callable, Iterator

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.trial import unittest

from ssx.config import local_config, server_config
from ssx.net.listener import ListenerService
import ssx.local.tap as local_tap
import ssx.server.tap as server_tap
from tests.support.clients import RawClient, Socks5UdpClient, socks_transfer
from tests.support.payloads import sha256
from tests.support.peers import ChildProcess
from tests.support.targets import CountingEchoFactory, FakeDns, listen_echo
from tests.support.waiting import wait_until

__all__ = [
    "PASSWORD",
    "start_server",
    "start_local",
    "first_listener",
    "drained",
    "LoopbackCase",
    "ChainTestCase",
]

PASSWORD = "correct horse battery staple"


def start_server(**values: Any) -> Any:
    """An ssx-server service listening on a free loopback port; returns (service, port)."""
    if "keys" not in values:
        # A port of access keys takes no password.
        values.setdefault("password", PASSWORD)
    values.setdefault("forbidden_ip", "")
    service = _start_beside_udp(lambda: server_tap.build_service(reactor, server_config(values)), values)
    if service.plugin is not None:
        # Clients reach the plugin, on the public port.
        return service, service.plugin.remote[1]
    return service, service.listeners[0].port.getHost().port


def start_local(server_port: int, **values: Any) -> Any:
    """An ssx-local service on a free loopback port aimed at `server_port`; returns (service, port)."""
    values.setdefault("password", PASSWORD)
    values.setdefault("server", "127.0.0.1")
    values.setdefault("server_port", server_port)
    service = _start_beside_udp(lambda: local_tap.build_service(reactor, local_config(values)), values)
    return service, service.listeners[0].port.getHost().port


def _loopback_ports() -> Iterator[int]:
    """The TCP ports a chain's listener tries in turn: 0, a free one each time."""
    return itertools.repeat(0, 20)


def _start_beside_udp(build: Callable[[], Any], values: dict[str, Any]) -> Any:
    """
    Build and start a service on a free loopback port unless `values` names
    one. Its UDP port binds the number its TCP port got, which another
    process may hold for UDP (parallel runs): then close it and take
    another port.
    """
    if "listen" in values:
        service = build()
        service.startService()
        return service
    ports = list(_loopback_ports())
    for attempt, port in enumerate(ports):
        values["listen"] = f"tcp:{port}:interface=127.0.0.1"
        service = build()
        try:
            service.startService()
        except SystemExit as e:
            service.stopService()
            if "cannot listen for UDP" not in str(e) or attempt == len(ports) - 1:
                raise
            continue
        return service
    raise AssertionError("no port to try")


def first_listener(service: Any) -> ListenerService:
    """The first TCP listener in an ssx-local service tree (an ssx-server names its own: `listeners`)."""
    return next(child for child in service if isinstance(child, ListenerService))


def drained(*services: Any, seconds: float = 5.0) -> defer.Deferred:
    """A Deferred for `_drained` (so it can be a trial cleanup as it is)."""
    return defer.Deferred.fromCoroutine(_drained(*services, seconds=seconds))


async def _drained(*services: Any, seconds: float = 5.0) -> None:
    """
    Wait until the relays of ssx services hold no connection: a client
    process (curl) may exit before the proxy has read its close.  Connections
    still open after `seconds` are aborted and reported as a failure.
    """
    def live() -> list:
        return [p for s in services for f in getattr(s, "factories", [s.factory]) if f is not None for p in f.connections]

    if await wait_until(lambda: not live(), seconds):
        return
    left = live()
    for p in left:
        p.transport.abortConnection()
    # The aborted connections' connectionLost runs on the next iterations.
    await wait_until(lambda: not live(), 1)
    raise AssertionError(f"{len(left)} relayed connections still open {seconds:g} s after the test")


class LoopbackCase(unittest.TestCase):
    """
    Tracks what a test starts (services, listening ports, clients, child
    processes) and ends it all in order at the end, even when the test failed.
    """

    def setUp(self) -> None:
        self._services: list[Any] = []
        self._ports: list[Any] = []
        self._clients: list[RawClient] = []
        self._udp_clients: list[Socks5UdpClient] = []
        self._children: list[ChildProcess] = []
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self._teardown()))

    async def _teardown(self) -> None:
        for client in self._clients:
            if not client.closed.called and client.transport is not None:
                client.transport.abortConnection()
        for udp in self._udp_clients:
            udp.close()
        for child in self._children:
            if not child.ended.called:
                child.transport.signalProcess("KILL")
            await child.ended
        try:
            # Fails the test if a relay outlives its clients.
            await drained(*self._services, seconds=5)
        finally:
            for service in reversed(self._services):
                if service.running:
                    await defer.maybeDeferred(service.stopService)
            for port in self._ports:
                await defer.maybeDeferred(port.stopListening)
            await wait_until(lambda: all(c.closed.called for c in self._clients), 2)

    def server(self, **values: Any) -> tuple[Any, int]:
        service, port = start_server(**values)
        self._services.append(service)
        return service, port

    def local(self, server_port: int, **values: Any) -> tuple[Any, int]:
        service, port = start_local(server_port, **values)
        self._services.append(service)
        return service, port

    def listen(self, port: Any) -> Any:
        self._ports.append(port)
        return port

    def counting_echo(self, host: str = "127.0.0.1") -> tuple[CountingEchoFactory, int]:
        factory = CountingEchoFactory()
        port = self.listen(reactor.listenTCP(0, factory, interface=host))
        return factory, port.getHost().port

    def fake_dns(self, records: dict[str, list[tuple[int, str]]] | None = None, silent: bool = False) -> tuple[FakeDns, str]:
        """A FakeDns on loopback and its `nameserver` setting."""
        server = FakeDns(records, silent)
        port = self.listen(reactor.listenUDP(0, server, interface="127.0.0.1"))
        return server, f"127.0.0.1:{port.getHost().port}"

    def hosts_file(self, text: str) -> str:
        with tempfile.NamedTemporaryFile("w", suffix=".hosts", delete=False) as f:
            f.write(text)
        self.addCleanup(os.unlink, f.name)
        return f.name

    async def connect(self, port: int, client: RawClient, host: str = "127.0.0.1") -> Any:
        self._clients.append(client)
        endpoint = (TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint)(reactor, host, port)
        await connectProtocol(endpoint, client)
        return client

    async def read_plain(self, client: RawClient, codec: Any, size: int, seconds: float = 5.0) -> bytes:
        """Decrypt (with a client codec) what a RawClient got from a server, until `size` bytes or `seconds`."""
        plain = bytearray()
        fed = 0

        def enough() -> bool:
            nonlocal fed
            new = bytes(client.received[fed:])
            fed += len(new)
            if new:
                plain.extend(codec.decrypt(new))
            return len(plain) >= size

        await wait_until(enough, seconds)
        return bytes(plain)


class ChainTestCase(unittest.TestCase):
    """Starts an echo target and tears down whatever a test started."""

    def setUp(self) -> None:
        self.echo = listen_echo()
        self.addCleanup(self.echo.stopListening)

    def chain(self, **values: Any) -> int:
        """Start ssx-server and ssx-local with `values`; return the SOCKS port."""
        server_values = {k: v for k, v in values.items() if k not in ("socks_user", "socks_password")}
        server, server_port = start_server(**server_values)
        self.addCleanup(server.stopService)
        local, local_port = start_local(server_port, **values)
        self.addCleanup(local.stopService)
        self.addCleanup(drained, server, local)
        self.server_service, self.local_service = server, local
        return local_port

    async def echo_through(self, socks_port: int, size: int, host: str = "127.0.0.1", port: int | None = None) -> None:
        payload = os.urandom(size)
        reply, received = await socks_transfer(socks_port, host, port or self.echo.getHost().port, payload)
        self.assertEqual(reply, 0)
        self.assertEqual(len(received), len(payload))
        self.assertEqual(sha256(received), sha256(payload))
