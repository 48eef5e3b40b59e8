"""Payloads for transfers and datagrams, and the digest that compares them."""

from __future__ import annotations

import hashlib
import os
import random

__all__ = ["sha256", "mixed_payloads"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mixed_payloads(count: int, largest: int, seed: int = 1) -> list[bytes]:
    """`count` distinct random payloads from 1 to 1,400 bytes, plus a few of the largest size that fits."""
    rng = random.Random(seed)
    sizes = [rng.randint(1, 1400) for _ in range(count - 4)] + [largest, largest - 1, largest - 100, 1]
    payloads = []
    seen = set()
    for size in sizes:
        p = os.urandom(size)
        while p in seen:
            p = os.urandom(size)
        seen.add(p)
        payloads.append(p)
    return payloads
