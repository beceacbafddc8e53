"""migration.guestclock: the source's timeline, its message, its bounds and the target's arithmetic."""

from __future__ import annotations

import msgpack
import pytest

from migration import guestclock as gc
from recorder.logformat import LogDecoder
from replay_migrate.errors import LogFormatError
from store.cloneclock import MAX_OFFSET_S, CloneClock

NOW = 1_800_000_000.0
"""The target host's wall clock in these tests (s since the epoch)."""


def test_the_source_timeline_is_its_logs_origin_plus_its_clones_step_on_its_hosts_clock() -> None:
    # the checkpoint's agent started at wall clock 1_700_000_000 s (its origin); the clone restored
    # 99 days later had its clock moved by 99 days and 20 ms and shows its host's + 5 ms since
    origin_us = 1_700_000_000_000_000
    clone = CloneClock.measured(before_s=-99 * 86_400 - 0.015, after_s=0.005)
    assert clone == CloneClock(99 * 86_400_000_000 + 20_000, 5_000)
    src = gc.source_clock(origin_us, clone)
    # its guest showed origin + t before the step, origin + step + t after; its host 5 ms less
    assert src.guest_wall_us(7_000_000) == origin_us + clone.step_us + 7_000_000
    assert src.zero_us == origin_us + clone.step_us - 5_000


def test_the_target_sets_its_guest_lag_behind_and_replays_lag_after_the_source() -> None:
    src = gc.SourceClock(zero_us=int((NOW - 60) * 1e6), offset_us=30_000)
    lag = 1.0
    # event t is due on this host's monotonic clock when its wall clock reads zero + t + lag
    due0 = gc.timeline_due(src, lag, now_wall_s=NOW, now_mono_s=500.0)
    assert due0 == pytest.approx(500.0 - 60 + lag)
    t_us = 61_500_000
    host_wall_at_injection = NOW + (due0 + t_us / 1e6 - 500.0)
    # the target guest's clock then: its host's plus the offset it was set to = the source guest's
    target_guest = host_wall_at_injection + gc.target_offset_s(src, lag)
    assert target_guest * 1e6 == pytest.approx(src.guest_wall_us(t_us), abs=1)


def test_the_message_round_trips_and_an_older_log_reader_refuses_it_clearly() -> None:
    src = gc.SourceClock(1_799_999_000_000_000, -12_345)
    data = gc.encode(src)
    assert gc.is_clock_message(data) and not gc.is_clock_message(b"RM\x01\x00")
    assert gc.decode(data) == src
    # an older target feeds it to its log decoder: refused, saying a newer format came
    with pytest.raises(LogFormatError, match="newer"):
        LogDecoder().feed(data)


@pytest.mark.parametrize("data", [
    b"RMC",                                                     # not the magic
    gc.MAGIC + b"\xc1",                                         # not msgpack
    gc.MAGIC + msgpack.packb([1, 2, 3]),                        # three fields
    gc.MAGIC + msgpack.packb([1.5, 2]),                         # not integers
    gc.MAGIC + msgpack.packb([True, 2]),
    gc.MAGIC + msgpack.packb({"zero_us": 1, "offset_us": 2}),
    gc.MAGIC + msgpack.packb([1, 2]) + b"x",                    # trailing bytes
    gc.MAGIC + msgpack.packb(["x" * 80, 2]),                    # longer than any clock message
])
def test_a_malformed_message_is_a_log_format_error(data: bytes) -> None:
    with pytest.raises(LogFormatError):
        gc.decode(data)


@pytest.mark.parametrize("zero_s, offset_s, problem", [
    (NOW - 3600, 0.0, None),
    (NOW - 300 * 86_400, 86_000.0, None),
    (NOW + 4.0, 0.0, None),                                    # the hosts' clocks disagree a little
    (NOW + 6.0, 0.0, "future"),
    (NOW - 401 * 86_400, 0.0, "days ago"),
    (NOW - 60, MAX_OFFSET_S + 1, "off its host"),
    (NOW - 60, -MAX_OFFSET_S - 1, "off its host"),
])
def test_a_peers_clock_is_bounded(zero_s: float, offset_s: float, problem: str | None) -> None:
    got = gc.check(gc.SourceClock(int(zero_s * 1e6), int(offset_s * 1e6)), NOW)
    assert (got is None) if problem is None else (got is not None and problem in got)


@pytest.mark.parametrize("lag", [-0.1, gc.MAX_LAG_S + 0.1, float("nan"), float("inf")])
def test_the_lag_is_bounded(lag: float) -> None:
    with pytest.raises(ValueError):
        gc.check_lag(lag)


def test_input_gaps_pair_the_guests_clocks_in_order() -> None:
    src = gc.SourceClock(zero_us=1_000_000_000, offset_us=10_000)
    # two inputs at log times 1 s and 2 s, echoed at host wall 1001.5 and 1002.7 s by a target
    # guest set 0.49 s behind its host; its agent logged them 3 s earlier than the source's did
    inputs = [(1_000_000, 1001.5), (2_000_000, 1002.7)]
    gaps = gc.input_gaps(inputs, [-2_000_000, -1_000_000], src, target_offset=-0.49)
    assert gaps["mono"] == {"n": 2, "min": -3000.0, "median": -3000.0, "max": -3000.0}
    assert gaps["wall"] == {"n": 2, "min": 0.0, "median": 200.0, "max": 200.0}
    # an older source sent no timeline: only the monotonic gap; nothing echoed: nothing
    assert set(gc.input_gaps(inputs, [], None, 0.0)) == {"mono"} and gc.input_gaps(inputs, [], None, 0.0)["mono"] == {}


def test_the_restore_lag_is_how_much_later_the_targets_log_time_0_was_on_the_hosts_clock() -> None:
    origin_us = 1_700_000_000_000_000
    src = gc.SourceClock(zero_us=origin_us + 86_400_000_000, offset_us=0)
    # the target's guest, not yet set, shows origin + t: a day and 4.5 s behind its host
    assert gc.restore_lag_s(src, origin_us, before_s=-86_404.5) == pytest.approx(4.5)
