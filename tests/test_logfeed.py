"""replayer.logfeed: the one pump from log bytes to events, and its adapters (chunks, a growing file,
the hand-off from a session reader to a replay thread). Time is a manual clock; no test sleeps."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from recorder.logformat import Button, End, Event, Key, LogDecoder, LogHeader, Motion, decode_log, encode_log
from replay_migrate.errors import LogFormatError
from replayer.clock import ManualClock
from replayer.logfeed import EventFeed, LogPump, events_from_chunks, file_chunks

HEADER = LogHeader(1280, 800, "us", "ck", 0, "test")
EVENTS: list[Event] = [Key(10, 38, True), Key(20, 38, False), Motion(30, 5, 6), Button(40, 1, True)]
WHOLE = encode_log(HEADER, [*EVENTS, End(50)])
UNENDED = encode_log(HEADER, EVENTS, end=False)
"""A migration's log as the source's agent writes it: whole frames, no end-of-log event."""


def test_events_from_chunks_any_split() -> None:
    for size in (1, 7, 64, len(WHOLE)):
        headers: list[LogHeader] = []
        got = list(events_from_chunks((WHOLE[i:i + size] for i in range(0, len(WHOLE), size)),
                                      on_header=headers.append))
        assert got == [*EVENTS, End(50)] and headers == [HEADER]


def test_events_from_chunks_notices_a_cut_log() -> None:
    with pytest.raises(LogFormatError, match="truncated"):
        list(events_from_chunks([WHOLE[:-3]]))
    assert list(events_from_chunks([UNENDED])) == EVENTS            # a recording the user stopped
    with pytest.raises(LogFormatError, match="no end-of-log"):
        list(events_from_chunks([UNENDED], require_end=True))


class _GrowingClock(ManualClock):
    """Appends the rest of the log the first time the reader waits for more: deterministic."""

    def __init__(self, path: Path, rest: bytes) -> None:
        super().__init__()
        self.path, self.rest = path, rest

    def sleep(self, seconds: float) -> None:
        if self.rest:
            with open(self.path, "ab") as f:
                f.write(self.rest)
            self.rest = b""
        super().sleep(seconds)


def test_file_chunks_follows_a_growing_file(tmp_path: Path) -> None:
    p = tmp_path / "log"
    p.write_bytes(WHOLE[:10])
    clock = _GrowingClock(p, WHOLE[10:])
    got = list(events_from_chunks(file_chunks(p, follow=True, idle_timeout_s=5, clock=clock)))
    assert got == [*EVENTS, End(50)] and clock.waits == [0.05]


def test_file_chunks_gives_up_on_a_file_that_stops_growing(tmp_path: Path) -> None:
    p = tmp_path / "log"
    p.write_bytes(UNENDED)
    clock = ManualClock()
    with pytest.raises(LogFormatError, match="no end-of-log"):
        list(events_from_chunks(file_chunks(p, follow=True, idle_timeout_s=1.0, clock=clock), require_end=True))
    assert 1.0 < clock.now() <= 1.1


def test_the_pump_counts_and_ends() -> None:
    pump = LogPump()
    assert pump.feed(UNENDED[:5]) == [] and pump.header is None
    assert pump.feed(UNENDED[5:]) == EVENTS and pump.events == 4 and pump.header == HEADER
    end = pump.end_frame()
    assert pump.feed(end) == [End(40)] and pump.ended
    pump.finish()
    assert decode_log(UNENDED + end).events == (*EVENTS, End(40))
    with pytest.raises(LogFormatError, match="after the end"):
        pump.feed(end)


def _replay_thread(feed: EventFeed) -> tuple[threading.Thread, list[Event]]:
    got: list[Event] = []
    t = threading.Thread(target=lambda: got.extend(feed), daemon=True)
    t.start()
    return t, got


@pytest.mark.timeout(30)
def test_the_feed_hands_a_whole_log_to_the_replay_thread() -> None:
    feed = EventFeed()
    t, got = _replay_thread(feed)
    end = LogDecoder()
    end.feed(UNENDED)
    for i in range(0, len(UNENDED), 5):
        feed.put(UNENDED[i:i + 5])
    feed.put(end.end_frame())
    feed.end()
    t.join(20)
    assert not t.is_alive() and got == [*EVENTS, End(40)]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("log, why", [
    (UNENDED, "no end-of-log"),               # the source ended the log, its end never came
    (WHOLE[:-3], "truncated"),                # cut in the middle of a frame
    (b"", "empty log"),
])
def test_a_log_the_sender_ended_short_is_refused_and_the_replay_stops(log: bytes, why: str) -> None:
    """Issue 11 finding 4: the migration target's feed never closed its decoder, so a log that the
    source ended short was replayed as if whole. Now ``end`` raises in the receiver (the target then
    fails and removes its clone), and ``close`` in its cleanup stops the replay thread."""
    feed = EventFeed()
    t, got = _replay_thread(feed)
    feed.put(log)
    with pytest.raises(LogFormatError, match=why):
        feed.end()
    feed.close()
    t.join(20)
    assert not t.is_alive() and End(50) not in got


@pytest.mark.timeout(30)
def test_closing_the_feed_stops_the_replay_thread_at_once() -> None:
    feed = EventFeed()
    t, got = _replay_thread(feed)
    feed.put(UNENDED[:40])
    feed.close()
    feed.close()
    t.join(20)
    assert not t.is_alive() and got == LogPump().feed(UNENDED[:40])


def test_data_after_the_end_is_refused() -> None:
    feed = EventFeed()
    feed.put(WHOLE)
    with pytest.raises(LogFormatError, match="after the end"):
        feed.put(WHOLE[:20])
