"""The source's agent log frames held a moment and forwarded together, sans-I/O.

While the user works the recorder agent cuts a frame every ``DEFAULT_FRAME_MS`` (~50 bytes of
input each). Forwarded one by one, each costs the source's socket ~65 bytes more than its data:
its session envelope, the target's ack relayed back and the target's ``replayed``. The target's
log decoder reads the log as one byte stream, so frames held for ``hold_s`` concatenate into one
session frame (by default only frames read together: ``LOG_BATCH_S``). From the suspend on nothing
is held (the caller forces every flush).
"""

from __future__ import annotations

from dataclasses import dataclass, field

LOG_BATCH_S = 0.0
"""Longest an agent frame is held while the user works: 0, frames that come together (one read of
the recorder channel) go as one session frame and none waits. Measured on ``notes`` with 0.5 s:
131 -> 59 session log frames, 4.9 KB less on the source's socket (of 333 KB), but the target's
replay ran up to 0.5 s later, so the suspend waited 0.6 s more for it to catch up before pausing
(``catchup_s`` 0 -> 0.61 s) and its save came 0.2 s later: not worth 1.5 % of the bytes."""
LOG_BATCH_BYTES = 32 << 10
"""Held bytes that are forwarded at once, however young."""


@dataclass
class LogBatch:
    """Agent frames (seq, data) read and not yet forwarded (nor acked to the agent)."""

    hold_s: float = LOG_BATCH_S
    max_bytes: int = LOG_BATCH_BYTES
    held: list[tuple[int, bytes]] = field(default_factory=list)
    since: float = 0.0
    """When the oldest held frame came (monotonic seconds)."""

    def add(self, seq: int, data: bytes, now: float) -> None:
        if not self.held:
            self.since = now
        self.held.append((seq, data))

    def due(self, now: float, *, force: bool = False) -> bool:
        """Whether the held frames go now: forced, old or large enough (never when none is held)."""
        if not self.held:
            return False
        return force or now - self.since >= self.hold_s or sum(len(d) for _, d in self.held) >= self.max_bytes

    def take(self, limit: int) -> list[tuple[int, bytes]]:
        """Every held frame, as session payloads of at most ``limit`` bytes each (a single larger
        frame alone) in order, each with the seq of its last agent frame (what to ack)."""
        out: list[tuple[int, bytes]] = []
        held, self.held = self.held, []
        i = 0
        while i < len(held):
            j, total = i, 0
            while j < len(held) and (j == i or total + len(held[j][1]) <= limit):
                total += len(held[j][1])
                j += 1
            out.append((held[j - 1][0], b"".join(d for _, d in held[i:j])))
            i = j
        return out
