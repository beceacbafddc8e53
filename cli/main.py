"""The ``replay-migrate`` command line.

Exit codes: 0 success; 1 an unexpected error (a bug: traceback printed); otherwise the
``exit_code`` of the ReplayMigrateError subclass raised (see replay_migrate/errors.py and the
README's table), or 128 + the number of the signal that stopped the command (130 SIGINT,
143 SIGTERM, 129 SIGHUP). Errors are printed as one line ``replay-migrate: error: ...``.

Every command checks its arguments (files, names, durations, the domain it acts on) before it
starts anything. SIGINT, SIGTERM and SIGHUP stop any command with its cleanup run
(:mod:`migration.cancel`); what each command does on each is in the README's table.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from cli.argtypes import non_negative, positive, positive_int
from cli.report import emit_json, human_bytes, table
from migration.cancel import Interrupted, raising_on_signals, stopping_on_signals
from replay_migrate import __version__
from replay_migrate.errors import CheckpointError, NoSuchDomainError, ReplayMigrateError, UsageError, WorkloadCheckError
from replay_migrate.safeopen import check_output, check_regular, open_output, open_regular, write_output
from replayer.replay import SYNC_SLACK_S
from store import checkpoint as ckpt
from store.images import ensure_image
from store.paths import checkpoint_path
from vm.machine import Hypervisor, Machine

if TYPE_CHECKING:
    from store.exchange import TransferSizes

Handler = Callable[[argparse.Namespace], int]


def _hv(args: argparse.Namespace) -> Hypervisor:
    return Hypervisor(args.connect)


# ---- image ------------------------------------------------------------------------------------
def cmd_image_build(args: argparse.Namespace) -> int:
    r = ensure_image(force=args.force)
    print(f"{r.image.dir} ({f'built in {r.seconds:.0f} s' if r.built else 'cached'})")
    return 0


# ---- checkpoint -------------------------------------------------------------------------------
def cmd_checkpoint_create(args: argparse.Namespace) -> int:
    if args.domain is not None:
        return _checkpoint_of_domain(args)
    from vm.spec import check_kernel_args
    kernel_args = [] if args.no_default_kernel_args and args.kernel_arg is None else args.kernel_arg
    check_kernel_args(kernel_args or ())     # before libvirt is touched
    with _hv(args) as hv:
        ck = ckpt.create(hv, args.name, memory_mib=args.memory_mib, settle_s=args.settle,
                         kernel_args=kernel_args)
        m = ck.manifest
        print(f"checkpoint {ck.name}: {ck.dir} (boot to desktop {m.boot_to_desktop_s:.1f} s, "
              f"memory image {human_bytes(m.memory_allocated_bytes)} allocated)")
    return 0


def _checkpoint_of_domain(args: argparse.Namespace) -> int:
    """``checkpoint create NAME --domain DOMAIN``: a running domain of the user's (store.fromdomain)."""
    from cli.agent import ChannelLogCut, _busy, hello_of
    from store.fromdomain import create_from_domain

    checkpoint_path(args.name)       # a plain name, checked before anything starts
    with _hv(args) as hv:
        m = hv.lookup(args.domain)
        busy = _busy(m)
        if busy is not None:
            raise UsageError(f"a migration of {args.domain!r} runs (`record --to`, pid {busy}): a checkpoint waits "
                             "for it to end")
        if m.recorder_channel() is None:
            raise CheckpointError(f"{args.domain!r} has no recorder channel: "
                                       f"`replay-migrate agent install {args.domain}` first")
        hello = hello_of(m, args.agent_timeout)
        if hello is None:
            raise CheckpointError(f"the recorder agent of {args.domain!r} does not answer: "
                                       f"`replay-migrate agent status {args.domain}` says why")
        ck, clone = create_from_domain(hv, args.name, args.domain, ChannelLogCut(args.agent_timeout))
        man = ck.manifest
        print(f"checkpoint {ck.name}: {ck.dir} (memory image {human_bytes(man.memory_allocated_bytes)} allocated, "
              f"base {man.base['path']}); {clone.name} runs on as its clone (agent {hello.agent_version}, "
              f"{hello.backend or 'unknown backend'})")
    return 0


def cmd_checkpoint_list(args: argparse.Namespace) -> int:
    rows = []
    for ck in ckpt.list_all():
        m = ck.manifest
        origin = {ckpt.ORIGIN_IMAGE: f"image {m.image_recipe}", ckpt.ORIGIN_DOMAIN: f"domain {m.base.get('path')}",
                  ckpt.ORIGIN_MIGRATION: f"after {m.parent} (over {m.backing})"}.get(m.origin, m.origin)
        rows.append([ck.name, origin, m.virt, m.memory_mib,
                     human_bytes(m.memory_allocated_bytes), human_bytes(m.disk_allocated_bytes),
                     ", ".join(ckpt.clones_of(ck.name)) or "-"])
    if args.json:
        emit_json([{"name": r[0], "origin": r[1], "virt": r[2], "memory_mib": r[3]} for r in rows])
    else:
        table(rows, ["name", "origin", "virt", "MiB", "memory", "disk", "clones"])
    return 0


def cmd_checkpoint_rm(args: argparse.Namespace) -> int:
    with _hv(args) as hv:
        ckpt.remove(hv, args.name)
    return 0


def _sizes_table(sizes: TransferSizes, title: str, out: TextIO) -> None:
    """What the checkpoint is as files and as a stream (on ``out``: stderr when stdout is the stream)."""
    rows = [[f"{name} (apparent / allocated / sent)",
             f"{human_bytes(f['apparent'])} / {human_bytes(f['allocated'])} / {human_bytes(f['data'])}"]
            for name, f in sizes.files.items()]
    share = f" ({100 * sizes.stream_bytes / sizes.allocated_bytes:.1f} % of allocated)" if sizes.allocated_bytes else ""
    rows += [["stream (zstd, holes and zero pages skipped)", f"{human_bytes(sizes.stream_bytes)}{share}"],
             ["root hashes (compare them at both sites)",
              f"memory {sizes.roots.get('memory', '?')}, disk {sizes.roots.get('disk', '?')}"],
             ["time", f"{sizes.seconds:.1f} s"]]
    table(rows, [title, ""], out=out)


def cmd_checkpoint_export(args: argparse.Namespace) -> int:
    """One stream on stdout (``-``, the default) or into ``--out FILE``; the report goes to stderr."""
    from store.exchange import export_checkpoint

    to_stdout = args.out is None or str(args.out) == "-"
    if to_stdout and sys.stdout.isatty():
        raise UsageError("checkpoint export writes a binary stream: pipe it (| ssh HOST replay-migrate checkpoint "
                         "import) or give --out FILE")
    if not to_stdout:
        check_output(args.out, "checkpoint stream")
    ckpt.get(args.name)                          # before the output file is created or truncated
    if to_stdout:
        try:
            sizes = export_checkpoint(args.name, sys.stdout.buffer.write)
            sys.stdout.buffer.flush()
        except (ReplayMigrateError, OSError):
            # the reader went away: no flush of what is left at exit (it would fail again)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            raise
    else:
        with open_output(args.out, "checkpoint stream") as f:
            try:
                sizes = export_checkpoint(args.name, f.write)
            except BaseException:
                Path(args.out).unlink(missing_ok=True)   # never half a stream under the name given
                raise
    if args.json:
        emit_json(sizes.as_dict(), out=sys.stderr)
    else:
        _sizes_table(sizes, f"checkpoint {sizes.name} (export)", sys.stderr)
    return 0


def cmd_checkpoint_import(args: argparse.Namespace) -> int:
    """Read a stream from stdin (``-``, the default) or ``--in FILE``: verified, then usable."""
    from store.exchange import import_checkpoint

    if args.input is None or str(args.input) == "-":
        if sys.stdin.isatty():
            raise UsageError("checkpoint import reads a stream: pipe one in (replay-migrate checkpoint export C | "
                             "...) or give --in FILE")
        sizes = import_checkpoint(sys.stdin.buffer.read, name=args.name)
    else:
        fd, _ = open_regular(args.input, "checkpoint stream")
        with os.fdopen(fd, "rb") as f:
            sizes = import_checkpoint(f.read, name=args.name)
    if args.json:
        emit_json(sizes.as_dict())
    else:
        _sizes_table(sizes, f"checkpoint {sizes.name} (imported, verified)", sys.stdout)
    return 0


# ---- vm -----------------------------------------------------------------------------------------
def cmd_vm_start(args: argparse.Namespace) -> int:
    with _hv(args) as hv:
        m = ckpt.start_clone(hv, ckpt.get(args.checkpoint), args.name, paused=args.paused)
        print(f"{m.name}: {m.state.value} (clone of {args.checkpoint}, files in {m.run_dir})")
    return 0


def cmd_vm_list(args: argparse.Namespace) -> int:
    with _hv(args) as hv:
        names = set(hv.names(ckpt.DOMAIN_PREFIX)) | {n for n in ckpt.clone_names() if hv.exists(n)}
        table([[n, hv.lookup(n).state.value] for n in sorted(names)], ["domain", "state"])
    return 0


def cmd_vm_rm(args: argparse.Namespace) -> int:
    """Each clone's domain, folder and the image a killed migration saved into the suspend folder."""
    from migration.suspenddir import remove_saved_image

    with _hv(args) as hv:
        for name in args.names:
            ckpt.remove_clone(hv, name)
            remove_saved_image(name, args.suspend_dir)
    return 0


def cmd_vm_resume(args: argparse.Namespace) -> int:
    """Put back a source VM that a killed migration (SIGKILL, a crash) left paused, frozen or
    saved: SIGINT and SIGTERM do this themselves; SIGKILL runs nothing."""
    from cli.migrate import PID_FILE, recorder_pid
    from migration.sides import put_back
    from migration.suspenddir import saved_images

    with _hv(args) as hv:
        try:
            run_dir = hv.lookup(args.name).run_dir
        except NoSuchDomainError:          # a saved clone: gone until restored from its folder
            run_dir = ckpt.clone_dir(args.name)
            if not saved_images(run_dir, args.suspend_dir):
                raise
        pid = recorder_pid(run_dir / PID_FILE)
        if pid is not None:
            raise UsageError(f"a `replay-migrate record {args.name} --to` (pid {pid}) is migrating it: stop that "
                             "first (Ctrl-C cancels the migration and resumes the VM itself)")
        images = saved_images(run_dir, args.suspend_dir)
        back = put_back(hv, args.name, images[0] if images else None)
        print(f"{back.name}: {back.state.value}, file systems thawed")
    return 0


def cmd_vm_screenshot(args: argparse.Namespace) -> int:
    check_output(args.out, "screenshot")
    with _hv(args) as hv:
        png = hv.lookup(args.name).screenshot().png()
    write_output(args.out, png, "screenshot")
    return 0


def cmd_vm_exec(args: argparse.Namespace) -> int:
    with _hv(args) as hv:
        m: Machine = hv.lookup(args.name)
        r = m.exec(args.command, timeout=args.timeout)
        sys.stdout.write(r.stdout)
        sys.stderr.write(r.stderr)
        return r.exit_code


# ---- recording, workloads and replay --------------------------------------------------------
def cmd_record(args: argparse.Namespace) -> int:
    from replayer.link import RecorderLink, record

    if (args.out is None) == (args.to is None):
        raise UsageError("record needs exactly one of --out LOG (a file) and --to URL (a migration session)")
    if args.to is not None:
        from cli.migrate import cmd_record_to

        return cmd_record_to(args)

    check_output(args.out, "log")
    with _hv(args) as hv:
        m = hv.lookup(args.domain)
        with RecorderLink(m) as link, open_output(args.out, "log") as out:
            hello = link.open()
            print(f"recording {m.name} ({hello.width}x{hello.height}, keymap {hello.keymap}) to {args.out}; "
                  "Ctrl-C stops", file=sys.stderr)
            with stopping_on_signals() as stopped:     # the log keeps every frame the agent sent
                st = record(link, out, stop=stopped, duration_s=args.duration)
        print(f"{st.frames} frames, {st.bytes} bytes in {st.seconds:.1f} s"
              + (" (the log ended)" if st.ended else ""), file=sys.stderr)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from replayer.link import RecorderLink
    from replayer.logfeed import events_from_chunks, file_chunks
    from replayer.replay import ReplayConfig, Replayer

    cfg = ReplayConfig(gap_cap_s=args.gap_cap, echo_timeout_s=args.echo_timeout,
                       sync_slack_s=args.sync_slack, strict_sync=args.strict_sync)
    check_regular(args.log, "log")
    with _hv(args) as hv:
        m = hv.lookup(args.domain)
        with RecorderLink(m) as link:
            link.open()
            rep = Replayer(m, link, cfg)
            chunks = file_chunks(args.log, follow=args.follow, idle_timeout_s=args.idle_timeout)
            stats = rep.replay(events_from_chunks(chunks, on_header=rep.check_header))
    if args.json:
        emit_json(stats.as_dict())
    else:
        table([["events", stats.events], ["injected", stats.injected], ["time", f"{stats.seconds:.1f} s"],
               ["sync marks met", stats.sync_met], ["sync marks failed", len(stats.sync_failed)],
               ["echo mean / max", f"{stats.as_dict()['echo_mean_s']} / {stats.echo_max_s:.3f} s"]],
              ["replay", str(args.log)])
        for what in stats.sync_failed:
            print(f"failed: {what}")
    return 0


def cmd_workload_list(args: argparse.Namespace) -> int:
    from replayer.workload import shipped_workloads

    table([[n, str(p)] for n, p in shipped_workloads().items()], ["workload", "file"])
    return 0


def cmd_workload_run(args: argparse.Namespace) -> int:
    """Type the workload; then (``--check``) run its checks in the same VM, as the benchmark does
    in the migrated one."""
    from replayer.drive import drive, run_checks
    from replayer.workload import get_workload

    _, actions = get_workload(args.workload)
    with _hv(args) as hv:
        m = hv.lookup(args.domain)
        st = drive(m, actions, seed=args.seed)
        print(f"{st.events} input events in {st.seconds:.1f} s")
        results = run_checks(m, actions) if args.check else []
    for r in results:
        print(f"check {'passed' if r.passed else f'FAILED (exit {r.exit_code})'}: {r.command}")
        if not r.passed and r.output:
            print("  " + r.output.replace("\n", "\n  "))
    if any(not r.passed for r in results):
        raise WorkloadCheckError(f"{sum(not r.passed for r in results)} of {len(results)} checks failed")
    return 0


# ---- parser -----------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error; ours is UsageError's code (64, EX_USAGE), so that 2
    keeps meaning the generic ReplayMigrateError. No abbreviated options: ``--token t`` once
    silently meant ``--token-file t``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(UsageError.exit_code, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from cli import migrate

    ap = _Parser(prog="replay-migrate", description="Migrate a desktop VM by replaying its user's input.")
    ap.add_argument("--version", action="version", version=f"replay-migrate {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    ap.add_argument("--connect", default="qemu:///system", help="libvirt URI (default: %(default)s)")
    sub = ap.add_subparsers(dest="command", required=True)

    def add(parent: argparse._SubParsersAction[_Parser], name: str, fn: Handler,
            help: str) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    img = sub.add_parser("image", help="the guest image").add_subparsers(dest="sub", required=True)
    p = add(img, "build", cmd_image_build, "build the guest image (or say where the cached one is)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")

    ck = sub.add_parser("checkpoint", help="checkpoints both sites share").add_subparsers(dest="sub", required=True)
    p = add(ck, "create", cmd_checkpoint_create, "boot the image to the settled desktop and save it; with --domain, "
            "quiesce and save a running domain of yours, which runs on as the checkpoint's clone")
    p.add_argument("name")
    p.add_argument("--domain", help="checkpoint this running domain (one qcow2 disk, the recorder agent installed: "
                   "`agent install`) instead of booting the image")
    p.add_argument("--agent-timeout", type=positive, default=10.0,
                   help="with --domain: seconds the recorder agent has to answer (default %(default)s)")
    p.add_argument("--memory-mib", type=positive_int, default=ckpt.MEMORY_MIB)
    p.add_argument("--settle", type=non_negative, default=ckpt.SETTLE_S, help="idle seconds before saving")
    p.add_argument("--kernel-arg", action="append", default=None, metavar="ARG",
                   help="append ARG to the guest kernel's command line (repeatable; replaces the default "
                        f"{' '.join(ckpt.IMAGE_KERNEL_ARGS)}, which zeroes freed memory so that it travels as "
                        "zeros: ~9 times fewer bytes on a compile session's migration, ~9 per cent of CPU on a "
                        "compile under TCG; see the README's guest settings), e.g. norandmaps")
    p.add_argument("--no-default-kernel-args", action="store_true",
                   help=f"boot the image without the default {' '.join(ckpt.IMAGE_KERNEL_ARGS)}")
    p = add(ck, "list", cmd_checkpoint_list, "list checkpoints")
    p.add_argument("--json", action="store_true")
    p = add(ck, "rm", cmd_checkpoint_rm, "delete a checkpoint (refused while clones use it)")
    p.add_argument("name")
    p = add(ck, "export", cmd_checkpoint_export,
            "write a checkpoint as one stream (sparse, zstd), for `checkpoint import` at another site")
    p.add_argument("name")
    p.add_argument("--out", metavar="FILE", help="write the stream to this regular file (created or truncated; not "
                   "through a symbolic link); default or '-': stdout")
    p.add_argument("--json", action="store_true", help="print the sizes as JSON (on stderr)")
    p = add(ck, "import", cmd_checkpoint_import,
            "make a checkpoint of an export stream, verified (root hashes, base image) before it can be used")
    p.add_argument("--in", dest="input", metavar="FILE", help="read the stream from this regular file; default or "
                   "'-': stdin")
    p.add_argument("--name", help="the checkpoint's name here (default: the one in the stream)")
    p.add_argument("--json", action="store_true")

    vmp = sub.add_parser("vm", help="clones of checkpoints").add_subparsers(dest="sub", required=True)
    p = add(vmp, "start", cmd_vm_start, "start a clone of a checkpoint (by restoring it)")
    p.add_argument("--from", dest="checkpoint", required=True, metavar="CHECKPOINT")
    p.add_argument("--paused", action="store_true")
    p.add_argument("name")
    add(vmp, "list", cmd_vm_list, "list our domains")
    p = add(vmp, "rm", cmd_vm_rm, "destroy clones and delete their files")
    p.add_argument("names", nargs="+")
    migrate.add_suspend_dir_argument(p, rm=True)
    p = add(vmp, "resume", cmd_vm_resume,
            "put back a VM a killed migration left paused, frozen or saved (restore, resume, thaw)")
    p.add_argument("name")
    migrate.add_suspend_dir_argument(p)
    p = add(vmp, "screenshot", cmd_vm_screenshot, "save the screen as PNG")
    p.add_argument("name")
    p.add_argument("out", type=Path, help="a regular file (created or truncated; not through a symbolic link)")
    p = add(vmp, "exec", cmd_vm_exec, "run a shell command in the guest (guest agent)")
    p.add_argument("name")
    p.add_argument("command")
    p.add_argument("--timeout", type=positive, default=120.0)

    p = add(sub, "record", cmd_record,
            "record a running domain's input log, live: into a file (--out) or a migration session (--to)")
    p.add_argument("domain")
    p.add_argument("--out", type=Path, metavar="LOG",
                   help="write the log to this regular file (created or truncated; not through a symbolic link)")
    p.add_argument("--to", metavar="URL", help="stream it to the handoff service ws[s]://HOST:PORT, and "
                   "migrate at `replay-migrate suspend DOMAIN`")
    p.add_argument("--duration", type=positive, help="stop (with --to: suspend) after this many seconds")
    p.add_argument("--json", action="store_true", help="with --to: print the report as JSON")
    migrate.add_record_to_options(p)

    p = add(sub, "suspend", migrate.cmd_suspend,
            "migrate now: tell the domain's `record --to` process to suspend, and print its report")
    migrate.add_suspend_arguments(p)
    p = add(sub, "follow", migrate.cmd_follow,
            "target side: start a clone of CHECKPOINT, replay the session's log into it, take over at suspend")
    migrate.add_follow_arguments(p)
    p = add(sub, "migrate", migrate.cmd_migrate,
            "migrate DOMAIN to a new clone on this host through a loopback service (both sides here)")
    migrate.add_migrate_arguments(p)
    sess = sub.add_parser("session", help="handoff sessions").add_subparsers(dest="sub", required=True)
    p = add(sess, "new", migrate.cmd_session_new,
            "create a session at the service; write each role's credential to a new 0600 file")
    migrate.add_session_new_arguments(p)

    from cli import agent
    agent.add_arguments(sub, add)

    p = add(sub, "replay", cmd_replay, "replay an input log into a domain, closed loop")
    p.add_argument("log", type=Path)
    p.add_argument("--into", dest="domain", required=True)
    p.add_argument("--follow", action="store_true", help="keep reading a log that is still growing")
    p.add_argument("--idle-timeout", type=positive, default=None,
                   help="with --follow: stop when the log has not grown for this long")
    p.add_argument("--gap-cap", type=positive, default=2.0, help="longest idle gap kept, s (default %(default)s)")
    p.add_argument("--echo-timeout", type=positive, default=10.0, help="s per event (default %(default)s)")
    p.add_argument("--sync-slack", type=positive, default=SYNC_SLACK_S,
                   help="s a sync mark may take beyond what the source took to reach it (default %(default)s)")
    p.add_argument("--strict-sync", action="store_true", help="fail on a sync mark that is not met")
    p.add_argument("--json", action="store_true")

    wl = sub.add_parser("workload", help="scripted user sessions").add_subparsers(dest="sub", required=True)
    add(wl, "list", cmd_workload_list, "list the shipped workloads")
    p = add(wl, "run", cmd_workload_run, "type a workload into a domain as a user at its console would")
    p.add_argument("workload", help="a shipped workload's name or a file")
    p.add_argument("--into", dest="domain", required=True)
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic user's timing")
    p.add_argument("--check", action="store_true",
                   help="then run the workload's checks in the domain (exit 14 if one fails)")

    from server import service
    p = add(sub, "serve", service.cmd_serve, "run the session-handoff service (websockets)")
    service.add_serve_arguments(p)

    from cli import diff
    p = add(sub, "diff", diff.cmd_diff, "dry run: what making image B equal to image A would ship")
    diff.add_arguments(p)
    p = add(sub, "sync", diff.cmd_sync, "make image B equal to image A through the transfer protocol, verified")
    diff.add_arguments(p)

    from cli import demo
    p = add(sub, "demo", demo.cmd_demo, "set up, and show the platform's numbers as a table")
    demo.add_arguments(p)
    return ap


@functools.cache
def _parser() -> argparse.ArgumentParser:
    """Built once per process (argparse's per-option translation look-ups cost ~50 ms a build:
    the file-argument fuzz target calls :func:`main` many times)."""
    return build_parser()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        with raising_on_signals():
            return int(args.fn(args))
    except ReplayMigrateError as e:
        print(f"replay-migrate: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        code = e.exit_code if isinstance(e, Interrupted) else 128 + signal.SIGINT
        print(f"replay-migrate: interrupted ({e or 'SIGINT'}); exit {code}", file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
