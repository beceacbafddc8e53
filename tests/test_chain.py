"""store.chain without a guest (qemu-img and qemu-io on small images): the next checkpoint's files are
the same bytes at two sites whose overlays hold the same content in other clusters, its name is the
same at both, the chain is bounded and pruned but never under a clone. (A real there-and-back:
tests/test_fromdomain.py.)"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from differ.blocks import LeafDigests, Qcow2OverlaySource, RawImageSource, compute_leaf_digests
from differ.merkle import MerkleTree
from replay_migrate.errors import CheckpointError
from store import chain
from store import checkpoint as ckpt
from store.paths import checkpoint_path
from store.vmstate import DISK, MEMORY, CheckpointTrees, file_stamp

SIZE = 8 << 20


def qemu_io(path: Path, *cmds: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run([*argv, str(path)], check=True, capture_output=True)


def make_root(name: str) -> ckpt.Checkpoint:
    """A root checkpoint in the current state root: a qcow2 disk with content, a memory "image"."""
    ck = ckpt.Checkpoint(checkpoint_path(name))
    ck.dir.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(ck.disk), str(SIZE)], check=True)
    qemu_io(ck.disk, "write -P 0x11 0 1M")
    ck.memory.write_bytes(os.urandom(64 << 10))
    ckpt.Manifest(name=name, image_recipe="", image_dir="", virt="qemu", memory_mib=1, created=0.0,
                  boot_to_desktop_s=0.0, save_s=0.0, memory_apparent_bytes=0, memory_allocated_bytes=0,
                  disk_allocated_bytes=0, origin=ckpt.ORIGIN_DOMAIN, base={"path": str(ck.disk)}).save(ck.manifest_path)
    return ck


def trees_of(ck: ckpt.Checkpoint) -> CheckpointTrees:
    with RawImageSource(ck.memory) as src:
        return CheckpointTrees(MerkleTree.build(src), compute_leaf_digests(ck.disk, fmt="qcow2"))


def state_over(ck: ckpt.Checkpoint, path: Path, writes: list[str]) -> Path:
    """A VM's overlay over ``ck``'s disk, written to."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(ck.disk), "-F", "qcow2", str(path)],
                   check=True)
    qemu_io(path, *writes)
    return path


def verified(state: Path, memory: Path, ck_trees: CheckpointTrees) -> tuple[dict[str, bytes], dict[str, MerkleTree]]:
    with Qcow2OverlaySource(state, backing_tree=ck_trees.disk) as d, RawImageSource(memory) as m:
        trees = {DISK: MerkleTree.build(d), MEMORY: MerkleTree.build(m)}
    return {k: t.root for k, t in trees.items()}, trees


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_two_sites_build_byte_identical_next_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    memory = os.urandom(64 << 10)
    built: list[tuple[str, str, str]] = []
    # the same content at both sites, in other clusters: the target's replay also touched a leaf it
    # then patched back to the checkpoint's content, and wrote its leaves in another order
    writes = {"source": ["write -P 0x22 2M 8k", "write -P 0x33 5M 4k"],
              "target": ["write -P 0x33 5M 4k", "write -P 0x11 64k 4k", "write -P 0x22 2M 8k"]}
    for site, w in writes.items():
        monkeypatch.setenv("REPLAY_MIGRATE_STATE", str(tmp_path / site))
        root = make_root("desk")
        root.memory.write_bytes((tmp_path / "site-a-memory").read_bytes() if built else root.memory.read_bytes())
        if not built:
            (tmp_path / "site-a-memory").write_bytes(root.memory.read_bytes())
        ck_trees = trees_of(root)
        state = state_over(root, tmp_path / f"{site}.qcow2", w)
        image = tmp_path / f"{site}.sav"
        image.write_bytes(memory)
        roots, trees = verified(state, image, ck_trees)
        nxt = chain.register(root, roots, image, state, trees, ck_trees)
        assert not image.exists()                         # moved in
        assert nxt.memory.read_bytes() == memory
        m = nxt.manifest
        assert (m.origin, m.parent, m.backing, m.chain, m.depth, m.lineage) == \
            ("migration", "desk", "desk", "desk", 1, nxt.name)
        assert m.files["disk.qcow2"] == sha(nxt.disk)
        # its trees are the migration's, saved beside it with the stamps that make them current
        tree, stamp = MerkleTree.load(nxt.dir / "memory.tree")
        assert tree.root == roots[MEMORY] and stamp == file_stamp(nxt.memory)
        assert (nxt.dir / "disk.leaves.stamp").read_bytes() == file_stamp(nxt.disk)
        built.append((nxt.name, sha(nxt.disk), sha(nxt.memory)))
    assert built[0] == built[1]
    assert built[0][0].startswith("desk-")


def test_the_chain_is_bounded_and_pruned_but_not_under_a_clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLAY_MIGRATE_STATE", str(tmp_path / "s"))
    parent = make_root("desk")
    names: list[str] = []
    for n in range(4):
        ck_trees = trees_of(parent) if parent.manifest.origin != "migration" else _loaded(parent)
        state = state_over(parent, tmp_path / f"s{n}.qcow2", [f"write -P {0x40 + n} {n}M 4k"])
        image = tmp_path / f"m{n}"
        image.write_bytes(os.urandom(8192))
        roots, trees = verified(state, image, ck_trees)
        if n == 1:      # a VM still runs from the first one here
            (ckpt.clone_dir("rm-vm") / "").mkdir(parents=True)
            (ckpt.clone_dir("rm-vm") / "checkpoint").write_text(names[0] + "\n")
        parent = chain.register(parent, roots, image, state, trees, ck_trees, chain_limit=2)
        names.append(parent.name)
    depths = [ckpt.get(n).manifest.depth for n in names[2:]] + [ckpt.get(names[0]).manifest.depth]
    backing = [ckpt.Checkpoint(checkpoint_path(n)).manifest.backing for n in names[2:]]
    assert depths == [1, 2, 1]                 # the third went over the root again (limit 2)
    assert backing == ["desk", names[2]]
    left = {c.name for c in ckpt.list_all()}
    assert left == {"desk", names[0], names[2], names[3]}     # the second: pruned; the first: a clone's
    # the newest still reads as all four migrations wrote
    out = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x43 3M 4k", "-c", "read -P 0x40 0 4k",
                          str(ckpt.get(names[3]).disk)], capture_output=True, text=True, check=True).stdout
    assert "Pattern verification failed" not in out
    with pytest.raises(CheckpointError, match="overlays over"):
        ckpt.remove(_no_domains(), names[2])


def _loaded(ck: ckpt.Checkpoint) -> CheckpointTrees:
    """A migration checkpoint's saved trees (the memory "image" here is no save image to hash)."""
    tree, _ = MerkleTree.load(ck.dir / "memory.tree")
    return CheckpointTrees(tree, LeafDigests.load(ck.dir / "disk.leaves.npz", expect_size=SIZE))


class _NoDomains:
    def exists(self, name: str) -> bool:
        return False


def _no_domains() -> Any:
    return _NoDomains()


def test_a_checkpoint_with_other_roots_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLAY_MIGRATE_STATE", str(tmp_path))
    root = make_root("desk")
    ck_trees = trees_of(root)
    state = state_over(root, tmp_path / "s.qcow2", ["write -P 0x22 0 4k"])
    image = tmp_path / "m"
    image.write_bytes(b"x" * 4096)
    roots, trees = verified(state, image, ck_trees)
    nxt = chain.prepare(root, roots, state, trees, ck_trees)
    m = nxt.manifest
    m.roots = {MEMORY: "00" * 32, DISK: m.roots[DISK]}
    m.save(nxt.manifest_path)
    with pytest.raises(CheckpointError, match="other roots"):
        chain.prepare(root, roots, state, trees, ck_trees)
