"""Configuration: defaults < config.json < flags, and one error naming the key."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from unittest import skipUnless

from twisted.scripts.twistd import ServerOptions
from twisted.trial import unittest

from ssx.config import local_config, merge, read_config_file, server_config
from ssx.errors import ConfigError
from ssx.wire.sip003 import Plugin
import ssx.local.tap as local_tap
import ssx.server.tap as server_tap
from ssx.server.url_file import reuse_generated_password
def write_config(test: unittest.SynchronousTestCase, values: object) -> str:
    fd, path = tempfile.mkstemp(suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(values if isinstance(values, str) else json.dumps(values))
    test.addCleanup(os.unlink, path)
    return path


class ServerConfigTests(unittest.SynchronousTestCase):
    """The server's settings."""

    def test_defaults(self):
        """No settings at all: port 8388 on 0.0.0.0, chacha20-ietf-poly1305, 300 s, a generated password."""
        config = server_config({})
        self.assertEqual(config.listen, ("tcp:8388:interface=0.0.0.0",))
        self.assertEqual(config.method, "chacha20-ietf-poly1305")
        self.assertEqual(config.timeout, 300.0)
        self.assertTrue(config.password_generated)
        self.assertGreaterEqual(len(config.password), 24)
        self.assertNotEqual(config.password, server_config({}).password)
        self.assertTrue(config.forbidden.forbids("127.0.0.1"))

    def test_libev_style_file(self):
        """A libev config.json is taken as it is, with string ports and a list of bind addresses."""
        config = server_config(
            {"server": ["127.0.0.1", "::1"], "server_port": "8389", "password": "barfoo!", "method": "AES-256-GCM",
             "timeout": 60, "fast_open": True, "nameserver": "1.1.1.1,[2606:4700::1111]:53"}
        )
        self.assertEqual(config.listen, ("tcp:8389:interface=127.0.0.1", "tcp:8389:interface=\\:\\:1"))
        self.assertEqual(config.method, "aes-256-gcm")
        self.assertEqual(config.nameservers, (("1.1.1.1", 53), ("2606:4700::1111", 53)))
        self.assertEqual(config.ignored, ())
        self.assertTrue(config.fast_open)
        self.assertFalse(config.password_generated)

    def test_empty_forbidden_disables(self):
        """forbidden_ip "" turns the destination check off."""
        self.assertFalse(server_config({"forbidden_ip": ""}).forbidden.forbids("127.0.0.1"))

    def test_password_not_in_repr(self):
        """The password never appears in the config's repr (which may be logged)."""
        self.assertNotIn("hunter2", repr(server_config({"password": "hunter2"})))

    def test_bad_values_name_their_key(self):
        """Each bad value raises ConfigError naming its key."""
        cases = [
            ({"method": "rot13"}, "method"),
            ({"server_port": 70000}, "server_port"),
            ({"server_port": "http"}, "server_port"),
            ({"timeout": -1}, "timeout"),
            ({"timeout": "soon"}, "timeout"),
            ({"key": "!!!"}, "key"),
            ({"key": "AAAA", "method": "aes-256-gcm"}, "key"),
            ({"forbidden_ip": "10.0.0.0/33"}, "forbidden_ip"),
            ({"nameserver": "dns.google"}, "nameserver"),
            ({"mode": "both"}, "mode"),
            ({"plugin": 5}, "plugin"),
            ({"plugin": "obfs-server", "plugin_opts": "obfs=http;;"}, "plugin_opts"),
            ({"plugin": "obfs-server", "plugin_opts": "obfs=http\\"}, "plugin_opts"),
            ({"plugin": "obfs-server", "plugin_args": "-v"}, "plugin_args"),
            ({"plugin": "obfs-server", "listen": "tcp:8388"}, "listen"),
            ({"plugin": "obfs-server", "server_port": 0}, "server_port"),
            ({"listen": []}, "listen"),
            ({"prefer_ipv6": "yes"}, "prefer_ipv6"),
        ]
        for values, key in cases:
            with self.assertRaises(ConfigError, msg=str(values)) as caught:
                server_config(values)
            self.assertEqual(caught.exception.key, key, values)

    def test_modes(self):
        """mode picks the relays (libev's keys), with the UDP NAT's timeout and bound."""
        for mode, tcp, udp in (("tcp_only", True, False), ("tcp_and_udp", True, True), ("udp_only", False, True)):
            relays = server_config({"mode": mode, "udp_timeout": 30, "udp_max_associations": "64"}).relays
            self.assertEqual((relays.tcp, relays.udp, relays.timeout, relays.capacity), (tcp, udp, 30.0, 64))
        self.assertEqual(server_config({}).relays.timeout, 60.0)
        for values, key in (({"udp_timeout": 0}, "udp_timeout"), ({"udp_max_associations": 0}, "udp_max_associations"),
                            ({"mode": "udp_only", "listen": "tcp:1"}, "listen")):
            with self.assertRaises(ConfigError) as caught:
                server_config(values)
            self.assertEqual(caught.exception.key, key)


class PluginConfigTests(unittest.SynchronousTestCase):
    """plugin, plugin_opts and plugin_args on both ends."""

    def test_server_plugin(self):
        """With a plugin, ssx listens on a loopback port the OS picks; the plugin gets server:server_port."""
        config = server_config({
            "server": "0.0.0.0", "server_port": "8443", "plugin": "obfs-server", "plugin_opts": "obfs=http",
            "plugin_args": ["-v"],
        })
        self.assertEqual(config.plugin, Plugin("obfs-server", "obfs=http", ("-v",)))
        self.assertEqual(config.listen, ("tcp:0:interface=127.0.0.1",))
        self.assertEqual((config.hosts, config.port), (("0.0.0.0",), 8443))

    def test_local_plugin(self):
        """The local end keeps -s/-p for the plugin (and UDP); a plugin with --server-endpoint is refused."""
        config = local_config({"server": "192.0.2.1", "password": "pw", "plugin": "v2ray-plugin"})
        self.assertEqual(config.plugin, Plugin("v2ray-plugin"))
        self.assertEqual((config.server, config.server_port), ("192.0.2.1", 8388))
        with self.assertRaises(ConfigError) as caught:
            local_config({"server_endpoint": "tcp:host=192.0.2.1:port=1", "password": "pw", "plugin": "obfs-local"})
        self.assertEqual(caught.exception.key, "plugin")

    def test_empty_plugin_is_none(self):
        """"plugin": "" (common in libev files) means no plugin; stray options only warn."""
        self.assertIsNone(server_config({"plugin": ""}).plugin)
        config = server_config({"plugin_opts": "obfs=http"})
        self.assertIsNone(config.plugin)
        self.assertEqual(len(config.warnings), 1)

    def test_udp_only_leaves_plugin_out(self):
        """In udp_only mode a plugin (TCP only) is not started, with a warning."""
        config = local_config({"server": "192.0.2.1", "password": "pw", "plugin": "obfs-local", "mode": "udp_only"})
        self.assertIsNone(config.plugin)
        self.assertIn("udp_only", config.warnings[0])

    def test_flags(self):
        """--plugin and --plugin-opts override the file's plugin and plugin_opts."""
        path = write_config(self, {"plugin": "obfs-local", "plugin_opts": "obfs=tls", "plugin_args": ["-v"]})
        options = local_tap.Options()
        options.parseOptions(["-c", path, "-s", "192.0.2.1", "-k", "pw", "--plugin", "true", "--plugin-opts", "obfs=http"])
        self.assertEqual(options.config.plugin, Plugin("true", "obfs=http", ("-v",)))

    def test_missing_plugin_one_line(self):
        """A plugin that is not on PATH stops start-up with one line naming plugin."""
        for options, argv in (
            (server_tap.Options(), ["--plugin", "no-such-plugin-ssx"]),
            (local_tap.Options(), ["-s", "192.0.2.1", "-k", "pw", "--plugin", "/nonexistent/obfs-local"]),
        ):
            with self.assertRaises(SystemExit) as caught:
                options.parseOptions(argv)
            message = str(caught.exception.code)
            self.assertNotIn("\n", message)
            self.assertIn("bad configuration: plugin: ", message)
            self.assertIn("not found", message)


class LocalConfigTests(unittest.SynchronousTestCase):
    """The local end's settings."""

    def test_defaults(self):
        """SOCKS5 on 127.0.0.1:1080, server port 8388."""
        config = local_config({"server": "192.0.2.1", "password": "pw"})
        self.assertEqual(config.listen, ("tcp:1080:interface=127.0.0.1",))
        self.assertEqual(config.server_port, 8388)
        self.assertIsNone(config.socks_credentials)

    def test_required(self):
        """A local end needs a server and a password."""
        for values, key in [({"password": "pw"}, "server"), ({"server": "192.0.2.1"}, "password")]:
            with self.assertRaises(ConfigError) as caught:
                local_config(values)
            self.assertEqual(caught.exception.key, key)

    def test_socks_credentials_together(self):
        """socks_user without socks_password is an error naming socks_password."""
        with self.assertRaises(ConfigError) as caught:
            local_config({"server": "192.0.2.1", "password": "pw", "socks_user": "alice"})
        self.assertEqual(caught.exception.key, "socks_password")

    def test_server_endpoint_replaces_server(self):
        """--server-endpoint alone is enough to reach the server."""
        config = local_config({"server_endpoint": "tcp:host=192.0.2.1:port=443", "password": "pw"})
        self.assertEqual(config.server_endpoint, "tcp:host=192.0.2.1:port=443")


class FileAndFlagTests(unittest.SynchronousTestCase):
    """config.json and flags together, through the twistd Options."""

    def test_flags_override_file(self):
        """A flag wins over the file; the file wins over the defaults."""
        path = write_config(self, {"server": "192.0.2.1", "server_port": 8000, "password": "file", "method": "aes-128-gcm", "local_port": 1081})
        options = local_tap.Options()
        options.parseOptions(["-c", path, "-k", "flag", "-l", "1090"])
        config = options.config
        self.assertEqual((config.server, config.server_port, config.password, config.method), ("192.0.2.1", 8000, "flag", "aes-128-gcm"))
        self.assertEqual(config.listen, ("tcp:1090:interface=127.0.0.1",))

    def test_listen_repeatable(self):
        """--listen can be given several times and replaces -s/-p."""
        options = server_tap.Options()
        options.parseOptions(["-k", "pw", "--listen", "tcp:0:interface=127.0.0.1", "--listen", "tcp:0:interface=\\:\\:1"])
        self.assertEqual(options.config.listen, ("tcp:0:interface=127.0.0.1", "tcp:0:interface=\\:\\:1"))

    def test_prefer_ipv6_flag(self):
        """-6 sets prefer_ipv6; without it the file's value stands."""
        path = write_config(self, {"prefer_ipv6": True})
        options = server_tap.Options()
        options.parseOptions(["-c", path])
        self.assertTrue(options.config.prefer_ipv6)
        options = server_tap.Options()
        options.parseOptions(["-6"])
        self.assertTrue(options.config.prefer_ipv6)

    def test_errors_are_one_line(self):
        """Bad files and values stop with one line naming the key, not a traceback or the usage text."""
        cases = [
            (["-c", "/nonexistent/config.json"], "config"),
            (["-c", write_config(self, "{not json")], "config"),
            (["-c", write_config(self, [1, 2])], "config"),
            (["-m", "nope"], "method"),
            (["-p", "99999"], "server_port"),
            (["--listen", "bogus:1234"], "listen"),
        ]
        for argv, key in cases:
            options = server_tap.Options()
            with self.assertRaises(SystemExit) as caught:
                options.parseOptions(argv)
            message = str(caught.exception.code)
            self.assertNotIn("\n", message)
            self.assertTrue(message.startswith(f"ssx-server: bad configuration: {key}:"), message)

    def test_read_config_file(self):
        """read_config_file gives the JSON object."""
        path = write_config(self, {"server": "x"})
        self.assertEqual(read_config_file(path), {"server": "x"})

    def test_merge_ignores_unset_flags(self):
        """Flags left at None do not override the file."""
        self.assertEqual(merge({"a": 1, "b": 2}, {"a": None, "b": 3}), {"a": 1, "b": 3})


class UdpAndTunnelOptionTests(unittest.SynchronousTestCase):
    """-u, -U, -L and --tunnel as libev users write them."""

    def test_libev_flags_accepted(self):
        """--no-delay from libev command lines is accepted (and changes nothing); --fast-open sets fast_open."""
        options = server_tap.Options()
        options.parseOptions(["-k", "pw", "--fast-open", "--no-delay"])
        plain = server_tap.Options()
        plain.parseOptions(["-k", "pw"])
        self.assertTrue(options.config.fast_open)
        self.assertFalse(plain.config.fast_open)
        ports = tuple(dataclasses.replace(port, fast_open=False) for port in options.config.ports)
        self.assertEqual(dataclasses.replace(options.config, fast_open=False, ports=ports), plain.config)

    def test_fast_open_flag_and_key(self):
        """Both ends: --fast-open or "fast_open": true turns it on; without the flag the file's value stands."""
        for tap, args in ((server_tap, ["-k", "pw"]), (local_tap, ["-s", "192.0.2.1", "-k", "pw"])):
            options = tap.Options()
            options.parseOptions([*args, "--fast-open"])
            self.assertTrue(options.config.fast_open)
            path = self.mktemp()
            with open(path, "w") as f:
                json.dump({"fast_open": True}, f)
            options = tap.Options()
            options.parseOptions([*args, "-c", path])
            self.assertTrue(options.config.fast_open)
            options = tap.Options()
            options.parseOptions(args)
            self.assertFalse(options.config.fast_open)

    def test_bad_fast_open(self):
        """A fast_open that is not true or false stops start-up naming the key."""
        with self.assertRaises(ConfigError) as raised:
            server_config({"fast_open": "yes"})
        self.assertEqual(raised.exception.key, "fast_open")
        with self.assertRaises(ConfigError) as raised:
            local_config({"server": "192.0.2.1", "password": "pw", "fast_open": 1})
        self.assertEqual(raised.exception.key, "fast_open")

    def test_flags_set_mode(self):
        """-u relays TCP and UDP, -U UDP only; without them the file's mode stands."""
        options = server_tap.Options()
        options.parseOptions(["-k", "pw", "-u"])
        self.assertEqual((options.config.relays.tcp, options.config.relays.udp), (True, True))
        options = server_tap.Options()
        options.parseOptions(["-k", "pw", "-U"])
        self.assertEqual((options.config.relays.tcp, options.config.relays.udp), (False, True))
        path = write_config(self, {"mode": "tcp_and_udp"})
        options = server_tap.Options()
        options.parseOptions(["-c", path])
        self.assertTrue(options.config.relays.udp)

    def test_tunnel_address(self):
        """-L HOST:PORT makes the main listener a tunnel to HOST:PORT instead of SOCKS5."""
        options = local_tap.Options()
        options.parseOptions(["-s", "192.0.2.1", "-k", "pw", "-L", "8.8.8.8:53", "-l", "5353", "-u"])
        config = options.config
        self.assertEqual(config.listen, ())
        [tunnel] = config.tunnels
        self.assertEqual((tunnel.listen, tunnel.target.host, tunnel.target.port), ("tcp:5353:interface=127.0.0.1", "8.8.8.8", 53))
        self.assertTrue(config.relays.udp)

    def test_several_tunnels(self):
        """--tunnel is repeatable beside the SOCKS5 listener, with IPv6 and explicit bind addresses."""
        options = local_tap.Options()
        options.parseOptions(["-s", "192.0.2.1", "-k", "pw", "--tunnel", "5353=8.8.8.8:53",
                              "--tunnel", "[::1]:2222=[2001:db8::22]:22", "--tunnel", "127.0.0.2:8080=example.org:80"])
        config = options.config
        self.assertEqual(config.listen, ("tcp:1080:interface=127.0.0.1",))
        self.assertEqual(
            [(t.listen, t.target.host, t.target.port) for t in config.tunnels],
            [("tcp:5353:interface=127.0.0.1", "8.8.8.8", 53), ("tcp:2222:interface=\\:\\:1", "2001:db8::22", 22),
             ("tcp:8080:interface=127.0.0.2", "example.org", 80)],
        )

    def test_bad_tunnels(self):
        """Malformed tunnel specs name their key."""
        for values, key in [({"tunnel_address": "8.8.8.8"}, "tunnel_address"), ({"tunnels": ["5353"]}, "tunnels"),
                            ({"tunnels": ["x=8.8.8.8:53"]}, "tunnels"), ({"tunnels": ["53=8.8.8.8:0"]}, "tunnels"),
                            ({"tunnels": "53=h:1", "mode": "udp_only", "server_endpoint": "tcp:host=h:port=1"}, "server")]:
            values = {"password": "pw", "server": "192.0.2.1", **values}
            if key == "server":
                values.pop("server")
            with self.assertRaises(ConfigError, msg=str(values)) as caught:
                local_config(values)
            self.assertEqual(caught.exception.key, key)


class ServerListTests(unittest.SynchronousTestCase):
    """Several servers: -s/-p, a rust-style servers list, ss:// URLs."""

    def test_all_sources_in_order(self):
        """-s/-p comes first, then the servers list (rust keys and aliases, disabled dropped), then the URLs."""
        path = write_config(self, {
            "server": "192.0.2.1", "password": "top", "method": "aes-128-gcm",
            "servers": [
                {"address": "192.0.2.2", "port": 8389, "password": "two", "method": "aes-256-gcm", "name": "second"},
                {"server": "192.0.2.3", "server_port": 8390, "password": "three", "method": "aes-256-gcm", "disabled": True},
                {"server": "192.0.2.4", "server_port": "8391", "password": "four", "method": "CHACHA20-IETF-POLY1305",
                 "remarks": "fourth", "id": "x", "timeout": 5},
            ],
        })
        options = local_tap.Options()
        options.parseOptions(["-c", path, "--url", "ss://YWVzLTEyOC1nY206dGVzdA@192.0.2.5:8888#Example1",
                              "--url", "ss://YmYtY2ZiOnRlc3Q@[2001:db8::6]:8888"])
        servers = options.config.servers
        self.assertEqual(
            [(s.host, s.port, s.method, s.password, s.name) for s in servers],
            [("192.0.2.1", 8388, "aes-128-gcm", "top", ""), ("192.0.2.2", 8389, "aes-256-gcm", "two", "second"),
             ("192.0.2.4", 8391, "chacha20-ietf-poly1305", "four", "fourth"),
             ("192.0.2.5", 8888, "aes-128-gcm", "test", "Example1"), ("2001:db8::6", 8888, "bf-cfb", "test", "")],
        )

    def test_urls_alone(self):
        """URLs alone are enough: no -s, no top-level password; a server list in the file becomes several servers."""
        config = local_config({"url": "ss://YWVzLTEyOC1nY206dGVzdA@192.0.2.5:8888"})
        self.assertEqual(len(config.servers), 1)
        config = local_config({"server": ["192.0.2.1", "192.0.2.2"], "password": "pw"})
        self.assertEqual([s.host for s in config.servers], ["192.0.2.1", "192.0.2.2"])

    def test_bad_entries_name_their_key(self):
        """A bad servers entry or URL is an error naming exactly where it is."""
        cases = [
            ({"servers": [{"server": "h", "server_port": 1, "password": "p", "method": "aes-128-gcm"}, {"server": "h", "server_port": 1, "password": "p"}]}, "servers[1].method"),
            ({"servers": [{"server": "h", "server_port": 1, "password": "p", "method": "rot13"}]}, "servers[0].method"),
            ({"servers": [{"server": "h", "server_port": 70000, "password": "p", "method": "aes-128-gcm"}]}, "servers[0].server_port"),
            ({"servers": [{"server_port": 1, "password": "p", "method": "aes-128-gcm"}]}, "servers[0].server"),
            ({"servers": [{"server": "h", "server_port": 1, "method": "aes-128-gcm"}]}, "servers[0].password"),
            # The top-level plugin belongs to -s or a lone server: with several others it is ambiguous.
            ({"plugin": "obfs-local", "servers": [{"server": "h", "server_port": 1, "password": "p", "method": "aes-128-gcm"},
                                                   {"server": "i", "server_port": 1, "password": "p", "method": "aes-128-gcm"}]}, "plugin"),
            # A servers entry's plugin options are checked like the top-level ones.
            ({"servers": [{"server": "h", "server_port": 1, "password": "p", "method": "aes-128-gcm", "plugin": "x", "plugin_opts": "a;;"},
                          {"server": "i", "server_port": 1, "password": "p", "method": "aes-128-gcm"}]}, "plugin_opts"),
            ({"servers": {"server": "h"}}, "servers"),
            ({"url": "ss://nonsense"}, "url"),
            ({"url": "ss://" + "cm90MTM6eA" + "@h:1"}, "url"),  # rot13:x
            ({"url": "ss://YWVzLTEyOC1nY206dGVzdA@h:1", "mode": "tcp_and_udp", "servers": []}, None),
            ({"online_config": "https://example.org/x", "mode": "tcp_and_udp"}, "server"),
            ({"url": "ss://YWVzLTEyOC1nY206dGVzdA@h:1", "health_check_interval": -1}, "health_check_interval"),
            ({"url": "ss://YWVzLTEyOC1nY206dGVzdA@h:1", "health_check_url": "https://example.org/"}, "health_check_url"),
        ]
        for values, key in cases:
            if key is None:
                local_config(values)
                continue
            values = {**values}
            with self.assertRaises(ConfigError, msg=str(values)) as caught:
                local_config(values)
            self.assertEqual(caught.exception.key, key, values)

    def test_health_check_request(self):
        """The health check URL becomes the target address and a GET request for its path."""
        config = local_config({"url": "ss://YWVzLTEyOC1nY206dGVzdA@h:1", "health_check_url": "http://[::1]:8080/ok?x=1",
                               "health_check_interval": "5"})
        check = config.health_check
        self.assertEqual((check.interval, check.target.host, check.target.port), (5.0, "::1", 8080))
        self.assertTrue(check.request.startswith(b"GET /ok?x=1 HTTP/1.1\r\nHost: [::1]:8080\r\n"))
        self.assertTrue(check.request.endswith(b"\r\n\r\n"))


class SingleServerPluginTests(unittest.SynchronousTestCase):
    """A lone server's URL or entry may name its plugin (SIP002 ?plugin=)."""

    def test_url_plugin_used(self):
        """The plugin and options of a single --url become the local end's plugin."""
        config = local_config({"url": "ss://YWVzLTEyOC1nY206dGVzdA@h:1/?plugin=obfs-local%3Bobfs%3Dhttp"})
        self.assertEqual((config.plugin.name, config.plugin.options), ("obfs-local", "obfs=http"))


class PerServerPluginTests(unittest.SynchronousTestCase):
    """In a list of several servers, each server has its own plugin or none."""

    def test_each_server_its_own(self):
        """Servers entries and URLs name their own plugins; -s takes the top-level one; others have none."""
        entry = {"server_port": 1, "password": "p", "method": "aes-128-gcm"}
        config = local_config({
            "server": "192.0.2.1", "password": "pw", "plugin": "v2ray-plugin",
            "servers": [{**entry, "server": "h", "plugin": "obfs-local", "plugin_opts": "obfs=tls"}, {**entry, "server": "i"}],
            "url": ["ss://YWVzLTEyOC1nY206dGVzdA@j:1/?plugin=obfs-local%3Bobfs%3Dhttp"],
        })
        self.assertEqual(
            [(e.host, p) for e, p in zip(config.servers, config.plugins)],
            [("192.0.2.1", Plugin("v2ray-plugin")), ("h", Plugin("obfs-local", "obfs=tls")), ("i", None),
             ("j", Plugin("obfs-local", "obfs=http"))],
        )

    def test_online_config_beside_plugin(self):
        """A plugin for -s no longer stops start-up when an online config adds servers."""
        config = local_config({"server": "192.0.2.1", "password": "pw", "plugin": "obfs-local",
                               "online_config": "https://example.org/x"})
        self.assertEqual(config.plugins, (Plugin("obfs-local"),))

    def test_missing_plugin_names_its_server(self):
        """A later server's missing plugin stops start-up with one line naming plugin and that server."""
        entry = {"server_port": 1, "password": "p", "method": "aes-128-gcm"}
        path = write_config(self, {"servers": [{**entry, "server": "192.0.2.1"},
                                               {**entry, "server": "192.0.2.2", "plugin": "no-such-plugin-ssx"}]})
        with self.assertRaises(SystemExit) as caught:
            local_tap.Options().parseOptions(["-c", path])
        message = str(caught.exception.code)
        self.assertNotIn("\n", message)
        self.assertIn("bad configuration: plugin: server 192.0.2.2:1: 'no-such-plugin-ssx' not found", message)


# Text that str.isdigit() (or float()) accepts but that is not a plain ASCII
# number, and values out of any range: each must be a ConfigError naming
# the key, never a traceback.
_NOT_NUMBERS = ["²", "٣", "1²", "８３８８", " 1", "1 ", "1_000", "0x10", "", "9" * 25, True, [1], "\n1"]
_NOT_WHOLE = ["1.5", "1e3", "-1", 1.0, float("nan")]
_NOT_SECONDS = ["nan", "inf", "-inf", "1e3", "Infinity", float("nan"), float("inf"), float("-inf"), 1e300, "-1"]

_URL = "ss://YWVzLTEyOC1nY206dGVzdA@192.0.2.5:8388"

# Every numeric key: (end, key, a good value and what it becomes, whole number or seconds).
_SERVER_NUMBERS = [
    ("server_port", "8389", 8389, True),
    ("timeout", "2.5", 2.5, False),
    ("handshake_timeout", "7", 7.0, False),
    ("max_connections", "12", 12, True),
    ("shutdown_grace", "0", 0.0, False),
    ("udp_timeout", 30, 30.0, False),
    ("udp_max_associations", "64", 64, True),
    ("replay_history", "1000", 1000, True),
]
_LOCAL_NUMBERS = [
    ("server_port", "8389", 8389, True),
    ("local_port", "1081", 1081, True),
    ("online_config_interval", "600", 600.0, False),
    ("health_check_interval", ".5", 0.5, False),
]


def _server_value(config, key):
    return {
        "server_port": lambda c: c.port, "timeout": lambda c: c.timeout,
        "handshake_timeout": lambda c: c.limits.handshake_timeout, "max_connections": lambda c: c.limits.max_connections,
        "shutdown_grace": lambda c: c.limits.shutdown_grace, "udp_timeout": lambda c: c.relays.timeout,
        "udp_max_associations": lambda c: c.relays.capacity, "replay_history": lambda c: c.replay_history,
    }[key](config)


def _local(values):
    base = {"server": "192.0.2.1", "password": "pw", "online_config": "https://example.org/list"}
    return local_config({**base, **values})


class NumberParsingTests(unittest.SynchronousTestCase):
    """Every number a user configures goes through one parser of ASCII digits with a sane length and range."""

    def assertKey(self, build, values, key):
        with self.assertRaises(ConfigError, msg=repr(values)) as caught:
            build(values)
        self.assertEqual(caught.exception.key, key, values)
        self.assertNotIn("\n", str(caught.exception))

    def test_server_keys(self):
        """Each numeric server key takes ASCII digits (a decimal point for seconds) and refuses '²', NaN, huge and the like."""
        for key, good, expected, whole in _SERVER_NUMBERS:
            config = server_config({"password": "pw", key: good})
            self.assertEqual(_server_value(config, key), expected, key)
            self.assertIsInstance(_server_value(config, key), int if whole else float)
            for bad in _NOT_NUMBERS + (_NOT_WHOLE if whole else _NOT_SECONDS):
                if key == "server_port" and bad == [1]:
                    continue  # a list of ports, the original's form (MultiPortConfigTests)
                self.assertKey(server_config, {"password": "pw", key: bad}, key)

    def test_local_keys(self):
        """Each numeric local key does the same."""
        for key, good, expected, whole in _LOCAL_NUMBERS:
            config = _local({key: good})
            got = {"server_port": config.server_port, "local_port": int(config.listen[0].split(":")[1]),
                   "online_config_interval": config.online.interval,
                   "health_check_interval": config.health_check.interval}[key]
            self.assertEqual(got, expected, key)
            for bad in _NOT_NUMBERS + (_NOT_WHOLE if whole else _NOT_SECONDS):
                self.assertKey(_local, {key: bad}, key)

    def test_numbers_inside_strings(self):
        """Ports inside tunnel specs, nameservers, servers entries, ss:// and http(s):// URLs refuse '²' the same way."""
        for bad in ("²", "٣", "99999", "0x1f", "8388²"):
            self.assertKey(_local, {"tunnels": [f"{bad}=8.8.8.8:53"]}, "tunnels")
            self.assertKey(_local, {"tunnels": [f"5353=8.8.8.8:{bad}"]}, "tunnels")
            self.assertKey(_local, {"tunnel_address": f"8.8.8.8:{bad}"}, "tunnel_address")
            self.assertKey(server_config, {"nameserver": f"1.1.1.1:{bad}"}, "nameserver")
            self.assertKey(server_config, {"nameserver": f"[2606:4700::1111]:{bad}"}, "nameserver")
            entry = {"server": "h", "server_port": bad, "password": "p", "method": "aes-128-gcm"}
            self.assertKey(_local, {"servers": [entry]}, "servers[0].server_port")
            self.assertKey(_local, {"url": f"ss://YWVzLTEyOC1nY206dGVzdA@192.0.2.5:{bad}"}, "url")
            self.assertKey(_local, {"online_config": f"https://example.org:{bad}/list"}, "online_config")
            self.assertKey(_local, {"health_check_url": f"http://[::1]:{bad}/"}, "health_check_url")
            self.assertKey(_local, {"health_check_url": f"http://example.org:{bad}/"}, "health_check_url")
        config = _local({"tunnels": ["5353=8.8.8.8:53"], "online_config": "https://[2001:db8::1]:8443/x",
                         "health_check_url": "http://example.org:8080/"})
        self.assertEqual((config.tunnels[0].address, config.tunnels[0].target.port), (("127.0.0.1", 5353), 53))
        self.assertEqual(config.health_check.target.port, 8080)
        self.assertEqual(server_config({"nameserver": "1.1.1.1:5353"}).nameservers, (("1.1.1.1", 5353),))

    def test_verbose(self):
        """verbose takes true/false or a level in ASCII digits ('-' for quiet); '²', '--1' and the like raise ConfigError naming verbose."""
        for build, base in ((server_config, {"password": "pw"}), (_local, {})):
            for value, expected in ((True, True), (False, False), (2, True), (0, False), (-1, False),
                                    ("1", True), ("0", False), ("-1", False), ("-0", False)):
                self.assertEqual(build({**base, "verbose": value}).verbose, expected, value)
            for bad in [b for b in _NOT_NUMBERS if b is not True] + ["--1", "-²", "-", "+1", "1.5", 1.0, "yes"]:
                self.assertKey(build, {**base, "verbose": bad}, "verbose")

    def test_url_port_message_keeps_secret(self):
        """A bad port in an ss:// or online-config URL is refused without quoting the URL (it carries a secret)."""
        for values in ({"url": "ss://YWVzLTEyOC1nY206c2VjcmV0@192.0.2.5:²"},
                       {"online_config": "https://example.org:²/secret-token"}):
            with self.assertRaises(ConfigError) as caught:
                _local(values)
            self.assertNotIn("secret", str(caught.exception))
            self.assertNotIn("²", str(caught.exception))

    def test_any_text_is_a_number_or_config_error(self):
        """Whatever text a flag holds, every numeric key either takes it or raises ConfigError naming the key."""
        from hypothesis import given, settings, strategies as st

        keys = [(server_config, {"password": "pw"}, key) for key, *_ in _SERVER_NUMBERS]
        keys += [(_local, {}, key) for key, *_ in _LOCAL_NUMBERS]
        keys += [(server_config, {"password": "pw"}, "verbose"), (_local, {}, "verbose")]

        @settings(max_examples=200, deadline=None, database=None)
        @given(text=st.one_of(st.text(max_size=30), st.from_regex(r"\A[0-9.+\-²٣]{1,25}\Z")))
        def check(text):
            for build, base, key in keys:
                try:
                    build({**base, key: text})
                except ConfigError as e:
                    self.assertEqual(e.key, key)

        check()

    def test_flags_one_line(self):
        """Every numeric flag of both commands, given '²', stops with one line naming its key (no traceback)."""
        server_flags = {"-p": "server_port", "-t": "timeout", "--handshake-timeout": "handshake_timeout",
                        "--max-connections": "max_connections", "--shutdown-grace": "shutdown_grace",
                        "--udp-timeout": "udp_timeout", "--udp-max-associations": "udp_max_associations",
                        "--replay-history": "replay_history"}
        local_flags = {**server_flags, "-l": "local_port", "--online-config-interval": "online_config_interval",
                       "--health-check-interval": "health_check_interval"}
        del local_flags["--replay-history"]
        for command, options, flags, base in (
            ("ssx-server", server_tap.Options, server_flags, ["-k", "pw"]),
            ("ssx-local", local_tap.Options, local_flags, ["-s", "192.0.2.1", "-k", "pw"]),
        ):
            for flag, key in flags.items():
                with self.assertRaises(SystemExit, msg=flag) as caught:
                    options().parseOptions([*base, flag, "²"])
                message = str(caught.exception.code)
                self.assertTrue(message.startswith(f"{command}: bad configuration: {key}: expected "), message)
                self.assertTrue(message.endswith(", not '²'"), message)
                self.assertNotIn("\n", message)

    def test_config_file_numbers(self):
        """config.json's NaN, Infinity, 1e999, a 5000-digit number and a verbose of '²' stop start-up naming the key (or the file)."""
        for text, key in (('{"timeout": NaN}', "timeout"), ('{"udp_timeout": Infinity}', "udp_timeout"),
                          ('{"shutdown_grace": 1e999}', "shutdown_grace"), ('{"server_port": 8388.0}', "server_port"),
                          ('{"max_connections": ' + "9" * 5000 + "}", "config"),
                          ('{"replay_history": ' + "9" * 300 + "}", "replay_history"),
                          ('{"verbose": "²"}', "verbose"), ('{"verbose": "--1"}', "verbose")):
            options = server_tap.Options()
            with self.assertRaises(SystemExit) as caught:
                options.parseOptions(["-c", write_config(self, text), "-k", "pw"])
            message = str(caught.exception.code)
            self.assertTrue(message.startswith(f"ssx-server: bad configuration: {key}: "), message)
            self.assertLess(len(message), 300, message)


class UnusedKeyWarningTests(unittest.SynchronousTestCase):
    """Keys a command does not use are one warning line naming them."""

    def test_unused_keys_warned(self):
        """Both ends log one event at warning level naming every unused key."""
        from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
        from twisted.logger import LogLevel, formatEvent, globalLogPublisher

        for build, tap, values in (
            (server_config, server_tap, {"password": "pw", "colour": 4, "flavour": 1}),
            (local_config, local_tap, {"server": "192.0.2.1", "password": "pw", "colour": 4, "flavour": 1}),
        ):
            log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
            tap.build_service(MemoryReactorClock(), build(values))
            named = [e for e in log if "config keys not used" in formatEvent(e)]
            self.assertEqual(len(named), 1, [formatEvent(e) for e in log])
            self.assertEqual(named[0]["log_level"], LogLevel.warn)
            self.assertIn("colour, flavour", formatEvent(named[0]))


class UrlFileTests(unittest.SynchronousTestCase):
    """url_file: where ssx-server keeps its ss:// URL, and the generated password for later starts."""

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="ssx-url-")
        self.addCleanup(__import__("shutil").rmtree, self.directory)
        self.path = os.path.join(self.directory, "ssx-server.url")

    def save(self, url, mode=0o600):
        from ssx.safe_file import write_file

        write_file(self.path, (url + "\n").encode(), mode)

    def test_relative_to_rundir(self):
        """A relative url_file (ssx-server.url by default) lies in twistd's --rundir, made absolute at start."""
        config = reuse_generated_password(server_config({"password": "pw"}), self.directory)
        self.assertEqual(config.url_file, self.path)
        options = server_tap.Options()
        options.parseOptions(["-k", "pw", "--url-file", "x.url"])
        self.assertEqual(options.config.url_file, os.path.join(os.getcwd(), "x.url"))

    def test_missing_directory_one_line(self):
        """A url_file in a directory that does not exist stops start-up with one line naming url_file."""
        options = server_tap.Options()
        with self.assertRaises(SystemExit) as caught:
            options.parseOptions(["-k", "pw", "--url-file", os.path.join(self.directory, "no", "x.url")])
        self.assertEqual(
            str(caught.exception.code),
            f"ssx-server: bad configuration: url_file: {os.path.join(self.directory, 'no', 'x.url')}: no such directory",
        )

    def test_generated_password_reused(self):
        """Without a password, the one in the URL file of an earlier start (same method) is taken back."""
        self.save("ss://Y2hhY2hhMjAtaWV0Zi1wb2x5MTMwNTpzYXZlZC1zZWNyZXQ@vm:8388")
        config = reuse_generated_password(server_config({}), self.directory)
        self.assertEqual((config.password, config.password_generated, config.password_reused), ("saved-secret", True, True))
        self.assertEqual(config.warnings, ())
        options = server_tap.Options()
        options.parseOptions(["--url-file", self.path])
        self.assertEqual(options.config.password, "saved-secret")

    def test_configured_password_wins(self):
        """A configured password (or key) is used as it is; the file is not read."""
        self.save("ss://Y2hhY2hhMjAtaWV0Zi1wb2x5MTMwNTpzYXZlZC1zZWNyZXQ@vm:8388")
        config = reuse_generated_password(server_config({"password": "mine"}), self.directory)
        self.assertEqual((config.password, config.password_reused), ("mine", False))

    def test_untrusted_files_not_reused(self):
        """A URL file open to others, a link, another method's or a garbled one gives a fresh password and a warning naming the file."""
        url = "ss://Y2hhY2hhMjAtaWV0Zi1wb2x5MTMwNTpzYXZlZC1zZWNyZXQ@vm:8388"
        other = os.path.join(self.directory, "elsewhere")
        cases = [
            lambda: self.save(url, 0o644),
            lambda: (self.save(url), os.rename(self.path, other), os.symlink(other, self.path)),
            lambda: self.save("ss://YWVzLTEyOC1nY206c2F2ZWQtc2VjcmV0@vm:8388"),  # aes-128-gcm
            lambda: self.save("not a URL"),
            lambda: os.mkdir(self.path),
        ]
        for prepare in cases:
            for name in os.listdir(self.directory):
                target = os.path.join(self.directory, name)
                (os.rmdir if os.path.isdir(target) and not os.path.islink(target) else os.unlink)(target)
            prepare()
            config = reuse_generated_password(server_config({}), self.directory)
            self.assertNotEqual(config.password, "saved-secret")
            self.assertFalse(config.password_reused)
            self.assertEqual(len(config.warnings), 1, config.warnings)
            self.assertIn(self.path, config.warnings[0])
            self.assertNotIn("saved-secret", config.warnings[0])

    @skipUnless(os.geteuid() == 0, "chown to another user needs root")
    def test_another_users_file_not_reused_by_root(self):
        """Run as root, a private URL file owned by another user is not used: a fresh password and a warning naming the file."""
        self.save("ss://Y2hhY2hhMjAtaWV0Zi1wb2x5MTMwNTpzYXZlZC1zZWNyZXQ@vm:8388")
        os.chown(self.path, 65534, 65534)
        options = server_tap.Options()
        options.parseOptions(["--url-file", self.path])
        for config in (server_tap.reuse_generated_password(server_config({}), self.directory), options.config):
            self.assertNotEqual(config.password, "saved-secret")
            self.assertEqual((config.password_generated, config.password_reused), (True, False))
            [warning] = config.warnings
            self.assertIn(self.path, warning)
            self.assertIn("owned by another", warning)
            self.assertNotIn("saved-secret", warning)

    @skipUnless(os.geteuid() == 0, "chown to another user needs root")
    def test_file_of_the_uid_twistd_switches_to(self):
        """With twistd's --uid, the URL file that user wrote at an earlier start is used; one of a third user is not."""
        self.save("ss://Y2hhY2hhMjAtaWV0Zi1wb2x5MTMwNTpzYXZlZC1zZWNyZXQ@vm:8388")
        os.chown(self.path, 65534, 65534)
        twistd = ServerOptions()
        twistd.parseOptions(["--uid", "65534", "--rundir", self.directory, "ssx-server"])
        config = twistd.subOptions.config
        self.assertEqual((config.url_file, config.password, config.password_reused), (self.path, "saved-secret", True))
        os.chown(self.path, 65533, 65533)
        config = server_tap.reuse_generated_password(server_config({}), self.directory, uid=65534)
        self.assertNotEqual(config.password, "saved-secret")
        self.assertEqual(len(config.warnings), 1, config.warnings)

    def test_no_file_needs_a_password(self):
        """url_file '' turns the file off, which a generated password cannot do without (it would be known to nobody)."""
        self.assertIsNone(server_config({"password": "pw", "url_file": ""}).url_file)
        for values in ({"url_file": ""}, {"password": "pw", "url_file": 5}):
            with self.assertRaises(ConfigError) as caught:
                server_config(values)
            self.assertEqual(caught.exception.key, "url_file")
