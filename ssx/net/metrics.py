"""
The /metrics listener both ends run with ``--metrics``: a twisted.web
site whose one page is prometheus-client's Twisted resource
(`prometheus_client.twisted.MetricsResource`) over the end's own
`CollectorRegistry`, served on an endpoint description like any other
listener (`ssx.net.listener.serve`).  What is collected is each end's
(`ssx.server.metrics`, `ssx.local.metrics`).

The resource renders in Twisted's thread pool: the collectors only read
counters the reactor thread keeps, copying what they iterate.  Twisted's
WSGI resource, under the library's, reads a host and port from the
client's address: on a Unix socket (``unix:`` endpoints, and a
``--workers`` worker's private one) the request gives an empty host.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IAddress
from twisted.web.http import Request
from twisted.web.resource import Resource
from twisted.web.server import Request as SiteRequest, Site

from ssx.net.listener import ListenerService, serve

__all__ = ["MetricsSite", "serve_metrics"]


class _MetricsRequest(SiteRequest):
    """A request whose addresses have a host and port, even on a Unix socket (WSGI's REMOTE_ADDR, SERVER_PORT ...)."""

    def getClientAddress(self) -> IAddress:
        return _with_host(SiteRequest.getClientAddress(self))

    def getHost(self) -> Any:
        return _with_host(SiteRequest.getHost(self))


def _with_host(address: Any) -> Any:
    return address if hasattr(address, "host") else IPv4Address("TCP", "", 0)


class MetricsSite(Site):
    """The metrics page under /metrics (nothing else), without an access log line per scrape."""

    noisy = False
    requestFactory = _MetricsRequest

    def __init__(self, registry: Any) -> None:
        # Imported here: prometheus_client.twisted imports the global reactor.
        from prometheus_client.twisted import MetricsResource

        root = Resource()
        root.putChild(b"metrics", MetricsResource(registry))
        Site.__init__(self, root)

    def log(self, request: Request) -> None:
        pass


def serve_metrics(top: MultiService, reactor: Any, description: str, registry: Any, label: str) -> ListenerService:
    """Serve `registry` at /metrics on `description`, as a listener under `top`."""
    # A twisted.web Site is a Factory of HTTP channels; `serve` takes any factory.
    site: Any = MetricsSite(registry)
    return serve(top, reactor, description, site, f"{label} metrics")
