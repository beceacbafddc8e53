"""The whole flow of the demo, shorter: a source clone works while its log streams through a real
loopback service into a target clone that replays it; at suspend only what still differs ships,
and the target resumes with the source's exact state."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from replayer.drive import drive
from replayer.workload import parse_workload
from server import checkpoint as ckpt
from server.migratecmd import migrate_embedded
from server.migration import Report
from vm.machine import Hypervisor, Machine, MachineState
from vm.savehdr import HEADER, read_header

WORKLOAD = """
click 250 400
type "mkdir -p /root/m && seq 1 2000 > /root/m/n.txt && ls -l /etc > /root/m/etc.txt; sync\\n"
wait 2
click 770 420
type "Migrated by replaying input.\\n"
key ctrl+s
wait 1.5
"""
FILES = "cd /root && find . -type f -not -name '.*' | sort | xargs md5sum"


def test_report_savings() -> None:
    r = Report(wire_bytes=25, baseline_bytes=100)
    r.finish()
    assert r.savings == 0.75
    assert set(Report().as_dict()) >= {"log_bytes", "hash_bytes", "block_bytes", "wire_bytes", "baseline_bytes",
                                      "savings", "divergent_blocks", "referenced_blocks", "replay_s", "diff_s",
                                      "transfer_s", "downtime_s", "verified"}


def qemu_state(path: Path) -> bytes:
    """A save image without its libvirt header (domain name, UUID, paths): the guest's state."""
    h = read_header(path)
    with open(path, "rb") as f:
        f.seek(HEADER.size + h.data_len)
        return f.read()


@pytest.mark.vm
def test_migrate_embedded(make_clone: Callable[..., Machine], hv: Hypervisor, checkpoint: ckpt.Checkpoint,
                          tmp_path: Path) -> None:
    source = make_clone()
    source.wait_agent()
    target_name = f"{source.name}-migrated"
    with Hypervisor() as hv2:
        async def user() -> None:
            await asyncio.to_thread(drive, source, parse_workload(WORKLOAD))

        try:
            report, src, _ = asyncio.run(migrate_embedded(hv, hv2, source, checkpoint, target_name,
                                                            user=user, screenshots=tmp_path))
            r = report.as_dict()
            assert r["verified"] is True, r
            assert r["events_replayed"] > 50 and r["sync_marks_met"] >= 1, r
            assert 0 < r["wire_bytes"] < r["baseline_bytes"], r
            assert r["divergent_blocks"]["memory"] > 0
            target = hv.lookup(target_name)
            assert target.state is MachineState.RUNNING
            # identical state: the guest part of both memory images, the guest-visible disks
            assert src.state_files is not None
            src_run, tgt_run = src.state_files.memory.parent, target.run_dir
            assert qemu_state(src.state_files.memory) == qemu_state(tgt_run / "suspend.sav")
            cmp = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2",
                                  str(src_run / "disk.qcow2"), str(tgt_run / "disk.qcow2")],
                                 capture_output=True, text=True)
            assert cmp.returncode == 0, cmp.stdout + cmp.stderr
            for png in ("source-at-suspend.png", "target-resumed.png"):
                assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            out = target.exec(FILES).stdout
            assert "/m/n.txt" in out and "notes.txt" in out
            assert target.read_file("/root/notes.txt").endswith(b"Migrated by replaying input.\n")
        finally:
            ckpt.remove_clone(hv, target_name)
