"""``replay-migrate demo`` / ``make demo``: the whole story on one host.

Set up (the image and the checkpoint are built once and reused), start the source VM from the
checkpoint, run a shipped workload in it while its recorder's log streams through a loopback
handoff service into a target VM that replays it, migrate at the end, print the report, save a
screenshot of the source at suspend beside one of the resumed target, and say whether the two
states are identical.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

from cli.migrate import migrate_embedded, print_report, state_comparison
from cli.report import emit_json, human_bytes, table
from migration import cancel
from replay_migrate.safeopen import check_output, check_output_dir, make_output_dir, write_output
from replayer.drive import drive
from replayer.workload import Action, find_workload, get_workload
from store import checkpoint as ckpt
from store.images import ensure_image
from vm.machine import Hypervisor
from vm.probe import choose_virt

DEMO_CHECKPOINT = "demo"
SOURCE = f"{ckpt.DOMAIN_PREFIX}demo-source"
TARGET = f"{ckpt.DOMAIN_PREFIX}demo-target"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=DEMO_CHECKPOINT, help="checkpoint to use or create")
    p.add_argument("--workload", default="notes", help="a shipped workload (%(default)s) or a file")
    p.add_argument("--out", type=Path, default=Path("demo-out"),
                   help="folder for screenshots and the report (created if needed; files in it are replaced)")
    p.add_argument("--json", action="store_true", help="print the migration report as JSON")
    p.add_argument("--keep", action="store_true", help="leave the target VM running afterwards")


OUT_FILES = ("source-at-suspend.png", "target-resumed.png", "report.json")
"""What the demo writes into ``--out``."""


def check_arguments(args: argparse.Namespace) -> list[Action]:
    """Everything the demo is given, checked before it builds or starts anything: the workload
    loads, the output folder and the files it writes there can be written."""
    _, actions = get_workload(args.workload)
    check_output_dir(args.out, "demo's screenshots and report")
    if args.out.is_dir():
        for name in OUT_FILES:
            check_output(args.out / name, "demo's output")
    return actions


def cmd_demo(args: argparse.Namespace) -> int:
    actions = check_arguments(args)
    make_output_dir(args.out, "demo's screenshots and report")
    rows: list[tuple[str, str]] = []
    r = ensure_image()
    rows.append(("guest image", f"{r.image.dir.name}: " + (f"built in {r.seconds:.0f} s" if r.built else "cached")))
    virt, why = choose_virt(r.image.kernel, r.image.dir.parent)
    rows.append(("virtualisation", f"{'KVM' if virt.value == 'kvm' else 'TCG'} ({why})"))
    workload = find_workload(args.workload)
    with Hypervisor(args.connect) as hv, Hypervisor(args.connect) as hv2:
        ck, created = ckpt.ensure(hv, args.checkpoint, virt=virt)
        m = ck.manifest
        rows.append(("checkpoint", f"{ck.name}: " + ("created now" if created else "cached")))
        rows.append(("boot to desktop", f"{m.boot_to_desktop_s:.1f} s" + ("" if created else " (when it was made)")))
        rows.append(("checkpoint memory image (apparent / allocated)",
                     f"{human_bytes(m.memory_apparent_bytes)} / {human_bytes(m.memory_allocated_bytes)}"))
        rows.append(("checkpoint save", f"{m.save_s:.2f} s"))
        for name in (SOURCE, TARGET):
            ckpt.remove_clone(hv, name)
        typing = threading.Event()
        try:       # the demo's own clones: removed however it ends (a signal included)
            t0 = time.monotonic()
            source = ckpt.start_clone(hv, ck, SOURCE)
            rows.append(("restore the source VM from the checkpoint", f"{time.monotonic() - t0:.2f} s"))
            source.wait_agent()

            async def user() -> None:
                print(f"demo: running workload {workload.name} in {SOURCE} while {TARGET} replays it", flush=True)
                await cancel.in_thread(drive, source, actions, stop=typing, on_cancel=typing.set)

            same, compare = state_comparison()
            report, src, tgt = cancel.run(
                lambda: migrate_embedded(hv, hv2, source, ck, TARGET, user=user, screenshots=args.out,
                                         on_verified=compare, chain_limit=0),   # its VMs go: no next checkpoint
                on_cancel="cancelling the demo: its VMs are removed")
            memory_same, disk_same = same if same else (False, False)
            rows.append(("source memory image at suspend (allocated)", human_bytes(src.saved_allocated_bytes)))
        finally:
            ckpt.remove_clone(hv, SOURCE)
            if not args.keep:
                ckpt.remove_clone(hv, TARGET)
    rows.append(("screenshots", f"{args.out / 'source-at-suspend.png'}, {args.out / 'target-resumed.png'}"))
    rows.append(("states identical", "yes: memory and disk" if memory_same and disk_same else
                 f"NO (memory {'same' if memory_same else 'differs'}, disk {'same' if disk_same else 'differs'})"))
    rows.append(("  (checked at the target before it resumed; not in the downtime)", f"{tgt.inspect_s:.1f} s"))
    write_output(args.out / "report.json", (json.dumps(report.as_dict(), indent=2) + "\n").encode(), "report")
    table(rows, ["platform and demo", ""])
    print()
    if args.json:
        emit_json(report.as_dict())
    else:
        print_report(report.as_dict(), False, title=f"migration ({workload.name})")
    return 0 if report.verified and memory_same and disk_same else 1
