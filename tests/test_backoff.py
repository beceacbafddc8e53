"""The reconnect backoff (server/backoff.py): exponential, jittered, bounded by attempts and time."""

from __future__ import annotations

import random

import pytest

from server.backoff import Backoff, ReconnectPolicy

pytestmark = pytest.mark.timeout(30)


def test_backoff_grows_and_is_bounded() -> None:
    p = ReconnectPolicy(max_attempts=5, max_elapsed=10.0, initial_delay=0.1, max_delay=1.0, factor=2.0, jitter=0.0)
    b = Backoff(p, started=0.0)
    assert [b.next_delay(0.0) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, None]
    b = Backoff(p, started=0.0)
    assert b.next_delay(9.95) == pytest.approx(0.05)        # never past the time budget
    assert b.next_delay(10.0) is None
    jittered = Backoff(ReconnectPolicy(initial_delay=1.0, jitter=0.5), 0.0, random.Random(1))
    assert all(0.5 <= (jittered.next_delay(0.0) or 0) / 2**i <= 1.0 for i in range(3))
