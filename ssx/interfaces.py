"""
The seams of ssx that have several implementations or a fake in the tests,
declared in one place.
"""

from __future__ import annotations

from zope.interface import Interface

__all__ = ["IServerPicker"]


class IServerPicker(Interface):
    """
    Chooses which server each new local-end connection goes to, and learns
    from what happened: connections that could not reach a server, and the
    health check's measurements.
    """

    def candidates() -> list:
        """The `Upstream`s to try for one new connection, best first."""

    def upstreams() -> list:
        """Every server currently known, in configuration order."""

    def succeeded(upstream) -> None:  # type: ignore[no-untyped-def]
        """A connection reached `upstream`."""

    def failed(upstream, reason: str) -> None:  # type: ignore[no-untyped-def]
        """A connection could not reach `upstream`."""

    def checked(upstream, latency: float | None) -> None:  # type: ignore[no-untyped-def]
        """The health check went through `upstream` in `latency` seconds, or failed (None)."""

    def replace_dynamic(entries, build) -> None:  # type: ignore[no-untyped-def]
        """
        Make the servers from an online config exactly `entries`, building an
        `Upstream` with `build(entry)` only for those not already known.
        """
