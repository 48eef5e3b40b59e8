"""`python -m ssx`: the ssx tool: `--version`, and `cert` to make a TLS server's key and certificate."""

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
    cert = commands.add_parser(
        "cert",
        help="write a self-signed key and certificate for a TLS server",
        description="Write key.pem (mode 0600) and cert.pem, a self-signed EC P-256 certificate for HOST "
        "valid for a year, and print the ssl: and tls: endpoint descriptions that use them.",
    )
    cert.add_argument("--host", required=True, help="the name (or IP address) clients use for the server")
    cert.add_argument("--out", required=True, metavar="DIR", help="directory to write key.pem and cert.pem into")
    cert.add_argument("--port", type=int, default=8443, help="port for the printed descriptions [default: 8443]")
    cert.add_argument("--days", type=int, default=365, help="validity in days [default: 365]")
    cert.add_argument("--force", action="store_true", help="replace existing key.pem and cert.pem")
    args = parser.parse_args(argv)
    if args.command == "cert":
        return _cert(args)
    parser.print_help()
    return 0


def _cert(args: argparse.Namespace) -> int:
    from ssx.cert import endpoint_escape, write_pair

    if not 0 < args.port < 65536 or args.days < 1:
        print("ssx cert: --port must be 1-65535 and --days at least 1", file=sys.stderr)
        return 2
    try:
        pair = write_pair(args.host, args.out, days=args.days, force=args.force)
    except (OSError, ValueError) as e:
        print(f"ssx cert: {e}", file=sys.stderr)
        return 1
    key, cert = endpoint_escape(pair.key_path), endpoint_escape(pair.cert_path)
    host = endpoint_escape(args.host)
    print(f"wrote {pair.key_path} (keep it secret) and {pair.cert_path}, for {args.host}, "
          f"valid until {pair.not_after:%Y-%m-%d}")
    print("server:")
    print(f"  twistd -n ssx-server --listen ssl:{args.port}:privateKey={key}:certKey={cert} ...")
    print("client: put a copy of cert.pem alone in a directory, PINNED, and trust only it:")
    print(f"  twistd -n ssx-local --server-endpoint tls:host={host}:port={args.port}:trustRoots=PINNED ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
