"""store.cloneclock: a clone's clock record, read from a file as hostile input."""

from __future__ import annotations

from pathlib import Path

import pytest

from store.cloneclock import MAX_OFFSET_S, MAX_STEP_S, RECORD, CloneClock, load_record, save_record


def test_a_record_round_trips(tmp_path: Path) -> None:
    clock = CloneClock(step_us=86_400_000_123, offset_us=-4_000)
    save_record(tmp_path, clock)
    assert load_record(tmp_path) == clock


def test_the_step_cancels_the_reply_latency_both_reads_share() -> None:
    assert CloneClock.measured(-100.04, -0.04) == CloneClock(100_000_000, -40_000)


@pytest.mark.parametrize("text", [
    "",                                                       # empty
    "not json",
    "[1, 2]",
    '{"step_us": 1}',                                         # a field missing
    '{"step_us": 1, "offset_us": 2, "more": 3}',
    '{"step_us": 1.5, "offset_us": 2}',
    '{"step_us": true, "offset_us": 2}',
    f'{{"step_us": {int(MAX_STEP_S * 1e6) + 1}, "offset_us": 0}}',
    f'{{"step_us": 0, "offset_us": {int(MAX_OFFSET_S * 1e6) + 1}}}',
    '{"step_us": 1, "offset_us": 2}' + " " * 300,             # longer than any record
])
def test_anything_but_a_record_is_no_record(tmp_path: Path, text: str) -> None:
    (tmp_path / RECORD).write_text(text)
    assert load_record(tmp_path) is None


def test_no_file_is_no_record(tmp_path: Path) -> None:
    assert load_record(tmp_path) is None
