"""bench/divergence.py: the page classification, and the ext4 layout/icheck/ncheck parsing on a
real file system made with mke2fs (no VM)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.divergence import (
    CAUSE_MEDIUM,
    CAUSE_MOVED,
    CAUSE_OTHER,
    CAUSE_RANDOM,
    CAUSE_SMALL,
    CAUSE_ZERO,
    CLASS_BBITMAP,
    CLASS_ITABLE,
    CLASS_SUPER,
    HINT_KERNEL,
    HINT_OTHER,
    HINT_PAGE_TABLE,
    HINT_PIXELS,
    HINT_SPARSE,
    HINT_TEXT,
    HINT_USER,
    _classify_page,
    _debugfs,
    gpa_bucket,
    icheck_requests,
    owner_hint,
    parse_dumpe2fs,
    parse_icheck,
    parse_ncheck,
)

CCTX = zstandard.ZstdCompressor(level=3)
PAGE = 4096


def _words(values: list[int]) -> bytes:
    return np.array((values * (512 // len(values) + 1))[:512], dtype="<u8").tobytes()


def test_classify_page() -> None:
    rng = np.random.default_rng(1)
    data = bytes(rng.integers(0, 4, PAGE, dtype=np.uint8))          # compressible, not random
    assert _classify_page(bytes(PAGE), data, False, CCTX) == CAUSE_ZERO
    assert _classify_page(data, bytes(PAGE), True, CCTX) == CAUSE_ZERO
    assert _classify_page(data, data[::-1], True, CCTX) == CAUSE_MOVED
    few = bytearray(data)
    few[100:104] = b"\xff\xff\xff\xff"
    assert _classify_page(bytes(few), data, False, CCTX) == CAUSE_SMALL
    some = bytearray(data)
    some[200:240] = bytes(range(100, 140))
    assert _classify_page(bytes(some), data, False, CCTX) == CAUSE_MEDIUM
    assert _classify_page(os.urandom(PAGE), os.urandom(PAGE), False, CCTX) == CAUSE_RANDOM
    assert _classify_page(data, data[::-1], False, CCTX) == CAUSE_OTHER


def test_owner_hint() -> None:
    assert owner_hint(bytes.fromhex("ffffff00") * 1024) == HINT_PIXELS
    assert owner_hint(bytes.fromhex("d9d9d9ff") * 1024) == HINT_PIXELS
    ptes = [0x0000_0000_1234_5067 + (i << 12) for i in range(16)] + [0x0000_0000_0001_2063]
    assert owner_hint(_words(ptes)) == HINT_PAGE_TABLE
    assert owner_hint(_words([0xFFFF_8880_0123_4560, 7, 0, 0xFFFF_FFFF_8100_0000])) == HINT_KERNEL
    assert owner_hint(_words([0x0000_7F12_3456_7890, 42, 0x0000_5555_5555_0000, 0])) == HINT_USER
    assert owner_hint((b"The quick brown fox jumps over the lazy dog.\n" * 100)[:PAGE]) == HINT_TEXT
    sparse = bytearray(PAGE)
    sparse[8:16] = b"\x01\x02\x03\x04\x05\x06\x07\x08"
    assert owner_hint(bytes(sparse)) == HINT_SPARSE
    assert owner_hint(bytes(PAGE)) == HINT_OTHER


def test_gpa_bucket() -> None:
    assert gpa_bucket(0) == "0-64"
    assert gpa_bucket((64 << 20) // PAGE) == "64-128"
    assert gpa_bucket((1 << 30) // PAGE - 1, 256) == "768-1024"


def test_icheck_and_ncheck_parsing() -> None:
    out = ("debugfs: icheck 0 100000 5000\nBlock\tInode number\n0\t<block not found>\n100000\t6491\n"
           "5000\t<block not found>\ndebugfs: ncheck 12 6491\nInode\tPathname\n12\t//bin\n"
           "6491\t/usr/lib/a.so\n6491\t/usr/lib/b.so\n")
    assert parse_icheck(out) == {0: None, 100000: 6491, 5000: None}
    assert parse_ncheck(out) == {12: "/bin", 6491: "/usr/lib/a.so"}
    reqs = icheck_requests(list(range(600)), batch=256)
    assert len(reqs) == 3 and reqs[0].startswith("icheck 0 1 2") and reqs[2].endswith("599")


DUMP = """Block size:               4096
Inode size:	          256
Inodes per group:         7680
Group 0: (Blocks 0-32767) csum 0x0b10 [ITABLE_ZEROED]
  Primary superblock at 0, Group descriptors at 1-1
  Reserved GDT blocks at 2-165
  Block bitmap at 166 (+166), csum 0xb4b0af99
  Inode bitmap at 177 (+177), csum 0x77719200
  Inode table at 188-667 (+188)
Group 1: (Blocks 32768-65535) csum 0x7688 [ITABLE_ZEROED]
  Backup superblock at 32768, Group descriptors at 32769-32769
  Reserved GDT blocks at 32770-32933
  Block bitmap at 167 (bg #0 + 167), csum 0xb4b0af99
  Inode bitmap at 178 (bg #0 + 178), csum 0x54aab4d2
  Inode table at 668-1147 (bg #0 + 668)
"""


def test_parse_dumpe2fs_layout() -> None:
    lay = parse_dumpe2fs(DUMP)
    assert (lay.block_size, lay.inode_size, lay.inodes_per_group) == (4096, 256, 7680)
    assert lay.classify(0) == (CLASS_SUPER, 0)
    assert lay.classify(32769) == (CLASS_SUPER, 1)
    assert lay.classify(167) == (CLASS_BBITMAP, 1)
    assert lay.classify(700) == (CLASS_ITABLE, 1)
    assert lay.classify(20000) is None
    assert lay.inodes_in_block(188)[:3] == [1, 2, 3] and len(lay.inodes_in_block(188)) == 16
    assert lay.inodes_in_block(669)[0] == 7680 + 16 + 1
    assert lay.inodes_in_block(20000) == []
    with pytest.raises(ValueError):
        parse_dumpe2fs("not dumpe2fs output")


@pytest.mark.skipif(any(shutil.which(t) is None for t in ("mke2fs", "dumpe2fs", "debugfs")),
                    reason="needs e2fsprogs")
def test_real_ext4_image(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("hello\n")
    (tree / "sub" / "b.bin").write_bytes(os.urandom(20000))
    img = tmp_path / "fs.img"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-d", str(tree), str(img), "8M"], check=True,
                   capture_output=True)
    lay = parse_dumpe2fs(subprocess.run(["dumpe2fs", str(img)], capture_output=True, text=True).stdout)
    assert lay.block_size == 4096 and lay.classify(0) == (CLASS_SUPER, 0)
    with tempfile.TemporaryDirectory(dir=tmp_path) as t:
        names = parse_ncheck(_debugfs(img, ["ncheck 12 13 14"], Path(t)))
        assert set(names.values()) == {"/a.txt", "/sub", "/sub/b.bin"}
        ino_b = next(i for i, n in names.items() if n == "/sub/b.bin")
        blocks = subprocess.run(["debugfs", "-R", f"blocks <{ino_b}>", str(img)], capture_output=True,
                                text=True).stdout.split()
        owners = parse_icheck(_debugfs(img, icheck_requests([int(blocks[0]), 0]), Path(t)))
    assert owners == {int(blocks[0]): ino_b, 0: None}
