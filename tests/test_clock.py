"""replayer.clock: the real clock and the manual one the replay's tests schedule by."""

from __future__ import annotations

import threading

from replayer.clock import REAL_CLOCK, Clock, ManualClock, MonotonicClock


def test_the_manual_clock_moves_only_when_waited_on() -> None:
    clock = ManualClock(10.0)
    assert clock.now() == 10.0
    clock.sleep(0.5)
    clock.advance(0.25)                  # work that takes time is not a wait
    clock.sleep(-1)                      # a deadline already passed: no wait, no going back
    assert clock.now() == 10.75 and clock.waits == [0.5, 0.0]


def test_a_set_event_ends_a_manual_wait_at_once() -> None:
    clock = ManualClock()
    event = threading.Event()
    assert clock.wait(event, 2.0) is False and clock.now() == 2.0
    event.set()
    assert clock.wait(event, 2.0) is True and clock.now() == 2.0 and clock.waits == [2.0]


def test_the_real_clock() -> None:
    event = threading.Event()
    event.set()
    t0 = REAL_CLOCK.now()
    assert REAL_CLOCK.wait(event, 30) is True          # set: returns at once
    REAL_CLOCK.sleep(-1)
    assert 0 <= REAL_CLOCK.now() - t0 < 5
    clocks: list[Clock] = [MonotonicClock(), ManualClock()]     # both are Clocks (mypy checks)
    assert len(clocks) == 2
