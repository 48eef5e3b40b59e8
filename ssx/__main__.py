"""`python -m ssx`: the ssx tool (the version, and `url` for ss:// URLs and QR codes)."""

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
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    url = commands.add_parser(
        "url",
        help="print the ss:// URL of a configuration, with a QR code",
        description="Print the ss:// URL (SIP002) of each server a configuration names, with a QR code "
        "in the terminal for phones to scan. The URL carries the password.",
    )
    from ssx import urltool

    urltool.add_arguments(url)
    args = parser.parse_args(argv)
    if args.command == "url":
        return urltool.run(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
