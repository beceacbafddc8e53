"""bench/residue.py: where the target holds each divergent source leaf, on synthetic states (a save
image and qcow2 overlays per side over a synthetic checkpoint; no VM), and the helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard
from test_saveimage import default_blocks
from test_vmstate import state_of, synthetic_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.residue import (
    HELD_CHECKPOINT_DISK,
    HELD_CHECKPOINT_MEMORY,
    HELD_NOWHERE,
    HELD_TARGET_DISK,
    HELD_TARGET_MEMORY,
    HELD_ZERO,
    bytes_bucket,
    held_where,
    leaf_cost,
    residue,
)
from differ.merkle import MerkleTree
from store.vmstate import checkpoint_trees, sync_states

PAGE = 4096


def page(seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, PAGE, dtype=np.uint8).tobytes()


def test_each_divergent_leaf_is_found_where_the_target_holds_it(tmp_path: Path) -> None:
    ck = synthetic_checkpoint(tmp_path)
    ck_pages = default_blocks(seed=2, ram_pages=16384)[0].pages
    k = sorted(ck_pages)[5]
    new = page(99)
    near = bytearray(new)
    near[10:14] = b"\x01\x02\x03\x04"
    # both sides hold the same pages (zero ones too), so the RAM bitmaps are alike
    src = state_of(tmp_path, ck, "src", {101: page(98), 103: b"\x5a" * PAGE, 104: b"\x77" * PAGE,
                                         105: ck_pages[k], 106: bytes(PAGE), 107: new, 202: bytes(PAGE)})
    # the target: page 98's content at another page, others at those pages, the checkpoint's page k
    # overwritten; its disk overwrote the checkpoint's 0x77 (1-3 MiB): only the checkpoint's disk has it
    tgt = state_of(tmp_path, ck, "tgt", {101: page(97), 202: page(98), 103: page(96), 104: page(95),
                                         105: page(94), 106: page(93), 107: bytes(near), k: page(91)},
                   "write -P 0x33 1M 2M")
    trees = checkpoint_trees(ck)
    sent, _ = sync_states(src, tgt, dry_run=True)
    r = residue(src, tgt, trees, sent=sent)
    mem, disk = r.images["memory"], r.images["disk"]
    held = {HELD_TARGET_MEMORY: 1, HELD_TARGET_DISK: 1, HELD_CHECKPOINT_DISK: 1, HELD_CHECKPOINT_MEMORY: 2,
            HELD_ZERO: 2, HELD_NOWHERE: 1}
    assert mem.held == held
    assert mem.divergent == 8
    assert disk.divergent == 512 and disk.held == {HELD_CHECKPOINT_DISK: 512}
    assert mem.nowhere_like_target == {"<= 8 B": 1}
    assert mem.nowhere_kinds and sum(mem.nowhere_kinds.values()) == 1
    assert 4000 < mem.nowhere_bytes < 4200              # a random page: zstd cannot shrink it
    # everything the target holds travels as a reference: only the one new page is sent
    assert r.held_anywhere == 7 + 512
    assert r.sent_as_held == r.held_anywhere
    assert r.sent["memory"]["full"] + r.sent["memory"]["xbase"] + r.sent["memory"]["delta"] == 1


def test_held_where_takes_the_first_holding_and_zero_first() -> None:
    data = page(1) + bytes(PAGE) + page(2) + page(3)
    tree = MerkleTree.from_bytes(data)
    keys = np.sort(tree.leaves[:, :8].copy().view(">u8").ravel().astype(np.uint64))
    only2 = np.sort(MerkleTree.from_bytes(page(2)).leaves[:, :8].copy().view(">u8").ravel().astype(np.uint64))
    where = held_where(tree, np.arange(4, dtype=np.int64), [("a", only2), ("b", keys)])
    assert where == ["b", HELD_ZERO, "a", "b"]
    assert held_where(tree, np.arange(4, dtype=np.int64), []) == [HELD_NOWHERE, HELD_ZERO, HELD_NOWHERE,
                                                                  HELD_NOWHERE]


def test_leaf_cost_takes_the_smaller_of_whole_and_xor() -> None:
    cctx = zstandard.ZstdCompressor(level=3)
    a = page(5)
    b = bytearray(a)
    b[0] ^= 1
    assert leaf_cost(bytes(b), a, cctx) < 100 < leaf_cost(bytes(b), None, cctx)
    assert leaf_cost(bytes(PAGE), page(6), cctx) < 100


@pytest.mark.parametrize(("n", "bucket"), [(0, "<= 8 B"), (8, "<= 8 B"), (9, "9-64 B"), (64, "9-64 B"),
                                           (65, "65 B-1 KiB"), (1024, "65 B-1 KiB"), (1025, "> 1 KiB")])
def test_bytes_bucket(n: int, bucket: str) -> None:
    assert bytes_bucket(n) == bucket
