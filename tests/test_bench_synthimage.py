"""bench/synthimage.py: synthetic sparse images have the measured shape, their holes are real holes,
and a divergent copy reads as the base with exactly its changed leaves replaced."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from bench import synthimage
from differ.blocks import RawImageSource
from differ.merkle import MerkleTree
from differ.source import LEAF_SIZE
from replay_migrate.errors import ImageError


@pytest.mark.parametrize("leaves", [1, 10, 1000, 50_000])
def test_data_mask_has_the_fraction_in_runs(leaves: int) -> None:
    mask = synthimage.data_mask(leaves, np.random.default_rng(leaves))
    assert mask.sum() == round(leaves * synthimage.DATA_FRACTION)
    if leaves >= 1000:
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
        runs = edges[1::2] - edges[::2]
        assert 1 < len(runs) < mask.sum()  # runs of pages, not one block nor single pages


def test_memory_pages_and_divergence() -> None:
    rng = np.random.default_rng(1)
    pages = synthimage.memory_pages(500, rng)
    assert pages.shape == (500, LEAF_SIZE) and pages.any(axis=1).all()
    changed = synthimage.diverge(pages, rng)
    assert (changed != pages).any(axis=1).all()
    small = ((changed != pages).sum(axis=1) <= 8).mean()
    assert 0.3 < small < 0.7  # about half differ in one 8-byte word (DESIGN.md §5)


def test_image_is_sparse_and_matches_its_mask(tmp_path: Path) -> None:
    size = 3000 * LEAF_SIZE
    img = synthimage.make_image(tmp_path / "base.raw", size, seed=3)
    data = np.frombuffer(img.path.read_bytes(), dtype=np.uint8).reshape(-1, LEAF_SIZE)
    assert len(data) == img.leaf_count and img.path.stat().st_size == size
    assert (data.any(axis=1) == img.mask).all()
    assert img.path.stat().st_blocks * 512 < img.data_bytes + size // 10  # holes, not written zeros
    with RawImageSource(img.path) as src:
        assert (~src.zero_mask() >= img.mask).all()  # every data leaf is read


def test_divergent_copy_reads_and_hashes_as_its_tree(tmp_path: Path) -> None:
    img = synthimage.make_image(tmp_path / "base.raw", 2000 * LEAF_SIZE + 0, seed=4)
    with RawImageSource(img.path) as src:
        tree = MerkleTree.build(src)
    div = synthimage.make_divergent(img, tree, 0.05, seed=5, delta=tmp_path / "delta")
    assert len(div.changed) == 100
    base = np.frombuffer(img.path.read_bytes(), dtype=np.uint8).reshape(-1, LEAF_SIZE)
    with div.source(img) as src:
        copy = np.frombuffer(src.read(0, src.leaf_count), dtype=np.uint8).reshape(-1, LEAF_SIZE)
        assert MerkleTree.build(src).root == div.tree.root
        assert src.read(int(div.changed[0]), 1) == copy[div.changed[0]].tobytes()
    differs = np.flatnonzero((copy != base).any(axis=1))
    assert np.array_equal(differs, div.changed)
    assert div.delta.stat().st_size == len(div.changed) * LEAF_SIZE  # only the changed leaves, dense
    assert (tree.differing_leaves(div.tree) == div.changed).all()


def test_no_image_where_the_disk_is_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synthimage, "free_bytes", lambda path: 5 << 30)
    with pytest.raises(ImageError, match="GiB free"):
        synthimage.make_image(tmp_path / "big.raw", 16 << 30, seed=1)
    assert not os.path.exists(tmp_path / "big.raw")


def test_overlay_refuses_a_delta_of_another_length(tmp_path: Path) -> None:
    img = synthimage.make_image(tmp_path / "base.raw", 100 * LEAF_SIZE, seed=6)
    (tmp_path / "delta").write_bytes(bytes(2 * LEAF_SIZE))
    with pytest.raises(ImageError, match="one leaf per changed leaf"):
        synthimage.OverlaySource(img.path, tmp_path / "delta", np.array([3, 5, 7]))
    with pytest.raises(ImageError, match="one leaf per changed leaf"):
        synthimage.OverlaySource(img.path, tmp_path / "delta", np.array([3, 100]))
