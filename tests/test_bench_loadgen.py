"""The load generator's pairs against the real service on 127.0.0.1: every pair of either kind of
peer goes through to RESUMED with every frame and byte counted once, a pair the service refuses
is counted as a failure (not raised), and the log frames are the shipped typing workloads'."""

from __future__ import annotations

import asyncio
import time

import pytest

from bench.loadgen import HANDOFF, PAIRS, STEADY, TYPING_WORKLOADS, Plan, WorkerResult, run_worker, typing_frames
from recorder.logformat import decode_log
from server.credentials import TOKEN_ENV
from server.limits import Limits
from server.service import ServiceConfig, start_service

pytestmark = pytest.mark.timeout(60)

TOKEN = "loadgen-token"


def plan(url: str, sessions: int, peer: str, ack_interval: float = 0.0) -> Plan:
    now = time.time()
    return Plan(url=url, sessions=sessions, first=0, ramp_start=now, ramp_rate=100, steady_start=now + 0.3,
                steady_end=now + 1.3, suspend_end=now + 1.8, deadline=now + 25, frame_interval=0.05,
                blocks=2, batch_bytes=64 * 1024, peer=peer, ack_interval=ack_interval)


def run_pairs(limits: Limits, sessions: int, peer: str, ack_interval: float = 0.0) -> WorkerResult:
    async def body() -> WorkerResult:
        cfg = ServiceConfig(token=TOKEN, key=bytes(32), port=0, limits=limits, tick_interval=0.05)
        async with start_service(cfg) as url:
            return await run_worker(plan(url, sessions, peer, ack_interval))
    result: WorkerResult = asyncio.run(body())
    return result


@pytest.mark.parametrize(("peer", "ack_interval"), [*((p, 0.0) for p in sorted(PAIRS)), ("lean", 0.2)])
def test_every_pair_resumes_with_every_frame_and_byte_once(peer: str, ack_interval: float,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    r = run_pairs(Limits(), 3, peer, ack_interval)
    assert r.failures == {} and r.completed == r.pairs == 3 and r.connected_at_steady == 3
    assert r.frames_sent == r.frames_received > 3 * 10
    assert r.log_bytes_sent == r.log_bytes_received and r.diff_bytes_sent == r.diff_bytes_received > 3 * 128 * 1024
    assert r.duplicates == 0 and r.reconnects == 0
    assert len(r.create_s) == len(r.attach_s) == len(r.handoff_s) == 3
    assert r.latency_ms[STEADY] and all(v >= 0 for v in r.latency_ms[STEADY])
    assert sum(len(v) for v in r.latency_ms.values()) == r.frames_received
    assert r.lag_ms and r.cpu_steady_s > 0
    assert WorkerResult.from_json(r.to_json()) == r


def test_pairs_the_service_refuses_are_counted_as_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    r = run_pairs(Limits(max_sessions=2), 4, "lean")
    assert r.completed == 2 and sum(r.failures.values()) == 2
    [key] = r.failures
    assert "session_limit" in key            # the same failure of two pairs is one key
    assert r.frames_sent == r.frames_received


def test_the_log_frames_are_the_typing_workloads_as_the_agent_frames_them() -> None:
    frames = typing_frames()
    log = decode_log(b"".join(frames), require_end=False)      # the header frame first, then events
    assert log.events and len(frames) > 300
    sizes = sorted(len(f) for f in frames[1:])
    assert 30 <= sizes[len(sizes) // 2] <= 80    # bench/results/log.md: ~47 bytes per frame
    assert TYPING_WORKLOADS == ("notes", "shell")
    p = Plan(url="ws://x:1", sessions=1, first=0, ramp_start=0, ramp_rate=1, steady_start=1, steady_end=2,
             suspend_end=3, deadline=4)
    assert Plan.from_json(p.to_json()) == p and p.frame_interval == 0.25 and HANDOFF != STEADY


