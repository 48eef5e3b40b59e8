"""
A listening endpoint as a service.

Like Twisted's `StreamServerEndpointService`, but it binds in
`privilegedStartService` and stops start-up with one clear line when it cannot
bind, and it keeps the listening port so callers (logs, tests) can see the
address actually bound (port 0 picks a free one).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["ListenerService", "listeners"]

_log = Logger()


class ListenerService(Service):
    """Listens on `endpoint` with `factory` while running."""

    def __init__(self, endpoint: IStreamServerEndpoint, factory: Factory, description: str, label: str) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.description = description
        self.label = label
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        self._listen()
        Service.privilegedStartService(self)

    def startService(self) -> None:
        if self.port is None:
            self._listen()
        Service.startService(self)

    def _listen(self) -> None:
        outcome: list[Any] = []
        self.endpoint.listen(self.factory).addBoth(outcome.append)
        if not outcome:
            raise SystemExit(f"{self.label}: listening on {self.description} did not complete at start-up")
        result = outcome[0]
        if isinstance(result, Failure):
            raise SystemExit(f"{self.label}: cannot listen on {self.description}: {result.getErrorMessage()}")
        self.port = result
        _log.info("{label} listening on {address}", label=self.label, address=_describe(result.getHost()))

    def stopService(self) -> Any:
        Service.stopService(self)
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None


def _describe(address: Any) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    return str(name if name is not None else address)


def listeners(reactor: Any, factory: Factory, descriptions: tuple[str, ...], label: str) -> MultiService:
    """A service tree listening with `factory` on every endpoint description; `.factory` is kept on it."""
    top = MultiService()
    for description in descriptions:
        ListenerService(serverFromString(reactor, description), factory, description, label).setServiceParent(top)
    top.factory = factory  # type: ignore[attr-defined]
    return top
