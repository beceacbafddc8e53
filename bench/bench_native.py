"""libvirt's own live migration as the peer to beat, between two libvirt hosts: site A (this
machine's libvirtd) and site B (``bench/sites.py``), joined by a veth.

    python -m bench.bench_native [--workload notes] [--checkpoint bench] [--out FILE.json]

Per workload, one clone of the checkpoint is started at site A and driven by the workload (the
same one replay-migrate's row migrates), then moved by libvirt's live migration with
``--copy-storage-inc`` semantics (:mod:`migration.native`) three times, each variant once:
pre-copy A -> B, pre-copy compressed (multifd+zstd, else XBZRLE) B -> A, post-copy A -> B. One
drive for three migrations keeps the added bench time near one workload's duration; each leg moves
the same desktop state (the guest idles between legs). Bytes come from libvirt's job statistics
and from site A's end of the veth (everything crossed it: libvirt's control connection, QEMU's
migration stream, the NBD disk copy); time and downtime from the job statistics.

**The shaped-link times are modelled, not measured**: libvirt's migration ports are not behind the
bench's link (no ``sch_netem`` on this kernel; the userspace emulator forwards the bench's own
ports only), and a real 10 Mbit/s run of ~330 MiB takes ~5 min per leg. The migrations run on
the unshaped veth; at a shaped rate R the end-to-end time is taken as max(measured, bytes / R +
the link's RTT per round of the job) and the downtime as the measured one plus at most QEMU's
downtime limit (QEMU sizes the last pass to fit that limit at the bandwidth it sees), and a
pre-copy whose dirty rate exceeds R is marked as not converging at that rate. ``make bench-precopy``
(:mod:`bench.bench_precopy`) measures the pre-copy with the veth itself limited to the link's rate;
the report uses its times instead of this model where it has the workload and the rate.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.netns import SHAPES, Shape
from bench.sites import SiteB
from migration.native import migrate_native
from replay_migrate.errors import ReplayMigrateError
from replayer.drive import drive
from replayer.workload import load_workload
from store import checkpoint as ckpt
from vm.machine import Hypervisor, Machine, MachineState
from vm.native import NativeParams, Variant

DOWNTIME_LIMIT_S = 0.3
"""QEMU's default ``downtime-limit`` (300 ms): libvirt leaves it as is, so the bench does too."""
JOB_ROUND_TRIPS = 6
"""Round trips of libvirt's migration protocol (begin, prepare, perform, finish, confirm, NBD
setup) that a link's RTT adds to the end-to-end time."""
KEYS = {Variant.PRECOPY: "native-precopy", Variant.COMPRESSED: "native-compressed",
        Variant.POSTCOPY: "native-postcopy"}
"""The bench's method key of each variant (``bench/tables.py`` labels them)."""
LEGS = (Variant.PRECOPY, Variant.COMPRESSED, Variant.POSTCOPY)
"""Order of the legs: A -> B, B -> A, A -> B."""


def log(msg: str) -> None:
    print(f"[bench native {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def link_bytes(row: dict[str, Any]) -> int:
    """What a leg put on the link: the veth's count (libvirt's completed statistics leave the disk's
    NBD copy out), never less than the job statistics' bytes."""
    return max(int(row["wire_bytes"]), int(row.get("veth_bytes", 0)))


def modelled_timing(row: dict[str, Any], shape: Shape) -> dict[str, Any]:
    """End-to-end time and downtime of a measured native migration at ``shape`` (see the module's
    docstring for the model); pure, so it is tested without VMs."""
    n = link_bytes(row)
    e2e = max(row["total_s"], n / shape.bytes_per_s + JOB_ROUND_TRIPS * shape.rtt_ms / 1000)
    down = row["downtime_s"]
    measured = "downtime unknown" if down is None else f"downtime {down * 1000:.0f} ms"
    out: dict[str, Any] = {"e2e_s": round(e2e, 3),
                           "downtime_s": None if down is None else round(down + DOWNTIME_LIMIT_S, 3),
                           "link_s": round(n / shape.bytes_per_s, 3),
                           "how": ("modelled from a migration measured between site A and site B on the unshaped "
                                   f"veth ({row['total_s']:.1f} s, {measured}): "
                                   "bytes / rate; downtime at most measured + QEMU's "
                                   f"{DOWNTIME_LIMIT_S * 1000:.0f} ms limit")}
    dirty = row.get("dirty_bytes_s", 0)
    if row["variant"] != Variant.POSTCOPY.value and dirty >= shape.bytes_per_s:
        out["how"] += (f"; its dirty rate ({dirty * 8 / 1e6:.1f} Mbit/s) exceeds the link: pre-copy would not "
                       "converge without auto-converge")
        out["converges"] = False
    return out


def _leg(src_hv: Hypervisor, dst_hv: Hypervisor, m: Machine, ck: ckpt.Checkpoint, name: str, variant: Variant,
         site: SiteB, *, source_local: bool) -> tuple[Machine | None, dict[str, Any]]:
    rx0, tx0 = site.counters()
    t0 = time.monotonic()
    try:
        # the target's address on the veth: QEMU at site B reaches site A only there
        addr = site.cfg.site_addr if dst_hv.uri == site.uri else site.cfg.host_addr
        migrated, report = migrate_native(src_hv, dst_hv, m, ck, name,
                                          # site A's daemon listens on its unix socket only: from
                                          # site B, this process drives both daemons (not peer to peer)
                                          NativeParams(variant=variant, migrate_uri=f"tcp://{addr}",
                                                       peer_to_peer=dst_hv.uri == site.uri),
                                          source_local=source_local)
    except ReplayMigrateError as e:
        log(f"{variant.value}: could not run: {e}")
        return None, {"variant": variant.value, "error": str(e)}
    wall = time.monotonic() - t0
    rx1, tx1 = site.counters()
    nat = report["native"]
    if migrated.state is not MachineState.RUNNING:
        raise ReplayMigrateError(f"{name} is {migrated.state.value} at {dst_hv.uri} after its migration")
    row = {"variant": variant.value, "from": src_hv.uri, "to": dst_hv.uri, "compression": nat["compression"],
           "wire_bytes": report["wire_bytes"], "veth_bytes": (rx1 - rx0) + (tx1 - tx0),
           "memory_bytes": nat["memory_bytes"], "disk_bytes": nat["disk_bytes"],
           "total_s": nat["total_s"], "downtime_s": nat["downtime_s"], "wall_s": round(wall, 3),
           "iterations": nat["iterations"], "postcopy_requests": nat["postcopy_requests"],
           "postcopy_switched": nat["postcopy_switched"],
           "dirty_bytes_s": nat["dirty_rate_pages_s"] * nat["page_bytes"]}
    if nat["postcopy_switched"] and not nat["downtime_s"] and not report["wire_bytes"]:
        # libvirt keeps no completed statistics of a job that switched to post-copy: its bytes are
        # the veth's count alone, its downtime is not known (never 0)
        row["downtime_s"] = None
    log(f"{variant.value} {src_hv.uri} -> {dst_hv.uri}: {row['wire_bytes']:,} B (veth {row['veth_bytes']:,} B) in "
        f"{row['total_s']:.1f} s, downtime "
        + ("unknown" if row["downtime_s"] is None else f"{row['downtime_s'] * 1000:.0f} ms"))
    return migrated, row


def run_native(hv: Hypervisor, ck: ckpt.Checkpoint, wl: str, workload: Path, site: SiteB, prefix: str,
               shapes: Sequence[Shape] = SHAPES) -> dict[str, Any]:
    """The three legs for one workload (site B running, holding ``ck``); returns rows per variant and
    modelled timings per shape. Every clone made is removed at both sites, whatever happens."""
    names = [f"{prefix}{wl}-n{i}" for i in range(len(LEGS) + 1)]
    rows: dict[str, Any] = {}
    with Hypervisor(site.uri) as hb:
        hosts = [hv, hb]

        def clean() -> None:
            site.remove_clones(hv, hb, names)

        clean()
        try:
            m: Machine | None = ckpt.start_clone(hv, ck, names[0])
            assert m is not None
            m.wait_agent()
            log(f"{wl}: driving {workload.name} into {m.name} at site A")
            drive(m, load_workload(workload), seed=0)
            at = 0
            for i, variant in enumerate(LEGS):
                src, dst = hosts[at], hosts[1 - at]
                if m is None:
                    rows[KEYS[variant]] = {"variant": variant.value, "error": "the previous leg failed"}
                    continue
                moved, row = _leg(src, dst, m, ck, names[i + 1], variant, site, source_local=src is hv)
                rows[KEYS[variant]] = row
                if moved is not None:
                    if src is hb:                     # site B's folder of the leg's source, from here
                        shutil.rmtree(site.cfg.folder("state") / "clones" / m.name, ignore_errors=True)
                    m, at = moved, 1 - at
        finally:
            clean()
    timing = {s.key: {KEYS[Variant(r["variant"])]: modelled_timing(r, s) for r in rows.values() if "error" not in r}
              for s in shapes}
    return {"rows": rows, "timing": timing}


def merge_into(w: dict[str, Any], native: dict[str, Any]) -> None:
    """Add a workload's native rows to bench_migration's per-workload results: bytes per method,
    timing per link and method (tables.py renders them beside the others), and the rows as measured."""
    w["native"] = native["rows"]
    for key, row in native["rows"].items():
        if "error" not in row:
            w.setdefault("bytes", {})[key] = link_bytes(row)
    for link, per in native["timing"].items():
        w.setdefault("timing", {}).setdefault(link, {}).update(per)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_native", description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="notes", help="a shipped workload's name or a .wl file")
    ap.add_argument("--checkpoint", default="bench")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    from bench.bench_migration import PREFIX, workload_file

    path = Path(args.workload) if args.workload.endswith(".wl") else workload_file(args.workload)
    t0 = time.monotonic()
    with Hypervisor() as hv:
        ck, _ = ckpt.ensure(hv, args.checkpoint)
        site = SiteB()
        try:
            site.start()
            site.hold(ck, log)
            out = run_native(hv, ck, path.stem, path, site, PREFIX)
        finally:
            site.stop(wipe=True)
    out["elapsed_s"] = round(time.monotonic() - t0, 1)
    out["sites"] = "site A (qemu:///system) and site B (a second libvirtd, bench/sites.py), joined by a veth"
    text = json.dumps(out, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
