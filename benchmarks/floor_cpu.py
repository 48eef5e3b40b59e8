"""
The CPU floor of a Shadowsocks relay chain, per GiB, in parts that no
relay written on these libraries can go below.

    python benchmarks/floor_cpu.py [--mib 512] [--methods aes-256-gcm,chacha20-ietf-poly1305]

Every byte a chain relays is sealed once (on one end) and opened once (on
the other), and crosses four socket calls (each end reads it from one
socket and writes it to another).  This measures, in CPU-s per GiB:

* ``cipher``: the AEAD alone, `cryptography`'s ``encrypt`` and ``decrypt``
  of 16,383-byte chunks and their 2-byte length blocks (the AEAD-2017
  framing), called in a bare loop: the OpenSSL cost plus the least
  Python a call can take;
* ``codec``: ssx's own chunk codec (`CipherSuite.tcp_encryptor` and
  ``tcp_decryptor``) on the relays' read size, 130,800 bytes: ``codec``
  minus ``cipher`` is the Python the codec adds;
* ``sockets``: a bare relay (blocking ``recv_into`` a buffer, ``sendall``
  of it) between two loopback TCP connections, in a process of its own,
  times two (one per end of the chain): the kernel's copying and the
  fewest Python calls per read.

``cipher + sockets`` is the floor a chain of two relays over the same
loopback can reach; the suite's CPU per GiB (both ssx processes) is
that plus the event loop's and the protocols' work.  Runs for a few
seconds; everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305  # noqa: E402

from ssx.crypto import CipherSuite  # noqa: E402

import steal  # noqa: E402

_READ = 130800
_CHUNK = 0x3FFF
_GIB = float(1 << 30)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cipher(method: str, total: int) -> float:
    """CPU-s/GiB of sealing and opening `total` bytes in 16 KiB chunks, nothing else."""
    factory = AESGCM if method.startswith("aes") else ChaCha20Poly1305
    key = os.urandom(32 if "256" in method or "chacha" in method else 16)
    data = memoryview(os.urandom(_CHUNK))
    length = _CHUNK.to_bytes(2, "big")
    sealed_length = factory(key).encrypt(bytes(12), length, None)
    sealed = factory(key).encrypt(bytes(12), data, None)
    nonce = bytes(12)
    start = _cpu()
    for _ in range(total // _CHUNK):
        aead = factory(key)
        aead.encrypt(nonce, length, None)
        aead.encrypt(nonce, data, None)
        aead = factory(key)
        aead.decrypt(nonce, sealed_length, None)
        aead.decrypt(nonce, sealed, None)
    return (_cpu() - start) * _GIB / total


def codec(method: str, total: int) -> float:
    """CPU-s/GiB of ssx's encryptor and decryptor on relay-sized reads."""
    suite = CipherSuite(method, "floor")
    encrypt = suite.tcp_encryptor().encrypt
    decrypt = suite.tcp_decryptor().decrypt
    data = os.urandom(_READ)
    start = _cpu()
    for _ in range(total // _READ):
        decrypt(encrypt(data))
    return (_cpu() - start) * _GIB / total


def sockets(total: int) -> float:
    """CPU-s/GiB of one bare relay process between two loopback TCP connections, times two."""
    listener = socket.create_server(("127.0.0.1", 0))
    sink_listener = socket.create_server(("127.0.0.1", 0))
    sender = os.fork()
    if sender == 0:  # writes `total` bytes into the relay's inbound connection
        conn = socket.create_connection(listener.getsockname())
        block = os.urandom(1 << 20)
        for _ in range(total // len(block)):
            conn.sendall(block)
        conn.close()
        os._exit(0)
    sink = os.fork()
    if sink == 0:  # drains the relay's outbound connection
        conn, _ = sink_listener.accept()
        buffer = bytearray(1 << 18)
        while conn.recv_into(buffer):
            pass
        os._exit(0)
    inbound, _ = listener.accept()
    outbound = socket.create_connection(sink_listener.getsockname())
    buffer = bytearray(_READ)
    view = memoryview(buffer)
    moved = 0
    start = _cpu()
    while True:
        n = inbound.recv_into(buffer)
        if not n:
            break
        outbound.sendall(view[:n])
        moved += n
    used = _cpu() - start
    outbound.close()
    inbound.close()
    for pid in (sender, sink):
        os.waitpid(pid, 0)
    return 2 * used * _GIB / moved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="bytes per measurement, in MiB")
    parser.add_argument("--methods", default="aes-256-gcm,chacha20-ietf-poly1305")
    args = parser.parse_args()
    total = args.mib << 20
    before = steal.read()
    rows = [("sockets (two bare relays)", "-", sockets(total))]
    for method in args.methods.split(","):
        rows.append(("cipher (seal + open)", method, cipher(method, total)))
        rows.append(("codec (ssx encrypt + decrypt)", method, codec(method, total)))
    stolen = steal.percent(before, steal.read())
    print(f"{'part':32} {'method':24} CPU-s/GiB")
    for part, method, figure in rows:
        print(f"{part:32} {method:24} {figure:.2f}")
    print(f"hypervisor steal during the measurement: {stolen}%")


if __name__ == "__main__":
    main()
