"""The migration commands: ``record --to``/``suspend`` at the source, ``follow`` at the target,
and ``migrate``, which runs the service on loopback and both sides in this process: the same
code paths as two hosts, for the demo and for trying the tool on one machine.

``record --to`` keeps streaming until it is told to migrate: by ``replay-migrate suspend DOMAIN``
(which sends it SIGUSR1 through the pid file in the clone's folder and prints its report) or after
``--duration``. SIGINT (Ctrl-C), SIGTERM and SIGHUP *cancel* a migration, in every command: the
source VM runs on as it was, the target's clone is removed, and the command exits 128 + the
signal's number; once the target has verified every block the migration completes instead (see
the README's table). Every argument is checked before anything starts (the workload loads, the
checkpoint exists, the source is a running clone of it, the target's name is free), and a failure
in any part of a command fails the whole at once (:func:`migration.cancel.supervise`).

Credentials (DESIGN.md §8, README "Security model"): ``record --to URL --target-credential FILE``
creates the session with the shared token and writes the target's credential to FILE (0600) for
the user to hand to ``follow --credential FILE`` at the target; ``session new`` does the same for
both roles when the session should exist before recording starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from cli.argtypes import positive
from cli.report import Progress, emit_json, human_bytes, keep_drawing, table
from migration import cancel
from migration.native import advice, migrate_native
from migration.sides import Report, SourceSide, TargetSide, merged_report
from migration.suspenddir import SUSPEND_DIR_ENV, suspend_dir_arg, suspend_dir_from_env
from replay_migrate.errors import ReplayMigrateError, UsageError, VerificationError, VMError
from replay_migrate.safeopen import write_output
from replayer.drive import drive
from replayer.replay import ReplayConfig
from replayer.workload import get_workload
from server.client import SessionClient, check_service, create_session
from server.credentials import CREDENTIAL_ENV, TOKEN_ENV, load_credential, load_token, write_secret_file
from server.keyring import MIN_KEY_BYTES, Credential
from server.service import ServiceConfig, start_service
from server.wire import Role
from store import checkpoint as ckpt
from store.chain import DEFAULT_CHAIN_LIMIT
from store.paths import check_name
from store.vmstate import VmState, same_state
from vm.machine import Hypervisor, Machine, MachineState
from vm.native import MIGRATE_TIMEOUT_S, NativeParams, Variant

PID_FILE = "record.pid"
RESULT_FILE = "migration.json"
SUSPEND_WAIT_S = 1800.0
STRATEGIES = ("replay", "native")
RECORDER_STOP_S = 120.0
"""How long ``suspend --strategy native`` waits for a ``record --to`` it cancelled to put the VM back."""
"""How long ``suspend`` waits for the recording process to finish the migration."""


UNKNOWN = "unknown"
"""What a figure shows when no side could tell it (the other side's report never came): never 0."""


def print_report(report: dict[str, Any], as_json: bool, title: str = "migration") -> None:
    """The report as a table, or as JSON (where an unknown figure is null)."""
    if as_json:
        emit_json(report)
        return
    if report.get("strategy") == "native":
        print_native_report(report, title)
        return

    def fig(key: str, show: Callable[[Any], str] = str, sub: str | None = None) -> str:
        v = report.get(key)
        if sub is not None and isinstance(v, dict):
            v = v.get(sub)
        return UNKNOWN if v is None else show(v)

    verified = report.get("verified")
    rows = [
        ["verified", UNKNOWN if verified is None else "yes" if verified else "NO"],
        ["log", f"{fig('log_bytes', human_bytes)} in {fig('log_frames')} frames"],
        ["events replayed", f"{fig('events_replayed')} (sync marks met {fig('sync_marks_met')}, "
                            f"failed {fig('sync_marks_failed')})"],
        ["divergent blocks", f"memory {fig('divergent_blocks', sub='memory')}, "
                             f"disk {fig('divergent_blocks', sub='disk')}"],
        ["  sent as reference / delta / full",
         f"{fig('referenced_blocks')} / {fig('delta_blocks')} / {fig('full_blocks')}"],
        ["hash bytes", fig("hash_bytes", human_bytes)],
        ["block bytes", fig("block_bytes", human_bytes)],
        ["wire bytes (all traffic)", fig("wire_bytes", human_bytes)],
        ["plain state transfer (baseline)", fig("baseline_bytes", human_bytes)],
        ["savings vs baseline", fig("savings", lambda v: f"{100 * v:.1f} %")],
        ["replay", fig("replay_s", lambda v: f"{v:.1f} s")],
        ["diff (tree walk)", fig("diff_s", lambda v: f"{v:.2f} s")],
        ["transfer", fig("transfer_s", lambda v: f"{v:.2f} s")],
        ["catch-up (VM running, target replaying)", fig("catchup_s", lambda v: f"{v:.1f} s")],
        ["downtime (source paused → target resumed)", fig("downtime_s", lambda v: f"{v:.1f} s")],
        ["next common checkpoint", report.get("next_checkpoint") or "-"],
    ]
    table(rows, [title, ""])


def print_native_report(report: dict[str, Any], title: str) -> None:
    """A native migration's table: libvirt's figures; replay's do not apply, the baseline is unknown."""
    nat = report.get("native", {})
    comp = f", {nat['compression']}" if nat.get("compression") else ""
    table([["strategy", f"native (libvirt live migration, {nat.get('variant', '?')}{comp})"],
           ["verified", "not by replay-migrate (libvirt checks no root hashes)"],
           ["wire bytes (memory + disk)", f"{human_bytes(report.get('wire_bytes', 0))} (memory "
                                          f"{human_bytes(nat.get('memory_bytes', 0))}, disk "
                                          f"{human_bytes(nat.get('disk_bytes', 0))})"],
           ["plain state transfer (baseline)", "unknown (no state saved to compare)"],
           ["memory iterations", nat.get("iterations", "?")],
           ["total", f"{report.get('total_s', 0):.2f} s"],
           ["downtime", f"{1000 * report.get('downtime_s', 0):.0f} ms"]], [title, ""])
    if report.get("advice"):
        print(report["advice"])


def native_params(args: argparse.Namespace) -> NativeParams:
    """``--native-variant`` and ``--native-timeout``; refused with ``--strategy replay``."""
    if args.strategy != "native":
        if args.native_variant is not None or args.migrate_uri is not None:
            raise UsageError("--native-variant and --migrate-uri apply to --strategy native only")
        return NativeParams()
    return NativeParams(variant=Variant(args.native_variant or Variant.PRECOPY.value), timeout_s=args.native_timeout,
                        migrate_uri=args.migrate_uri)


def check_native_target(args: argparse.Namespace) -> str:
    """The target daemon of a native migration: ``--target-connect``, another host's."""
    if not args.target_connect:
        raise UsageError("--strategy native needs --target-connect URI (the target host's libvirt, e.g. "
                         "qemu+tcp://HOST/system): libvirt migrates from daemon to daemon")
    if args.target_connect == args.connect:
        raise UsageError("--target-connect is --connect: a native migration needs another host's libvirt")
    return str(args.target_connect)


def run_native(hv: Hypervisor, hv2: Hypervisor, m: Machine, ck: ckpt.Checkpoint, target: str, params: NativeParams,
               *, before: Callable[[], Awaitable[None]] | None = None) -> dict[str, Any]:
    """``before`` (the user's work), then the native migration, under :func:`migration.cancel.run`:
    a signal aborts libvirt's job (the source runs on), unless post-copy had begun (then the
    migration completes: the VM would be lost otherwise)."""
    stop = threading.Event()
    switched: list[bool] = []
    bar = Progress()

    async def main() -> dict[str, Any]:
        if before is not None:
            await before()
        _, report = await cancel.in_thread(migrate_native, hv, hv2, m, ck, target, params, progress=bar, stop=stop,
                                           on_switch=lambda: switched.append(True), on_cancel=stop.set)
        return report

    try:
        return cancel.run(main, deferred=lambda: bool(switched),
                          on_cancel=f"cancelling the live migration: {m.name} runs on at the source")
    finally:
        bar.close()


def _token(args: argparse.Namespace) -> str:
    token = load_token(args.token_file)
    if not token:
        raise UsageError(f"creating a session needs the service's token: ${TOKEN_ENV} or --token-file FILE")
    return token


async def _new_session(args: argparse.Namespace) -> tuple[Credential, Credential]:
    return await create_session(args.to, _token(args), cafile=args.ca_file)


def cmd_session_new(args: argparse.Namespace) -> int:
    """``replay-migrate session new``: a session at the service, its two credentials in new 0600 files."""
    for path in (args.source_credential, args.target_credential):
        if path.exists() or path.is_symlink():
            raise UsageError(f"{path}: exists; credentials are written to new files only")
    source, target = asyncio.run(_new_session(args))
    write_secret_file(args.source_credential, str(source), "source credential")
    write_secret_file(args.target_credential, str(target), "target credential")
    print(source.session)
    return 0


# ---- argument checks --------------------------------------------------------------------------------
def check_clone_name(name: str, what: str) -> str:
    """A name for a new clone: the checkpoint store's name rule (it becomes a folder name)."""
    try:
        check_name(name, "clone")
    except ReplayMigrateError as e:
        raise UsageError(f"{what}: {e}") from None
    return name


def check_source(hv: Hypervisor, domain: str, ck: ckpt.Checkpoint | None = None) -> tuple[Machine, ckpt.Checkpoint]:
    """The source domain and its checkpoint: it exists, is one of our clones (of ``ck`` when
    given) and runs (a paused or stopped source records nothing and cannot be frozen)."""
    m = hv.lookup(domain)
    origin = _checkpoint_of(m)
    if ck is not None and origin.name != ck.name:
        raise UsageError(f"{domain!r} is a clone of checkpoint {origin.name!r}, not of {ck.name!r}: "
                         "both sites must start from the checkpoint the source was made from")
    state = m.state
    if state is not MachineState.RUNNING:
        raise VMError(f"{domain!r} is {state.value}: the source of a migration must be running")
    return m, origin


def check_target_name(hv: Hypervisor, name: str, option: str) -> None:
    """The target makes a new clone of this name: never a domain that exists (it would be lost)."""
    if hv.exists(name):
        raise UsageError(f"a domain named {name!r} exists already: choose another {option} or remove it "
                         f"(replay-migrate vm rm {name})")


def _committed(*sides: SourceSide | TargetSide | None) -> bool:
    return any(side is not None and side.committing for side in sides)


async def read_line(stream: TextIO | None = None) -> None:
    """Wait for a line on ``stream`` (stdin) in the event loop, not in a thread: a thread blocked in
    ``readline`` cannot be cancelled and kept the process alive after Ctrl-C until Enter."""
    stream = stream if stream is not None else sys.stdin
    loop = asyncio.get_running_loop()
    fd = stream.fileno()
    readable = asyncio.Event()
    try:
        loop.add_reader(fd, readable.set)
    except (PermissionError, ValueError):       # a regular file or /dev/null: never blocks
        stream.readline()
        return
    try:
        while True:
            await readable.wait()
            readable.clear()
            data = os.read(fd, 4096)
            if not data or b"\n" in data:
                return
    finally:
        loop.remove_reader(fd)


# ---- source: record --to / suspend -----------------------------------------------------------------
def _source_credential(args: argparse.Namespace) -> Credential | None:
    """The source credential the arguments name, or None when ``--target-credential`` asks for a new
    session (checked before anything starts)."""
    check_service(args.to, args.ca_file)
    if args.target_credential is not None:
        if args.credential is not None:
            raise UsageError("--credential (an existing session) and --target-credential (a new one) exclude "
                             "each other")
        if args.target_credential.exists() or args.target_credential.is_symlink():
            raise UsageError(f"{args.target_credential}: exists; the target's credential goes to a new file")
        _token(args)
        return None
    if args.credential is None and not os.environ.get(CREDENTIAL_ENV):
        raise UsageError("record --to needs the session: --target-credential FILE (a new session; the target's "
                         f"credential goes there) or --credential FILE / ${CREDENTIAL_ENV} (an existing one)")
    return load_credential(args.credential, Role.SOURCE)


async def _source(client: SessionClient, hv: Hypervisor, m: Machine, ck: ckpt.Checkpoint,
                  stop: asyncio.Event, sides: dict[str, SourceSide], bar: Progress,
                  suspend_dir: Path | None, chain_limit: int) -> dict[str, Any]:
    """The source's part; returns the whole report (with the target's half, once it came)."""
    async with client, _drawing(bar):
        src = sides["source"] = SourceSide(hv, m, ck, client, suspend_dir=suspend_dir,
                                                  chain_limit=chain_limit)
        src.progress, src.progress_note = bar, bar.note
        await src.stream_log(stop)
        await src.suspend()
        await src.release()
        return src.whole


@contextlib.asynccontextmanager
async def _drawing(bar: Progress) -> AsyncIterator[None]:
    """Keep ``bar``'s line going while the block runs (a save reports nothing for seconds), and
    clear it after."""
    ticker = asyncio.create_task(keep_drawing(bar))
    try:
        yield
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        bar.close()


def _checkpoint_of(m: Machine) -> ckpt.Checkpoint:
    origin = ckpt.run_dir_of(m) / "checkpoint"
    if not origin.is_file():
        raise VMError(f"{m.name!r} is not a clone of a checkpoint (no {origin})")
    return ckpt.get(origin.read_text().strip())


def cmd_record_to(args: argparse.Namespace) -> int:
    """Stream until SIGUSR1 (``suspend``) or ``--duration``, then migrate; SIGINT, SIGTERM or
    SIGHUP cancel: the session is failed (the target removes its clone) and the VM runs on here."""
    credential = _source_credential(args)          # every argument checked before anything starts
    with Hypervisor(args.connect) as hv:
        m, ck = check_source(hv, args.domain)
        run_dir = ckpt.run_dir_of(m)
        if credential is None:
            credential, target = asyncio.run(_new_session(args))
            write_secret_file(args.target_credential, str(target), "target credential")
            print(f"session {credential.session}: hand {args.target_credential} to the target site's "
                  f"`replay-migrate follow --credential FILE`", file=sys.stderr)
        client = SessionClient(args.to, credential, cafile=args.ca_file)
        pid_file = run_dir / PID_FILE
        result_file = run_dir / RESULT_FILE
        result_file.unlink(missing_ok=True)
        sides: dict[str, SourceSide] = {}

        early: list[int] = []

        async def main() -> dict[str, Any]:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGUSR1, stop.set)
            if early:
                stop.set()
            if args.duration is not None:
                loop.call_later(args.duration, stop.set)
            return await _source(client, hv, m, ck, stop, sides, Progress(), args.suspend_dir, args.chain_limit)

        # SIGUSR1's default action ends a process: from the moment the pid file names us, a
        # `suspend` is remembered (before the loop runs) or ignored (after: the migration is over)
        signal.signal(signal.SIGUSR1, lambda signum, frame: early.append(signum))
        pid_fd = hold_pid_file(pid_file, m.name)
        print(f"recording {m.name} into session {credential.session}; `replay-migrate suspend {m.name}` "
              "migrates it, Ctrl-C cancels", file=sys.stderr)
        outcome: dict[str, Any] = {"error": "the recording process failed (a bug: see its output)", "exit_code": 1}
        try:
            report = cancel.run(main, deferred=lambda: _committed(sides.get("source")),
                                on_cancel="cancelling the migration: the VM runs on here as it was, the "
                                          "target is told to remove its clone")
            outcome = report
        except ReplayMigrateError as e:
            outcome = {"error": str(e), "exit_code": e.exit_code}
            raise
        except cancel.Interrupted as e:
            outcome = {"error": f"cancelled by {e}: the VM runs on here", "exit_code": e.exit_code}
            raise
        finally:
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            result_file.write_text(json.dumps(outcome))    # before the pid file goes: `suspend` reads it then
            pid_file.unlink(missing_ok=True)
            os.close(pid_fd)
        print_report(report, args.json)
    return 0


def hold_pid_file(path: Path, domain: str) -> int:
    """Claim ``path`` for this ``record --to`` process: an exclusive ``flock`` held until the
    process ends (the kernel drops it even on SIGKILL), then our pid in it. The descriptor is
    returned (keep it open). A second recorder of the same domain is refused."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"a `replay-migrate record {domain} --to` runs already (pid {path.read_text().strip()})") \
            from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def recorder_pid(path: Path) -> int | None:
    """The pid of the live ``record --to`` holding ``path``, else None: no file, or a stale one
    (its process ended, perhaps killed; the pid in it may be any process's by now, and SIGUSR1's
    default action would end that process)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 64).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else None
        return None
    finally:
        os.close(fd)


def cmd_suspend(args: argparse.Namespace) -> int:
    """Tell the domain's recording process to migrate now, and wait for its report; with
    ``--strategy native``, migrate it by libvirt instead (:func:`suspend_native`)."""
    params = native_params(args)
    if args.strategy == "native":
        return suspend_native(args, params)
    if args.target_connect is not None or args.target_name is not None:
        raise UsageError("--target-connect and --target-name apply to --strategy native only (with replay, the "
                         "target is the `follow` process)")
    with Hypervisor(args.connect) as hv:
        run_dir = ckpt.run_dir_of(hv.lookup(args.domain))
    pid_file, result_file = run_dir / PID_FILE, run_dir / RESULT_FILE
    pid = recorder_pid(pid_file)
    try:
        if pid is None:
            raise ProcessLookupError
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        raise UsageError(f"no `replay-migrate record {args.domain} --to URL` is running for this domain: "
                         "start one first (it streams the log and performs the suspend)") from None
    deadline = time.monotonic() + args.timeout
    while recorder_pid(pid_file) == pid and time.monotonic() < deadline:
        time.sleep(0.2)
    if recorder_pid(pid_file) == pid:
        raise ReplayMigrateError(f"the recording process of {args.domain} (pid {pid}) is still migrating after "
                                 f"{args.timeout:.0f} s")
    if not result_file.exists():
        raise ReplayMigrateError(f"the recording process of {args.domain} ended without a report")
    report = json.loads(result_file.read_text())
    if "error" in report:
        print(f"replay-migrate: error: {report['error']}", file=sys.stderr)
        return int(report.get("exit_code", 2))
    print_report(report, args.json)
    return 0


def suspend_native(args: argparse.Namespace, params: NativeParams) -> int:
    """``suspend DOMAIN --strategy native --target-connect URI``: at the source, in the two-process
    recipe, the user decides at suspend time that libvirt's live migration suits better (a fat
    link). A ``record --to`` streaming this domain's log is cancelled first (SIGTERM: its session
    fails, the target's ``follow`` removes its clone, the VM is thawed and runs on), then the
    running domain is live-migrated to the target's daemon, which must hold the checkpoint."""
    uri = check_native_target(args)
    target = check_clone_name(args.target_name or args.domain, "--target-name")
    with Hypervisor(args.connect) as hv:
        run_dir = ckpt.run_dir_of(hv.lookup(args.domain))
        pid = recorder_pid(run_dir / PID_FILE)
        if pid is not None:
            cancel.say(f"stopping the replay migration (pid {pid}) first: {args.domain} stays here until libvirt "
                       "moves it")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + RECORDER_STOP_S
            while recorder_pid(run_dir / PID_FILE) == pid and time.monotonic() < deadline:
                time.sleep(0.2)
            if recorder_pid(run_dir / PID_FILE) == pid:
                raise ReplayMigrateError(f"the recording process of {args.domain} (pid {pid}) did not stop in "
                                         f"{RECORDER_STOP_S:.0f} s")
        m, ck = check_source(hv, args.domain)
        with Hypervisor(uri) as hv2:
            check_target_name(hv2, target, "--target-name")
            report = run_native(hv, hv2, m, ck, target, params)
    print_report(report, args.json)
    return 0


# ---- target: follow -------------------------------------------------------------------------------
def cmd_follow(args: argparse.Namespace) -> int:
    """Make a clone, replay the session's log into it, take over at suspend; SIGINT, SIGTERM or
    SIGHUP cancel (the clone is removed, the session failed: the source resumes its VM)."""
    check_service(args.source_url, args.ca_file)
    credential = load_credential(args.credential, Role.TARGET)
    ck = ckpt.get(args.checkpoint)
    name = check_clone_name(args.name or f"{ckpt.DOMAIN_PREFIX}{credential.session}-target", "--name")
    client = SessionClient(args.source_url, credential, cafile=args.ca_file)   # checks the URL
    with Hypervisor(args.connect) as hv:
        check_target_name(hv, name, "--name")
        sides: dict[str, TargetSide] = {}

        async def main() -> dict[str, Any]:
            async with client, _drawing(bar):
                side = sides["target"] = TargetSide(hv, ck, client, name, replay=_replay_config(args),
                                                    suspend_dir=args.suspend_dir, chain_limit=args.chain_limit)
                side.progress, side.progress_note = bar, bar.note
                await side.run()
                return side.whole

        bar = Progress()
        try:
            report = cancel.run(main, deferred=lambda: _committed(sides.get("target")),
                                on_cancel=f"cancelling the migration: {name} is removed, the source is told "
                                          "to resume its VM")
        finally:
            bar.close()
    print_report(report, args.json, title=f"{name} (target)")
    return 0


def _replay_config(args: argparse.Namespace) -> ReplayConfig:
    return ReplayConfig(gap_cap_s=args.gap_cap)


# ---- both, embedded -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServiceEndpoint:
    """A running handoff service: where it is and the token that creates sessions there."""

    url: str
    token: str
    cafile: Path | None = None


@contextlib.asynccontextmanager
async def _loopback_service() -> AsyncIterator[ServiceEndpoint]:
    """A service in this process on an ephemeral loopback port, with a key and a token of its own."""
    token = secrets.token_urlsafe(24)
    async with start_service(ServiceConfig(token=token, key=secrets.token_bytes(MIN_KEY_BYTES), port=0)) as url:
        yield ServiceEndpoint(url, token)


async def migrate_embedded(hv_source: Hypervisor, hv_target: Hypervisor, m: Machine, ck: ckpt.Checkpoint,
                           target_name: str, *, user: Callable[[], Awaitable[None]],
                           replay: ReplayConfig | None = None, screenshots: Path | None = None,
                           on_verified: Callable[[SourceSide, VmState], None] | None = None,
                           progress: Progress | None = None, service: ServiceEndpoint | None = None,
                           on_started: Callable[[SourceSide, TargetSide], None] | None = None,
                           suspend_dir: Path | None = None,
                           chain_limit: int = DEFAULT_CHAIN_LIMIT) -> tuple[Report, SourceSide, TargetSide]:
    """Source and target in this process, through ``service`` or one on loopback made for the
    purpose; ``user`` is what happens at the source before the suspend (a workload, or waiting for
    the person at the console); ``on_started`` sees both sides before anything runs (hooks, tests);
    ``suspend_dir``: where both sides save their VMs at suspend (``migration.suspenddir``).

    The target, the log stream and ``user`` run at once under :func:`migration.cancel.supervise`:
    the first to fail (or a cancellation) stops the others at once; the source VM is put back as
    it was and the target's clone removed before the error is raised. After the target confirmed,
    the source is released (``SourceSide.release``): look at its state in ``on_verified``."""
    async with contextlib.AsyncExitStack() as stack:
        if service is None:
            service = await stack.enter_async_context(_loopback_service())
        source_cred, target_cred = await create_session(service.url, service.token, cafile=service.cafile)
        async with SessionClient(service.url, source_cred, cafile=service.cafile) as sc, \
                SessionClient(service.url, target_cred, cafile=service.cafile) as tc:
            src = SourceSide(hv_source, m, ck, sc, suspend_dir=suspend_dir, chain_limit=chain_limit)
            tgt = TargetSide(hv_target, ck, tc, target_name, replay=replay, suspend_dir=suspend_dir,
                             chain_limit=chain_limit)
            bar = progress or Progress(enabled=False)

            def suspending(what: str, done: int, total: int) -> None:
                if what != "recording":     # one line: while the log streams, the target's replay
                    bar(what, done, total)

            src.progress, tgt.progress = suspending, bar
            tgt.progress_note = bar.note
            if on_verified is not None:
                tgt.on_verified = lambda state: on_verified(src, state)
            if on_started is not None:
                on_started(src, tgt)
            await src.open()              # the source's recorder answers before a target is made
            stop = asyncio.Event()

            async def work() -> None:
                await user()
                stop.set()

            async def source() -> None:
                await cancel.supervise(src.stream_log(stop), work())
                if screenshots is not None:
                    src.screenshot_at_suspend = screenshots / "source-at-suspend.png"
                await src.suspend()

            await cancel.supervise(tgt.run(), source())
    # verified and confirmed: the VM lives at the target; nothing may bring the source's copy back
    await src.release()
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
    """Every argument is checked before anything starts: the workload loads, the checkpoint
    exists, the names are valid, then (on the hypervisor) the source is a running clone of the
    checkpoint and the target's name is free. SIGINT, SIGTERM or SIGHUP cancel."""
    actions = get_workload(args.workload)[1] if args.workload else None
    target = check_clone_name(args.target_name or f"{args.domain}-migrated", "--target-name")
    if target == args.domain:
        raise UsageError("--target-name: the target needs a name of its own (the source keeps its name)")
    params = native_params(args)
    if args.strategy == "native":
        check_native_target(args)
    ck = ckpt.get(args.checkpoint)
    with Hypervisor(args.connect) as hv, Hypervisor(args.target_connect or args.connect) as hv2:
        m, _ = check_source(hv, args.domain, ck)
        check_target_name(hv2, target, "--target-name")
        typing = threading.Event()
        both: list[SourceSide | TargetSide] = []
        t_suspend: list[float] = []

        async def user() -> None:
            if actions is not None:
                await cancel.in_thread(drive, m, actions, seed=args.seed, stop=typing, on_cancel=typing.set)
            elif args.duration is not None:
                await asyncio.sleep(args.duration)
            else:
                print(f"recording {m.name}: work in it, then press Enter here to migrate (Ctrl-C cancels)",
                      file=sys.stderr)
                await read_line()
            t_suspend.append(time.monotonic())

        if args.strategy == "native":
            print_report(run_native(hv, hv2, m, ck, target, params, before=user), args.json)
            return 0

        async def main() -> tuple[Report, SourceSide, TargetSide]:
            async with _drawing(bar):
                return await migrate_embedded(hv, hv2, m, ck, target, user=user, replay=_replay_config(args),
                                              suspend_dir=args.suspend_dir,
                                              progress=bar, on_started=lambda s, t: both.extend((s, t)),
                                              chain_limit=args.chain_limit)

        bar = Progress()
        try:
            report, _, _ = cancel.run(main, deferred=lambda: _committed(*both),
                                      on_cancel=f"cancelling the migration: {m.name} runs on as it was, "
                                                f"{target} is removed")
        finally:
            bar.close()
    out = {**report.as_dict(), "strategy": "replay",
           "total_s": round(time.monotonic() - t_suspend[0], 3) if t_suspend else None,
           "advice": advice("replay", report.wire_bytes, native_bytes=ck.manifest.memory_allocated_bytes)}
    print_report(out, args.json)
    return 0


# ---- arguments ------------------------------------------------------------------------------------
def _ca_file_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca-file", type=Path, default=None, metavar="PEM",
                   help="trust only this certificate for the wss:// service (a self-signed one)")


def _token_file_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token-file", type=Path, default=None, metavar="FILE",
                   help=f"the service's shared token, which creates sessions (default: ${TOKEN_ENV})")


def add_suspend_dir_argument(p: argparse.ArgumentParser, *, rm: bool = False) -> None:
    """``--suspend-dir``: where a migration saves the VMs at suspend (``migration.suspenddir``);
    ``rm``: where commands that delete clones look for the images killed migrations left."""
    if rm:
        what = ("also delete the image each clone saved into DIR's private folder, where a migration "
                "killed after its suspend leaves it")
    else:
        what = ("save the VM at suspend into DIR (a tmpfs such as /dev/shm: the save, hashing, patching "
                "and restore run at memory speed; a private subfolder is made there); without it, or when DIR "
                "has no room for the guest's RAM, the clone's folder on the state disk")
    p.add_argument("--suspend-dir", type=suspend_dir_arg, default=suspend_dir_from_env(), metavar="DIR",
                   help=f"{what} (default: ${SUSPEND_DIR_ENV})")


def _chain_limit_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chain-limit", type=int, default=DEFAULT_CHAIN_LIMIT, metavar="N",
                   help="after a verified migration, register the state as the next common checkpoint, its disk "
                   "at most N qcow2 layers over its chain's root, and prune the chain (0: register none; "
                   "default %(default)s)")


def add_record_to_options(p: argparse.ArgumentParser) -> None:
    """``record``'s options for ``--to`` (the rest of ``record`` is in cli/main.py)."""
    add_suspend_dir_argument(p)
    _chain_limit_arg(p)
    p.add_argument("--target-credential", type=Path, default=None, metavar="FILE",
                   help="with --to: create a new session and write the target's credential to FILE (0600)")
    p.add_argument("--credential", type=Path, default=None, metavar="FILE",
                   help=f"with --to: the source credential of an existing session (default: ${CREDENTIAL_ENV})")
    _token_file_arg(p)
    _ca_file_arg(p)


def add_session_new_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", required=True, metavar="URL", help="the handoff service, ws[s]://HOST:PORT")
    p.add_argument("--source-credential", type=Path, required=True, metavar="FILE",
                   help="write the source's credential here (a new 0600 file)")
    p.add_argument("--target-credential", type=Path, required=True, metavar="FILE",
                   help="write the target's credential here (a new 0600 file)")
    _token_file_arg(p)
    _ca_file_arg(p)


def _strategy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", choices=STRATEGIES, default="replay",
                   help="replay: replay the user's input at the target and ship what still differs (thin links); "
                   "native: libvirt's own live migration to --target-connect (fat links; the target holds the "
                   "checkpoint, its overlay is the base of the disk copy). Default %(default)s")
    p.add_argument("--native-variant", choices=[v.value for v in Variant], default=None,
                   help="with --strategy native: pre-copy (default), pre-copy compressed (multifd+zstd, else "
                   "XBZRLE) or post-copy (needs userfaultfd at the target; a failure after the switch loses the VM)")
    p.add_argument("--native-timeout", type=positive, default=MIGRATE_TIMEOUT_S,
                   help="with --strategy native: abort the live migration after this many seconds (the source runs "
                   "on; default %(default)s)")
    p.add_argument("--migrate-uri", metavar="tcp://HOST", default=None,
                   help="with --strategy native: where this host's QEMU reaches the target's (memory and disk "
                   "streams; default: the address the target's libvirt announces)")


def add_suspend_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain")
    p.add_argument("--timeout", type=positive, default=SUSPEND_WAIT_S,
                   help="seconds to wait for the migration's report (default %(default)s)")
    p.add_argument("--json", action="store_true")
    _strategy_args(p)
    p.add_argument("--target-connect", metavar="URI", default=None,
                   help="with --strategy native: the target host's libvirt (qemu+tcp://HOST/system, qemu+ssh://...); "
                   "a `record --to` of the domain is cancelled first")
    p.add_argument("--target-name", default=None,
                   help="with --strategy native: the VM's name at the target (default: the domain's own)")


def add_follow_arguments(p: argparse.ArgumentParser) -> None:
    add_suspend_dir_argument(p)
    p.add_argument("--from", dest="source_url", required=True, metavar="URL",
                   help="the handoff service, ws[s]://HOST:PORT")
    p.add_argument("--credential", type=Path, default=None, metavar="FILE",
                   help=f"the target's credential, from the source site (default: ${CREDENTIAL_ENV})")
    _ca_file_arg(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--name", help="the target clone's name (default: rm-SESSION-target)")
    _chain_limit_arg(p)
    p.add_argument("--gap-cap", type=positive, default=2.0)
    p.add_argument("--json", action="store_true")


def add_migrate_arguments(p: argparse.ArgumentParser) -> None:
    add_suspend_dir_argument(p)
    p.add_argument("domain", help="a running clone of CHECKPOINT (replay-migrate vm start)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--target-name", help="name of the migrated VM (default: DOMAIN-migrated)")
    _chain_limit_arg(p)
    p.add_argument("--target-connect", metavar="URI", default=None,
                   help="libvirt URI of the target's daemon (default: --connect). The target side runs in this "
                   "process and makes its clone's files in this host's state folder, so that daemon must see them "
                   "at the same paths (a daemon of this host, or storage both share); between two hosts, run "
                   "`follow` at the target instead")
    p.add_argument("--workload", help="drive this workload (a shipped name, as `workload list` shows, or a "
                   "file) into the source, then migrate")
    p.add_argument("--duration", type=positive, help="record this long, then migrate (default: until Enter)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gap-cap", type=positive, default=2.0)
    p.add_argument("--json", action="store_true")
    _strategy_args(p)
