"""The whole flow of the demo, shorter: a source clone works while its log streams through a real
loopback service into a target clone that replays it; at suspend only what still differs ships,
and the target resumes with the source's exact state."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, fields
from pathlib import Path

import pytest
from conftest import CLONE_PREFIX

from cli.migrate import _loopback_service, migrate_embedded, state_comparison
from differ.protocol import ImageStats, TransferStats, TransferSummary
from migration.cancel import supervise
from migration.sides import Report, SourceSide, TargetSide
from recorder.logformat import Key, LogHeader, encode_log, peek_frame
from replay_migrate.errors import LogFormatError, ReplayMigrateError, VerificationError
from replayer.drive import drive
from replayer.replay import ReplayConfig
from replayer.workload import parse_workload
from server.client import SessionClient, create_session
from store import checkpoint as ckpt
from store.vmstate import VmState
from vm.machine import Hypervisor, Machine, MachineState

WORKLOAD = """
click 250 400
type "mkdir -p /root/m && seq 1 2000 > /root/m/n.txt && ls -l /etc > /root/m/etc.txt; sync\\n"
wait 2
click 770 420
type "Migrated by replaying input.\\n"
key ctrl+s
wait 3
"""
FILES = "cd /root && find . -type f -not -name '.*' | sort | xargs md5sum"


def clock_offset(m: Machine) -> float:
    """The guest's wall clock minus the host's, in seconds (guest agent guest-get-time)."""
    t = m.dom.getTime()
    return float(t["seconds"] + t["nseconds"] / 1e9 - time.time())


def state_files(folder: Path) -> list[str]:
    """What in a clone folder could bring a VM back: memory images and disks."""
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".sav", ".qcow2"))


@pytest.fixture
def shm(tmp_path: Path) -> Iterator[Path]:
    """A suspend folder on tmpfs (``migration.suspenddir``), /dev/shm where there is one."""
    d = Path(tempfile.mkdtemp(prefix="rm-test-shm-", dir="/dev/shm" if os.path.isdir("/dev/shm") else tmp_path))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def left_in(shm: Path) -> list[str]:
    """Saved images left in a suspend folder's private subfolder."""
    sub = shm / "replay-migrate"
    return sorted(p.name for p in sub.iterdir()) if sub.is_dir() else []


def test_report_savings() -> None:
    r = Report(wire_bytes=25, baseline_bytes=100)
    r.finish()
    assert r.savings == 0.75
    assert set(Report().as_dict()) >= {"log_bytes", "hash_bytes", "block_bytes", "wire_bytes", "baseline_bytes",
                                      "savings", "divergent_blocks", "referenced_blocks", "replay_s", "diff_s",
                                      "transfer_s", "downtime_s", "verified"}


def test_report_takes_every_number_of_the_transfer_summary() -> None:
    """Report.add_transfer copies no field by hand: every field of the summary lands in the
    report under its name, so a number added to the summary cannot be forgotten here."""
    assert {f.name for f in fields(TransferSummary)} <= {f.name for f in fields(Report)}
    stats = TransferStats(images={"memory": ImageStats(divergent=9, referenced=1, duplicate=2, base=3, delta=4,
                                                       xbase=5, full=6),
                                  "disk": ImageStats(divergent=2, full=2)},
                          root_bytes=64, walk_digest_bytes=8, fingerprint_bytes=5, block_bytes=100, round_trips=4)
    r = Report()
    r.add_transfer(stats)
    assert {f.name: getattr(r, f.name) for f in fields(TransferSummary)} == asdict(stats.summary())
    assert (r.hash_bytes, r.referenced_blocks, r.delta_blocks, r.full_blocks) == (72, 6, 9, 8)
    assert r.divergent_blocks == {"memory": 9, "disk": 2}


@pytest.mark.vm
def test_migrate_embedded(make_clone: Callable[..., Machine], hv: Hypervisor, checkpoint: ckpt.Checkpoint,
                          tmp_path: Path, shm: Path) -> None:
    """Both sides save into a tmpfs suspend folder (issue 13 item 3), the target patches and
    restores from there, and nothing is left in it afterwards."""
    source = make_clone()
    source.wait_agent()
    target_name = f"{source.name}-migrated"
    with Hypervisor() as hv2:
        async def user() -> None:
            await asyncio.to_thread(drive, source, parse_workload(WORKLOAD))

        same, compare = state_comparison()
        images: list[Path] = []

        def saved_where(src: SourceSide, state: VmState) -> None:
            images.extend((src.state_files.memory if src.state_files else Path(), state.memory))
            compare(src, state)

        try:
            # a generous sync wait: on a loaded 2-core host a TCG target can take seconds to catch up
            report, _, _ = asyncio.run(migrate_embedded(hv, hv2, source, checkpoint, target_name, user=user,
                                                        replay=ReplayConfig(sync_slack_s=20),
                                                        screenshots=tmp_path, on_verified=saved_where,
                                                        suspend_dir=shm))
            assert [p.parent for p in images] == [shm / "replay-migrate"] * 2, images
            assert left_in(shm) == []       # the target restored from its image, the source released its
            r = report.as_dict()
            assert r["verified"] is True, r
            replay = {k: r[k] for k in ("events_replayed", "sync_marks_met", "sync_marks_failed", "replay_s")}
            assert r["events_replayed"] > 50 and r["sync_marks_met"] >= 1, replay
            assert 0 < r["wire_bytes"] < r["baseline_bytes"], r
            assert r["divergent_blocks"]["memory"] > 0
            # the downtime, phase by phase along its critical path, adds up (the test's hook left out)
            phases = r["downtime_breakdown"]
            assert sum(phases.values()) == pytest.approx(r["downtime_s"], abs=0.01), phases
            # whichever side saved last is on the path before the walk (the target, or the source
            # now that the target has caught up before the pause); the target's restore always is
            assert {"target save", "source save"} & set(phases), phases
            assert {"target restore", "target thaw"} <= set(phases), phases
            assert not any("inspect" in k for k in phases), phases
            target = hv.lookup(target_name)
            assert target.state is MachineState.RUNNING
            # identical state, checked at the target before it resumed (a running guest writes):
            # the guest part of both memory images byte for byte, the disks as the guests see them
            assert same == [True, True]
            for png in ("source-at-suspend.png", "target-resumed.png"):
                assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            out = target.exec(FILES).stdout
            assert "/m/n.txt" in out and "notes.txt" in out
            assert target.read_file("/root/notes.txt").endswith(b"Migrated by replaying input.\n")
            # the migrated guest's clock is the host's, not the source's at suspend (nor the checkpoint's)
            assert abs(clock_offset(target)) < 2.0, clock_offset(target)
            # the source is released: no domain, nothing in its folder to restore or boot it from
            # (its saved state was 1 GiB apparent per migration); the target keeps only its disk
            assert not hv.exists(source.name)
            assert state_files(ckpt.clone_dir(source.name)) == []
            assert (ckpt.clone_dir(source.name) / "released").is_file()      # the logs stay, with a note
            assert source.name not in ckpt.clones_of(checkpoint.name)
            assert state_files(ckpt.clone_dir(target_name)) == ["disk.qcow2"]
        finally:
            ckpt.remove_clone(hv, target_name)


@pytest.mark.vm
def test_a_failed_migration_leaves_the_source_running(make_clone: Callable[..., Machine], hv: Hypervisor,
                                                      checkpoint: ckpt.Checkpoint, shm: Path) -> None:
    """Saved into a tmpfs suspend folder: the source comes back from its image there, and the
    target's image there is deleted with its clone."""
    source = make_clone()
    source.wait_agent()
    target_name = f"{source.name}-failed"
    with Hypervisor() as hv2:
        async def user() -> None:
            await asyncio.to_thread(drive, source, parse_workload(
                'click 250 400\ntype "echo kept > /root/kept.txt; sync\\n"\nwait 1.5'))

        def reject(src: SourceSide, state: VmState) -> None:
            assert left_in(shm) == sorted((src.run_dir.name + ".sav", ckpt.clone_dir(target_name).name + ".sav"))
            raise VerificationError("refused by the test after verification")

        with pytest.raises(ReplayMigrateError):
            asyncio.run(migrate_embedded(hv, hv2, source, checkpoint, target_name, user=user, on_verified=reject,
                                         suspend_dir=shm))
    assert left_in(shm) == []
    assert not hv.exists(target_name)                       # the target's clone is gone
    back = hv.lookup(source.name)                           # and the source runs on where it was
    assert back.state is MachineState.RUNNING
    back.wait_agent()
    assert back.exec("cat /root/kept.txt").stdout == "kept\n"
    assert back.exec("touch /root/writable && echo ok").stdout == "ok\n"   # thawed
    # resumed from its saved state, which is then gone; with the host's clock (it was saved a while)
    assert state_files(ckpt.clone_dir(source.name)) == ["disk.qcow2"]
    assert abs(clock_offset(back)) < 2.0, clock_offset(back)


_LOG = encode_log(LogHeader(1280, 800, "us", "test-desktop", 0, "test"), [Key(10, 38, True), Key(20, 38, False)],
                  end=False)
_HEADER_LEN = peek_frame(_LOG)[2]


@pytest.mark.vm
@pytest.mark.parametrize("log, why", [
    (_LOG, "no end-of-log event"),           # whole frames, but the end the source writes never came
    (_LOG[:-3], "truncated"),                # the last frame cut short
], ids=["no-end", "mid-frame"])
def test_a_target_fed_a_cut_log_fails_and_removes_its_clone(hv: Hypervisor, checkpoint: ckpt.Checkpoint,
                                                            log: bytes, why: str) -> None:
    """Issue 11 finding 4: the target never closed its log decoder, so a log the source ended short
    was taken for a whole one, and the target went on to take over. Now it is a LogFormatError at
    the target, which tells the session and removes its clone."""
    target_name = f"{CLONE_PREFIX}{os.getpid()}-cut-log"

    async def run() -> None:
        async with _loopback_service() as service:
            source_cred, target_cred = await create_session(service.url, service.token)
            async with SessionClient(service.url, source_cred) as sc, SessionClient(service.url, target_cred) as tc:
                target = TargetSide(hv, checkpoint, tc, target_name)

                async def source() -> None:        # a source that ends its log short
                    await target.started.wait()
                    await sc.send_log(log[:_HEADER_LEN])
                    await sc.send_log(log[_HEADER_LEN:])
                    await sc.suspend()
                    await sc.end_log()

                await supervise(target.run(), source())

    try:
        with pytest.raises(LogFormatError, match=why):
            asyncio.run(run())
        assert not hv.exists(target_name)
        assert not ckpt.clone_dir(target_name).exists()
    finally:
        ckpt.remove_clone(hv, target_name)
