"""Where a libvirt save and a restore of the 1 GiB guest spend their time, per save option
(issue 13, item 3: the downtime's floor). Opt-in: ``make bench BENCH=savepath`` (~3 min here).

    python -m bench.bench_savepath [--checkpoint NAME] [--runs 3] [--methods M ...] [--out bench/results]

One clone of the checkpoint is saved and restored ``--runs`` times per method, the way a migration's
target does it (paused first, then ``virDomainSaveParams`` in the sparse format, then
``virDomainRestoreParams`` running). While the save call runs, a watcher thread notes when QEMU
has written the whole image (libvirt flips the header's magic from ``LibvirtQemudPart`` to
``LibvirtQemudSave`` once QEMU's migration completed) and when QEMU's process has exited; the rest
of the call is libvirt's own teardown. The restore is split at QEMU's start (its pid file appears).

The same run measures how long an orphaned process stays a zombie on this host: libvirt daemonizes
QEMU, so after a save QEMU is reaped by PID 1 (or the nearest subreaper), and libvirt's
``virProcessKillPainfully`` polls ``kill(pid, 0)`` every 200 ms, which succeeds on a zombie: the
save call cannot return before QEMU is reaped (by PID 1, or by ``tini -s`` above libvirtd where
scripts/setup-host.sh put it; the report names which). Writes ``savepath.md`` and ``savepath.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import libvirt

from migration.suspenddir import image_whole, private_dir
from store import checkpoint as ckpt
from vm.machine import Hypervisor, Machine, file_allocated

HERE = Path(__file__).resolve().parent
CHECKPOINT = "bench"
"""The migration benchmark's checkpoint (made if missing): the same 1 GiB guest it migrates."""
CLONE = "rm-bench-savepath"
TMPFS = Path("/dev/shm")
QEMU_PIDFILE = Path("/run/libvirt/qemu")
"""libvirt's system daemon writes ``<name>.pid`` of each running domain's QEMU here."""
WATCH_INTERVAL_S = 0.002
"""How often the watcher looks at the image's header and QEMU's process during a save."""
SETTLE_S = 1.0
"""Pause between a restore and the next save (the guest's agent answered already)."""
ZOMBIE_PROBES = 5
"""Orphaned processes whose time as a zombie is measured."""


@dataclass(frozen=True)
class Method:
    """One way to save and restore: where the image goes and which of libvirt's options are set."""

    name: str
    where: str
    """``tmpfs`` (/dev/shm) or ``disk`` (the clone's folder in the state root)."""
    channels: int = 1
    """libvirt's ``parallel.channels`` (QEMU's multifd channels over mapped-ram), save and restore."""
    bypass_cache: bool = False
    """``VIR_DOMAIN_SAVE_BYPASS_CACHE`` (O_DIRECT, QEMU's ``direct-io``) on save and restore."""


METHODS = {m.name: m for m in (
    Method("tmpfs", "tmpfs"),
    Method("tmpfs-2ch", "tmpfs", channels=2),
    Method("disk", "disk"),
    Method("tmpfs-bypass", "tmpfs", bypass_cache=True),
    Method("disk-bypass", "disk", bypass_cache=True),
)}
"""``tmpfs``: what a migration does today (``--suspend-dir /dev/shm``, one channel). The bypass
methods come last: the save after a bypass restore crashed QEMU twice here."""


@dataclass
class Run:
    """One save and restore, seconds from the start of each call."""

    pause_s: float
    save_s: float
    """The save call, until it returned."""
    image_final_s: float | None
    """Until the header said the image is complete (QEMU's part done)."""
    qemu_exited_s: float | None
    """Until QEMU's process was no longer running (a zombie counts as exited)."""
    restore_s: float
    qemu_started_s: float | None
    """Until the restored domain's QEMU wrote its pid file."""
    agent_s: float
    apparent_bytes: int
    allocated_bytes: int


@dataclass
class Result:
    method: Method
    runs: list[Run] = field(default_factory=list)
    error: str = ""
    """Why the method's runs stopped (a save or restore that failed), empty if none did."""


def _qemu_pid(name: str) -> int | None:
    try:
        return int((QEMU_PIDFILE / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _running(pid: int) -> bool:
    """True while ``pid`` runs (not once it is a zombie or gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class SaveWatcher(threading.Thread):
    """Notes when the image being saved is complete and when QEMU ``pid`` exited."""

    def __init__(self, image: Path, pid: int | None, t0: float) -> None:
        super().__init__(daemon=True)
        self.image, self.pid, self.t0 = image, pid, t0
        self.final: float | None = None
        self.exited: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and (self.final is None or self.exited is None):
            now = time.monotonic() - self.t0
            if self.final is None and image_whole(self.image):
                self.final = now
            if self.exited is None and self.pid is not None and not _running(self.pid):
                self.exited = now
            time.sleep(WATCH_INTERVAL_S)


class StartWatcher(threading.Thread):
    """Notes when domain ``name``'s QEMU has written its pid file."""

    def __init__(self, name: str, t0: float) -> None:
        super().__init__(daemon=True)
        self.name, self.t0 = name, t0
        self.started: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.started is None:
            if _qemu_pid(self.name) is not None:
                self.started = time.monotonic() - self.t0
            time.sleep(WATCH_INTERVAL_S)


def save_params(image: Path, method: Method) -> dict[str, str | int]:
    """The typed parameters of the save (and, without the format, of the restore)."""
    params: dict[str, str | int] = {libvirt.VIR_DOMAIN_SAVE_PARAM_FILE: str(image),
                                    libvirt.VIR_DOMAIN_SAVE_PARAM_IMAGE_FORMAT: "sparse"}
    if method.channels > 1:
        params[libvirt.VIR_DOMAIN_SAVE_PARAM_PARALLEL_CHANNELS] = method.channels
    return params


def one_run(hv: Hypervisor, m: Machine, image: Path, method: Method) -> tuple[Machine, Run]:
    flags = libvirt.VIR_DOMAIN_SAVE_BYPASS_CACHE if method.bypass_cache else 0
    image.unlink(missing_ok=True)
    t = time.monotonic()
    m.pause()
    pause_s = time.monotonic() - t
    t0 = time.monotonic()
    watch = SaveWatcher(image, _qemu_pid(m.name), t0)
    watch.start()
    m.dom.saveParams(save_params(image, method), flags)
    save_s = time.monotonic() - t0
    watch.stop.set()
    watch.join()
    apparent, allocated = image.stat().st_size, file_allocated(image)
    restore = save_params(image, method)
    del restore[libvirt.VIR_DOMAIN_SAVE_PARAM_IMAGE_FORMAT]
    t0 = time.monotonic()
    start = StartWatcher(m.name, t0)
    start.start()
    hv.conn.restoreParams(restore, flags | libvirt.VIR_DOMAIN_SAVE_RUNNING)
    restore_s = time.monotonic() - t0
    start.stop.set()
    start.join()
    image.unlink()
    back = hv.lookup(m.name)
    agent_s = back.wait_agent()
    return back, Run(pause_s, save_s, watch.final, watch.exited, restore_s, start.started, agent_s,
                     apparent, allocated)


def zombie_lifetimes(n: int = ZOMBIE_PROBES) -> list[float]:
    """Seconds an orphaned process stays a zombie here (until PID 1, or a subreaper, reaps it)."""
    out = []
    for _ in range(n):
        r, w = os.pipe()
        child = os.fork()
        if child == 0:          # the child forks the orphan, tells its pid and exits at once
            os.close(r)
            orphan = os.fork()
            if orphan == 0:
                time.sleep(0.05)
                os._exit(0)
            os.write(w, str(orphan).encode())
            os._exit(0)
        os.close(w)
        os.waitpid(child, 0)
        orphan = int(os.read(r, 32))
        os.close(r)
        t_zombie = None
        while True:
            try:
                state = Path(f"/proc/{orphan}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                break
            if state == "Z" and t_zombie is None:
                t_zombie = time.monotonic()
            time.sleep(WATCH_INTERVAL_S)
        out.append(time.monotonic() - t_zombie if t_zombie is not None else 0.0)
    return out


def _med(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def _f(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}"


def _range(values: Sequence[float]) -> str:
    return f"{_f(_med(values))} ({min(values):.2f}-{max(values):.2f})"


def table(results: Sequence[Result]) -> list[str]:
    """The markdown table: medians over the runs (save and restore with their range)."""
    rows = ["| method | runs | save s (call) | image complete s | QEMU exited s | libvirt after QEMU s "
            "| restore s (call) | QEMU started s | agent s | image apparent / allocated MiB |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.error:
            rows.append(f"| {r.method.name} | {len(r.runs)} | failed: {r.error} | | | | | | | |")
        if not r.runs:
            continue
        runs = r.runs
        tail = [x.save_s - x.qemu_exited_s for x in runs if x.qemu_exited_s is not None]
        rows.append(
            f"| {r.method.name} | {len(runs)} | {_range([x.save_s for x in runs])} "
            f"| {_f(_med([x.image_final_s for x in runs]))} | {_f(_med([x.qemu_exited_s for x in runs]))} "
            f"| {_f(_med(tail))} | {_range([x.restore_s for x in runs])} "
            f"| {_f(_med([x.qemu_started_s for x in runs]))} | {_f(_med([x.agent_s for x in runs]))} "
            f"| {runs[0].apparent_bytes >> 20} / {_med([x.allocated_bytes / (1 << 20) for x in runs]) or 0:.0f} |")
    return rows


def libvirtd_reaper(proc: Path = Path("/proc")) -> str:
    """Who reaps the QEMU processes libvirtd daemonizes: libvirtd's parent when that is a subreaper
    (``tini`` from scripts/setup-host.sh), else PID 1; named by its command."""
    def comm(pid: str) -> str:
        try:
            return (proc / pid / "comm").read_text().strip()
        except OSError:
            return "?"
    for d in proc.iterdir():
        if d.name.isdigit() and comm(d.name) == "libvirtd":
            try:
                ppid = (d / "stat").read_text().rsplit(")", 1)[1].split()[1]
            except (OSError, IndexError):
                break
            if ppid != "1":
                return f"its parent `{comm(ppid)}` (a subreaper, started by scripts/setup-host.sh)"
            break
    return f"PID 1 (`{comm('1')}`)"


def report(results: Sequence[Result], zombies: Sequence[float], checkpoint: str,
           reaper: str = "PID 1") -> str:
    lines = [
        "# Save and restore: where the downtime's floor is",
        "",
        f"`python -m bench.bench_savepath` (`make bench BENCH=savepath`): a clone of checkpoint `{checkpoint}` "
        "(1 GiB TCG guest) paused, saved in the sparse format, restored running; medians (range) over the runs. "
        "*image complete*: the header's magic turned final (QEMU wrote everything); *QEMU exited*: its "
        "process stopped running; *libvirt after QEMU*: the rest of the save call.",
        "",
        *table(results),
        "",
        f"An orphaned process stays a zombie here for {_f(_med(zombies))} s (median of {len(zombies)}; "
        f"{', '.join(f'{z:.2f}' for z in zombies)}) when PID 1 reaps it. libvirt's save returns only once "
        "QEMU is reaped (`virProcessKillPainfully` polls `kill(pid, 0)` every 200 ms, true for a zombie); "
        f"in this run QEMU was reaped by {reaper}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--checkpoint", default=CHECKPOINT, help="the checkpoint to clone (made if missing)")
    ap.add_argument("--runs", type=int, default=3, help="saves and restores per method")
    ap.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS),
                    help="which ways to save and restore (default: all)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="folder for savepath.md and .json")
    args = ap.parse_args(argv)
    zombies = zombie_lifetimes()        # before libvirt's threads exist in this process (fork)
    results = [Result(METHODS[name]) for name in args.methods]
    with Hypervisor() as hv:
        ck, _created = ckpt.ensure(hv, args.checkpoint)
        m = ckpt.start_clone(hv, ck, CLONE, replace=True)
        shm = private_dir(TMPFS) / f"{CLONE}.sav"
        disk = ckpt.clone_dir(CLONE) / "savepath.sav"
        try:
            for res in results:
                image = shm if res.method.where == "tmpfs" else disk
                for i in range(args.runs):
                    time.sleep(SETTLE_S)
                    try:
                        m, run = one_run(hv, m, image, res.method)
                    except libvirt.libvirtError as e:     # QEMU crashed: noted, a new clone goes on
                        res.error = f"run {i + 1}: {e.get_error_message()}"
                        print(f"{res.method.name} #{i + 1}: {res.error}", file=sys.stderr, flush=True)
                        m = ckpt.start_clone(hv, ck, CLONE, replace=True)
                        break
                    res.runs.append(run)
                    print(f"{res.method.name} #{i + 1}: save {run.save_s:.2f} s (image complete "
                          f"{_f(run.image_final_s)}, QEMU exited {_f(run.qemu_exited_s)}), restore "
                          f"{run.restore_s:.2f} s", file=sys.stderr, flush=True)
        finally:
            shm.unlink(missing_ok=True)
            ckpt.remove_clone(hv, CLONE)
    text = report(results, zombies, args.checkpoint, libvirtd_reaper())
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "savepath.md").write_text(text)
    data: dict[str, Any] = {"zombie_lifetimes_s": zombies,
                            "results": [{"method": asdict(r.method), "runs": [asdict(x) for x in r.runs],
                                         "error": r.error} for r in results]}
    (args.out / "savepath.json").write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
