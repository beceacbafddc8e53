"""bench/baselines.py: rsync --stats parsing and a real rsync delta, sparse zstd of real files."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from test_blocks import make_base, make_overlay, qemu_tools
from test_saveimage import build_save_image, default_blocks

from bench.baselines import (
    EXTENT_RECORD_BYTES,
    parse_rsync_stats,
    rsync_argv,
    rsync_delta,
    sparse_zstd,
    target_apply_s,
)
from differ.blocks import LeafDigests, MemoryImageSource, Qcow2OverlaySource, compute_leaf_digests
from differ.merkle import MerkleTree
from differ.source import BlockSource
from store.checkpoint import Checkpoint
from store.vmstate import DISK, FANOUT, MEMORY, CheckpointTrees

__all__ = ["qemu_tools"]  # the fixture, imported for its use below

STATS = """
Number of files: 2 (reg: 2)
Number of created files: 0
Number of deleted files: 0
Number of regular files transferred: 2
Total file size: 1,099,244,430 bytes
Total transferred file size: 1,099,244,430 bytes
Literal data: 4,194,304 bytes
Matched data: 1,095,050,126 bytes
File list size: 0
File list generation time: 0.001 seconds
File list transfer time: 0.000 seconds
Total bytes sent: 2,345,678
Total bytes received: 123,456

sent 2,345,678 bytes  received 123,456 bytes  1,234,567.00 bytes/sec
total size is 1,099,244,430  speedup is 445.19
"""


def test_parse_rsync_stats() -> None:
    s = parse_rsync_stats(STATS)
    assert (s.sent, s.received, s.literal, s.matched, s.total_size) == (
        2_345_678, 123_456, 4_194_304, 1_095_050_126, 1_099_244_430)
    assert s.wire_bytes == 2_469_134
    assert parse_rsync_stats(STATS.replace(",", ".")).sent == 2_345_678      # other locales


def test_parse_rsync_stats_refuses_other_output() -> None:
    with pytest.raises(ValueError, match="Total bytes sent"):
        parse_rsync_stats("sent 12 bytes  received 34 bytes\n")


def test_rsync_argv_forces_the_delta_algorithm() -> None:
    argv = rsync_argv([Path("/s/memory.sav"), Path("/s/disk.qcow2")], Path("/d"), block_size=4096)
    assert argv[0] == "rsync"
    for opt in ("--no-whole-file", "--ignore-times", "--stats", "--compress", "--compress-choice=zstd",
                "--compress-level=3", "--block-size=4096"):
        assert opt in argv
    assert argv[-3:] == ["/s/memory.sav", "/s/disk.qcow2", "/d/"]


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")
def test_rsync_delta_ships_only_what_changed(tmp_path: Path) -> None:
    base = os.urandom(4 << 20)
    changed = bytearray(base)
    changed[1 << 20 : (1 << 20) + 4096] = os.urandom(4096)
    (tmp_path / "base").mkdir()
    (tmp_path / "src").mkdir()
    (tmp_path / "base" / "img").write_bytes(base)
    (tmp_path / "src" / "img").write_bytes(bytes(changed))
    r = rsync_delta([tmp_path / "src" / "img"], [tmp_path / "base" / "img"], tmp_path)
    assert r.stats.total_size == 4 << 20
    assert r.stats.literal < 256 << 10            # one rsync block or two, not the file
    assert r.stats.matched > 3 << 20
    assert r.stats.wire_bytes < 512 << 10
    assert not (tmp_path / "rsync-dest").exists()
    assert (tmp_path / "base" / "img").read_bytes() == base      # the basis itself is never written


def test_sparse_zstd_skips_holes(tmp_path: Path) -> None:
    p = tmp_path / "sparse"
    with open(p, "wb") as f:
        f.truncate(64 << 20)
        f.seek(8 << 20)
        f.write(os.urandom(1 << 20))
        f.seek(40 << 20)
        f.write(b"x" * (1 << 20))
    c = sparse_zstd([p])
    assert c.raw_bytes < 4 << 20                  # the data extents, not 64 MiB
    assert (1 << 20) < c.bytes < (1 << 20) + (64 << 10) + 8 * EXTENT_RECORD_BYTES
    assert c.seconds >= 0


def test_target_apply_patches_copies_and_never_the_checkpoint(tmp_path: Path, qemu_tools: None) -> None:
    """What a plain-transfer target writes, timed: on a checkpoint made of a synthetic save image
    and an overlay, the source's changed pages and disk blocks; the checkpoint stays as it was."""
    ck_blocks = default_blocks(seed=1)
    src_blocks = default_blocks(seed=1)
    src_blocks[0].pages = {**src_blocks[0].pages, 5: b"\x07" * 4096, 6: b"\x08" * 4096}
    ck = Checkpoint(tmp_path)                           # its memory.sav and disk.qcow2, made here
    ck_mem = build_save_image(ck.memory, ck_blocks).path
    src_mem = build_save_image(tmp_path / "src.sav", src_blocks).path
    base = make_base(tmp_path, "qcow2")
    ck_disk = make_overlay(tmp_path, base, ck.disk.name, 8 << 20, "write -P 0x11 0 4096")
    src_disk = make_overlay(tmp_path, ck_disk, "src.qcow2", 8 << 20, "write -P 0x22 8192 4096")
    before = ck_mem.read_bytes(), ck_disk.read_bytes()
    disk_digests: LeafDigests = compute_leaf_digests(ck_disk, fmt="qcow2")
    with MemoryImageSource(ck_mem) as m:
        trees = CheckpointTrees(MerkleTree.build(m, FANOUT), disk_digests)
    with MemoryImageSource(src_mem) as sm, Qcow2OverlaySource(src_disk, backing_tree=disk_digests) as sd:
        sources: dict[str, BlockSource] = {MEMORY: sm, DISK: sd}
        mine = {name: MerkleTree.build(src, FANOUT) for name, src in sources.items()}
        seconds = target_apply_s(sources, mine, ck, trees, tmp_path, keep=True)
        assert seconds > 0
        assert (ck_mem.read_bytes(), ck_disk.read_bytes()) == before
        with MemoryImageSource(tmp_path / "apply-memory.sav") as pm, \
                Qcow2OverlaySource(tmp_path / "apply-disk.qcow2", backing_tree=disk_digests) as pd:
            assert MerkleTree.build(pm, FANOUT).root == mine[MEMORY].root
            assert MerkleTree.build(pd, FANOUT).root == mine[DISK].root
