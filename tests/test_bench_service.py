"""The load test's driver: the limits it gives ``serve``, what it reads from /proc, the statistics,
the knee, the profile summary and the report; and one small step for real (a ``serve`` process
pinned to core 0, a worker process on core 1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.bench_service import (
    P99_GOAL_MS,
    Sample,
    StepConfig,
    StepResult,
    core_times,
    held_and_knee,
    merge,
    next_size,
    percentile,
    plans,
    plot,
    proc_cpu_s,
    proc_memory,
    render,
    run_step,
    service_limits,
    summarize_profile,
    window,
)
from bench.loadgen import STEADY, WorkerResult
from server.limits import Limits

pytestmark = pytest.mark.timeout(120)


def step(n: int, p99: float | None, failures: int = 0, cpu: float = 50.0, profiled: bool = False) -> StepResult:
    return StepResult(
        sessions=n, workers=1, connected=n, completed=n - failures, failures={"TransportError: x": failures}
        if failures else {}, service_cpu_pct=cpu, core0_busy_pct=cpu + 5, service_wait_pct=1.0, generator_cpu_pct=40.0,
        generator_core_busy_pct=45.0, rss_idle_mb=40.0, rss_steady_mb=40.0 + n / 100, rss_peak_mb=60.0,
        latency_p50_ms=1.0, latency_p99_ms=p99, latency_max_ms=p99, latency_handoff_p99_ms=p99, frames_steady=10 * n,
        create_p50_ms=2.0, create_p99_ms=4.0, attach_p50_ms=2.0, attach_p99_ms=5.0, handoff_p50_s=0.1,
        handoff_p99_s=0.2, lag_p99_ms=1.0, frames_sent=20 * n, frames_received=20 * n, diff_bytes_sent=n,
        diff_bytes_received=n, duplicates=0, reconnects=0, duration_s=30.0, profiled=profiled)


def test_the_limits_the_load_test_sets_hold_n_sessions_from_one_address() -> None:
    for n in (10, 1000, 5000):
        lim = service_limits(n)
        assert lim.max_sessions == n and lim.max_connections >= 2 * n
        assert lim.max_connections_per_address == lim.max_connections      # everything comes from 127.0.0.1
        assert lim.memory_budget == lim.worst_case_memory
        d = Limits()
        assert (lim.max_message_size, lim.max_buffered_bytes, lim.max_queue) == \
            (d.max_message_size, d.max_buffered_bytes, d.max_queue)


def test_proc_readings() -> None:
    assert proc_cpu_s(os.getpid()) > 0
    rss, hwm = proc_memory(os.getpid())
    assert 0 < rss <= hwm
    text = "cpu  1 2 3 4 5 6 7 8 0 0\ncpu0 10 0 5 80 5 0 0 0 0 0\ncpu1 1 1 1 1 1 1 1 1 0 0\n"
    assert core_times(0, text) == (15.0, 100.0)
    with pytest.raises(ValueError):
        core_times(2, text)
    busy, total = core_times(0)
    assert 0 <= busy <= total


def test_statistics_and_windows() -> None:
    assert percentile([], 99) is None
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    samples = [Sample(t, t, 0.0, 1, 1, 0.0, [(0.0, 1.0), (0.0, 1.0)]) for t in (1.0, 2.0, 3.0, 4.0)]
    w = window(samples, 1.5, 3.5)
    assert w is not None and (w[0].t, w[1].t) == (2.0, 3.0)
    assert window(samples, 3.5, 3.9) is None
    a = WorkerResult(pairs=2, completed=2, frames_sent=5, failures={"x": 1}, lag_ms=[1.0])
    a.latency_ms[STEADY] = [1.0, 2.0]
    b = WorkerResult(pairs=3, completed=1, frames_sent=7, failures={"x": 2, "y": 1}, lag_ms=[3.0])
    b.latency_ms[STEADY] = [3.0]
    m = merge([a, b])
    assert (m.pairs, m.completed, m.frames_sent) == (5, 3, 12) and m.failures == {"x": 3, "y": 1}
    assert m.latency_ms[STEADY] == [1.0, 2.0, 3.0] and m.lag_ms == [1.0, 3.0]


def test_the_knee_is_the_first_step_that_misses_the_goal_or_fails() -> None:
    steps = [step(10, 2.0), step(100, 3.0), step(1000, 40.0), step(1500, P99_GOAL_MS + 1), step(2200, 900.0)]
    held, knee = held_and_knee(steps)
    assert held is not None and knee is not None and (held.sessions, knee.sessions) == (1000, 1500)
    held, knee = held_and_knee([step(10, 2.0), step(100, 3.0, failures=1), step(1000, 40.0, profiled=True)])
    assert held is not None and knee is not None and (held.sessions, knee.sessions) == (10, 100)
    assert held_and_knee([step(10, 2.0)])[1] is None and held_and_knee([step(10, None)])[0] is None
    disturbed = step(1000, 500.0)
    disturbed.service_wait_pct, disturbed.discarded = 20.0, True     # measured again: the retry counts
    assert disturbed.disturbed and not step(1000, 500.0).disturbed
    held, knee = held_and_knee([step(100, 3.0), disturbed, step(1000, 40.0)])
    assert held is not None and held.sessions == 1000 and knee is None
    assert next_size(1000, 1.5) == 1500 and next_size(1500, 1.5) == 2200 and next_size(100, 1.01) == 200
    assert step(100, 3.0).cpu_per_session_pct == 0.5 and step(100, 3.0).rss_per_session_kb == pytest.approx(10.24)


def test_the_steps_are_split_over_workers_within_their_windows() -> None:
    cfg = StepConfig(1001, ramp_rate=100, steady_s=20, handoff_rate=100, min_handoff_s=5)
    ps = plans(cfg, "ws://127.0.0.1:1", 1000.0, seed=3)
    assert len(ps) == cfg.workers == 4 and sum(p.sessions for p in ps) == 1001
    assert [p.first for p in ps] == [0, 251, 501, 751]
    assert all(p.ramp_rate == 25 for p in ps)          # together: cfg.ramp_rate
    p = ps[0]
    assert p.steady_start == 1000 + 10.01 + cfg.settle_s and p.steady_end == p.steady_start + 20
    assert p.suspend_end == p.steady_end + 10.01 and p.deadline == p.suspend_end + cfg.drain_s
    assert StepConfig(10).workers == 1 and StepConfig(10).handoff_s == StepConfig(10).min_handoff_s
    assert cfg.estimate_s() > cfg.ramp_s + cfg.steady_s + cfg.handoff_s


_ROOT = 'process 1:"python";thread (0x1);main (cli/main.py:1)'
RAW = (f"{_ROOT};_run_once (asyncio/base_events.py:1);send (websockets/asyncio/connection.py:2) 30\n"
       f"{_ROOT};_run_once (asyncio/base_events.py:1);_pump_to (server/session.py:3) 10\n"
       f"{_ROOT};select (selectors.py:4) 10\n"
       "garbage line\n")


def test_the_profile_summary_groups_the_leaf_frames() -> None:
    p = summarize_profile(RAW)
    assert p["samples"] == 50
    areas = dict(p["by_area"])
    assert areas["websockets (framing, connection)"] == 30 and areas["server.session (the core)"] == 10
    assert areas["asyncio (event loop, transports)"] == 10
    assert dict(p["self"])["send (connection.py)"] == 30 and dict(p["total"])["main (main.py)"] == 50


def test_the_report_and_the_plot(tmp_path: Path) -> None:
    again = step(1000, 900.0)
    again.discarded = True
    acks = step(100, 2.0, cpu=8.0)
    acks.ack_interval = 1.0
    steps = [step(10, 2.0, cpu=1.0), step(100, 3.0, cpu=10.0), again, step(1000, 250.0, cpu=99.0),
             step(1000, 300.0, profiled=True), acks]
    meta = {"host": "test host", "date": "today", "commit": "abc", "duration_s": 12.0, "peer": "lean",
            "frames": {"count": 400, "mean_bytes": 47.0, "interval_s": 0.25}}
    text = render(meta, steps, {"sessions": 1000, **summarize_profile(RAW)})
    assert "**One instance held 100 sessions at p99 frame latency ≤ 100 ms**" in text
    assert "The knee: 1,000 sessions (p99 250.0 ms" in text and "## Profile at 1,000 sessions" in text
    assert text.count("\n| 1,000 |") == 1                # the profiled run is not a row of the table
    assert "Measured again because other processes took the service's core meanwhile: 1,000 sessions (p99 900.0" \
        in text
    assert "## What limits it" in text and "fills the core near 1,000 sessions" in text
    assert "took 8.0 % of the core instead of 10.0 % (20 % less" in text and text.count("\n| 100 |") == 1
    assert "a log frame every 250 ms" in text and "the 400 real frames" in text
    assert "With the defaults one instance holds **8 sessions**" in text and "4 from one address" in text
    plot(steps, tmp_path / "service.png")
    assert (tmp_path / "service.png").read_bytes()[:4] == b"\x89PNG"


def test_one_small_step_for_real(tmp_path: Path) -> None:
    """``serve`` and a worker as processes, pinned, sampled: every session through, numbers read."""
    if (os.cpu_count() or 1) < 2:
        pytest.fail("the load test pins the service and the load to two cores; this machine has one")
    cfg = StepConfig(4, ramp_rate=40, steady_s=1.5, min_handoff_s=1.0, start_s=1.5, settle_s=0.5, drain_s=20)
    r = run_step(cfg, tmp_path)
    assert r.failures == {} and r.connected == r.completed == 4
    assert r.ok == ((r.latency_p99_ms or 1e9) <= P99_GOAL_MS)
    assert r.frames_sent == r.frames_received > 0 and r.diff_bytes_sent == r.diff_bytes_received > 0
    assert r.service_cpu_pct is not None and r.service_wait_pct is not None
    assert r.rss_steady_mb is not None and r.rss_peak_mb >= r.rss_idle_mb > 0
    assert r.limits["max_sessions"] == 4 and list(tmp_path.iterdir()) == []          # scratch removed
