"""Where the CPU of the downtime's diff phases goes, without VMs: one real pair of saved states
(kept by a ``bench_migration.py --keep-work`` run) diffed in-process as a migration does it.

    python bench/downtime_cpu.py --kept /var/tmp/rm-bench/notes [--checkpoint bench] [--reps 3]
                                 [--profile out.prof] [--scratch /dev/shm]

Both sides run as ``migration.sides`` runs them (the target patches a scratch copy of its kept
state in place and verifies the written leaves; the source answers with its similarity index),
one after the other in this process: each side's time is its own CPU (and page-cache reads), the
link is not modelled. Per side and phase: ``open`` (the checkpoint's images, the core, the
target's sinks), ``hash`` (opening the saved state and building its trees), ``walk`` (the cores'
work until the target's want is sent: walk parts, the target's decision per leaf and the
fingerprints it reads), ``blocks`` (the source's reads, XOR and zstd per leaf and per batch; the
target's checks per batch), ``patch`` (writes), ``verify`` (read-back, roots). Times are medians
over ``--reps`` runs; the wire transcript's digest (the fingerprint key is fixed here) shows
whether two code versions put the same bytes on the wire.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from differ.merkle import MerkleTree
from differ.protocol import Request, WalkDone
from differ.source import BlockSource
from differ.transfer import BlockingSource, BlockingTarget, make_source, make_target, run_local
from migration.sides import request_phase
from replay_migrate.sparse import sparse_copy
from store import checkpoint as ckpt
from store.vmstate import (
    CheckpointTrees,
    VmState,
    build_trees,
    checkpoint_images,
    checkpoint_trees,
    make_sinks,
    open_sources,
    open_target_images,
    references,
    source_images,
)

KEPT_MEMORY, KEPT_DISK = "memory.sav", "disk.qcow2"
"""As ``bench.sides`` keeps a side's state (not imported: this file also runs against older trees)."""
KEY = bytes(range(32))
"""The target's fingerprint key: fixed, so two runs put the same bytes on the wire."""
PHASES = ("open", "hash", "walk", "blocks", "patch", "verify")


class Clock:
    """Seconds per (side, phase); the diff's stage ("walk" until the target sent its want, then
    "blocks") names the cores' own time, requests are named by ``request_phase``."""

    def __init__(self) -> None:
        self.s: dict[tuple[str, str], float] = defaultdict(float)
        self.stage = "walk"

    def add(self, side: str, phase: str, dt: float) -> None:
        self.s[(side, phase)] += dt

    def timed(self, side: str, phase: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.add(side, phase, time.perf_counter() - t0)


def _instrument(side: str, blocking: BlockingSource | BlockingTarget, clock: Clock,
                wire: hashlib._Hash) -> None:
    core, io = blocking.core, blocking.io
    fulfil, receive_data, receive_result = io.fulfil, core.receive_data, core.receive_result
    data_to_send = core.data_to_send

    def timed_fulfil(req: Request) -> Any:
        phase = request_phase(req)
        phase = {"read": clock.stage, "setsize": "walk", "commit": "verify"}.get(phase, phase)
        return clock.timed(side, phase, lambda: fulfil(req))

    def core_call(fn: Callable[[Any], list[Any]], arg: Any) -> list[Any]:
        stage = clock.stage
        t0 = time.perf_counter()
        events = fn(arg)
        clock.add(side, stage, time.perf_counter() - t0)
        if side == "target" and any(isinstance(e, WalkDone) for e in events):
            clock.stage = "blocks"
        return events

    def sent() -> list[bytes]:
        out = data_to_send()
        for m in out:
            wire.update(side.encode() + len(m).to_bytes(8, "little") + m)
        return out

    io.fulfil = timed_fulfil  # type: ignore[method-assign]
    core.receive_data = lambda data: core_call(receive_data, data)  # type: ignore[method-assign]
    core.receive_result = lambda result: core_call(receive_result, result)  # type: ignore[method-assign]
    core.data_to_send = sent  # type: ignore[method-assign]


def open_hashed(state: VmState, trees: CheckpointTrees,
                stack: ExitStack) -> tuple[dict[str, BlockSource], dict[str, MerkleTree]]:
    """A side's sources and trees as ``migration.sides`` gets them: ``open_and_build`` (the disk
    overlay opened while the memory image hashes) where the code has it, else one after the other."""
    try:
        from store.vmstate import open_and_build
    except ImportError:
        sources = stack.enter_context(open_sources(state, trees))
        return sources, build_trees(sources)
    return open_and_build(state, trees, stack)


def run_once(ck: ckpt.Checkpoint, kept: Path, scratch: Path,
             profile: cProfile.Profile | None = None) -> tuple[dict[tuple[str, str], float], str, int]:
    """One diff of the kept pair: (seconds per (side, phase), wire digest, wire bytes)."""
    trees = checkpoint_trees(ck)                 # loaded before the pause in a migration
    work = Path(tempfile.mkdtemp(prefix="downtime-cpu-", dir=scratch))
    try:
        for name in (KEPT_MEMORY, KEPT_DISK):    # the target patches its clone in place
            sparse_copy(kept / "target" / name, work / name)
        src_state = VmState(kept / "source" / KEPT_MEMORY, kept / "source" / KEPT_DISK, ck)
        tgt_state = VmState(work / KEPT_MEMORY, work / KEPT_DISK, ck)
        clock = Clock()
        wire = hashlib.sha256()
        with ExitStack() as stack:
            s_src, s_trees = clock.timed("source", "hash", lambda: open_hashed(src_state, trees, stack))

            def source_core() -> BlockingSource:
                bases = checkpoint_images(ck, trees, stack)
                return BlockingSource(*make_source(source_images(s_src, s_trees, bases)))

            source = clock.timed("source", "open", source_core)
            sinks = clock.timed("target", "open", lambda: make_sinks(tgt_state, trees, durable=False, in_place=True))
            t_src, t_trees = clock.timed("target", "hash", lambda: open_hashed(tgt_state, trees, stack))

            def target_core() -> BlockingTarget:
                bases = checkpoint_images(ck, trees, stack)
                images = stack.enter_context(open_target_images(tgt_state, trees, t_src, t_trees, bases=bases,
                                                                sinks=sinks))
                return BlockingTarget(*make_target(images, references=references(bases), key=KEY,
                                                   verify_written=True, verify_untouched=False))

            target = clock.timed("target", "open", target_core)
            _instrument("source", source, clock, wire)
            _instrument("target", target, clock, wire)
            if profile is not None:
                profile.enable()
            try:
                stats = run_local(source, target)
            finally:
                if profile is not None:
                    profile.disable()
        return dict(clock.s), wire.hexdigest()[:16], stats.wire_total
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(runs: Sequence[dict[tuple[str, str], float]]) -> str:
    rows = ["| phase | source (s) | target (s) |", "|---|---|---|"]
    totals = {"source": [0.0] * len(runs), "target": [0.0] * len(runs)}
    for phase in PHASES:
        cells = []
        for side in ("source", "target"):
            vals = [r.get((side, phase), 0.0) for r in runs]
            for k, v in enumerate(vals):
                totals[side][k] += v if phase != "open" and phase != "hash" else 0.0
            cells.append(f"{statistics.median(vals):.3f}")
        rows.append(f"| {phase} | {' | '.join(cells)} |")
    rows.append(f"| walk to verify | {statistics.median(totals['source']):.3f} | "
                f"{statistics.median(totals['target']):.3f} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kept", type=Path, required=True, help="a workload's folder of kept states (source/, target/)")
    ap.add_argument("--checkpoint", default="bench")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--scratch", type=Path, default=Path("/dev/shm"), help="where the target's copy is patched")
    ap.add_argument("--profile", type=Path, help="cProfile the diff (walk to verify) of every run into this file")
    args = ap.parse_args(argv)
    ck = ckpt.get(args.checkpoint)
    prof = cProfile.Profile() if args.profile is not None else None
    runs = []
    digests = set()
    for k in range(args.reps):
        s, digest, nbytes = run_once(ck, args.kept, args.scratch, prof)
        runs.append(s)
        digests.add(digest)
        print(f"run {k + 1}: wire {nbytes:,} B, transcript {digest}, "
              + ", ".join(f"{side[0]}.{ph} {v:.3f}" for (side, ph), v in sorted(s.items())), file=sys.stderr)
    if prof is not None:
        assert args.profile is not None
        prof.dump_stats(str(args.profile))
    print(table(runs))
    print(f"\nwire transcript: {', '.join(sorted(digests))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
