"""
Scraping an end's /metrics over real HTTP (twisted.web's Agent) and
reading the samples with prometheus-client's own parser.
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.web.client import Agent, readBody

from tests.support.waiting import sleep

__all__ = ["Samples", "metrics_port", "scrape", "scrape_until"]


class Samples:
    """The samples of one scrape, by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def get(self, name: str, **labels: str) -> float | None:
        """The value of the sample `name` with exactly `labels`, or None if there is none."""
        return self.samples.get((name, frozenset(labels.items())))

    def value(self, name: str, **labels: str) -> float:
        """The value of the sample `name` with exactly `labels`; fails naming it if there is none."""
        found = self.get(name, **labels)
        if found is None:
            raise AssertionError(f"no sample {name}{labels} in:\n{self.text}")
        return found

    def labels_of(self, name: str) -> list[dict[str, str]]:
        """The label sets of every sample named `name`."""
        return [dict(labels) for sample, labels in self.samples if sample == name]


async def scrape(port: int, host: str = "127.0.0.1", path: bytes = b"/metrics") -> Samples:
    """GET http://host:port/metrics and parse it; fails unless the answer is 200."""
    response = await Agent(reactor).request(b"GET", b"http://%s:%d%s" % (host.encode(), port, path))
    body = await readBody(response)
    if response.code != 200:
        raise AssertionError(f"GET {path!r}: {response.code} {body[:200]!r}")
    return Samples(body.decode())


async def scrape_until(port: int, predicate: Callable[[Samples], Any], seconds: float = 10.0) -> Samples:
    """Scrape until `predicate` holds of the samples (the counters are read as the server updates them)."""
    deadline = reactor.seconds() + seconds
    while True:
        samples = await scrape(port)
        if predicate(samples):
            return samples
        if reactor.seconds() > deadline:
            return samples
        await sleep(0.05)


def metrics_port(service: Any) -> int:
    """The port an in-process ssx-server or ssx-local service serves /metrics on (its `metrics` listener)."""
    return service.metrics_listener.port.getHost().port
