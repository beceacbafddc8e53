"""A VM's state as the differ sees it: the memory image and the disk overlay of one side, and
the checkpoint both sides share.

The checkpoint's trees are computed once and kept in its folder (``memory.tree``: the Merkle tree
of its memory image; ``disk.leaves.npz``: the leaf digests of its disk's guest-visible content,
base image included; ``memory.similar.npz``: the similarity index of its memory pages, where a
source looks for the page most like one it sends), so a diff reads only what changed since the
checkpoint: the pages present in the new memory image and the clusters the clone's overlay
allocates. They are computed under a
file lock in that folder (``.trees.lock``): the source and target of a one-host migration, or two
processes, ask at the same moment, and one computes while the others wait and load.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from differ.blocks import (
    LeafDigests,
    MemoryImageSource,
    Qcow2OverlaySource,
    compute_leaf_digests,
    detect_format,
    qemu_img_info,
)
from differ.merkle import DEFAULT_FANOUT, MerkleTree, load_or_build
from differ.patch import MemoryImageSink, Qcow2OverlaySink
from differ.protocol import ProtocolParams, TransferStats
from differ.similar import SimilarityIndex, index_of
from differ.source import LEAF_SIZE, BlockSink, BlockSource
from differ.sync import baseline_bytes, sync_local
from differ.transfer import ReferenceImage, SourceImage, TargetImage
from replay_migrate.errors import ImageError
from replay_migrate.files import atomic_write, locked
from replay_migrate.savefmt import read_header
from replay_migrate.tools import run_tool
from store.checkpoint import Checkpoint

log = logging.getLogger("replay_migrate.vmstate")
FANOUT = DEFAULT_FANOUT
MEMORY = "memory"
DISK = "disk"
TREES_LOCK = ".trees.lock"
"""The lock file in a checkpoint's folder under which its trees are computed or loaded."""


def file_stamp(path: Path) -> bytes:
    """Identity of a file nobody writes in place (checkpoint files never change once made)."""
    st = path.stat()
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode()


@dataclass(frozen=True)
class CheckpointTrees:
    memory: MerkleTree
    """Tree of the checkpoint's memory image."""
    disk: LeafDigests
    """Leaf digests of the checkpoint disk's guest-visible content (the clones' backing chain)."""
    memory_similar: SimilarityIndex | None = None
    """Similarity index of the checkpoint's memory pages (:mod:`differ.similar`)."""

    @cached_property
    def disk_tree(self) -> MerkleTree:
        return MerkleTree(self.disk.digests, self.disk.size, FANOUT)


def checkpoint_trees(ck: Checkpoint) -> CheckpointTrees:
    """The checkpoint's trees, computed and saved on first use (~10-20 s), loaded afterwards; done
    once under the checkpoint's ``TREES_LOCK`` however many threads and processes ask at once."""
    lock = ExitStack()
    try:
        lock.enter_context(locked(ck.dir / TREES_LOCK))
    except OSError as e:
        raise ImageError(f"{ck.dir}: cannot lock the checkpoint's trees: {e.strerror}") from e
    with lock:
        with MemoryImageSource(ck.memory) as src:
            memory = load_or_build(src, ck.dir / "memory.tree", file_stamp(ck.memory), FANOUT)
        disk = _disk_leaves(ck)
        trees = CheckpointTrees(memory, disk, _memory_similar(ck, memory))
        m = ck.manifest
        roots = {MEMORY: memory.root.hex(), DISK: trees.disk_tree.root.hex()}
        if m.roots != roots:
            m.roots = roots
            m.save(ck.manifest_path)
        return trees


def _memory_similar(ck: Checkpoint, memory: MerkleTree) -> SimilarityIndex:
    """The similarity index of the checkpoint's non-zero memory pages, computed once (~3 s for a
    1 GiB guest) and loaded afterwards (called under the trees lock)."""
    path, stamp_path = ck.dir / "memory.similar.npz", ck.dir / "memory.similar.stamp"
    if path.exists() and stamp_path.exists() and stamp_path.read_bytes() == file_stamp(ck.memory):
        try:
            return SimilarityIndex.load(path, expect_leaves=memory.leaf_count)
        except ImageError as e:
            log.warning("recomputing the similarity index of %s: %s", ck.name, e)
    log.info("sketching the memory pages of checkpoint %s (once)", ck.name)
    full = np.arange(memory.leaf_count, dtype=np.int64)
    full = full[~memory.zero_mask() & (full < memory.size // LEAF_SIZE)]
    with MemoryImageSource(ck.memory) as src:
        index = index_of(memory.leaf_count, full, src.read)
    index.save(path)
    try:
        atomic_write(stamp_path, file_stamp(ck.memory))
    except OSError as e:
        raise ImageError(f"{stamp_path}: cannot write: {e.strerror}") from e
    return index


def _disk_leaves(ck: Checkpoint) -> LeafDigests:
    """(Under the checkpoint's TREES_LOCK) its disk's leaf digests, saved or computed and saved."""
    digests_path = ck.dir / "disk.leaves.npz"
    stamp_path = ck.dir / "disk.leaves.stamp"
    disk: LeafDigests | None = None
    if digests_path.exists() and stamp_path.exists() and stamp_path.read_bytes() == file_stamp(ck.disk):
        try:
            size = qemu_img_info(str(ck.disk), fmt="qcow2", force_share=True)[0].get("virtual-size")
            if not isinstance(size, int):
                raise ImageError(f"{ck.disk}: qemu-img info gives no virtual size")
            disk = LeafDigests.load(digests_path, expect_size=size)   # a file of another size is stale
        except ImageError as e:
            log.warning("recomputing the disk digests of %s: %s", ck.name, e)
    if disk is None:
        log.info("hashing the guest-visible disk of checkpoint %s (once)", ck.name)
        disk = compute_leaf_digests(ck.disk, fmt="qcow2")
        disk.save(digests_path)             # then the stamp that says it is current
        try:
            atomic_write(stamp_path, file_stamp(ck.disk))
        except OSError as e:
            raise ImageError(f"{stamp_path}: cannot write: {e.strerror}") from e
    return disk


def checkpoint_disk_leaves(ck: Checkpoint) -> LeafDigests:
    """The leaf digests of the checkpoint's guest-visible disk only (computed once, as in
    :func:`checkpoint_trees`)."""
    lock = ExitStack()
    try:
        lock.enter_context(locked(ck.dir / TREES_LOCK))
    except OSError as e:
        raise ImageError(f"{ck.dir}: cannot lock the checkpoint's trees: {e.strerror}") from e
    with lock:
        return _disk_leaves(ck)


@dataclass(frozen=True)
class VmState:
    """One side's state at suspend: a sparse memory image and a qcow2 overlay on ``checkpoint``."""

    memory: Path
    disk: Path
    checkpoint: Checkpoint

    def check(self) -> None:
        for p, kind in ((self.memory, "memory"), (self.disk, "disk")):
            if not p.is_file():
                raise ImageError(f"{p}: no such {kind} image")
            if detect_format(p) != kind:
                raise ImageError(f"{p}: not a {'sparse save image' if kind == 'memory' else 'qcow2 overlay'}")


@contextmanager
def open_sources(state: VmState, trees: CheckpointTrees) -> Iterator[dict[str, BlockSource]]:
    state.check()
    with ExitStack() as stack:
        yield {MEMORY: stack.enter_context(MemoryImageSource(state.memory)),
               DISK: stack.enter_context(Qcow2OverlaySource(state.disk, backing_tree=trees.disk))}


def build_trees(sources: dict[str, BlockSource]) -> dict[str, MerkleTree]:
    return {name: MerkleTree.build(src, FANOUT) for name, src in sources.items()}


def open_and_build(state: VmState, trees: CheckpointTrees,
                   stack: ExitStack) -> tuple[dict[str, BlockSource], dict[str, MerkleTree]]:
    """:func:`open_sources` onto ``stack`` and :func:`build_trees`, the disk overlay opened (a
    ``qemu-img info`` and ``map``: ~25 ms of waiting on processes, inside the downtime) in a
    thread while the memory image hashes. Whatever fails, what was opened is on ``stack`` or
    closed."""
    state.check()
    memory = stack.enter_context(MemoryImageSource(state.memory))
    with ThreadPoolExecutor(1, thread_name_prefix="open-disk") as pool:
        opening = pool.submit(Qcow2OverlaySource, state.disk, backing_tree=trees.disk)
        try:
            memory_tree = MerkleTree.build(memory, FANOUT)
        except BaseException:
            with suppress(BaseException):
                opening.result().close()
            raise
        disk = stack.enter_context(opening.result())
    return {MEMORY: memory, DISK: disk}, {MEMORY: memory_tree, DISK: MerkleTree.build(disk, FANOUT)}


def source_images(sources: dict[str, BlockSource], trees: dict[str, MerkleTree],
                  bases: dict[str, ReferenceImage] | None = None) -> list[SourceImage]:
    """The source's images; with ``bases`` (see :func:`checkpoint_images`), each with the
    checkpoint's as its base (base-relative walk, XOR answers)."""
    bases = bases or {}
    return [SourceImage(name, src, trees[name], base=bases.get(name)) for name, src in sources.items()]


def checkpoint_images(ck: Checkpoint, trees: CheckpointTrees, stack: ExitStack) -> dict[str, ReferenceImage]:
    """The checkpoint's memory image and disk as either side reads them: the bases of its images
    (and, at the target, the memory one a reference). Opened with shared access: running clones hold the disk as
    their backing file, and nothing writes a checkpoint once clones exist."""
    memory = stack.enter_context(MemoryImageSource(ck.memory))
    disk = stack.enter_context(Qcow2OverlaySource(ck.disk, force_share=True))
    return {MEMORY: ReferenceImage(memory, trees.memory, trees.memory_similar),
            DISK: ReferenceImage(disk, trees.disk_tree)}


def make_sinks(state: VmState, trees: CheckpointTrees, *, durable: bool = True,
               in_place: bool = False) -> dict[str, BlockSink]:
    """Sinks that patch copies of ``state``'s images. Making them copies the memory image (~1 s
    for a 1 GiB guest here), so the target does it while it hashes its images. ``durable=False``:
    nothing waits for the disk at commit (see ``differ.patch``), for a target that restores at
    once. ``in_place``: patch the images themselves (no copy; an abort deletes them): only for a
    state that is discarded unless verified, a migration target's clone."""
    memory = MemoryImageSink(state.memory, durable=durable, in_place=in_place)
    try:
        disk = Qcow2OverlaySink(state.disk, backing_tree=trees.disk, durable=durable, in_place=in_place)
    except BaseException:
        memory.abort()
        raise
    return {MEMORY: memory, DISK: disk}


@contextmanager
def open_target_images(state: VmState, trees: CheckpointTrees, sources: dict[str, BlockSource],
                       source_trees: dict[str, MerkleTree], *, dry_run: bool = False,
                       bases: dict[str, ReferenceImage] | None = None,
                       sinks: dict[str, BlockSink] | None = None) -> Iterator[list[TargetImage]]:
    """The target's images with sinks that patch copies (replacing the originals only on commit;
    ``sinks`` from :func:`make_sinks`, made here if not given, aborted on exit unless committed);
    ``bases`` (see :func:`checkpoint_images`) enable the base-relative walk."""
    made: dict[str, BlockSink | None] = {MEMORY: None, DISK: None}
    if sinks is not None:
        made.update(sinks)
    elif not dry_run:
        made.update(make_sinks(state, trees))
    bases = bases or {}
    try:
        yield [TargetImage(name, sources[name], source_trees[name], made[name], base=bases.get(name))
               for name in (MEMORY, DISK)]
    finally:
        for sink in made.values():
            if sink is not None:
                sink.abort()      # no-op after commit


def references(bases: dict[str, ReferenceImage]) -> list[ReferenceImage]:
    """Content the target holds besides its own images, for content references: the checkpoint's
    memory image and its disk. The disk is mostly the target's own backing data, but not where the
    target wrote over it: a page of file data the source holds in memory (its page cache of a file
    the target's replay rewrote or deleted) is still in the checkpoint's disk, and it travels as a
    reference instead of a block."""
    return [bases[MEMORY], bases[DISK]]


def plain_transfer_bytes(sources: dict[str, BlockSource], trees: dict[str, MerkleTree],
                         ck_trees: CheckpointTrees) -> int:
    """DESIGN.md §9 ``baseline_bytes``: zstd of every block that differs from the checkpoint."""
    return (baseline_bytes(sources[MEMORY], trees[MEMORY], ck_trees.memory)
            + baseline_bytes(sources[DISK], trees[DISK], ck_trees.disk_tree))


def sync_states(a: VmState, b: VmState, *, params: ProtocolParams | None = None,
                dry_run: bool = False) -> tuple[TransferStats, int]:
    """Make B's images equal A's through the transfer protocol in memory (one host), with the
    checkpoint as reference content. Returns (stats, plain transfer bytes of A)."""
    if a.checkpoint.name != b.checkpoint.name:
        raise ImageError(f"{a.memory} and {b.memory} are not of one checkpoint")
    trees = checkpoint_trees(a.checkpoint)
    with ExitStack() as stack:
        src_a = stack.enter_context(open_sources(a, trees))
        src_b = stack.enter_context(open_sources(b, trees))
        trees_a = build_trees(src_a)
        baseline = plain_transfer_bytes(src_a, trees_a, trees)
        bases = checkpoint_images(a.checkpoint, trees, stack)
        timgs = stack.enter_context(open_target_images(b, trees, src_b, build_trees(src_b), dry_run=dry_run,
                                                       bases=bases))
        refs = [(r.source, r.tree) for r in references(bases)]
        stats = sync_local(src_a, {t.name: (t.source, t.sink) for t in timgs}, source_trees=trees_a,
                           target_trees={t.name: t.tree for t in timgs}, references=refs, fanout=FANOUT,
                           params=params, dry_run=dry_run,
                           bases={name: (r.source, r.tree) for name, r in bases.items()},
                           similar={name: r.similar for name, r in bases.items() if r.similar is not None})
        return stats, baseline


def guest_state(path: Path) -> bytes:
    """A memory image without its libvirt header (domain name, UUID, file paths): what the guest
    and QEMU's devices hold. Two sides' images of one state differ only in that header."""
    h = read_header(path)
    with open(path, "rb") as f:
        f.seek(h.qemu_offset)
        return f.read()


def same_state(a: VmState, b: VmState) -> tuple[bool, bool]:
    """(memory equal, disk equal) of two states on this host: the memory images' guest parts
    byte for byte, the disks as the guests see them (``qemu-img compare``)."""
    memory = guest_state(a.memory) == guest_state(b.memory)
    r = run_tool(["qemu-img", "compare", "-q", "-U", "-f", "qcow2", "-F", "qcow2", a.disk, b.disk],
                 what=f"{a.disk}: qemu-img compare with {b.disk}", error=ImageError, check=False)
    if r.returncode not in (0, 1):       # 0: same, 1: different, anything else: it could not tell
        raise ImageError(f"{a.disk}: qemu-img compare with {b.disk} failed: {r.stderr.strip()[-300:]}")
    return memory, r.returncode == 0
