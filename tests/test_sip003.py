"""SIP003 option strings, the plugin environment and the SIP002 plugin parameter (no I/O)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from ssx.wire.sip003 import (
    Plugin,
    PluginOptionsError,
    escape_option,
    format_plugin_options,
    join_plugin_parameter,
    parse_plugin_options,
    plugin_environment,
    split_plugin_parameter,
)

keys = st.text(min_size=1, max_size=20)
values = st.none() | st.text(max_size=30)
option_lists = st.lists(st.tuples(keys, values), max_size=8)


class ParseTests(unittest.SynchronousTestCase):
    """The option string as plugins (v2ray-plugin's goptlib) read it."""

    def test_obfs_example(self):
        """The spec's simple-obfs example parses to its two options, in order."""
        self.assertEqual(
            parse_plugin_options("obfs=http;obfs-host=www.bing.com"),
            [("obfs", "http"), ("obfs-host", "www.bing.com")],
        )

    def test_flags(self):
        """A key without '=' is a flag (no value); an empty value is kept as empty."""
        self.assertEqual(
            parse_plugin_options("server;tls;host=mydomain.me;path="),
            [("server", None), ("tls", None), ("host", "mydomain.me"), ("path", "")],
        )

    def test_escapes(self):
        """Backslash escapes ';', '=', '\\' and ':' (and any other character) in keys and values."""
        self.assertEqual(
            parse_plugin_options(r"a\=b=c\;d\\e;path=/x\:y;q\x"),
            [("a=b", "c;d\\e"), ("path", "/x:y"), ("qx", None)],
        )

    def test_value_may_hold_equals(self):
        """Only the first unescaped '=' ends the key (certRaw values are base64 with '=' padding)."""
        self.assertEqual(parse_plugin_options("certRaw=QUJD=="), [("certRaw", "QUJD==")])

    def test_trailing_semicolon_and_empty(self):
        """A trailing ';' and the empty string are accepted, as goptlib accepts them."""
        self.assertEqual(parse_plugin_options("obfs=tls;"), [("obfs", "tls")])
        self.assertEqual(parse_plugin_options(""), [])

    def test_errors(self):
        """An empty key and a trailing backslash are errors."""
        for text in (";;", "=x", "a=1;;b=2", "a=1;=2", "a=b\\", "flag\\"):
            with self.assertRaises(PluginOptionsError, msg=text):
                parse_plugin_options(text)

    @settings(max_examples=300)
    @given(option_lists)
    def test_round_trip(self, options):
        """Formatting then parsing gives the options back, whatever characters they hold."""
        self.assertEqual(parse_plugin_options(format_plugin_options(options)), options)

    @settings(max_examples=300)
    @given(st.text(max_size=60))
    def test_never_crashes(self, text):
        """Any text either raises PluginOptionsError or parses to options that format to a string parsing the same."""
        try:
            options = parse_plugin_options(text)
        except PluginOptionsError:
            return
        self.assertEqual(parse_plugin_options(format_plugin_options(options)), options)

    @given(st.text(max_size=30))
    def test_escape_leaves_no_delimiter(self, text):
        """An escaped text parses as one key, unchanged."""
        if text:
            self.assertEqual(parse_plugin_options(escape_option(text)), [(text, None)])


class EnvironmentTests(unittest.SynchronousTestCase):
    """The SS_* variables a plugin is started with."""

    def test_variables(self):
        """REMOTE is the network side, LOCAL the Shadowsocks side; the options go verbatim; the rest is inherited."""
        env = plugin_environment(
            {"PATH": "/usr/bin", "SS_PLUGIN_OPTIONS": "stale"}, ("203.0.113.5", 8388), ("127.0.0.1", 40001), "obfs=http"
        )
        self.assertEqual(
            env,
            {
                "PATH": "/usr/bin",
                "SS_REMOTE_HOST": "203.0.113.5",
                "SS_REMOTE_PORT": "8388",
                "SS_LOCAL_HOST": "127.0.0.1",
                "SS_LOCAL_PORT": "40001",
                "SS_PLUGIN_OPTIONS": "obfs=http",
            },
        )

    def test_no_options_no_variable(self):
        """Without options SS_PLUGIN_OPTIONS is not set at all (not even inherited)."""
        env = plugin_environment({"SS_PLUGIN_OPTIONS": "stale"}, ("::1", 1), ("127.0.0.1", 2), "")
        self.assertNotIn("SS_PLUGIN_OPTIONS", env)
        self.assertEqual(env["SS_REMOTE_HOST"], "::1")


class UrlParameterTests(unittest.SynchronousTestCase):
    """The `plugin` parameter of SIP002 URLs: `name;options`."""

    def test_split(self):
        """Split at the first ';': the rest is the option string, escapes and all."""
        self.assertEqual(
            split_plugin_parameter(r"obfs-local;obfs=http;obfs-host=a\;b"),
            Plugin("obfs-local", r"obfs=http;obfs-host=a\;b"),
        )
        self.assertEqual(split_plugin_parameter("v2ray-plugin"), Plugin("v2ray-plugin", ""))

    def test_bad(self):
        """No name, or options that do not parse, are errors."""
        for value in ("", ";obfs=http", "obfs-local;;"):
            with self.assertRaises(PluginOptionsError, msg=value):
                split_plugin_parameter(value)

    @given(st.text(min_size=1, max_size=20).filter(lambda n: ";" not in n), option_lists)
    def test_join_round_trip(self, name, options):
        """join then split gives the plugin back."""
        plugin = Plugin(name, format_plugin_options(options))
        self.assertEqual(split_plugin_parameter(join_plugin_parameter(plugin)), plugin)
