"""`make loadtest`: how many sessions one ``replay-migrate serve`` holds on this machine, and why not more.

    python -m bench.bench_service [--steps 10,100,1000] [--budget-s 540] [--out bench/results]

Each *step* starts a fresh ``replay-migrate serve`` on loopback, pinned to core 0
(``sched_setaffinity``, what ``taskset -c 0`` does), with the limits :func:`service_limits` sets for
N sessions, and the load generator (:mod:`bench.loadgen`) in several processes pinned to core 1.
N pairs of peers ramp up (handshakes at ``--ramp-rate``), stream log frames at a typist's rate
through a *steady* window in which the service's CPU and RSS are read from ``/proc`` and frame
latency (source send → target receive) is taken, then suspend at random moments of a *handoff*
window and go through a walk and 1 MiB of blocks to RESUMED.  After 10, 100 and 1,000 sessions the
steps grow by ``--growth`` until one breaks (p99 frame latency above 100 ms, or any failure) or the
next would not fit ``--budget-s``; a last run at the knee is profiled with py-spy.  Writes
``service.md``, ``service.json`` and ``service.png`` to ``--out``.

The generator must not be what is measured: it runs on its own core, and every step reports the
share of that core it took, its event loop's lag, and how busy the service's core was besides the
service (other processes on this shared machine).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final

from bench.loadgen import FRAME_INTERVAL_S, HANDOFF, PAIRS, STEADY, Plan, WorkerResult, typing_frames
from bench.tables import md_table
from server.credentials import TOKEN_ENV
from server.limits import Limits, MiB

REPO: Final = Path(__file__).resolve().parent.parent
SERVICE_CPU: Final = 0
GENERATOR_CPU: Final = 1
P99_GOAL_MS: Final = 100.0
DEFAULT_STEPS: Final = (10, 100, 1000)
DEFAULT_BUDGET_S: Final = 540.0
"""`make loadtest` must end within 10 minutes: the sweep stops before a step would pass this."""
SAMPLE_S: Final = 0.5
DISTURBED_WAIT_PCT: Final = 3.0
"""A step in which the service waited for its core longer than this share of the time is run again."""
QUIET_BUSY_PCT: Final = 25.0
"""Before a step, the cores should be at most this busy with other work (a shared machine)."""
WORKER_START_S: Final = 3.0
"""Time the worker processes get to start (imports, the workloads' frames) before the ramp."""
SETTLE_S: Final = 3.0
"""Between the last handshake and the steady window."""
DRAIN_S: Final = 60.0
"""A pair not at RESUMED this long after the handoff window ended has failed."""
SESSIONS_PER_WORKER: Final = 250
MAX_WORKERS: Final = 4


def service_limits(n: int) -> Limits:
    """The limits the load test gives ``serve`` for ``n`` sessions: ``max_sessions`` n, room for
    both peers of each and the creations in flight, all from one address (127.0.0.1), and the
    ``memory_budget`` their worst case needs; every other limit keeps its default."""
    connections = 2 * n + max(16, n // 4)
    loose = Limits(max_sessions=n, max_connections=connections, max_connections_per_address=connections,
                   memory_budget=1 << 62)
    return replace(loose, memory_budget=loose.worst_case_memory)


# ---- /proc ------------------------------------------------------------------------------------------
_TICK: Final = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (``/proc/PID/stat`` fields 14 and 15)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def proc_memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, bytes."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) * 1024
    return found.get("VmRSS", 0), found.get("VmHWM", 0)


def core_times(cpu: int, stat_text: str | None = None) -> tuple[float, float]:
    """(busy, total) jiffies of one core from ``/proc/stat`` (idle and iowait are not busy)."""
    text = stat_text if stat_text is not None else Path("/proc/stat").read_text()
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == f"cpu{cpu}":
            values = [int(v) for v in parts[1:]]
            total = float(sum(values[:8]))          # guest time is already in user
            return total - values[3] - values[4], total
    raise ValueError(f"no cpu{cpu} in /proc/stat")


@dataclass
class Sample:
    t: float                    # wall clock
    service_cpu_s: float
    service_wait_s: float       # runnable, waiting for its core
    rss: int
    hwm: int
    generator_cpu_s: float
    cores: list[tuple[float, float]]


class Sampler:
    """Reads the service's and the workers' CPU and memory every SAMPLE_S in a thread."""

    def __init__(self, service_pid: int, worker_pids: Sequence[int]) -> None:
        self.service_pid = service_pid
        self.worker_pids = list(worker_pids)
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._worker_cpu = dict.fromkeys(self.worker_pids, 0.0)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                self.samples.append(self.take())
            self._stop.wait(SAMPLE_S)

    def take(self) -> Sample:
        for pid in self.worker_pids:        # a finished worker keeps what it had used
            with contextlib.suppress(OSError):
                self._worker_cpu[pid] = proc_cpu_s(pid)
        stat_text = Path("/proc/stat").read_text()
        rss, hwm = proc_memory(self.service_pid)
        return Sample(time.time(), proc_cpu_s(self.service_pid), proc_wait_s(self.service_pid), rss, hwm,
                      sum(self._worker_cpu.values()),
                      [core_times(c, stat_text) for c in (SERVICE_CPU, GENERATOR_CPU)])


def wait_for_quiet(max_wait_s: float, busy_pct: float = QUIET_BUSY_PCT, log: IO[str] = sys.stderr) -> float:
    """Wait (at most ``max_wait_s``) until both cores were less than ``busy_pct`` busy over a second:
    other processes on this shared machine would take the service's or the generator's core.
    Returns the seconds waited."""
    started = time.monotonic()
    while True:
        before = [core_times(c) for c in (SERVICE_CPU, GENERATOR_CPU)]
        time.sleep(1.0)
        after = [core_times(c) for c in (SERVICE_CPU, GENERATOR_CPU)]
        busy = [100 * (b[0] - a[0]) / max(1.0, b[1] - a[1]) for a, b in zip(before, after, strict=True)]
        waited = time.monotonic() - started
        if max(busy) < busy_pct or waited >= max_wait_s:
            if waited > 1.5:
                print(f"  waited {waited:.0f} s for the cores to quieten (now {busy[0]:.0f} % / {busy[1]:.0f} % busy)",
                      file=log, flush=True)
            return waited


def window(samples: Sequence[Sample], start: float, end: float) -> tuple[Sample, Sample] | None:
    """The first sample at or after ``start`` and the last at or before ``end``."""
    inside = [s for s in samples if start <= s.t <= end]
    return (inside[0], inside[-1]) if len(inside) >= 2 else None


# ---- statistics -----------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (nearest rank), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def merge(results: Sequence[WorkerResult]) -> WorkerResult:
    out = WorkerResult()
    failures: Counter[str] = Counter()
    for r in results:
        for name, value in asdict(r).items():
            if isinstance(value, list):
                getattr(out, name).extend(value)
            elif isinstance(value, int | float) and name != "failures":
                setattr(out, name, getattr(out, name) + value)
        for phase, values in r.latency_ms.items():
            out.latency_ms.setdefault(phase, []).extend(values)
        failures.update(r.failures)
    out.failures = dict(failures)
    return out


@dataclass
class StepResult:
    """One step's numbers (what the table, the plot and ``service.json`` show)."""

    sessions: int
    workers: int
    connected: int
    completed: int
    failures: dict[str, int]
    service_cpu_pct: float | None          # of one core, steady window
    core0_busy_pct: float | None           # the service's core, everything on it
    service_wait_pct: float | None         # of the time, the service was runnable but not running
    generator_cpu_pct: float | None        # the workers, of their core
    generator_core_busy_pct: float | None
    rss_idle_mb: float
    rss_steady_mb: float | None
    rss_peak_mb: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    latency_max_ms: float | None
    latency_handoff_p99_ms: float | None
    frames_steady: int
    create_p50_ms: float | None
    create_p99_ms: float | None
    attach_p50_ms: float | None
    attach_p99_ms: float | None
    handoff_p50_s: float | None
    handoff_p99_s: float | None
    lag_p99_ms: float | None
    frames_sent: int
    frames_received: int
    diff_bytes_sent: int
    diff_bytes_received: int
    duplicates: int
    reconnects: int
    duration_s: float
    profiled: bool = False
    discarded: bool = False                # disturbed by other work, and measured again
    ack_interval: float = 0.0              # > 0: an experiment (targets' log acks coalesced), not a sweep step
    limits: dict[str, Any] = field(default_factory=dict)

    @property
    def in_sweep(self) -> bool:
        """A step of the table (not a profiled run, a disturbed run measured again or an experiment)."""
        return not (self.profiled or self.discarded or self.ack_interval > 0)

    @property
    def disturbed(self) -> bool:
        """Other processes kept the service from its core for a noticeable share of the window."""
        return self.service_wait_pct is not None and self.service_wait_pct > DISTURBED_WAIT_PCT

    @property
    def ok(self) -> bool:
        """Every session held, through to RESUMED, nothing lost, and p99 within the goal."""
        return (not self.failures and self.completed == self.sessions and self.connected == self.sessions
                and self.latency_p99_ms is not None and self.latency_p99_ms <= P99_GOAL_MS)

    @property
    def cpu_per_session_pct(self) -> float | None:
        return None if self.service_cpu_pct is None else self.service_cpu_pct / self.sessions

    @property
    def rss_per_session_kb(self) -> float | None:
        if self.rss_steady_mb is None:
            return None
        return (self.rss_steady_mb - self.rss_idle_mb) * 1024 / self.sessions


def _pct(a: Sample, b: Sample, what: str) -> float:
    dt = b.t - a.t
    return 100 * (getattr(b, what) - getattr(a, what)) / dt if dt > 0 else 0.0


def _core_pct(a: Sample, b: Sample, i: int) -> float:
    busy = b.cores[i][0] - a.cores[i][0]
    total = b.cores[i][1] - a.cores[i][1]
    return 100 * busy / total if total > 0 else 0.0


def summarize(n: int, workers: int, merged: WorkerResult, samples: Sequence[Sample], plan: Plan, idle_rss: int,
              duration_s: float, limits: Limits, profiled: bool = False, ack_interval: float = 0.0) -> StepResult:
    w = window(samples, plan.steady_start, plan.steady_end)
    ms = 1000.0
    lat = merged.latency_ms.get(STEADY, [])

    def scaled(values: Sequence[float], q: float, k: float) -> float | None:
        p = percentile(values, q)
        return None if p is None else p * k

    return StepResult(
        sessions=n, workers=workers, connected=merged.connected_at_steady, completed=merged.completed,
        failures=merged.failures,
        service_cpu_pct=_pct(w[0], w[1], "service_cpu_s") if w else None,
        core0_busy_pct=_core_pct(w[0], w[1], 0) if w else None,
        service_wait_pct=_pct(w[0], w[1], "service_wait_s") if w else None,
        generator_cpu_pct=_pct(w[0], w[1], "generator_cpu_s") if w else None,
        generator_core_busy_pct=_core_pct(w[0], w[1], 1) if w else None,
        rss_idle_mb=idle_rss / MiB, rss_steady_mb=w[1].rss / MiB if w else None,
        rss_peak_mb=max((s.hwm for s in samples), default=idle_rss) / MiB,
        latency_p50_ms=percentile(lat, 50), latency_p99_ms=percentile(lat, 99), latency_max_ms=max(lat, default=None),
        latency_handoff_p99_ms=percentile(merged.latency_ms.get(HANDOFF, []), 99), frames_steady=len(lat),
        create_p50_ms=scaled(merged.create_s, 50, ms), create_p99_ms=scaled(merged.create_s, 99, ms),
        attach_p50_ms=scaled(merged.attach_s, 50, ms), attach_p99_ms=scaled(merged.attach_s, 99, ms),
        handoff_p50_s=percentile(merged.handoff_s, 50), handoff_p99_s=percentile(merged.handoff_s, 99),
        lag_p99_ms=percentile(merged.lag_ms, 99), frames_sent=merged.frames_sent,
        frames_received=merged.frames_received, diff_bytes_sent=merged.diff_bytes_sent,
        diff_bytes_received=merged.diff_bytes_received, duplicates=merged.duplicates, reconnects=merged.reconnects,
        duration_s=duration_s, profiled=profiled, ack_interval=ack_interval, limits=_limit_args(limits))


# ---- one step -------------------------------------------------------------------------------------
_LIMIT_FLAGS: Final = ("max_sessions", "max_connections", "max_connections_per_address", "memory_budget")


def _limit_args(limits: Limits) -> dict[str, Any]:
    """The limits the load test sets (the rest are ``serve``'s defaults)."""
    return {name: getattr(limits, name) for name in _LIMIT_FLAGS}


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _pin(pid: int, cpu: int, nice: int = 0) -> None:
    """Run ``pid`` on ``cpu`` only; with ``nice`` < 0 (root), ahead of the machine's other work.
    The process must lead its own session (``start_new_session``): with autogroup scheduling the
    kernel shares a core between sessions first, so only its session's nice counts against others."""
    os.sched_setaffinity(pid, {cpu})
    if nice:
        with contextlib.suppress(PermissionError):
            os.setpriority(os.PRIO_PROCESS, pid, nice)
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/autogroup").write_text(str(nice))


def proc_wait_s(pid: int) -> float:
    """Seconds ``pid`` spent runnable but waiting for a CPU (``/proc/PID/schedstat``): other work
    on its core delaying it."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9


class Service:
    """``replay-migrate serve`` as a child process on an ephemeral loopback port, pinned to a core."""

    def __init__(self, work: Path, limits: Limits, token: str, cpu: int = SERVICE_CPU, nice: int = 0) -> None:
        self.key_file = work / "service.key"
        argv = [sys.executable, "-m", "cli.main", "serve", "--listen", "127.0.0.1:0", "--key-file", str(self.key_file)]
        for name, value in _limit_args(limits).items():
            argv += [f"--{name.replace('_', '-')}", str(value)]
        self.stderr = (work / "serve.stderr").open("w")
        self.proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, TOKEN_ENV: token, "PYTHONPATH": str(REPO)},
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, preexec_fn=_raise_nofile,
                                     start_new_session=True)
        _pin(self.proc.pid, cpu, nice)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("serving on "):
            self.stop()
            raise RuntimeError(f"serve did not start: {line!r}; see {work / 'serve.stderr'}")
        self.url = line.split()[-1]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.stderr.close()


@dataclass(frozen=True)
class StepConfig:
    sessions: int
    ramp_rate: float = 100.0            # new sessions (3 handshakes each) per second, all workers together
    peer: str = "lean"                  # the generator's peers (bench.loadgen.PAIRS)
    ack_interval: float = 0.0           # > 0: lean targets ack the log at most this often (an experiment)
    nice: int = 0                       # < 0 (root): the service and the generator ahead of other work
    steady_s: float = 20.0
    handoff_rate: float = 100.0         # the handoff window is long enough for this many per second
    min_handoff_s: float = 10.0
    profile_s: float = 0.0              # > 0: py-spy records the service this long in the steady window
    start_s: float = WORKER_START_S
    settle_s: float = SETTLE_S
    drain_s: float = DRAIN_S

    @property
    def workers(self) -> int:
        return max(1, min(MAX_WORKERS, -(-self.sessions // SESSIONS_PER_WORKER)))

    @property
    def ramp_s(self) -> float:
        return self.sessions / self.ramp_rate

    @property
    def handoff_s(self) -> float:
        return max(self.min_handoff_s, self.sessions / self.handoff_rate)

    def estimate_s(self) -> float:
        """What the step should take (for the time budget): its windows and some margin."""
        return self.start_s + self.ramp_s + self.settle_s + self.steady_s + self.handoff_s + 10.0


def plans(cfg: StepConfig, url: str, t0: float, seed: int) -> list[Plan]:
    """Split ``cfg.sessions`` over the workers; every worker ramps its share at once."""
    steady_start = t0 + cfg.ramp_s + cfg.settle_s
    steady_end = steady_start + cfg.steady_s
    suspend_end = steady_end + cfg.handoff_s
    share, extra = divmod(cfg.sessions, cfg.workers)
    out, first = [], 0
    for i in range(cfg.workers):
        n = share + (i < extra)
        out.append(Plan(url=url, sessions=n, first=first, ramp_start=t0, ramp_rate=cfg.ramp_rate / cfg.workers,
                        steady_start=steady_start, steady_end=steady_end, suspend_end=suspend_end,
                        deadline=suspend_end + cfg.drain_s, seed=seed, peer=cfg.peer,
                        ack_interval=cfg.ack_interval))
        first += n
    return out


def run_step(cfg: StepConfig, work_root: Path, *, seed: int = 0, profile_out: Path | None = None,
             log: IO[str] = sys.stderr) -> StepResult:
    """One service, ``cfg.sessions`` pairs, every window; returns the step's numbers."""
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f"step-{cfg.sessions}-", dir=work_root))
    token = secrets.token_urlsafe(24)
    limits = service_limits(cfg.sessions)
    service = Service(work, limits, token, nice=cfg.nice)
    workers: list[subprocess.Popen[bytes]] = []
    profiler: subprocess.Popen[bytes] | None = None
    try:
        idle_rss = proc_memory(service.pid)[0]
        t0 = time.time() + cfg.start_s
        step_plans = plans(cfg, service.url, t0, seed)
        env = {**os.environ, TOKEN_ENV: token, "PYTHONPATH": str(REPO)}
        for i, plan in enumerate(step_plans):
            (work / f"plan{i}.json").write_text(plan.to_json())
            w = subprocess.Popen([sys.executable, "-m", "bench.loadgen", str(work / f"plan{i}.json"),
                                  str(work / f"result{i}.json")], cwd=REPO, env=env, preexec_fn=_raise_nofile,
                                 start_new_session=True,
                                 stdout=(work / f"worker{i}.out").open("wb"), stderr=subprocess.STDOUT)
            _pin(w.pid, GENERATOR_CPU, cfg.nice)
            workers.append(w)
        plan = step_plans[0]
        print(f"  {cfg.sessions} sessions, {cfg.workers} workers: ramp {cfg.ramp_s:.1f} s, steady "
              f"{cfg.steady_s:.0f} s, handoffs over {cfg.handoff_s:.0f} s", file=log, flush=True)
        with Sampler(service.pid, [w.pid for w in workers]) as sampler:
            if cfg.profile_s > 0 and profile_out is not None:
                _sleep_until(plan.steady_start + 1.0)
                profiler = _py_spy(service.pid, cfg.profile_s, profile_out, cfg.nice)
            for w in workers:
                w.wait(timeout=max(1.0, plan.deadline - time.time() + 30))
        bad = [i for i, w in enumerate(workers) if w.returncode != 0]
        if bad:
            tail = (work / f"worker{bad[0]}.out").read_text()[-2000:]
            raise RuntimeError(f"load worker {bad[0]} exited {workers[bad[0]].returncode}:\n{tail}")
        merged = merge([WorkerResult.from_json((work / f"result{i}.json").read_text()) for i in range(len(workers))])
        if profiler is not None:
            profiler.wait(timeout=cfg.profile_s + 30)
        return summarize(cfg.sessions, cfg.workers, merged, sampler.samples, plan, idle_rss,
                         time.monotonic() - started, limits, profiled=profiler is not None,
                         ack_interval=cfg.ack_interval)
    finally:
        for p in [*workers, *([profiler] if profiler is not None else [])]:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        service.stop()
        shutil.rmtree(work, ignore_errors=True)


def _sleep_until(wall: float) -> None:
    delay = wall - time.time()
    if delay > 0:
        time.sleep(delay)


def _py_spy(pid: int, seconds: float, out: Path, nice: int = 0) -> subprocess.Popen[bytes]:
    """py-spy sampling the service without pausing it, on the generator's core."""
    exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if exe is None:
        raise RuntimeError("py-spy is missing: pip install py-spy (it is in the dev extras)")
    p = subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", str(round(seconds)), "--rate", "100",
                          "--nonblocking", "--format", "raw", "--output", str(out)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _pin(p.pid, GENERATOR_CPU, nice)
    return p


# ---- the profile ------------------------------------------------------------------------------------
def _frame_parts(frame: str) -> tuple[str, str]:
    """``function (path:line)`` → (function, path)."""
    name, _, rest = frame.partition(" (")
    return name.strip(), rest.rsplit(":", 1)[0]


def _area(path: str) -> str:
    """Which part of the stack a file belongs to, for the profile's summary."""
    p = "/" + path.replace("\\", "/")
    for key, label in (("/websockets/", "websockets (framing, connection)"),
                       ("/asyncio/", "asyncio (event loop, transports)"),
                       ("/selectors.py", "asyncio (event loop, transports)"),
                       ("/socket.py", "asyncio (event loop, transports)"),
                       ("/contextlib.py", "contextlib (websockets' send context)"),
                       ("/msgpack/", "msgpack"), ("/logging/", "logging"), ("/ssl.py", "ssl"),
                       ("/server/session", "server.session (the core)"), ("/server/service", "server.service"),
                       ("/server/", "server (other)")):
        if key in p:
            return label
    return "other" if path else "native / idle"


def summarize_profile(raw: str, top: int = 15) -> dict[str, Any]:
    """py-spy's ``--format raw`` (``frame;frame;... count`` lines, root first) → samples by area of
    the leaf frame, and the functions with the most self and total samples."""
    total = 0
    by_area: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        if frames and frames[0].startswith("process "):
            frames = frames[1:]
        if frames and frames[0].startswith("thread "):
            frames = frames[1:]
        total += count
        if not frames:
            by_area["native / idle"] += count
            continue
        leaf_name, leaf_path = _frame_parts(frames[-1])
        by_area[_area(leaf_path)] += count
        own[f"{leaf_name} ({Path(leaf_path).name})"] += count
        for f in {(_frame_parts(f)[0], Path(_frame_parts(f)[1]).name) for f in frames}:
            inclusive[f"{f[0]} ({f[1]})"] += count
    return {"samples": total, "by_area": by_area.most_common(), "self": own.most_common(top),
            "total": inclusive.most_common(top)}


# ---- the sweep and the report ----------------------------------------------------------------------
def held_and_knee(steps: Sequence[StepResult]) -> tuple[StepResult | None, StepResult | None]:
    """The largest step that passed (every session through, p99 ≤ goal) below the first that did
    not (the knee), by number of sessions."""
    held, knee = None, None
    for s in sorted(steps, key=lambda s: s.sessions):
        if not s.in_sweep:
            continue
        if s.ok and knee is None:
            held = s
        elif knee is None:
            knee = s
    return held, knee


def next_size(last: int, growth: float) -> int:
    """The next step's sessions: ``growth`` times the last, rounded to hundreds."""
    return max(last + 100, round(last * growth / 100) * 100)


def sweep(steps: Sequence[int], budget_s: float, growth: float, work_root: Path, *, profile: bool,
          step_kw: Mapping[str, Any], quiet_wait_s: float = 0.0, ack_experiment: float = 0.0,
          log: IO[str] = sys.stderr) -> tuple[list[StepResult], dict[str, Any] | None]:
    """The fixed steps, then growing ones until one breaks or the budget would be spent; then a
    profiled run at the knee (or the largest step), and a step halfway between the last held and
    the knee, each if it still fits."""
    started = time.monotonic()
    results: list[StepResult] = []

    def left() -> float:
        return budget_s - (time.monotonic() - started)

    def measure(n: int) -> StepResult | None:
        """One step; run once more when other processes took the service's core meanwhile."""
        first: StepResult | None = None
        cfg = StepConfig(n, **step_kw)
        for _attempt in (1, 2):
            if (results or first is not None) and cfg.estimate_s() > left():
                print(f"  {n} sessions would not fit the time budget: stop", file=log)
                return first
            if quiet_wait_s > 0:
                wait_for_quiet(min(quiet_wait_s, max(0.0, left() - cfg.estimate_s())), log=log)
            if first is not None:
                first.discarded = True
                print("  the service waited for its core: other work disturbed the step, once more", file=log)
            r = run_step(cfg, work_root, log=log)
            results.append(r)
            print(f"  -> p50 {_num(r.latency_p50_ms)} ms p99 {_num(r.latency_p99_ms)} ms, service CPU "
                  f"{_num(r.service_cpu_pct)} % (waited {_num(r.service_wait_pct)} %), RSS {_num(r.rss_steady_mb)} MB, "
                  f"failures {sum(r.failures.values())}, {r.duration_s:.0f} s", file=log, flush=True)
            if r.ok or not r.disturbed or first is not None:
                return r
            first = r
        return first

    queue = list(steps)
    while queue:
        r = measure(queue.pop(0))
        if r is None or not r.ok:
            break
        if not queue:
            queue.append(next_size(r.sessions, growth))
    prof = None
    _held, knee = held_and_knee(results)
    target = knee or (results[-1] if results else None)
    if profile and target is not None:
        # shorter windows: only the profile of the steady state counts here
        cfg = StepConfig(target.sessions, **{**step_kw, "steady_s": 10.0, "profile_s": 8.0, "handoff_rate": 400.0})
        if cfg.estimate_s() <= left():
            print(f"  profiling the service at {target.sessions} sessions", file=log)
            raw_path = work_root / "profile.txt"
            r = run_step(cfg, work_root, profile_out=raw_path, log=log)
            results.append(r)
            if raw_path.exists():
                prof = {"sessions": target.sessions, **summarize_profile(raw_path.read_text())}
        else:
            print("  no time left to profile", file=log)
    held, knee = held_and_knee(results)
    if held is not None and knee is not None and knee.sessions - held.sessions > 200:
        measure(round((held.sessions + knee.sessions) / 200) * 100)      # halfway, once, if it fits
    held, _knee = held_and_knee(results)
    if ack_experiment > 0 and held is not None:
        cfg = StepConfig(held.sessions, **{**step_kw, "ack_interval": ack_experiment})
        if cfg.estimate_s() <= left():
            print(f"  {held.sessions} sessions again, the targets acking the log every {ack_experiment:g} s", file=log)
            results.append(run_step(cfg, work_root, log=log))
    return results, prof


def _num(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def render(meta: Mapping[str, Any], steps: Sequence[StepResult], profile: Mapping[str, Any] | None) -> str:
    """``service.md``: the table, the knee and what limits it, the profile."""
    sweep_steps = sorted((s for s in steps if s.in_sweep), key=lambda s: s.sessions)
    again = [s for s in steps if s.discarded]
    held, knee = held_and_knee(steps)
    rows = []
    for s in sweep_steps:
        fails = sum(s.failures.values())
        rows.append([
            f"{s.sessions:,}", f"{s.connected:,} / {s.completed:,}", _num(s.latency_p50_ms), _num(s.latency_p99_ms),
            _num(s.latency_max_ms, 0), _num(s.latency_handoff_p99_ms), _num(s.service_cpu_pct),
            _num(s.cpu_per_session_pct, 3), _num(s.rss_steady_mb), _num(s.rss_per_session_kb),
            f"{_num(s.create_p50_ms)} / {_num(s.create_p99_ms)}", f"{_num(s.attach_p50_ms)} / {_num(s.attach_p99_ms)}",
            f"{_num(s.handoff_p50_s, 2)} / {_num(s.handoff_p99_s, 2)}", str(fails),
            f"{_num(s.generator_cpu_pct, 0)} / {_num(s.lag_p99_ms)}",
            f"{_num(s.core0_busy_pct, 0)} / {_num(s.service_wait_pct)}"])
    headers = ["sessions", "held / resumed", "frame p50 ms", "frame p99 ms", "max ms", "p99 in handoffs ms",
               "service CPU % (1 core)", "CPU % per session", "RSS MB", "RSS KB per session",
               "create p50 / p99 ms", "attach p50 / p99 ms", "handoff p50 / p99 s", "failures",
               "generator CPU % / lag p99 ms", "core 0 busy % / service waited %"]
    out = [f"# The handoff service under load\n\n`make loadtest` (`python -m bench.bench_service`) on {meta['host']}, "
           f"{meta['date']}, commit {meta['commit']}; {meta['duration_s']:.0f} s in all.\n"]
    out.append(md_table(headers, rows))
    out.append("\n![latency, CPU and RSS against sessions](service.png)\n")
    if held is not None:
        out.append(f"\n**One instance held {held.sessions:,} sessions at p99 frame latency ≤ {P99_GOAL_MS:.0f} ms** "
                   f"(p99 {_num(held.latency_p99_ms)} ms, service {_num(held.service_cpu_pct)} % of one core, "
                   f"RSS {_num(held.rss_steady_mb)} MB: {_num(held.cpu_per_session_pct, 3)} % of a core and "
                   f"{_num(held.rss_per_session_kb)} KB per session).")
    if knee is not None:
        reasons = []
        if knee.latency_p99_ms is not None and knee.latency_p99_ms > P99_GOAL_MS:
            reasons.append(f"p99 {_num(knee.latency_p99_ms)} ms")
        if knee.failures:
            reasons.append("failures: " + ", ".join(f"{v} x {k}" for k, v in sorted(knee.failures.items())))
        if knee.connected < knee.sessions or knee.completed < knee.sessions:
            reasons.append(f"{knee.connected:,} held, {knee.completed:,} resumed")
        out.append(f" The knee: {knee.sessions:,} sessions ({'; '.join(reasons)}; service "
                   f"{_num(knee.service_cpu_pct)} % of its core).\n")
    else:
        out.append(" No step broke within the time budget.\n")
    if again:
        out.append("\nMeasured again because other processes took the service's core meanwhile: " + "; ".join(
            f"{s.sessions:,} sessions (p99 {_num(s.latency_p99_ms)} ms, the service waited "
            f"{_num(s.service_wait_pct)} % of the time)" for s in again) + ".\n")
    out.append(_limits(held, knee, profile, steps))
    out.append(_method(meta, sweep_steps))
    if profile is not None:
        out.append(f"\n## Profile at {profile['sessions']:,} sessions (py-spy, 100 Hz, {profile['samples']:,} "
                   "samples of the service's main thread)\n\n")
        total = max(1, profile["samples"])
        out.append(md_table(["where the time goes (leaf frame)", "share"],
                            [[a, f"{100 * c / total:.1f} %"] for a, c in profile["by_area"]]))
        out.append("\n")
        out.append(md_table(["function (self)", "share"],
                            [[f, f"{100 * c / total:.1f} %"] for f, c in profile["self"]]))
        out.append("\n")
        out.append(md_table(["function (total)", "share"],
                            [[f, f"{100 * c / total:.1f} %"] for f, c in profile["total"]]))
    return "".join(out)


def _limits(held: StepResult | None, knee: StepResult | None, profile: Mapping[str, Any] | None,
            steps: Sequence[StepResult]) -> str:
    """What limits one instance, from the knee's CPU, the per-session cost and the profile."""
    out = ["\n## What limits it\n\n"]
    if held is not None and held.cpu_per_session_pct:
        out.append(f"The service is one asyncio thread, so one core: each recording session cost "
                   f"{held.cpu_per_session_pct:.3f} % of it at {held.sessions:,} sessions (four log frames and "
                   f"four acks in, as many out, per second), which fills the core near "
                   f"{100 / held.cpu_per_session_pct:,.0f} sessions. ")
    if knee is not None:
        out.append(f"At the knee it was {_num(knee.service_cpu_pct)} % busy: frames queue behind each other in "
                   f"its event loop (p50 {_num(knee.latency_p50_ms)} ms, p99 {_num(knee.latency_p99_ms)} ms), "
                   f"handshakes wait (create p99 {_num(knee.create_p99_ms)} ms) and handoffs stretch (p99 "
                   f"{_num(knee.handoff_p99_s, 1)} s) while the generator still had room on its core "
                   f"({_num(knee.generator_cpu_pct, 0)} %). ")
    if profile is not None and profile.get("samples"):
        areas: dict[str, int] = dict(profile["by_area"])
        total = float(profile["samples"])

        def share(*names: str) -> float:
            return 100.0 * sum(areas.get(n, 0) for n in names) / total
        libs = share("websockets (framing, connection)", "asyncio (event loop, transports)",
                     "contextlib (websockets' send context)")
        ours = share("server.session (the core)", "server.service", "server (other)")
        # the profiled run is at the knee as the sweep first found it; the halfway step may move the knee below it
        out.append(f"The profile at {profile['sessions']:,} sessions puts {libs:.0f} % of the service's time in "
                   "websockets' framing and "
                   f"connection and the asyncio event loop and transports, per message, and {ours:.0f} % in the "
                   f"service's own code (the session core and the adapter; msgpack {share('msgpack'):.1f} %): no "
                   "cheap fix in the service's code moves the knee much. ")
    out.append("What moves it: more instances (one per core, behind the proxy: `bench/haproxy.cfg`), fewer "
               "messages per frame, or a leaner transport under the service (websockets' sans-I/O protocol on a plain "
               "asyncio protocol, as `bench/wspeer.py` does for the generator at ~0.7x `SessionClient`'s cost per "
               "frame).\n")
    for exp in (s for s in steps if s.ack_interval > 0):
        base = next((s for s in steps if s.in_sweep and s.sessions == exp.sessions), None)
        if base is None or exp.service_cpu_pct is None or base.service_cpu_pct is None:
            continue
        out.append(f"\nFewer messages, measured: the same {exp.sessions:,} sessions with the targets acknowledging the "
                   f"log at most every {exp.ack_interval:g} s (`--ack-interval-s`; `SessionClient` acks every frame at "
                   f"a typist's rate, so half of what the service relays while sessions record are acks) took "
                   f"{_num(exp.service_cpu_pct)} % of the core instead of {_num(base.service_cpu_pct)} % "
                   f"({100 * (1 - exp.service_cpu_pct / base.service_cpu_pct):.0f} % less; p99 "
                   f"{_num(exp.latency_p99_ms)} ms).\n")
    return "".join(out)


def _method(meta: Mapping[str, Any], steps: Sequence[StepResult]) -> str:
    """How the numbers were taken, the limits set, and what the defaults hold."""
    d = Limits()
    lines = ["\n## How\n\n"]
    frames = meta.get("frames")
    if frames:
        lines.append(
            f"Each session is a source and a target ({meta.get('peer', 'lean')} peers, see `bench/loadgen.py`) on "
            f"their own websockets. The source sends a log frame every {frames['interval_s'] * 1000:.0f} ms (a user "
            f"who keeps typing: the agent cuts a frame every 250 ms; the shipped workloads make 3.0-3.3 frames/s "
            f"while typing, ~2 on average), cycling through the {frames['count']} real frames of the `notes` and "
            f"`shell` workloads as the agent encodes them ({frames['mean_bytes']:.0f} bytes on average, "
            "`bench/results/log.md`). Sessions start at the ramp rate, then a steady window gives the frame "
            "latency (source send → target receive, one process's clock) and the service's CPU and RSS "
            "(`/proc`); then each session suspends at a random moment of the handoff window and goes through a walk "
            "of four round trips (~67 KiB) and 1 MiB of blocks in four batches to RESUMED (handoff = suspend → "
            "confirm). *p99 in handoffs* is the frame latency of the sessions still recording meanwhile.\n\n")
    ratio = ""
    busiest = max((x for x in steps if x.service_cpu_pct and x.generator_cpu_pct and x.ok),
                  key=lambda x: x.sessions, default=None)
    if busiest is not None and busiest.service_cpu_pct and busiest.generator_cpu_pct:
        ratio = (f" (at {busiest.sessions:,} sessions the generator took "
                 f"{busiest.generator_cpu_pct / busiest.service_cpu_pct:.1f}x the service's CPU)")
    lines.append(
        "The service runs alone on core 0 (`sched_setaffinity`, as `taskset -c 0`), the generator's processes "
        "on core 1; *generator CPU %* is their share of core 1 and *lag* how late their event loops woke "
        "(a generator that falls behind shows there first). The generator's peers are lean (websockets' sans-I/O "
        "protocol and the client's `ClientState` on a plain asyncio protocol, `bench/wspeer.py`): they put the "
        f"same messages on the wire as `SessionClient` (tested) for about what the service spends per frame{ratio}; "
        "`SessionClient` pairs (`--peer client`) cost 1.3-1.4x the lean ones and would saturate core 1 before the "
        "service saturates core 0. *core 0 busy %* is everything on the "
        "service's core (above the service's own share: other processes of this shared machine, and the kernel's "
        "loopback work), *service waited %* the time the service was runnable but another process had its core "
        f"(`/proc/PID/schedstat`). The service and the generator ran at nice {meta.get('nice', 0)}, ahead of other "
        "work on the machine.\n\n")
    if steps:
        lim = steps[-1].limits
        lines.append(
            "Limits set by the load test for N sessions: `--max-sessions N`, `--max-connections` and "
            "`--max-connections-per-address` 2N + max(16, N/4) (every connection comes from 127.0.0.1), "
            f"`--memory-budget` the worst case of those limits ({lim.get('memory_budget', 0) / 2**30:.1f} GiB at "
            f"{steps[-1].sessions:,} sessions); the rest are the defaults.\n\n")
    lines.append(
        f"With the defaults one instance holds **{d.max_sessions} sessions** (`--max-sessions`), "
        f"{d.max_connections_per_address // 2} from one address (`--max-connections-per-address` "
        f"{d.max_connections_per_address}: behind a proxy, every session comes from the proxy's address), in a "
        f"worst case of {d.worst_case_memory / MiB:.0f} MiB of its {d.memory_budget / MiB:.0f} MiB budget; the worst "
        f"case per session at the default sizes is {(3 * d.max_buffered_bytes + 2 * d.connection_memory) / MiB:.1f} "
        "MiB.\n")
    return "".join(lines)


def plot(steps: Sequence[StepResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = sorted((x for x in steps if x.in_sweep), key=lambda x: x.sessions)
    if not s:
        return
    n = [x.sessions for x in s]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    ax1.plot(n, [x.latency_p50_ms for x in s], "o-", label="frame latency p50")
    ax1.plot(n, [x.latency_p99_ms for x in s], "s-", label="frame latency p99")
    ax1.axhline(P99_GOAL_MS, color="grey", linestyle="--", linewidth=1, label=f"{P99_GOAL_MS:.0f} ms")
    ax1.set_yscale("log")
    ax1.set_ylabel("ms (source send → target receive)")
    cpu = ax1.twinx()
    cpu.plot(n, [x.service_cpu_pct for x in s], "^:", color="tab:red", label="service CPU % of a core")
    cpu.set_ylabel("service CPU %", color="tab:red")
    cpu.set_ylim(0, 110)
    lines = ax1.get_legend_handles_labels()[0] + cpu.get_legend_handles_labels()[0]
    ax1.legend(lines, [str(line.get_label()) for line in lines], loc="upper left", fontsize=8)
    ax2.plot(n, [x.rss_steady_mb for x in s], "o-", label="service RSS (steady)")
    ax2.plot(n, [x.rss_peak_mb for x in s], "s--", label="service RSS peak (with handoffs)")
    ax2.set_ylabel("MB")
    ax2.set_xlabel("concurrent sessions (one instance, one core)")
    ax2.set_xscale("log")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _host() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (f"{os.cpu_count()} x {model}, Linux {platform.release()}, Python {platform.python_version()}, "
            f"websockets {importlib.metadata.version('websockets')}")


@contextlib.contextmanager
def _work_dir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="rm-loadtest-") as d:
        yield Path(d)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_service", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default=",".join(map(str, DEFAULT_STEPS)),
                    help="sessions per step before the sweep grows on its own (default: %(default)s)")
    ap.add_argument("--growth", type=float, default=1.5, help="factor between steps after the fixed ones")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="stop before a step would pass this")
    ap.add_argument("--steady-s", type=float, default=20.0)
    ap.add_argument("--ramp-rate", type=float, default=100.0, help="new sessions per second while ramping up")
    ap.add_argument("--peer", choices=sorted(PAIRS), default="lean",
                    help="the generator's peers: lean (bench.wspeer) or client (SessionClient); default %(default)s")
    ap.add_argument("--ack-interval-s", type=float, default=0.0,
                    help="the targets ack the log at most this often instead of per frame as SessionClient does "
                         "(lean peers only; an experiment)")
    ap.add_argument("--ack-experiment-s", type=float, default=1.0,
                    help="after the sweep, the largest held step again with --ack-interval-s this (0: no)")
    ap.add_argument("--nice", type=int, default=-20,
                    help="niceness of the service and the generator (root; < 0 keeps other work on a shared machine "
                         "from taking their cores); default %(default)s")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--quiet-wait-s", type=float, default=10.0,
                    help="before each step, wait up to this long for other processes to leave the cores")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = ap.parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        print("bench_service: needs two cores (one for the service, one for the load)", file=sys.stderr)
        return 2
    steps = [int(s) for s in args.steps.split(",") if s]
    started = time.monotonic()
    frames = typing_frames()        # fail here, not in a worker, if the workloads do not load
    with _work_dir(args.work) as work:
        results, prof = sweep(steps, args.budget_s, args.growth, work, profile=not args.no_profile,
                              quiet_wait_s=args.quiet_wait_s, ack_experiment=args.ack_experiment_s,
                              step_kw={"steady_s": args.steady_s, "ramp_rate": args.ramp_rate, "peer": args.peer,
                                       "ack_interval": args.ack_interval_s, "nice": args.nice})
    meta = {"host": _host(), "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "commit": _git_commit(),
            "duration_s": time.monotonic() - started, "defaults": _limit_args(Limits()), "peer": args.peer,
            "ack_interval_s": args.ack_interval_s, "nice": args.nice if os.geteuid() == 0 else 0,
            "frames": {"count": len(frames), "mean_bytes": sum(map(len, frames)) / len(frames),
                       "interval_s": FRAME_INTERVAL_S},
            "loadavg_end": Path("/proc/loadavg").read_text().split()[:3]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "service.json").write_text(json.dumps(
        {"meta": meta, "steps": [asdict(s) for s in results], "profile": prof}, indent=1) + "\n")
    plot(results, args.out / "service.png")
    (args.out / "service.md").write_text(render(meta, results, prof))
    print(render(meta, results, prof))
    held, _knee = held_and_knee(results)
    return 0 if held is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
