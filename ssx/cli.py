"""
`python -m ssx url`: the ss:// URL of a configuration, for people.

Prints the SIP002 URL of every server a config.json (or -s/-p/-k/-m) names,
each with a QR code drawn in the terminal that a phone can scan, and with
`--qr-png FILE` writes the QR code as an image.  QR codes are made with
segno.  Not on any data path.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import socket
import sys
from typing import TextIO

from ssx.config import config_entries, merge, read_config_file
from ssx.errors import ConfigError
from ssx.safe_file import write_file
from ssx.config.upstreams import entry_url

__all__ = ["add_arguments", "run"]

_UNSPECIFIED = ("0.0.0.0", "::", "")


def add_arguments(parser: argparse.ArgumentParser) -> None:
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


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
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
