"""There and back (issue 14): a VM migrates A → B after a short workload, works a little at B, and
migrates B → A against the next common checkpoint. Measured: the way back's wire bytes, and what the
same way back would have cost against the first checkpoint, which is all a target without the chain
holds: a clone of it replays both logs (the work since that checkpoint), and the protocol runs dry
from B's saved state (its disk rebuilt over the first checkpoint's) to that replay's. Both counts
include the log frames sent.

    python bench/roundtrip.py        # one round trip on a clone of the bench checkpoint, a table

``make bench`` runs it (``bench/results/roundtrip.md``); tests/test_fromdomain.py runs the same
measurement on a user's domain and asserts the way back is smaller.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli.migrate import migrate_embedded
from differ.merkle import MerkleTree
from migration.sides import SourceSide, TargetSide
from recorder.logformat import LogDecoder
from replayer.drive import drive
from replayer.link import RecorderLink
from replayer.logfeed import EventFeed, LogPump
from replayer.replay import ReplayConfig, Replayer
from replayer.workload import parse_workload
from store import chain
from store import checkpoint as ckpt
from store.vmstate import DISK, VmState, checkpoint_trees, sync_states
from vm.machine import Hypervisor, Machine, create_overlay

CHECKPOINT = "bench"
"""The checkpoint the migration bench uses too (made once per image)."""
PREFIX = f"{ckpt.DOMAIN_PREFIX}bench-rt-"
SYNC_TIMEOUT_S = 20.0
"""How long the replay waits on one sync mark (a loaded 2-core host)."""

AT_A = """
click 250 400
type "echo from-a > /root/trip.txt && seq 1 500 > /root/a.txt; sync\\n"
wait 2
"""
"""The work at A before the first migration (a terminal has the focus at (250, 400))."""
AT_B = """
click 250 400
type "echo from-b >> /root/trip.txt; sync\\n"
wait 2
"""
"""The little work at B before the way back."""


def keep_log(frames: list[bytes]) -> Callable[[SourceSide, TargetSide], None]:
    """An ``on_started`` hook that keeps a copy of every log frame the source sends."""
    def hook(src: SourceSide, tgt: TargetSide) -> None:
        send = src.client.send_log

        async def copy(data: bytes) -> int:
            frames.append(bytes(data))
            return await send(data)

        src.client.send_log = copy        # type: ignore[method-assign]
    return hook


def keep_state(kept: dict[str, Any], folder: Path,
               then: Callable[[SourceSide, VmState], None] | None = None) -> Callable[[SourceSide, VmState], None]:
    """An ``on_verified`` hook that keeps the source's saved state (hard links in ``folder``: it is
    moved into the next checkpoint and its overlay deleted at release), after ``then``."""
    def hook(src: SourceSide, state: VmState) -> None:
        if then is not None:
            then(src, state)
        assert src.state_files is not None
        for what, p in (("memory", src.state_files.memory), ("disk", src.state_files.disk)):
            link = folder / f"kept-{what}{p.suffix}"
            os.link(p, link)
            kept[what] = link
    return hook


def join_logs(first: Sequence[bytes], second: Sequence[bytes]) -> list[bytes]:
    """One log from two migrations' frames: the first's header and events, the second's events
    and end. The second continues the first's sequence numbers (the same agent recorded on at B)."""
    if len(first) < 2 or len(second) < 2:
        raise ValueError("each log has at least a header and an end frame")
    return [*first[:-1], *second[1:-1], second[-1]]


def back_against_first(hv: Hypervisor, first: ckpt.Checkpoint, logs: Sequence[Sequence[bytes]],
                       state_b: VmState, disk_tree_b: MerkleTree, folder: Path, clone: str) -> int:
    """The wire bytes of the way back against ``first`` (see the module docstring): both logs and
    the dry run's walk and blocks. ``state_b``: B's saved state (over the next checkpoint);
    ``disk_tree_b``: its disk's tree, as the way back computed it; ``clone``: a free domain name."""
    m0 = first.manifest
    log = join_logs(logs[0], logs[1])
    feed = EventFeed(LogPump(decoder=LogDecoder(resume_at=m0.log_resume, origin_us=m0.log_origin_us)))
    for data in log:
        feed.put(data)
    feed.end()
    m = ckpt.start_clone(hv, first, clone)
    try:
        with RecorderLink(m) as link:
            link.open()
            Replayer(m, link, ReplayConfig(sync_slack_s=SYNC_TIMEOUT_S)).replay(feed)
        m.fsfreeze()
        m.pause()
        image = ckpt.clone_dir(clone) / "suspend.sav"
        m.save(image)
        replayed = VmState(image, ckpt.clone_dir(clone) / "disk.qcow2", first)
        flat = folder / "b-over-first.qcow2"
        create_overlay(flat, first.disk)
        chain.write_differing(flat, state_b.disk, disk_tree_b, checkpoint_trees(first).disk,
                              checkpoint_trees(state_b.checkpoint))
        stats, _ = sync_states(VmState(state_b.memory, flat, first), replayed, dry_run=True)
    finally:
        ckpt.remove_clone(hv, clone)
    return stats.wire_total + sum(len(f) for f in log)


@dataclass
class RoundTrip:
    """What one round trip measured (bytes on the wire, seconds)."""

    there: int
    back: int
    back_against_first: int
    next_checkpoint: str
    seconds: float


def round_trip(hv: Hypervisor, ck0: ckpt.Checkpoint, m: Machine, folder: Path, names: Sequence[str],
               at_b: Callable[[Machine], None] | None = None,
               then: Callable[[SourceSide, VmState], None] | None = None) -> tuple[RoundTrip, Machine]:
    """Migrate ``m`` (a running clone of ``ck0``) to ``names[0]`` after :data:`AT_A`, work there
    (:data:`AT_B`, then ``at_b``), migrate back to ``names[1]`` against the next checkpoint, and
    measure the way back against ``ck0`` (a clone ``names[2]``). Returns the counts and the VM
    back at A. ``then``: also an ``on_verified`` hook of both migrations (tests compare states)."""
    t0 = time.monotonic()
    logs: list[list[bytes]] = [[], []]
    kept: list[dict[str, Any]] = [{}, {}]
    reports = []
    sources: list[SourceSide] = []
    vm, ck = m, ck0
    for n, (work, name) in enumerate(((AT_A, names[0]), (AT_B, names[1]))):
        here = vm

        async def user(vm: Machine = here, work: str = work) -> None:
            await asyncio.to_thread(drive, vm, parse_workload(work))

        (folder / str(n)).mkdir()
        with Hypervisor(hv.uri) as hv_target:     # the target side's own connection, as in `migrate`
            report, src, _ = asyncio.run(migrate_embedded(
                hv, hv_target, vm, ck, name, user=user, replay=ReplayConfig(sync_slack_s=SYNC_TIMEOUT_S),
                on_verified=keep_state(kept[n], folder / str(n), then), on_started=keep_log(logs[n])))
        r = report.as_dict()
        if not r["verified"] or not r.get("next_checkpoint"):
            raise RuntimeError(f"migration {n + 1} of the round trip: {r}")
        reports.append(r)
        sources.append(src)
        vm, ck = hv.lookup(name), ckpt.get(r["next_checkpoint"])
        if n == 0 and at_b is not None:
            at_b(vm)
    verified = sources[1]._verified
    assert verified is not None
    c1 = ckpt.get(reports[0]["next_checkpoint"])
    state_b = VmState(kept[1]["memory"], kept[1]["disk"], c1)
    first = back_against_first(hv, ck0, logs, state_b, verified[1][DISK], folder, names[2])
    return RoundTrip(there=reports[0]["wire_bytes"], back=reports[1]["wire_bytes"], back_against_first=first,
                     next_checkpoint=c1.name, seconds=time.monotonic() - t0), vm


def table(rt: RoundTrip) -> str:
    """The bench's markdown table."""
    kib = 1024
    return "\n".join([
        "| migration | wire bytes | KiB |",
        "|---|---:|---:|",
        f"| A → B (from the bench checkpoint) | {rt.there} | {rt.there / kib:.0f} |",
        f"| B → A against the next checkpoint ({rt.next_checkpoint}) | {rt.back} | {rt.back / kib:.0f} |",
        f"| B → A against the first checkpoint (both logs replayed, dry run) | {rt.back_against_first} | "
        f"{rt.back_against_first / kib:.0f} |",
        "",
        f"The way back ships {rt.back / max(rt.back_against_first, 1):.2f} times the bytes it would have against the "
        f"first checkpoint ({rt.seconds:.0f} s for the round trip).",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    names = [f"{PREFIX}{s}" for s in ("src", "b", "a", "c0")]
    with Hypervisor() as hv:
        for n in names:
            ckpt.remove_clone(hv, n)
        ck0, _ = ckpt.ensure(hv, CHECKPOINT)
        try:
            m = ckpt.start_clone(hv, ck0, names[0])
            with tempfile.TemporaryDirectory(prefix="rm-roundtrip-") as tmp:
                rt, _ = round_trip(hv, ck0, m, Path(tmp), names[1:])
        finally:
            for n in names:
                ckpt.remove_clone(hv, n)
            ours = [c for c in ckpt.list_all()
                    if c.manifest.origin == ckpt.ORIGIN_MIGRATION and c.manifest.chain == CHECKPOINT]
            for c in sorted(ours, key=lambda c: -c.manifest.depth):
                ckpt.remove(hv, c.name)          # the bench's chain, deepest first: its VMs are gone
    print(table(rt))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
