"""What the alternatives to replay would ship for one source state, measured on this host.

Every function takes the *same* source state (the memory image and disk overlay the source saved
at suspend) and returns bytes plus the CPU time the sender needs to produce them:

* plain state transfer - zstd of every leaf that differs from the checkpoint (``baseline_bytes``
  of DESIGN.md §9, what ISR-style suspend/resume ships); the target holds the checkpoint;
* full image - the sparse memory image's data (present, non-zero pages) and everything of the disk
  above the shared base image (the checkpoint's overlay and the VM's), zstd: the target holds only
  the base image;
* rsync - the memory image and the disk overlay against copies of the checkpoint's memory image
  and overlay (``--no-whole-file`` so the delta algorithm runs locally too, zstd compression):
  ``Total bytes sent`` + ``Total bytes received`` of ``--stats``, i.e. literal data and match
  tokens one way, block checksums the other;
* Merkle diff without replay - the transfer protocol run dry from the source's state to the
  checkpoint's (the target never replayed: checkpoint memory image, empty overlay on its disk):
  what replay itself buys.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import zstandard

from differ.blocks import MemoryImageSource, Qcow2OverlaySource
from differ.merkle import MerkleTree
from differ.patch import MemoryImageSink, Qcow2OverlaySink
from differ.protocol import TransferStats
from differ.source import BlockSink, BlockSource
from differ.sync import sync_local
from replay_migrate.sparse import data_extents, sparse_copy
from store.checkpoint import Checkpoint
from store.vmstate import DISK, FANOUT, MEMORY, CheckpointTrees, VmState, open_sources, plain_transfer_bytes
from vm.machine import create_overlay

ZSTD_LEVEL = 3
"""Same level as the transfer protocol's blocks and the plain-transfer baseline."""
READ_CHUNK = 4 << 20
"""Bytes read per call when compressing a whole image."""
EXTENT_RECORD_BYTES = 16
"""Per data extent of a sparse file: where it starts and how long it is (the receiver's map)."""
RSYNC_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class Compressed:
    bytes: int
    raw_bytes: int
    seconds: float


def sparse_zstd(paths: list[Path], *, level: int = ZSTD_LEVEL, chunk: int = READ_CHUNK) -> Compressed:
    """zstd (one stream per file) of the data extents of sparse files, holes skipped."""
    t0 = time.perf_counter()
    total = raw = 0
    cctx = zstandard.ZstdCompressor(level=level)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            comp = cctx.compressobj()
            out = 0
            for start, end in data_extents(fd):
                total += EXTENT_RECORD_BYTES
                for off in range(start, end, chunk):
                    data = os.pread(fd, min(chunk, end - off), off)
                    raw += len(data)
                    out += len(comp.compress(data))
            out += len(comp.flush())
            total += out
        finally:
            os.close(fd)
    return Compressed(total, raw, time.perf_counter() - t0)


# ---- rsync ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RsyncStats:
    """The numbers of ``rsync --stats`` this benchmark uses (bytes, as printed)."""

    sent: int
    received: int
    literal: int
    matched: int
    total_size: int

    @property
    def wire_bytes(self) -> int:
        return self.sent + self.received


_STAT_FIELDS = {
    "sent": "Total bytes sent",
    "received": "Total bytes received",
    "literal": "Literal data",
    "matched": "Matched data",
    "total_size": "Total file size",
}


def parse_rsync_stats(text: str) -> RsyncStats:
    """Read ``--stats`` output (numbers may carry thousands separators, any locale's)."""
    values: dict[str, int] = {}
    for key, label in _STAT_FIELDS.items():
        m = re.search(rf"^{re.escape(label)}:\s*([\d,.' ]+?)\s*(?:bytes)?\s*$", text, re.MULTILINE)
        if m is None:
            raise ValueError(f"rsync --stats output has no {label!r} line")
        values[key] = int(re.sub(r"\D", "", m.group(1)))
    return RsyncStats(**values)


def rsync_argv(sources: list[Path], dest_dir: Path, *, level: int = ZSTD_LEVEL,
               block_size: int | None = None) -> list[str]:
    """Delta transfer even on one host (``--no-whole-file``), always (``--ignore-times``),
    compressed like the other methods, holes kept."""
    argv = ["rsync", "--no-whole-file", "--ignore-times", "--sparse", "--stats", "--compress",
            "--compress-choice=zstd", f"--compress-level={level}"]
    if block_size is not None:
        argv.append(f"--block-size={block_size}")
    return [*argv, *(str(p) for p in sources), str(dest_dir) + "/"]


@dataclass(frozen=True)
class RsyncResult:
    stats: RsyncStats
    seconds: float


def rsync_delta(sources: list[Path], bases: list[Path], work: Path, *, timeout: float = RSYNC_TIMEOUT_S,
                block_size: int | None = None) -> RsyncResult:
    """rsync ``sources`` onto copies of ``bases`` (same names, so each base is its file's basis)."""
    if shutil.which("rsync") is None:
        raise FileNotFoundError("rsync is not installed (apt-get install rsync)")
    dest = work / "rsync-dest"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    try:
        for src, base in zip(sources, bases, strict=True):
            sparse_copy(base, dest / src.name)
        t0 = time.perf_counter()
        r = subprocess.run(rsync_argv(sources, dest, block_size=block_size), capture_output=True,
                           text=True, timeout=timeout, check=False)
        seconds = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"rsync failed ({r.returncode}): {r.stderr.strip()[:300]}")
        return RsyncResult(parse_rsync_stats(r.stdout), seconds)
    finally:
        shutil.rmtree(dest, ignore_errors=True)


# ---- what the source computes: its trees, the plain transfer, the diff without replay ---------------
@dataclass(frozen=True)
class SourceCosts:
    tree_s: float
    """Hashing the source's state into its Merkle trees (present pages, overlay clusters)."""
    plain_bytes: int
    plain_s: float
    """zstd of every leaf that differs from the checkpoint (after the trees told which)."""
    no_replay: TransferStats
    no_replay_s: float
    apply_s: float = 0.0
    """The target's side of a plain transfer: patching a copy of the checkpoint's memory image and
    a fresh overlay on its disk with every leaf the source changed (what it must do before it can
    restore; the leaves are read beforehand, as if they had arrived)."""
    """The dry run of the protocol against the checkpoint's state (its trees are the cached ones)."""


def source_costs(state: VmState, ck: Checkpoint, trees: CheckpointTrees, work: Path) -> SourceCosts:
    """Plain-transfer bytes and the no-replay Merkle diff of one source state, timed."""
    empty = work / "no-replay-disk.qcow2"
    create_overlay(empty, ck.disk)
    try:
        with ExitStack() as stack:
            sources = stack.enter_context(open_sources(state, trees))
            t0 = time.perf_counter()
            mine = {name: MerkleTree.build(src, FANOUT) for name, src in sources.items()}
            tree_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            plain = plain_transfer_bytes(sources, mine, trees)
            plain_s = time.perf_counter() - t0
            ck_mem = stack.enter_context(MemoryImageSource(ck.memory))
            ck_disk = stack.enter_context(Qcow2OverlaySource(empty, backing_tree=trees.disk))
            ref = stack.enter_context(MemoryImageSource(ck.memory))
            t0 = time.perf_counter()
            stats = sync_local(sources, {MEMORY: (ck_mem, None), DISK: (ck_disk, None)},
                               source_trees=mine, target_trees={MEMORY: trees.memory, DISK: trees.disk_tree},
                               references=[(ref, trees.memory)], fanout=FANOUT, dry_run=True,
                               bases={MEMORY: (ref, trees.memory), DISK: (ck_disk, trees.disk_tree)},
                               similar={} if trees.memory_similar is None else {MEMORY: trees.memory_similar})
            no_replay_s = time.perf_counter() - t0
            apply_s = target_apply_s(sources, mine, ck, trees, work)
    finally:
        empty.unlink(missing_ok=True)
    return SourceCosts(tree_s, plain, plain_s, stats, no_replay_s, apply_s)


def target_apply_s(sources: dict[str, BlockSource], mine: dict[str, MerkleTree], ck: Checkpoint,
                   trees: CheckpointTrees, work: Path, *, keep: bool = False) -> float:
    """Seconds to patch the checkpoint's state into the source's at the target (see
    :attr:`SourceCosts.apply_s`), with the sinks a migration target uses (no fsync of the memory
    image). The checkpoint is never written: its memory image is patched through a hard link.
    ``keep``: leave the patched ``apply-memory.sav`` and ``apply-disk.qcow2`` in ``work``."""
    bases = {MEMORY: trees.memory, DISK: trees.disk_tree}
    arrived: dict[str, list[tuple[int, bytes | None]]] = {}
    for name, src in sources.items():
        zero = mine[name].zero_mask()
        leaves = mine[name].differing_leaves(bases[name].resized(src.size, FANOUT)).tolist()
        arrived[name] = [(i, None if zero[i] else src.read(i, 1)) for i in leaves]
    link, overlay = work / "apply-memory.sav", work / "apply-disk.qcow2"
    for p in (link, overlay):
        p.unlink(missing_ok=True)
    os.link(ck.memory, link)
    create_overlay(overlay, ck.disk)
    try:
        t0 = time.perf_counter()
        sinks: dict[str, BlockSink] = {}
        try:
            sinks[MEMORY] = MemoryImageSink(link, durable=False)
            sinks[DISK] = Qcow2OverlaySink(overlay, backing_tree=trees.disk)
            for name, sink in sinks.items():
                sink.set_size(sources[name].size)
                for i, data in arrived[name]:
                    if data is None:
                        sink.zero(i)
                    else:
                        sink.write(i, data)
                sink.commit()
        finally:
            for sink in sinks.values():
                sink.abort()
        return time.perf_counter() - t0
    finally:
        for p in (link, overlay):
            if not keep:
                p.unlink(missing_ok=True)
