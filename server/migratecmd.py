"""The migration commands: ``record --to``/``suspend`` at the source, ``follow`` at the target,
and ``migrate``, which runs the service on loopback and both sides in this process: the same
code paths as two hosts, for the demo and for trying the tool on one machine.

``record --to`` keeps streaming until it is told to suspend: by ``replay-migrate suspend DOMAIN``
(which signals it through the pid file in the clone's folder and prints its report), by Ctrl-C
or after ``--duration``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from replay_migrate.errors import ReplayMigrateError, UsageError, VerificationError, VMError
from replay_migrate.safeopen import write_output
from replayer.drive import drive
from replayer.replay import ReplayConfig
from replayer.workload import get_workload
from server import checkpoint as ckpt
from server.client import SessionClient, session_url
from server.migration import Report, SourceSide, TargetSide, merged_report
from server.report import Progress, emit_json, human_bytes, table
from server.service import ServiceConfig, start_service
from server.session import TOKEN_ENV
from server.vmstate import VmState, same_state
from vm.machine import Hypervisor, Machine

PID_FILE = "record.pid"
RESULT_FILE = "migration.json"
CLEANUP_WAIT_S = 120.0
"""How long an embedded migration that failed waits for the target side to remove its clone."""
SUSPEND_WAIT_S = 1800.0
"""How long ``suspend`` waits for the recording process to finish the migration."""


def print_report(report: dict[str, Any], as_json: bool, title: str = "migration") -> None:
    if as_json:
        emit_json(report)
        return
    div = report.get("divergent_blocks", {})
    rows = [
        ["verified", "yes" if report.get("verified") else "NO"],
        ["log", f"{human_bytes(report.get('log_bytes', 0))} in {report.get('log_frames', 0)} frames"],
        ["events replayed", f"{report.get('events_replayed', 0)} (sync marks met {report.get('sync_marks_met', 0)}, "
                            f"failed {report.get('sync_marks_failed', 0)})"],
        ["divergent blocks", f"memory {div.get('memory', 0)}, disk {div.get('disk', 0)}"],
        ["  sent as reference / delta / full",
         f"{report.get('referenced_blocks', 0)} / {report.get('delta_blocks', 0)} / {report.get('full_blocks', 0)}"],
        ["hash bytes", human_bytes(report.get("hash_bytes", 0))],
        ["block bytes", human_bytes(report.get("block_bytes", 0))],
        ["wire bytes (all traffic)", human_bytes(report.get("wire_bytes", 0))],
        ["plain state transfer (baseline)", human_bytes(report.get("baseline_bytes", 0))],
        ["savings vs baseline", f"{100 * report.get('savings', 0):.1f} %"],
        ["replay", f"{report.get('replay_s', 0):.1f} s"],
        ["diff (tree walk)", f"{report.get('diff_s', 0):.2f} s"],
        ["transfer", f"{report.get('transfer_s', 0):.2f} s"],
        ["downtime (source paused → target resumed)", f"{report.get('downtime_s', 0):.1f} s"],
    ]
    table(rows, [title, ""])


def _token(args: argparse.Namespace) -> str:
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        raise UsageError(f"no token for the handoff service: --token or ${TOKEN_ENV}")
    return str(token)


def _url(args: argparse.Namespace, base: str) -> str:
    return session_url(base, args.session)


# ---- source: record --to / suspend -----------------------------------------------------------------
async def _source(args: argparse.Namespace, hv: Hypervisor, m: Machine, ck: ckpt.Checkpoint,
                  stop: asyncio.Event) -> Report:
    async with SessionClient(_url(args, args.to), "source", token=_token(args)) as client:
        src = SourceSide(hv, m, ck, client)
        src.progress = Progress()
        streaming = asyncio.create_task(src.stream_log(stop))
        await stop.wait()
        await streaming
        report = await src.suspend()
        await src.release()
        return report


def _checkpoint_of(m: Machine) -> ckpt.Checkpoint:
    origin = m.run_dir / "checkpoint"
    if not origin.is_file():
        raise VMError(f"{m.name!r} is not a clone of a checkpoint (no {origin})")
    return ckpt.get(origin.read_text().strip())


def cmd_record_to(args: argparse.Namespace) -> int:
    with Hypervisor(args.connect) as hv:
        m = hv.lookup(args.domain)
        ck = _checkpoint_of(m)
        pid_file = m.run_dir / PID_FILE
        result_file = m.run_dir / RESULT_FILE
        result_file.unlink(missing_ok=True)

        async def main() -> Report:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGUSR1, signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            if args.duration is not None:
                loop.call_later(args.duration, stop.set)
            return await _source(args, hv, m, ck, stop)

        pid_file.write_text(f"{os.getpid()}\n")
        print(f"recording {m.name} into session {args.session}; `replay-migrate suspend {m.name}` "
              "(or Ctrl-C) migrates it", file=sys.stderr)
        try:
            report = asyncio.run(main()).as_dict()
        except ReplayMigrateError as e:
            result_file.write_text(json.dumps({"error": str(e), "exit_code": e.exit_code}))
            raise
        finally:
            pid_file.unlink(missing_ok=True)
        result_file.write_text(json.dumps(report))
        print_report(report, args.json)
    return 0


def cmd_suspend(args: argparse.Namespace) -> int:
    """Tell the domain's recording process to migrate now, and wait for its report."""
    with Hypervisor(args.connect) as hv:
        m = hv.lookup(args.domain)
        run_dir = m.run_dir
    pid_file, result_file = run_dir / PID_FILE, run_dir / RESULT_FILE
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGUSR1)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        raise UsageError(f"no `replay-migrate record {args.domain} --to URL` is running for this domain: "
                         "start one first (it streams the log and performs the suspend)") from None
    deadline = time.monotonic() + args.timeout
    while pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    if not result_file.exists():
        raise ReplayMigrateError(f"the recording process of {args.domain} ended without a report")
    report = json.loads(result_file.read_text())
    if "error" in report:
        print(f"replay-migrate: error: {report['error']}", file=sys.stderr)
        return int(report.get("exit_code", 2))
    print_report(report, args.json)
    return 0


# ---- target: follow -------------------------------------------------------------------------------
def cmd_follow(args: argparse.Namespace) -> int:
    ck = ckpt.get(args.checkpoint)
    name = args.name or f"{ckpt.DOMAIN_PREFIX}{args.session}-target"
    with Hypervisor(args.connect) as hv:
        async def main() -> Report:
            async with SessionClient(_url(args, args.source_url), "target", token=_token(args)) as client:
                side = TargetSide(hv, ck, client, name, replay=_replay_config(args))
                side.progress = bar
                return await side.run()

        bar = Progress()
        try:
            report = asyncio.run(main()).as_dict()
        finally:
            bar.close()
    print_report(report, args.json, title=f"{name} (target)")
    return 0


def _replay_config(args: argparse.Namespace) -> ReplayConfig:
    return ReplayConfig(gap_cap_s=args.gap_cap)


# ---- both, embedded -------------------------------------------------------------------------------
async def migrate_embedded(hv_source: Hypervisor, hv_target: Hypervisor, m: Machine, ck: ckpt.Checkpoint,
                           target_name: str, *, user: Callable[[], Awaitable[None]],
                           replay: ReplayConfig | None = None, screenshots: Path | None = None,
                           on_verified: Callable[[SourceSide, VmState], None] | None = None,
                           progress: Progress | None = None) -> tuple[Report, SourceSide, TargetSide]:
    """Service on loopback, source and target in this process; ``user`` is what happens at the
    source before the suspend (a workload, or waiting for the person at the console)."""
    token = secrets.token_urlsafe(24)
    session = secrets.token_hex(8)
    async with start_service(ServiceConfig(token=token, port=0)) as base:
        url = session_url(base, session)
        async with SessionClient(url, "source", token=token) as sc, \
                SessionClient(url, "target", token=token) as tc:
            src = SourceSide(hv_source, m, ck, sc)
            tgt = TargetSide(hv_target, ck, tc, target_name, replay=replay)
            src.progress = tgt.progress = progress or Progress(enabled=False)
            if on_verified is not None:
                tgt.on_verified = lambda state: on_verified(src, state)
            stop = asyncio.Event()
            target_task = asyncio.create_task(tgt.run())
            streaming = asyncio.create_task(src.stream_log(stop))
            try:
                await user()
                stop.set()
                await streaming
                if screenshots is not None:
                    src.screenshot_at_suspend = screenshots / "source-at-suspend.png"
                await src.suspend()
                await target_task
            except BaseException:
                stop.set()
                streaming.cancel()
                # the failing side told the session; give the other one time to clean up after itself
                done, _ = await asyncio.wait({target_task}, timeout=CLEANUP_WAIT_S)
                if not done:
                    target_task.cancel()
                await asyncio.gather(streaming, target_task, return_exceptions=True)
                raise
    if screenshots is not None and tgt.machine is not None:
        shot = await asyncio.to_thread(tgt.machine.screenshot)
        write_output(screenshots / "target-resumed.png", shot.png(), "screenshot")
    return merged_report(src, tgt), src, tgt


def state_comparison() -> tuple[list[bool], Callable[[SourceSide, VmState], None]]:
    """An ``on_verified`` hook for an embedded migration and the list it fills with (memory equal,
    disk equal): the source's saved state against the target's patched one, before it resumes."""
    same: list[bool] = []

    def compare(src: SourceSide, state: VmState) -> None:
        if src.state_files is None:
            raise VerificationError("the source has no saved state to compare with")
        same.extend(same_state(src.state_files, state))

    return same, compare


def cmd_migrate(args: argparse.Namespace) -> int:
    actions = get_workload(args.workload)[1] if args.workload else None
    ck = ckpt.get(args.checkpoint)
    with Hypervisor(args.connect) as hv, Hypervisor(args.connect) as hv2:
        m = hv.lookup(args.domain)
        target = args.target_name or f"{args.domain}-migrated"

        async def user() -> None:
            if actions is not None:
                await asyncio.to_thread(drive, m, actions, seed=args.seed)
            elif args.duration is not None:
                await asyncio.sleep(args.duration)
            else:
                print(f"recording {m.name}: work in it, then press Enter here to migrate", file=sys.stderr)
                await asyncio.to_thread(sys.stdin.readline)

        bar = Progress()
        try:
            report, _, _ = asyncio.run(migrate_embedded(hv, hv2, m, ck, target, user=user,
                                                        replay=_replay_config(args), progress=bar))
        finally:
            bar.close()
    print_report(report.as_dict(), args.json)
    return 0


# ---- arguments ------------------------------------------------------------------------------------
def _session_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--session", required=True, help="session id both sides use")
    p.add_argument("--token", default=None, help=f"bearer token (default: ${TOKEN_ENV})")
    p.add_argument("--json", action="store_true")


def add_record_to_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain")
    p.add_argument("--to", required=True, metavar="URL", help="the handoff service, ws[s]://HOST:PORT")
    p.add_argument("--duration", type=float, help="suspend by itself after this many seconds")
    _session_args(p)


def add_suspend_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain")
    p.add_argument("--timeout", type=float, default=SUSPEND_WAIT_S)
    p.add_argument("--json", action="store_true")


def add_follow_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source_url", required=True, metavar="URL",
                   help="the handoff service, ws[s]://HOST:PORT")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--name", help="the target clone's name (default: rm-SESSION-target)")
    p.add_argument("--gap-cap", type=float, default=2.0)
    _session_args(p)


def add_migrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", help="a running clone of CHECKPOINT (replay-migrate vm start)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--target-name", help="name of the migrated VM (default: DOMAIN-migrated)")
    p.add_argument("--workload", help="drive this workload (a shipped name, as `workload list` shows, or a "
                   "file) into the source, then migrate")
    p.add_argument("--duration", type=float, help="record this long, then migrate (default: until Enter)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gap-cap", type=float, default=2.0)
    p.add_argument("--json", action="store_true")
