"""Reading a qcow2 backing chain: one ``qemu-img convert`` per range against the chain mapped once
and read with pread, on a synthetic disk-heavy case.

    python bench/bench_chain.py [--leaves 2000] [--out bench/results]

A 1 GiB base (qcow2, 256 MiB of data), a checkpoint overlay on it, and a session's overlay on
the checkpoint that rewrites ``--leaves`` scattered 4 KiB blocks of the base's data in part (a
disk-heavy session). Then, each way (``read_backing_directly`` off: every backing range through
qemu-img, as before; on: the chain's map), on the same files:

* the target's reads of its own blocks under the changed leaves (what deltas and references
  read, and what the diff without replay reads of the checkpoint), and
* the diff without replay itself (the protocol run dry from the session's disk to the
  checkpoint's, deltas on), as the migration benchmark's baseline runs it.

Wall time and CPU time (this process and its children) are reported; writes ``chain.md``.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from differ.blocks import LeafDigests, Qcow2OverlaySource, compute_leaf_digests
from differ.merkle import MerkleTree
from differ.protocol import ProtocolParams, TransferStats
from differ.source import LEAF_SIZE
from differ.sync import sync_local
from differ.transfer import read_leaves

HERE = Path(__file__).resolve().parent
GIB = 1 << 30
BASE_DATA_MIB = 256
"""Data in the base image (the rest of its 1 GiB is a hole)."""
DEFAULT_LEAVES = 1000
"""Scattered blocks the session rewrites (the per-range way took ~60 s for 1000 here, loaded)."""


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def make_chain(tmp: Path, leaves: int, seed: int = 7) -> tuple[Path, Path, npt.NDArray[np.int64]]:
    """(checkpoint overlay, session overlay, the rewritten leaves)."""
    rng = np.random.default_rng(seed)
    raw = tmp / "base.raw"
    with open(raw, "wb") as f:
        f.truncate(GIB)
        for _ in range(BASE_DATA_MIB):
            f.write(rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())
    base = tmp / "base.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(base))
    raw.unlink()
    ck = tmp / "checkpoint.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(ck))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 4M", str(ck))
    session = tmp / "session.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", ck.name, "-F", "qcow2", str(session))
    chosen = np.sort(rng.choice(BASE_DATA_MIB * (1 << 20) // LEAF_SIZE, size=leaves, replace=False)).astype(np.int64)
    commands: list[str] = []
    for leaf in chosen.tolist():        # 256 bytes of each block: a delta's case
        commands += ["-c", f"write -P {leaf % 251 + 1} {leaf * LEAF_SIZE + 512} 256"]
    for k in range(0, len(commands), 2000):
        run("qemu-io", "-f", "qcow2", *commands[k : k + 2000], str(session))
    return ck, session, chosen


def measured(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its children)."""
    def cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    c0, t0 = cpu(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, cpu() - c0


def one_way(ck: Path, session: Path, chosen: npt.NDArray[np.int64], backing: LeafDigests,
            direct: bool) -> tuple[list[list[str]], list[bytes]]:
    """Both measurements one way; the rows and the blocks the target read."""
    how = "chain mapped once, pread" if direct else "one qemu-img convert per range (before)"
    rows: list[list[str]] = []
    with Qcow2OverlaySource(ck, force_share=True, read_backing_directly=direct) as target, \
            Qcow2OverlaySource(session, backing_tree=backing, read_backing_directly=direct) as source:
        blocks: list[bytes] = []
        wall, cpu = measured(lambda: blocks.extend(read_leaves(target, chosen.tolist())))
        rows.append([f"target reads its {len(chosen)} own blocks", how, f"{wall:.2f} s", f"{cpu:.2f} s",
                     f"{100 * cpu / wall:.0f} %"])
        s_tree = MerkleTree.build(source)
        t_tree = MerkleTree(backing.digests, backing.size)
        stats: list[TransferStats] = []

        def diff() -> None:
            stats.append(sync_local({"disk": source}, {"disk": (target, None)}, source_trees={"disk": s_tree},
                                    target_trees={"disk": t_tree}, params=ProtocolParams(), dry_run=True,
                                    measure_plain=False))

        wall, cpu = measured(diff)
        rows.append([f"diff without replay ({stats[0].images['disk'].divergent} divergent leaves)", how,
                     f"{wall:.2f} s", f"{cpu:.2f} s", f"{100 * cpu / wall:.0f} %"])
    return rows, blocks


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--leaves", type=int, default=DEFAULT_LEAVES)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--tmp", type=Path, default=Path("/var/tmp"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rm-bench-chain-", dir=args.tmp) as tmp:
        ck, session, chosen = make_chain(Path(tmp), args.leaves)
        backing = compute_leaf_digests(ck)              # the checkpoint's saved digests
        before, old = one_way(ck, session, chosen, backing, direct=False)
        after, new = one_way(ck, session, chosen, backing, direct=True)
    if old != new:
        raise SystemExit("bench_chain: the two ways read different bytes")
    table = ("| what | how | wall | CPU (self + children) | CPU / wall |\n|---|---|---|---|---|\n"
             + "".join("| " + " | ".join(r) + " |\n" for r in before + after))
    text = (f"# Reading a qcow2 backing chain\n\n{os.cpu_count()} CPUs; `python bench/bench_chain.py --leaves "
            f"{args.leaves}`: a 1 GiB base with {BASE_DATA_MIB} MiB of data, a checkpoint overlay, a session "
            f"overlay rewriting {args.leaves} scattered blocks in part (see the script's docstring).\n\n{table}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chain.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
