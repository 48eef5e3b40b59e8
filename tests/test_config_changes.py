"""
What a reload applies: `ssx.config.changes` compares two checked
configurations of each end, without a reactor.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from ssx.config import local_config, server_config
from ssx.errors import ConfigError
import ssx.server.tap as server_tap
from ssx.config.changes import IN_PLACE, KEEP, RESTART, local_changes, port_update, server_changes

_METHOD = "aes-128-gcm"
_USER_METHOD = "2022-blake3-aes-128-gcm"
_PSK = "AAECAwQFBgcICQoLDA0ODw=="
_ALICE = "EBESExQVFhcYGRobHB0eHw=="
_BOB = "ICEiIyQlJicoKSorLC0uLw=="


def _server(**values: Any) -> Any:
    values.setdefault("server", "127.0.0.1")
    return server_config(values)


def _ports(*entries: dict[str, Any], **top: Any) -> Any:
    return _server(servers=[{"method": _METHOD, **entry} for entry in entries], **top)


def _local(**values: Any) -> Any:
    values = {"server": "127.0.0.1", "server_port": 8388, "password": "pw", "method": _METHOD, **values}
    return local_config(values)


class ServerChangesTests(SynchronousTestCase):
    def test_same_file_changes_nothing(self) -> None:
        """The same file read twice changes nothing: a reload then logs 'nothing changed'."""
        old = _ports({"server_port": 8001, "password": "a"}, {"server_port": 8002, "password": "b"})
        new = _ports({"server_port": 8001, "password": "a"}, {"server_port": 8002, "password": "b"})
        self.assertFalse(server_changes(old, new))

    def test_ports_added_and_removed_by_number(self) -> None:
        """A port only in the new file is added, one only in the old is removed, by number."""
        old = _ports({"server_port": 8001, "password": "a"}, {"server_port": 8002, "password": "b"})
        new = _ports({"server_port": 8001, "password": "a"}, {"server_port": 8003, "password": "c"})
        changes = server_changes(old, new)
        self.assertEqual([p.port for p in changes.added], [8003])
        self.assertEqual(changes.removed, (8002,))
        self.assertEqual(changes.changed, ())

    def test_changed_password_is_applied_in_place(self) -> None:
        """A port's new password changes it in place, named 'password' and never by its value."""
        old = _ports({"server_port": 8001, "password": "secret-one"})
        new = _ports({"server_port": 8001, "password": "secret-two"})
        changes = server_changes(old, new)
        self.assertEqual([p.port for p in changes.changed], [8001])
        update = port_update(old.ports[0], new.ports[0])
        self.assertEqual(update.action, IN_PLACE)
        self.assertEqual(update.changed, ("password",))
        self.assertNotIn("secret", repr(update) + repr(changes))

    def test_timeout_is_applied_in_place(self) -> None:
        """A port's idle timeout changes in place."""
        old = _ports({"server_port": 8001, "password": "a"})
        new = _ports({"server_port": 8001, "password": "a", "timeout": 60})
        self.assertEqual(port_update(old.ports[0], new.ports[0]).action, IN_PLACE)
        self.assertEqual(port_update(old.ports[0], new.ports[0]).changed, ("timeout",))

    def test_users_named_when_added_removed_or_rekeyed(self) -> None:
        """2022 users added, removed or given a new key are named by user, in place."""
        old = _ports({"server_port": 8001, "password": _PSK, "method": _USER_METHOD,
                      "users": {"alice": _ALICE, "bob": _BOB}})
        new = _ports({"server_port": 8001, "password": _PSK, "method": _USER_METHOD,
                      "users": {"alice": _BOB, "carol": _ALICE}})
        update = port_update(old.ports[0], new.ports[0])
        self.assertEqual(update.action, IN_PLACE)
        self.assertEqual(set(update.changed), {"user carol added", "user bob removed", "user alice key changed"})

    def test_address_plugin_mode_or_method_restarts_the_port(self) -> None:
        """A port whose listening address, mode or method changed is restarted, the changed fields named."""
        base = {"server_port": 8001, "password": "a"}
        old = _ports(base)
        for entry, named in (
            ({"server": "127.0.0.2"}, "server"),
            ({"mode": "tcp_and_udp"}, "mode"),
            ({"mode": "tcp_and_udp", "udp_timeout": 5}, "udp_timeout"),
            ({"method": "chacha20-ietf-poly1305"}, "method"),
        ):
            new = _ports({**base, **entry})
            update = port_update(old.ports[0], new.ports[0])
            self.assertEqual(update.action, RESTART, entry)
            self.assertIn(named, update.changed)

    def test_generated_password_is_kept(self) -> None:
        """A port without a configured password keeps the running one: two generated passwords are no change."""
        old = _server(server_port=8001)
        new = _server(server_port=8001)
        self.assertNotEqual(old.ports[0].password, new.ports[0].password)
        self.assertEqual(port_update(old.port_configs()[0], new.port_configs()[0]).action, KEEP)
        self.assertFalse(server_changes(old, new))

    def test_shared_settings_in_place(self) -> None:
        """Forbidden ranges, limits, handshake bounds and verbose are shared settings applied in place."""
        old = _ports({"server_port": 8001, "password": "a"})
        new = _ports({"server_port": 8001, "password": "a"}, forbidden_ip="10.0.0.0/8", max_connections=5,
                     shutdown_grace=3, max_handshakes=7, verbose=True)
        changes = server_changes(old, new)
        self.assertEqual(
            set(changes.settings),
            {"forbidden_ip", "max_connections", "shutdown_grace", "max_handshakes", "verbose"},
        )
        self.assertEqual(changes.fixed, ())

    def test_settings_only_a_restart_applies(self) -> None:
        """Nameservers, the replay history and the manager address are named as needing a restart."""
        old = _ports({"server_port": 8001, "password": "a"})
        new = _ports({"server_port": 8001, "password": "a"}, nameserver="127.0.0.1", replay_history=10,
                     manager_address="127.0.0.1:6001")
        self.assertEqual(set(server_changes(old, new).fixed), {"nameserver", "replay_history", "manager_address"})

    def test_metrics_workers_reuse_port_need_a_restart(self) -> None:
        """A changed metrics endpoint, worker count or reuse_port is named as waiting for a restart, as on the local end."""
        old = _ports({"server_port": 8001, "password": "a"}, metrics="9100")
        new = _ports({"server_port": 8001, "password": "a"}, metrics="9101", workers=2, reuse_port=True)
        self.assertEqual(set(server_changes(old, new).fixed), {"metrics", "workers", "reuse_port"})


class LocalChangesTests(SynchronousTestCase):
    def test_same_config_changes_nothing(self) -> None:
        """The same local config read twice changes nothing."""
        self.assertFalse(local_changes(_local(), _local()))

    def test_changed_server_is_removed_and_added(self) -> None:
        """A server whose port changed is the old one removed and the new one added."""
        changes = local_changes(_local(), _local(server_port=8389))
        self.assertEqual([e.port for e in changes.servers_removed], [8388])
        self.assertEqual([e.port for e in changes.servers_added], [8389])

    def test_tunnels_and_listeners(self) -> None:
        """Added tunnels and a changed listen port are listed by their listen description."""
        old = _local(local_port=1080, tunnels=["5353=127.0.0.1:53"])
        new = _local(local_port=1081, tunnels=["5353=127.0.0.1:53", "5354=127.0.0.1:54"])
        changes = local_changes(old, new)
        self.assertEqual(changes.listen_removed, ("tcp:1080:interface=127.0.0.1",))
        self.assertEqual(changes.listen_added, ("tcp:1081:interface=127.0.0.1",))
        self.assertEqual([str(t.target) for t in changes.tunnels_added], ["127.0.0.1:54"])
        self.assertEqual(changes.tunnels_removed, ())

    def test_settings_in_place_and_fixed(self) -> None:
        """Timeout and limits apply in place; the mode needs a restart."""
        changes = local_changes(_local(), _local(timeout=30, max_connections=9, mode="tcp_and_udp"))
        self.assertEqual(set(changes.settings), {"timeout", "max_connections"})
        self.assertEqual(changes.fixed, ("mode",))

    def test_transparent_ports_and_mark_need_a_restart(self) -> None:
        """Changed redir/tproxy ports and outbound_fwmark are named as waiting for a restart, nothing applied."""
        old = _local(redir="12345", tproxy="127.0.0.1:12346", outbound_fwmark=255)
        for new, fixed in (
            (_local(redir="12347", tproxy="127.0.0.1:12346", outbound_fwmark=255), ("redir/tproxy",)),
            (_local(redir="12345", outbound_fwmark=255), ("redir/tproxy",)),
            (_local(redir="12345", tproxy="127.0.0.1:12346", outbound_fwmark="0x100"), ("outbound_fwmark",)),
            (_local(redir="12345", tproxy="127.0.0.1:12346"), ("outbound_fwmark",)),
            (_local(), ("redir/tproxy", "outbound_fwmark")),
        ):
            changes = local_changes(old, new)
            self.assertEqual(set(changes.fixed), set(fixed))
            self.assertEqual((changes.settings, changes.listen_added, changes.listen_removed), ((), (), ()))

    def test_same_transparent_ports_change_nothing(self) -> None:
        """The same transparent ports and mark read again change nothing."""
        values = {"redir": "12345", "tproxy": ["127.0.0.1:12346"], "outbound_fwmark": "0xff", "mode": "tcp_and_udp"}
        self.assertFalse(local_changes(_local(**values), _local(**values)))
    def test_restart_only_parts_named(self) -> None:
        """A changed DNS server, transparent port, metrics endpoint, worker count or reuse_port is named as waiting for a restart."""
        old = _local(dns_listen="127.0.0.1:5353", dns_local="127.0.0.1:53", tproxy="12345", metrics="9100")
        new = _local(dns_listen="127.0.0.1:5353", dns_local="127.0.0.1:54", tproxy="12346", metrics="9101",
                     workers=2, reuse_port=True)
        self.assertEqual(set(local_changes(old, new).fixed), {"dns", "redir/tproxy", "metrics", "workers", "reuse_port"})


class ReloadReadTests(SynchronousTestCase):
    """`load_config`, which a reload calls: the file read again, the start's command line over it."""

    def test_command_line_stays_over_the_new_file(self) -> None:
        """A flag given at start still overrides the file after a reload; the file's other changes are read."""
        path = self.mktemp()
        with open(path, "w") as f:
            json.dump({"server": "127.0.0.1", "server_port": 8001, "password": "a", "method": _METHOD,
                       "timeout": 100, "url_file": ""}, f)
        options = server_tap.Options()
        options.parseOptions(["-c", path, "--timeout", "50"])
        self.assertEqual(options.config.timeout, 50)
        with open(path, "w") as f:
            json.dump({"server": "127.0.0.1", "server_port": 8002, "password": "a", "method": _METHOD,
                       "timeout": 200, "url_file": ""}, f)
        reloaded = options.load_config()
        self.assertEqual((reloaded.timeout, reloaded.port), (50, 8002))

    def test_bad_file_raises_the_start_up_error(self) -> None:
        """A file broken after start raises ConfigError, whose line is the start-up error's text."""
        path = self.mktemp()
        with open(path, "w") as f:
            json.dump({"server": "127.0.0.1", "password": "a", "method": _METHOD, "url_file": ""}, f)
        options = server_tap.Options()
        options.parseOptions(["-c", path])
        with open(path, "w") as f:
            json.dump({"server": "127.0.0.1", "password": "a", "method": "rot13", "url_file": ""}, f)
        with self.assertRaises(ConfigError) as raised:
            options.load_config()
        self.assertTrue(options.config_error(raised.exception).startswith("ssx-server: bad configuration: method: "))
