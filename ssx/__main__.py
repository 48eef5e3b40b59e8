"""`python -m ssx`: the ssx tool (version, genkey, and `url` for ss:// URLs and QR codes)."""

from __future__ import annotations

import argparse
import secrets
import sys

from ssx import __version__
from ssx.crypto import METHODS, generate_psk, lookup_method
from ssx.errors import ConfigError


def _genkey(args: argparse.Namespace) -> int:
    try:
        spec = lookup_method(args.method)
    except ConfigError as e:
        print(f"ssx genkey: {e}", file=sys.stderr)
        return 2
    if spec.family == "aead2022":
        # The PSK itself, base64, exactly the method's key length.
        print(generate_psk(spec.name))
    else:
        # Older methods derive their key from a password: a long random one.
        print(secrets.token_urlsafe(24))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ssx",
        description="ssx, a Shadowsocks proxy suite. Run the server with 'twistd -n ssx-server', "
        "the local end with 'twistd -n ssx-local'.",
    )
    parser.add_argument("--version", action="version", version=f"ssx {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    genkey = commands.add_parser(
        "genkey",
        help="print a fresh key: a base64 PSK for 2022 methods, a strong password for the others",
    )
    genkey.add_argument(
        "-m", "--method", default="2022-blake3-aes-256-gcm", help="one of: " + ", ".join(METHODS)
    )
    genkey.set_defaults(run=_genkey)
    url = commands.add_parser(
        "url",
        help="print the ss:// URL of a configuration, with a QR code",
        description="Print the ss:// URL (SIP002) of each server a configuration names, with a QR code "
        "in the terminal for phones to scan. The URL carries the password.",
    )
    from ssx import urltool

    urltool.add_arguments(url)
    url.set_defaults(run=urltool.run)
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 0
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
