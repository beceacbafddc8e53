"""replay-migrate against the baselines, per workload, on the same source state, over a shaped link.

    python bench/bench_migration.py [--workloads notes shell unpack build generate mixed bigfile]
                                    [--out bench/results] [--checkpoint bench --kernel-arg ARG ...]

For each workload one real migration runs between two network namespaces joined by a veth pair
(source VM driven by the workload in one, the handoff service and the replaying target in the
other) over 10 Mbit/s / 40 ms RTT. Its source state and the target's own state before patching
are kept, and on them, on this host: the plain state transfer, the full image, rsync, the Merkle
diff without replay (bytes and sender CPU time), where replay left divergence and why, and where
that residue goes (:mod:`bench.residue`: whether the target holds each divergent page anywhere,
what the rest is by the guest's own page flags, read in restored copies of both states). After
each migration the workload's checks run in the migrated VM; one that fails fails the benchmark
(exit 4) once every workload is measured. The baselines' real byte counts are then sent over each
shaped link by a small TCP sender and timed, and the short workloads migrate once more at
100 Mbit/s / 5 ms. Writes ``migration.md``, ``migration.json`` and PNG plots to ``--out`` (``--name``
changes the stem: ``make bench-long`` writes ``long.md``, ``long.json`` and ``long-*.png`` beside them).

Then libvirt's own live migration (pre-copy, pre-copy compressed, post-copy) of one clone per
workload between two libvirt hosts, site A and site B (``bench/bench_native.py``; its shaped-link
times are modelled from the unshaped measurement, see there, except the pre-copy's where
``bench/results/precopy-shaped.json`` of ``make bench-precopy`` measured it on the shaped veth;
``--no-native`` skips it). The replay
rows above still run under one daemon, their sides in two network namespaces.

The link is shaped by ``tc netem`` where the kernel has it, else by the userspace link emulator
(``bench/linkemu.py``, see :mod:`bench.netns`); the report says which. ``--no-link`` leaves the
link unshaped on purpose: everything but the shaped times is measured, and the report says so.
Exit status 3 is left for a link that cannot be shaped at all.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import tables
from bench.baselines import rsync_delta, source_costs, sparse_zstd
from bench.bench_native import merge_into, run_native
from bench.divergence import disk_divergence, memory_divergence
from bench.netns import NETEM_MISSING, SHAPER_NETEM, SHAPES, NetnsLink, Shape
from bench.pageflags import kinds_of, read_page_flags
from bench.residue import residue
from bench.sides import KEPT_DISK, KEPT_MEMORY
from bench.sites import running
from migration.catchup import CATCHUP_TIMEOUT_S
from migration.sides import FLUSH_S
from migration.suspenddir import suspend_dir_arg
from migration.timeline import downtime_breakdown, excluded_seconds, merge, spans_of
from replay_migrate.errors import HostError
from replayer.drive import run_checks
from replayer.workload import find_workload, load_workload, session_seconds
from server.credentials import CREDENTIAL_ENV, KEY_ENV, TOKEN_ENV
from server.keyring import MIN_KEY_BYTES, SESSION_ID_BYTES, Keyring
from store import checkpoint as ckpt
from store.paths import checkpoints_dir
from store.vmstate import CheckpointTrees, VmState, checkpoint_trees, sync_states
from vm.machine import Hypervisor, MachineState

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VENV_BIN = Path(sys.executable).parent
CHECKPOINT = "bench"
PREFIX = f"{ckpt.DOMAIN_PREFIX}bench-"
WORKLOADS = ("notes", "shell", "unpack", "build", "generate", "mixed", "bigfile")
DEFAULT_WORKLOADS = ("notes", "shell", "unpack", "build", "generate", "bigfile")
"""What ``make bench`` runs: every workload but ``mixed`` (~2 min of session that the interactive and
state-making ones cover), so the whole suite stays under 30 minutes."""
NATIVE_WORKLOADS = ("notes", "shell", "generate")
"""The workloads libvirt's live migration runs on by default: one of each kind (typing in a notepad,
in a shell, making tens of MiB). Each drives the workload once more at site A, and a live
migration's bytes depend on the guest's memory in use, far less on what the session did."""
STATE_MAKING = ("unpack", "build", "generate")
"""Workloads where a few keystrokes make tens of MiB of state (issue 13's goals: <= 5 % of the plain
transfer and <= 20 % of the diff without replay)."""
TRIMMED = {"mixed": HERE / "workloads" / "mixed-short.wl"}
"""Bench-only copies that keep `make bench` under 30 minutes (mixed.wl alone runs ~5 min)."""
REPEAT_AT_SECOND_LINK = ("notes", "shell")
"""Short workloads migrated once more on the second link (the others: first link only)."""
SERVICE_PORT = 7700
LINKSEND_PORT = 7701
SERVICE_START_S = 30.0
"""How long the service and the link receiver get to start listening."""
TARGET_START_S = 180.0
"""How long the target process gets to restore its clone before the source starts working."""
MIGRATION_MARGIN_S = 900.0
"""A migration may take this long beyond its workload's own duration before it is killed."""
MAX_SEND_BYTES = 24 << 20
"""Largest transfer sent for real per baseline (~20 s at 10 Mbit/s); larger byte counts are timed
by the link's throughput measured with a transfer of this size (marked "extrapolated")."""
CALIBRATION_SMALL_BYTES = 1 << 20
"""The small calibration transfer: with the large one it gives the link's fixed cost and rate."""
DEFAULT_WORK = Path("/var/tmp/rm-bench")
"""Kept states and scratch files; must be on the clones' file system (hard links)."""
DEFAULT_SUSPEND_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else ""
"""Where both sides save at suspend (``migration.suspenddir``): tmpfs, as a host with the RAM would."""
EXIT_NO_NETEM = 3
EXIT_CHECK_FAILED = 4
"""A workload's check failed in the migrated VM (its files are not what the source computed)."""
WATCH_S = 1.0
"""How often the host's other running domains are counted during a migration."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- processes in the namespaces -------------------------------------------------------------------
class Proc:
    """A background process with its output in a log file; stopped by its own pid only."""

    def __init__(self, name: str, argv: list[str], logfile: Path, env: dict[str, str]) -> None:
        self.name = name
        self.logfile = logfile
        self._out: IO[bytes] = open(logfile, "wb")
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._out, cwd=REPO, env=env)

    def wait_line(self, needle: str, timeout: float) -> None:
        """Block until the process prints a line containing ``needle`` on stdout."""
        assert self.p.stdout is not None
        deadline = time.monotonic() + timeout
        os.set_blocking(self.p.stdout.fileno(), False)
        buf = b""
        while time.monotonic() < deadline:
            chunk = self.p.stdout.read()
            if chunk:
                buf += chunk
                if needle.encode() in buf:
                    return
            if self.p.poll() is not None:
                break
            time.sleep(0.05)
        raise HostError(f"{self.name} did not start (see {self.logfile}): {self.tail()}")

    def wait(self, timeout: float) -> int:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise HostError(f"{self.name} did not finish in {timeout:.0f} s (see {self.logfile})") from None

    def tail(self, n: int = 800) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._out.close()


def _env(token: str, **extra: str) -> dict[str, str]:
    return {**os.environ, TOKEN_ENV: token, "PYTHONPATH": str(REPO), **extra}


# ---- one migration ---------------------------------------------------------------------------------
@dataclass
class Run:
    """One migration's outcome: both sides' reports and timestamps, and the derived times."""

    link: str
    source: dict[str, Any]
    target: dict[str, Any]
    other_vms: float = 0.0
    """Mean number of other running domains (not the benchmark's) during the run: CPU contention."""
    checks: list[dict[str, Any]] | None = None
    """The workload's checks, run in the migrated VM: command, exit code, output."""

    def spans(self) -> list[Any]:
        """Both sides' phases on the host's one monotonic clock (``migration.timeline``)."""
        return merge(spans_of(self.source["report"]), spans_of(self.target["report"]))

    def derived(self) -> dict[str, float]:
        s, t = self.source, self.target
        # the benchmark's own hooks (keeping the target's state, stamping its verification) are
        # not part of a migration: out of its downtime
        hooks = excluded_seconds(self.spans(), s["t_paused"], t["t_resumed"])
        return {
            "e2e_s": t["t_resumed"] - s["t_request"] - hooks,
            "downtime_s": t["t_resumed"] - s["t_paused"] - hooks,
            # what the baselines pay too: the wait for the agent's last frames, and for the target
            # to catch up (migration.catchup), are replay's alone (the VM runs: in e2e, not downtime)
            "quiesce_s": max(0.0, s["t_paused"] - s["t_request"] - s.get("flush_s", FLUSH_S)),
            "flush_s": s.get("flush_s", FLUSH_S),
            "catchup_s": s.get("catchup_s", 0.0),
            "save_s": s["t_saved"] - s["t_paused"],
            "restore_s": t["t_resumed"] - t["t_verified"],
            "replay_lag_s": t["t_saved"] - s["t_paused"],
            "e2e_confirmed_s": s["t_done"] - s["t_request"] - hooks,  # until the source holds the confirm
            "hooks_s": hooks,
        }

    def breakdown(self) -> dict[str, float]:
        """The downtime's critical path, phase by phase (empty for a run without timelines)."""
        spans = self.spans()
        return downtime_breakdown(spans, self.source["t_paused"], self.target["t_resumed"]) if spans else {}

    def as_dict(self) -> dict[str, Any]:
        return {"link": self.link, **{k: round(v, 3) for k, v in self.derived().items()},
                "downtime_breakdown": self.breakdown(),
                "report": self.source["report"], "target_report": self.target["report"],
                "replay": self.target.get("replay", {}), "events_driven": self.source.get("events_driven"),
                "drive_s": self.source.get("drive_s"), "other_vms_running": round(self.other_vms, 2),
                "checks": self.checks or []}


def _watch(hv: Hypervisor, proc: Proc, limit: float) -> float:
    """Wait for ``proc`` (at most ``limit`` s) while counting the host's other running domains
    every :data:`WATCH_S`; returns their mean count (TCG guests compete for the same cores)."""
    samples: list[int] = []
    deadline = time.monotonic() + limit
    while proc.p.poll() is None and time.monotonic() < deadline:
        try:
            doms = hv.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            samples.append(sum(1 for d in doms if not d.name().startswith(PREFIX)))
        except libvirt.libvirtError:  # a domain vanishing mid-listing: skip the sample
            pass
        time.sleep(WATCH_S)
    return sum(samples) / len(samples) if samples else 0.0


def _remove_ours(hv: Hypervisor, names: Sequence[str]) -> None:
    for name in names:
        if not name.startswith(PREFIX):
            raise ValueError(f"refusing to remove {name!r}: not one of the benchmark's clones")
        ckpt.remove_clone(hv, name)


def migrate(hv: Hypervisor, ck: ckpt.Checkpoint, wl: str, workload: Path, link: NetnsLink, link_key: str,
            token: str, keyring: Keyring, work: Path, *, keep: bool, target_args: Sequence[str] = (),
            suspend_dir: Path | None = None, sync_dump: Path | None = None) -> Run:
    """Source clone driven by ``workload`` in the source namespace, target clone replaying in the
    target namespace, the service there too; returns when the target runs the migrated VM.
    ``sync_dump``: both sides keep sync marks' regions in ``sync_dump/WORKLOAD-LINK``."""
    src_name, tgt_name = f"{PREFIX}{wl}-src", f"{PREFIX}{wl}-tgt"
    wdir = work / wl
    wdir.mkdir(parents=True, exist_ok=True)
    duration = session_seconds(load_workload(workload))
    _remove_ours(hv, (src_name, tgt_name))
    # the bench holds the service key, so it derives the session's credentials itself (the service
    # keeps no state to consult); each side gets only its own
    src_cred, tgt_cred = keyring.new_session(secrets.token_bytes(SESSION_ID_BYTES))
    # the source crosses the link to the target address; the target, next to the service, reaches
    # it where it listens (the same address with netem, 127.0.0.1 behind the emulator)
    src_url = f"ws://{link.cfg.tgt_addr}:{SERVICE_PORT}"
    tgt_url = f"ws://{link.serve_host}:{SERVICE_PORT}"
    py = str(VENV_BIN / "python")
    procs: list[Proc] = []
    try:
        src = ckpt.start_clone(hv, ck, src_name)
        src.wait_agent()
        tgt_argv = [py, "-m", "bench.sides", "target", "--url", tgt_url, "--checkpoint", ck.name,
                    "--name", tgt_name, "--out", str(wdir / f"target-{link_key}.json"), *target_args]
        src_argv = [py, "-m", "bench.sides", "source", "--url", src_url, "--checkpoint", ck.name,
                    "--domain", src_name, "--workload", str(workload), "--out", str(wdir / f"source-{link_key}.json")]
        if suspend_dir is not None:
            tgt_argv += ["--suspend-dir", str(suspend_dir)]
            src_argv += ["--suspend-dir", str(suspend_dir)]
        if keep:
            tgt_argv += ["--keep", str(wdir / "target")]
            src_argv += ["--keep", str(wdir / "source")]
        if sync_dump is not None:
            tgt_argv += ["--sync-dump", str(sync_dump / f"{wl}-{link_key}")]
            src_argv += ["--sync-dump", str(sync_dump / f"{wl}-{link_key}")]
        tgt = Proc("target", link.tgt(tgt_argv), wdir / f"target-{link_key}.log",
                   _env(token, **{CREDENTIAL_ENV: str(tgt_cred)}))
        procs.append(tgt)
        deadline = time.monotonic() + TARGET_START_S
        while not (hv.exists(tgt_name) and hv.lookup(tgt_name).state is MachineState.RUNNING):
            if tgt.p.poll() is not None or time.monotonic() > deadline:
                raise HostError(f"the target clone did not start: {tgt.tail()}")
            time.sleep(0.2)
        log(f"{wl} ({link_key}): target {tgt_name} follows; driving {workload.name} (~{duration:.0f} s) "
            f"into {src_name}")
        source = Proc("source", link.src(src_argv), wdir / f"source-{link_key}.log",
                      _env(token, **{CREDENTIAL_ENV: str(src_cred)}))
        procs.append(source)
        limit = duration + MIGRATION_MARGIN_S
        others = _watch(hv, source, limit)
        for p in (source, tgt):
            if p.wait(limit) != 0:
                raise HostError(f"the {p.name} side failed: {p.tail()}")
        result = Run(link_key, json.loads((wdir / f"source-{link_key}.json").read_text()),
                     json.loads((wdir / f"target-{link_key}.json").read_text()), others)
        # the migrated VM runs at the target: the user's files must be what the source computed
        result.checks = [asdict(c) for c in run_checks(hv.lookup(tgt_name), load_workload(workload))]
        for c in result.checks:
            if c["exit_code"] != 0:
                log(f"{wl} ({link_key}): CHECK FAILED in the migrated VM (exit {c['exit_code']}): "
                    f"{c['command']}\n{c['output']}")
    finally:
        for p in procs:
            p.stop()
        _remove_ours(hv, (src_name, tgt_name))
    d = result.derived()
    log(f"{wl} ({link_key}): {result.source['report']['wire_bytes']:,} wire bytes, end to end "
        f"{d['e2e_s']:.1f} s, downtime {d['downtime_s']:.1f} s ({others:.1f} other VMs running on average)")
    return result


# ---- baselines and the link ------------------------------------------------------------------------
def measure_baselines(ck: ckpt.Checkpoint, wdir: Path, trees: CheckpointTrees,
                      hv: Hypervisor | None = None) -> dict[str, Any]:
    """Bytes and sender time of every baseline, the divergence and where its residue goes, on the
    kept states; with ``hv``, the residue's page kinds from the guests' own page flags."""
    s_mem, s_disk = wdir / "source" / KEPT_MEMORY, wdir / "source" / KEPT_DISK
    t_mem, t_disk = wdir / "target" / KEPT_MEMORY, wdir / "target" / KEPT_DISK
    state = VmState(s_mem, s_disk, ck)
    costs = source_costs(state, ck, trees, wdir)
    full = sparse_zstd([s_mem, s_disk, ck.disk])
    rs = rsync_delta([s_mem, s_disk], [ck.memory, ck.disk], wdir)
    nr = costs.no_replay
    out: dict[str, Any] = {
        "bytes": {"plain": costs.plain_bytes, "full": full.bytes, "rsync": rs.stats.wire_bytes,
                  "no-replay": nr.wire_total},
        "prep_s": {"plain": costs.tree_s + costs.plain_s, "full": full.seconds, "rsync": rs.seconds,
                   "no-replay": costs.tree_s + costs.no_replay_s},
        # the target's writes before it can restore (rsync's receiver is inside rs.seconds already)
        "apply_s": {"plain": costs.apply_s, "no-replay": costs.apply_s},
        "details": {
            "source_tree_s": round(costs.tree_s, 3),
            "full": asdict(full),
            "rsync": {**asdict(rs.stats), "seconds": round(rs.seconds, 3)},
            "no-replay": {"divergent": {k: v.divergent for k, v in nr.images.items()},
                          "round_trips": nr.round_trips, "hash_bytes": nr.hash_bytes,
                          "block_bytes": nr.block_bytes, "fingerprint_bytes": nr.fingerprint_bytes},
        },
    }
    t0 = time.perf_counter()
    out["divergence"] = {"memory": asdict(memory_divergence(s_mem, t_mem)),
                         "disk": asdict(disk_divergence(s_disk, t_disk, trees, wdir))}
    out["details"]["divergence_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    out["residue"] = residue_of(state, VmState(t_mem, t_disk, ck), trees, hv)
    out["details"]["residue_s"] = round(time.perf_counter() - t0, 3)
    return out


def residue_of(source: VmState, target: VmState, trees: CheckpointTrees, hv: Hypervisor | None) -> dict[str, Any]:
    """:func:`bench.residue.residue` of the kept states, with what a dry run of the protocol between
    them sends (the migration's own choices: same states, same parameters) and, given ``hv``, the
    page kinds of both guests (each read in a restored copy)."""
    sent, _ = sync_states(source, target, dry_run=True)
    kinds: list[dict[int, str] | None] = [None, None]
    if hv is not None:
        for i, (state, who) in enumerate(((source, "src"), (target, "tgt"))):
            flags = read_page_flags(hv, state, f"{PREFIX}flags-{who}")
            kinds[i] = kinds_of(flags, range(len(flags)))
    r = residue(source, target, trees, source_kinds=kinds[0], target_kinds=kinds[1], sent=sent)
    return {**asdict(r), "held_anywhere": r.held_anywhere, "sent_as_held": r.sent_as_held}


def send_times(link: NetnsLink, sizes: list[int], token: str) -> list[float]:
    """Send each size over the link (source namespace -> target namespace); seconds each."""
    if not sizes:
        return []
    argv = link.src([str(VENV_BIN / "python"), "-m", "bench.linksend", "send", "--to",
                     f"{link.cfg.tgt_addr}:{LINKSEND_PORT}", "--bytes", *map(str, sizes)])
    r = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=_env(token), check=False,
                       timeout=sum(sizes) / 1e5 + 600)
    if r.returncode != 0:
        raise HostError(f"link sender failed: {r.stderr.strip()[-400:]}")
    return [float(t["seconds"]) for t in json.loads(r.stdout)]


def time_baselines(link: NetnsLink, shape: Shape, workloads: dict[str, dict[str, Any]], token: str) -> None:
    """Each baseline's bytes over the shaped link, then its end-to-end time and downtime:
    quiesce + save (replay-migrate's, measured) + max(sender CPU, link) + restore (measured).
    The sender's work may overlap the transfer, so taking the max favours the baselines."""
    link.shape(shape)
    wanted = sorted({n for w in workloads.values() for n in w["bytes"].values() if n <= MAX_SEND_BYTES})
    times = send_times(link, [CALIBRATION_SMALL_BYTES, MAX_SEND_BYTES, *wanted], token)
    t_small, t_big = times[0], times[1]
    # bytes/s beyond the fixed cost (handshake, slow start); the plain average if timing noise
    # made the small transfer look as slow as the large one
    rate = ((MAX_SEND_BYTES - CALIBRATION_SMALL_BYTES) / (t_big - t_small) if t_big > t_small
            else MAX_SEND_BYTES / t_big)
    measured = dict(zip(wanted, times[2:], strict=True))
    log(f"link {shape.name}: {rate * 8 / 1e6:.1f} Mbit/s measured over {MAX_SEND_BYTES >> 20} MiB")
    for w in workloads.values():
        run = w["runs"].get(SHAPES[0].key) or w["runs"].get(tables.UNSHAPED)
        timing = w.setdefault("timing", {}).setdefault(shape.key, {})
        for method, n in w["bytes"].items():
            if method == "replay-migrate" or method in tables.NATIVE:   # measured migrations, not baselines
                continue
            if n in measured:
                link_s, how = measured[n], "bytes sent over the link"
            else:
                link_s, how = t_big + (n - MAX_SEND_BYTES) / rate, "extrapolated from the link's measured rate"
            if method == "no-replay":
                link_s += w["details"]["no-replay"]["round_trips"] * shape.rtt_ms / 1000
            work_s = max(w["prep_s"][method], link_s) + w.get("apply_s", {}).get(method, 0.0)
            downtime = run["save_s"] + work_s + run["restore_s"]
            timing[method] = {"e2e_s": run["quiesce_s"] + downtime, "downtime_s": downtime, "link_s": link_s,
                              "how": how}


def run_native_rows(hv: Hypervisor, ck: ckpt.Checkpoint, workloads: Sequence[str], results: dict[str, Any],
                    notes: list[str]) -> None:
    """libvirt's own live migration per workload between site A and site B (``bench/bench_native.py``),
    beside the rows above; site B is started for it and stopped (and wiped) afterwards."""
    t0 = time.monotonic()
    with running() as site:
        site.hold(ck, log)
        for wl in workloads:
            merge_into(results.setdefault(wl, {}), run_native(hv, ck, wl, workload_file(wl), site, PREFIX))
    notes.append("replay-migrate's rows and the baselines ran under one libvirt daemon (site A), its two sides in "
                 "two network namespaces; the libvirt live-migration rows ran between two libvirt hosts (site A and "
                 f"site B, `bench/sites.py`), {time.monotonic() - t0:.0f} s for all of them, and their shaped-link "
                 "times are modelled from the unshaped measurement (see that section).")


# ---- the whole benchmark ---------------------------------------------------------------------------
def workload_file(name: str) -> Path:
    return TRIMMED[name] if name in TRIMMED else find_workload(name)


def run_all(args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    t_begin = time.monotonic()
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    checkpoints_dir().mkdir(parents=True, exist_ok=True)    # a fresh state root has none yet
    if work.stat().st_dev != checkpoints_dir().stat().st_dev:
        raise SystemExit(f"--work {work} must be on the file system of {checkpoints_dir()} (hard links)")
    token = secrets.token_urlsafe(24)
    key = secrets.token_bytes(MIN_KEY_BYTES)
    keyring = Keyring(key, token)
    results: dict[str, Any] = {"meta": {}, "workloads": {}}
    notes: list[str] = []
    if args.migrations_only:
        notes.append("Only the replay-migrate migrations ran (`--migrations-only`): no baselines, no divergence.")
    notes.append(f"Both sides saved their VMs at suspend into `{args.suspend_dir}` (tmpfs; `--suspend-dir`), the "
                 "baselines' save and restore are the same measured ones." if args.suspend_dir else
                 "Both sides saved their VMs at suspend into their clone folders (the state disk).")
    if args.target_args:
        notes.append(f"The targets ran as a variant: `bench.sides target ... {shlex.join(args.target_args)}`.")
    with Hypervisor() as hv:
        kernel_args = [] if args.no_default_kernel_args and args.kernel_arg is None else args.kernel_arg
        ck, created = ckpt.ensure(hv, args.checkpoint, kernel_args=kernel_args)
        log(f"checkpoint {ck.name}: {'created' if created else 'cached'}")
        trees = checkpoint_trees(ck)
        manifest = ck.manifest
        ports = () if args.no_link else (SERVICE_PORT, LINKSEND_PORT)
        with NetnsLink(ports=ports, log=work / "linkemu.log", python=str(VENV_BIN / "python")) as link:
            shapes = list(SHAPES) if link.shaper and not args.no_link else []
            message = None
            if args.no_link:
                message = "shaped-link timings skipped on request (--no-link)."
            elif not shapes:
                message = NETEM_MISSING
                log(f"WARNING: {NETEM_MISSING}; measuring bytes and unshaped times only, exit status will be "
                    f"{EXIT_NO_NETEM}")
            elif link.emulated:
                log("this kernel has no sch_netem: the userspace link emulator (bench/linkemu.py) shapes the link")
                notes.append("The link was shaped by the userspace link emulator (`bench/linkemu.py`; this kernel "
                             "has no sch_netem): rate, per-direction delay and queue as netem's, but it "
                             "terminates TCP, so the sender's slow start over the emulated RTT is not modelled "
                             "and short transfers come out somewhat faster than over netem.")
            first = shapes[0].key if shapes else tables.UNSHAPED
            service = Proc("service", link.tgt([str(VENV_BIN / "replay-migrate"), "serve", "--listen",
                                                f"{link.serve_host}:{SERVICE_PORT}"]),
                           work / "service.log", _env(token, **{KEY_ENV: key.hex()}))
            receiver = Proc("link receiver", link.tgt([str(VENV_BIN / "python"), "-m", "bench.linksend", "recv",
                                                       "--listen", f"{link.serve_host}:{LINKSEND_PORT}"]),
                            work / "receiver.log", _env(token))
            try:
                service.wait_line("serving on", SERVICE_START_S)
                receiver.wait_line("ready", SERVICE_START_S)
                for wl in args.workloads:
                    path = workload_file(wl)
                    if wl in TRIMMED:
                        notes.append(f"`{wl}` ran as the bench-only trimmed copy `{path.relative_to(REPO)}`.")
                    if shapes:
                        link.shape(shapes[0])
                    run = migrate(hv, ck, wl, path, link, first, token, keyring, work,
                                  keep=args.keep_work or not args.migrations_only,
                                  target_args=args.target_args, suspend_dir=args.suspend_dir,
                                  sync_dump=args.sync_dump)
                    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
                    w: dict[str, Any] = {"file": str(shown), "session_s": round(run.source["drive_s"], 1),
                                         "runs": {first: run.as_dict()}, "bytes": {}}
                    if not args.migrations_only:
                        log(f"{wl}: baselines, divergence and residue on the kept states")
                        w.update(measure_baselines(ck, work / wl, trees, hv if args.page_flags else None))
                    w["bytes"] = {"replay-migrate": run.source["report"]["wire_bytes"], **w["bytes"]}
                    d = run.derived()
                    w["timing"] = {first: {"replay-migrate": {"e2e_s": d["e2e_s"], "downtime_s": d["downtime_s"],
                                                              "how": "measured migration"}}}
                    results["workloads"][wl] = w
                    if not args.keep_work:
                        shutil.rmtree(work / wl / "source", ignore_errors=True)
                        shutil.rmtree(work / wl / "target", ignore_errors=True)
                for shape in shapes[1:]:
                    link.shape(shape)
                    for wl in args.workloads:
                        if wl not in REPEAT_AT_SECOND_LINK or args.first_link_only:
                            continue
                        run = migrate(hv, ck, wl, workload_file(wl), link, shape.key, token, keyring, work,
                                      keep=False, target_args=args.target_args, suspend_dir=args.suspend_dir,
                                      sync_dump=args.sync_dump)
                        w = results["workloads"][wl]
                        w["runs"][shape.key] = run.as_dict()
                        d = run.derived()
                        w["timing"].setdefault(shape.key, {})["replay-migrate"] = {
                            "e2e_s": d["e2e_s"], "downtime_s": d["downtime_s"], "how": "measured migration"}
                for shape in shapes if not args.migrations_only else ():
                    time_baselines(link, shape, results["workloads"], token)
            finally:
                receiver.stop()
                service.stop()
        if args.native:
            run_native_rows(hv, ck, [w for w in args.workloads if w in args.native_workloads], results["workloads"],
                            notes)
    if shapes:
        notes.append("Baseline times: quiesce, save and restore as measured in the workload's replay-migrate "
                     "run; the transfer is the baseline's real byte count sent over the same shaped link; "
                     "the sender's CPU time (hashing, compressing, rsync) counts only where it exceeds the "
                     "transfer (max, favouring the baselines). The plain transfer and the diff without "
                     "replay then pay the target's writes (a copy of the checkpoint patched with every "
                     "leaf the source changed, measured on the kept state; the diff without replay is given the "
                     "same writes and no verification); rsync's receiver is inside its "
                     "measured time; the full image's target writes are not counted.")
        notes.append("replay-migrate's source keeps the VM running at suspend until its screen settled and "
                     "the target replayed every frame forwarded (`migration/catchup.py`, at most "
                     f"{CATCHUP_TIMEOUT_S:.0f} s): that wait is not downtime (the VM runs) but is in the end "
                     "to end time, and is left out of the quiesce the baselines are charged.")
        notes.append("replay-migrate ran on the first link only (`--first-link-only`)." if args.first_link_only else
                     f"replay-migrate ran on the second link ({SHAPES[1].name}) for "
                     f"{', '.join(REPEAT_AT_SECOND_LINK)} only, to keep `make bench` under 30 minutes.")
    results["meta"] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": f"{platform.node()}, {os.cpu_count()} CPUs, Linux {platform.release()}",
        "checkpoint": ck.name, "virt": "TCG" if manifest.virt == "qemu" else "KVM",
        "kernel_args": list(manifest.kernel_args),
        "memory_mib": manifest.memory_mib,
        "link": {"netem": bool(shapes) and link.shaper == SHAPER_NETEM,
                 "shaper": link.shaper if shapes else None, "message": message,
                 "shapes": [{"key": s.key, "name": s.name, "rate_mbit": s.rate_mbit, "rtt_ms": s.rtt_ms}
                            for s in shapes]},
        "params": {"max_send_bytes": MAX_SEND_BYTES, "repeat_at_second_link": list(REPEAT_AT_SECOND_LINK),
                   "flush_s": FLUSH_S, "target_args": args.target_args,
                   "suspend_dir": str(args.suspend_dir) if args.suspend_dir else None},
        "notes": notes,
        "elapsed_s": round(time.monotonic() - t_begin, 1),
    }
    return results, bool(message) and not args.no_link


def failed_checks(results: dict[str, Any]) -> list[str]:
    """``workload (link): command`` of every check that did not pass, in any run."""
    return [f"{wl} ({link}): {c['command']}" for wl, w in results["workloads"].items()
            for link, run in w.get("runs", {}).items() for c in run.get("checks", []) if c["exit_code"] != 0]


REPORT_NAME = "migration"
"""Stem of the report's files in ``--out``: ``migration.md``, ``migration.json`` and unprefixed plots;
another stem (``--name long``) prefixes the plots too, so a separate run never overwrites the suite's."""


def write_results(results: dict[str, Any], out: Path, name: str = REPORT_NAME,
                  shaped_precopy: Path | None = tables.SHAPED_PRECOPY_JSON) -> Path:
    """The report's files; libvirt's pre-copy times on a shaped link are ``shaped_precopy``'s
    measurement (``make bench-precopy``) where it has the workload and the link's rate, modelled
    otherwise."""
    out.mkdir(parents=True, exist_ok=True)
    shaped = tables.load_shaped_precopy(shaped_precopy) if shaped_precopy is not None else None
    if tables.apply_shaped_precopy(results, shaped):
        assert shaped is not None
        note = tables.shaped_precopy_note(shaped)
        notes = results["meta"].setdefault("notes", [])
        if note not in notes:
            notes.append(note)
    pre = "" if name == REPORT_NAME else f"{name}-"
    order = {name: i for i, name in enumerate(WORKLOADS)}
    results["workloads"] = dict(sorted(results["workloads"].items(), key=lambda kv: order.get(kv[0], len(order))))
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    plots = [p for p in (tables.plot_bytes(results, out / f"{pre}bytes.png"),
                         tables.plot_time(results, out / f"{pre}time_vs_bandwidth.png"),
                         tables.plot_divergence(results, out / f"{pre}divergence.png"),
                         tables.plot_downtime(results, out / f"{pre}downtime.png")) if p is not None]
    stale = out / f"{pre}time_vs_bandwidth.png"
    if stale not in plots:
        stale.unlink(missing_ok=True)
    md = out / f"{name}.md"
    md.write_text(tables.render_markdown(results, [p.name for p in plots]))
    return md


def _report_name(v: str) -> str:
    """A stem that stays a file name in --out (letters, digits, - and _)."""
    if not v or not all(c.isalnum() or c in "-_" for c in v):
        raise argparse.ArgumentTypeError(f"not a plain file stem: {v!r}")
    return v


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=list(DEFAULT_WORKLOADS),
                    help=f"among {', '.join(WORKLOADS)} (default: %(default)s)")
    ap.add_argument("--native-workloads", nargs="+", default=list(NATIVE_WORKLOADS), metavar="WORKLOAD",
                    help="those of --workloads libvirt's live migration also runs on (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--name", default=REPORT_NAME, type=_report_name,
                    help="stem of the report's files in --out (default %(default)s: migration.md, migration.json)")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--no-link", action="store_true", help="do not shape the link (no shaped times; exit 0)")
    ap.add_argument("--keep-work", action="store_true",
                    help="keep the saved states in --work afterwards (with --migrations-only too: to measure "
                         "baselines and variants offline on them, bench/levers.py)")
    ap.add_argument("--checkpoint", default=CHECKPOINT, help="the checkpoint to migrate clones of (made or "
                    "remade for the current image and --kernel-arg; default %(default)s)")
    ap.add_argument("--kernel-arg", action="append", default=None, metavar="ARG",
                    help="guest kernel argument the checkpoint is booted with (repeatable: norandmaps, "
                         "init_on_free=1; default: the image's, store.checkpoint.IMAGE_KERNEL_ARGS = "
                         f"{' '.join(ckpt.IMAGE_KERNEL_ARGS)}); a checkpoint made with others is made anew")
    ap.add_argument("--no-default-kernel-args", action="store_true",
                    help="boot the checkpoint without the image's default kernel arguments (a baseline)")
    ap.add_argument("--no-page-flags", dest="page_flags", action="store_false",
                    help="name the residue's pages by content only (no restored copies of the states)")
    ap.add_argument("--migrations-only", action="store_true",
                    help="only the replay-migrate runs: no baselines, no divergence analysis (to compare variants)")
    ap.add_argument("--target-args", type=shlex.split, default=[], metavar="ARGS",
                    help="more arguments for the target side (`python -m bench.sides target --help`), to measure "
                         "a variant, e.g. --target-args='--copy-sinks --rehash'")
    ap.add_argument("--first-link-only", action="store_true",
                    help="migrate on the first link only (the baselines are still timed on every link)")
    ap.add_argument("--suspend-dir", type=lambda v: suspend_dir_arg(v) if v else None, default=DEFAULT_SUSPEND_DIR,
                    metavar="DIR", help="both sides save their VMs at suspend here (default: %(default)s; '' for the "
                    "clone folders on the state disk)")
    ap.add_argument("--sync-dump", type=Path, default=None, metavar="DIR",
                    help="both sides keep sync marks' regions as PNG in DIR/WORKLOAD-LINK (the source every "
                         "mark's and the forwarded log, the target those it did not meet: migration.syncdump)")
    ap.add_argument("--no-native", dest="native", action="store_false",
                    help="skip libvirt's own live migration between two libvirt hosts (bench/bench_native.py)")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="only re-render the report and plots of an earlier run's migration.json into --out")
    args = ap.parse_args(argv)
    if args.render is not None:
        md = write_results(json.loads(args.render.read_text()), args.out, args.name)
        print(md.read_text())
        return 0
    if os.geteuid() != 0:
        print("bench_migration: needs root (network namespaces, libvirt)", file=sys.stderr)
        return EXIT_NO_NETEM
    results, no_netem = run_all(args)
    md = write_results(results, args.out, args.name)
    print(md.read_text())
    failed = failed_checks(results)
    if failed:
        print("bench_migration: CHECKS FAILED in the migrated VM:\n  " + "\n  ".join(failed), file=sys.stderr)
        return EXIT_CHECK_FAILED
    if no_netem:
        print(f"bench_migration: {NETEM_MISSING}", file=sys.stderr)
        return EXIT_NO_NETEM
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
