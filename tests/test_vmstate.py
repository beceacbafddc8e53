"""The checkpoint's trees are computed once, even when both sides of a one-host migration ask at
the same moment (a synthetic checkpoint made with qemu-img and a synthetic save image); two clones
of one checkpoint do different work, and the transfer protocol makes the second one's saved state
byte-identical to the first's, and the second resumes as the first."""

from __future__ import annotations

import copy
import filecmp
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_saveimage import build_save_image, default_blocks

from replayer.drive import drive
from replayer.workload import parse_workload
from store import checkpoint as ckpt
from store.vmstate import CheckpointTrees, VmState, checkpoint_trees, sync_states
from vm.machine import Hypervisor, Machine, create_overlay

MIB = 1 << 20
COMPUTED = ("building the tree file", "hashing the guest-visible disk of checkpoint",
            "sketching the memory pages of checkpoint")
"""What checkpoint_trees logs when it computes rather than loads (counted below)."""

WORK_A = """
click 250 400
type "mkdir -p /root/a && seq 1 5000 > /root/a/n.txt && cp /etc/services /root/a/ && sync\\n"
wait 2
click 770 420
type "written by the source\\n"
key ctrl+s
wait 1.5
"""
WORK_B = """
click 250 400
type "echo other > /root/b.txt && rm -f /root/notes.txt; sync\\n"
wait 2
"""
FILES = "cd /root && find . -type f -not -name '.*' | sort | xargs md5sum"


def suspend(m: Machine) -> tuple[str, bytes, Path]:
    """As `replay-migrate suspend` does: flush, freeze the file systems, pause, save."""
    m.wait_agent()
    files = m.exec(FILES).stdout
    m.exec("sync")
    m.fsfreeze()
    m.pause()
    shot = m.screenshot().rgb
    image = m.run_dir / "suspend.sav"
    m.save(image)
    return files, shot, image


def run(*argv: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert r.returncode == 0, f"{argv}: {r.stderr}"


def synthetic_checkpoint(root: Path) -> ckpt.Checkpoint:
    """A checkpoint folder as ``checkpoint create`` leaves it, without a guest: a save image with
    64 MiB of RAM, a qcow2 overlay with data over a qcow2 base, a manifest."""
    d = root / "checkpoints" / "synthetic"
    d.mkdir(parents=True)
    build_save_image(d / "memory.sav", default_blocks(seed=2, ram_pages=16384))
    base = root / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(96 * MIB))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 24M", "-c", "write -P 0x11 40M 8M", str(base))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(d / "disk.qcow2"))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 1M 2M", "-c", "write -z 44M 1M", str(d / "disk.qcow2"))
    ckpt.Manifest(name="synthetic", image_recipe="0" * 16, image_dir=str(root / "image"), virt="qemu",
                  memory_mib=64, created=time.time(), boot_to_desktop_s=1.0, save_s=1.0,
                  memory_apparent_bytes=(d / "memory.sav").stat().st_size, memory_allocated_bytes=0,
                  disk_allocated_bytes=0).save(d / "manifest.json")
    return ckpt.Checkpoint(d)


def state_of(root: Path, ck: ckpt.Checkpoint, name: str, ram: dict[int, bytes], *disk_writes: str) -> VmState:
    """A saved state of :func:`synthetic_checkpoint`'s ``ck``: its memory image with the ``ram``
    pages set (a page of zeros stays present), an overlay on its disk with ``disk_writes``
    (qemu-io commands) applied."""
    blocks = copy.deepcopy(default_blocks(seed=2, ram_pages=16384))
    assert blocks[0].name == "pc.ram"
    blocks[0].pages.update(ram)
    memory = root / f"{name}.sav"
    build_save_image(memory, blocks)
    disk = root / f"{name}.qcow2"
    create_overlay(disk, ck.disk)
    if disk_writes:
        run("qemu-io", "-f", "qcow2", *(a for c in disk_writes for a in ("-c", c)), str(disk))
    return VmState(memory, disk, ck)


def test_content_only_the_checkpoints_disk_holds_travels_as_a_reference(tmp_path: Path) -> None:
    """The target's replay wrote over file data that the source still holds in its page cache:
    that content is in the checkpoint's disk (0x77 at 1-3 MiB), not in the target's images."""
    ck = synthetic_checkpoint(tmp_path)
    src = state_of(tmp_path, ck, "src", {104: b"\x77" * 4096})
    tgt = state_of(tmp_path, ck, "tgt", {104: b"\x95" * 4096}, "write -P 0x33 1M 2M")
    stats, _ = sync_states(src, tgt, dry_run=True)
    mem = stats.images["memory"]
    assert mem.divergent == 1 and mem.referenced == 1
    assert stats.block_bytes == 0


def _computed(text: str) -> list[int]:
    return [text.count(what) for what in COMPUTED]


def test_both_sides_asking_at_once_compute_the_trees_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The first ``make demo`` failed: the source and target threads of one-host migrate both
    hashed the checkpoint and shared one temporary file. Two threads ask at the same moment:
    exactly one computes each tree, both get the same trees, nothing temporary is left."""
    ck = synthetic_checkpoint(tmp_path)
    caplog.set_level(logging.INFO, logger="replay_migrate")
    barrier = threading.Barrier(2)
    got: list[CheckpointTrees | BaseException] = []

    def side() -> None:
        barrier.wait()
        try:
            got.append(checkpoint_trees(ck))
        except BaseException as e:
            got.append(e)

    threads = [threading.Thread(target=side) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    trees = [t for t in got if isinstance(t, CheckpointTrees)]
    assert len(trees) == 2, got
    assert trees[0].memory.root == trees[1].memory.root and trees[0].disk_tree.root == trees[1].disk_tree.root
    assert _computed(caplog.text) == [1, 1, 1], caplog.text
    assert set(ck.manifest.roots) == {"memory", "disk"}
    left = sorted(p.name for p in ck.dir.iterdir() if not p.name.endswith(".lock"))
    assert left == ["disk.leaves.npz", "disk.leaves.stamp", "disk.qcow2", "manifest.json", "memory.sav",
                    "memory.similar.npz", "memory.similar.stamp", "memory.tree"]
    caplog.clear()
    again = checkpoint_trees(ck)                        # later calls load
    assert _computed(caplog.text) == [0, 0, 0]
    assert trees[0].memory_similar is not None and again.memory_similar is not None
    assert (again.memory_similar.keys == trees[0].memory_similar.keys).all()


CHILD = """
import logging, sys
from pathlib import Path
from store.checkpoint import Checkpoint
from store.vmstate import checkpoint_trees
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
print("ready", flush=True)
sys.stdin.readline()
print(checkpoint_trees(Checkpoint(Path(sys.argv[1]))).memory.root.hex(), flush=True)
"""


def test_two_processes_asking_at_once_compute_the_trees_once(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """The same across processes (``follow`` and ``record --to`` on one host; two tests)."""
    ck = synthetic_checkpoint(tmp_path)
    caplog.set_level(logging.INFO, logger="replay_migrate")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(ck.dir)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None and child.stdin is not None
    assert child.stdout.readline().strip() == "ready"
    child.stdin.write("go\n")
    child.stdin.flush()
    mine = checkpoint_trees(ck)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert out.strip() == mine.memory.root.hex()
    assert [a + b for a, b in zip(_computed(caplog.text), _computed(err), strict=True)] == [1, 1, 1], (caplog.text, err)


@pytest.mark.vm
def test_checkpoint_trees_are_saved_once(checkpoint: ckpt.Checkpoint) -> None:
    t1 = checkpoint_trees(checkpoint)
    mtime = (checkpoint.dir / "memory.tree").stat().st_mtime_ns
    t2 = checkpoint_trees(checkpoint)
    assert t1.memory.root == t2.memory.root
    assert (checkpoint.dir / "memory.tree").stat().st_mtime_ns == mtime
    assert set(checkpoint.manifest.roots) == {"memory", "disk"}


@pytest.mark.vm
def test_sync_makes_the_target_identical_and_it_resumes_as_the_source(
        make_clone: Callable[..., Machine], hv: Hypervisor, checkpoint: ckpt.Checkpoint) -> None:
    a, b = make_clone(), make_clone()
    drive(a, parse_workload(WORK_A))
    drive(b, parse_workload(WORK_B))
    files_a, shot_a, image_a = suspend(a)
    files_b, _, image_b = suspend(b)
    assert files_a != files_b
    run_a, run_b = image_a.parent, image_b.parent
    state_a = VmState(image_a, run_a / "disk.qcow2", checkpoint)
    state_b = VmState(image_b, run_b / "disk.qcow2", checkpoint)

    dry, baseline = sync_states(state_a, state_b, dry_run=True)
    assert dry.images["memory"].divergent > 0 and dry.images["disk"].divergent > 0
    assert not filecmp.cmp(image_a, image_b, shallow=False)

    stats, _ = sync_states(state_a, state_b)
    assert stats.verified
    assert stats.wire_total < baseline, (stats.wire_total, baseline)
    assert filecmp.cmp(image_a, image_b, shallow=False)
    cmp = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(run_a / "disk.qcow2"),
                          str(run_b / "disk.qcow2")], capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr

    # the patched image carries A's identity: B takes it over under its own name and files
    back = hv.restore_clone(image_b, name=b.name, disk=run_b / "disk.qcow2", run_dir=run_b,
                            paused=True, copy=False)
    assert back.screenshot().rgb == shot_a
    back.resume()
    back.wait_agent()
    back.fsthaw()
    assert back.exec(FILES).stdout == files_a
    assert back.exec("echo alive > /root/after && sync && cat /root/after").stdout == "alive\n"


def test_open_and_build_opens_and_hashes_as_open_sources_and_build_trees(tmp_path: Path) -> None:
    """The disk overlay opened in a thread while the memory image hashes: the same sources and
    trees as one after the other, and on a failure nothing is left open."""
    import dataclasses
    from contextlib import ExitStack

    import numpy as np

    from differ.blocks import LeafDigests
    from replay_migrate.errors import ImageError
    from store.vmstate import build_trees, open_and_build, open_sources

    ck = synthetic_checkpoint(tmp_path)
    trees = checkpoint_trees(ck)
    state = state_of(tmp_path, ck, "s", {7: b"\x42" * 4096}, "write -P 0x33 5M 1M")
    with open_sources(state, trees) as sources:
        want = build_trees(sources)
        want_sizes = {name: src.size for name, src in sources.items()}
    fds = len(os.listdir("/proc/self/fd"))
    with ExitStack() as stack:
        got_sources, got = open_and_build(state, trees, stack)
        assert list(got_sources) == list(want) == list(got)
        assert {name: src.size for name, src in got_sources.items()} == want_sizes
        assert {n: t.levels[0].tobytes() for n, t in got.items()} == {n: t.levels[0].tobytes() for n, t in want.items()}
        assert {n: t.root for n, t in got.items()} == {n: t.root for n, t in want.items()}
    assert len(os.listdir("/proc/self/fd")) == fds
    other = LeafDigests(np.zeros((10, 32), dtype=np.uint8), 10 * 4096)     # a backing tree of another size
    with pytest.raises(ImageError, match="backing tree"), ExitStack() as stack:
        open_and_build(state, dataclasses.replace(trees, disk=other), stack)
    assert len(os.listdir("/proc/self/fd")) == fds
