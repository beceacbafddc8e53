"""The next common checkpoint: after a verified migration, both sites register the state they now
share as a checkpoint, and the migrated VM records against it (checkpoint recycling: VeCycle,
Knauth & Fetzer 2015). The way back then replays only what was done since and ships only what that
left different.

Both sites build it from what they already hold, with no more traffic, and end with byte-identical
files:

- **memory.sav** is the verified memory image: the source's saved image and the target's patched one
  are equal byte for byte (the walk covers the whole file, header included; the target's restore
  rewrites the header in place, so it puts the verified bytes back first). Its tree is the
  migration's (``Target.verified_trees``; the source's own), saved as ``memory.tree``: nothing is
  rehashed.
- **disk.qcow2** is built, not copied: an empty qcow2 overlay over an earlier checkpoint's disk (a
  relative backing path, ``../NAME/disk.qcow2``, the same at every site), into which exactly the
  4 KiB leaves whose verified digest differs from that checkpoint's are written, in leaf order, by
  ``qemu-io`` (``differ.patch.Qcow2OverlaySink``). The source's overlay and the target's patched one
  hold the same guest-visible content in different clusters; the leaf digests (the migration's trees
  and the older checkpoint's) say which leaves to write, the same at both sites, so the same qemu-io
  commands make the same file. Its sha256 is in the manifest (``files``) to compare sites.

The name is the chain's root name and a digest of both roots (``next_name``): both sites compute it
alone. On one host (``replay-migrate migrate``) both sides register the same checkpoint: whoever comes
first builds it, under the store's ``.chain.lock``, and the other finds it.

The chain per VM is bounded: a checkpoint's disk stacks over its predecessor's (one qcow2 layer per
migration) until ``chain_limit`` layers; the next one is built over the chain's root instead (all
changes since the root in one layer), so no chain grows deeper. After each registration the chain is
pruned, per VM (its *lineage*: the checkpoints since the first migration from the root, which many
VMs may share): every checkpoint of it that the newest does not stack on is deleted, unless a clone's
folder names it (a running or saved VM) or a session holds it (``checkpoint.in_use``); the root is
never deleted here.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import numpy as np

from differ.blocks import LeafDigests, Qcow2OverlaySource
from differ.merkle import MerkleTree, leaf_digest
from differ.patch import Qcow2OverlaySink
from replay_migrate.errors import CheckpointError, ImageError
from replay_migrate.files import atomic_write, locked
from replay_migrate.sparse import move
from replay_migrate.tools import run_tool
from store import checkpoint as ckpt
from store.paths import MAX_NAME_LEN, check_name, checkpoint_path, checkpoints_dir
from store.vmstate import DISK, MEMORY, CheckpointTrees, checkpoint_disk_leaves, file_stamp
from vm.machine import file_allocated

log = logging.getLogger("replay_migrate.chain")
DEFAULT_CHAIN_LIMIT = 4
"""Most qcow2 layers of migration checkpoints one disk stacks over its chain's root; the next is built
over the root again (``chain_limit`` of ``register``)."""
CHAIN_LOCK = ".chain.lock"
READ_RUN = 256
"""Leaves read from the state's disk in one go while building the next disk."""
DIGEST_CHARS = 12


def _lock() -> AbstractContextManager[None]:
    checkpoints_dir().mkdir(parents=True, exist_ok=True)
    return locked(checkpoints_dir() / CHAIN_LOCK)


def chain_root(ck: ckpt.Checkpoint) -> str:
    m = ck.manifest
    return m.chain if m.origin == ckpt.ORIGIN_MIGRATION else ck.name


def next_name(parent: ckpt.Checkpoint, roots: dict[str, bytes]) -> str:
    """The next checkpoint's name: the chain's root name and a digest of the verified roots (both
    sites compute it alone)."""
    h = hashlib.sha256(roots[MEMORY] + roots[DISK]).hexdigest()[:DIGEST_CHARS]
    return check_name(f"{chain_root(parent)[: MAX_NAME_LEN - DIGEST_CHARS - 1]}-{h}", "checkpoint")


def _relative_backing(ck_name: str) -> str:
    return f"../{ck_name}/disk.qcow2"


def prepare(parent: ckpt.Checkpoint, roots: dict[str, bytes], state_disk: Path, trees: Mapping[str, MerkleTree],
            parent_trees: CheckpointTrees, *, log_cut: tuple[int, int] = (1, 0),
            chain_limit: int = DEFAULT_CHAIN_LIMIT) -> ckpt.Checkpoint:
    """The next checkpoint with its disk built and its disk tree saved; its memory comes with
    :func:`complete` (a target restores its VM over this disk in between). ``trees``: the verified
    trees by image name (the migration's), ``state_disk``: this site's disk overlay of that state,
    ``log_cut``: (first frame not in the state, clock origin) of the agent's log (``Manifest.log_resume``)."""
    if chain_limit < 1:
        raise ValueError("chain_limit must be at least 1")
    name = next_name(parent, roots)
    ck = ckpt.Checkpoint(checkpoint_path(name))
    with _lock():
        if ck.disk.is_file() and ck.manifest_path.is_file():
            if ck.manifest.roots != {MEMORY: roots[MEMORY].hex(), DISK: roots[DISK].hex()}:
                raise CheckpointError(f"checkpoint {name!r} exists with other roots")
            return ck
        pm = parent.manifest
        depth = pm.depth + 1 if pm.origin == ckpt.ORIGIN_MIGRATION else 1
        root_name = chain_root(parent)
        backing, backing_leaves = parent, parent_trees.disk
        if depth > chain_limit:
            backing = ckpt.get(root_name)
            backing_leaves = checkpoint_disk_leaves(backing)
            depth = 1
        partial = ck.dir.with_name(f"{name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            disk = partial / "disk.qcow2"
            run_tool(["qemu-img", "create", "-q", "-f", "qcow2", "-b", _relative_backing(backing.name), "-F",
                      "qcow2", str(disk)], what=f"{disk}: qemu-img create", error=ImageError, cwd=str(partial))
            leaves = trees[DISK]
            write_differing(disk, state_disk, leaves, backing_leaves, parent_trees)
            LeafDigests(leaves.leaves, leaves.size).save(partial / "disk.leaves.npz")
            atomic_write(partial / "disk.leaves.stamp", file_stamp(disk))
            ckpt.Manifest(
                name=name, image_recipe=pm.image_recipe, image_dir=pm.image_dir, virt=pm.virt,
                memory_mib=pm.memory_mib, created=time.time(), boot_to_desktop_s=0.0, save_s=0.0,
                memory_apparent_bytes=0, memory_allocated_bytes=0, disk_allocated_bytes=file_allocated(disk),
                roots={MEMORY: roots[MEMORY].hex(), DISK: roots[DISK].hex()}, origin=ckpt.ORIGIN_MIGRATION,
                base=pm.base, parent=parent.name, backing=backing.name, chain=root_name, depth=depth,
                lineage=pm.lineage if pm.origin == ckpt.ORIGIN_MIGRATION else name,
                log_resume=log_cut[0], log_origin_us=log_cut[1],
                files={"disk.qcow2": _sha256(disk)}).save(partial / "manifest.json")
            partial.rename(ck.dir)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    log.info("next checkpoint %s: disk over %s (%d layers over %s)", name, backing.name, depth, root_name)
    return ck


def write_differing(disk: Path, state_disk: Path, leaves: MerkleTree, backing: LeafDigests,
                     parent_trees: CheckpointTrees) -> None:
    """Write into the empty overlay ``disk`` every leaf whose verified digest differs from the
    backing's, read from this site's ``state_disk``, in leaf order."""
    if leaves.size != backing.size:
        raise ImageError(f"{state_disk}: the disk is {leaves.size} bytes, its checkpoint's {backing.size}")
    differ = np.flatnonzero((leaves.leaves != backing.digests).any(axis=1))
    sink = Qcow2OverlaySink(disk, backing_tree=backing)
    try:
        with Qcow2OverlaySource(state_disk, backing_tree=parent_trees.disk) as src:
            k = 0
            while k < len(differ):
                j = k + 1
                while j < len(differ) and j - k < READ_RUN and differ[j] == differ[j - 1] + 1:
                    j += 1
                first = int(differ[k])
                data = src.read(first, j - k)
                for n in range(j - k):
                    piece = data[n * 4096 : (n + 1) * 4096]
                    if leaf_digest(piece) != leaves.leaf(first + n):
                        raise ImageError(f"{state_disk}: leaf {first + n} is not the verified content")
                    sink.write(first + n, piece)
                k = j
        sink.commit()
    except BaseException:
        sink.abort()
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def complete(ck: ckpt.Checkpoint, memory_image: Path, memory_tree: MerkleTree) -> bool:
    """Give the prepared checkpoint ``ck`` its memory image: ``memory_image`` (the verified bytes) is
    moved in, its tree saved beside it. False if the other side of a one-host migration did it
    already (``memory_image`` is then deleted)."""
    with _lock():
        if ck.memory.is_file():
            memory_image.unlink(missing_ok=True)
            return False
        m = ck.manifest
        if memory_tree.root.hex() != m.roots.get(MEMORY):
            raise CheckpointError(f"{memory_image}: its tree is not the verified state's")
        _check_head(memory_image, memory_tree)
        move(memory_image, ck.memory)
        memory_tree.save(ck.dir / "memory.tree", file_stamp(ck.memory))
        m.memory_apparent_bytes = ck.memory.stat().st_size
        m.memory_allocated_bytes = file_allocated(ck.memory)
        m.save(ck.manifest_path)
    return True


HEAD_LEAVES = 32
"""Leaves at the start of a memory image checked against its tree when it becomes a checkpoint's: the
libvirt header a target's restore rewrote and put back (~65 KB) and the stream's start."""


def _check_head(path: Path, tree: MerkleTree) -> None:
    with open(path, "rb") as f:
        for i in range(min(HEAD_LEAVES, tree.leaf_count)):
            data = f.read(4096)
            if leaf_digest(data) != tree.leaf(i):
                raise CheckpointError(f"{path}: leaf {i} is not the verified state's (its header was not put back?)")


def prune(lineage: str, *, keep: str) -> list[str]:
    """Delete the checkpoints of ``lineage`` (one VM's) that ``keep`` (its newest) does not stack on, unless a clone's
    folder names one or a session holds it (``checkpoint.in_use``); a checkpoint something kept stacks
    on is kept too. Returns the names deleted."""
    with _lock():
        members = {c.name: c for c in ckpt.list_all()
                   if _manifest_or_none(c) is not None and c.manifest.origin == ckpt.ORIGIN_MIGRATION
                   and c.manifest.lineage == lineage}
        used = {keep} | {n for n in members if ckpt.clones_of(n)}
        kept: set[str] = set()
        for n in used:
            while n in members and n not in kept:
                kept.add(n)
                n = members[n].manifest.backing
        removed = []
        for n in sorted(set(members) - kept):
            with _exclusive(members[n]) as free:
                if free and not ckpt.clones_of(n):
                    shutil.rmtree(members[n].dir)
                    removed.append(n)
        for n in sorted(set(members) - kept - set(removed)):
            kept.add(n)   # held by a session: its chain stays for now (pruned with a later checkpoint)
        if removed:
            log.info("pruned checkpoints %s of lineage %s", ", ".join(removed), lineage)
        return removed


def _manifest_or_none(c: ckpt.Checkpoint) -> ckpt.Manifest | None:
    try:
        return c.manifest
    except CheckpointError:
        return None


@contextmanager
def _exclusive(c: ckpt.Checkpoint) -> Iterator[bool]:
    """Whether no session holds ``c`` (its in-use lock taken exclusively meanwhile)."""
    try:
        fd = os.open(c.in_use_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def register(parent: ckpt.Checkpoint, roots: dict[str, bytes], memory_image: Path, state_disk: Path,
             trees: dict[str, MerkleTree], parent_trees: CheckpointTrees, *, log_cut: tuple[int, int] = (1, 0),
             chain_limit: int = DEFAULT_CHAIN_LIMIT) -> ckpt.Checkpoint:
    """:func:`prepare` and :func:`complete` at once (the source, whose VM is gone), then :func:`prune`."""
    ck = prepare(parent, roots, state_disk, trees, parent_trees, log_cut=log_cut, chain_limit=chain_limit)
    complete(ck, memory_image, trees[MEMORY])
    prune(ck.manifest.lineage, keep=ck.name)
    return ck
