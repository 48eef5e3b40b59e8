"""
`python -m ssx`: the ssx command-line tool, beside the twistd commands.

`url` prints the SIP002 URL of every server a config.json (or -s/-p/-k/-m)
names, each with a QR code drawn in the terminal that a phone can scan, and
with `--qr-png FILE` writes the QR code as an image (QR codes are made with
segno); `genkey` prints a fresh key or password for a method; `cert` writes
a self-signed key and certificate for a TLS listener
(`ssx.crypto.certificate`) and prints the endpoint descriptions that use
them.  Not on any data path.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import secrets
import socket
import sys
from typing import TextIO

from ssx import __version__
from ssx.config.file import merge, read_config_file
from ssx.numbers import parse_count, parse_port
from ssx.config.upstreams import config_entries, entry_url
from ssx.crypto import METHODS, generate_psk, lookup_method
from ssx.errors import ConfigError
from ssx.safe_file import write_file

__all__ = ["main"]

_UNSPECIFIED = ("0.0.0.0", "::", "")
# A certificate's validity, in days: a century at most (far beyond it, dates overflow).
MAX_DAYS = 36500


def main(argv: list[str] | None = None) -> int:
    """Run the command `argv` (default: the process's arguments) names; its exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 0
    return int(args.run(args))


def _parser() -> argparse.ArgumentParser:
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
    _url_arguments(url)
    url.set_defaults(run=_url)
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
    return parser


def _url_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE", help="JSON config file (a server's or a local end's)")
    parser.add_argument("-s", "--server", help="the server's host (overrides the file)")
    parser.add_argument("-p", "--server-port", help="the server's port")
    parser.add_argument("-k", "--password", help="the password")
    parser.add_argument("-m", "--method", help="the encryption method")
    parser.add_argument(
        "--host", help="the name or address clients reach the server by [default: the server setting, or this "
        "machine's host name when that is 0.0.0.0 or ::]"
    )
    parser.add_argument("--tag", help="the name clients show for the server [default: remarks from the file]")
    parser.add_argument(
        "--qr-png", metavar="FILE", help="also write the QR code as a PNG image, mode 0600 as it holds the password "
        "(FILE-2.png, ... for further servers)"
    )
    parser.add_argument("--no-qr", action="store_true", help="print only the URL")


def _url(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    try:
        values = read_config_file(args.config) if args.config else {}
        flags = {"server": args.server, "server_port": args.server_port, "password": args.password, "method": args.method}
        entries = config_entries(merge(values, flags))
    except ConfigError as e:
        print(f"ssx url: bad configuration: {e}", file=sys.stderr)
        return 2
    import segno

    for index, entry in enumerate(entries):
        host = args.host or (entry.host if entry.host not in _UNSPECIFIED else socket.gethostname())
        if args.tag:
            entry = dataclasses.replace(entry, name=args.tag)
        url = entry_url(entry, host)
        print(url, file=out)
        code = segno.make(url, error="m")
        if not args.no_qr:
            code.terminal(out=out, compact=True)
        if args.qr_png:
            path = args.qr_png
            if index:
                stem, ext = os.path.splitext(path)
                path = f"{stem}-{index + 1}{ext or '.png'}"
            image = io.BytesIO()
            code.save(image, kind="png", scale=8, border=4)
            try:
                write_file(path, image.getvalue(), 0o600)
            except OSError as e:
                print(f"ssx url: cannot write {path}: {e.strerror or e}", file=sys.stderr)
                return 1
    return 0


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
