"""Synthetic sparse images for the benchmarks, shaped like a real checkpoint's memory image.

The shape was measured on the ``demo`` checkpoint's 1 GiB save image: 29 % of its leaves hold data,
in 934 extents (runs of data pages between holes) whose lengths are roughly lognormal (median 5
pages, 90th percentile 91, 99th 1,873); almost no zero page lies inside an extent (56 of 78,744).
A synthetic image draws its runs and gaps from that distribution, fills data pages with a mix of
memory-like pages (64-bit words: zeros, kernel and user pointers, small counters) and random ones,
and is written with holes everywhere else, so a 16 GiB image costs ~4.6 GiB of disk.

A *divergent copy* changes a fraction of the leaves, chosen uniformly over the whole image (a hole
there becomes a new data page), with DESIGN.md §5's mix for data pages: half differ in 8 bytes,
a fifth in four 8-byte words, the rest are rewritten. It is kept as an :class:`OverlaySource`:
the base file plus a dense file of only the changed leaves, in order, so a divergent copy of a
16 GiB image costs its changes on disk, not another copy. Dense, not a sparse file of the image's
size: on this host's ext4 (mounted with ``discard``) unlinking a file of 26,000 scattered extents
took 20 s, longer than the transfer it served.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from differ import leafhash
from differ.blocks import RawImageSource
from differ.merkle import DIGEST_SIZE, MerkleTree
from differ.source import LEAF_SIZE, ImageKind, KnownArrays
from replay_migrate.errors import ImageError

DATA_FRACTION = 0.29
"""Leaves that hold data (the rest are holes): 78,745 of 268,371 in the measured checkpoint."""
RUN_MEDIAN_PAGES = 5.0
RUN_SIGMA = 2.37
"""Lognormal data runs: median 5 pages, mean ~84, 90th percentile ~100 (measured: 91)."""
MAX_RUN_PAGES = 8192
RANDOM_PAGE_FRACTION = 0.4
"""Data pages of random bytes (incompressible: compressed files, images, keys); the rest are
word-structured memory pages that zstd shrinks ~3x."""
WRITE_PAGES = 4096
"""Pages generated and written per step (16 MiB): bounded memory for any image size."""

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
PageArray = npt.NDArray[np.uint8]


def data_mask(leaves: int, rng: np.random.Generator, fraction: float = DATA_FRACTION) -> BoolArray:
    """Which leaves hold data: exactly ``round(fraction * leaves)`` of them, in lognormal runs (the
    measured distribution) separated by lognormal gaps scaled to fill the rest of the image."""
    mask = np.zeros(leaves, dtype=bool)
    want = min(leaves, round(leaves * fraction))
    if want == 0:
        return mask
    runs: list[int] = []
    total = 0
    while total < want:
        draw = np.minimum(np.ceil(rng.lognormal(np.log(RUN_MEDIAN_PAGES), RUN_SIGMA, 1024)), MAX_RUN_PAGES)
        for run in draw.astype(np.int64).tolist():
            run = min(run, want - total)
            runs.append(run)
            total += run
            if total == want:
                break
    gaps = rng.lognormal(np.log(RUN_MEDIAN_PAGES), RUN_SIGMA, len(runs) + 1)
    gaps = np.floor(gaps / gaps.sum() * (leaves - want)).astype(np.int64)
    pos = int(gaps[0])
    for run, gap in zip(runs, gaps[1:].tolist(), strict=True):
        mask[pos : pos + run] = True
        pos += run + gap
    return mask


def memory_pages(count: int, rng: np.random.Generator) -> PageArray:
    """``count`` pages like a guest's memory: some random, most made of 64-bit words (60 % zero,
    15 % kernel pointers, 10 % user pointers, 10 % small counters, 5 % random). Never all zeros."""
    words = np.zeros((count, LEAF_SIZE // 8), dtype=np.uint64)
    r = rng.random(words.shape, dtype=np.float32)
    kern = (r >= 0.60) & (r < 0.75)
    words[kern] = np.uint64(0xFFFF888000000000) + (rng.integers(0, 1 << 30, int(kern.sum()), dtype=np.uint64)
                                                   << np.uint64(3))
    user = (r >= 0.75) & (r < 0.85)
    words[user] = np.uint64(0x00007F0000000000) + rng.integers(0, 1 << 32, int(user.sum()), dtype=np.uint64)
    small = (r >= 0.85) & (r < 0.95)
    words[small] = rng.integers(1, 1000, int(small.sum()), dtype=np.uint64)
    rnd = r >= 0.95
    words[rnd] = rng.integers(0, 1 << 63, int(rnd.sum()), dtype=np.uint64)
    words[:, 0] |= np.uint64(1)  # never a zero page: those are holes
    pages = words.view(np.uint8).reshape(count, LEAF_SIZE)
    random_rows = np.flatnonzero(rng.random(count) < RANDOM_PAGE_FRACTION)
    if len(random_rows):
        pages[random_rows] = np.frombuffer(rng.bytes(len(random_rows) * LEAF_SIZE), dtype=np.uint8).reshape(
            -1, LEAF_SIZE)
        pages[random_rows, 0] |= 1
    return pages


def diverge(pages: PageArray, rng: np.random.Generator) -> PageArray:
    """Changed copies of ``pages`` (DESIGN.md §5's mix): half differ in one 8-byte word, a fifth in
    four words, the rest are rewritten. Every returned page differs from its original."""
    out = pages.copy()
    count = len(pages)
    kind = rng.random(count)
    words = out.view(np.uint64).reshape(count, LEAF_SIZE // 8)
    for rows, nwords in ((np.flatnonzero(kind < 0.5), 1), (np.flatnonzero((kind >= 0.5) & (kind < 0.7)), 4)):
        if len(rows):
            cols = rng.integers(0, LEAF_SIZE // 8, (len(rows), nwords))
            flips = rng.integers(1, 1 << 63, (len(rows), nwords), dtype=np.uint64)
            for j in range(nwords):  # XOR with a non-zero word: the page changes whatever collides
                words[rows, cols[:, j]] ^= flips[:, j]
    rewrite = np.flatnonzero(kind >= 0.7)
    if len(rewrite):
        out[rewrite] = memory_pages(len(rewrite), rng)
        same = np.flatnonzero((out[rewrite] == pages[rewrite]).all(axis=1))
        out[rewrite[same], 1] ^= 0xFF
    return out


def _runs(indices: IntArray) -> Iterator[tuple[int, int]]:
    """(first index into ``indices``, length) of each run of consecutive values."""
    if len(indices) == 0:
        return
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    starts = np.concatenate([[0], breaks]).tolist()
    ends = np.concatenate([breaks, [len(indices)]]).tolist()
    for s, e in zip(starts, ends, strict=True):
        yield s, e - s


def write_pages(fd: int, indices: IntArray, pages: PageArray) -> None:
    """Write ``pages[k]`` at leaf ``indices[k]`` (ascending), one ``pwrite`` per run of leaves."""
    for s, n in _runs(indices):
        os.pwrite(fd, pages[s : s + n].tobytes(), int(indices[s]) * LEAF_SIZE)


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def check_room(folder: Path, need: int, keep_free: int = 4 << 30) -> None:
    """Refuse to write ``need`` bytes where that would leave less than ``keep_free`` (others share
    this disk)."""
    free = free_bytes(folder)
    if free - need < keep_free:
        raise ImageError(f"{folder}: {need / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free; "
                         f"keeping {keep_free / 2**30:.0f} GiB free")


@dataclass
class SynthImage:
    """A sparse base image on disk and which of its leaves hold data."""

    path: Path
    size: int
    mask: BoolArray
    seed: int

    @property
    def leaf_count(self) -> int:
        return len(self.mask)

    @property
    def data_bytes(self) -> int:
        return int(self.mask.sum()) * LEAF_SIZE


def make_image(path: Path, size: int, seed: int, fraction: float = DATA_FRACTION) -> SynthImage:
    """Write a sparse memory-like image of ``size`` bytes (a multiple of 4 KiB) at ``path``."""
    if size % LEAF_SIZE:
        raise ValueError("size must be a multiple of 4 KiB")
    rng = np.random.default_rng(seed)
    mask = data_mask(size // LEAF_SIZE, rng, fraction)
    check_room(path.parent, int(mask.sum()) * LEAF_SIZE)
    data = np.flatnonzero(mask)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        for k in range(0, len(data), WRITE_PAGES):
            idx = data[k : k + WRITE_PAGES]
            write_pages(fd, idx, memory_pages(len(idx), rng))
        os.fsync(fd)  # written back now, not while a benchmark times reads of it
    finally:
        os.close(fd)
    return SynthImage(path, size, mask, seed)


class OverlaySource(RawImageSource):
    """A divergent copy of a base image: the base file, with the leaves in ``changed`` (ascending)
    read from the ``delta`` file instead, where the ``k``-th changed leaf is the ``k``-th leaf (a
    block source like any raw image)."""

    _kind: ImageKind = "raw"

    def __init__(self, base: Path, delta: Path, changed: IntArray) -> None:
        super().__init__(base)
        self._delta = RawImageSource(delta)
        self.changed = np.asarray(changed, dtype=np.int64)
        if self._delta.size != len(self.changed) * LEAF_SIZE or (
                len(self.changed) and not 0 <= self.changed[0] <= self.changed[-1] < self.leaf_count):
            self.close()
            raise ImageError("the delta does not hold one leaf per changed leaf of the base")

    def zero_mask(self) -> BoolArray:
        mask = super().zero_mask()
        mask[self.changed] = False
        return mask

    def known_leaf_arrays(self) -> KnownArrays:
        zi = np.flatnonzero(self.zero_mask()).astype(np.int64)
        return zi, np.zeros(0, dtype=np.int64), np.zeros((0, DIGEST_SIZE), dtype=np.uint8)

    def read(self, index: int, count: int = 1) -> bytes:
        data = super().read(index, count)
        lo, hi = np.searchsorted(self.changed, [index, index + count])
        if lo == hi:
            return data
        out = np.frombuffer(data, dtype=np.uint8).copy()
        for k, leaf in enumerate(self.changed[lo:hi].tolist(), start=int(lo)):
            off = (leaf - index) * LEAF_SIZE
            piece = self._delta.read(k, 1)
            out[off : off + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
        return out.tobytes()

    def close(self) -> None:
        if hasattr(self, "_delta"):
            self._delta.close()
        super().close()


@dataclass
class Divergent:
    """A divergent copy: its changed leaves, their new content's file and the copy's tree."""

    delta: Path
    changed: IntArray
    tree: MerkleTree

    def source(self, base: SynthImage) -> OverlaySource:
        return OverlaySource(base.path, self.delta, self.changed)


def make_divergent(base: SynthImage, base_tree: MerkleTree, fraction: float, seed: int, delta: Path) -> Divergent:
    """Change ``fraction`` of ``base``'s leaves (at least one); write their new content, in order,
    to the file ``delta``; the copy's tree is the base's with those leaves rehashed."""
    rng = np.random.default_rng(seed)
    n = base.leaf_count
    changed = np.sort(rng.choice(n, size=max(1, round(n * fraction)), replace=False)).astype(np.int64)
    check_room(delta.parent, len(changed) * LEAF_SIZE)
    digests = np.empty((len(changed), DIGEST_SIZE), dtype=np.uint8)
    with RawImageSource(base.path) as src:
        fd = os.open(delta, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for k in range(0, len(changed), WRITE_PAGES):
                idx = changed[k : k + WRITE_PAGES]
                old = np.stack([np.frombuffer(src.read(int(i), 1), dtype=np.uint8) for i in idx.tolist()])
                new = diverge(old, rng)
                holes = ~base.mask[idx]
                if holes.any():  # a page the guest had not touched: new content
                    new[holes] = memory_pages(int(holes.sum()), rng)
                os.pwrite(fd, new.tobytes(), k * LEAF_SIZE)
                leafhash.hash_leaves_into(new.tobytes(), digests[k : k + len(idx)])
            os.fsync(fd)
        finally:
            os.close(fd)
    return Divergent(delta, changed, base_tree.replace_leaves(changed, digests))
