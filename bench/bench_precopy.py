"""libvirt's pre-copy live migration measured on the shaped link (not modelled): the downtime
replay-migrate's is compared with (issue 13: "within 10x of libvirt's live pre-copy downtime on the
same workload and link").

    python -m bench.bench_precopy [--workload notes] [--rates 100 10] [--timeout 360] [--out bench/results]
    make bench-precopy

One clone of the checkpoint is started at site A (:mod:`bench.sites`) and driven by the workload,
as ``bench/bench_native.py`` does; then, per rate, the veth between site A and site B is limited to
that rate in both directions by the kernel's token bucket (``tc qdisc ... tbf``: this kernel has no
``sch_netem``, but has ``sch_tbf``), and the clone is moved A -> B by the same pre-copy as
bench_native's (``--copy-storage-inc``, :class:`vm.native.Variant.PRECOPY`), with libvirt's own
migration bandwidth left at its default (unlimited), so QEMU sees the link's rate and sizes its last
pass by it. Between two rates the clone goes back B -> A on the unshaped veth (not measured).

Why the veth and not libvirt's bandwidth parameter (``VIR_MIGRATE_PARAM_BANDWIDTH``): QEMU lifts
its rate limit for the stop-and-copy phase (``migration_completion_precopy`` sets
``RATE_LIMIT_DISABLED``), so under a parameter-only cap the last pass would cross the unshaped veth
and the downtime would come out shorter than on a real link of that rate.

The token bucket shapes the rate only: the link's delay (netem's, which the bench's other rows
emulate in userspace) is not added, so the times here miss a few round trips of the link's RTT. Its
queue is netem's default (1000 packets of 1500 bytes, ``bench.linkemu.QUEUE_BYTES``).

A pre-copy whose guest dirties memory faster than the link drains it does not converge: QEMU keeps
iterating and libvirt waits (``virsh migrate --timeout`` or ``--auto-converge`` would end it by
pausing or throttling the guest; neither is asked for here, as in bench_native). After
``--timeout`` seconds the job is aborted (the guest runs on at site A) and the row says so, with
the dirty rate and the passes QEMU reported last.

Writes ``precopy-shaped.json`` and ``precopy-shaped.md`` in ``--out``; ``bench/tables.py`` uses
the JSON's measurements in ``migration.md``'s libvirt pre-copy rows on the links of the same rate.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.linkemu import QUEUE_BYTES
from bench.sites import SiteB, SiteConfig
from replay_migrate.errors import HostError, ReplayMigrateError
from store import checkpoint as ckpt
from vm.machine import Hypervisor, Machine, MachineState
from vm.native import NativeError, NativeParams, Variant

REPO = Path(__file__).resolve().parent.parent
RATES_MBIT = (100.0, 10.0)
"""The bench's two links' rates (``bench.netns.SHAPES``), the fast one first: it ends in seconds."""
TIMEOUT_S = 360.0
"""Longest one pre-copy may iterate before it is ended as not converging (300 MiB at 10 Mbit/s take
~250 s)."""
FORCE_GRACE_S = 180.0
"""After a forced finish (the guest paused at :data:`TIMEOUT_S`), how long the remaining transfer
gets before the job is aborted after all."""
ON_TIMEOUT = ("suspend", "abort")
"""What ends a pre-copy that did not converge in time: ``suspend`` pauses the guest so the job
finishes (``virsh migrate --timeout N --timeout-suspend``; the downtime is then the pause's), ``abort``
aborts it (the guest runs on at site A)."""
BURST_BYTES = 32 << 10
"""The token bucket's depth: a few ms of the rate (tbf needs at least an MTU)."""
SAMPLE_S = 1.0
"""How often the running job's statistics are sampled (the last sample is what an aborted job reports)."""
RESULT_NAME = "precopy-shaped"
WORKLOAD_DEFAULT = "notes"


def log(msg: str) -> None:
    print(f"[bench precopy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- the shaped veth ------------------------------------------------------------------------------------
def tbf_argv(dev: str, rate_mbit: float, *, netns: str | None = None, burst: int = BURST_BYTES,
             limit: int = QUEUE_BYTES) -> list[str]:
    """``tc`` limiting what leaves ``dev`` (in ``netns``, else here) to ``rate_mbit``."""
    pre = ["ip", "netns", "exec", netns] if netns else []
    return [*pre, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_mbit:g}mbit",
            "burst", str(burst), "limit", str(limit)]


def untbf_argv(dev: str, *, netns: str | None = None) -> list[str]:
    pre = ["ip", "netns", "exec", netns] if netns else []
    return [*pre, "tc", "qdisc", "del", "dev", dev, "root"]


@contextmanager
def shaped(cfg: SiteConfig, rate_mbit: float) -> Iterator[None]:
    """The veth limited to ``rate_mbit`` each way for the block (site A's end here, site B's in its
    namespace), back to unshaped after it, whatever happens."""
    ends = ((cfg.host_if, None), (cfg.site_if, cfg.netns))
    try:
        for dev, ns in ends:
            r = subprocess.run(tbf_argv(dev, rate_mbit, netns=ns), capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise HostError(f"shaping {dev} to {rate_mbit:g} Mbit/s: {r.stderr.strip()} (needs sch_tbf)")
        yield
    finally:
        for dev, ns in ends:
            subprocess.run(untbf_argv(dev, netns=ns), capture_output=True, check=False)


# ---- the job, sampled while it runs ---------------------------------------------------------------------
def running_job(stats: Mapping[str, Any]) -> bool:
    """A sample of a job under way: not an ended one's bare ``{"type": 0}``, nor an aborted one's
    zeroed figures (``type`` 5, cancelled)."""
    return int(stats.get("type", 0)) in (1, 2) and int(stats.get("memory_processed", 0)) > 0


class JobSampler:
    """Samples the source domain's running job every ``every_s`` (a thread; the migration's own
    watcher polls the same job): the last sample is what an aborted job leaves, the largest dirty
    rate what the guest did at worst. With ``suspend_after_s``, it pauses the guest once the job
    has run that long, as ``virsh migrate --timeout-suspend`` does: QEMU then sends what is left
    with the guest stopped and the job ends."""

    def __init__(self, m: Machine, every_s: float = SAMPLE_S, suspend_after_s: float | None = None) -> None:
        self.m = m
        self.every_s = every_s
        self.suspend_after_s = suspend_after_s
        self.last: dict[str, Any] = {}
        self.at_suspend: dict[str, Any] = {}
        self.suspended_at: float | None = None
        """This host's monotonic clock when the guest was paused."""
        self.max_dirty_pages_s = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sample-{m.name}", daemon=True)

    def _run(self) -> None:
        import libvirt

        t0 = time.monotonic()
        while not self._stop.wait(self.every_s):
            try:
                st = self.m.dom.jobStats(0)
            except libvirt.libvirtError:
                continue                         # finishing, or gone with the migration
            if running_job(st):
                self.last = dict(st)
                if self.suspended_at is None:
                    self.max_dirty_pages_s = max(self.max_dirty_pages_s, int(st.get("memory_dirty_rate", 0)))
            if (self.suspend_after_s is not None and self.suspended_at is None
                    and time.monotonic() - t0 >= self.suspend_after_s and self.last):
                try:
                    self.m.dom.suspend()
                except libvirt.libvirtError:
                    continue                     # the job ended meanwhile
                self.suspended_at = time.monotonic()
                self.at_suspend = dict(self.last)

    def __enter__(self) -> JobSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _sampled(sample: Mapping[str, Any], max_dirty_pages_s: int) -> dict[str, Any]:
    """What a running job's statistics say about its progress (libvirt's ``downtime`` of a running
    job is QEMU's expected downtime were it to stop the guest now)."""
    page = int(sample.get("memory_page_size", 0)) or 4096
    return {"memory_bytes": int(sample.get("memory_processed", 0)),
            "memory_remaining_bytes": int(sample.get("memory_remaining", 0)),
            "disk_bytes": int(sample.get("disk_processed", 0)),
            "iterations": int(sample.get("memory_iteration", 0)),
            "expected_downtime_s": int(sample.get("downtime", 0)) / 1000 or None,
            "dirty_bytes_s": int(sample.get("memory_dirty_rate", 0)) * page,
            "dirty_bytes_s_max": max_dirty_pages_s * page}


def aborted_row(sample: Mapping[str, Any], timeout_s: float, max_dirty_pages_s: int) -> dict[str, Any]:
    """A pre-copy aborted after ``timeout_s``: what its job had done by the last sample."""
    return {"converged": False, "finish": "aborted", "aborted_after_s": timeout_s, "total_s": None,
            "downtime_s": None, "setup_s": int(sample.get("setup_time", 0)) / 1000 or None,
            **_sampled(sample, max_dirty_pages_s)}


def converged_row(native: Mapping[str, Any], max_dirty_pages_s: int) -> dict[str, Any]:
    """A completed pre-copy, from ``migrate_native``'s report (``report["native"]``)."""
    page = int(native["page_bytes"]) or 4096
    return {"converged": True, "finish": "converged", "total_s": native["total_s"],
            "downtime_s": native["downtime_s"], "qemu_downtime_s": native["downtime_s"],
            "setup_s": native.get("setup_s"), "memory_bytes": native["memory_bytes"],
            "disk_bytes": native["disk_bytes"], "iterations": native["iterations"],
            "dirty_bytes_s": int(native["dirty_rate_pages_s"]) * page,
            "dirty_bytes_s_max": max(max_dirty_pages_s, int(native["dirty_rate_pages_s"])) * page}


def suspended_row(native: Mapping[str, Any], at_suspend: Mapping[str, Any], suspend_after_s: float,
                  paused_s: float, max_dirty_pages_s: int) -> dict[str, Any]:
    """A pre-copy that did not converge in ``suspend_after_s`` and finished with the guest paused
    (``--timeout-suspend``): its downtime is the pause, ``paused_s`` (guest paused at site A ->
    running at site B, this host's clock: QEMU's own figure starts later, at its last pass), the job's
    progress and rates as they were when it was paused."""
    return {**_sampled(at_suspend, max_dirty_pages_s), "converged": False, "finish": "suspended",
            "suspended_after_s": suspend_after_s, "total_s": native["total_s"], "downtime_s": round(paused_s, 3),
            "qemu_downtime_s": native["downtime_s"], "setup_s": native.get("setup_s"),
            "memory_bytes": native["memory_bytes"], "disk_bytes": native["disk_bytes"],
            "iterations": native["iterations"]}


def _leg(src: Hypervisor, dst: Hypervisor, m: Machine, ck: ckpt.Checkpoint, name: str, site: SiteB,
         timeout_s: float, on_timeout: str = "suspend") -> tuple[Machine | None, dict[str, Any]]:
    """One pre-copy ``src`` -> ``dst``; (the migrated machine, or None when it was aborted; its row)."""
    from migration.native import migrate_native

    addr = site.cfg.site_addr if dst.uri == site.uri else site.cfg.host_addr
    suspend = on_timeout == "suspend"
    params = NativeParams(variant=Variant.PRECOPY, migrate_uri=f"tcp://{addr}", peer_to_peer=dst.uri == site.uri,
                          timeout_s=timeout_s + FORCE_GRACE_S if suspend else timeout_s)
    speed = int(m.dom.migrateGetMaxSpeed(0))
    rx0, tx0 = site.counters()
    t0 = time.monotonic()
    moved: Machine | None = None
    with JobSampler(m, suspend_after_s=timeout_s if suspend else None) as sampler:
        try:
            moved, report = migrate_native(src, dst, m, ck, name, params, source_local=src.uri != site.uri)
        except NativeError as e:
            if "was aborted" not in str(e):
                raise
            row = aborted_row(sampler.last, params.timeout_s, sampler.max_dirty_pages_s)
    rx1, tx1 = site.counters()
    if moved is not None:
        if sampler.suspended_at is None:
            row = converged_row(report["native"], sampler.max_dirty_pages_s)
        else:
            if moved.state is MachineState.PAUSED:   # libvirt keeps the state it migrated: resume as virsh's user would
                moved.resume()
            paused_s = time.monotonic() - sampler.suspended_at
            row = suspended_row(report["native"], sampler.at_suspend, timeout_s, paused_s, sampler.max_dirty_pages_s)
        if moved.state is not MachineState.RUNNING:
            raise HostError(f"{moved.name} is {moved.state.value} at {dst.uri} after its migration")
    row.update({"veth_bytes": (rx1 - rx0) + (tx1 - tx0), "wall_s": round(time.monotonic() - t0, 3),
                "bandwidth_mib_s": speed})
    return moved, row


def bandwidth_text(mib_s: int) -> str:
    """libvirt's migration speed as set: its default is unlimited (2^63 bytes/s in MiB/s)."""
    return "unlimited (libvirt's default)" if mib_s >= 1 << 40 else f"{mib_s} MiB/s"


def run(hv: Hypervisor, ck: ckpt.Checkpoint, workload: Path, site: SiteB, prefix: str, rates: Sequence[float],
        timeout_s: float, *, on_timeout: str = "suspend", drive_workload: bool = True) -> list[dict[str, Any]]:
    """The legs for one workload (site B running, holding ``ck``); every clone made is removed at
    both sites, whatever happens."""
    from replayer.drive import drive
    from replayer.workload import load_workload

    wl = workload.stem
    names = [f"{prefix}pc-{wl}-{i}" for i in range(2 * len(rates) + 1)]
    rows: list[dict[str, Any]] = []
    with Hypervisor(site.uri) as hb:
        def clean() -> None:
            site.remove_clones(hv, hb, names)

        clean()
        try:
            m = ckpt.start_clone(hv, ck, names[0])
            m.wait_agent()
            if drive_workload:
                log(f"{wl}: driving {workload.name} into {m.name} at site A")
                drive(m, load_workload(workload), seed=0)
            at_b, k = False, 1
            for rate in rates:
                if at_b:                       # back to site A on the unshaped veth (not measured)
                    back, _ = _leg(hb, hv, m, ck, names[k], site, timeout_s, on_timeout="abort")
                    k += 1
                    if back is None:
                        raise HostError(f"{m.name} did not come back to site A")
                    shutil.rmtree(site.cfg.folder("state") / "clones" / m.name, ignore_errors=True)
                    m, at_b = back, False
                log(f"{wl}: pre-copy A -> B with the veth at {rate:g} Mbit/s")
                with shaped(site.cfg, rate):
                    moved, row = _leg(hv, hb, m, ck, names[k], site, timeout_s, on_timeout)
                k += 1
                row = {"workload": wl, "drove": workload.name if drive_workload else None, "rate_mbit": rate,
                       "link": f"{rate:g} Mbit/s each way (tbf on the veth; no added delay)",
                       "bandwidth": bandwidth_text(row["bandwidth_mib_s"]), **row}
                rows.append(row)
                log(f"{wl} at {rate:g} Mbit/s: " + summary(row))
                if moved is not None:
                    m, at_b = moved, True
        finally:
            clean()
    return rows


def summary(row: Mapping[str, Any]) -> str:
    dirty = f"dirty rate {row['dirty_bytes_s'] * 8 / 1e6:.2f} Mbit/s (max {row['dirty_bytes_s_max'] * 8 / 1e6:.2f})"
    if row["finish"] == "aborted":
        return (f"did not converge in {row['aborted_after_s']:.0f} s ({row['iterations']} passes, "
                f"{row['memory_remaining_bytes'] / (1 << 20):.1f} MiB left, {dirty}); aborted")
    head = (f"{row['total_s']:.1f} s, downtime {row['downtime_s'] * 1000:.0f} ms, {row['iterations']} passes, "
            f"{row['veth_bytes'] / (1 << 20):.1f} MiB on the veth, {dirty}")
    if row["finish"] == "suspended":
        return (f"did not converge in {row['suspended_after_s']:.0f} s ({row['memory_remaining_bytes'] / (1 << 20):.1f}"
                f" MiB left, QEMU expected {row['expected_downtime_s'] or 0:.1f} s); guest paused to finish: {head}")
    return head


# ---- the report ---------------------------------------------------------------------------------------------
def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.1f} MiB"


def render_markdown(results: Mapping[str, Any]) -> str:
    meta = results["meta"]
    out = ["# libvirt's pre-copy live migration on the shaped link\n",
           f"Run {meta['date']} on {meta['host']} at commit `{meta['commit']}` ({meta['libvirt']}, {meta['qemu']}); "
           f"checkpoint `{meta['checkpoint']}` ({meta.get('memory_mib', '?')} MiB guest); took "
           f"{meta['elapsed_s'] / 60:.1f} min. `make bench-precopy` (`bench/bench_precopy.py`).\n",
           "Site A -> site B (`bench/sites.py`), the same pre-copy as `bench/bench_native.py`'s "
           "(`--copy-storage-inc`), "
           "with the veth between the sites limited to the link's rate in both directions by the kernel's token "
           "bucket (`tc ... tbf`, queue as netem's default; this kernel has no netem, so no delay is added: the "
           "times miss a few of the link's round trips). libvirt's migration bandwidth is left at its default, so "
           "QEMU measures the link's rate and sizes its last pass (300 ms limit) by it; a bandwidth parameter alone "
           "would not do: QEMU lifts it for the stop-and-copy phase. Time, downtime, passes and dirty rate from "
           "libvirt's job statistics; bytes counted on the veth (the overlay's NBD copy included).\n"]
    rows = []
    for r in results["runs"]:
        if r["finish"] == "converged":
            verdict, total, down = "yes", f"{r['total_s']:.1f} s", f"{r['downtime_s'] * 1000:.0f} ms"
        elif r["finish"] == "suspended":
            exp = r.get("expected_downtime_s")
            verdict = (f"no: after {r['suspended_after_s']:.0f} s {_mib(r['memory_remaining_bytes'])} still to send "
                       f"(QEMU expected a {'?' if exp is None else f'{exp:.1f} s'} downtime); the guest was paused "
                       "to finish (`--timeout-suspend`)")
            total, down = f"{r['total_s']:.1f} s", f"{r['downtime_s'] * 1000:.0f} ms (paused)"
        else:
            verdict = (f"no: aborted after {r['aborted_after_s']:.0f} s, {_mib(r['memory_remaining_bytes'])} "
                       "still to send")
            total, down = f"> {r['aborted_after_s']:.0f} s", "-"
        rows.append([r["workload"], r["link"], r["bandwidth"], verdict, total, down,
                     "-" if r.get("setup_s") is None else f"{r['setup_s']:.2f} s",
                     f"{_mib(r['veth_bytes'])} (memory {_mib(r['memory_bytes'])}, disk {_mib(r['disk_bytes'])})",
                     str(r["iterations"]),
                     f"{r['dirty_bytes_s'] * 8 / 1e6:.2f} Mbit/s (max {r['dirty_bytes_s_max'] * 8 / 1e6:.2f})",
                     f"{r.get('date', meta['date'])}, `{r.get('commit', meta['commit'])}`"])
    from bench.tables import md_table

    out.append(md_table(["workload", "link", "libvirt bandwidth", "converged", "total time", "downtime", "setup",
                         "bytes on the veth (job: memory, disk)", "memory passes", "dirty rate (last, max)",
                         "run, commit"], rows))
    out.append("\nWhat the workload was: " + "; ".join(
        sorted({f"{r['workload']}: " + (f"driven by `{r['drove']}` at site A" if r["drove"]
                                         else "the restored checkpoint, idle") for r in results["runs"]})) + ".\n")
    for note in meta.get("notes", []):
        out.append(f"- {note}")
    return "\n".join(out) + "\n"


def merge_runs(earlier: Sequence[Mapping[str, Any]], new: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The earlier runs of a workload and rate not measured again, then the new ones."""
    again = {(r["workload"], float(r["rate_mbit"])) for r in new}
    kept = [dict(r) for r in earlier if (r.get("workload"), float(r.get("rate_mbit", -1))) not in again]
    return [*kept, *new]


def _earlier_runs(path: Path) -> list[dict[str, Any]]:
    from bench.tables import load_shaped_precopy

    old = load_shaped_precopy(path)
    if old is None:
        return []
    return [{"date": old["meta"]["date"], "commit": old["meta"].get("commit", "?"), **r} for r in old["runs"]]


def _commit() -> str:
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                       check=False)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return (r.stdout.strip() or "unknown") + ("-dirty" if dirty else "")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_precopy", description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default=WORKLOAD_DEFAULT, help="a shipped workload's name or a .wl file")
    ap.add_argument("--idle", action="store_true", help="migrate the restored checkpoint without driving the workload")
    ap.add_argument("--checkpoint", default="bench")
    ap.add_argument("--rates", type=float, nargs="+", default=list(RATES_MBIT), help="link rates, Mbit/s")
    ap.add_argument("--timeout", type=float, default=TIMEOUT_S,
                    help="end a pre-copy that has not converged after this long (s)")
    ap.add_argument("--on-timeout", choices=ON_TIMEOUT, default=ON_TIMEOUT[0],
                    help="suspend: pause the guest so the job finishes (virsh --timeout-suspend); abort: abort it")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--merge", action="store_true",
                    help="keep the earlier runs of other workloads or rates (each run names its date and commit)")
    args = ap.parse_args(argv)
    if any(r <= 0 for r in args.rates) or args.timeout <= 0:
        ap.error("rates and timeout must be positive")
    from bench.bench_migration import PREFIX, workload_file

    path = Path(args.workload) if args.workload.endswith(".wl") else workload_file(args.workload)
    t0 = time.monotonic()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with Hypervisor() as hv:
        ck, _ = ckpt.ensure(hv, args.checkpoint)
        lib = hv.conn.getLibVersion()
        qemu = hv.conn.getVersion()
        site = SiteB()
        try:
            site.start()
            site.hold(ck, log)
            runs = run(hv, ck, path, site, PREFIX, args.rates, args.timeout, on_timeout=args.on_timeout,
                       drive_workload=not args.idle)
        except ReplayMigrateError as e:
            log(f"failed: {e}")
            raise
        finally:
            site.stop(wipe=True)
    commit = _commit()
    for r in runs:
        r.update(date=date, commit=commit)
    if args.merge:
        runs = merge_runs(_earlier_runs(args.out / f"{RESULT_NAME}.json"), runs)
    results = {"meta": {"date": date, "commit": commit, "host": f"{platform.node()}, {len(_cpus())} CPUs",
                        "libvirt": f"libvirt {lib // 1000000}.{lib // 1000 % 1000}.{lib % 1000}",
                        "qemu": f"QEMU {qemu // 1000000}.{qemu // 1000 % 1000}.{qemu % 1000}",
                        "checkpoint": ck.name, "memory_mib": ck.manifest.memory_mib,
                        "timeout_s": args.timeout, "on_timeout": args.on_timeout,
                        "elapsed_s": round(time.monotonic() - t0, 1),
                        "shaper": "tc tbf on both ends of the veth, burst "
                                  f"{BURST_BYTES} B, queue {QUEUE_BYTES} B; no delay"},
               "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{RESULT_NAME}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{RESULT_NAME}.md").write_text(render_markdown(results))
    print(render_markdown(results))
    return 0


def _cpus() -> list[int]:
    import os

    return sorted(os.sched_getaffinity(0))


if __name__ == "__main__":
    raise SystemExit(main())
