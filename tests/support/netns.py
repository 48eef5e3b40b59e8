"""
Network namespaces for the tests that need a host's own addresses, a
sysctl of their own or wildcard binds: created by the test, removed at its
end, with only `lo` up and no route out.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from typing import Any

from twisted.trial import unittest

__all__ = ["in_namespace", "ip", "link_namespaces", "new_namespace"]


def ip(*args: str) -> subprocess.CompletedProcess:
    """Run iproute2's `ip ARGS`, capturing its output."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def new_namespace(testcase: Any, prefix: str) -> str:
    """
    A new network namespace named PREFIX-<random> with `lo` up, deleted
    when `testcase` ends; SkipTest where namespaces cannot be made (not
    Linux, not root, no iproute2).
    """
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        raise unittest.SkipTest("network namespaces need Linux and root")
    if shutil.which("ip") is None or ip("netns", "list").returncode != 0:
        raise unittest.SkipTest("`ip netns` (iproute2) is not available")
    name = f"{prefix}-{secrets.token_hex(4)}"
    made = ip("netns", "add", name)
    if made.returncode != 0:
        raise unittest.SkipTest(f"cannot create a network namespace: {made.stderr.strip()}")
    testcase.addCleanup(ip, "netns", "del", name)
    in_namespace(name, "ip", "link", "set", "lo", "up")
    return name


def in_namespace(name: str, *command: str) -> str:
    """Run `command` inside namespace `name`; its output, or AssertionError with its errors."""
    done = subprocess.run(["ip", "netns", "exec", name, *command], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} in the namespace: {done.stderr.strip()}")
    return done.stdout


def link_namespaces(first: str, first_end: str, second: str, second_end: str) -> None:
    """
    A veth pair between namespaces `first` and `second`, its ends named
    `first_end` and `second_end` (made inside the namespaces, so the names
    never meet the host's), both up.
    """
    in_namespace(first, "ip", "link", "add", first_end, "type", "veth", "peer", "name", second_end, "netns", second)
    in_namespace(first, "ip", "link", "set", first_end, "up")
    in_namespace(second, "ip", "link", "set", second_end, "up")
