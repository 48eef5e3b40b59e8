"""
Shared fixtures of the test suite, one module per job; test modules import
them from here (`from tests import support`, `from tests.support import X`),
never from each other.

- `waiting`: waiting for a condition or a Deferred with a deadline.
- `targets`: loopback echo targets, web sites, certificates, DNS servers, free ports.
- `clients`: raw TCP, SOCKS5 CONNECT and SOCKS5 UDP clients, a manager API client.
- `chains`: ssx-server and ssx-local in trial's reactor, and TestCase bases.
- `peers`: child processes (twistd, shadowsocks-libev, sing-box, plugins, curl).
- `dns_servers`: recording upstream DNS servers (twisted.names) and a DNS client.
- `in_memory`: StringTransport-based stand-ins for protocol unit tests.
- `payloads`: test payloads and their digests.
- `logs`: capturing log events.
- `metrics`: scraping /metrics over HTTP and reading the samples; the port an in-process end serves it on.
- `workers`: a `--workers` server seen from outside (which process holds a
  connection, live pids), and a forwarder recording a client's bytes.
- `tcp_paths`: running a test on ssx.net.lean's path or on Twisted's; the bytes a transport holds unsent.
"""

from tests.support.chains import (
    PASSWORD,
    ChainTestCase,
    LoopbackCase,
    drained,
    first_listener,
    start_local,
    start_server,
)
from tests.support.clients import (
    BuildingFactory,
    DatagramCollector,
    DecryptingClient,
    HalfClosingExchange,
    KeepingProtocol,
    ManagerClient,
    PullSender,
    TRANSFER_SECONDS,
    RawClient,
    Socks5UdpClient,
    SocksClient,
    SocksTransfer,
    WholeEchoTransfer,
    http_connect_echo,
    socks5_request,
    socks5_udp_header,
    socks_transfer,
    run_transfer,
    whole_echo_transfer,
)
from tests.support.in_memory import FakeServer, HalfCloseTransport, Link
from tests.support.logs import event_texts, log_events
from tests.support.metrics import Samples, metrics_port, scrape, scrape_until
from tests.support.payloads import mixed_payloads, sha256
from tests.support.peers import (
    fd_table,
    open_fds,
    ROOT,
    TWISTD,
    ChildProcess,
    late_lines_quoted,
    requires,
    sighup,
    skip_without,
    spawn,
    start_ss_local,
    start_twistd,
    twistd_env,
    wait_for_port,
)
from tests.support.workers import Recorder, alive, connection_owner, reload_workers, started_workers
from tests.support.targets import (
    Blob,
    CountingEchoFactory,
    DigestAndSource,
    Echo,
    FakeDns,
    HashingEcho,
    HashingEchoFactory,
    UdpEcho,
    Zone,
    free_port,
    ipv6_loopback,
    listen_echo,
    listen_udp_echo,
    listen_web,
    make_certificate,
)
from tests.support.tcp_paths import LeanTcp, TwistedTcp, buffered_bytes
from tests.support.waiting import coroutine_test, outgoing_connections, sleep, wait_for, wait_until, within

__all__ = [
    "Blob",
    "Samples",
    "metrics_port",
    "scrape",
    "scrape_until",
    "BuildingFactory",
    "DatagramCollector",
    "DecryptingClient",
    "HalfClosingExchange",
    "KeepingProtocol",
    "PullSender",
    "fd_table",
    "open_fds",
    # chains
    "PASSWORD",
    "start_server",
    "start_local",
    "first_listener",
    "drained",
    "LoopbackCase",
    "ChainTestCase",
    # clients
    "TRANSFER_SECONDS",
    "http_connect_echo",
    "socks5_request",
    "SocksTransfer",
    "socks_transfer",
    "WholeEchoTransfer",
    "run_transfer",
    "whole_echo_transfer",
    "RawClient",
    "SocksClient",
    "socks5_udp_header",
    "Socks5UdpClient",
    "ManagerClient",
    # in_memory
    "HalfCloseTransport",
    "Link",
    "FakeServer",
    # logs
    "log_events",
    "event_texts",
    # payloads
    "sha256",
    "mixed_payloads",
    # peers
    "ChildProcess",
    "spawn",
    "skip_without",
    "requires",
    "ROOT",
    "TWISTD",
    "twistd_env",
    "start_twistd",
    "sighup",
    "wait_for_port",
    "late_lines_quoted",
    # targets
    "free_port",
    "ipv6_loopback",
    "Echo",
    "listen_echo",
    "CountingEchoFactory",
    "HashingEcho",
    "HashingEchoFactory",
    "DigestAndSource",
    "UdpEcho",
    "listen_udp_echo",
    "make_certificate",
    "listen_web",
    "FakeDns",
    "Zone",
    # tcp_paths
    "LeanTcp",
    "buffered_bytes",
    "TwistedTcp",
    # waiting
    "coroutine_test",
    "sleep",
    "wait_until",
    "wait_for",
    "within",
    "outgoing_connections",
    # workers
    "Recorder",
    "alive",
    "connection_owner",
    "reload_workers",
    "started_workers",
]
