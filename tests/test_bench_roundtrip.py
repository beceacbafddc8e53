"""bench.roundtrip: the pieces that need no VM (the round trip itself runs in tests/test_fromdomain.py)."""

from __future__ import annotations

import pytest

from bench.roundtrip import RoundTrip, join_logs, table
from recorder.logformat import Key, LogDecoder, LogEncoder, LogHeader


def test_two_migrations_logs_join_into_the_log_since_the_first_checkpoint() -> None:
    """As the sources send them: the agent records on across both migrations; each source forwards
    the header and the frames after its checkpoint's cut, then ends the log with a frame of its own
    numbered next (the first frame the agent makes at B has that number)."""
    enc = LogEncoder(LogHeader(1280, 800, "us", "ck", 1_700_000_000_000_000, "0.1.0"), frame_events=1)
    header = enc.start().data
    first = [f.data for i in range(3) for f in enc.add(Key(10 + i, 38, True))]
    relay = LogDecoder()
    for data in (header, *first):
        relay.feed(data)
    first_end = relay.end_frame()
    second = [f.data for i in range(2) for f in enc.add(Key(30 + i, 38, False))]
    relay = LogDecoder(resume_at=4, origin_us=1_700_000_000_000_000)     # the next checkpoint's cut
    for data in (header, *second):
        relay.feed(data)
    second_end = relay.end_frame()
    joined = join_logs([header, *first, first_end], [header, *second, second_end])
    assert joined == [header, *first, *second, second_end]
    dec = LogDecoder()
    frames = [f for data in joined for f in dec.feed(data)]
    assert dec.ended and len(frames) == 1 + 3 + 2 + 1


def test_a_log_without_its_end_is_refused() -> None:
    with pytest.raises(ValueError):
        join_logs([b"h"], [b"h", b"e"])


def test_the_table_says_both_ways_back() -> None:
    text = table(RoundTrip(there=300_000, back=40_000, back_against_first=200_000, next_checkpoint="ck-x",
                           seconds=12.0))
    assert "| 40000 |" in text and "| 200000 |" in text and "0.20 times" in text and "ck-x" in text
