"""
A self-signed key and certificate for a TLS server (`python -m ssx cert`).

ssx-server serves TLS with Twisted's `ssl:` endpoint; ssx-local checks the
server with `tls:`, against the system's roots or, for a self-signed
certificate, against the certificate itself given as its only trust root
(`trustRoots=DIR`, a directory holding just that certificate).  This makes
the pair: an EC P-256 key and a certificate naming the host in its
subjectAltName, valid for a year.  No Twisted here.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ssx.safe_file import write_file

__all__ = ["CertificatePair", "endpoint_escape", "make_self_signed", "write_pair"]

KEY_FILE = "key.pem"
CERT_FILE = "cert.pem"
DAYS = 365


@dataclass(frozen=True)
class CertificatePair:
    """Where a key and its certificate were written, and until when the certificate holds."""

    key_path: str
    cert_path: str
    not_after: datetime.datetime


def make_self_signed(
    host: str, days: int = DAYS, also: tuple[str, ...] = ()
) -> tuple[bytes, bytes, datetime.datetime]:
    """(key PEM, certificate PEM, expiry) for `host` (and the names in `also`): DNS names or IP addresses."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for name in (host, *also):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    # A minute's grace for clocks a little behind.
    not_before = now - datetime.timedelta(minutes=1)
    not_after = now + datetime.timedelta(days=days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM), not_after


def write_pair(host: str, directory: str, days: int = DAYS, force: bool = False) -> CertificatePair:
    """
    Write `key.pem` (mode 0600) and `cert.pem` for `host` into `directory`
    (made if missing).  Existing files (or links) are kept unless `force`:
    FileExistsError.  A link at either name is never followed.
    """
    os.makedirs(directory, exist_ok=True)
    key_path = os.path.join(directory, KEY_FILE)
    cert_path = os.path.join(directory, CERT_FILE)
    if not force:
        for path in (key_path, cert_path):
            if os.path.lexists(path):
                raise FileExistsError(f"{path} exists (use --force to replace it)")
    key_pem, cert_pem, not_after = make_self_signed(host, days)
    write_file(key_path, key_pem, 0o600, replace=force)
    write_file(cert_path, cert_pem, 0o644, replace=force)
    return CertificatePair(os.path.abspath(key_path), os.path.abspath(cert_path), not_after)


def endpoint_escape(text: str) -> str:
    """Escape a value for a Twisted endpoint description (`:` and `\\` are special)."""
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")
