"""`python -m ssx`: the command-line tool of `ssx.cli` (url, genkey, cert)."""

import sys

from ssx.cli import main

if __name__ == "__main__":
    sys.exit(main())
