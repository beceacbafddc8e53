"""Why the replayed target still differs from the source: its blocks, named and sorted by cause.

Both states are the ones saved at suspend, read from the host (never from inside a guest: a probe
there dirties thousands of pages by itself). Memory leaves are labelled by RAM block
(``MemoryImageSource.label``) and, in ``pc.ram``, by guest-physical range (RAM offset = address
below 4 GiB on a 1 GiB x86 guest), then sorted by what the two pages look like. Disk leaves are
looked up in the ext4 layout (``dumpe2fs``) and with ``debugfs icheck``/``ncheck`` on raw exports
(``qemu-img convert``): metadata, journal, or which file.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zstandard

from differ.blocks import MemoryImageSource, Qcow2OverlaySource
from differ.merkle import MerkleTree
from differ.source import LEAF_SIZE
from store.vmstate import FANOUT, CheckpointTrees

GPA_BUCKET_MIB = 64
"""Width of the guest-physical ranges divergent ``pc.ram`` pages are counted in."""
SMALL_DIFF_BYTES = 8
MEDIUM_DIFF_BYTES = 64
RANDOM_PAGE_MIN_ZSTD = 4000
"""A page whose zstd is at least this long (of 4096) is random data (e.g. from /dev/urandom)."""
MAIN_RAM_BLOCK = "pc.ram"
TOOL_TIMEOUT_S = 300.0
ICHECK_BATCH = 256
"""Blocks per ``icheck`` request in one debugfs command file."""
TOP_FILES = 12
"""Files listed by name per workload (the rest are summed)."""

CAUSE_DEVICE = "device state / save header (non-RAM)"
CAUSE_ZERO = "zero on one side (page allocated on one side only)"
CAUSE_MOVED = "content present elsewhere at the target (page placement)"
CAUSE_SMALL = f"<= {SMALL_DIFF_BYTES} bytes differ (counters, timestamps)"
CAUSE_MEDIUM = f"{SMALL_DIFF_BYTES + 1}-{MEDIUM_DIFF_BYTES} bytes differ (pointers, small fields)"
CAUSE_RANDOM = "random content (e.g. /dev/urandom data, keys)"
CAUSE_OTHER = f"> {MEDIUM_DIFF_BYTES} bytes differ (other data)"

HINT_MIN_SHARE = 0.10
"""Share of a page's 64-bit words that must look like pointers of one kind to name its owner."""
PTE_MIN_SHARE = 0.90
"""Share of a page's non-zero words that must look like page-table entries (at least 8 of them)."""
TEXT_MIN_SHARE = 0.75
"""Share of printable bytes (of the non-zero bytes, at least 256) that makes a page text."""
GUEST_RAM_BYTES = 1 << 30
"""Physical addresses a page-table entry may point at (the guest's RAM)."""
PIXEL_MIN_SHARE = 0.90
"""Share of 32-bit words (at least half of them non-zero) whose fourth byte is 0x00 or 0xff:
X pixels (xRGB/ARGB) of the framebuffer copy, pixmaps and window contents."""
SPARSE_MIN_ZERO_SHARE = 0.90
HINT_PAGE_TABLE = "page table"
HINT_PIXELS = "pixels (X framebuffer, pixmaps)"
HINT_SPARSE = "mostly zeros (a few fields)"
HINT_KERNEL = "kernel data (kernel pointers)"
HINT_USER = "process memory (user-space pointers)"
HINT_TEXT = "text"
HINT_OTHER = "unrecognised"
_PTE_FLAG_BITS = np.uint64(0x7FF0_0000_0000_0000)
_PTE_ADDR_BITS = np.uint64(0x000F_FFFF_FFFF_F000)
_USER_LO, _USER_HI = np.uint64(0x0000_5500_0000_0000), np.uint64(0x0000_8000_0000_0000)
_PRINTABLE = np.zeros(256, dtype=bool)
_PRINTABLE[0x20:0x7F] = True
_PRINTABLE[[0x09, 0x0A, 0x0D]] = True


def owner_hint(page: bytes, *, ram_bytes: int = GUEST_RAM_BYTES) -> str:
    """Who probably owns a guest page, from its content alone (the host's view: no guest symbols).
    A heuristic: page tables, X pixels, text, kernel objects full of kernel pointers, process memory
    full of user-space pointers, nearly empty pages."""
    if len(page) % 8 or not any(page):
        return HINT_OTHER
    words = np.frombuffer(page, dtype="<u8")
    nz = words[words != 0]
    if len(nz) >= 8:
        pte = ((nz & np.uint64(1)) == 1) & ((nz & _PTE_FLAG_BITS) == 0) & ((nz & _PTE_ADDR_BITS) < ram_bytes)
        if pte.mean() >= PTE_MIN_SHARE:
            return HINT_PAGE_TABLE
    raw = np.frombuffer(page, dtype=np.uint8)
    if len(page) % 4 == 0:
        px = np.frombuffer(page, dtype="<u4")
        fourth = raw[3::4]
        if (px != 0).mean() >= 0.5 and max((fourth == 0).mean(), (fourth == 0xFF).mean()) >= PIXEL_MIN_SHARE:
            return HINT_PIXELS
    nzb = raw[raw != 0]
    if len(nzb) >= 256 and _PRINTABLE[nzb].mean() >= TEXT_MIN_SHARE:
        return HINT_TEXT
    kernel = float(((words >> np.uint64(48)) == 0xFFFF).mean())
    user = float(((words >= _USER_LO) & (words < _USER_HI)).mean())
    if max(kernel, user) >= HINT_MIN_SHARE:
        return HINT_KERNEL if kernel >= user else HINT_USER
    if (words == 0).mean() >= SPARSE_MIN_ZERO_SHARE:
        return HINT_SPARSE
    return HINT_OTHER


@dataclass
class MemoryDivergence:
    total: int = 0
    by_block: dict[str, int] = field(default_factory=dict)
    by_cause: dict[str, int] = field(default_factory=dict)
    by_owner: dict[str, int] = field(default_factory=dict)
    """A content heuristic (:func:`owner_hint`) over the source's page (the target's if zero)."""
    owner_cause: dict[str, dict[str, int]] = field(default_factory=dict)
    """``by_owner`` split by cause: which kind of page differs how."""
    gpa_mib: dict[str, int] = field(default_factory=dict)
    """``pc.ram`` divergent pages per guest-physical range, ``"START-END"`` in MiB."""
    median_bytes_differing: float = 0.0


def _classify_page(a: bytes, b: bytes, moved: bool, cctx: zstandard.ZstdCompressor) -> str:
    if not any(a) or not any(b):
        return CAUSE_ZERO
    if moved:
        return CAUSE_MOVED
    n = _bytes_differing(a, b)
    if n <= SMALL_DIFF_BYTES:
        return CAUSE_SMALL
    if n <= MEDIUM_DIFF_BYTES:
        return CAUSE_MEDIUM
    if len(cctx.compress(a)) >= RANDOM_PAGE_MIN_ZSTD:
        return CAUSE_RANDOM
    return CAUSE_OTHER


def _bytes_differing(a: bytes, b: bytes) -> int:
    if len(a) != len(b):
        return max(len(a), len(b))
    return int(np.count_nonzero(np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8)))


def gpa_bucket(page: int, bucket_mib: int = GPA_BUCKET_MIB) -> str:
    lo = page * LEAF_SIZE // (bucket_mib << 20) * bucket_mib
    return f"{lo}-{lo + bucket_mib}"


def memory_divergence(source: Path, target: Path, *, bucket_mib: int = GPA_BUCKET_MIB) -> MemoryDivergence:
    """Compare two memory images leaf by leaf and sort the differing leaves."""
    out = MemoryDivergence()
    cctx = zstandard.ZstdCompressor(level=3)
    with closing(MemoryImageSource(source)) as a, closing(MemoryImageSource(target)) as b:
        ta, tb = MerkleTree.build(a, FANOUT), MerkleTree.build(b, FANOUT)
        leaves = ta.differing_leaves(tb)
        held = {bytes(d) for d in tb.leaves[~tb.zero_mask()]}
        main = next((blk for blk in a.layout.blocks if blk.name == MAIN_RAM_BLOCK and not blk.ignored), None)
        by_block: Counter[str] = Counter()
        by_cause: Counter[str] = Counter()
        by_owner: Counter[str] = Counter()
        cross: Counter[tuple[str, str]] = Counter()
        gpa: Counter[str] = Counter()
        ndiff: list[int] = []
        for i in leaves.tolist():
            if i >= a.leaf_count:
                by_block["non-ram"] += 1
                by_cause[CAUSE_DEVICE] += 1
                continue
            label = a.label(i)
            by_block[label] += 1
            pa = a.read(i)
            pb = b.read(i) if i < b.leaf_count else bytes(len(pa))
            if label == "non-ram":
                by_cause[CAUSE_DEVICE] += 1
                continue
            ndiff.append(_bytes_differing(pa, pb))
            cause = _classify_page(pa, pb, ta.leaf(i) in held, cctx)
            owner = owner_hint(pa if any(pa) else pb)
            by_cause[cause] += 1
            by_owner[owner] += 1
            cross[(owner, cause)] += 1
            if main is not None and label == MAIN_RAM_BLOCK:
                gpa[gpa_bucket(i - main.pages_offset // LEAF_SIZE, bucket_mib)] += 1
    out.total = len(leaves)
    out.by_block = dict(by_block.most_common())
    out.by_cause = dict(by_cause.most_common())
    out.by_owner = dict(by_owner.most_common())
    out.owner_cause = {o: {c: n for (o2, c), n in cross.most_common() if o2 == o} for o in out.by_owner}
    out.gpa_mib = dict(sorted(gpa.items(), key=lambda kv: int(kv[0].split("-")[0])))
    out.median_bytes_differing = float(np.median(ndiff)) if ndiff else 0.0
    return out


# ---- disk ------------------------------------------------------------------------------------------
CLASS_SUPER = "superblock / group descriptors"
CLASS_BBITMAP = "block bitmap"
CLASS_IBITMAP = "inode bitmap"
CLASS_ITABLE = "inode table (inode fields: times, sizes, generation)"
CLASS_JOURNAL = "journal"
CLASS_RESIZE = "reserved GDT (resize inode)"
CLASS_DIR = "directory blocks"
CLASS_FILE = "file data"
CLASS_OTHER_INODE = "other inode's blocks"
CLASS_FREE = "unallocated on both sides"
CLASS_UNKNOWN = "not classified (no debugfs/dumpe2fs)"
JOURNAL_INO, RESIZE_INO, ROOT_INO = 8, 7, 2
S_IFMT, S_IFDIR, S_IFREG = 0o170000, 0o040000, 0o100000


@dataclass
class Ext4Layout:
    block_size: int
    inode_size: int
    inodes_per_group: int
    ranges: list[tuple[int, int, str, int]]
    """(first block, last block, class, group) of every metadata region."""

    def classify(self, block: int) -> tuple[str, int] | None:
        for lo, hi, what, group in self.ranges:
            if lo <= block <= hi:
                return what, group
        return None

    def itable_start(self, group: int) -> int:
        for lo, _hi, what, g in self.ranges:
            if what == CLASS_ITABLE and g == group:
                return lo
        raise KeyError(group)

    def inodes_in_block(self, block: int) -> list[int]:
        """Inode numbers whose records lie in inode-table block ``block``."""
        hit = self.classify(block)
        if hit is None or hit[0] != CLASS_ITABLE:
            return []
        group = hit[1]
        per_block = self.block_size // self.inode_size
        first = group * self.inodes_per_group + (block - self.itable_start(group)) * per_block + 1
        return list(range(first, first + per_block))


def _field(text: str, name: str) -> int:
    m = re.search(rf"^{re.escape(name)}:\s+(\d+)", text, re.MULTILINE)
    if m is None:
        raise ValueError(f"dumpe2fs output has no {name!r}")
    return int(m.group(1))


def parse_dumpe2fs(text: str) -> Ext4Layout:
    """The metadata regions of every block group from ``dumpe2fs`` output."""
    ranges: list[tuple[int, int, str, int]] = []
    group = -1
    patterns = [
        (re.compile(r"superblock at (\d+)"), CLASS_SUPER),
        (re.compile(r"Group descriptors at (\d+)-(\d+)"), CLASS_SUPER),
        (re.compile(r"Reserved GDT blocks at (\d+)-(\d+)"), CLASS_RESIZE),
        (re.compile(r"Block bitmap at (\d+)"), CLASS_BBITMAP),
        (re.compile(r"Inode bitmap at (\d+)"), CLASS_IBITMAP),
        (re.compile(r"Inode table at (\d+)-(\d+)"), CLASS_ITABLE),
    ]
    for line in text.splitlines():
        m = re.match(r"Group (\d+):", line)
        if m:
            group = int(m.group(1))
            continue
        for rx, what in patterns:
            for hit in rx.finditer(line):
                lo = int(hit.group(1))
                hi = int(hit.group(2)) if rx.groups == 2 else lo
                ranges.append((lo, hi, what, group))
    return Ext4Layout(_field(text, "Block size"), _field(text, "Inode size"),
                      _field(text, "Inodes per group"), ranges)


def parse_icheck(text: str) -> dict[int, int | None]:
    """``icheck`` lines ``BLOCK\\tINODE`` (or ``<block not found>``)."""
    out: dict[int, int | None] = {}
    for m in re.finditer(r"^(\d+)\t(\d+|<block not found>)\s*$", text, re.MULTILINE):
        out[int(m.group(1))] = int(m.group(2)) if m.group(2).isdigit() else None
    return out


def parse_ncheck(text: str) -> dict[int, str]:
    """``ncheck`` lines ``INODE\\tPATH`` (the first name of each inode)."""
    out: dict[int, str] = {}
    for m in re.finditer(r"^(\d+)\t(/.*?)\s*$", text, re.MULTILINE):
        out.setdefault(int(m.group(1)), re.sub(r"^/+", "/", m.group(2)))
    return out


def debugfs_script(requests: Iterable[str]) -> str:
    return "".join(f"{r}\n" for r in requests)


def icheck_requests(blocks: Sequence[int], batch: int = ICHECK_BATCH) -> list[str]:
    return [" ".join(["icheck", *map(str, blocks[i:i + batch])]) for i in range(0, len(blocks), batch)]


@dataclass
class DiskDivergence:
    total: int = 0
    by_class: dict[str, int] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    """Divergent data blocks per file path (top :data:`TOP_FILES`, the rest as ``(others)``)."""
    inodes: dict[str, int] = field(default_factory=dict)
    """Files whose inode record differs (what the inode-table blocks carry)."""
    note: str = ""


def _debugfs(raw: Path, requests: Sequence[str], tmp: Path) -> str:
    if not requests:
        return ""
    script = tmp / "debugfs.cmds"
    script.write_text(debugfs_script(requests))
    r = subprocess.run(["debugfs", "-f", str(script), str(raw)], capture_output=True, text=True,
                       timeout=TOOL_TIMEOUT_S, check=False)
    return r.stdout


def _export_raw(disk: Path, out: Path) -> None:
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(disk), str(out)],
                   check=True, capture_output=True, timeout=TOOL_TIMEOUT_S)


def _mode(raw_fd: int, layout: Ext4Layout, ino: int) -> int:
    group, index = divmod(ino - 1, layout.inodes_per_group)
    off = layout.itable_start(group) * layout.block_size + index * layout.inode_size
    (mode,) = struct.unpack("<H", os.pread(raw_fd, 2, off))
    return int(mode)


def _top(counts: Counter[str], n: int = TOP_FILES) -> dict[str, int]:
    out = dict(counts.most_common(n))
    rest = sum(counts.values()) - sum(out.values())
    if rest:
        out["(others)"] = rest
    return out


def divergent_disk_leaves(source: Path, target: Path, trees: CheckpointTrees) -> list[int]:
    with Qcow2OverlaySource(source, backing_tree=trees.disk) as a, \
            Qcow2OverlaySource(target, backing_tree=trees.disk) as b:
        diff: list[int] = MerkleTree.build(a, FANOUT).differing_leaves(MerkleTree.build(b, FANOUT)).tolist()
        return diff


def disk_divergence(source: Path, target: Path, trees: CheckpointTrees, work: Path) -> DiskDivergence:
    """Sort the divergent disk leaves of two overlays by what ext4 keeps in them."""
    leaves = divergent_disk_leaves(source, target, trees)
    out = DiskDivergence(total=len(leaves))
    if not leaves:
        return out
    if shutil.which("debugfs") is None or shutil.which("dumpe2fs") is None:
        out.by_class = {CLASS_UNKNOWN: len(leaves)}
        out.note = "e2fsprogs (debugfs, dumpe2fs) not installed"
        return out
    with tempfile.TemporaryDirectory(prefix="rm-bench-fs-", dir=work) as t:
        tmp = Path(t)
        raws = [tmp / "source.raw", tmp / "target.raw"]
        _export_raw(source, raws[0])
        _export_raw(target, raws[1])
        dump = subprocess.run(["dumpe2fs", str(raws[0])], capture_output=True, text=True,
                              timeout=TOOL_TIMEOUT_S, check=False)
        try:
            layout = parse_dumpe2fs(dump.stdout)
        except ValueError as e:
            out.by_class = {CLASS_UNKNOWN: len(leaves)}
            out.note = f"not an ext4 file system at offset 0 ({e})"
            return out
        per_leaf = max(1, LEAF_SIZE // layout.block_size)
        blocks = [leaf * per_leaf for leaf in leaves]        # the first fs block of each leaf
        classes: Counter[str] = Counter()
        files: Counter[str] = Counter()
        owner: dict[int, int | None] = {}
        unowned: list[int] = []
        itable_blocks: list[int] = []
        for blk in blocks:
            hit = layout.classify(blk)
            if hit is None:
                unowned.append(blk)
            elif hit[0] == CLASS_ITABLE:
                itable_blocks.append(blk)
            else:
                classes[hit[0]] += 1
        for raw in raws:           # the source's owner first; the target's for blocks only it uses
            todo = [b for b in unowned if owner.get(b) is None]
            for blk, ino in parse_icheck(_debugfs(raw, icheck_requests(todo), tmp)).items():
                if owner.get(blk) is None:
                    owner[blk] = ino
        inodes = sorted({i for i in owner.values() if i is not None and i > ROOT_INO and i != JOURNAL_INO})
        # inode records that differ inside the divergent inode-table blocks
        changed: list[int] = []
        fds = [os.open(r, os.O_RDONLY) for r in raws]
        try:
            for blk in itable_blocks:
                classes[CLASS_ITABLE] += 1
                a, b = (os.pread(fd, layout.block_size, blk * layout.block_size) for fd in fds)
                for k, ino in enumerate(layout.inodes_in_block(blk)):
                    s = slice(k * layout.inode_size, (k + 1) * layout.inode_size)
                    if a[s] != b[s]:
                        changed.append(ino)
            modes = {ino: _mode(fds[0], layout, ino) for ino in inodes}
        finally:
            for fd in fds:
                os.close(fd)
        names = parse_ncheck(_debugfs(raws[0], [" ".join(["ncheck", *map(str, sorted({*inodes, *changed}))])]
                                      if inodes or changed else [], tmp))
        for blk in unowned:
            ino = owner.get(blk)
            if ino is None:
                classes[CLASS_FREE] += 1
            elif ino == JOURNAL_INO:
                classes[CLASS_JOURNAL] += 1
            elif ino == RESIZE_INO:
                classes[CLASS_RESIZE] += 1
            elif ino == ROOT_INO or modes.get(ino, 0) & S_IFMT == S_IFDIR:
                classes[CLASS_DIR] += 1
                files[names.get(ino, "/") + " (dir)"] += 1
            elif modes.get(ino, 0) & S_IFMT == S_IFREG:
                classes[CLASS_FILE] += 1
                files[names.get(ino, f"<inode {ino}: no name, a deleted file>")] += 1
            else:
                classes[CLASS_OTHER_INODE] += 1
        inode_names: Counter[str] = Counter()
        for ino in changed:
            inode_names[names.get(ino, "/" if ino == ROOT_INO else f"<inode {ino}: no name, a deleted file>")] += 1
    out.by_class = dict(classes.most_common())
    out.files = _top(files)
    out.inodes = _top(inode_names)
    if per_leaf > 1:
        out.note = f"ext4 blocks of {layout.block_size} bytes: each 4 KiB leaf classified by its first block"
    return out
