"""
SIP008 online configuration: the local end's server list fetched over HTTPS.

Beside the data path: `OnlineConfigService` fetches the document with
Twisted's `Agent` at start and then every `interval` seconds, verifying the
certificate against the system's roots or a configured CA file
(`BrowserLikePolicyForHTTPS`: pyOpenSSL and service-identity), reads at
most `MAX_DOCUMENT` bytes, checks it (`ssx.wire.sip008`) and hands the servers to
`on_servers` (the picker).  A failed fetch or a malformed document is one
log line, and the last good list stays.  The URL's path carries the
subscriber's secret, so the log names only its scheme and host.
"""

from __future__ import annotations

import re
from typing import Any, Callable
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from ssx.errors import ConfigError
from ssx.config.upstreams import ServerEntry
from ssx.wire.sip008 import MAX_DOCUMENT, OnlineServers, parse_online_config

__all__ = ["OnlineConfigService", "describe_url", "load_trust_root"]

_log = Logger()

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def load_trust_root(path: str) -> Any:
    """The CA certificates of a PEM file, as a trust root for `optionsForClientTLS`."""
    try:
        with open(path, "rb") as f:
            blocks = _PEM.findall(f.read())
        certificates = [ssl.Certificate.loadPEM(block) for block in blocks]
    except OSError as e:
        raise ConfigError("online_config_ca", f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # pyOpenSSL's errors for a damaged certificate
        raise ConfigError("online_config_ca", f"{path}: not a PEM certificate: {e}") from None
    if not certificates:
        raise ConfigError("online_config_ca", f"{path} holds no PEM certificate")
    return ssl.trustRootFromCertificates(certificates)


def describe_url(url: str) -> str:
    """The URL as the log may show it: scheme and host, not the secret path."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    shown = f"[{host}]" if ":" in host else host
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{shown}{port}/…"


class _LimitedBody(Protocol):
    """Collects a response body, refusing one larger than `limit`."""

    # The response's body transport: an `IPushProducer`, not an `ITransport`.
    transport: Any

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.done: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            if not self.done.called:
                self.done.errback(Failure(ValueError(f"document larger than {self.limit} bytes")))
            self.transport.stopProducing()
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


class OnlineConfigService(Service):
    """Keeps the picker's online servers in step with a SIP008 URL."""

    def __init__(
        self,
        reactor: Any,
        url: str,
        interval: float,
        on_servers: Callable[[tuple[ServerEntry, ...]], None],
        trust_root: Any = None,
        timeout: float = 30.0,
    ) -> None:
        self.reactor = reactor
        self.url = url
        self.where = describe_url(url)
        self.interval = interval
        self.on_servers = on_servers
        self.timeout = timeout
        self.last_good: OnlineServers | None = None
        self._agent = Agent(
            reactor,
            contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust_root),
            connectTimeout=timeout,
            pool=HTTPConnectionPool(reactor, persistent=False),
        )
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = reactor
        self._pending: Deferred | None = None
        self._stopped = False

    async def fetch(self) -> bytes:
        """The document's bytes; raises on a TLS, HTTP or size problem."""
        requesting = self._agent.request(
            b"GET", self.url.encode("ascii"), Headers({b"User-Agent": [b"ssx"], b"Accept": [b"application/json"]})
        )
        requesting.addTimeout(self.timeout, self.reactor)
        response = await requesting
        body = _LimitedBody(MAX_DOCUMENT)
        response.deliverBody(body)
        problem = None
        if response.code != 200:
            problem = f"HTTP status {response.code}"
        elif response.length is not UNKNOWN_LENGTH and response.length > MAX_DOCUMENT:
            problem = f"document larger than {MAX_DOCUMENT} bytes"
        if problem is not None:
            # The body is read (at most the limit) and dropped; the
            # connection is not kept.
            body.done.addErrback(lambda _: None)
            raise ValueError(problem)
        body.done.addTimeout(self.timeout, self.reactor)
        return await body.done

    def refresh(self) -> Deferred:
        """Fetch and apply the list once; fires True if it was applied, False otherwise."""
        self._pending = Deferred.fromCoroutine(self._refresh())
        return self._pending

    async def _refresh(self) -> bool:
        kept = len(self.last_good.servers) if self.last_good else 0
        try:
            body = await self.fetch()
        except Exception as e:
            if self._stopped:  # cancelled by stopService: nothing to report
                return False
            _log.warn(
                "online config from {where} not fetched: {error}; keeping the last good list ({count} servers)",
                where=self.where, error=_reason(e), count=kept,
            )
            return False
        try:
            document = parse_online_config(body)
        except ConfigError as e:
            _log.error(
                "online config from {where} rejected: {reason}; keeping the last good list ({count} servers)",
                where=self.where, reason=e.message, count=kept,
            )
            return False
        for reason in document.skipped:
            _log.warn("online config from {where}: left out {reason}", where=self.where, reason=reason)
        self.last_good = document
        self.on_servers(document.servers)
        _log.info("online config from {where}: {count} servers", where=self.where, count=len(document.servers))
        return True

    def startService(self) -> None:
        Service.startService(self)
        self._stopped = False
        self._loop.start(self.interval, now=True)

    def stopService(self) -> Any:
        Service.stopService(self)
        self._stopped = True
        if self._loop.running:
            self._loop.stop()
        pending, self._pending = self._pending, None
        if pending is not None and not pending.called:
            pending.cancel()
            pending.addErrback(lambda _: None)
        return None


def _reason(error: BaseException) -> str:
    """One line for a fetch failure (Agent wraps TLS and connection errors in lists of failures)."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(_reason(r.value) for r in reasons)
    text = str(error) or type(error).__name__
    return text.splitlines()[0] if text else type(error).__name__
