"""The salt filter of the stream and AEAD-2017 editions."""

from __future__ import annotations

import inspect
import os
import tracemalloc

from twisted.trial import unittest

from ssx.crypto import SaltFilter


def _held_by_filter() -> int:
    """Bytes allocated by the salt filter's module and still held (tracemalloc must be tracing)."""
    source = inspect.getsourcefile(SaltFilter)
    assert source is not None
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, source)])
    return sum(stat.size for stat in snapshot.statistics("filename"))


class SaltFilterTests(unittest.SynchronousTestCase):
    """Ping-pong Bloom filters: exact enough, bounded, rotating."""

    def test_replay_detected(self):
        """A salt seen before is refused; a new one is accepted once."""
        f = SaltFilter(1000)
        salt = os.urandom(32)
        self.assertTrue(f.check_and_add(salt))
        self.assertFalse(f.check_and_add(salt))
        self.assertEqual(f.replays, 1)

    def test_history_kept_then_forgotten(self):
        """The last capacity/2 salts are always remembered; far older ones are eventually forgotten."""
        f = SaltFilter(1000)
        salts = [os.urandom(16) for _ in range(3000)]
        for salt in salts:
            self.assertTrue(f.check_and_add(salt))
        self.assertTrue(all(not f.check_and_add(s) for s in salts[-500:]))
        forgotten = sum(f.check_and_add(s) for s in salts[:1000])
        self.assertGreater(forgotten, 990)

    def test_false_positives_rare(self):
        """Fresh random salts are almost never taken for replays at the configured rate."""
        f = SaltFilter(20000, false_positive_rate=1e-4)
        refused = sum(not f.check_and_add(os.urandom(32)) for _ in range(20000))
        self.assertLess(refused, 10)

    def test_memory_bounded(self):
        """The default history (a million salts) costs a few MiB; twenty times a filter's capacity in salts leaves it holding what it held when built."""
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        f = SaltFilter()
        self.assertLess(_held_by_filter(), 5 * 1024 * 1024)
        self.assertLess(f.memory, 5 * 1024 * 1024)
        del f

        small = SaltFilter(1000)
        salts = [os.urandom(32) for _ in range(20 * small.capacity)]
        built, memory = _held_by_filter(), small.memory
        for salt in salts:
            small.check_and_add(salt)
        # Through forty rotations of its two halves, it still refuses what it holds.
        self.assertFalse(small.check_and_add(salts[-1]))
        self.assertEqual(small.memory, memory)
        # A few hundred bytes may come (struct's cache of the filter's
        # layout, the counters' int objects); keeping even the salts' 32
        # bytes each would take 640 KB.
        self.assertLess(_held_by_filter() - built, 4096, "the filter grew with the salts it saw")

    def test_own_salts(self):
        """The server's own salts (marked, or remembered when too short to mark) are refused when they come back."""
        f = SaltFilter(100)
        for size in (32, 24, 16, 12, 8):
            salt = f.own_salt(size)
            self.assertEqual(len(salt), size)
            self.assertFalse(f.check_and_add(salt), size)
        # Another filter's (another server process's) salts are just new.
        self.assertTrue(f.check_and_add(SaltFilter(100).own_salt(32)))

    def test_every_byte_counts_without_marks(self):
        """A filter of names (marks=False) tells apart strings that differ only where a salt's mark would be."""
        names = SaltFilter(100, marks=False)
        salts = SaltFilter(100)
        for name in (b"alice01\0" + bytes(7) + b"\x01", os.urandom(32)):
            names.add(name)
            salts.add(name)
            other = name[:-1] + bytes([name[-1] ^ 1])
            self.assertTrue(names.remembers(name))
            self.assertFalse(names.remembers(other))
            # A salt filter leaves out the mark's place: the same bits.
            self.assertTrue(salts.remembers(other))
        # Its own salts carry no mark: they are remembered, so still refused when they come back.
        self.assertFalse(names.check_and_add(names.own_salt(32)))

    def test_marked_salts_look_random(self):
        """Marked salts are distinct and no two share their mark bytes by construction."""
        f = SaltFilter(100)
        salts = {f.own_salt(32) for _ in range(1000)}
        self.assertEqual(len(salts), 1000)
        self.assertGreater(len({s[-4:] for s in salts}), 990)

    def test_paths_agree_on_bits(self):
        """A salt put in with add() is refused by check_and_add, and one check_and_add took is remembered, with and without a lock."""
        locked = SaltFilter(1000)
        entered: list[bool] = []

        class _Lock:
            def __enter__(self) -> None:
                entered.append(True)

            def __exit__(self, *exc: object) -> None:
                pass

        locked._lock = _Lock()
        for f in (SaltFilter(1000), locked):
            added = [os.urandom(32) for _ in range(200)]
            for salt in added:
                f.add(salt)
            self.assertTrue(all(f.remembers(s) for s in added))
            self.assertFalse(any(f.check_and_add(s) for s in added))
            self.assertEqual(f.replays, len(added))
            checked = [os.urandom(12) for _ in range(200)]
            self.assertTrue(all(f.check_and_add(s) for s in checked))
            self.assertTrue(all(f.remembers(s) for s in checked))
        # Every look-up and change of the locked filter held its lock.
        self.assertEqual(len(entered), 200 * 5)
