"""`python -m ssx`: the ssx tool: --version, genkey, url (ss:// URLs and QR codes), cert (TLS key and certificate)."""

from __future__ import annotations

import argparse
import secrets
import sys

from ssx import __version__
from ssx.crypto import METHODS, generate_psk, lookup_method
from ssx.errors import ConfigError
from ssx.wire.numbers import parse_count, parse_port

# A certificate's validity, in days: a century at most (far beyond it, dates overflow).
MAX_DAYS = 36500


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
    from ssx import cli as urltool
    urltool.add_arguments(url)
    url.set_defaults(run=urltool.run)
    cert = commands.add_parser(
        "cert",
        help="write a self-signed key and certificate for a TLS server",
        description="Write key.pem (mode 0600) and cert.pem, a self-signed EC P-256 certificate for HOST "
        "valid for a year, and print the ssl: and tls: endpoint descriptions that use them.",
    )
    cert.add_argument("--host", required=True, help="the name (or IP address) clients use for the server")
    cert.add_argument("--out", required=True, metavar="DIR", help="directory to write key.pem and cert.pem into")
    cert.add_argument("--port", default="8443", help="port for the printed descriptions [default: 8443]")
    cert.add_argument("--days", default="365", help="validity in days, at most 36500 [default: 365]")
    cert.add_argument("--force", action="store_true", help="replace existing key.pem and cert.pem")
    cert.set_defaults(run=_cert)
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 0
    return int(args.run(args))


def _cert(args: argparse.Namespace) -> int:
    from ssx.crypto.certificate import endpoint_escape, write_pair

    try:
        port = parse_port(args.port, "--port")
        days = parse_count(args.days, "--days", minimum=1, maximum=MAX_DAYS)
    except ConfigError as e:
        print(f"ssx cert: {e}", file=sys.stderr)
        return 2
    try:
        pair = write_pair(args.host, args.out, days=days, force=args.force)
    except (OSError, ValueError) as e:
        print(f"ssx cert: {e}", file=sys.stderr)
        return 1
    key, cert = endpoint_escape(pair.key_path), endpoint_escape(pair.cert_path)
    host = endpoint_escape(args.host)
    print(f"wrote {pair.key_path} (keep it secret) and {pair.cert_path}, for {args.host}, "
          f"valid until {pair.not_after:%Y-%m-%d}")
    print("server:")
    print(f"  twistd -n ssx-server --listen ssl:{port}:privateKey={key}:certKey={cert} ...")
    print("client: put a copy of cert.pem alone in a directory, PINNED, and trust only it:")
    print(f"  twistd -n ssx-local --server-endpoint tls:host={host}:port={port}:trustRoots=PINNED ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
