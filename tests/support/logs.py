"""Capturing what ssx logs during a test, as events and as formatted text."""

from __future__ import annotations

from typing import Any

from twisted.logger import formatEvent, globalLogPublisher

__all__ = ["log_events", "event_texts"]


def log_events(testcase: Any) -> list[dict]:
    """Every event logged from now until the end of `testcase`, appended as it comes."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    testcase.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def event_texts(events: list[dict]) -> list[str]:
    """Each event as a line of text (its formatted message)."""
    return [formatEvent(event) for event in events]
