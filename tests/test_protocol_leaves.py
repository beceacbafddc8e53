"""differ.protocol.leaves: fingerprints and XORs, and the transfers they make small."""

from __future__ import annotations

import blake3
from diffpair import KEY, PAGE, one, rand

from differ.merkle import MerkleTree
from differ.protocol import ProtocolParams
from differ.protocol.leaves import fingerprints, fit, has_base_leaf, n_sub, xor


def test_small_change_travels_as_delta() -> None:
    b = rand(64 * PAGE)
    a = bytearray(b)
    a[5 * PAGE + 1000 : 5 * PAGE + 1008] = b"\xff" * 8
    pair = one(bytes(a), b)
    stats = pair.run()
    assert pair.data() == bytes(a)
    assert stats.images["disk"].delta == 1
    assert stats.block_bytes < 300  # one 256-byte sub-block (zstd), not 4 KiB
    assert stats.fingerprint_bytes == 16 * 4


def test_a_page_changed_a_little_since_the_base_travels_as_xor() -> None:
    base = rand(64 * PAGE, seed=8)
    a, b = bytearray(base), bytearray(base)
    a[9 * PAGE + 100 : 9 * PAGE + 110] = b"\x01" * 10        # the source edited a few bytes
    b[9 * PAGE : 10 * PAGE] = rand(PAGE, 99)                # the target wrote something else there
    pair = one(bytes(a), bytes(b), bases={"disk": base})
    stats = pair.run()
    assert pair.data() == bytes(a)
    assert stats.images["disk"].xbase == 1 and stats.block_bytes < 100
    assert stats.fingerprint_bytes == 0         # no fingerprints in a base-relative walk by default
    with_fp = one(bytes(a), bytes(b), bases={"disk": base}, params=ProtocolParams(delta_with_base=True))
    assert with_fp.run().fingerprint_bytes == 16 * 4 and with_fp.data() == bytes(a)


def test_fingerprints_are_keyed_per_piece() -> None:
    block = rand(PAGE)
    fp = fingerprints(block, 256, 4, KEY)
    assert len(fp) == 16 * 4 and fp[:4] == blake3.blake3(block[:256], key=KEY).digest(4)
    assert fingerprints(block, 256, 4, bytes(32)) != fp
    assert len(fingerprints(block[:1000], 256, 4, KEY)) == n_sub(1000, 256) * 4 == 16


def test_xor_fit_and_base_leaves() -> None:
    a, b = rand(100, 1), rand(PAGE, 2)
    assert xor(xor(a, b), b) == a
    assert fit(b"ab", 4) == b"ab\0\0" and fit(b"abcd", 2) == b"ab"
    tree = MerkleTree.from_bytes(rand(2 * PAGE + 10))
    assert has_base_leaf(tree, 1, PAGE) and has_base_leaf(tree, 2, 10)
    assert not has_base_leaf(tree, 2, PAGE) and not has_base_leaf(tree, 3, 10) and not has_base_leaf(None, 0, PAGE)
