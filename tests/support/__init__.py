"""
Shared fixtures of the test suite.  Test modules import from here (`from
tests import support`, `from tests.support import X`), never from each other.
"""

from tests.support.clients import *  # noqa: F401,F403
from tests.support.clients import ROOT, TWISTD, _drained  # noqa: F401
