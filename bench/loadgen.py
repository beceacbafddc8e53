"""Load generator for the handoff service: many migrations' peers against one service URL.

Each *pair* is one session's source and target, both :class:`~server.client.SessionClient` s (the
peers' real sans-I/O core, :class:`~server.client.ClientState`, over real websockets), in one
process so that a log frame's latency is one clock's difference.  A pair does what a migration
does to the service, without VMs:

1. **handshake**: ``create_session`` with the shared token, then both roles attach;
2. **recording**: the source sends a log frame every :data:`FRAME_INTERVAL_S` (the agent cuts a
   frame every 250 ms, so a user who keeps typing makes four a second; the shipped workloads make
   3.0-3.3 while typing and ~2 on average), the payloads being the real frames of the shipped
   ``notes`` and ``shell`` workloads as the agent encodes them (~47 bytes); the target takes them;
3. **handoff**: ``end_log``, ``suspend``, a walk of four round trips of KB-sized diff messages
   (:data:`WALK_T2S`, :data:`WALK_S2T`: ~67 KiB, what ``bench/results/migration.md`` measured),
   :data:`BLOCK_BATCHES` batches of blocks (1 MiB) each acknowledged by the target, the protocol's
   end and its verdict, then ``verified``, ``resumed``, ``confirm`` and ``released``: RESUMED.

A worker process runs a share of the pairs on the schedule the driver gives it in a :class:`Plan`
(wall-clock times, shared by every worker), and writes a :class:`WorkerResult` as JSON:

    python -m bench.loadgen PLAN.json RESULT.json        # the token in $REPLAY_MIGRATE_TOKEN

The driver (:mod:`bench.bench_service`) pins the workers to one core and the service to the other.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Final, Protocol

from bench.bench_log import encode_like_agent, with_sync_marks
from bench.wspeer import LeanPeer
from recorder.agent import DEFAULT_FRAME_EVENTS, DEFAULT_FRAME_MS
from recorder.logformat import Event
from replay_migrate.errors import ReplayMigrateError
from replayer.workload import load_workload, shipped_workloads, synthesize
from server.backoff import ReconnectPolicy
from server.client import SessionClient, create_session
from server.clientcore import Event as SessionEvent
from server.clientcore import Frame, LogEnded, SessionFailedError
from server.credentials import TOKEN_ENV
from server.keyring import Credential
from server.wire import Phase, Stream

FRAME_INTERVAL_S: Final = DEFAULT_FRAME_MS / 1000
TYPING_WORKLOADS: Final = ("notes", "shell")
"""The workloads whose frames a pair sends: the ones where the user types (mixed adds long pauses)."""
WALK_T2S: Final = (512, 8192, 16384, 8192)
"""The target's walk messages (hello, two walk levels, the wanted leaves), bytes."""
WALK_S2T: Final = (2048, 16384, 16384)
"""The source's answers (its trees' shape and the first level, then two walk levels), bytes."""
BLOCK_BATCHES: Final = 4
BATCH_BYTES: Final = 256 * 1024
"""~1 MiB of blocks in four batches (the differ's batches are at most 1 MiB, ahead of acks)."""
ACK_BYTES: Final = 32
END_BYTES: Final = 64
ROOTS: Final = {"memory": b"\x11" * 32, "disk": b"\x22" * 32}
STEADY, HANDOFF, RAMP = "steady", "handoff", "ramp"
LAG_PERIOD_S: Final = 0.1
#: the peers retry a dropped connection for as long as a real one would (the load should not
#: turn a slow handshake into a failure the service did not cause)
RECONNECT: Final = ReconnectPolicy(max_attempts=30, max_elapsed=60.0, initial_delay=0.2, max_delay=2.0)


def typing_frames() -> list[bytes]:
    """The log frames of the typing workloads one after the other, as the agent frames and encodes
    them: the header frame first, then the events frames (the end-of-log frame left out: a pair's
    log ends when it suspends)."""
    paths = shipped_workloads()
    events: list[Event] = []
    for name in TYPING_WORKLOADS:
        shift = events[-1].t_us + 1_000_000 if events else 0
        events += [replace(e, t_us=e.t_us + shift) for e in synthesize(load_workload(paths[name]), seed=0)]
    encoded = encode_like_agent(with_sync_marks(events), frame_events=DEFAULT_FRAME_EVENTS,
                                frame_ms=DEFAULT_FRAME_MS, motion_window_ms=20)
    return [f.data for f in encoded[:-1]]


@dataclass(frozen=True)
class Plan:
    """One worker's share of a load step; every time is wall-clock (``time.time()``) seconds."""

    url: str
    sessions: int
    first: int                  # index of this worker's first pair (phases and seeds differ per pair)
    ramp_start: float           # pair i starts its handshake at ramp_start + i / ramp_rate
    ramp_rate: float            # this worker's handshakes per second
    steady_start: float         # latencies of frames sent in [steady_start, steady_end) are "steady"
    steady_end: float           # each pair suspends at a random moment in [steady_end, suspend_end)
    suspend_end: float
    deadline: float             # pairs not done by then count as failed ("deadline")
    seed: int = 0
    frame_interval: float = FRAME_INTERVAL_S
    blocks: int = BLOCK_BATCHES
    batch_bytes: int = BATCH_BYTES
    max_message_size: int = 2 * 1024 * 1024
    peer: str = "lean"          # or "client": SessionClient (see PAIRS)
    ack_interval: float = 0.0   # > 0 (lean peers): the target acks the log at most this often

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> Plan:
        return Plan(**json.loads(text))


@dataclass
class WorkerResult:
    """What one worker measured; the driver merges them.  Times in seconds, latencies in ms."""

    pairs: int = 0
    completed: int = 0                          # reached RESUMED with everything accounted for
    create_s: list[float] = field(default_factory=list)
    attach_s: list[float] = field(default_factory=list)
    handoff_s: list[float] = field(default_factory=list)     # suspend sent -> confirm received
    latency_ms: dict[str, list[float]] = field(default_factory=lambda: {STEADY: [], HANDOFF: [], RAMP: []})
    failures: dict[str, int] = field(default_factory=dict)
    frames_sent: int = 0
    frames_received: int = 0
    log_bytes_sent: int = 0
    log_bytes_received: int = 0
    diff_bytes_sent: int = 0
    diff_bytes_received: int = 0
    duplicates: int = 0
    reconnects: int = 0
    connected_at_steady: int = 0                # pairs attached when the steady window opened
    lag_ms: list[float] = field(default_factory=list)        # event-loop lag in the steady window
    cpu_steady_s: float = 0.0                   # this worker's CPU time in the steady window

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> WorkerResult:
        return WorkerResult(**json.loads(text))


class PairError(Exception):
    """A pair saw something a correct service never does (a lost, short or extra message)."""


def _phase(plan: Plan, wall: float) -> str:
    if plan.steady_start <= wall < plan.steady_end:
        return STEADY
    return HANDOFF if wall >= plan.steady_end else RAMP


async def _sleep_until(wall: float) -> None:
    delay = wall - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


class Peer(Protocol):
    """What a pair needs of a peer: :class:`~server.client.SessionClient` and
    :class:`~bench.wspeer.LeanPeer` both are one."""

    @property
    def duplicates(self) -> int: ...
    @property
    def reconnects(self) -> int: ...
    async def send_log(self, data: bytes) -> int: ...
    async def send_diff(self, data: bytes) -> int: ...
    async def end_log(self) -> int: ...
    async def suspend(self) -> None: ...
    async def phase(self, phase: Phase) -> None: ...
    async def verified(self, roots: Mapping[str, bytes]) -> None: ...
    async def resumed(self) -> None: ...
    async def recv(self) -> SessionEvent: ...
    async def wait_confirmed(self) -> None: ...
    async def acknowledge_confirm(self) -> None: ...
    async def wait_released(self) -> None: ...
    async def close(self) -> None: ...


class Pair:
    """One session: its source and target, the log frames in flight and what arrived.

    The recording differs by peer (:meth:`_record`); the handoff is the same message flow for both.
    """

    def __init__(self, index: int, plan: Plan, frames: Sequence[bytes], filler: bytes, result: WorkerResult) -> None:
        self.index = index
        self.plan = plan
        self.frames = frames
        self.filler = filler
        self.result = result
        self.rng = random.Random(plan.seed * 1_000_003 + index)
        self.sent_at: dict[int, tuple[float, str]] = {}     # log seq -> (monotonic send time, phase)
        self.expected = 1                                   # the next log seq the target should get
        self.connected = False
        self.src: Peer | None = None
        self.tgt: Peer | None = None

    async def _connect(self, src_cred: Credential, tgt_cred: Credential) -> tuple[Peer, Peer]:
        raise NotImplementedError

    async def _record(self, src: Peer, suspend_at: float) -> None:
        """(Source) log frames at the plan's interval until ``suspend_at``."""
        raise NotImplementedError

    async def run(self) -> None:
        plan, result = self.plan, self.result
        await _sleep_until(plan.ramp_start + (self.index - plan.first) / plan.ramp_rate)
        t0 = time.monotonic()
        src_cred, tgt_cred = await create_session(plan.url, cafile=None, open_timeout=30.0)
        t1 = time.monotonic()
        result.create_s.append(t1 - t0)
        src, tgt = self.src, self.tgt = await self._connect(src_cred, tgt_cred)
        result.attach_s.append(time.monotonic() - t1)
        self.connected = True
        suspend_at = self.rng.uniform(plan.steady_end, plan.suspend_end)

        async def source() -> None:
            await self._record(src, suspend_at)
            await self._source_handoff(src)

        # the target runs from the start: it takes the log as it comes (a failure on either side
        # ends the pair at once)
        tasks = {asyncio.create_task(source()), asyncio.create_task(self._target_handoff(tgt))}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        result.duplicates += src.duplicates + tgt.duplicates
        result.reconnects += src.reconnects + tgt.reconnects
        result.completed += 1

    async def close(self) -> None:
        for c in (self.src, self.tgt):
            if c is not None:
                await c.close()

    def _log_frame(self) -> bytes:
        """The next log frame's payload (the workloads' header frame first)."""
        k = len(self.sent_at) + self.expected - 1
        return self.frames[0] if k == 0 else self.frames[1 + (self.index * 7919 + k) % (len(self.frames) - 1)]

    def _sent(self, seq: int, data: bytes) -> None:
        self.sent_at[seq] = (time.monotonic(), _phase(self.plan, time.time()))
        self.result.frames_sent += 1
        self.result.log_bytes_sent += len(data)

    def _received(self, seq: int, data: bytes) -> None:
        if seq != self.expected:
            raise PairError(f"expected log frame {self.expected}, got {seq}")
        sent, phase = self.sent_at.pop(seq)
        self.result.latency_ms[phase].append((time.monotonic() - sent) * 1000)
        self.result.frames_received += 1
        self.result.log_bytes_received += len(data)
        self.expected += 1

    async def _log_end(self, tgt: Peer) -> None:
        """(Target) the rest of the log, then its end."""
        while True:
            ev = await tgt.recv()
            if isinstance(ev, LogEnded):
                if ev.seq != self.expected - 1:
                    raise PairError(f"log ended at {ev.seq} after frame {self.expected - 1}")
                return
            if isinstance(ev, Frame):
                if ev.stream is not Stream.LOG:
                    raise PairError(f"a {ev.stream.value} message before the log ended")
                self._received(ev.seq, ev.data)

    async def _next_diff(self, c: Peer, stream: Stream, size: int) -> None:
        while True:
            ev = await c.recv()
            if isinstance(ev, Frame):
                if ev.stream is not stream or len(ev.data) != size:
                    raise PairError(f"expected a {stream.value} message of {size} bytes, got "
                                    f"{ev.stream.value} of {len(ev.data)}")
                self.result.diff_bytes_received += size
                return

    async def _diff(self, c: Peer, size: int) -> None:
        await c.send_diff(self.filler[:size])
        self.result.diff_bytes_sent += size

    async def _source_handoff(self, src: Peer) -> None:
        plan = self.plan
        await src.end_log()
        t_suspend = time.monotonic()
        await src.suspend()
        for size_in, size_out in zip(WALK_T2S, WALK_S2T, strict=False):
            await self._next_diff(src, Stream.T2S, size_in)
            await self._diff(src, size_out)
        await self._next_diff(src, Stream.T2S, WALK_T2S[-1])        # the wanted leaves
        for _ in range(plan.blocks):
            await self._diff(src, plan.batch_bytes)
        await self._diff(src, END_BYTES)
        for _ in range(plan.blocks):
            await self._next_diff(src, Stream.T2S, ACK_BYTES)
        await self._next_diff(src, Stream.T2S, END_BYTES)          # the target's verdict
        await src.wait_confirmed()
        self.result.handoff_s.append(time.monotonic() - t_suspend)
        await src.acknowledge_confirm()

    async def _target_handoff(self, tgt: Peer) -> None:
        plan = self.plan
        await self._log_end(tgt)
        await tgt.phase(Phase.DIFFING)
        await self._diff(tgt, WALK_T2S[0])
        for size_in, size_out in zip(WALK_S2T, WALK_T2S[1:], strict=True):
            await self._next_diff(tgt, Stream.S2T, size_in)
            await self._diff(tgt, size_out)
        await tgt.phase(Phase.TRANSFERRING)
        for _ in range(plan.blocks):
            await self._next_diff(tgt, Stream.S2T, plan.batch_bytes)
            await self._diff(tgt, ACK_BYTES)
        await self._next_diff(tgt, Stream.S2T, END_BYTES)
        await self._diff(tgt, END_BYTES)
        await tgt.verified(ROOTS)
        await tgt.resumed()
        await tgt.wait_released()


class LeanPair(Pair):
    """Peers on :class:`~bench.wspeer.LeanPeer`: the source's frames leave from timer callbacks and
    reach the target's ``on_frame`` in the read callback (no task switch per frame)."""

    async def _connect(self, src_cred: Credential, tgt_cred: Credential) -> tuple[Peer, Peer]:
        size = self.plan.max_message_size
        self._lean_src = LeanPeer(self.plan.url, src_cred, max_message_size=size)
        self._lean_tgt = LeanPeer(self.plan.url, tgt_cred, max_message_size=size,
                                  on_frame=lambda f: self._received(f.seq, f.data))
        await asyncio.gather(self._lean_src.connect(), self._lean_tgt.connect())
        return self._lean_src, self._lean_tgt

    async def _record(self, src: Peer, suspend_at: float) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        interval = self.plan.frame_interval

        def tick(due: float) -> None:
            if done.done():
                return
            try:
                if time.time() >= suspend_at:
                    done.set_result(None)
                    return
                data = self._log_frame()
                self._sent(self._lean_src.write_log(data), data)
            except Exception as e:          # the peer failed: the pair fails with it
                done.set_exception(e)
                return
            nxt = max(due + interval, loop.time() - interval)      # late: no burst to catch up
            loop.call_at(nxt, tick, nxt)

        first = loop.time() + self.rng.uniform(0, interval)
        loop.call_at(first, tick, first)
        acks = self.plan.ack_interval
        if acks > 0:
            self._lean_tgt.hold = True

            def ack() -> None:
                if not done.done():
                    self._lean_tgt.flush()
                    loop.call_later(acks, ack)
            loop.call_later(self.rng.uniform(0, acks), ack)
        try:
            await done
        finally:
            self._lean_tgt.hold = False
            self._lean_tgt.flush()


class ClientPair(Pair):
    """Peers on :class:`~server.client.SessionClient`, the adapter ``record --to`` and ``follow``
    use: a task per peer, a coroutine per frame."""

    async def _connect(self, src_cred: Credential, tgt_cred: Credential) -> tuple[Peer, Peer]:
        def client(cred: Credential) -> SessionClient:
            return SessionClient(self.plan.url, cred, reconnect=RECONNECT, open_timeout=30.0,
                                 max_message_size=self.plan.max_message_size)
        src, tgt = client(src_cred), client(tgt_cred)
        await asyncio.gather(src.connect(), tgt.connect())
        return src, tgt

    async def _record(self, src: Peer, suspend_at: float) -> None:
        interval = self.plan.frame_interval
        due = time.monotonic() + self.rng.uniform(0, interval)
        while time.time() < suspend_at:
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            data = self._log_frame()
            seq = self.expected + len(self.sent_at)
            self.sent_at[seq] = (time.monotonic(), _phase(self.plan, time.time()))
            if await src.send_log(data) != seq:
                raise PairError(f"log frame {seq} got another seq")
            self.result.frames_sent += 1
            self.result.log_bytes_sent += len(data)
            due = max(due + interval, time.monotonic() - interval)


PAIRS: Final[Mapping[str, type[Pair]]] = {"lean": LeanPair, "client": ClientPair}


def _failure_key(e: BaseException) -> str:
    """The kind of a pair's failure (session ids differ per pair and are left out)."""
    if isinstance(e, SessionFailedError):
        return f"{type(e).__name__}: {e.reason.value}"
    words = [w for w in str(e).split() if not (len(w) >= 20 and w.replace("-", "").replace("_", "").isalnum())]
    return f"{type(e).__name__}: {' '.join(words)[:80]}"


async def _lag_monitor(plan: Plan, result: WorkerResult) -> None:
    """How late this process's event loop wakes up (the generator distorting what it measures)."""
    await _sleep_until(plan.steady_start)
    cpu0 = _cpu_s()
    while time.time() < plan.steady_end:
        t = time.monotonic()
        await asyncio.sleep(LAG_PERIOD_S)
        result.lag_ms.append(max(0.0, (time.monotonic() - t - LAG_PERIOD_S) * 1000))
    result.cpu_steady_s = _cpu_s() - cpu0


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run_worker(plan: Plan, frames: Sequence[bytes] | None = None) -> WorkerResult:
    """Run this worker's pairs to the end (or the deadline) and return what they measured."""
    result = WorkerResult(pairs=plan.sessions)
    frames = list(frames) if frames is not None else typing_frames()
    filler = random.Random(plan.seed).randbytes(max(plan.batch_bytes, *WALK_T2S, *WALK_S2T))
    pairs = [PAIRS[plan.peer](plan.first + i, plan, frames, filler, result) for i in range(plan.sessions)]
    failures: Counter[str] = Counter()

    async def one(p: Pair) -> None:
        try:
            await p.run()
        except (ReplayMigrateError, PairError, OSError, TimeoutError) as e:
            failures[_failure_key(e)] += 1
        finally:
            await p.close()

    async def count_connected() -> None:
        await _sleep_until(plan.steady_start)
        result.connected_at_steady = sum(p.connected for p in pairs)

    lag = asyncio.create_task(_lag_monitor(plan, result))
    counter = asyncio.create_task(count_connected())
    tasks = [asyncio.create_task(one(p)) for p in pairs]
    _done, pending = await asyncio.wait(tasks, timeout=max(0.0, plan.deadline - time.time()))
    for t in pending:
        t.cancel()
    if pending:
        failures["deadline"] += len(pending)
        await asyncio.gather(*pending, return_exceptions=True)
    for t in (lag, counter):
        t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await t
    result.failures = dict(failures)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    ap.add_argument("plan", type=Path, help="the Plan as JSON")
    ap.add_argument("out", type=Path, help="where the WorkerResult goes (JSON)")
    args = ap.parse_args(argv)
    if not os.environ.get(TOKEN_ENV):
        print(f"loadgen: ${TOKEN_ENV} must hold the service's token", file=sys.stderr)
        return 2
    plan = Plan.from_json(args.plan.read_text())
    result = asyncio.run(run_worker(plan))
    args.out.write_text(result.to_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
