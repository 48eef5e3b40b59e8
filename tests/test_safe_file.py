"""Files holding secrets: written 0600 from creation, never through a planted link; `python -m ssx cert` with them."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from unittest import skipUnless

from twisted.trial import unittest

from ssx.crypto.certificate import write_pair
from ssx.safe_file import NotPrivateError, read_private_file, write_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class WriteFileTests(unittest.SynchronousTestCase):
    """write_file and read_private_file."""

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="ssx-safe-")
        self.addCleanup(shutil.rmtree, self.directory)
        self.path = os.path.join(self.directory, "secret")
        self.victim = os.path.join(self.directory, "victim")
        with open(self.victim, "w") as f:
            f.write("untouched")
        old = os.umask(0)
        self.addCleanup(os.umask, old)

    def assertMode(self, path, mode):
        info = os.lstat(path)
        self.assertTrue(stat.S_ISREG(info.st_mode), path)
        self.assertEqual(stat.S_IMODE(info.st_mode), mode)

    def test_private_under_umask_zero(self):
        """With umask 0 the file is 0600 (or the mode asked), all of the data, and no temporary file is left."""
        write_file(self.path, b"x" * 100_000)
        self.assertMode(self.path, 0o600)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"x" * 100_000)
        write_file(self.path + ".pub", b"public", 0o644)
        self.assertMode(self.path + ".pub", 0o644)
        self.assertEqual(sorted(os.listdir(self.directory)), ["secret", "secret.pub", "victim"])

    def test_replaces_a_planted_link(self):
        """A link at the path is replaced by the file; the link's target keeps its content and mode."""
        os.chmod(self.victim, 0o644)
        os.symlink(self.victim, self.path)
        write_file(self.path, b"secret")
        self.assertMode(self.path, 0o600)
        self.assertMode(self.victim, 0o644)
        with open(self.victim) as f:
            self.assertEqual(f.read(), "untouched")

    def test_no_replace_refuses_links(self):
        """Without replace, an existing name is FileExistsError, even a dangling link, whose target is not created."""
        missing = os.path.join(self.directory, "missing")
        os.symlink(missing, self.path)
        self.assertRaises(FileExistsError, write_file, self.path, b"secret", replace=False)
        self.assertFalse(os.path.lexists(missing))
        os.unlink(self.path)
        write_file(self.path, b"secret", replace=False)
        self.assertMode(self.path, 0o600)
        self.assertRaises(FileExistsError, write_file, self.path, b"again", replace=False)

    def test_read_private_only(self):
        """read_private_file reads a 0600 file of ours, and refuses a link or a file others may read."""
        write_file(self.path, b"secret")
        self.assertEqual(read_private_file(self.path), b"secret")
        os.chmod(self.path, 0o640)
        self.assertRaises(NotPrivateError, read_private_file, self.path)
        os.symlink(self.path, self.path + ".link")
        os.chmod(self.path, 0o600)
        self.assertRaises(OSError, read_private_file, self.path + ".link")


    @skipUnless(os.geteuid() == 0, "chown to another user needs root")
    def test_read_private_other_owner(self):
        """Even for root, a 0600 file of another user is refused, unless that user is one of `owners`."""
        write_file(self.path, b"secret")
        os.chown(self.path, 65534, 65534)
        self.assertRaises(NotPrivateError, read_private_file, self.path)
        self.assertRaises(NotPrivateError, read_private_file, self.path, owners=(65533,))
        self.assertEqual(read_private_file(self.path, owners=(65534,)), b"secret")

class CertCommandLinkTests(unittest.SynchronousTestCase):
    """`python -m ssx cert` does not write its private key through a link planted at key.pem."""

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="ssx-cert-")
        self.addCleanup(shutil.rmtree, self.directory)
        self.victim = os.path.join(self.directory, "victim")
        self.key = os.path.join(self.directory, "key.pem")

    def run_cert(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "ssx", "cert", "--host", "a.example", "--out", self.directory, *args],
            capture_output=True, text=True, cwd=ROOT, timeout=30,
        )

    def test_dangling_link_refused(self):
        """A dangling link at key.pem is an existing file: refused, and its target is not created."""
        os.symlink(self.victim, self.key)
        result = self.run_cert()
        self.assertEqual(result.returncode, 1)
        self.assertIn("exists", result.stderr)
        self.assertFalse(os.path.lexists(self.victim))

    def test_force_replaces_link(self):
        """With --force, key.pem replaces a link to another file, which keeps its content."""
        with open(self.victim, "w") as f:
            f.write("untouched")
        os.symlink(self.victim, self.key)
        result = self.run_cert("--force")
        self.assertEqual(result.returncode, 0, result.stderr)
        with open(self.victim) as f:
            self.assertEqual(f.read(), "untouched")
        info = os.lstat(self.key)
        self.assertTrue(stat.S_ISREG(info.st_mode))
        self.assertEqual(stat.S_IMODE(info.st_mode), 0o600)
        with open(self.key) as f:
            self.assertIn("PRIVATE KEY", f.read())

    def test_pair_still_written(self):
        """Without links, write_pair writes key.pem 0600 and cert.pem 0644 as before, also under umask 0."""
        old = os.umask(0)
        try:
            pair = write_pair("a.example", self.directory)
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(pair.key_path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(pair.cert_path).st_mode), 0o644)
        self.assertEqual(sorted(os.listdir(self.directory)), ["cert.pem", "key.pem"])

    def test_bad_numbers_one_line(self):
        """--port and --days take ASCII digits in range: anything else is one line and status 2, no traceback."""
        for args in (["--port", "²"], ["--port", "٣"], ["--port", "0"], ["--days", "²"], ["--days", "99999999"]):
            result = self.run_cert(*args)
            self.assertEqual(result.returncode, 2, (args, result.stderr))
            lines = result.stderr.strip().splitlines()
            self.assertEqual(len(lines), 1, lines)
            self.assertTrue(lines[0].startswith(f"ssx cert: {args[0]}: expected "), lines)
        self.assertEqual(os.listdir(self.directory), [])
