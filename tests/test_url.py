"""ss:// URLs: SIP002 and legacy parsing, generation, round-trips, fuzzing; `python -m ssx url`."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from ssx import __version__
from ssx.errors import ConfigError
from ssx.config.upstreams import entry_from_url, entry_url, server_entry
from ssx.wire.sip002 import ServerUrl, format_url, parse_url

_settings = settings(max_examples=300, deadline=None, database=None)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FormatUrlTests(unittest.SynchronousTestCase):
    """SIP002 generation."""

    def test_sip002_example(self):
        """The SIP002 example URL is reproduced exactly (base64url userinfo, no padding)."""
        self.assertEqual(
            format_url("aes-128-gcm", "test", "192.168.100.1", 8888, "Example1"),
            "ss://YWVzLTEyOC1nY206dGVzdA@192.168.100.1:8888#Example1",
        )

    def test_sip002_plugin_example(self):
        """The SIP002 plugin example is reproduced: `/?plugin=` with name;opts percent-encoded."""
        self.assertEqual(
            format_url("rc4-md5", "passwd", "192.168.100.1", 8888, "Example2", "obfs-local", "obfs=http"),
            "ss://cmM0LW1kNTpwYXNzd2Q@192.168.100.1:8888/?plugin=obfs-local%3Bobfs%3Dhttp#Example2",
        )

    def test_2022_plain_userinfo(self):
        """A 2022 method is written as plain percent-encoded method:password (SIP002 example 3)."""
        self.assertEqual(
            format_url("2022-blake3-aes-256-gcm", "YctPZ6U7xPPcU+gp3u+0tx/tRizJN9K8y+uKlW2qjlI=", "192.168.100.1", 8888, "Example3"),
            "ss://2022-blake3-aes-256-gcm:YctPZ6U7xPPcU%2Bgp3u%2B0tx%2FtRizJN9K8y%2BuKlW2qjlI%3D@192.168.100.1:8888#Example3",
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


class ParseUrlTests(unittest.SynchronousTestCase):
    """SIP002 and legacy parsing: the spec's examples (ecosystem.md §1, test-vectors.md §9)."""

    def test_example1(self):
        """Example1: base64url userinfo, tag."""
        self.assertEqual(
            parse_url("ss://YWVzLTEyOC1nY206dGVzdA@192.168.100.1:8888#Example1"),
            ServerUrl("aes-128-gcm", "test", "192.168.100.1", 8888, tag="Example1"),
        )

    def test_example2_plugin(self):
        """Example2: the plugin parameter splits at the first ';' into name and raw option string."""
        url = parse_url("ss://cmM0LW1kNTpwYXNzd2Q@192.168.100.1:8888/?plugin=obfs-local%3Bobfs%3Dhttp#Example2")
        self.assertEqual(url, ServerUrl("rc4-md5", "passwd", "192.168.100.1", 8888, "obfs-local", "obfs=http", "Example2"))

    def test_example3_2022(self):
        """Example3: plain userinfo for a 2022 method, percent-decoded (the password keeps its '+', '/' and '=')."""
        url = parse_url(
            "ss://2022-blake3-aes-256-gcm:YctPZ6U7xPPcU%2Bgp3u%2B0tx%2FtRizJN9K8y%2BuKlW2qjlI%3D@192.168.100.1:8888#Example3"
        )
        self.assertEqual((url.method, url.password), ("2022-blake3-aes-256-gcm", "YctPZ6U7xPPcU+gp3u+0tx/tRizJN9K8y+uKlW2qjlI="))
        self.assertEqual((url.host, url.port, url.tag, url.plugin), ("192.168.100.1", 8888, "Example3", ""))

    def test_example3_plugin_flag(self):
        """Example3 with v2ray-plugin: a plugin option string that is a lone flag."""
        url = parse_url(
            "ss://2022-blake3-aes-256-gcm:YctPZ6U7xPPcU%2Bgp3u%2B0tx%2FtRizJN9K8y%2BuKlW2qjlI%3D@192.168.100.1:8888"
            "/?plugin=v2ray-plugin%3Bserver#Example3"
        )
        self.assertEqual((url.plugin, url.plugin_opts), ("v2ray-plugin", "server"))

    def test_dummy_profile(self):
        """Unknown query parameters are ignored, a plugin without options keeps empty options, and '+' in a tag stays '+'."""
        url = parse_url(
            "ss://YmYtY2ZiOnRlc3Q@192.168.100.1:8888/?plugin=url-encoded-plugin-argument-value"
            "&unsupported-arguments=should-be-ignored#Dummy+profile+name"
        )
        self.assertEqual(url, ServerUrl("bf-cfb", "test", "192.168.100.1", 8888, "url-encoded-plugin-argument-value", "", "Dummy+profile+name"))

    def test_legacy(self):
        """The legacy whole-base64 form: the password holds '@' and ':', split at the last '@'."""
        url = parse_url("ss://Y2hhY2hhMjAtaWV0Zi1wb2x5MTMwNTp0ZXN0LyFAIzpAMTkyLjE2OC4xMDAuMTo4ODg4")
        self.assertEqual(url, ServerUrl("chacha20-ietf-poly1305", "test/!@#:", "192.168.100.1", 8888))

    def test_legacy_standard_alphabet_padding_and_tag(self):
        """Legacy URLs in the standard base64 alphabet, padded, with a tag, are read too."""
        body = base64.b64encode(b"aes-256-cfb:p?>>w@[2001:db8::7]:443").decode()
        url = parse_url(f"ss://{body}#t%C3%A9st")
        self.assertEqual(url, ServerUrl("aes-256-cfb", "p?>>w", "2001:db8::7", 443, tag="tést"))
        self.assertTrue(any(c in body for c in "+/="), body)

    def test_padding_written_as_percent(self):
        """SIP002 userinfo padded with '=' or with '%3D' (py tools, Outline) decodes the same."""
        for userinfo in ("YWVzLTEyOC1nY206dGVzdA==", "YWVzLTEyOC1nY206dGVzdA%3D%3D"):
            self.assertEqual(parse_url(f"ss://{userinfo}@h.example:1").password, "test")

    def test_ipv6_host(self):
        """An IPv6 host in brackets is read without them."""
        self.assertEqual(parse_url("ss://YWVzLTEyOC1nY206dGVzdA@[::1]:8388/").host, "::1")

    def test_malformed(self):
        """Each malformed URL is one ConfigError naming url, and its message does not repeat the password."""
        cases = [
            "http://YWVzLTEyOC1nY206dGVzdA@h:1",
            "ss://YWVzLTEyOC1nY206dGVzdA@h",
            "ss://YWVzLTEyOC1nY206dGVzdA@h:0",
            "ss://YWVzLTEyOC1nY206dGVzdA@h:70000",
            "ss://YWVzLTEyOC1nY206dGVzdA@h:8x",
            "ss://YWVzLTEyOC1nY206dGVzdA@h:²",
            "ss://YWVzLTEyOC1nY206dGVzdA@[::1]:٣",
            "ss://YWVzLTEyOC1nY206dGVzdA@h:" + "1" * 30,
            "ss://YWVzLTEyOC1nY206dGVzdA@:1",
            "ss://YWVzLTEyOC1nY206dGVzdA@2001:db8::1:1",
            "ss://YWVzLTEyOC1nY206dGVzdA@[2001:db8::1:1",
            "ss://YWVzLTEyOC1nY206dGVzdA@[not-v6]:1",
            "ss://!!!@h:1",
            "ss://dGVzdA@h:1",  # "test": no ':' between method and password
            "ss://YWVzLTEyOC1nY206@h:1",  # empty password
            "ss://OnRlc3Q@h:1",  # empty method
            "ss://" + base64.urlsafe_b64encode(b"2022-blake3-aes-128-gcm:test").decode() + "@h:1",
            "ss://" + base64.urlsafe_b64encode(b"aes-128-gcm:test-h:1").decode(),  # legacy without '@'
            "ss://YWVzLTEyOC1nY206dGVzdA@h:1/path",
            "ss://YWVz LTEyOC1nY206dGVzdA@h:1",
            "ss://YWVzLTEyOC1nY206dGVzdA@h:1#%FF",
            "ss://",
            "",
        ]
        for text in cases:
            with self.assertRaises(ConfigError, msg=text) as caught:
                parse_url(text)
            self.assertEqual(caught.exception.key, "url")
            self.assertNotIn("test", caught.exception.message)

    def test_unknown_method_is_url_error(self):
        """A well-formed URL with a method ssx does not know is an error naming url."""
        with self.assertRaises(ConfigError) as caught:
            entry_from_url(format_url("rot13", "pw", "h", 1))
        self.assertEqual(caught.exception.key, "url")
        self.assertIn("rot13", caught.exception.message)


_hosts = st.one_of(
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
    st.ip_addresses().map(str),
)
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


class RoundTripTests(unittest.SynchronousTestCase):
    """format_url and parse_url agree on everything a URL carries."""

    @_settings
    @given(
        method=st.sampled_from(["aes-256-gcm", "chacha20-ietf-poly1305", "rc4-md5", "2022-blake3-aes-128-gcm", "none"]),
        password=_text.filter(bool),
        host=_hosts,
        port=st.integers(1, 65535),
        tag=_text,
        plugin=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=";"), max_size=20),
        plugin_opts=_text,
    )
    def test_round_trip(self, method, password, host, port, tag, plugin, plugin_opts):
        """Any method, password, host (name, IPv4, IPv6), port, tag and plugin name;options come back unchanged."""
        url = format_url(method, password, host, port, tag, plugin, plugin_opts)
        parsed = parse_url(url)
        self.assertEqual(
            parsed, ServerUrl(method, password, host, port, plugin, plugin_opts if plugin else "", tag)
        )

    @_settings
    @given(password=_text.filter(bool), host=_hosts, port=st.integers(1, 65535))
    def test_legacy_round_trip(self, password, host, port):
        """A legacy URL built from any password and host parses to the same fields."""
        shown = f"[{host}]" if ":" in host else host
        body = base64.urlsafe_b64encode(f"aes-128-gcm:{password}@{shown}:{port}".encode()).decode().rstrip("=")
        self.assertEqual(parse_url("ss://" + body), ServerUrl("aes-128-gcm", password, host, port))

    def test_entry_round_trip(self):
        """A config entry with plugin and remarks turns into a URL and back into the same entry."""
        entry = server_entry(
            {"address": "2001:db8::5", "port": 443, "password": "p@ss:w/rd", "method": "aes-256-gcm",
             "plugin": "v2ray-plugin", "plugin_opts": "tls;host=example.org;path=/a b", "name": "Tokyo 1"},
            "servers[0]",
        )
        self.assertEqual(entry_from_url(entry_url(entry)), entry)


class FuzzTests(unittest.SynchronousTestCase):
    """The parser never fails other than with ConfigError."""

    @_settings
    @given(st.text(max_size=200))
    def test_any_text(self, text):
        """Arbitrary text after ss:// gives a ServerUrl or a ConfigError naming url, nothing else."""
        for candidate in (text, "ss://" + text):
            try:
                url = parse_url(candidate)
            except ConfigError as e:
                self.assertEqual(e.key, "url")
            else:
                self.assertTrue(url.method and url.password and 0 < url.port < 65536)

    @_settings
    @given(st.binary(max_size=120), st.sampled_from(["", "#tag", "/?plugin=p%3Bo"]))
    def test_base64_of_anything(self, raw, suffix):
        """Base64 of arbitrary bytes, as SIP002 userinfo or as a legacy body, never escapes as another error."""
        blob = base64.urlsafe_b64encode(raw).decode()
        for candidate in (f"ss://{blob}@host.example:8388{suffix}", f"ss://{blob}{suffix}"):
            try:
                parse_url(candidate)
            except ConfigError as e:
                self.assertEqual(e.key, "url")


class UrlCommandTests(unittest.SynchronousTestCase):
    """`python -m ssx url`: the URL, a terminal QR code and a PNG that decodes back to the URL."""

    def run_tool(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "ssx", "url", *args], capture_output=True, text=True, cwd=ROOT, timeout=60
        )

    def test_config_file_url_and_qr(self):
        """A server's config.json gives its URL (host from --host, plugin kept) and a QR code drawn in the terminal."""
        directory = tempfile.mkdtemp()
        self.addCleanup(__import__("shutil").rmtree, directory)
        path = os.path.join(directory, "config.json")
        with open(path, "w") as f:
            f.write('{"server": "0.0.0.0", "server_port": 8443, "password": "barfoo!", "method": "aes-256-gcm",'
                    ' "plugin": "obfs-server", "plugin_opts": "obfs=http"}')
        out = self.run_tool("-c", path, "--host", "vpn.example.org", "--tag", "home")
        self.assertEqual(out.returncode, 0, out.stderr)
        lines = out.stdout.splitlines()
        self.assertEqual(
            lines[0], "ss://YWVzLTI1Ni1nY206YmFyZm9vIQ@vpn.example.org:8443/?plugin=obfs-server%3Bobfs%3Dhttp#home"
        )
        self.assertGreater(len(lines), 15)
        self.assertTrue(all(set(line) <= set("█▀▄ ") for line in lines[1:]), lines[1:3])

    def test_qr_png_decodes_to_url(self):
        """--qr-png writes an image that a QR decoder (zxing-cpp) reads back as exactly the printed URL."""
        try:
            import zxingcpp
            from PIL import Image
        except ImportError:
            raise unittest.SkipTest("zxing-cpp and Pillow (the test extra) are needed to decode the QR code")
        directory = tempfile.mkdtemp()
        self.addCleanup(__import__("shutil").rmtree, directory)
        png = os.path.join(directory, "server.png")
        out = self.run_tool("-s", "203.0.113.9", "-p", "8388", "-k", "s3cret pass", "-m", "chacha20-ietf-poly1305",
                            "--qr-png", png, "--no-qr")
        self.assertEqual(out.returncode, 0, out.stderr)
        url = out.stdout.strip()
        self.assertEqual(parse_url(url), ServerUrl("chacha20-ietf-poly1305", "s3cret pass", "203.0.113.9", 8388))
        decoded = [r.text for r in zxingcpp.read_barcodes(Image.open(png))]
        self.assertEqual(decoded, [url])

    def test_qr_png_private_and_not_through_links(self):
        """--qr-png files (they hold the password) are 0600 under umask 0 and replace a planted link, whose target stays."""
        directory = tempfile.mkdtemp()
        self.addCleanup(__import__("shutil").rmtree, directory)
        victim = os.path.join(directory, "victim")
        with open(victim, "w") as f:
            f.write("untouched")
        png = os.path.join(directory, "server.png")
        os.symlink(victim, png)
        config = os.path.join(directory, "config.json")
        with open(config, "w") as f:
            f.write('{"servers": [{"server": "203.0.113.9", "server_port": 8388, "password": "one", "method": "aes-256-gcm"},'
                    ' {"server": "203.0.113.10", "server_port": 8388, "password": "two", "method": "aes-256-gcm"}]}')
        out = subprocess.run(
            [sys.executable, "-c", "import os, sys, runpy; os.umask(0); sys.argv[0] = 'ssx'; runpy.run_module('ssx', run_name='__main__')",
             "url", "-c", config, "--qr-png", png, "--no-qr"],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        with open(victim, "rb") as f:
            self.assertEqual(f.read(), b"untouched")
        for path in (png, os.path.join(directory, "server-2.png")):
            info = os.lstat(path)
            self.assertTrue(stat.S_ISREG(info.st_mode), path)
            self.assertEqual(stat.S_IMODE(info.st_mode), 0o600, path)
            with open(path, "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

    def test_bad_port_one_line(self):
        """-p with anything but ASCII digits of a port is one line naming server_port, status 2."""
        for port in ("²", "٣", "99999"):
            out = self.run_tool("-s", "203.0.113.9", "-k", "pw", "-p", port)
            self.assertEqual(out.returncode, 2, out.stderr)
            lines = out.stderr.strip().splitlines()
            self.assertEqual(len(lines), 1, lines)
            self.assertTrue(lines[0].startswith("ssx url: bad configuration: server_port: expected a port number"), lines)

    def test_missing_password_one_line(self):
        """Without a password there is no URL: one line naming the key, status 2."""
        out = self.run_tool("-s", "203.0.113.9")
        self.assertEqual(out.returncode, 2)
        self.assertEqual(out.stderr.strip().splitlines(), ["ssx url: bad configuration: password: required: an ss:// URL carries the server's password"])


class VersionTests(unittest.SynchronousTestCase):
    """python -m ssx --version."""

    def test_version(self):
        """`python -m ssx --version` prints the package version."""
        out = subprocess.run([sys.executable, "-m", "ssx", "--version"], capture_output=True, text=True, check=True)
        self.assertEqual(out.stdout.strip(), f"ssx {__version__}")
