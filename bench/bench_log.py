"""Log size benchmark: the shipped workloads as the agent would log them, raw and zstd-compressed.

Each workload is synthesised into the events a user would produce (keys with human gaps, pointer
paths at 100 Hz, see ``replayer.workload.synthesize``), sync marks are added where the agent takes
them (after a key/button burst followed by ``sync_idle_ms`` of quiet), and the stream is framed the
way the agent frames it (every ``frame_events`` events or ``frame_ms``). Reported per workload:
events before and after motion coalescing, bytes per logged event and per minute, raw and zstd
(whole log, and frame by frame as a streaming transport would compress them).

    python -m bench.bench_log [--frame-events N] [--frame-ms MS] [--motion-window-ms MS] [--level L]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace

import zstandard

from recorder.agent import (
    DEFAULT_FRAME_EVENTS,
    DEFAULT_FRAME_MS,
    DEFAULT_MOTION_WINDOW_MS,
    DEFAULT_SYNC_IDLE_MS,
)
from recorder.capture import DEFAULT_SYNC_SETTLE_MS
from recorder.logformat import (
    Button,
    EncodedFrame,
    Event,
    Key,
    LogEncoder,
    LogHeader,
    SyncMark,
    decode_log,
    region_digest,
)
from replayer.workload import load_workload, shipped_workloads, synthesize

DEFAULT_ZSTD_LEVEL = 3
HEADER = LogHeader(1280, 800, "us", "bench", 1_700_000_000_000_000, "bench")


def with_sync_marks(events: Sequence[Event], idle_ms: int = DEFAULT_SYNC_IDLE_MS,
                    settle_ms: int = DEFAULT_SYNC_SETTLE_MS) -> list[Event]:
    """Insert the sync marks the agent would take after the last key/button event of a burst
    followed by ``idle_ms`` plus ``settle_ms`` with no event at all (a still screen, and no pointer
    motion logged after the look was first seen), placed where the look was first seen
    (``idle_ms`` after that event); 64x64 around the pointer after a click, a window-sized region
    after typing."""
    out: list[Event] = []
    idle = (idle_ms + settle_ms) * 1000
    last: Event | None = None
    for i, ev in enumerate(events):
        out.append(ev)
        if isinstance(ev, Key | Button):
            last = ev
        nxt = next((e for e in events[i + 1 :] if isinstance(e, Key | Button)), None)
        if last is ev and (nxt is None or nxt.t_us - ev.t_us >= idle):
            t = ev.t_us + idle_ms * 1000
            if not (i + 1 < len(events) and events[i + 1].t_us < ev.t_us + idle):
                label = "click" if isinstance(ev, Button) else "typing"
                w, h = (64, 64) if label == "click" else (504, 732)
                out.append(SyncMark(t, 600, 300, w, h, region_digest(t.to_bytes(8, "big")), label))
    out.sort(key=lambda e: e.t_us)
    return out


def encode_like_agent(events: Sequence[Event], *, frame_events: int, frame_ms: int,
                      motion_window_ms: int) -> list[EncodedFrame]:
    enc = LogEncoder(HEADER, frame_events=frame_events, motion_window_us=motion_window_ms * 1000)
    frames = [enc.start()]
    first_pending: int | None = None
    for ev in events:
        if first_pending is not None and ev.t_us - first_pending >= frame_ms * 1000:
            frames += enc.flush()  # the agent's timer fired before this event came
            first_pending = None
        frames += enc.add(ev)
        if enc.pending == 0:
            first_pending = None
        elif first_pending is None:
            first_pending = ev.t_us
    frames += enc.end()
    return frames


@dataclass
class Row:
    name: str
    minutes: float
    synth_events: int
    logged_events: int
    frames: int
    raw: int
    zstd: int
    zstd_frames: int

    def cells(self) -> list[str]:
        def per_ev(n: int) -> str:
            return f"{n / self.logged_events:.2f}"

        def per_min(n: int) -> str:
            return f"{n / self.minutes:,.0f}"

        return [self.name, f"{self.minutes * 60:.0f}", str(self.synth_events), str(self.logged_events),
                str(self.frames), f"{self.raw:,}", per_ev(self.raw), per_min(self.raw), f"{self.zstd:,}",
                per_ev(self.zstd), per_min(self.zstd), per_ev(self.zstd_frames), per_min(self.zstd_frames)]


COLUMNS = ["workload", "s", "events (synth)", "events (logged)", "frames", "raw B", "raw B/ev", "raw B/min",
           "zstd B", "zstd B/ev", "zstd B/min", "zstd/frame B/ev", "zstd/frame B/min"]


def measure(name: str, events: Sequence[Event], *, frame_events: int, frame_ms: int, motion_window_ms: int,
            level: int) -> Row:
    marked = with_sync_marks(events)
    frames = encode_like_agent(marked, frame_events=frame_events, frame_ms=frame_ms,
                               motion_window_ms=motion_window_ms)
    data = b"".join(f.data for f in frames)
    log = decode_log(data)
    cctx = zstandard.ZstdCompressor(level=level)
    minutes = max(log.events[-1].t_us / 60e6, 1e-9)
    return Row(name, minutes, len(events), len(log.events), len(frames), len(data), len(cctx.compress(data)),
               sum(len(cctx.compress(f.data)) for f in frames))


def table(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_log", description=__doc__.split("\n")[0])
    ap.add_argument("--frame-events", type=int, default=DEFAULT_FRAME_EVENTS)
    ap.add_argument("--frame-ms", type=int, default=DEFAULT_FRAME_MS)
    ap.add_argument("--motion-window-ms", type=int, default=DEFAULT_MOTION_WINDOW_MS)
    ap.add_argument("--level", type=int, default=DEFAULT_ZSTD_LEVEL, help="zstd level")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows = []
    everything: list[Event] = []
    for name, path in shipped_workloads().items():
        events = synthesize(load_workload(path), seed=args.seed)
        rows.append(measure(name, events, frame_events=args.frame_events, frame_ms=args.frame_ms,
                            motion_window_ms=args.motion_window_ms, level=args.level))
        shift = everything[-1].t_us + 1_000_000 if everything else 0
        everything += [replace(e, t_us=e.t_us + shift) for e in events]
    rows.append(measure("all workloads", everything, frame_events=args.frame_events, frame_ms=args.frame_ms,
                        motion_window_ms=args.motion_window_ms, level=args.level))
    print(f"Input log size (frames every {args.frame_events} events or {args.frame_ms} ms, motion window "
          f"{args.motion_window_ms} ms, zstd level {args.level}, seed {args.seed})\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
