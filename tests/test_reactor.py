"""
ssx's reactor (`ssx.net.reactor`): each event of a real epoll reaches the
descriptor as on Twisted's epoll reactor, endings included, without the
per-event log context; twistd runs both ends on it unless told otherwise.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
from typing import Any

from twisted.internet import error
from twisted.internet.interfaces import IHalfCloseableDescriptor, IReadDescriptor, IWriteDescriptor
from twisted.internet.main import CONNECTION_DONE
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from ssx.net.lean import LeanConnector
from ssx.net.reactor import LeanEPollReactor, is_wanted
from tests import support


@implementer(IReadDescriptor, IWriteDescriptor)
class _Descriptor:
    """One end of a socket pair, recording what the reactor calls on it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.calls: list[Any] = []
        self.read_result: Any = None
        self.raise_in: str | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "descriptor"

    def doRead(self) -> Any:
        self.calls.append("read")
        if self.raise_in == "read":
            raise ZeroDivisionError("a bug in doRead")
        data = self.sock.recv(4096)
        self.calls.append(data)
        return self.read_result if data else CONNECTION_DONE

    def doWrite(self) -> Any:
        self.calls.append("write")
        return None

    def connectionLost(self, reason: Failure) -> None:
        self.calls.append(reason.type)
        if self.raise_in == "lost":
            raise ZeroDivisionError("a bug in connectionLost")


@implementer(IHalfCloseableDescriptor)
class _HalfCloseable(_Descriptor):
    def readConnectionLost(self, reason: Failure) -> None:
        self.calls.append(("read lost", reason.type))

    def writeConnectionLost(self, reason: Failure) -> None:
        self.calls.append(("write lost", reason.type))


class _RecordingPoller:
    """An epoll object's stand-in that records each change of registration and makes it."""

    def __init__(self, poller: Any) -> None:
        self.poller = poller
        self.changes: list[tuple[Any, ...]] = []

    def poll(self, *args: Any) -> Any:
        return self.poller.poll(*args)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.poller, name)

        def change(*args: Any) -> Any:
            self.changes.append((name, *args))
            return method(*args)

        return change


class DispatchTests(unittest.TestCase):
    """A `LeanEPollReactor` of the test's own, polled by hand over real socket pairs."""

    def setUp(self) -> None:
        self.reactor = LeanEPollReactor()
        # Registered first, so it runs last, after the sockets are closed.
        self.addCleanup(self._close_reactor)

    def _close_reactor(self) -> None:
        self.reactor._poller.close()
        self.reactor.waker.connectionLost(None)

    def _pair(self, kind: type[_Descriptor] = _Descriptor) -> tuple[_Descriptor, socket.socket]:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        return kind(ours), theirs

    def test_read_event_reaches_do_read(self) -> None:
        """Bytes arriving make one doRead, which reads them; nothing else is called."""
        descriptor, theirs = self._pair()
        self.reactor.addReader(descriptor)
        theirs.sendall(b"hello")
        self.reactor.doPoll(1)
        self.assertEqual(descriptor.calls, ["read", b"hello"])

    def test_write_event_reaches_do_write(self) -> None:
        """A writer with room in its socket gets doWrite."""
        descriptor, _ = self._pair()
        self.reactor.addWriter(descriptor)
        self.reactor.doPoll(1)
        self.assertEqual(descriptor.calls, ["write"])

    def test_end_of_input_is_a_clean_end(self) -> None:
        """The peer closing ends a reader with ConnectionDone, and it is no longer watched."""
        descriptor, theirs = self._pair()
        self.reactor.addReader(descriptor)
        theirs.close()
        self.reactor.doPoll(1)
        self.assertEqual(descriptor.calls, ["read", b"", error.ConnectionDone])
        self.assertNotIn(descriptor, self.reactor.getReaders())

    def test_end_of_input_half_closes(self) -> None:
        """A half-closeable reader that reads the end hears readConnectionLost, not connectionLost."""
        descriptor, theirs = self._pair(_HalfCloseable)
        self.reactor.addReader(descriptor)
        theirs.shutdown(socket.SHUT_WR)
        self.reactor.doPoll(1)
        self.assertEqual(descriptor.calls, ["read", b"", ("read lost", error.ConnectionDone)])

    def test_hang_up_of_a_writer_is_a_lost_connection(self) -> None:
        """A hang-up on a descriptor watched only for writing ends it with ConnectionLost."""
        descriptor, theirs = self._pair()
        # Fill our send buffer, so that only the hang-up can wake us.
        try:
            while True:
                descriptor.sock.send(b"x" * 65536)
        except BlockingIOError:
            pass
        self.reactor.addWriter(descriptor)
        theirs.close()
        self.reactor.doPoll(1)
        self.assertEqual(descriptor.calls, [error.ConnectionLost])
        self.assertNotIn(descriptor, self.reactor.getWriters())

    def test_a_read_that_ends_skips_the_write(self) -> None:
        """When doRead returns a reason to end, the same event's write readiness is not acted on."""
        descriptor, theirs = self._pair()
        descriptor.read_result = error.ConnectionLost()
        self.reactor.addReader(descriptor)
        self.reactor.addWriter(descriptor)
        theirs.sendall(b"x")
        self.reactor.doPoll(1)
        self.assertEqual(descriptor.calls, ["read", b"x", error.ConnectionLost])

    def test_an_error_in_do_read_is_logged_and_disconnects(self) -> None:
        """An exception from doRead is logged, and the descriptor ends with it as the reason."""
        descriptor, theirs = self._pair()
        descriptor.raise_in = "read"
        self.reactor.addReader(descriptor)
        theirs.sendall(b"x")
        self.reactor.doPoll(1)
        self.assertEqual(descriptor.calls, ["read", ZeroDivisionError])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_an_error_while_ending_spares_the_other_events(self) -> None:
        """A connectionLost that raises is logged, and the other descriptors of the same poll still get their events."""
        first, first_peer = self._pair()
        second, second_peer = self._pair()
        first.raise_in = "lost"
        for descriptor in (first, second):
            self.reactor.addReader(descriptor)
        first_peer.close()
        second_peer.sendall(b"y")
        self.reactor.doPoll(1)
        self.assertEqual(first.calls, ["read", b"", error.ConnectionDone])
        self.assertEqual(second.calls, ["read", b"y"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_a_descriptor_without_a_number_is_ended(self) -> None:
        """A watched descriptor whose fileno() turned -1 is ended with ConnectionFdescWentAway, as Twisted does."""
        descriptor, theirs = self._pair()
        self.reactor.addReader(descriptor)
        theirs.sendall(b"x")
        descriptor.fileno = lambda: -1  # type: ignore[method-assign]
        self.reactor.doPoll(1)
        self.assertEqual(descriptor.calls, [error.ConnectionFdescWentAway])


    def test_hand_over_moves_a_writer_to_a_reader(self) -> None:
        """hand_over makes the reader the socket's only descriptor, watched for reading alone."""
        writer, theirs = self._pair()
        reader = _Descriptor(writer.sock)
        self.reactor.addWriter(writer)
        self.reactor.hand_over(writer, reader)
        # Writable at once, but nobody asks to write any more: only the read reaches anyone.
        self._assert_reader_alone(writer, reader, theirs)

    def _assert_reader_alone(self, writer: _Descriptor, reader: _Descriptor, theirs: socket.socket) -> None:
        """The socket is `reader`'s alone, watched for reading: bytes sent reach its doRead and nothing else."""
        fd = writer.fileno()
        self.assertIs(self.reactor._selectables[fd], reader)
        self.assertEqual((fd in self.reactor._reads, fd in self.reactor._writes), (True, False))
        theirs.sendall(b"after")
        self.reactor.doPoll(1)
        self.assertEqual((writer.calls, reader.calls), ([], ["read", b"after"]))

    def test_hand_over_of_anything_else_removes_and_adds(self) -> None:
        """A writer not registered, or registered for reading too, is removed, and the reader alone watches the socket."""
        for reads_too in (False, True):
            writer, theirs = self._pair()
            reader = _Descriptor(writer.sock)
            if reads_too:
                self.reactor.addWriter(writer)
                self.reactor.addReader(writer)
            self.reactor.hand_over(writer, reader)
            self._assert_reader_alone(writer, reader, theirs)
            self.reactor.removeReader(reader)

    def test_a_lean_connection_is_handed_over(self) -> None:
        """ssx's connector on this reactor: once connected, its transport alone watches the socket, for reading."""
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        received: list[bytes] = []

        class Receiver(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

        connector = LeanConnector(self.reactor, "127.0.0.1", listener.getsockname()[1],
                                  ClientFactory.forProtocol(Receiver), timeout=0)
        connector.connect()
        accepted, _ = listener.accept()
        self.addCleanup(accepted.close)
        poller = self.reactor._poller
        self.reactor._poller = recorder = _RecordingPoller(poller)
        for _ in range(10):
            if connector.transport is not None:
                break
            self.reactor.doPoll(1)
        self.reactor._poller = poller
        transport = connector.transport
        self.assertIsNotNone(transport)
        self.addCleanup(transport.abortConnection)
        fd = transport.fileno()
        self.assertEqual(recorder.changes, [("modify", fd, select.EPOLLIN)], "one epoll_ctl hands the socket over")
        self.assertIs(self.reactor._selectables[fd], transport)
        self.assertEqual((fd in self.reactor._reads, fd in self.reactor._writes), (True, False))
        accepted.sendall(b"reply")
        self.reactor.doPoll(1)
        self.assertEqual(received, [b"reply"])
        transport.write(b"request")
        self.assertEqual(accepted.recv(100), b"request")
        transport.connectionLost(Failure(error.ConnectionDone()))
        self.assertNotIn(fd, self.reactor._selectables)


def _python(code: str, **env: str) -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment = {k: v for k, v in os.environ.items() if k != "SSX_TCP_PATH"}
    environment.update(env, PYTHONPATH=root)
    return subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip()


_INSTALL = (
    "from ssx.net.reactor import install_default\n"
    "installed = install_default()\n"
    "from twisted.internet import reactor\n"
    "print(installed, type(reactor).__name__)\n"
)


class InstallTests(unittest.TestCase):
    """Which reactor a fresh process ends up with."""

    def test_installed_where_none_is(self) -> None:
        """In a process with no reactor yet, install_default installs LeanEPollReactor."""
        self.assertEqual(_python(_INSTALL), "True LeanEPollReactor")

    def test_an_installed_reactor_stays(self) -> None:
        """A reactor installed before (as twistd's -r does) is left as it is."""
        code = "from twisted.internet import epollreactor; epollreactor.install()\n" + _INSTALL
        self.assertEqual(_python(code), "False EPollReactor")

    def test_twisted_path_keeps_twisteds_reactor(self) -> None:
        """SSX_TCP_PATH=twisted keeps Twisted's default reactor."""
        self.assertEqual(_python(_INSTALL, SSX_TCP_PATH="twisted"), "False EPollReactor")


class TwistdTests(unittest.TestCase):
    """twistd runs both ends on ssx's reactor, and bytes cross it intact."""

    @support.coroutine_test
    async def test_both_ends_run_on_it(self) -> None:
        """`twistd ssx-server` and `twistd ssx-local` name LeanEPollReactor; an echo through both comes back byte for byte."""
        if not is_wanted():
            raise unittest.SkipTest("SSX_TCP_PATH=twisted in the environment keeps Twisted's reactor")
        echo = support.listen_echo()
        self.addCleanup(echo.stopListening)
        server_port, socks_port = support.free_port(), support.free_port()
        server = await support.start_twistd(
            self, "-n", "--pidfile=", "ssx-server", "--listen", f"tcp:{server_port}:interface=127.0.0.1", "-k", "pw",
            "-m", "aes-256-gcm", "--forbidden-ip=", ready=b"listening on",
        )
        local = await support.start_twistd(
            self, "-n", "--pidfile=", "ssx-local", "-s", "127.0.0.1", "-p", str(server_port), "-b", "127.0.0.1",
            "-l", str(socks_port), "-k", "pw", "-m", "aes-256-gcm", ready=b"listening on",
        )
        for child in (server, local):
            self.assertIn("reactor class: ssx.net.reactor.LeanEPollReactor", child.text())
        payload = os.urandom(1024 * 1024 + 17)
        _, echoed = await support.whole_echo_transfer(socks_port, "127.0.0.1", echo.getHost().port, payload)
        self.assertEqual(support.sha256(echoed), support.sha256(payload))

    @support.coroutine_test
    async def test_a_named_reactor_stays(self) -> None:
        """`twistd -r epoll ssx-server` runs on Twisted's own epoll reactor."""
        server = await support.start_twistd(
            self, "-n", "--pidfile=", "-r", "epoll", "ssx-server", "--listen", "tcp:0:interface=127.0.0.1",
            "-k", "pw", "--forbidden-ip=", ready=b"listening on",
        )
        self.assertIn("reactor class: twisted.internet.epollreactor.EPollReactor", server.text())
