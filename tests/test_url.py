"""ss:// URLs as ssx-server prints them."""

from __future__ import annotations

import base64
import subprocess
import sys

from twisted.trial import unittest

from ssx import __version__
from ssx.url import format_url


class FormatUrlTests(unittest.SynchronousTestCase):
    """SIP002 generation."""

    def test_sip002_example(self):
        """The SIP002 example URL is reproduced exactly (base64url userinfo, no padding)."""
        self.assertEqual(
            format_url("aes-128-gcm", "test", "192.168.100.1", 8888, "Example1"),
            "ss://YWVzLTEyOC1nY206dGVzdA@192.168.100.1:8888#Example1",
        )

    def test_ipv6_bracketed(self):
        """An IPv6 host is written in brackets."""
        self.assertTrue(format_url("aes-256-gcm", "pw", "2001:db8::1", 8388).endswith("@[2001:db8::1]:8388"))

    def test_password_with_colon_round_trips(self):
        """A password with ':' and non-ASCII survives: the userinfo splits at the first colon."""
        url = format_url("chacha20-ietf-poly1305", "a:b/密码", "example.com", 443)
        userinfo = url[len("ss://"):url.index("@")]
        decoded = base64.urlsafe_b64decode(userinfo + "=" * (-len(userinfo) % 4)).decode()
        self.assertEqual(decoded.split(":", 1), ["chacha20-ietf-poly1305", "a:b/密码"])

    def test_tag_percent_encoded(self):
        """The tag is percent-encoded (spaces as %20)."""
        self.assertTrue(format_url("aes-128-gcm", "t", "h", 1, "my server").endswith("#my%20server"))


class VersionTests(unittest.SynchronousTestCase):
    """python -m ssx --version."""

    def test_version(self):
        """`python -m ssx --version` prints the package version."""
        out = subprocess.run([sys.executable, "-m", "ssx", "--version"], capture_output=True, text=True, check=True)
        self.assertEqual(out.stdout.strip(), f"ssx {__version__}")
