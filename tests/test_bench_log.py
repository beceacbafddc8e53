"""bench.bench_log: sync marks placed where the agent places them."""

from __future__ import annotations

from bench.bench_log import with_sync_marks
from recorder.logformat import Key, Motion, SyncMark


def test_a_mark_is_placed_where_its_look_was_first_seen_and_only_without_motion_since() -> None:
    typed = [Key(0, 36, True), Key(100_000, 36, False)]
    marks = [e for e in with_sync_marks([*typed, Motion(2_000_000, 1, 1)]) if isinstance(e, SyncMark)]
    assert [(m.t_us, m.label) for m in marks] == [(400_000, "typing")]
    assert not [e for e in with_sync_marks([*typed, Motion(1_000_000, 1, 1)]) if isinstance(e, SyncMark)]
