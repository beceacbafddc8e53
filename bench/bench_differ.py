"""Benchmark of the differ: Merkle tree build throughput, protocol overhead, delta sub-block size.

    python bench/bench_differ.py [--size-gib 1] [--dir /tmp] [--quick]

Prints markdown tables:

1. tree build over a fully present synthetic file (random bytes, page cache warm) beside blake3 over
   the whole file in one call and ``b3sum`` when it is on PATH, in the same run;
2. protocol cost when 0.1 %, 1 %, 10 % of the leaves differ (dry run, in memory): hash bytes (roots,
   walk digests, bitmaps, leaf digests), fingerprint bytes (delta requests), round trips, block
   bytes, their ratio, and the flat alternative (32 bytes per leaf);
3. delta encoding of synthetic divergent memory pages for several sub-block sizes (DESIGN.md §5:
   half of divergent pages differ in ≤ 8 bytes).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from differ.memsource import MemorySource
from differ.merkle import MerkleTree
from differ.protocol import ProtocolParams, TransferStats
from differ.source import LEAF_SIZE, BlockSource, ImageKind
from differ.transfer import ReferenceImage, SourceImage, TargetImage, blocking_source, blocking_target, run_local
from replay_migrate.errors import VerificationError

GIB = 1 << 30
CHUNK = 64 << 20


class _PreadSource:
    """A raw file as leaves (used only if ``differ.blocks`` is missing)."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._size = os.fstat(self._fd).st_size

    @property
    def kind(self) -> ImageKind:
        return "raw"

    @property
    def size(self) -> int:
        return self._size

    @property
    def leaf_count(self) -> int:
        return -(-self._size // LEAF_SIZE)

    def known_leaves(self) -> Iterator[tuple[int, bytes | None]]:
        return iter(())

    def read(self, index: int, count: int = 1) -> bytes:
        off = index * LEAF_SIZE
        return os.pread(self._fd, min(count * LEAF_SIZE, self._size - off), off)

    def label(self, index: int) -> str:
        return "raw"

    def close(self) -> None:
        os.close(self._fd)


def open_raw(path: str) -> BlockSource:
    try:
        from differ.blocks import RawImageSource
    except ImportError:
        return _PreadSource(path)
    return RawImageSource(path)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def make_file(path: str, size: int, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        for off in range(0, size, CHUNK):
            f.write(rng.bytes(min(CHUNK, size - off)))


def bench_build(path: str, size: int) -> MerkleTree:
    with open(path, "rb") as f:  # warm the page cache: measure hashing, not the disk
        while f.read(CHUNK):
            pass
    rows: list[tuple[str, float]] = []
    src = open_raw(path)
    dt, tree = timed(lambda: MerkleTree.build(src, workers=1))
    rows.append(("MerkleTree.build, in-process (per-4-KiB blake3 + interior levels)", dt))
    cpus = os.cpu_count() or 1
    if cpus > 1:
        dt2, tree2 = timed(lambda: MerkleTree.build(src, workers=cpus))
        assert isinstance(tree2, MerkleTree) and isinstance(tree, MerkleTree) and tree2.root == tree.root
        rows.append((f"MerkleTree.build, {cpus} hashing processes (incl. ~0.2 s start-up)", dt2))
    src.close()
    rows.append(("blake3 one call over the file, 1 thread", timed(lambda: blake3.blake3().update_mmap(path))[0]))
    rows.append(
        (
            "blake3 one call over the file, all threads",
            timed(lambda: blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(path))[0],
        )
    )
    if shutil.which("b3sum"):
        for label, args in (("b3sum --num-threads 1", ["--num-threads", "1"]), ("b3sum (all threads)", [])):
            cmd = ["b3sum", *args, path]
            rows.append((label, timed(functools.partial(subprocess.run, cmd, check=True, capture_output=True))[0]))
    print(f"### Tree build over a {size / GIB:.2f} GiB fully present file ({cpus} CPUs, page cache warm)\n")
    print("| method | seconds | GiB/s |")
    print("|---|---:|---:|")
    for label, secs in rows:
        print(f"| {label} | {secs:.2f} | {size / GIB / secs:.2f} |")
    print()
    assert isinstance(tree, MerkleTree)
    return tree


def mutate(data: bytes, tree: MerkleTree, fraction: float, mode: str, seed: int) -> tuple[bytes, MerkleTree]:
    """A copy of the image with ``fraction`` of its leaves changed (``random``: new random content;
    ``bytes``: 8 bytes changed at a random offset), and its tree (only changed leaves rehashed)."""
    rng = np.random.default_rng(seed)
    n = tree.leaf_count
    idx = np.sort(rng.choice(n, size=max(1, round(n * fraction)), replace=False))
    out = bytearray(data)
    digests = np.empty((len(idx), 32), dtype=np.uint8)
    for k, i in enumerate(idx.tolist()):
        off = i * LEAF_SIZE
        if mode == "random":
            out[off : off + LEAF_SIZE] = rng.bytes(LEAF_SIZE)
        else:
            pos = off + int(rng.integers(0, LEAF_SIZE - 8))
            out[pos : pos + 8] = rng.bytes(8)
        digests[k] = np.frombuffer(blake3.blake3(out[off : off + LEAF_SIZE]).digest(), dtype=np.uint8)
    return bytes(out), tree.replace_leaves(idx.astype(np.int64), digests)


def run_protocol(
    a: bytes, tree_a: MerkleTree, b: bytes, tree_b: MerkleTree, params: ProtocolParams,
    base: tuple[bytes, MerkleTree] | None = None,
) -> tuple[TransferStats, float]:
    """One dry-run transfer A -> B; ``base``: the checkpoint both grew from, held by both sides."""
    def ref() -> ReferenceImage | None:
        return None if base is None else ReferenceImage(MemorySource(base[0], report_zeros=False), base[1])

    source = blocking_source([SourceImage("memory", MemorySource(a, report_zeros=False), tree_a, base=ref())], params)
    target = blocking_target(
        [TargetImage("memory", MemorySource(b, report_zeros=False), tree_b, base=ref())], params, dry_run=True,
        key=bytes(32), max_sizes={"memory": len(a)},  # both sides are local: no size rule for a remote peer
    )
    t0 = time.perf_counter()
    stats = run_local(source, target)
    return stats, time.perf_counter() - t0


def _protocol_row(divergent: str, change: str, fanout: int, dbytes: int, stats: TransferStats, secs: float) -> None:
    blocks = max(1, stats.block_bytes)
    print(
        f"| {divergent} | {change} | {fanout} | {dbytes} B | {stats.round_trips} "
        f"| {stats.hash_bytes:,} | {stats.fingerprint_bytes:,} | {stats.block_bytes:,} "
        f"| {stats.hash_bytes / blocks:.1%} | {(stats.hash_bytes + stats.fingerprint_bytes) / blocks:.1%} "
        f"| {stats.flat_hash_bytes / blocks:.0%} | {stats.wire_total:,} | {secs:.1f} |"
    )


def bench_protocol(a: bytes, tree: MerkleTree, quick: bool) -> None:
    n = tree.leaf_count
    print(f"### Protocol cost, {len(a) / GIB:.2f} GiB image, {n} leaves (dry run, in memory)\n")
    print(
        "hash = roots + walk digests + bitmaps + leaf digests; fp = delta fingerprints (target's "
        "requests); blocks = compressed block bytes. Flat list = 32 B for every leaf.\n"
    )
    print(
        "| divergent | change | fan-out | walk digest | round trips | hash bytes | fp bytes | block bytes "
        "| hash/blocks | (hash+fp)/blocks | flat list/blocks | wire total | seconds |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    cases: list[tuple[float, str, int, int]] = [
        (0.001, "random", 16, 8),
        (0.01, "random", 16, 8),
        (0.1, "random", 16, 8),
        (0.01, "random", 8, 8),
        (0.01, "random", 16, 32),
        (0.01, "8 bytes", 16, 8),
    ]
    if quick:
        cases = cases[:2]
    trees = {16: tree}
    for fraction, mode, fanout, dbytes in cases:
        if fanout not in trees:
            trees[fanout] = MerkleTree(tree.leaves, tree.size, fanout)
        ta = trees[fanout]
        b, tb = mutate(a, ta, fraction, "random" if mode == "random" else "bytes", seed=int(fraction * 1e6) + fanout)
        stats, secs = run_protocol(a, ta, b, tb, ProtocolParams(digest_bytes=dbytes))
        _protocol_row(f"{stats.images['memory'].divergent} ({fraction:.1%})", mode, fanout, dbytes, stats, secs)
        del b, tb
    if not quick:
        # three-way, as in a migration: source and target both grew from the checkpoint (the base);
        # without the base the walk compares the two directly, with it untouched nodes cost a bit
        s_img, s_tree = mutate(a, tree, 0.01, "random", seed=101)
        t_img, t_tree = mutate(a, tree, 0.01, "random", seed=202)
        for with_base in (False, True):
            stats, secs = run_protocol(s_img, s_tree, t_img, t_tree, ProtocolParams(),
                                       base=(a, tree) if with_base else None)
            how = "base-relative walk" if with_base else "no base"
            _protocol_row(str(stats.images["memory"].divergent), f"1 % + 1 % from one base, {how}", 16, 8, stats,
                          secs)
        del s_img, t_img
    print()


# -- delta sub-block experiment -------------------------------------------------------------------


def _memory_page(rng: np.random.Generator) -> bytes:
    """A synthetic memory page: mostly 64-bit words (zeros, kernel and user pointers, small
    counters, some random), some text, a few incompressible pages."""
    kind = rng.random()
    if kind < 0.75:
        r = rng.random(512)
        w = np.zeros(512, dtype=np.uint64)
        m = (r >= 0.7) & (r < 0.8)
        w[m] = np.uint64(0xFFFF888000000000) + (rng.integers(0, 1 << 30, int(m.sum()), dtype=np.uint64) << np.uint64(3))
        m = (r >= 0.8) & (r < 0.85)
        w[m] = np.uint64(0x00007F0000000000) + rng.integers(0, 1 << 32, int(m.sum()), dtype=np.uint64)
        m = (r >= 0.85) & (r < 0.95)
        w[m] = rng.integers(0, 1000, int(m.sum()), dtype=np.uint64)
        m = r >= 0.97
        w[m] = rng.integers(0, 1 << 63, int(m.sum()), dtype=np.uint64)
        return w.tobytes()
    if kind < 0.95:
        words = [b"the", b"window", b"xterm", b"notepad", b"font", b"cache", b"0x7f", b"key", b"press", b"\n"]
        return b" ".join(words[i] for i in rng.integers(0, len(words), 1500).tolist())[:LEAF_SIZE]
    return rng.bytes(LEAF_SIZE)


def _diverge(page: bytes, rng: np.random.Generator) -> bytes:
    """DESIGN.md §5's mix: half the pages differ in ≤ 8 bytes, 20 % in ≤ 64 bytes, the rest are
    rewritten over 25-100 % of the page."""
    out = bytearray(page)
    r = rng.random()
    if r < 0.5:
        k = int(rng.integers(1, 9))
        off = int(rng.integers(0, LEAF_SIZE - k))
        out[off : off + k] = rng.bytes(k)
    elif r < 0.7:
        for _ in range(int(rng.integers(2, 7))):
            k = int(rng.integers(1, 12))
            off = int(rng.integers(0, LEAF_SIZE - k))
            out[off : off + k] = rng.bytes(k)
    else:
        k = int(rng.integers(LEAF_SIZE // 4, LEAF_SIZE + 1))
        off = int(rng.integers(0, LEAF_SIZE - k + 1))
        out[off : off + k] = _memory_page(rng)[:k]
    return bytes(out) if bytes(out) != page else bytes(out[:-1]) + bytes([out[-1] ^ 1])


def bench_delta(npages: int) -> None:
    """Bytes per divergent page through the real protocol for several sub-block sizes."""
    rng = np.random.default_rng(3)
    target_pages = [_memory_page(rng) for _ in range(npages)]
    source_pages = [_diverge(p, rng) for p in target_pages]
    a, b = b"".join(source_pages), b"".join(target_pages)
    cz = zstandard.ZstdCompressor(level=3)
    whole = len(cz.compress(a))
    xor = sum(
        min(len(cz.compress(s)), len(cz.compress((np.frombuffer(s, np.uint8) ^ np.frombuffer(t, np.uint8)).tobytes())))
        for s, t in zip(source_pages, target_pages, strict=True)
    )
    ta, tb = MerkleTree.from_bytes(a), MerkleTree.from_bytes(b)
    print(f"### Delta encoding, {npages} synthetic divergent memory pages\n")
    print(
        f"Reference points: zstd of the whole pages in one stream {whole / npages:.0f} B/page; "
        f"per page min(zstd(page), zstd(page XOR target page)) {xor / npages:.0f} B/page (needs both pages "
        "in one place, DESIGN.md §5's estimate).\n"
    )
    print("| sub-block | fp bytes | request fp B/page | blocks B/page | total B/page | vs whole pages | deltas |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    cases = [(0, 0, False), (64, 4, True), (128, 4, True), (256, 4, True), (256, 2, True), (512, 4, True)]
    for sub, fb, delta in cases:
        params = ProtocolParams(sub_block_size=sub or 256, fingerprint_bytes=fb or 4, delta=delta)
        try:
            stats, _ = run_protocol(a, ta, b, tb, params)
        except VerificationError:
            # a fingerprint matched although its sub-block differs: the rebuilt page fails its
            # digest check and the transfer is refused (why fingerprints are 4 bytes by default)
            print(f"| {sub} | {fb} | {npages * (LEAF_SIZE // sub) * fb / npages:.0f} | - | - | - | failed: collision |")
            continue
        img = stats.images["memory"]
        total = stats.fingerprint_bytes + stats.block_bytes
        label = f"{sub}" if delta else "no delta"
        print(
            f"| {label} | {fb if delta else '-'} | {stats.fingerprint_bytes / npages:.0f} "
            f"| {stats.block_bytes / npages:.0f} | {total / npages:.0f} | {total / whole:.2f} | {img.delta} |"
        )
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gib", type=float, default=1.0, help="size of the synthetic image (default 1)")
    ap.add_argument("--dir", default=None, help="where to write the synthetic file (default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="fewer protocol cases")
    args = ap.parse_args()
    size = int(args.size_gib * GIB) // LEAF_SIZE * LEAF_SIZE
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-differ-") as tmp:
        path = os.path.join(tmp, "image.raw")
        make_file(path, size)
        tree = bench_build(path, size)
        with open(path, "rb") as f:
            data = f.read()
    bench_protocol(data, tree, args.quick)
    del data
    bench_delta(2000 if args.quick else 4000)
    print(f"_total {time.perf_counter() - t0:.0f} s_")


if __name__ == "__main__":
    main()
