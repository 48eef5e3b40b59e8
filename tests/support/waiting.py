"""
Waiting in tests: for a condition with a deadline, for a Deferred with a
deadline, and, where a pause is itself what a test is about, for time.
Everything polls on trial's running reactor.
"""

from __future__ import annotations

import functools
from typing import Any, Awaitable, Callable

from twisted.internet import defer, reactor, tcp
from twisted.internet.task import deferLater

__all__ = ["coroutine_test", "sleep", "wait_until", "wait_for", "within", "outgoing_connections"]


def coroutine_test(method: Callable[[Any], Awaitable[None]]) -> Callable[[Any], defer.Deferred]:
    """Lets trial (which runs Deferreds, not coroutines) run an `async def` test."""

    @functools.wraps(method)
    def test(self: Any) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(method(self))

    return test


def sleep(seconds: float) -> defer.Deferred:
    """
    Let `seconds` pass on the reactor.  Only for what a test is about (a
    sender's pace, "nothing arrives for N seconds") or a poll's step: to
    wait for something to happen, use `wait_for`.
    """
    return deferLater(reactor, seconds, lambda: None)


async def wait_until(predicate: Callable[[], bool], seconds: float, step: float = 0.02) -> bool:
    """Poll `predicate` on the reactor until it holds (True) or `seconds` pass (False)."""
    deadline = reactor.seconds() + seconds
    while not predicate():
        if reactor.seconds() >= deadline:
            return False
        await sleep(step)
    return True


async def wait_for(
    predicate: Callable[[], bool], seconds: float, message: str | Callable[[], str], step: float = 0.02
) -> None:
    """
    Poll `predicate` until it holds; fail the test with `message` (a string,
    or a function making it from the state at the deadline) if it still does
    not after `seconds`.
    """
    if not await wait_until(predicate, seconds, step):
        text = message() if callable(message) else message
        raise AssertionError(f"{text} (waited {seconds:g} s)")


async def within(seconds: float, d: defer.Deferred, message: str) -> Any:
    """The result of `d`, or a test failure with `message` if it has none after `seconds` (`d` is then cancelled)."""
    timer = reactor.callLater(seconds, d.cancel)
    try:
        return await d
    except defer.CancelledError:
        raise AssertionError(f"{message} (waited {seconds:g} s)") from None
    finally:
        if timer.active():
            timer.cancel()


def outgoing_connections() -> list:
    """The TCP client connections the reactor is still making or holding (to wait until they are gone)."""
    return [d for d in (*reactor.getReaders(), *reactor.getWriters()) if isinstance(d, tcp.BaseClient)]
