"""Two clones of one checkpoint do different work; the transfer protocol makes the second one's
saved state byte-identical to the first's, and the second resumes as the first."""

from __future__ import annotations

import filecmp
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from replayer.drive import drive
from replayer.workload import parse_workload
from server import checkpoint as ckpt
from server.vmstate import VmState, checkpoint_trees, sync_states
from vm.machine import Hypervisor, Machine

pytestmark = pytest.mark.vm

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


def test_checkpoint_trees_are_saved_once(checkpoint: ckpt.Checkpoint) -> None:
    t1 = checkpoint_trees(checkpoint)
    mtime = (checkpoint.dir / "memory.tree").stat().st_mtime_ns
    t2 = checkpoint_trees(checkpoint)
    assert t1.memory.root == t2.memory.root
    assert (checkpoint.dir / "memory.tree").stat().st_mtime_ns == mtime
    assert set(checkpoint.manifest.roots) == {"memory", "disk"}


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
