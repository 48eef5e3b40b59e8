"""
The config keys of the implementations ssx replaces (the original Python
shadowsocks, shadowsocks-libev, shadowsocks-rust's `servers` entries) that
an ssx end does not honour, each with one line of advice: a deployment's
config.json starts unchanged, and each such key is one warning at start-up
saying what to do instead, never silently dropped.  Keys in no peer's
config stay in the generic "config keys not used" warning, since they are
more often misspelt ones.  No Twisted here.
"""

from __future__ import annotations

from typing import AbstractSet, Any, Mapping

__all__ = ["LOCAL_PEER_KEYS", "ORIGINAL_METHOD", "SERVER_PEER_KEYS", "no_method_warning", "peer_key_notes"]

# The original's default method, where ssx's is an AEAD one.
ORIGINAL_METHOD = "aes-256-cfb"

_C_LIBRARY = "ssx uses the cryptography library; ignored"
_SERVER_ONLY = "a server setting (ssx-server reads it); ignored by ssx-local"
_LOCAL_ONLY = "a local-end setting (ssx-local reads it); ignored by ssx-server"

# Keys both ends leave alone, with the same advice.
_BOTH: dict[str, str] = {
    "one_time_auth": "obsolete (OTA was removed from Shadowsocks); ignored",
    "libopenssl": _C_LIBRARY,
    "libmbedtls": _C_LIBRARY,
    "libsodium": _C_LIBRARY,
    # The drop-in commands (ssx.compat) read these four and pass them to
    # twistd, so the advice holds whichever way ssx was started.
    "daemon": "the ssx-ssserver/ssx-sslocal commands read it; twistd itself daemonises unless given --nodaemon",
    "pid-file": "the ssx-ssserver/ssx-sslocal commands read it (with -d start); twistd itself takes --pidfile",
    "log-file": "the ssx-ssserver/ssx-sslocal commands read it (with -d start); twistd itself takes --logfile",
    "user": "the drop-in commands (ssx-ssserver, ssx-ss-server, ...) read it; twistd itself takes --uid/--gid",
    "mtu": "ssx does not size UDP datagrams by an MTU; ignored",
    "mptcp": "multipath TCP is not supported; ignored",
    "no_delay": "ssx always sets TCP_NODELAY on relayed connections; ignored",
}

SERVER_PEER_KEYS: Mapping[str, str] = {
    **_BOTH,
    "local_port": _LOCAL_ONLY,
    "tunnel_remote": _LOCAL_ONLY,
    "tunnel_remote_port": _LOCAL_ONLY,
    "tunnel_port": _LOCAL_ONLY,
    # shadowsocks-rust's `servers` entries.
    "remarks": "a label; ignored",
    "id": "a label; ignored",
}

LOCAL_PEER_KEYS: Mapping[str, str] = {
    **_BOTH,
    "manager_address": _SERVER_ONLY,
    "port_password": _SERVER_ONLY,
    "forbidden_ip": _SERVER_ONLY,
    "outbound_address": _SERVER_ONLY,
    "interface": "ssx-server sends through a chosen interface; ssx-local does not; ignored",
    "prefer_ipv6": "ssx-local does not prefer IPv6 yet; ignored",
    "ipv6_first": "ssx-local does not prefer IPv6 yet; ignored",
    "dns_server": "ssx-local resolves server names with the system's resolver; ignored",
    "nameserver": "ssx-local resolves server names with the system's resolver; ignored",
    "tcp_tproxy": "ss-redir's switch: ssx-local takes the transparent port itself, --tproxy PORT "
                  "(key tproxy) or --redir PORT (key redir); ignored",
}


def peer_key_notes(
    values: Mapping[str, Any], known: AbstractSet[str], table: Mapping[str, str], prefix: str = ""
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """
    (warnings, unused): a line for each key of `values` neither `known`
    nor honoured but found in `table`, and the other unknown keys, sorted.
    """
    warnings = []
    unused = []
    for key in sorted(set(values) - known):
        if key in table:
            warnings.append(f"config key {prefix}{key}: {table[key]}")
        else:
            unused.append(key)
    return tuple(warnings), tuple(unused)


def no_method_warning(method: str) -> str:
    """The line for a config that names no method (ssx's default is not the original's)."""
    return (
        f"no method given: ssx uses {method}, where the original shadowsocks defaulted to {ORIGINAL_METHOD}; "
        "set method (-m) to what the clients use"
    )
