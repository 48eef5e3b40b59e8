"""
The reactor twistd runs ssx on: Twisted's epoll reactor, dispatching each
event without a per-event log context.

Twisted's `EPollReactor.doPoll` hands every ready descriptor to
`log.callWithLogger`, which asks the descriptor for its `logPrefix()`,
copies the logging context dictionary, pushes and pops it around the
call, then calls the reactor's `_doReadOrWrite`: ten Python calls and a
dictionary copy per event, for the "system" field of old-style
`twisted.python.log.msg` lines.  A relayed connection is half a dozen
events in each ssx process, a UDP round trip four; measured with
callgrind on the benchmark suite's connection load, the wrapping was
12 to 16 % of each ssx process's instructions per connection.  ssx logs
with `twisted.logger`, whose events name their namespace themselves; the
only lines that lose their "system" here are Twisted's own old-style
ones, which then read ``[-]``.

`LeanEPollReactor.doPoll` does what `_doReadOrWrite` does (a hang-up
without pending input ends a reading descriptor cleanly, and a writing
one as a lost connection; a read that returns a reason to disconnect
skips the write; anything a descriptor raises is logged and disconnects
it) and keeps Twisted's own `_disconnectSelectable` for the endings, with
the half-close it implements.  `hand_over` moves a connected socket from
its connector to its transport with one system call.  What it reaches of
the base class that Twisted keeps private is listed in
`ssx.net.tcp.TWISTED_PRIVATE_NAMES` (checked against the installed Twisted
by tests/test_twisted_private.py).

This module needs epoll (Linux): where importing it fails, its callers
leave twistd's default reactor.  `install_default` installs it where
twistd would otherwise install its default: the ssx twistd plugins call
it before ssx's modules are imported (`twisted/plugins/ssx_plugins.py`),
and a `--workers` worker before it imports the reactor.  A reactor chosen on twistd's command line
(``twistd -r epoll ssx-server``) is left as it is, and so is everything
with SSX_TCP_PATH=twisted in the environment (ssx's way back to
Twisted's own connection path, used by the benchmark suite to compare).
"""

from __future__ import annotations

import errno
import os
import select
import sys
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionFdescWentAway
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST, installReactor
from twisted.logger import Logger

__all__ = ["LeanEPollReactor", "install", "install_default", "is_wanted"]

_log = Logger()

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_HANG_UP = select.EPOLLHUP | select.EPOLLERR


class LeanEPollReactor(EPollReactor):
    """`EPollReactor`, dispatching each event without a per-event log context."""

    def doPoll(self, timeout: float | None) -> None:
        if timeout is None:
            timeout = -1  # wait indefinitely
        try:
            # As Twisted does: at most as many events as descriptors watched.
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        reads = self._reads
        for fd, event in events:
            # Looked up now: a descriptor an earlier event of this batch
            # removed is skipped.
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                if event & _HANG_UP and not event & _IN:
                    # Everything pending has been read: a reader's clean
                    # end (perhaps a half-close), a writer's lost connection.
                    if fd in reads:
                        self._disconnectSelectable(selectable, CONNECTION_DONE, True)
                    else:
                        self._disconnectSelectable(selectable, CONNECTION_LOST, False)
                    continue
                why: Any = None
                in_read = False
                try:
                    if selectable.fileno() == -1:
                        # A descriptor closed behind the reactor's back.
                        why = _NO_DESCRIPTOR
                    else:
                        if event & _IN:
                            why = selectable.doRead()
                            in_read = True
                        if not why and event & _OUT:
                            why = selectable.doWrite()
                            in_read = False
                except BaseException as e:
                    # A bug of the descriptor's: logged, and it is disconnected.
                    why = e
                    _log.failure("unhandled error in {selectable!r}", selectable=selectable)
                if why:
                    self._disconnectSelectable(selectable, why, in_read)
            except KeyboardInterrupt:
                raise
            except BaseException:
                # Raised while disconnecting (a protocol's connectionLost):
                # logged, and the loop goes on with the other events.
                _log.failure("unhandled error disconnecting {selectable!r}", selectable=selectable)

    doIteration = doPoll

    def hand_over(self, writer: Any, reader: Any) -> None:
        """
        The socket `writer` is registered for writing alone is `reader`'s
        from now on, registered for reading alone (a connected socket going
        from its connector to its transport): one ``epoll_ctl``, where
        `removeWriter` then `addReader` make two.  Anything else is left to
        those two.
        """
        fd = reader.fileno()
        if self._selectables.get(fd) is not writer or fd in self._reads or fd not in self._writes:
            self.removeWriter(writer)
            if self._selectables.get(fd) is writer:
                self.removeReader(writer)  # it read too: the socket is the reader's alone now
            self.addReader(reader)
            return
        self._poller.modify(fd, _IN)
        # Tracked only once the call has succeeded, as Twisted's `_add` does.
        self._writes.discard(fd)
        self._reads.add(fd)
        self._selectables[fd] = reader


# The reason a descriptor whose `fileno()` is -1 is disconnected with (Twisted's own).
_NO_DESCRIPTOR = ConnectionFdescWentAway("File descriptor lost")


def is_wanted() -> bool:
    """Whether the environment runs ssx on `LeanEPollReactor` (SSX_TCP_PATH not `twisted`)."""
    return os.environ.get("SSX_TCP_PATH", "lean") != "twisted"


def install() -> LeanEPollReactor:
    """Install a `LeanEPollReactor` as the global reactor (ReactorAlreadyInstalledError if one is)."""
    reactor = LeanEPollReactor()
    installReactor(reactor)
    return reactor


def install_default() -> bool:
    """
    Install a `LeanEPollReactor` as the global reactor if no reactor is
    installed yet and `is_wanted()`; whether it did.
    """
    if "twisted.internet.reactor" in sys.modules or not is_wanted():
        return False
    install()
    return True
