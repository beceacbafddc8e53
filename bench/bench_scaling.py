"""How the differ's phases grow: tree build, walk and transfer against image size and divergence, and
the hashing a migration of a 4 or 8 GiB guest does inside its downtime.

    python -m bench.bench_scaling [--sizes 1,4,16] [--fractions 0.01,0.1] [--divergences 0.001,0.01,0.1]
                                  [--divergence-size 4] [--ram 4,8] [--dir DIR] [--out bench/results]

Images are synthetic sparse memory-like files (``bench/synthimage.py``: the measured checkpoint's
shape, 29 % of the leaves hold data, holes elsewhere), made one size at a time and deleted after
it: a 16 GiB image costs ~4.6 GiB of disk, its divergent copies only their changed leaves. The
disk's free space is checked before anything is written.

* **tree build**: ``MerkleTree.build`` over the base image (page cache warm: just written), with
  the native leaf hashing and with the python per-leaf path it replaced; the interior levels
  alone (``MerkleTree(leaves)``), which grow with the leaf count, not the data.
* **walk and transfer**: the diff protocol through the blocking adapter (``differ.transfer``) on
  files, dry run (the target reads its own blocks, checks every rebuilt block, writes nothing): the
  source's image is the base with a fraction of its leaves changed, the target holds the base
  (the checkpoint both started from, so the walk is base-relative, as in a migration). Walk = from
  the target's hello to the source's receipt of the want; transfer = the rest.
* **hashing in the downtime**: a migration hashes at suspend the source's memory image (its
  tree), the target's own (to walk against), and after patching the target verifies the patched
  image: today by rebuilding its tree, with incremental verification (issue 13 item 3, another
  branch) by rehashing only the leaves it wrote. Measured on synthetic images of the guest's RAM
  size; disk digests (the qcow2 overlay's written clusters, MiBs on the bench workloads) are not
  included.

Writes ``scaling.md``, ``scaling.json`` and ``scaling.png`` to ``--out``; prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from bench import synthimage
from differ import leafhash
from differ.blocks import RawImageSource
from differ.merkle import MerkleTree
from differ.protocol import ProtocolParams, SourceState, TransferStats
from differ.source import LEAF_SIZE
from differ.transfer import (
    BlockingSource,
    BlockingTarget,
    ReferenceImage,
    SourceImage,
    TargetImage,
    blocking_source,
    blocking_target,
)

GIB = 1 << 30
DEFAULT_SIZES = (1.0, 4.0, 16.0)
DEFAULT_FRACTIONS = (0.01, 0.1)
DEFAULT_DIVERGENCES = (0.001, 0.01, 0.1)
DEFAULT_DIVERGENCE_SIZE = 4.0
DEFAULT_RAM = (4.0, 8.0)
VERIFY_WRITTEN = 0.01
"""Leaves the target wrote, for the incremental verification's estimate (1 %: ~10x what the
bench's interactive workloads diverge by)."""
REPS = 3
"""Timings of each tree build (median): the host is shared."""

T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def median_time(fn: Callable[[], object], reps: int) -> float:
    return statistics.median(timed(fn)[0] for _ in range(reps))


@dataclass
class BuildRow:
    size: int
    data_bytes: int
    leaves: int
    native_s: float | None
    python_s: float
    interior_native_s: float | None
    interior_python_s: float


@dataclass
class DiffRow:
    size: int
    fraction: float
    divergent: int
    round_trips: int
    hash_bytes: int
    walk_s: float
    block_bytes: int
    transfer_s: float


@dataclass
class DowntimeRow:
    ram: int
    data_bytes: int
    backend: str
    build_s: float
    """One memory tree: the source's at suspend, and the target's own (the same work)."""
    verify_full_s: float
    """The target's check of its patched image today: its whole tree again."""
    verify_incremental_s: float
    """Rehashing only the leaves it wrote (VERIFY_WRITTEN of them) and the interior levels."""

    @property
    def today_s(self) -> float:
        return 2 * self.build_s + self.verify_full_s

    @property
    def incremental_s(self) -> float:
        return 2 * self.build_s + self.verify_incremental_s


def build_times(img: synthimage.SynthImage, reps: int) -> tuple[BuildRow, MerkleTree]:
    def build(native: bool) -> Callable[[], MerkleTree]:
        def go() -> MerkleTree:
            with RawImageSource(img.path) as src:
                return MerkleTree.build(src, native=native)
        return go

    tree = build(False)()
    has_native = leafhash.backend() == "native"
    if has_native and build(True)().root != tree.root:
        raise AssertionError("the native build gave another root")
    leaves = tree.leaves
    row = BuildRow(
        size=img.size, data_bytes=img.data_bytes, leaves=img.leaf_count,
        native_s=median_time(build(True), reps) if has_native else None,
        python_s=median_time(build(False), max(1, reps - 1)),
        interior_native_s=median_time(lambda: MerkleTree(leaves, img.size, native=True), reps) if has_native else None,
        interior_python_s=median_time(lambda: MerkleTree(leaves, img.size, native=False), max(1, reps - 1)),
    )
    return row, tree


def drive(source: BlockingSource, target: BlockingTarget) -> tuple[TransferStats, float, float]:
    """``differ.transfer.run_local``'s loop, timed: the walk ends when the target's want is
    delivered to the source (the transfer starts with the source's answer to it)."""
    t0 = time.perf_counter()
    walk_end: float | None = None
    target.start()
    moved = True
    while moved:
        moved = False
        for sender, receiver in ((target, source), (source, target)):
            for data in sender.data_to_send():
                moved = True
                delivered = time.perf_counter()
                receiver.receive_data(data)  # the want: the source reads and sends its first window here
                if walk_end is None and source.state not in (SourceState.IDLE, SourceState.WALKING):
                    walk_end = delivered
    end = time.perf_counter()
    if source.state is not SourceState.VERIFIED:
        raise AssertionError(f"transfer ended in {source.state.value}")
    walk_end = end if walk_end is None else walk_end
    return source.stats.merged(target.stats), walk_end - t0, end - walk_end


def diff_row(img: synthimage.SynthImage, tree: MerkleTree, fraction: float, tmp: Path, seed: int) -> DiffRow:
    div = synthimage.make_divergent(img, tree, fraction, seed, tmp / f"delta-{fraction}")
    try:
        with div.source(img) as a, RawImageSource(img.path) as b, RawImageSource(img.path) as base_a, \
                RawImageSource(img.path) as base_b:
            source = blocking_source([SourceImage("memory", a, div.tree, base=ReferenceImage(base_a, tree))])
            target = blocking_target([TargetImage("memory", b, tree, base=ReferenceImage(base_b, tree))],
                                     ProtocolParams(), dry_run=True, key=bytes(32),
                                     max_sizes={"memory": img.size})
            stats, walk_s, transfer_s = drive(source, target)
    finally:
        div.delta.unlink(missing_ok=True)
    return DiffRow(size=img.size, fraction=fraction, divergent=stats.images["memory"].divergent,
                   round_trips=stats.round_trips, hash_bytes=stats.hash_bytes, walk_s=walk_s,
                   block_bytes=stats.block_bytes, transfer_s=transfer_s)


def verify_incremental(img: synthimage.SynthImage, tree: MerkleTree, native: bool, seed: int) -> float:
    """Rehash ``VERIFY_WRITTEN`` of the leaves, read one by one from the image, and rebuild the
    interior levels: what the target's incremental verification costs."""
    rng = np.random.default_rng(seed)
    written = np.sort(rng.choice(img.leaf_count, size=max(1, round(img.leaf_count * VERIFY_WRITTEN)),
                                 replace=False)).astype(np.int64)

    def go() -> MerkleTree:
        with RawImageSource(img.path) as src:
            data = b"".join(src.read(int(i), 1) for i in written.tolist())
        digests = np.empty((len(written), 32), dtype=np.uint8)
        leafhash.hash_leaves_into(data, digests, native=native)
        leaves = tree.leaves.copy()
        leaves[written] = digests
        return MerkleTree(leaves, tree.size, tree.fanout, native=native)

    return median_time(go, REPS)


def downtime_rows(img: synthimage.SynthImage, build: BuildRow, tree: MerkleTree, seed: int) -> list[DowntimeRow]:
    rows = []
    for backend, build_s in (("native", build.native_s), ("python", build.python_s)):
        if build_s is None:
            continue
        native = backend == "native"
        rows.append(DowntimeRow(ram=img.size, data_bytes=img.data_bytes, backend=backend, build_s=build_s,
                                verify_full_s=build_s, verify_incremental_s=verify_incremental(img, tree, native,
                                                                                                seed)))
    return rows


# -- report ---------------------------------------------------------------------------------------


def gib(n: int) -> str:
    if n < GIB // 4:  # the small images of a test run
        return f"{n / 2**20:.3g} MiB"
    return f"{n / GIB:g} GiB" if n % (GIB // 4) == 0 else f"{n / GIB:.2f} GiB"


def opt(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def render(builds: list[BuildRow], diffs: list[DiffRow], div_size: int, downtime: list[DowntimeRow],
           meta: dict[str, Any]) -> str:
    out = [
        "# scaling",
        "",
        f"`python -m bench.bench_scaling` on {meta['cpus']} CPUs; load average before / after: "
        f"{meta['load_before']} / {meta['load_after']} (other jobs share this host: medians of {REPS} timings); "
        f"{meta['seconds']:.0f} s in all. "
        "Synthetic sparse memory-like images (`bench/synthimage.py`: the measured checkpoint's shape, 29 % of the "
        "leaves hold data in lognormal runs, holes elsewhere), on files, page cache warm.",
        "",
        "## Tree build against image size",
        "",
        "| image | data read | leaves | build, native (s) | GiB/s of data | build, python per leaf (s) "
        "| GiB/s of data | interior levels, native (s) | interior levels, python (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in builds:
        data_gib = b.data_bytes / GIB
        out.append(
            f"| {gib(b.size)} | {gib(b.data_bytes)} | {b.leaves:,} | {opt(b.native_s)} "
            f"| {opt(None if b.native_s is None else data_gib / b.native_s)} | {b.python_s:.2f} "
            f"| {data_gib / b.python_s:.2f} | {opt(b.interior_native_s, '{:.3f}')} | {b.interior_python_s:.3f} |")
    out += summary(builds, diffs)
    out += [
        "",
        "## Walk and transfer against image size and divergence",
        "",
        "Dry run through the blocking adapter on files: the target holds the base (checkpoint) image, the "
        "source the base with the divergent fraction of its leaves changed (chosen over the whole image: most "
        "land in holes and become new pages; changed data pages follow DESIGN.md §5's mix). Base-relative walk, "
        "fan-out 16, 8-byte walk digests. Block bytes: zstd of each block or of its XOR with the base's.",
        "",
        "| image | divergent | round trips | hash bytes | hash B per divergent leaf | walk (s) | block bytes "
        "| transfer (s) | µs per divergent leaf |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d in sorted(diffs, key=lambda d: (d.size, d.fraction)):
        out.append(
            f"| {gib(d.size)} | {d.divergent:,} ({d.fraction:.1%}) | {d.round_trips} | {d.hash_bytes:,} "
            f"| {d.hash_bytes / max(1, d.divergent):.1f} | {d.walk_s:.2f} | {d.block_bytes:,} | {d.transfer_s:.2f} "
            f"| {(d.walk_s + d.transfer_s) / max(1, d.divergent) * 1e6:.0f} |")
    out += [
        "",
        f"The rows of the {gib(div_size)} image are the divergence series.",
        "",
        "## Hashing inside the downtime of a migration",
        "",
        "Per migration of a guest with this much RAM (its memory image; 29 % of its pages hold data, as in the "
        "measured checkpoint): the source builds its memory tree at suspend, the target builds its own (to walk "
        "against) and, after patching, verifies the patched image. Today the verification rebuilds the whole "
        f"tree; with incremental verification (issue 13 item 3, another branch) it rehashes only the "
        f"{VERIFY_WRITTEN:.0%} of leaves it wrote and the interior levels. The source's build overlaps the "
        "target's tail (replaying, saving), so the target's build + verify are what lies on the critical path. "
        "Disk digests are not included.",
        "",
        "| guest RAM | data | leaf hashing | one memory tree (s) | verify: full rebuild (s) "
        "| verify: incremental (s) | in the downtime today: 2 trees + full verify (s) "
        "| with incremental verify (s) | target's critical path today (s) | target's critical path, incremental (s) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in downtime:
        out.append(
            f"| {gib(r.ram)} | {gib(r.data_bytes)} | {r.backend} | {r.build_s:.2f} | {r.verify_full_s:.2f} "
            f"| {r.verify_incremental_s:.3f} | {r.today_s:.2f} | {r.incremental_s:.2f} "
            f"| {r.build_s + r.verify_full_s:.2f} | {r.build_s + r.verify_incremental_s:.2f} |")
    out += ["", "![scaling](scaling.png)", ""]
    return "\n".join(out)


def summary(builds: list[BuildRow], diffs: list[DiffRow]) -> list[str]:
    """How each phase grew from the smallest to the largest image, from the rows above."""
    if len(builds) < 2:
        return []
    lo, hi = builds[0], builds[-1]
    lines = ["", f"From {gib(lo.size)} to {gib(hi.size)} ({hi.size / lo.size:.0f}x the size):"]
    if lo.native_s and hi.native_s:
        lines.append(f"- tree build, native: {hi.native_s / lo.native_s:.1f}x the time "
                     f"({lo.data_bytes / GIB / lo.native_s:.2f} → {hi.data_bytes / GIB / hi.native_s:.2f} GiB/s "
                     f"of data; {hi.python_s / hi.native_s:.1f}x faster than python per leaf at {gib(hi.size)});")
    lines.append(f"- interior levels, python: {hi.interior_python_s / lo.interior_python_s:.1f}x (they grow with the "
                 f"leaf count: {hi.interior_python_s / (hi.python_s or 1):.0%} of the python build);")
    for fraction in sorted({d.fraction for d in diffs}):
        rows = [d for d in diffs if d.fraction == fraction and d.size in (lo.size, hi.size)]
        if len(rows) == 2:
            a, z = sorted(rows, key=lambda d: d.size)
            lines.append(f"- {fraction:.1%} divergent: walk {z.walk_s / a.walk_s:.1f}x, transfer "
                         f"{z.transfer_s / a.transfer_s:.1f}x, hash bytes {z.hash_bytes / a.hash_bytes:.1f}x, "
                         f"round trips {a.round_trips} → {z.round_trips};")
    lines[-1] = lines[-1].rstrip(";") + "."
    return lines


def plot(builds: list[BuildRow], diffs: list[DiffRow], div_size: int, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    sizes = [b.size / GIB for b in builds]
    ax = axes[0]
    if all(b.native_s is not None for b in builds):
        ax.plot(sizes, [b.native_s for b in builds], "o-", label="tree build, native")
    ax.plot(sizes, [b.python_s for b in builds], "s--", label="tree build, python per leaf")
    ax.plot(sizes, [b.interior_python_s for b in builds], "^:", label="interior levels, python")
    ax.set(xscale="log", yscale="log", xlabel="image size (GiB)", ylabel="seconds", title="Tree build")
    ax.set_xticks(sizes, [f"{s:g}" for s in sizes])
    ax.minorticks_off()
    ax.legend()
    ax = axes[1]
    for fraction in sorted({d.fraction for d in diffs}):
        rows = sorted((d for d in diffs if d.fraction == fraction), key=lambda d: d.size)
        if len(rows) > 1:
            xs = [d.size / GIB for d in rows]
            ax.plot(xs, [d.walk_s for d in rows], "o-", label=f"walk, {fraction:.1%} divergent")
            ax.plot(xs, [d.transfer_s for d in rows], "s--", label=f"transfer, {fraction:.1%} divergent")
    ax.set(xscale="log", yscale="log", xlabel="image size (GiB)", ylabel="seconds",
           title="Walk and transfer against size")
    ax.set_xticks(sizes, [f"{s:g}" for s in sizes])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    ax = axes[2]
    rows = sorted((d for d in diffs if d.size == div_size), key=lambda d: d.fraction)
    xs = [d.fraction * 100 for d in rows]
    ax.plot(xs, [d.walk_s + d.transfer_s for d in rows], "o-", label="walk + transfer (s)")
    ax.set(xscale="log", yscale="log", xlabel="divergent leaves (%)", ylabel="seconds",
           title=f"Against divergence, {div_size / GIB:g} GiB image")
    ax2 = ax.twinx()
    ax2.plot(xs, [d.block_bytes / 2**20 for d in rows], "s--", color="tab:red", label="block MiB")
    ax2.plot(xs, [d.hash_bytes / 2**20 for d in rows], "^:", color="tab:green", label="hash MiB")
    ax2.set(yscale="log", ylabel="MiB")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def _size(gib_: float) -> int:
    return max(LEAF_SIZE, int(gib_ * GIB) // LEAF_SIZE * LEAF_SIZE)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_scaling", description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=_floats, default=DEFAULT_SIZES, help="image sizes in GiB (default 1,4,16)")
    ap.add_argument("--fractions", type=_floats, default=DEFAULT_FRACTIONS,
                    help="divergent fractions at every size (default 0.01,0.1)")
    ap.add_argument("--divergences", type=_floats, default=DEFAULT_DIVERGENCES,
                    help="divergent fractions at --divergence-size (default 0.001,0.01,0.1)")
    ap.add_argument("--divergence-size", type=float, default=DEFAULT_DIVERGENCE_SIZE,
                    help="image size in GiB of the divergence series (default 4; one of --sizes)")
    ap.add_argument("--ram", type=_floats, default=DEFAULT_RAM, help="guest RAM sizes in GiB (default 4,8)")
    ap.add_argument("--dir", default=None, help="where to write the images (default: a temp dir)")
    ap.add_argument("--out", default=None, help="folder for scaling.md/.json/.png (default: print only)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    load_before = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    sizes = sorted({_size(s) for s in (*args.sizes, *args.ram)})
    div_size = _size(args.divergence_size)
    ram = {_size(r) for r in args.ram}
    builds: list[BuildRow] = []
    diffs: list[DiffRow] = []
    downtime: list[DowntimeRow] = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-scaling-") as tmpname:
        tmp = Path(tmpname)
        for k, size in enumerate(sizes):
            print(f"scaling: {gib(size)} image", file=sys.stderr, flush=True)
            img = synthimage.make_image(tmp / "base.raw", size, seed=100 + k)
            try:
                row, tree = build_times(img, REPS)
                if size in {_size(s) for s in args.sizes}:
                    builds.append(row)
                    fractions = set(args.fractions) | (set(args.divergences) if size == div_size else set())
                    for j, fraction in enumerate(sorted(fractions)):
                        diffs.append(diff_row(img, tree, fraction, tmp, seed=1000 * k + j))
                if size in ram:
                    downtime += downtime_rows(img, row, tree, seed=k)
            finally:
                img.path.unlink(missing_ok=True)
    meta = {"cpus": os.cpu_count(), "load_before": load_before,
            "load_after": "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()), "seconds": time.perf_counter() - t0,
            "backend": leafhash.backend()}
    text = render(builds, diffs, div_size, downtime, meta)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scaling.md").write_text(text)
        (out / "scaling.json").write_text(json.dumps({
            "meta": meta, "builds": [asdict(b) for b in builds], "diffs": [asdict(d) for d in diffs],
            "downtime": [asdict(r) for r in downtime]}, indent=1) + "\n")
        plot(builds, diffs, div_size, out / "scaling.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
