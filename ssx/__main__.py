"""`python -m ssx`: the ssx tool (version now; URL, key and certificate helpers to come)."""

from __future__ import annotations

import argparse
import sys

from ssx import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ssx",
        description="ssx, a Shadowsocks proxy suite. Run the server with 'twistd -n ssx-server', "
        "the local end with 'twistd -n ssx-local'.",
    )
    parser.add_argument("--version", action="version", version=f"ssx {__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
