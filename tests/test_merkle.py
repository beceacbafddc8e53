"""differ.merkle: the tree definition, fast building from a BlockSource, files, derived trees."""

from __future__ import annotations

import itertools
import os
import struct
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import numpy as np
import pytest
import zstandard
from fuzzkit import fuzz_tests

from differ import merkle
from differ.memsource import MemorySource
from differ.merkle import (
    ABSENT_DIGEST,
    DIGEST_SIZE,
    MerkleTree,
    leaf_digest,
    load_or_build,
    node_digest,
    root_digest,
    zero_digest,
)
from differ.source import LEAF_SIZE, KnownArrays
from replay_migrate.errors import ImageError


def rand(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


class CountingSource(MemorySource):
    """Counts reads and refuses to read leaves in ``forbid`` (they must come from known_leaves)."""

    def __init__(
        self, data: bytes, forbid: frozenset[int] = frozenset(), known: dict[int, bytes] | None = None
    ) -> None:
        super().__init__(data, known=known)
        self.calls: list[tuple[int, int]] = []
        self.forbid = set(forbid)

    def read(self, index: int, count: int = 1) -> bytes:
        self.calls.append((index, count))
        assert not self.forbid & set(range(index, index + count)), "read a leaf known without reading"
        return super().read(index, count)


def test_definition_by_hand() -> None:
    data = rand(3 * LEAF_SIZE + 100)
    tree = MerkleTree.from_bytes(data, fanout=2)
    leaves = [blake3.blake3(data[i : i + LEAF_SIZE]).digest() for i in range(0, len(data), LEAF_SIZE)]
    assert [tree.leaf(i) for i in range(4)] == leaves
    assert tree.leaf(3) == blake3.blake3(data[3 * LEAF_SIZE :]).digest()  # short leaf: real bytes
    n01, n23 = node_digest(leaves[0] + leaves[1]), node_digest(leaves[2] + leaves[3])
    top = node_digest(n01 + n23)
    assert tree.top == top and tree.depth == 2
    assert tree.root == root_digest(top, len(data), 4, 2)
    meta = struct.pack("<QQII", len(data), 4, LEAF_SIZE, 2)
    assert tree.root == blake3.blake3(top + meta, key=merkle.ROOT_KEY).digest()
    # nodes are keyed: a node is never the plain hash of its children (a leaf of those bytes)
    assert n01 != blake3.blake3(leaves[0] + leaves[1]).digest()


def test_root_binds_size_and_shape() -> None:
    roots = {
        MerkleTree.from_bytes(bytes(LEAF_SIZE)).root,
        MerkleTree.from_bytes(bytes(2 * LEAF_SIZE)).root,
        MerkleTree.from_bytes(bytes(LEAF_SIZE + 1)).root,
        MerkleTree.from_bytes(bytes(2 * LEAF_SIZE), fanout=4).root,
        MerkleTree.from_bytes(b"").root,
    }
    assert len(roots) == 5
    empty = MerkleTree.from_bytes(b"")
    assert empty.leaf_count == 0 and empty.depth == 0 and empty.top == bytes(32)
    one = MerkleTree.from_bytes(b"abc")
    assert one.depth == 0 and one.top == leaf_digest(b"abc")


@pytest.mark.parametrize("fanout", [2, 3, 16, 64])
def test_level_shapes(fanout: int) -> None:
    n = 1000
    tree = MerkleTree.from_bytes(rand(n * LEAF_SIZE - 7), fanout)
    sizes = [len(lv) for lv in tree.levels]
    assert sizes[0] == n and sizes[-1] == 1
    for a, b in itertools.pairwise(sizes):
        assert b == -(-a // fanout)
    assert all(lv.shape[1] == DIGEST_SIZE and lv.dtype == np.uint8 for lv in tree.levels)


def test_build_uses_known_leaves_and_batches_reads() -> None:
    data = bytearray(rand(600 * LEAF_SIZE + 123))
    zeros = {3, 4, 5, 300, 599, 600}
    for i in zeros:
        data[i * LEAF_SIZE : (i + 1) * LEAF_SIZE] = bytes(len(data[i * LEAF_SIZE : (i + 1) * LEAF_SIZE]))
    backing = {10: leaf_digest(bytes(data[10 * LEAF_SIZE : 11 * LEAF_SIZE]))}
    src = CountingSource(bytes(data), forbid=frozenset(zeros | set(backing)), known=backing)
    tree = MerkleTree.build(src, workers=1, read_leaves=128)
    assert tree.root == MerkleTree.from_bytes(bytes(data)).root
    assert all(c <= 128 for _, c in src.calls)
    assert len(src.calls) <= 12  # runs between known leaves, 128 leaves at most per read
    assert tree.leaf(600) == zero_digest(123)  # the short zero last leaf


def test_known_digest_is_trusted() -> None:
    """A leaf whose digest comes from elsewhere (the backing tree) is not read: the caller vouches."""
    data = rand(4 * LEAF_SIZE)
    fake = b"\x01" * 32
    tree = MerkleTree.build(MemorySource(data, known={2: fake}), workers=1)
    assert tree.leaf(2) == fake


class BadSource(MemorySource):
    def __init__(self, data: bytes, mode: str) -> None:
        super().__init__(data, report_zeros=False)
        self.mode = mode

    def known_leaves(self) -> Iterator[tuple[int, bytes | None]]:
        if self.mode == "order":
            yield from [(2, None), (1, None)]
        elif self.mode == "range":
            yield (self.leaf_count, None)
        elif self.mode == "digest":
            yield (0, b"short")

    def read(self, index: int, count: int = 1) -> bytes:
        data = super().read(index, count)
        return data[:-1] if self.mode == "short" else data


@pytest.mark.parametrize("mode", ["order", "range", "digest", "short"])
def test_bad_sources_raise_image_error(mode: str) -> None:
    with pytest.raises(ImageError):
        MerkleTree.build(BadSource(rand(4 * LEAF_SIZE), mode), workers=1)


def test_parallel_build_matches() -> None:
    data = bytearray(rand(3000 * LEAF_SIZE + 5))
    data[100 * LEAF_SIZE : 200 * LEAF_SIZE] = bytes(100 * LEAF_SIZE)
    src = MemorySource(bytes(data))
    assert MerkleTree.build(src, workers=2).root == MerkleTree.build(src, workers=1).root


def test_save_load_roundtrip(tmp_path: Path) -> None:
    data = rand(500 * LEAF_SIZE + 9) + bytes(300 * LEAF_SIZE)
    tree = MerkleTree.from_bytes(data, fanout=8)
    path = tmp_path / "t.tree"
    tree.save(path, stamp=b"inode:1")
    loaded, stamp = MerkleTree.load(path)
    assert stamp == b"inode:1"
    assert loaded.root == tree.root and loaded.fanout == 8 and loaded.size == len(data)
    assert all((a == b).all() for a, b in zip(loaded.levels, tree.levels, strict=True))
    # compact: 300 zero-page digests cost next to nothing, 500 random ones ~32 B each
    assert os.path.getsize(path) < 500 * 32 + 2000


@pytest.mark.parametrize("damage", ["magic", "version", "truncate", "flip", "header"])
def test_load_rejects_damaged_files(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "t.tree"
    MerkleTree.from_bytes(rand(100 * LEAF_SIZE)).save(path)
    raw = bytearray(path.read_bytes())
    if damage == "magic":
        raw[0] ^= 1
    elif damage == "version":
        raw[8] = 9
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        raw[-10] ^= 0x40
    else:
        raw[14] ^= 0xFF  # the size: no longer matches the leaf count
    path.write_bytes(bytes(raw))
    with pytest.raises(ImageError):
        MerkleTree.load(path)
    with pytest.raises(ImageError):
        MerkleTree.load(tmp_path / "missing.tree")


def zstd_declaring(size: int, rle_blocks: int = 0) -> bytes:
    """A zstd frame declaring ``size`` bytes, holding ``rle_blocks`` 128 KiB RLE blocks of zeros."""
    head = struct.pack("<IBB", 0xFD2FB528, 0xC0, 7 << 3) + struct.pack("<Q", size)
    if not rle_blocks:
        return head + (1).to_bytes(3, "little")
    return head + b"".join(((128 << 10) << 3 | 1 << 1 | (k == rle_blocks - 1)).to_bytes(3, "little") + b"\x00"
                           for k in range(rle_blocks))


def tree_file(path: Path, leaves: int, body: bytes, *, size: int | None = None) -> Path:
    size = leaves * LEAF_SIZE if size is None else size
    path.write_bytes(struct.pack("<8sHHIQQ32sH", b"RMMERKLE", 1, 16, LEAF_SIZE, size, leaves, bytes(32), 0) + body)
    return path


def _peak(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    ("leaves", "body"),
    [
        (1 << 32, zstd_declaring(1 << 44)),  # 17 bytes: a bare MemoryError before
        (1 << 20, zstd_declaring(1 << 30, rle_blocks=8192)),  # declares 32x what the header says
        (1 << 20, zstd_declaring(1 << 25, rle_blocks=1024)),  # declares 128 MiB, inflates to it
        (100, zstandard.ZstdCompressor(write_content_size=False).compress(bytes(3200))),
        (100, zstandard.ZstdCompressor().compress(bytes(3200)) + b"trailing"),
    ],
    ids=["16TiB", "1GiB", "inflates", "no-size", "trailing"],
)
def test_load_bounds_the_leaf_data_before_decompressing(tmp_path: Path, leaves: int, body: bytes) -> None:
    """Issue 10 finding 3 in a local file: the leaf data must declare exactly the header's leaf
    count times 32 bytes, and the header must describe the image the caller expects, before any
    allocation of that size."""
    path = tree_file(tmp_path / "t.tree", leaves, body)

    def load() -> None:
        with pytest.raises(ImageError):
            MerkleTree.load(path, expect_size=100 * LEAF_SIZE)

    assert _peak(load) < 4 << 20
    if leaves <= 1 << 20:
        with pytest.raises(ImageError):
            MerkleTree.load(path)


def test_load_or_build_reads_no_tree_of_another_size(tmp_path: Path) -> None:
    """A saved tree whose header describes an image of another size is rebuilt without its leaf
    data ever being inflated (before: 2^22 leaves = 128 MiB for a 100-leaf image)."""
    data = rand(100 * LEAF_SIZE)
    path = tree_file(tmp_path / "t.tree", 1 << 22, zstd_declaring(32 << 22, rle_blocks=1024))
    tree: list[MerkleTree] = []
    assert _peak(lambda: tree.append(load_or_build(MemorySource(data), path, b""))) < 16 << 20
    assert tree[0].root == MerkleTree.from_bytes(data).root


def test_load_or_build_never_rehashes_an_unchanged_image(tmp_path: Path) -> None:
    data = rand(50 * LEAF_SIZE)
    path = tmp_path / "t.tree"
    first = load_or_build(CountingSource(data), path, b"v1")
    src = CountingSource(data)
    again = load_or_build(src, path, b"v1")
    assert src.calls == [] and again.root == first.root
    src2 = CountingSource(data)
    load_or_build(src2, path, b"v2")  # stamp changed: rebuilt and saved
    assert src2.calls and MerkleTree.load(path)[1] == b"v2"


def at_once(n: int, fn: Callable[[int], object]) -> list[BaseException]:
    """Run ``fn(i)`` in ``n`` threads released together; the exceptions they raised."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            fn(i)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_load_or_build_builds_once_when_callers_race(tmp_path: Path) -> None:
    """Two sides of one-host migrate ask for the same checkpoint tree at once: one builds it and
    saves it, the other waits and loads it (never two builds, never a shared temporary file)."""
    data = rand(4000 * LEAF_SIZE)
    path = tmp_path / "t.tree"
    sources = [CountingSource(data) for _ in range(4)]
    trees: list[MerkleTree] = []
    assert at_once(4, lambda i: trees.append(load_or_build(sources[i], path, b"v1"))) == []
    assert len({t.root for t in trees}) == 1
    assert sum(1 for s in sources if s.calls) == 1, "the tree was built more than once"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["t.tree"]


def test_save_from_many_threads_at_once(tmp_path: Path) -> None:
    tree = MerkleTree.from_bytes(rand(2000 * LEAF_SIZE))
    path = tmp_path / "t.tree"

    def save(i: int) -> None:
        for _ in range(10):
            tree.save(path, stamp=b"s")

    assert at_once(6, save) == []
    assert MerkleTree.load(path)[0].root == tree.root
    assert [p.name for p in tmp_path.iterdir()] == ["t.tree"]     # no temporary file left


def test_save_failure_is_an_image_error(tmp_path: Path) -> None:
    tree = MerkleTree.from_bytes(rand(10 * LEAF_SIZE))
    with pytest.raises(ImageError, match="cannot write"):
        tree.save(tmp_path / "missing" / "t.tree")


def test_resized_matches_the_resized_image() -> None:
    data = rand(10 * LEAF_SIZE)
    tree = MerkleTree.from_bytes(data, fanout=4)
    grown = tree.resized(14 * LEAF_SIZE + 100)
    assert grown.root == MerkleTree.from_bytes(data + bytes(4 * LEAF_SIZE + 100), 4).root
    shrunk = tree.resized(6 * LEAF_SIZE)
    assert shrunk.root == MerkleTree.from_bytes(data[: 6 * LEAF_SIZE], 4).root
    cut = tree.resized(6 * LEAF_SIZE + 10)  # the new last leaf is unknown without reading
    assert cut.leaf(6) == ABSENT_DIGEST and cut.leaf(5) == tree.leaf(5)
    assert tree.resized(tree.size, 16).root == MerkleTree.from_bytes(data, 16).root
    assert tree.resized(tree.size) is tree


def test_replace_leaves_and_differing_leaves() -> None:
    a = bytearray(rand(40 * LEAF_SIZE))
    ta = MerkleTree.from_bytes(bytes(a), 3)
    b = bytearray(a)
    b[7 * LEAF_SIZE] ^= 1
    b[30 * LEAF_SIZE + 5] ^= 1
    tb = MerkleTree.from_bytes(bytes(b), 3)
    diff = ta.differing_leaves(tb)
    assert diff.tolist() == [7, 30]
    patched = ta.replace_leaves(diff, tb.leaves[diff])
    assert patched.root == tb.root
    shorter = MerkleTree.from_bytes(bytes(a[: 35 * LEAF_SIZE]), 3)
    assert shorter.differing_leaves(tb).tolist() == [7, 30, 35, 36, 37, 38, 39]


def test_zero_mask() -> None:
    data = bytes(LEAF_SIZE) + rand(LEAF_SIZE) + bytes(100)
    assert MerkleTree.from_bytes(data).zero_mask().tolist() == [True, False, True]


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        MerkleTree(np.zeros((2, 32), dtype=np.uint8), LEAF_SIZE)  # 2 leaves for a 1-leaf size
    with pytest.raises(ValueError):
        MerkleTree(np.zeros((1, 32), dtype=np.uint8), LEAF_SIZE, fanout=1)


def test_build_over_a_sparse_raw_file(tmp_path: Path) -> None:
    """With differ.blocks' RawImageSource: holes come from SEEK_HOLE and are not read."""
    from differ.blocks import RawImageSource

    path = tmp_path / "img.raw"
    data = bytearray(300 * LEAF_SIZE + 77)
    data[5 * LEAF_SIZE : 9 * LEAF_SIZE] = rand(4 * LEAF_SIZE)
    data[200 * LEAF_SIZE : 201 * LEAF_SIZE] = rand(LEAF_SIZE, 1)
    with open(path, "wb") as f:
        f.truncate(len(data))
        for lo, hi in ((5, 9), (200, 201)):
            f.seek(lo * LEAF_SIZE)
            f.write(data[lo * LEAF_SIZE : hi * LEAF_SIZE])
    with RawImageSource(path) as src:
        tree = MerkleTree.build(src, workers=1)
    assert tree.root == MerkleTree.from_bytes(bytes(data)).root


class ArraySource(MemorySource):
    """Tells its known leaves as arrays (like a qcow2 overlay with a million backing leaves)."""

    def __init__(self, data: bytes, arrays: KnownArrays) -> None:
        super().__init__(data, report_zeros=False)
        self.arrays = arrays

    def known_leaf_arrays(self) -> KnownArrays:
        return self.arrays

    def read(self, index: int, count: int = 1) -> bytes:
        assert not {2, 5} & set(range(index, index + count)), "read a leaf known without reading"
        return super().read(index, count)


def test_build_takes_known_leaves_as_arrays() -> None:
    data = bytearray(rand(8 * LEAF_SIZE))
    data[2 * LEAF_SIZE : 3 * LEAF_SIZE] = bytes(LEAF_SIZE)
    d5 = leaf_digest(bytes(data[5 * LEAF_SIZE : 6 * LEAF_SIZE]))
    arrays = (np.array([2]), np.array([5]), np.frombuffer(d5, dtype=np.uint8).reshape(1, 32))
    assert MerkleTree.build(ArraySource(bytes(data), arrays), workers=1).root == MerkleTree.from_bytes(bytes(data)).root


@pytest.mark.parametrize("zi, gi", [([3, 2], []), ([], [9]), ([2], [2]), ([-1], [])])
def test_bad_known_arrays_raise_image_error(zi: list[int], gi: list[int]) -> None:
    digests = np.zeros((len(gi), 32), dtype=np.uint8)
    src = ArraySource(rand(8 * LEAF_SIZE), (np.array(zi, dtype=np.int64), np.array(gi, dtype=np.int64), digests))
    with pytest.raises(ImageError):
        MerkleTree.build(src, workers=1)


# -- fuzz: the target `make fuzz` runs on 100,000 inputs (bench/fuzz_targets), here on a few -------------

test_fuzz_tree_file, test_fuzz_tree_file_raw_bytes = fuzz_tests("tree-file")


def test_zero_masks_name_the_zero_leaves_by_whole_digest() -> None:
    """MerkleTree's and LeafDigests' zero masks (compared as 64-bit words) agree with a byte-wise
    compare, also for a digest that shares only its first word with the zero leaf's."""
    from differ.blocks import LeafDigests
    from differ.merkle import rows_equal, zero_digest

    data = bytes(3 * LEAF_SIZE) + os.urandom(LEAF_SIZE) + bytes(LEAF_SIZE) + bytes(100)
    tree = MerkleTree.from_bytes(data)
    assert tree.zero_mask().tolist() == [True, True, True, False, True, True]
    leaves = tree.leaves.copy()
    leaves[1, 8:] ^= 1                                  # first word of the zero digest, the rest not
    near = LeafDigests(leaves, len(data))
    byte_wise = (leaves == np.frombuffer(zero_digest(), np.uint8)).all(axis=1)
    assert near.zero_mask().tolist() == byte_wise.tolist() == [True, False, True, False, True, False]
    assert rows_equal(leaves[::2], zero_digest()).tolist() == byte_wise[::2].tolist()


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 255, 256, 257, 4097, 5000])
def test_replace_leaves_and_resized_rehash_only_what_changed_and_equal_a_full_build(n: int) -> None:
    """The interior of a tree with some leaves replaced (or resized to a size of the same leaf
    count) is hashed again only above the changed leaves: every level equals a full build's."""
    rng = np.random.default_rng(n)
    for fanout in (2, 16):
        leaves = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
        size = n * LEAF_SIZE - 100
        tree = MerkleTree(leaves, size, fanout)
        for k in (0, 1, 3, n):
            idx = rng.choice(n, size=min(k, n), replace=False).astype(np.int64)
            if k == 1:
                idx = np.array([n - 1], dtype=np.int64)           # the last, short group's path
            new = rng.integers(0, 256, size=(len(idx), 32), dtype=np.uint8)
            got = tree.replace_leaves(idx, new)
            want_leaves = leaves.copy()
            want_leaves[idx] = new
            want = MerkleTree(want_leaves, size, fanout)
            assert [lv.tobytes() for lv in got.levels] == [lv.tobytes() for lv in want.levels]
            assert got.root == want.root and (got.size, got.fanout, got.leaf_count) == (size, fanout, n)
        assert tree.leaves.tobytes() == leaves.tobytes()            # the tree itself is left alone
        for other in (size + 50, size - 3000):
            got = tree.resized(other)
            want_leaves = leaves.copy()
            want_leaves[n - 1] = np.frombuffer(merkle.ABSENT_DIGEST, dtype=np.uint8)
            want = MerkleTree(want_leaves, other, fanout)
            assert [lv.tobytes() for lv in got.levels] == [lv.tobytes() for lv in want.levels]
            assert got.root == want.root


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 257, 5000])
def test_root_with_is_the_root_of_the_replaced_tree(n: int) -> None:
    rng = np.random.default_rng(100 + n)
    for fanout in (2, 16):
        tree = MerkleTree(rng.integers(0, 256, size=(n, 32), dtype=np.uint8), n * LEAF_SIZE - 7, fanout)
        for k in (0, 1, 5, n, 2 * n):
            idx = rng.integers(0, n, size=k).astype(np.int64)     # repeats: the last one given wins
            if k == 1:
                idx[:] = n - 1
            new = rng.integers(0, 256, size=(k, 32), dtype=np.uint8)
            assert tree.root_with(idx, new) == tree.replace_leaves(idx, new).root
    with pytest.raises(IndexError):
        tree.root_with(np.array([n], dtype=np.int64), np.zeros((1, 32), np.uint8))
