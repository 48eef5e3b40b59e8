"""
The server's ss:// URL file: the URL users import into clients (it carries
the password) is written at start to a 0600 file beside twistd.pid, and a
server started without a password takes back the one generated at an
earlier start from that file, so that clients that imported the URL go on
working.  Never the password itself in the log: twistd's log file is
readable by others.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from typing import Sequence

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger

from ssx.config import ServerConfig
from ssx.crypto import lookup_method, make_key_ring
from ssx.errors import ConfigError
from ssx.net.listener import DatagramListenerService, ListenerService
from ssx.safe_file import read_private_file, write_file
from ssx.wire.sip002 import format_url, parse_url

__all__ = ["UrlAnnouncement", "reuse_generated_password"]

_log = Logger()


def reuse_generated_password(config: ServerConfig, rundir: str = ".", uid: int | None = None) -> ServerConfig:
    """
    The config with its URL file's path made absolute (relative ones are in
    `rundir`) and, when no password was configured, the password of that
    file's URL (written at an earlier start) in place of the freshly
    generated one: clients that imported the URL go on working.  The file
    is trusted only if it is a private file of the effective user (or of
    `uid`, the user twistd's --uid switches to) and its method is the
    configured one; otherwise the fresh password stands, with a warning.
    ConfigError if the file's directory does not exist.
    """
    if config.url_file is None:
        return config
    path = os.path.abspath(os.path.join(rundir, config.url_file))
    if not os.path.isdir(os.path.dirname(path)):
        raise ConfigError("url_file", f"{path}: no such directory")
    config = dataclasses.replace(config, url_file=path)
    if not config.password_generated or config.key is not None:
        return config
    try:
        text = read_private_file(path, limit=4096, owners=() if uid is None else (uid,)).decode("utf-8")
        saved = parse_url(text.strip())
        method = lookup_method(saved.method).name
        if method != config.method:
            return _warn(config, f"{path} is for method {method}, not {config.method}: generated a new password")
        make_key_ring(config.method, saved.password, users=dict(config.users))
    except FileNotFoundError:
        return config
    except (OSError, UnicodeDecodeError, ConfigError) as e:
        reason = (e.strerror or str(e)) if isinstance(e, OSError) else str(e)
        return _warn(config, f"{path} not used ({reason}): generated a new password")
    return dataclasses.replace(config, password=saved.password, password_reused=True)


def _warn(config: ServerConfig, line: str) -> ServerConfig:
    return dataclasses.replace(config, warnings=(*config.warnings, line))


class UrlAnnouncement(Service):
    """
    Once the server listens, writes the ss:// URL of its configuration to
    the URL file, mode 0600, and logs where clients connect and where the
    URL is.  Added after the listeners, so that the URL has the port
    actually bound.
    """

    def __init__(
        self,
        config: ServerConfig,
        listeners: Sequence[ListenerService],
        datagram_listeners: Sequence[DatagramListenerService],
    ) -> None:
        self.config = config
        self.listeners = listeners
        self.datagram_listeners = datagram_listeners

    def startService(self) -> None:
        Service.startService(self)
        config = self.config
        host, port = self._address()
        if config.key is not None:
            _log.info("no ss:// URL: the server is configured with a raw key (--key), which URLs cannot carry")
            return
        if config.port_configs()[0].keys:
            # One URL per key would put every key's secret in one file.
            _log.info("no ss:// URL: the port has access keys (keys), each with its own secret and URL")
            return
        plugin = config.plugin
        url = format_url(
            config.method, config.password, host, port,
            plugin=_client_plugin(plugin.name) if plugin is not None else None,
            plugin_opts=_client_plugin_options(plugin.options) if plugin is not None else None,
        )
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if config.url_file is None:
            # Only with a configured password (server_config sees to it).
            _log.info(
                "clients connect to {where} with {method} and the configured password "
                "(no URL file: python -m ssx url prints the ss:// URL)",
                where=where, method=config.method,
            )
            return
        self._write(config.url_file, url, where)

    def _address(self) -> tuple[str, int]:
        """Where clients connect: behind a plugin, the configured port; else the first IP port bound (0 picks one)."""
        config = self.config
        host, port = config.host, config.port or 8388
        if config.plugin is None:
            bound: list[ListenerService | DatagramListenerService] = [*self.listeners, *self.datagram_listeners]
            for listener in bound:
                address = listener.port.getHost() if listener.port is not None else None
                if isinstance(address, (IPv4Address, IPv6Address)):
                    host, port = address.host, address.port
                    break
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        return host, port

    def _write(self, url_file: str, url: str, where: str) -> None:
        config = self.config
        path = os.path.abspath(url_file)
        try:
            write_file(path, (url + "\n").encode("utf-8"), 0o600)
        except OSError as e:
            _log.error(
                "cannot write the ss:// URL to {path}: {reason}{lost}",
                path=path,
                reason=e.strerror or str(e),
                lost="; the generated password is lost: restart with -k PASSWORD or a writable --url-file"
                if config.password_generated and not config.password_reused else "",
            )
            return
        about = (
            "clients connect to {where} with {method}; the ss:// URL they import (it carries the password) "
            "is in {path} (replace its host if clients know this machine by another name)"
        )
        if config.password_reused:
            _log.info("no password given: kept the one generated at an earlier start; " + about,
                      where=where, method=config.method, path=path)
        elif config.password_generated:
            _log.warn("no password given: generated one, kept for later starts; " + about,
                      where=where, method=config.method, path=path)
        else:
            _log.info(about, where=where, method=config.method, path=path)


def _client_plugin(name: str) -> str:
    """The plugin name a client runs for this server's plugin (obfs-server pairs with obfs-local)."""
    base = name.rsplit("/", 1)[-1]
    return {"obfs-server": "obfs-local", "ss-v2ray-plugin": "v2ray-plugin"}.get(base, base)


def _client_plugin_options(options: str) -> str:
    """The options a client needs: v2ray-plugin's `server` flag is the server's alone."""
    return ";".join(part for part in options.split(";") if part and part != "server")
