"""
``--metrics`` under `--workers`: the supervisor serves the totals of all
workers.

Each worker serves its own registry (the one a single process serves) on
a Unix socket in a directory only the supervisor's user can enter
(`worker_endpoint`); at each scrape of the supervisor's /metrics,
`WorkersCollector` fetches every live worker's exposition (plain HTTP over
the socket, with a deadline for all of them together: a worker that does
not answer in time, or a dead one, is left out of that scrape), parses it
with `prometheus_client.parser` and sums the samples of equal name and
labels (`sum_families`): counters, histogram buckets, sums and counts, and
gauges of what each worker holds apart (open connections, NAT entries) all
add up.  The gauges every worker sees alike (how many ports or keys are
configured, a local end's view of each server: up, latency, failures)
take the largest worker's value instead (`NOT_SUMMED`), and the
``_created`` timestamps the earliest.  Beside them, the supervisor's own:
workers running, workers that answered the scrape, and restarts.

A worker's counters start from zero when it is restarted: the sums drop
by what the dead worker had counted, which Prometheus's `rate()` reads as
a counter reset.

The collector runs in the web server's thread pool (prometheus-client's
Twisted resource renders there): it reads only what the reactor thread
replaces whole (`Supervisor.metrics_sockets`, counters).  No Twisted here.
"""

from __future__ import annotations

import socket
import time
from typing import Any, Callable, Iterable, Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["NOT_SUMMED", "SCRAPE_DEADLINE", "WorkersCollector", "scrape_unix", "sum_families", "worker_endpoint"]

# Seconds for all the workers' expositions of one scrape together.
SCRAPE_DEADLINE = 5.0
# A worker's exposition beyond this is refused (cardinality is bounded: far less).
MAX_EXPOSITION = 64 * 1024 * 1024
# Gauges every worker sees alike: the largest value, not the sum.
NOT_SUMMED = frozenset({
    "ssx_server_ports", "ssx_server_keys", "ssx_local_servers", "ssx_local_server_up",
    "ssx_local_server_latency_seconds", "ssx_local_server_failures",
})


def worker_endpoint(path: str) -> str:
    """The endpoint description a worker serves its registry on: the Unix socket `path`, only for its owner."""
    escaped = path.replace("\\", "\\\\").replace(":", "\\:")
    return f"unix:{escaped}:mode=600"


def scrape_unix(path: str, timeout: float) -> str:
    """The body of GET /metrics from the HTTP server on Unix socket `path`; `OSError` or `ValueError` if none in `timeout`."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: ssx-worker\r\n\r\n")
        data = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("the worker's exposition took too long")
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_EXPOSITION:
                raise ValueError("the worker's exposition is too large")
    head, separator, body = bytes(data).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if not separator or len(status) < 2 or status[1] != b"200":
        raise ValueError("not a metrics page")
    return body.decode("utf-8")


def sum_families(expositions: Iterable[str]) -> list[Metric]:
    """
    The families of several expositions of one registry, with their samples
    of equal name and labels combined; an exposition that does not parse is
    left out whole.
    """
    families: dict[str, Metric] = {}
    # family -> (sample name, labels) -> value, in the order first seen.
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in expositions:
        try:
            parsed = list(text_string_to_metric_families(text))
        except ValueError:
            continue
        for family in parsed:
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            table = values[family.name]
            largest = family.type == "gauge" and family.name in NOT_SUMMED
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in table:
                    table[key] = sample.value
                elif sample.name.endswith("_created"):
                    table[key] = min(table[key], sample.value)
                elif largest:
                    table[key] = max(table[key], sample.value)
                else:
                    table[key] += sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(families.values())


class WorkersCollector:
    """
    The supervisor's registry's one collector: the workers' sums, and the
    supervisor's own series.  `sockets()` gives the live workers' metrics
    sockets; `workers()` how many run; `restarts()` how many were restarted.
    """

    def __init__(self, prefix: str, sockets: Callable[[], tuple[str, ...]], workers: Callable[[], int],
                 restarts: Callable[[], int], deadline: float = SCRAPE_DEADLINE) -> None:
        self.prefix = prefix
        self.sockets = sockets
        self.workers = workers
        self.restarts = restarts
        self.deadline = deadline

    def describe(self) -> list[Metric]:
        # Nothing to check at registration (and no scrape of the workers then).
        return []

    def collect(self) -> Iterator[Metric]:
        expositions = []
        end = time.monotonic() + self.deadline
        for path in self.sockets():
            left = end - time.monotonic()
            if left <= 0:
                break
            try:
                expositions.append(scrape_unix(path, left))
            except (OSError, ValueError):
                continue
        yield from sum_families(expositions)
        yield GaugeMetricFamily(f"{self.prefix}_workers", "Worker processes running", value=self.workers())
        yield GaugeMetricFamily(f"{self.prefix}_workers_scraped",
                                "Workers whose metrics this scrape's sums include", value=len(expositions))
        yield CounterMetricFamily(f"{self.prefix}_worker_restarts", "Workers restarted after they ended",
                                  value=self.restarts())


def collector_registry(collector: Any) -> Any:
    """A registry of the supervisor's own (never the library's global one) holding `collector`."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
