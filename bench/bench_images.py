"""Tree build on real images: a checkpoint's sparse memory image and its disk overlay (guest view),
beside blake3 over the whole file in one call and `b3sum`, in one run.

    python bench/bench_images.py [--checkpoint NAME]

The Merkle build reads only what it must (present pages, overlay clusters); the one-call hashes
read the whole file, holes included, so their GiB/s is over the file's apparent size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import blake3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from differ.blocks import MemoryImageSource, Qcow2OverlaySource
from differ.merkle import MerkleTree
from store import checkpoint as ckpt
from store.vmstate import FANOUT, checkpoint_trees

GIB = float(1 << 30)
OVERLAY_MIB = 256
"""Data written into the measured disk overlay."""


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def blake3_file(path: Path) -> None:
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    h.update_mmap(str(path))
    h.digest()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="checkpoint to measure (default: the first one)")
    args = ap.parse_args(argv)
    cks = ckpt.list_all()
    if args.checkpoint:
        cks = [ckpt.get(args.checkpoint)]
    if not cks:
        print("no checkpoint on this host: run `make demo` (or `replay-migrate checkpoint create NAME`) first")
        return 1
    ck = cks[0]
    trees = checkpoint_trees(ck)
    rows: list[tuple[str, str, str, str]] = []
    mem = ck.memory
    with MemoryImageSource(mem) as src:
        t = timed(lambda: MerkleTree.build(src, FANOUT))
    size = mem.stat().st_size
    alloc = mem.stat().st_blocks * 512
    rows.append(("memory image: Merkle tree", f"{size / GIB:.2f} GiB ({alloc / GIB:.2f} allocated)",
                 f"{t:.2f} s", f"{size / GIB / t:.2f} GiB/s apparent, {alloc / GIB / t:.2f} allocated"))
    t = timed(lambda: blake3_file(mem))
    rows.append(("memory image: blake3, one call", "", f"{t:.2f} s", f"{size / GIB / t:.2f} GiB/s"))
    if shutil.which("b3sum"):
        t = timed(lambda: subprocess.run(["b3sum", "--num-threads", "1", str(mem)], check=True, capture_output=True))
        rows.append(("memory image: b3sum, 1 thread", "", f"{t:.2f} s", f"{size / GIB / t:.2f} GiB/s"))
    with tempfile.TemporaryDirectory(dir=ck.dir.parent) as tmp:
        overlay = Path(tmp) / "overlay.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(ck.disk), "-F", "qcow2",
                        str(overlay)], check=True)
        data = Path(tmp) / "data"
        data.write_bytes(os.urandom(OVERLAY_MIB << 20))
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -s {data} 256M {OVERLAY_MIB}M", str(overlay)],
                       check=True, capture_output=True)
        with Qcow2OverlaySource(overlay, backing_tree=trees.disk) as dsrc:
            t = timed(lambda: MerkleTree.build(dsrc, FANOUT))
        rows.append((f"disk overlay with {OVERLAY_MIB} MiB written: Merkle tree",
                     f"{overlay.stat().st_size / 2**20:.0f} MiB file", f"{t:.2f} s",
                     f"{OVERLAY_MIB / 1024 / t:.2f} GiB/s of overlay data"))
        t = timed(lambda: blake3_file(overlay))
        rows.append(("disk overlay: blake3 of the file, one call", "", f"{t:.2f} s",
                     f"{overlay.stat().st_size / GIB / t:.2f} GiB/s"))
    print(f"checkpoint {ck.name}, {os.cpu_count()} CPUs\n")
    print("| what | size | time | throughput |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
