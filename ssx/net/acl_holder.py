"""
The one place each end keeps its ACL (`ssx.acl`): factories and relays
hold the `AclHolder` and read `holder.acl` at decision time, so that a
reload swaps the rules for every connection that starts afterwards.  On
SIGHUP the whole configuration is read again (`ssx.net.reload`), the ACL
file with it, and each end's reload hands the new rules over with
`apply_acl`; a file that no longer parses refuses that reload with one
line, and the old rules stay.  `AclHolder.reload` rereads the file alone.
"""

from __future__ import annotations

import os
from typing import Sequence

from twisted.logger import Logger

from ssx.acl import Acl, load_acl
from ssx.errors import ConfigError

__all__ = ["AclHolder", "apply_acl"]

_log = Logger()


class AclHolder:
    """The ACL loaded from `path`, replaced by `reload()`; `acl` is None when the end has none."""

    def __init__(self, path: str, acl: Acl | None = None) -> None:
        # Absolute: twistd may change directory before a reload.
        self.path = os.path.abspath(path)
        self.acl: Acl | None = acl if acl is not None else load_acl(path)
        self.reloads = 0
        self.reload_failures = 0

    def reload(self) -> bool:
        """Read the file again and use it; on a bad file keep the rules in use. True if it was swapped."""
        try:
            acl = load_acl(self.path)
        except ConfigError as e:
            self.reload_failures += 1
            _log.error("ACL not reloaded, the previous rules stay: {error}", error=e.message)
            return False
        self.acl = acl
        self.reloads += 1
        _log.info("ACL reloaded: {acl}", acl=acl)
        return True

    def refuses_target(self, host: str, ips: Sequence[str] | None = None) -> bool:
        """
        Whether the server's outbound lists refuse the target `host`:
        before it is resolved (`ips` None) only a name rule refuses it,
        otherwise the addresses it resolved to decide.
        """
        acl = self.acl
        if acl is None or not acl.checks_outbound:
            return False
        if ips is None:
            return acl.outbound_name_allowed(host) is False
        return not acl.outbound_addresses_allowed(host, ips)


def apply_acl(holder: AclHolder | None, acl: Acl | None, path: str | None) -> str | None:
    """
    A reload's ACL (`acl`, read from `path`; None: the file names none)
    into the running `holder`; what it did, for the reload's line.  An
    end started without an ACL has no holder: one named now waits for a
    restart.
    """
    if holder is None:
        return "acl: not applied before a restart (ssx started without one)" if acl is not None else None
    if acl is None:
        if holder.acl is None:
            return None
        holder.acl = None
        return "acl removed"
    if path:
        holder.path = os.path.abspath(path)
    holder.acl = acl
    holder.reloads += 1
    return f"acl reread ({acl})"
