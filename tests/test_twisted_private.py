"""
The names private to Twisted that ssx relies on (`ssx.net.tcp.TWISTED_PRIVATE_NAMES`)
are still where ssx reaches for them on the installed Twisted, and only
`ssx.net.tcp` reaches for them.

A Twisted release may move or rename any of them without notice; this is
the test that then fails, naming each one, rather than a transport that
silently stops sending at once or a plugin whose exits go unlogged.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Any, Callable

from twisted.internet import defer, protocol, reactor
from twisted.internet import tcp as twisted_tcp
from twisted.internet.endpoints import serverFromString
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ProcessDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.python.reflect import namedAny
from twisted.runner.procmon import ProcessMonitor
from twisted.trial import unittest

from ssx.net import reactor as ssx_reactor
from ssx.net import tcp
from tests import support

SSX = pathlib.Path(tcp.__file__).resolve().parent.parent
LISTED = {name for names in tcp.TWISTED_PRIVATE_NAMES.values() for name in names}


class _Made(protocol.Protocol):
    """Fires `made` with itself once connected."""

    def __init__(self, made: defer.Deferred) -> None:
        self.made = made

    def connectionMade(self) -> None:
        self.made.callback(self)


class _Factory(protocol.ClientFactory):
    def __init__(self, build: Callable[[], protocol.Protocol]) -> None:
        self.build = build

    def buildProtocol(self, addr: object) -> protocol.Protocol:
        return self.build()


class _ProcessReactor(MemoryReactorClock):
    """A clock whose spawnProcess only keeps the process protocol (ProcessMonitor's only other need)."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[protocol.ProcessProtocol] = []

    def spawnProcess(self, processProtocol: protocol.ProcessProtocol, *args: object, **kwargs: object) -> None:
        self.spawned.append(processProtocol)


class PrivateNamesTests(support.TwistedTcp, unittest.TestCase):
    """Each listed name on a live instance of its owner, as the code meets it (on Twisted's connection path)."""

    async def _connected_transports(self) -> list[Any]:
        """Both ends of a real loopback connection made with ssx.net.tcp."""
        accepted: defer.Deferred = defer.Deferred()
        connected: defer.Deferred = defer.Deferred()
        port = tcp.listen(reactor, 0, _Factory(lambda: _Made(accepted)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        connector = tcp.connect(reactor, "127.0.0.1", port.getHost().port, _Factory(lambda: _Made(connected)), 5)
        self.addCleanup(connector.disconnect)
        server = await support.within(5, accepted, "no connection accepted")
        client = await support.within(5, connected, "no connection made")
        return [server.transport, client.transport]

    def _instances(self, owner: str, transports: list[Any]) -> list[Any]:
        """Live objects of `owner`'s class, or its class itself for a method ssx overrides or wraps."""
        if owner == "twisted.internet.tcp.Connection":
            return transports
        if owner == "twisted.internet.endpoints.TCP4ServerEndpoint":
            return [serverFromString(reactor, "tcp:0:interface=127.0.0.1")]
        if owner == "twisted.internet.endpoints.TCP6ServerEndpoint":
            return [serverFromString(reactor, r"tcp6:0:interface=\:\:1")]
        if owner == "twisted.internet.epollreactor.EPollReactor":
            # The reactor's state is made in its __init__: trial's own reactor has it.
            if not isinstance(reactor, EPollReactor):
                raise unittest.SkipTest(f"trial runs on {type(reactor).__name__}, not an epoll reactor")
            return [reactor]
        if owner in ("twisted.internet.tcp.Connector", "twisted.internet.tcp.Port", "twisted.runner.procmon.ProcessMonitor"):
            # ssx's subclass or wrapper has the name whatever Twisted does: ask Twisted's class.
            return [namedAny(owner)]
        self.fail(f"{owner} is in ssx.net.tcp.TWISTED_PRIVATE_NAMES, but this test has no way to make one")

    @support.coroutine_test
    async def test_each_listed_name_is_there(self) -> None:
        """Every name in TWISTED_PRIVATE_NAMES exists on its owner in the installed Twisted."""
        transports = await self._connected_transports()
        missing = []
        for owner, names in tcp.TWISTED_PRIVATE_NAMES.items():
            try:
                cls = namedAny(owner)
            except (AttributeError, ImportError):
                missing.append(f"the class {owner} itself")
                continue
            for instance in self._instances(owner, transports):
                self.assertTrue(instance is cls or isinstance(instance, cls), f"{instance!r} is not a {owner}")
                gone = [f"{owner}.{name}" for name in names if not hasattr(instance, name)]
                missing += [entry for entry in gone if entry not in missing]
        self.assertEqual(missing, [], "ssx.net.tcp relies on names this Twisted no longer has: " + ", ".join(missing))

    @support.coroutine_test
    async def test_connecting_makes_ssx_transports(self) -> None:
        """Twisted's connector still builds its transport with _makeTransport: connect gives ssx's Client."""
        server, client = await self._connected_transports()
        self.assertIsInstance(server, tcp.Server)
        self.assertIsInstance(client, tcp.Client, "tcp.Connector._makeTransport is no longer called")
        self.assertIsInstance(client, twisted_tcp.Client)

    def test_a_monitored_exit_reaches_the_hook(self) -> None:
        """A monitored process's end still goes through _monitoredProcessExited, so on_process_exit hears of it."""
        clock = _ProcessReactor()
        monitor = ProcessMonitor(reactor=clock)
        heard: list[tuple[str, Failure | None]] = []
        tcp.on_process_exit(monitor, lambda name, reason: heard.append((name, reason)))
        monitor.addProcess("plugin", ["/bin/true"])
        monitor.startService()
        self.addCleanup(monitor.stopService)
        [process] = clock.spawned
        process.makeConnection(StringTransport())
        process.processEnded(Failure(ProcessDone(0)))
        self.assertEqual([name for name, _ in heard], ["plugin"], "_monitoredProcessExited is no longer called")
        self.assertNotIn("plugin", monitor.protocols, "the hook ran before Twisted forgot the process")


def _private_names_used(tree: ast.AST, receivers_other_than_self: bool) -> set[str]:
    """Single-underscore names a module reads as attributes, defines as methods or names in strings."""
    found = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Attribute):
            if receivers_other_than_self and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            names = [node.attr]
        elif isinstance(node, ast.ClassDef):
            # Methods, which may override Twisted's.
            names = [item.name for item in node.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            names = [node.value]
        found.update(name for name in names if name.startswith("_") and not name.startswith("__"))
    return found


def _defined(tree: ast.AST) -> set[str]:
    """The names a module defines itself (functions, classes, assignments)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


class OneHomeTests(unittest.SynchronousTestCase):
    """The list and the code cannot drift apart."""

    def test_the_list_covers_the_module(self) -> None:
        """Every Twisted private name ssx.net.tcp uses is in its TWISTED_PRIVATE_NAMES."""
        tree = ast.parse(pathlib.Path(tcp.__file__).read_text())
        own = _defined(tree) - LISTED
        unlisted = _private_names_used(tree, receivers_other_than_self=False) - own - LISTED
        self.assertEqual(unlisted, set(), "ssx.net.tcp uses private names it does not list")

    def test_the_list_covers_the_reactor(self) -> None:
        """Every Twisted private name ssx.net.reactor reaches through `self` is in TWISTED_PRIVATE_NAMES."""
        tree = ast.parse(pathlib.Path(ssx_reactor.__file__).read_text())
        own = _defined(tree) - LISTED
        unlisted = _private_names_used(tree, receivers_other_than_self=False) - own - LISTED
        self.assertEqual(unlisted, set(), "ssx.net.reactor uses private names ssx.net.tcp does not list")

    def test_no_other_module_uses_them(self) -> None:
        """No module of ssx but ssx.net.tcp touches a listed name or imports a private Twisted module."""
        offenders = []
        for path in sorted(SSX.rglob("*.py")):
            if path == pathlib.Path(tcp.__file__).resolve():
                continue
            tree = ast.parse(path.read_text())
            where = path.relative_to(SSX.parent)
            offenders += [f"{where}: {name}" for name in sorted(_private_names_used(tree, True) & LISTED)]
            for node in ast.walk(tree):
                modules = []
                if isinstance(node, ast.ImportFrom) and node.module:
                    modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                offenders += [
                    f"{where}: imports {m}"
                    for m in modules
                    if m.startswith("twisted") and any(part.startswith("_") for part in m.split("."))
                ]
        self.assertEqual(offenders, [], "Twisted's private names belong in ssx.net.tcp alone")
