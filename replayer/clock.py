"""The time the replayer schedules by, passed in rather than read from the global ``time``.

A replay waits on time in three ways: it reads the time (to keep the recorded gaps), it sleeps (a
growing log file is polled), and it waits for an event with a timeout (a gap or a sync-mark poll
that :meth:`Replayer.stop` must be able to cut short). :class:`Clock` is those three;
:class:`MonotonicClock` is the real one (the default everywhere) and :class:`ManualClock` one that
moves only when something waits on it, so a schedule can be checked exactly, at once, without
patching ``time`` (trio's ``MockClock`` is the model).
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale (only differences mean anything)."""
        ...

    def sleep(self, seconds: float) -> None:
        """Let ``seconds`` pass."""
        ...

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Wait until ``event`` is set or ``timeout`` seconds passed; whether it is set."""
        ...


class MonotonicClock:
    """The host's monotonic clock: ``time.monotonic``, ``time.sleep``, ``Event.wait``."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))

    def wait(self, event: threading.Event, timeout: float) -> bool:
        return event.wait(max(0.0, timeout))


REAL_CLOCK = MonotonicClock()


class ManualClock:
    """A clock that moves only when it is waited on: ``sleep(s)`` and an unset event's
    ``wait(e, s)`` advance it by ``s`` at once (a set event returns at once, leaving it). Every
    advance is kept in :attr:`waits`, so a test sees the exact schedule. ``advance`` moves it for
    work that takes time (an echo under TCG). One thread at a time."""

    def __init__(self, start: float = 0.0) -> None:
        self.t = start
        self.waits: list[float] = []

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += max(0.0, seconds)

    def sleep(self, seconds: float) -> None:
        self.waits.append(max(0.0, seconds))
        self.advance(seconds)

    def wait(self, event: threading.Event, timeout: float) -> bool:
        if event.is_set():
            return True
        self.sleep(timeout)
        return event.is_set()
