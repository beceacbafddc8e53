"""The two ends of a benchmarked migration, each run as its own process (in its own network
namespace) around the same :class:`~migration.sides.SourceSide` / :class:`~migration.sides.TargetSide`
the CLI's ``record --to`` and ``follow`` use, with what the benchmark needs besides:

* timestamps on the host's monotonic clock (one clock for both processes): when the user asked to
  migrate, when each VM paused, saved, verified, resumed;
* the source's saved state is kept (``record --to`` deletes it after the confirm), and so is the
  target's own state from before the walk patched it (copied in ``on_saved``: the target patches
  it in place; a hook left out of the downtime), so the baselines and the divergence analysis see
  exactly what the migration saw.

    python -m bench.sides source --url URL --domain D --checkpoint C --workload W.wl --keep DIR --out R.json
    python -m bench.sides target --url URL --name N --checkpoint C [--keep DIR] [--keep-verified DIR] --out R.json

``URL`` is the service's ``ws://HOST:PORT``; each side's role credential comes from
``$REPLAY_MIGRATE_CREDENTIAL``; ``--connect URI`` is the side's libvirt (two hosts: each its own,
``bench/sites.py``). Each writes one JSON object to ``--out`` (``report``: what this side measured, the
bench adds the two; ``whole``: the report both sides print), also on failure (``{"error": ...}``).
``--keep-verified`` keeps the target's state as it verified it, before the VM resumes from it (the
memory image hard-linked: only its header is rewritten, and then it is deleted; the disk copied:
the resumed guest writes it), to compare with the source's kept state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from migration.sides import SourceSide, TargetSide
from migration.suspenddir import suspend_dir_arg
from migration.syncdump import SyncDump
from replay_migrate.sparse import link_or_copy, sparse_copy
from replayer.drive import drive
from replayer.replay import ReplayConfig
from replayer.workload import load_workload
from server.client import SessionClient
from server.credentials import load_credential
from server.wire import Role
from store import checkpoint as ckpt
from store.vmstate import VmState
from vm.machine import SAVE_CHANNELS, Hypervisor, Machine

KEPT_MEMORY = "memory.sav"
KEPT_DISK = "disk.qcow2"
REPLAY_GAP_CAP_S = 2.0
"""The CLI's default ``--gap-cap``: idle gaps of the log longer than this are shortened at replay."""


class StampedMachine(Machine):
    """A Machine that notes when it was paused and when its save finished."""

    t_paused = 0.0
    t_saved = 0.0

    def pause(self) -> None:
        super().pause()
        self.t_paused = time.monotonic()

    def save(self, path: Path, *, channels: int = SAVE_CHANNELS) -> None:
        super().save(path, channels=channels)
        self.t_saved = time.monotonic()


def keep_state(state: VmState, keep: Path, *, copy: bool = False, copy_disk: bool = False) -> None:
    """Hard-link a side's saved images into ``keep`` (the originals get deleted); ``copy``: copy
    both (sparse), for a target that patches its images in place (a link would see them patched);
    ``copy_disk``: copy the disk only (a guest will run on it). Another file system (a site's bind
    mount) gets a sparse copy too."""
    keep.mkdir(parents=True, exist_ok=True)
    for src, name in ((state.memory, KEPT_MEMORY), (state.disk, KEPT_DISK)):
        dst = keep / name
        dst.unlink(missing_ok=True)
        if copy or (copy_disk and name == KEPT_DISK):
            sparse_copy(src, dst)
        else:
            link_or_copy(src, dst)


async def run_source(args: argparse.Namespace) -> dict[str, Any]:
    actions = load_workload(args.workload)
    ck = ckpt.get(args.checkpoint)
    with Hypervisor(args.connect) as hv:
        m = StampedMachine(hv, hv.lookup(args.domain).dom)
        async with SessionClient(args.url, load_credential(None, Role.SOURCE)) as client:
            src = SourceSide(hv, m, ck, client, suspend_dir=args.suspend_dir,
                             chain_limit=0)   # measured states only: no next checkpoint
            if args.sync_dump is not None:
                src.sync_dump = SyncDump(args.sync_dump, "source")
            stop = asyncio.Event()
            streaming = asyncio.create_task(src.stream_log(stop))
            t_start = time.monotonic()
            driven = await asyncio.to_thread(drive, m, actions, seed=args.seed)
            t_request = time.monotonic()
            stop.set()
            await streaming
            report = await src.suspend()
            t_done = time.monotonic()
            assert src.state_files is not None
            if args.keep is not None:
                keep_state(src.state_files, args.keep)
            await src.release()         # the links keep what the bench measures on
    return {"t_start": t_start, "t_request": t_request, "t_paused": m.t_paused, "t_saved": m.t_saved,
            "t_done": t_done, "flush_s": src.flush_s, "catchup_s": src.catchup_s,
            "caught_up": src.caught_up, "events_driven": driven.events, "drive_s": driven.seconds,
            "report": report.as_dict(), "whole": src.whole}


async def run_target(args: argparse.Namespace) -> dict[str, Any]:
    ck = ckpt.get(args.checkpoint)
    stamps: dict[str, float] = {}

    def saved(state: VmState) -> None:
        stamps["t_saved"] = time.monotonic()
        if args.keep is not None:
            keep_state(state, args.keep, copy=not args.copy_sinks)

    def verified(state: VmState) -> None:
        stamps["t_verified"] = time.monotonic()
        if args.keep_verified is not None:
            keep_state(state, args.keep_verified, copy_disk=True)

    with Hypervisor(args.connect) as hv:
        async with SessionClient(args.url, load_credential(None, Role.TARGET)) as client:
            stamps["t_attached"] = time.monotonic()
            side = TargetSide(hv, ck, client, args.name, replay=ReplayConfig(gap_cap_s=args.gap_cap),
                              in_place=not args.copy_sinks, verify_written=not args.rehash,
                              suspend_dir=args.suspend_dir, chain_limit=0)
            side.on_saved = saved
            side.on_verified = verified
            if args.sync_dump is not None:
                side.sync_dump = SyncDump(args.sync_dump, "target")
            report = await side.run()
    replay = asdict(side.replay_stats) if side.replay_stats is not None else {}
    return {**stamps, "t_resumed": side.t_resumed, "report": report.as_dict(), "whole": side.whole, "replay": replay}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sides", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="role", required=True)
    for role in ("source", "target"):
        p = sub.add_parser(role)
        p.add_argument("--url", required=True, help="the service, ws://HOST:PORT")
        p.add_argument("--checkpoint", required=True)
        p.add_argument("--keep", type=Path, default=None, help="hard-link the saved state here")
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--connect", default="qemu:///system", help="this side's libvirt (default: %(default)s)")
        p.add_argument("--suspend-dir", type=suspend_dir_arg, default=None,
                       help="save the VM at suspend here (a tmpfs; default: the clone's folder)")
        p.add_argument("--sync-dump", type=Path, default=None, metavar="DIR",
                       help="keep sync marks' regions here as PNG (migration.syncdump: the source every "
                            "mark's, the target those it did not meet)")
        if role == "source":
            p.add_argument("--domain", required=True)
            p.add_argument("--workload", type=Path, required=True)
            p.add_argument("--seed", type=int, default=0)
        else:
            p.add_argument("--name", required=True)
            p.add_argument("--gap-cap", type=float, default=REPLAY_GAP_CAP_S)
            p.add_argument("--copy-sinks", action="store_true", help="patch copies of the clone's images "
                           "(before issue 13: a variant to measure against)")
            p.add_argument("--rehash", action="store_true", help="verify by rehashing the patched images whole "
                           "(before issue 13)")
            p.add_argument("--keep-verified", type=Path, default=None,
                           help="keep the patched, verified state here before the VM resumes from it")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {args.role} %(name)s: %(message)s")
    try:
        result = asyncio.run(run_source(args) if args.role == "source" else run_target(args))
    except BaseException as e:
        args.out.write_text(json.dumps({"error": f"{type(e).__name__}: {e}",
                                        "traceback": traceback.format_exc()}))
        raise
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
