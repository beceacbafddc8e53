"""migration.logbatch: the source's agent frames held a moment and forwarded as one stream."""

from __future__ import annotations

from migration.logbatch import LogBatch
from recorder.logformat import Key, LogDecoder, LogEncoder, LogHeader


def test_frames_are_held_until_old_or_large_or_forced() -> None:
    b = LogBatch(hold_s=0.5, max_bytes=100)
    assert not b.due(0.0, force=True)                       # nothing held
    b.add(1, b"a" * 10, now=10.0)
    b.add(2, b"b" * 10, now=10.3)
    assert not b.due(10.4) and b.due(10.4, force=True) and b.due(10.5)   # the oldest frame's age counts
    b.add(3, b"c" * 80, now=10.45)
    assert b.due(10.45)                                     # 100 bytes held
    assert b.take(1 << 20) == [(3, b"a" * 10 + b"b" * 10 + b"c" * 80)] and not b.held


def test_held_frames_decode_as_the_agent_cut_them() -> None:
    """The target's decoder reads the concatenated payloads as the agent's frames, in order, each
    payload within the session's limit and naming the last agent frame it holds (what is acked)."""
    enc = LogEncoder(LogHeader(1280, 800, "us", "ck", 1_700_000_000_000_000, "0.1.0"), frame_events=1)
    frames = [enc.start()]
    for k in range(20):
        frames += enc.add(Key(1000 * (k + 1), 38 + k % 5, k % 2 == 0))
    frames += enc.end()
    b = LogBatch()
    for fr in frames:
        b.add(fr.seq, fr.data, now=0.0)
    limit = 3 * max(len(fr.data) for fr in frames)
    out = b.take(limit)
    assert 1 < len(out) < len(frames) and all(len(d) <= limit for _, d in out) and out[-1][0] == frames[-1].seq
    whole, cut = LogDecoder(), LogDecoder()
    assert [f for _, d in out for f in whole.feed(d)] == [f for fr in frames for f in cut.feed(fr.data)]


def test_payloads_stay_within_the_limit_in_order() -> None:
    b = LogBatch()
    for seq, n in ((1, 40), (2, 40), (3, 30), (4, 90), (5, 5)):
        b.add(seq, bytes([seq]) * n, now=0.0)
    out = b.take(80)
    assert [(last, len(d)) for last, d in out] == [(2, 80), (3, 30), (4, 90), (5, 5)]   # a larger frame alone
    assert b"".join(d for _, d in out) == b"".join(bytes([s]) * n for s, n in ((1, 40), (2, 40), (3, 30), (4, 90),
                                                                              (5, 5)))


def test_by_default_nothing_waits() -> None:
    """The default holds no frame (the target's replay would start later and the suspend wait for
    it): only frames read together go as one."""
    b = LogBatch()
    b.add(1, b"x", now=5.0)
    assert b.due(5.0)
