"""The payload every benchmark process sends and checks: the same 1 MiB block.

Each process builds the block from the same seed, so a receiver can check a
transfer's SHA-256 without the bytes ever being shipped beside it.
"""

from __future__ import annotations

import hashlib
import random

BLOCK_SIZE = 1 << 20


def make_block() -> bytes:
    """The bytes every transfer repeats: 1 MiB, the same in every process."""
    return random.Random(1234).randbytes(BLOCK_SIZE)


def cyclic_digest(block: bytes, total: int) -> str:
    """SHA-256 of ``block`` repeated to ``total`` bytes."""
    digest = hashlib.sha256()
    full, rest = divmod(total, len(block))
    for _ in range(full):
        digest.update(block)
    digest.update(block[:rest])
    return digest.hexdigest()
