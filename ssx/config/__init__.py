"""
Configuration of both ends: defaults < config.json < command-line flags.

`read_config_file` loads a shadowsocks-style config.json and `merge` puts
the flags over it (`file`); `server_config` (`server`) and `local_config`
(`local`) check the merged keys (the names users already have in their
files: server, server_port, password, method, ...) and return one frozen
value, from the per-key readers both ends share (`values`).  Every bad
value raises `ConfigError` naming its key.  The servers a config names
are `upstreams`; a server's ports, `ports`; a port's access keys
(outline-ss-server's, also from its YAML file), `keys`; its manager address,
`manager`; where either end serves its metrics, `metrics`; nameserver lists,
`nameservers`; the keys of other
implementations and the advice for each, `known_keys`; the twistd options
both commands share, `options`; what changed between two reads of a
config (for a reload), `changes`.
"""

from ssx.config.file import merge, read_config_file
from ssx.config.local import DEFAULT_CHECK_URL, HealthCheck, LocalConfig, OnlineConfig, Tunnel, local_config
from ssx.config.server import PLUGIN_BACKEND_LISTEN, ServerConfig, server_config
from ssx.config.upstreams import config_entries
from ssx.config.values import DEFAULT_METHOD, Limits, RelayModes

__all__ = [
    "DEFAULT_CHECK_URL",
    "DEFAULT_METHOD",
    "HealthCheck",
    "PLUGIN_BACKEND_LISTEN",
    "LocalConfig",
    "OnlineConfig",
    "config_entries",
    "ServerConfig",
    "Limits",
    "Tunnel",
    "RelayModes",
    "local_config",
    "merge",
    "read_config_file",
    "server_config",
]
