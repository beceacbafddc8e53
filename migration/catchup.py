"""The source pauses only once the target has caught up (issue 13, downtime): the way pre-copy
converges before it stops the VM.

Replay-migrate's downtime starts when the source pauses. The target then still had to replay the
events it had not reached yet, settle and freeze before its own save could start (the *target
tail*, 0.4-1.1 s on the bench's sessions). So the target tells the source how far it replayed
(the session's ``replayed``: the last log frame whose every event went through its replay), and
the source's suspend keeps the user's VM running, forwarding what the user still does, until the
target replayed every frame forwarded so far and the source's own screen settled (its flush, as
before), or until :data:`CATCHUP_TIMEOUT_S`: a target that is far behind, or never reports, only
costs what it cost before (the source pauses anyway, and the rest is replayed in the downtime).
The wait is before the pause: the user's VM runs, so it is not downtime, but it is in the
end-to-end time.

Sans-I/O: :class:`ReplayProgress` (the target's bookkeeping, frames in, events replayed, the
frame reached out) and :class:`PauseGate` (when the source may pause, for a time the caller
passes); :func:`wait_to_pause` is the loop around them that ``migration.sides`` runs.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

CATCHUP_TIMEOUT_S: Final = 10.0
"""Longest the source's suspend keeps the user's VM running (from the suspend's start, its flush
included) for the target to replay everything forwarded. On the bench's sessions the target is
0.2-0.8 s behind when the source has settled; one whose replay waits out a failed sync mark may be
up to ``replayer.replay.SYNC_SLACK_S`` (5 s) behind more. Beyond this the source pauses anyway:
the rest is replayed inside the downtime, as without the wait."""
CATCHUP_POLL_S: Final = 0.05
"""How long one read of the recorder channel waits while the source waits for the target (its
progress is checked between reads): the pause follows the target's last report within this."""


class ReplayProgress:
    """Which log frame the target's replay went through: the receiving side says how many events
    each frame brought (:meth:`arrived`), the replay thread how many events it went through
    (:meth:`went_through`, sync marks and skipped motion included); a frame is replayed once all
    its events and those of every frame before it are. Thread-safe (the two calls come from
    different threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._frames: deque[tuple[int, int]] = deque()
        """(seq, events brought by it and every frame before it) of the frames not replayed yet."""
        self._events = 0
        self._done = 0
        self.replayed = 0
        """The last frame replayed (0: none)."""

    def arrived(self, seq: int, events: int) -> bool:
        """Frame ``seq`` brought ``events`` events; True when that moved :attr:`replayed` (a frame
        with no events, after a replay that went through everything before it)."""
        with self._lock:
            self._events += events
            self._frames.append((seq, self._events))
            return self._advance()

    def went_through(self, events: int) -> bool:
        """The replay went through ``events`` events in all; True when that moved :attr:`replayed`."""
        with self._lock:
            self._done = max(self._done, events)
            return self._advance()

    def _advance(self) -> bool:
        moved = False
        while self._frames and self._frames[0][1] <= self._done:
            self.replayed = self._frames.popleft()[0]
            moved = True
        return moved


@dataclass
class PauseGate:
    """When the source may pause at suspend, for the time ``now`` the caller passes: once its screen
    settled (a sync mark after the last key or button, and at least ``min_flush_s`` since the
    suspend began) or ``flush_s`` passed since the suspend began or the last key or button
    forwarded meanwhile, *and* the target replayed every log frame forwarded; or, whatever the
    rest, ``timeout_s`` after the suspend began."""

    start: float
    flush_s: float
    min_flush_s: float
    timeout_s: float = CATCHUP_TIMEOUT_S
    _input: float = field(init=False)

    def __post_init__(self) -> None:
        self._input = self.start

    def input(self, now: float) -> None:
        """The user pressed a key or a button during the wait: its screen gets ``flush_s`` again."""
        self._input = max(self._input, now)

    def flushed(self, now: float, settled: bool) -> bool:
        """The source's own screen is done: it settled, or it had all the time it gets."""
        return (settled and now >= self.start + self.min_flush_s) or now >= self._input + self.flush_s

    def timed_out(self, now: float) -> bool:
        return now >= self.start + self.timeout_s

    def may_pause(self, now: float, *, settled: bool, sent: int, replayed: int) -> bool:
        return self.timed_out(now) or (self.flushed(now, settled) and replayed >= sent)


@dataclass(frozen=True)
class Waited:
    """How the wait ended: ``caught_up`` (the target replayed every frame forwarded) or not (the
    bound), the frames forwarded and replayed then, and the seconds it took from the suspend's start."""

    caught_up: bool
    sent: int
    replayed: int
    seconds: float


async def wait_to_pause(gate: PauseGate, forward: Callable[[], Awaitable[object]],
                        position: Callable[[], tuple[bool, int, int]], *,
                        clock: Callable[[], float] = time.monotonic,
                        on_wait: Callable[[int, int], None] | None = None) -> Waited:
    """Forward the user's input (``forward``: one read of the recorder channel, sent on) until the
    gate lets the source pause. ``position()``: (the source's screen settled, the last log frame
    forwarded, the last the target said it replayed); ``on_wait(sent, replayed)`` for the progress
    line while the target is behind."""
    while True:
        settled, sent, replayed = position()
        now = clock()
        if gate.may_pause(now, settled=settled, sent=sent, replayed=replayed):
            return Waited(replayed >= sent, sent, replayed, now - gate.start)
        if on_wait is not None and replayed < sent:
            on_wait(sent, replayed)
        await forward()
