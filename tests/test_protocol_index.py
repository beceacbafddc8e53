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


def _sorted_index_lookup(holdings: list[MerkleTree], t: int, prefixes: np.ndarray) -> list[tuple[int, int] | None]:
    """The index as it was before lookups sorted the questions instead of the held keys: every
    held key sorted (stable), the first entry of a key named. The oracle of the test below."""
    from differ.merkle import ABSENT_DIGEST
    from differ.protocol.index import prefix_keys

    k = min(t, 8)
    keys, sids, leaves = [], [], []
    absent = np.frombuffer(ABSENT_DIGEST, dtype=np.uint8)
    for sid, tree in enumerate(holdings):
        idx = np.flatnonzero(~tree.zero_mask() & ~(tree.leaves == absent).all(axis=1)).astype(np.int64)
        keys.append(prefix_keys(tree.leaves[idx], k))
        sids.append(np.full(len(idx), sid, dtype=np.int64))
        leaves.append(idx)
    all_keys = np.concatenate(keys)
    order = np.argsort(all_keys, kind="stable")
    skeys, ssids, sleaves = all_keys[order], np.concatenate(sids)[order], np.concatenate(leaves)[order]
    out: list[tuple[int, int] | None] = [None] * len(prefixes)
    q = prefix_keys(prefixes, k)
    pos = np.minimum(np.searchsorted(skeys, q), len(skeys) - 1)
    for i in np.flatnonzero(skeys[pos] == q).tolist():
        sid, leaf = int(ssids[pos[i]]), int(sleaves[pos[i]])
        if t <= 8 or bytes(holdings[sid].leaves[leaf, :t]) == bytes(prefixes[i]):
            out[i] = (sid, leaf)
    return out


def test_lookup_names_what_the_sorted_index_named() -> None:
    """Pins the lookup to the sorted index it replaced (the wire's check bytes and the leaf read
    for a reference come from the location named): the first holding's lowest leaf of a key, the
    full ``t`` bytes checked past 8, zero and unknown leaves never named. Digests are drawn from a
    small pool, with some sharing their first 8 bytes only, so keys repeat within and across holdings."""
    from differ.merkle import ABSENT_DIGEST, zero_digest

    rng = np.random.default_rng(7)
    pool = rng.integers(0, 256, size=(64, 32), dtype=np.uint8)
    pool[32:48, :8] = pool[:16, :8]                 # same key, other digest
    pool[48] = np.frombuffer(zero_digest(), np.uint8)
    pool[49] = np.frombuffer(ABSENT_DIGEST, np.uint8)
    trees = []
    for n, size_cut in ((300, 0), (1, 0), (200, 1000), (500, 0)):
        leaves = pool[rng.integers(0, 64, size=n)]
        size = n * PAGE - size_cut
        if size_cut:                                # a short last leaf that is zero at its length
            leaves[-1] = np.frombuffer(zero_digest(PAGE - size_cut), np.uint8)
        trees.append(MerkleTree(np.ascontiguousarray(leaves), size))
    trees.append(MerkleTree(np.zeros((0, 32), np.uint8), 0))
    questions = np.concatenate([pool, rng.integers(0, 256, size=(16, 32), dtype=np.uint8), trees[2].leaves[-1:]])
    for t in (4, 8, 12, 32):
        holdings = [(Holding(Of.IMAGE if k < 2 else Of.REFERENCE, f"h{k}"), tr) for k, tr in enumerate(trees)]
        for order in (holdings, holdings[::-1]):
            got = ContentIndex(order, t).lookup(np.ascontiguousarray(questions[:, :t]))
            assert got == _sorted_index_lookup([tr for _, tr in order], t, np.ascontiguousarray(questions[:, :t]))
            assert any(g is not None for g in got) and any(g is None for g in got)


def test_row_keys_and_rows_equal_agree_with_the_plain_forms() -> None:
    from differ.merkle import rows_equal
    from differ.protocol.index import prefix_keys, row_keys

    rng = np.random.default_rng(3)
    d = rng.integers(0, 256, size=(100, 32), dtype=np.uint8)
    d[10] = d[20]
    d[30, :8] = d[20, :8]                           # same first word, other digest
    for view in (d, d[::2]):                        # a tree's leaves, and rows that are not contiguous
        for k in range(1, 9):
            assert (row_keys(view, k) == prefix_keys(view, k)).all()
        assert (rows_equal(view, d[20].tobytes()) == (view == d[20]).all(axis=1)).all()
