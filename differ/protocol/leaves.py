"""What both sides compute over a leaf's bytes: keyed sub-block fingerprints (what a delta is made
against), the XOR against the base's leaf, a read leaf fitted to its length."""

from __future__ import annotations

import blake3
import numpy as np

from differ.merkle import MerkleTree


def fingerprints(block: bytes | bytearray, sub: int, nbytes: int, key: bytes) -> bytes:
    """Keyed digests (``nbytes`` each) of ``block``'s pieces of ``sub`` bytes."""
    mv = memoryview(block)
    hasher = blake3.blake3
    return b"".join([hasher(mv[j : j + sub], key=key).digest(nbytes) for j in range(0, len(mv), sub)])


def xor(a: bytes, b: bytes) -> bytes:
    """``a`` XOR ``b`` (same length; ``b`` may be a longer read, cut to ``a``'s length)."""
    n = len(a)
    return (np.frombuffer(a, dtype=np.uint8) ^ np.frombuffer(b, dtype=np.uint8, count=n)).tobytes()


def has_base_leaf(base: MerkleTree | None, leaf: int, length: int) -> bool:
    """Whether ``base`` has a leaf at ``leaf`` of exactly ``length`` bytes (to XOR against)."""
    return base is not None and leaf < base.leaf_count and base.leaf_length(leaf) == length


def n_sub(length: int, sub: int) -> int:
    """Pieces of ``sub`` bytes in a leaf of ``length`` bytes."""
    return -(-length // sub)


def fit(data: bytes, length: int) -> bytes:
    """``data`` truncated or zero-padded to ``length`` (a leaf seen after ``set_size``)."""
    return data[:length] if len(data) >= length else data + bytes(length - len(data))
