"""How hard a session client tries to get back to the service, sans-I/O (the caller passes ``now``)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class ReconnectPolicy:
    """How hard a client tries to (re)connect before giving up with TransportError.  ``max_elapsed``
    stays below the service's default ``idle_timeout`` (120 s) so the session is still there."""

    max_attempts: int = 30
    max_elapsed: float = 90.0
    initial_delay: float = 0.05
    max_delay: float = 5.0
    factor: float = 2.0
    jitter: float = 0.2      # each delay is shortened by up to this fraction, so peers do not march in step


class Backoff:
    """Exponential backoff with jitter, bounded by attempts and by elapsed time."""

    def __init__(self, policy: ReconnectPolicy, started: float, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.started = started
        self.attempts = 0
        self._rng = rng if rng is not None else random.Random()

    def next_delay(self, now: float) -> float | None:
        """Seconds to wait before the next attempt, or None when the budget is spent."""
        p = self.policy
        left = p.max_elapsed - (now - self.started)
        if self.attempts >= p.max_attempts or left <= 0:
            return None
        delay = min(p.max_delay, p.initial_delay * p.factor ** self.attempts)
        delay *= 1.0 - p.jitter * self._rng.random()
        self.attempts += 1
        return max(0.0, min(delay, left))

