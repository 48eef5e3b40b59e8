"""
The ACL file format (`ssx.acl`): every section and rule form, comments,
bad lines, punycode, the precedence shadowsocks-rust applies, a large
generated file; `--acl` at each end's start-up, and the holder's reload.
"""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.trial import unittest

from ssx.acl import Acl, load_acl, parse_acl
from ssx.acl.names import REGEXES_PER_PATTERN
from ssx.errors import ConfigError
from ssx.local import tap as local_tap
from ssx.local.tap import Options as LocalOptions
from ssx.net.acl_holder import AclHolder
from ssx.server import tap as server_tap
from ssx.server.tap import Options as ServerOptions
from tests.support.acl_files import large_acl
from tests.support.logs import event_texts, log_events
from tests.support.peers import requires


class RuleFormTests(unittest.SynchronousTestCase):
    """Each kind of rule matches what it says and nothing more."""

    def test_addresses_and_networks(self) -> None:
        """IPv4/IPv6 addresses and CIDRs match their ranges, in either spelling of a mapped address."""
        acl = parse_acl("[bypass_list]\n10.0.0.0/8\n192.168.1.1\n2001:db8::/32\n::1\n172.16.0.5/12\n")
        for ip in ("10.0.0.0", "10.255.255.255", "192.168.1.1", "2001:db8::7", "::1", "::ffff:10.1.2.3", "172.31.0.1"):
            self.assertFalse(acl.proxies(ip), ip)
        for ip in ("11.0.0.0", "9.255.255.255", "192.168.1.2", "2001:db9::", "::2", "172.32.0.0"):
            self.assertTrue(acl.proxies(ip), ip)

    def test_exact_name(self) -> None:
        """`|name` matches that name only, in any case and with a trailing dot."""
        acl = parse_acl("[bypass_list]\n|example.com\n")
        self.assertFalse(acl.proxies("example.com"))
        self.assertFalse(acl.proxies("EXAMPLE.com."))
        self.assertTrue(acl.proxies("www.example.com"))
        self.assertTrue(acl.proxies("example.com.cn"))

    def test_name_and_subdomains(self) -> None:
        """`||name` matches the name and its subdomains, not a name that merely ends alike."""
        acl = parse_acl("[bypass_list]\n||example.com\n")
        self.assertFalse(acl.proxies("example.com"))
        self.assertFalse(acl.proxies("a.b.example.com"))
        self.assertTrue(acl.proxies("badexample.com"))
        self.assertTrue(acl.proxies("example.com.evil"))

    def test_regular_expressions(self) -> None:
        """Other lines are regexes searched in the name; the usual domain forms match as they read."""
        acl = parse_acl("[bypass_list]\n(^|\\.)example\\.com$\n^exact\\.org$\nads[0-9]+\\.\n(?:^|\\.)other\\.net$\n")
        self.assertEqual(acl.bypass.names.regex_count, 1)  # three were simple forms, kept in the sets
        for host in ("example.com", "x.example.com", "exact.org", "ads12.tracker.io", "a.other.net"):
            self.assertFalse(acl.proxies(host), host)
        for host in ("badexample.com", "x.exact.org", "ads.tracker.io", "other.network"):
            self.assertTrue(acl.proxies(host), host)

    def test_back_reference_compiled_alone(self) -> None:
        """A regex with a back-reference still matches (it cannot share an alternation's numbering)."""
        acl = parse_acl("[bypass_list]\n^(a+)-\\1\\.test$\nzzz\n")
        self.assertFalse(acl.proxies("aa-aa.test"))
        self.assertTrue(acl.proxies("aa-a.test"))
        self.assertFalse(acl.proxies("zzz.test"))

    def test_comments_and_blank_lines(self) -> None:
        """`#` starts a comment anywhere on a line; blank lines and indentation are ignored."""
        acl = parse_acl("# heading\n\n[bypass_list]   # the list\n   10.0.0.0/8   # private\n||a.test#x\n")
        self.assertFalse(acl.proxies("10.1.1.1"))
        self.assertFalse(acl.proxies("www.a.test"))
        self.assertEqual(len(acl.bypass), 2)


class PunycodeTests(unittest.SynchronousTestCase):
    """Names are matched in punycode, whichever form the rule and the name use."""

    def test_unicode_name_matches_punycode_rule(self) -> None:
        """A Unicode name is matched by the rule written in its xn-- form."""
        acl = parse_acl("[bypass_list]\n||xn--bcher-kva.example\n")
        self.assertFalse(acl.proxies("bücher.example"))
        self.assertFalse(acl.proxies("www.Bücher.example"))

    def test_punycode_name_matches_unicode_rule(self) -> None:
        """A `|` or `||` rule written in Unicode matches the name's punycode form."""
        acl = parse_acl("[bypass_list]\n||bücher.example\n|пример.испытание\n")
        self.assertFalse(acl.proxies("xn--bcher-kva.example"))
        self.assertFalse(acl.proxies("xn--e1afmkfd.xn--80akhbyknj4f"))
        self.assertTrue(acl.proxies("www.xn--e1afmkfd.xn--80akhbyknj4f"))

    def test_regex_over_punycode(self) -> None:
        """A regex sees the punycode of a Unicode name."""
        acl = parse_acl("[bypass_list]\n^xn--bcher-kva\\.\n")
        self.assertFalse(acl.proxies("bücher.example"))


class SectionTests(unittest.SynchronousTestCase):
    """Modes and lists, and which list wins."""

    def test_default_is_proxy_and_rules_before_a_header_bypass(self) -> None:
        """Without a mode everything is proxied; rules before any list header are the bypass list."""
        acl = parse_acl("10.0.0.0/8\n")
        self.assertTrue(acl.proxy_all)
        self.assertFalse(acl.proxies("10.0.0.1"))
        self.assertTrue(acl.proxies("11.0.0.1"))

    def test_bypass_all_with_proxy_list(self) -> None:
        """[bypass_all]: only [proxy_list] targets go through the proxy."""
        acl = parse_acl("[bypass_all]\n[proxy_list]\n||blocked.test\n203.0.113.0/24\n")
        self.assertTrue(acl.proxies("www.blocked.test"))
        self.assertTrue(acl.proxies("203.0.113.9"))
        self.assertFalse(acl.proxies("open.test"))
        self.assertFalse(acl.proxies("198.51.100.1"))

    def test_proxy_all_with_bypass_list(self) -> None:
        """[proxy_all]: everything but [bypass_list] goes through the proxy."""
        acl = parse_acl("[proxy_all]\n[bypass_list]\n||lan.test\n192.168.0.0/16\n")
        self.assertFalse(acl.proxies("nas.lan.test"))
        self.assertFalse(acl.proxies("192.168.3.4"))
        self.assertTrue(acl.proxies("example.com"))

    def test_name_in_both_lists_is_proxied(self) -> None:
        """A name both lists match goes through the proxy (rust: proxy_list first for names)."""
        acl = parse_acl("[bypass_list]\n||example.com\n[proxy_list]\n|www.example.com\n")
        self.assertTrue(acl.proxies("www.example.com"))
        self.assertFalse(acl.proxies("mail.example.com"))

    def test_address_in_both_lists_is_bypassed(self) -> None:
        """An address both lists match goes direct (rust and libev: bypass_list first for addresses)."""
        acl = parse_acl("[proxy_list]\n10.0.0.0/8\n[bypass_list]\n10.1.0.0/16\n")
        self.assertFalse(acl.proxies("10.1.2.3"))
        self.assertTrue(acl.proxies("10.2.2.3"))

    def test_name_rules_do_not_apply_to_addresses(self) -> None:
        """An IP literal is decided by the address rules only, never by a regex."""
        acl = parse_acl("[bypass_all]\n[proxy_list]\n\\.1$\n")
        self.assertFalse(acl.proxies("10.0.0.1"))

    def test_resolved_addresses(self) -> None:
        """With addresses (--acl-resolve), an unmatched name follows the list its mode looks at."""
        proxy_all = parse_acl("[proxy_all]\n[bypass_list]\n10.0.0.0/8\n||direct.test\n")
        self.assertTrue(proxy_all.resolving_decides("some.test"))
        self.assertFalse(proxy_all.resolving_decides("x.direct.test"))
        self.assertFalse(proxy_all.resolving_decides("10.0.0.1"))
        self.assertFalse(proxy_all.addresses_proxy(["203.0.113.1", "10.0.0.1"]))
        self.assertTrue(proxy_all.addresses_proxy(["203.0.113.1"]))
        bypass_all = parse_acl("[bypass_all]\n[proxy_list]\n203.0.113.0/24\n")
        self.assertTrue(bypass_all.addresses_proxy(["10.0.0.1", "203.0.113.1"]))
        self.assertFalse(bypass_all.addresses_proxy(["10.0.0.1"]))
        self.assertFalse(parse_acl("[bypass_all]\n[proxy_list]\n||x.test\n").resolving_decides("y.test"))

    def test_server_client_lists(self) -> None:
        """[accept_all] refuses only [black_list] clients; [reject_all] serves only [white_list] ones."""
        accept = parse_acl("[accept_all]\n[black_list]\n127.0.0.2\n[white_list]\n127.0.0.3\n")
        self.assertFalse(accept.client_allowed("127.0.0.2"))
        self.assertTrue(accept.client_allowed("127.0.0.1"))
        reject = parse_acl("[reject_all]\n[white_list]\n127.0.0.1\n")
        self.assertTrue(reject.client_allowed("127.0.0.1"))
        self.assertFalse(reject.client_allowed("127.0.0.2"))
        self.assertFalse(reject.client_allowed("::1"))

    def test_server_outbound_lists(self) -> None:
        """Outbound: block list first, then allow list, then the outbound mode; names, then every address."""
        acl = parse_acl("[outbound_block_list]\n||blocked.test\n10.0.0.0/8\n"
                        "[outbound_allow_list]\n|ok.blocked.test\n|fine.test\n10.1.0.0/16\n")
        self.assertFalse(acl.outbound_allowed("x.blocked.test"))
        self.assertFalse(acl.outbound_allowed("ok.blocked.test"))
        self.assertFalse(acl.outbound_allowed("10.1.0.1"))
        self.assertTrue(acl.outbound_allowed("11.0.0.1"))
        self.assertTrue(acl.outbound_allowed("other.test"))
        self.assertFalse(acl.outbound_addresses_allowed("other.test", ["11.0.0.1", "10.9.9.9"]))
        self.assertTrue(acl.outbound_addresses_allowed("other.test", ["11.0.0.1"]))
        # A name the allow list names is not checked again by its addresses.
        self.assertTrue(acl.outbound_addresses_allowed("fine.test", ["10.9.9.9"]))
        block_all = parse_acl("[outbound_block_all]\n[outbound_allow_list]\n||ok.test\n198.51.100.0/24\n")
        self.assertTrue(block_all.outbound_allowed("a.ok.test"))
        self.assertFalse(block_all.outbound_allowed("else.test"))
        self.assertTrue(block_all.outbound_allowed("198.51.100.7"))
        self.assertIsNone(block_all.outbound_name_allowed("else.test"))
        self.assertTrue(block_all.outbound_addresses_allowed("else.test", ["198.51.100.7"]))

    def test_aliases_share_lists(self) -> None:
        """[white_list] is [proxy_list] and [black_list] is [bypass_list], as in libev and rust."""
        acl = parse_acl("[reject_all]\n[white_list]\n||w.test\n[black_list]\n||b.test\n")
        self.assertFalse(acl.proxy_all)
        self.assertTrue(acl.proxies("w.test"))
        self.assertFalse(acl.proxies("b.test"))

    def test_mode_header_keeps_current_list(self) -> None:
        """A mode header does not change the list the next rules go to (libev, rust)."""
        acl = parse_acl("[proxy_list]\n[bypass_all]\n||p.test\n")
        self.assertTrue(acl.proxies("p.test"))


class BadLineTests(unittest.SynchronousTestCase):
    """A line that cannot be a rule stops start-up, naming the file and line."""

    def check(self, text: str, line: int, words: str) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_acl(text, "rules.acl")
        message = str(caught.exception)
        self.assertIn(f"rules.acl line {line}:", message)
        self.assertIn(words, message)
        self.assertEqual(caught.exception.key, "acl")
        self.assertNotIn("\n", message)

    def test_bad_lines(self) -> None:
        """Bad networks, names, regexes and sections are named by line."""
        self.check("# c\n10.0.0.0/33\n", 2, "bad address or network")
        self.check("[bypass_list]\n\n1.2.3.4.5\n", 3, "bad address")
        self.check("||exa mple.com\n", 1, "not a host name")
        self.check("|\n", 1, "not a host name")
        self.check("ok\\.test\n(unclosed\n", 2, "bad regular expression")
        self.check("[proxy-list]\n", 1, "unknown section [proxy-list]")
        self.check("a\nb\nbü[ch]er\n", 3, "non-ASCII regular expression")

    def test_bad_regex_found_among_many(self) -> None:
        """Among more regexes than one pattern holds, the bad one is still named."""
        lines = [f"^r{i}x[0-9]" for i in range(REGEXES_PER_PATTERN + 5)]
        lines[REGEXES_PER_PATTERN + 2] = "r(("
        self.check("\n".join(lines), REGEXES_PER_PATTERN + 3, "bad regular expression")

    def test_missing_file(self) -> None:
        """A file that cannot be read is one line naming it."""
        with self.assertRaises(ConfigError) as caught:
            load_acl(self.mktemp())
        self.assertIn("cannot read", str(caught.exception))


# Lines that look like rules, and anything at all.
_RULE_ALPHABET = "ab.|^$()[]{}*+?\\-_/:0123456789#\u00fc\u0430 "
_lines = st.one_of(
    st.text(_RULE_ALPHABET, max_size=30),
    st.sampled_from(["[proxy_list]", "[bypass_list]", "[bypass_all]", "[outbound_block_list]", "[reject_all]"]),
    st.text(max_size=20),
)
_settings = settings(max_examples=300, deadline=None, database=None)


class FuzzTests(unittest.SynchronousTestCase):
    """Whatever a file holds, parsing gives an Acl or one ConfigError; whatever is asked, an answer."""

    @_settings
    @given(st.lists(_lines, max_size=12))
    def test_parse_anything(self, lines: list[str]) -> None:
        """Any text parses into an Acl or raises ConfigError naming a line, nothing else."""
        try:
            acl = parse_acl("\n".join(lines), "fuzz.acl")
        except ConfigError as e:
            self.assertIn("fuzz.acl line ", str(e))
            return
        self.assertIsInstance(acl, Acl)

    @_settings
    @given(st.text(max_size=70))
    def test_decide_anything(self, host: str) -> None:
        """Any host string gets a decision from every question, never an exception."""
        acl = parse_acl("[bypass_list]\n||example.com\n10.0.0.0/8\n::/64\nab+c$\n"
                        "[outbound_block_list]\n|x.test\n[black_list]\n127.0.0.2\n")
        for answer in (acl.proxies(host), acl.outbound_allowed(host), acl.client_allowed(host),
                       acl.outbound_addresses_allowed(host, [host]), acl.resolving_decides(host)):
            self.assertIsInstance(answer, bool)


class LargeAclTests(unittest.SynchronousTestCase):
    """A file of real size loads and decides right (its speed is benchmarks/acl.py's)."""

    def test_large_file(self) -> None:
        """10,000 CIDRs, 5,000 regexes and 3,000 || names: each kind of rule hits, and misses miss."""
        text, samples = large_acl(cidrs=10_000, regexes=5_000, names=3_000, seed=7)
        acl = parse_acl(text, "large.acl")
        self.assertIsInstance(acl, Acl)
        for host in samples.proxied:
            self.assertTrue(acl.proxies(host), host)
        for host in samples.bypassed:
            self.assertFalse(acl.proxies(host), host)
        self.assertGreater(len(samples.proxied), 100)
        self.assertGreater(len(samples.bypassed), 100)


class StartUpTests(unittest.SynchronousTestCase):
    """--acl on the command line of each end: a bad file stops start-up with one line; a good one is held."""

    def acl_file(self, text: str) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_bad_line_stops_start_up(self) -> None:
        """ssx-server and ssx-local: one line naming the key, the file and the line."""
        path = self.acl_file("[proxy_list]\n10.0.0.0/8\n999.1.1.1/8\n")
        for options, argv in ((ServerOptions(), ["-k", "pw"]), (LocalOptions(), ["-s", "127.0.0.1", "-k", "pw"])):
            with self.assertRaises(SystemExit) as caught:
                options.parseOptions([*argv, "--acl", path])
            message = str(caught.exception)
            self.assertIn(f"bad configuration: acl: {path} line 3: bad address or network", message)
            self.assertNotIn("\n", message)

    def test_server_holds_acl(self) -> None:
        """ssx-server with --acl: every port's factory reads the one holder (a reload puts new rules in it)."""
        options = ServerOptions()
        options.parseOptions(["-k", "pw", "--acl", self.acl_file("[black_list]\n127.0.0.2\n"), "--forbidden-ip="])
        service = server_tap.build_service(reactor, options.config)
        self.assertIsNotNone(service.acl)
        self.assertIs(service.factory.acl, service.acl)
        assert service.acl is not None and service.acl.acl is not None
        self.assertFalse(service.acl.acl.client_allowed("127.0.0.2"))

    @requires("obfs-server", package="simple-obfs")
    def test_plugin_port_warns_about_client_lists(self) -> None:
        """Client lists on a port behind a plugin: a warning at start (clients all come from the plugin)."""
        events = log_events(self)
        options = ServerOptions()
        options.parseOptions(["-k", "pw", "--acl", self.acl_file("[black_list]\n127.0.0.2\n"),
                              "--plugin", "obfs-server", "--plugin-opts", "obfs=http"])
        server_tap.build_service(reactor, options.config)
        self.assertTrue(any("the ACL's client lists judge that address" in text for text in event_texts(events)))

    def test_local_holds_acl(self) -> None:
        """ssx-local with --acl and --acl-resolve: the factories share one router; acl_resolve alone warns."""
        options = LocalOptions()
        options.parseOptions(["-s", "127.0.0.1", "-k", "pw", "--acl", self.acl_file("[bypass_all]\n"), "--acl-resolve"])
        self.assertTrue(options.config.acl_resolve)
        service = local_tap.build_service(reactor, options.config)
        self.assertIsNotNone(service.router)
        self.assertIs(service.factory.router, service.router)
        assert service.router is not None
        self.assertTrue(service.router.resolve)
        alone = LocalOptions()
        alone.parseOptions(["-s", "127.0.0.1", "-k", "pw", "--acl-resolve"])
        self.assertIn("acl_resolve without acl: no ACL to resolve names for; ignored", alone.config.warnings)


class HolderTests(unittest.SynchronousTestCase):
    """The holder swaps in a reread file, and keeps the old rules when the new file is bad."""

    def test_reload(self) -> None:
        """reload() takes a changed file; a broken one leaves the previous rules in use."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[bypass_list]\n10.0.0.0/8\n")
        holder = AclHolder(path)
        assert holder.acl is not None
        self.assertFalse(holder.acl.proxies("10.0.0.1"))
        with open(path, "w") as f:
            f.write("[bypass_list]\n11.0.0.0/8\n")
        self.assertTrue(holder.reload())
        self.assertTrue(holder.acl.proxies("10.0.0.1"))
        self.assertFalse(holder.acl.proxies("11.0.0.1"))
        with open(path, "w") as f:
            f.write("[bypass_list]\n11.0.0.0/99\n")
        kept = holder.acl
        self.assertFalse(holder.reload())
        self.assertIs(holder.acl, kept)
        self.assertEqual(holder.reload_failures, 1)
        os.remove(path)
        self.assertFalse(holder.reload())
        self.assertIs(holder.acl, kept)
