"""differ.sync: trees built for both sides and the protocol run in memory; the baseline measure."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard

from differ.memsource import MemoryImage, MemorySource
from differ.merkle import MerkleTree
from differ.source import LEAF_SIZE
from differ.sync import baseline_bytes, build_trees, sync_local
from replay_migrate.errors import VerificationError

PAGE = LEAF_SIZE


def rand(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


def test_sync_local_makes_every_image_equal() -> None:
    mem_b, disk_b = rand(50 * PAGE, 1), rand(30 * PAGE, 2)
    mem_a = bytearray(mem_b)
    mem_a[10 * PAGE + 5] ^= 1
    mem_a += rand(3 * PAGE, 3)
    disk_a = bytearray(disk_b)
    disk_a[4 * PAGE : 5 * PAGE] = bytes(PAGE)
    images = {"memory": MemoryImage(mem_b), "disk": MemoryImage(disk_b)}
    stats = sync_local(
        {"memory": MemorySource(bytes(mem_a)), "disk": MemorySource(bytes(disk_a))},
        {name: (im.source(), im.sink()) for name, im in images.items()},
    )
    assert images["memory"].data == bytes(mem_a) and images["disk"].data == bytes(disk_a)
    assert stats.verified and stats.images["memory"].delta == 1 and stats.images["disk"].zero == 1
    assert stats.plain_bytes > 0  # measured by default for reports


def test_sync_local_dry_run_and_given_trees() -> None:
    b = rand(20 * PAGE)
    a = bytearray(b)
    a[PAGE : 2 * PAGE] = rand(PAGE, 9)
    image = MemoryImage(b)
    trees = build_trees({"disk": image.source()}, fanout=4)
    stats = sync_local(
        {"disk": MemorySource(bytes(a))},
        {"disk": (image.source(), None)},
        target_trees=trees,
        fanout=4,
        dry_run=True,
    )
    assert image.data == b and stats.dry_run and stats.verified and stats.images["disk"].full == 1


def test_sync_local_uses_references_and_reports_failures() -> None:
    base = rand(10 * PAGE, 4)
    b = rand(10 * PAGE, 5)
    a = bytearray(b)
    a[:PAGE] = base[3 * PAGE : 4 * PAGE]
    image = MemoryImage(b)
    stats = sync_local(
        {"disk": MemorySource(bytes(a))},
        {"disk": (image.source(), image.sink())},
        references=[(MemorySource(base), None)],
    )
    assert stats.images["disk"].referenced == 1 and stats.block_bytes == 0 and image.data == bytes(a)
    # a stale target tree (it claims the target already holds A) fails the final root check
    stale = MerkleTree.from_bytes(bytes(a))
    image2 = MemoryImage(b)
    with pytest.raises(VerificationError):
        sync_local(
            {"disk": MemorySource(bytes(a))},
            {"disk": (image2.source(), image2.sink())},
            target_trees={"disk": stale},
        )
    assert image2.data == b


def test_baseline_bytes_counts_leaves_changed_since_the_checkpoint() -> None:
    ckpt = rand(40 * PAGE)
    a = bytearray(ckpt)
    a[3 * PAGE : 5 * PAGE] = rand(2 * PAGE, 1)
    a[9 * PAGE : 10 * PAGE] = bytes(PAGE)  # a zero leaf ships as a flag: no bytes
    a += b"abc" * 100
    tree_a, tree_c = MerkleTree.from_bytes(bytes(a)), MerkleTree.from_bytes(ckpt)
    cctx = zstandard.ZstdCompressor(level=3)
    want = sum(len(cctx.compress(bytes(a[i * PAGE : (i + 1) * PAGE]))) for i in (3, 4, 40))
    assert baseline_bytes(MemorySource(bytes(a)), tree_a, tree_c) == want


def test_sync_local_with_a_common_base() -> None:
    base = rand(64 * PAGE, 20)
    a, b = bytearray(base), bytearray(base)
    a[3 * PAGE + 7] ^= 0x40                       # the source changed a byte since the checkpoint
    b[3 * PAGE : 4 * PAGE] = rand(PAGE, 21)       # the target changed the same page otherwise
    b[9 * PAGE : 10 * PAGE] = rand(PAGE, 22)      # and one the source kept
    image = MemoryImage(bytes(b))
    stats = sync_local({"memory": MemorySource(bytes(a))}, {"memory": (image.source(), image.sink())},
                       bases={"memory": (MemorySource(base), None)})
    assert image.data == bytes(a)
    img = stats.images["memory"]
    assert (img.divergent, img.xbase, img.base) == (2, 1, 1) and stats.fingerprint_bytes == 0
