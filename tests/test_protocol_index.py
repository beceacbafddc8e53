"""differ.protocol.index: where the target holds a leaf's content (its images, its references),
found by digest prefix, so such a leaf travels as a one-byte confirmation."""

from __future__ import annotations

import numpy as np
from diffpair import PAGE, one, rand

from differ.merkle import MerkleTree
from differ.protocol import Holding, Of
from differ.protocol.index import ContentIndex


def test_moved_pages_become_references() -> None:
    b = rand(50 * PAGE)
    a = bytearray(b)
    a[3 * PAGE : 4 * PAGE], a[10 * PAGE : 11 * PAGE] = b[10 * PAGE : 11 * PAGE], b[3 * PAGE : 4 * PAGE]
    a[40 * PAGE : 41 * PAGE] = b[20 * PAGE : 21 * PAGE]
    pair = one(bytes(a), b)
    stats = pair.run()
    assert pair.data() == bytes(a)
    img = stats.images["disk"]
    assert img.divergent == 3 and img.referenced == 3 and stats.block_bytes == 0


def test_references_from_a_base_image() -> None:
    base = rand(8 * PAGE, seed=5)
    b = rand(20 * PAGE)
    a = bytearray(b)
    a[2 * PAGE : 4 * PAGE] = base[6 * PAGE : 8 * PAGE]
    pair = one(bytes(a), b, references=(base,))
    stats = pair.run()
    assert pair.data() == bytes(a) and stats.images["disk"].referenced == 2 and stats.block_bytes == 0


def test_lookup_by_prefix_names_the_holding_and_leaf() -> None:
    mine, ref = rand(6 * PAGE, 1) + bytes(PAGE), rand(3 * PAGE, 2)
    t_mine, t_ref = MerkleTree.from_bytes(mine), MerkleTree.from_bytes(ref)
    for t in (4, 8, 16):
        index = ContentIndex([(Holding(Of.IMAGE, "disk"), t_mine), (Holding(Of.REFERENCE, "ck"), t_ref)], t)
        wanted = np.stack([t_ref.leaves[2], t_mine.leaves[4], MerkleTree.from_bytes(rand(PAGE, 3)).leaves[0],
                           t_mine.leaves[6]])[:, :t]
        found = index.lookup(wanted)
        assert found[:3] == [(1, 2), (0, 4), None]
        assert found[3] is None  # zero leaves are not indexed: they travel as zero confirmations
        loc = found[0]
        assert loc is not None
        assert index.holding(loc) == Holding(Of.REFERENCE, "ck") and index.digest(loc) == t_ref.leaf(2)
    assert ContentIndex([], 8).lookup(t_ref.leaves[:1, :8]) == [None]
