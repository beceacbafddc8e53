"""``replay-migrate demo`` / ``make demo``: the whole story on one host, as a table.

For now (the platform): KVM or TCG, the image (built or cached), boot to the desktop, the memory
image's size, save and restore times of a clone.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from server import checkpoint as ckpt
from server.images import ensure_image
from server.report import emit_json, human_bytes, table
from vm.machine import Hypervisor, file_allocated
from vm.probe import choose_virt

DEMO_CHECKPOINT = "demo"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=DEMO_CHECKPOINT, help="checkpoint to use or create")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="folder for screenshots")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")


def cmd_demo(args: argparse.Namespace) -> int:
    rows: list[tuple[str, str]] = []
    r = ensure_image()
    rows.append(("guest image", f"{r.image.dir.name}: "
                 + (f"built in {r.seconds:.0f} s" if r.built else "cached")))
    virt, why = choose_virt(r.image.kernel, r.image.dir.parent)
    rows.append(("virtualisation", f"{'KVM' if virt.value == 'kvm' else 'TCG'} ({why})"))
    args.out.mkdir(parents=True, exist_ok=True)
    with Hypervisor(args.connect) as hv:
        ck, created = ckpt.ensure(hv, args.checkpoint, virt=virt)
        m = ck.manifest
        rows.append(("checkpoint", f"{ck.name}: " + ("created now" if created else "cached")))
        rows.append(("boot to desktop", f"{m.boot_to_desktop_s:.1f} s"
                     + ("" if created else " (when the checkpoint was made)")))
        rows.append(("memory image (apparent / allocated)",
                     f"{human_bytes(m.memory_apparent_bytes)} / {human_bytes(m.memory_allocated_bytes)}"))
        name = f"{ckpt.DOMAIN_PREFIX}demo-clone"
        t0 = time.monotonic()
        clone = ckpt.start_clone(hv, ck, name, replace=True)
        restore_s = time.monotonic() - t0
        try:
            clone.wait_agent()
            (args.out / "clone.png").write_bytes(clone.screenshot().png())
            save = ckpt.clone_dir(name) / "saved.sav"
            t1 = time.monotonic()
            clone.save(save)
            save_s = time.monotonic() - t1
            rows.append(("restore a clone", f"{restore_s:.2f} s"))
            rows.append(("save a clone (sparse)", f"{save_s:.2f} s, {human_bytes(file_allocated(save))} allocated"))
        finally:
            ckpt.remove_clone(hv, name)
    rows.append(("screenshot of the clone", str(args.out / "clone.png")))
    if args.json:
        emit_json(dict(rows))
    else:
        table(rows, ["what", "result"])
    return 0
