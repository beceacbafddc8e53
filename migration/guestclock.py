"""The target's guest clock on the source's timeline (issue 13, item 5): sans-I/O arithmetic,
bounds and the one message that carries the source's timeline.

Why: every clone's wall clock is set to its host's when it starts (``store.checkpoint.start_clone``),
but the target replays each input later than the source saw it, so what its guest derives from the
wall clock at an input (time stamps of files, prompts, ``ls -la``) is the source's plus that lag.

The scale both guests share: the recorder agent times events in µs since its origin
(``LogHeader.clock_origin_us``: the guest's wall clock when the agent started, while the checkpoint
was built). A clone restored from the checkpoint goes on with the checkpoint's monotonic clock, so
log time ``t`` is one scale in both clones. Until ``start_clone`` steps it, a clone of a checkpoint
booted from the image (``ORIGIN_IMAGE``: nothing steps the clock between the agent's start and the
save) shows the wall clock ``origin + t``; the step is measured around the set
(``store.cloneclock.CloneClock``). So the source guest's wall clock at log time ``t`` is
``origin + step + t``, and its host's wall clock then is that minus the guest's offset to it.

What travels (:class:`SourceClock`, in the log stream right after the header, :func:`encode` /
:func:`decode`): ``zero_us``, the source host's wall clock (µs since the epoch) at log time 0, and
``offset_us``, the source guest's wall clock minus its host's. A target that follows the source's
timeline (:attr:`GuestClock.SOURCE`) replays event ``t`` at host time ``zero_us + t + lag``
(``Replayer.timeline``: a constant lag instead of "as soon as it arrives") and sets its guest's
clock once, before the first event, to its host's plus ``offset_us - lag``: its guest's wall clock
at each input it replays on time is then the source guest's at that input, to the precision of the
two hosts' clocks agreeing and of the guest agent's round trips (tens of ms under TCG).

The guests' *monotonic* clocks differ by a constant then: ``lag`` minus how much later the target's
clone was restored than the source's. Making that 0 would take restoring the target's clone paused
and resuming it exactly ``lag`` after the source's clone resumed: possible only when both start
together, never for a source that has run for hours (a guest's monotonic clock cannot be moved
forward, only held back by pausing it).

Every value from the peer is bounded (:func:`check`): a source clock outside the bounds is ignored
(logged) and the target replays and sets its clock as an older target does. A source that sends
nothing of this (an older one) leaves the target as it was: host clock, replay as events arrive.
An older target cannot read the message (its log decoder refuses it: "format version 67 is
newer"): a source sends it only when asked (``SourceSide.send_clock``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack

from replay_migrate.errors import LogFormatError
from store.cloneclock import MAX_OFFSET_S, CloneClock

MAGIC = b"RMCK"
"""The message's first bytes: a log frame's magic (``RM``) with a version byte no log reader knows
(``C`` = 67), so an older target refuses it with a clear error instead of misreading it."""
MAX_MESSAGE_BYTES = 64
"""Largest clock message (two msgpack integers and the magic take at most 22 bytes)."""

DEFAULT_LAG_S = 1.0
"""The target's replay lag behind the source on the source's timeline: more than the log takes to
arrive (the agent cuts a frame within 250 ms, the source polls its channel every 200 ms), so that
events are on time; the target's tail at suspend is at most this minus the source's flush."""
MAX_LAG_S = 10.0
"""Largest lag a target may be configured with (every second of it is downtime at the end)."""
MAX_HOST_SKEW_S = 5.0
"""How far the two hosts' wall clocks may disagree (NTP keeps them within milliseconds): the
source's log time 0 may be at most this far in the target host's future, and no replayed event
waits longer than its recorded gap plus the lag plus this."""
MAX_TIMELINE_AGE_S = 400 * 86_400.0
"""How far in the past the source's log time 0 may be (its clone has run since: days, not years)."""


class GuestClock(enum.Enum):
    """How the target sets its clone's wall clock and schedules the replay."""

    HOST = "host"
    """The host's clock at start, events replayed as they arrive (as before issue 13)."""
    SOURCE = "source"
    """The source guest's timeline, when the source sends it (else as HOST)."""
    MONOTONIC = "monotonic"
    """As SOURCE, with the lag the target's clone was restored after the source's (at least the
    configured one, at most ``MAX_LAG_S``): both guests' monotonic clocks agree at every input too,
    and every second of that lag is downtime at the end (a measurement, not for use)."""


@dataclass(frozen=True)
class SourceClock:
    """The source's timeline: its host's wall clock at log time 0 and its guest's offset (µs)."""

    zero_us: int
    offset_us: int

    def guest_wall_us(self, t_us: int) -> int:
        """The source guest's wall clock at log time ``t_us``."""
        return self.zero_us + t_us + self.offset_us


def source_clock(origin_us: int, clone: CloneClock) -> SourceClock:
    """The source's timeline from its log's clock origin and its clone's record (its guest showed
    ``origin + t`` before the step, ``origin + step + t`` after, i.e. its host ``... - offset``)."""
    return SourceClock(origin_us + clone.step_us - clone.offset_us, clone.offset_us)


def encode(clock: SourceClock) -> bytes:
    return MAGIC + bytes(msgpack.packb([clock.zero_us, clock.offset_us]))


def is_clock_message(data: bytes | bytearray | memoryview) -> bool:
    """Whether a log-stream message is a clock message (not a log frame)."""
    return bytes(data[: len(MAGIC)]) == MAGIC


def decode(data: bytes | bytearray | memoryview) -> SourceClock:
    """The clock message's content (LogFormatError if malformed). Not yet bounded: :func:`check`."""
    if not is_clock_message(data):
        raise LogFormatError("not a clock message")
    if len(data) > MAX_MESSAGE_BYTES:
        raise LogFormatError(f"clock message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        obj = msgpack.unpackb(bytes(data[len(MAGIC):]), raw=False)
    except Exception as e:  # msgpack raises many types
        raise LogFormatError(f"clock message is not valid msgpack ({type(e).__name__})") from None
    if (type(obj) is not list or len(obj) != 2 or not all(type(v) is int for v in obj)):
        raise LogFormatError("clock message is not two integers")
    return SourceClock(obj[0], obj[1])


def check(clock: SourceClock, now_wall_s: float) -> str | None:
    """What is out of bounds in a peer's clock against this host's wall clock now, or None."""
    if abs(clock.offset_us) > MAX_OFFSET_S * 1e6:
        return f"its guest clock is {clock.offset_us / 1e6:.0f} s off its host's (more than {MAX_OFFSET_S:.0f} s)"
    ahead = clock.zero_us / 1e6 - now_wall_s
    if ahead > MAX_HOST_SKEW_S:
        return f"its log starts {ahead:.1f} s in this host's future (more than {MAX_HOST_SKEW_S:.0f} s)"
    if -ahead > MAX_TIMELINE_AGE_S:
        return f"its log started {-ahead / 86400:.0f} days ago (more than {MAX_TIMELINE_AGE_S / 86400:.0f})"
    return None


def check_lag(lag_s: float) -> float:
    if not (math.isfinite(lag_s) and 0.0 <= lag_s <= MAX_LAG_S):
        raise ValueError(f"the replay lag must be in 0..{MAX_LAG_S:.0f} s, not {lag_s!r}")
    return lag_s


def restore_lag_s(clock: SourceClock, origin_us: int, before_s: float) -> float:
    """How much later the target's clone was restored than the source's (s), from its log's clock
    origin and its guest's offset to the host before its clock was set (its wall clock was then
    ``origin + t``, so its log time 0 was at host time ``origin - before``)."""
    return (origin_us - before_s * 1e6 - clock.zero_us) / 1e6


def target_offset_s(clock: SourceClock, lag_s: float) -> float:
    """What to set the target guest's wall clock to, minus its host's: the source guest's offset,
    ``lag_s`` back (it replays each input that much after the source's host saw it)."""
    return clock.offset_us / 1e6 - lag_s


def timeline_due(clock: SourceClock, lag_s: float, now_wall_s: float, now_mono_s: float) -> float:
    """When log time 0 is due on this host's monotonic clock (``Replayer.timeline``), from one
    reading of its wall and monotonic clocks."""
    return now_mono_s + (clock.zero_us / 1e6 + lag_s - now_wall_s)


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)
    return {"n": len(v), "min": round(v[0], 1), "median": round(v[len(v) // 2], 1), "max": round(v[-1], 1)}


def input_gaps(inputs: Sequence[tuple[int, float]], echoed_us: Sequence[int], source: SourceClock | None,
               target_offset: float | None) -> dict[str, dict[str, float]]:
    """How far apart the two guests' clocks were at each replayed key and button (ms; target minus
    source): ``mono``, their monotonic clocks (the target agent's log time of the input against the
    log's: both agents run on the checkpoint's clock, paired in order), and ``wall``, their wall
    clocks (the target's host wall clock at the echo plus its guest's offset ``target_offset``,
    against the source's timeline), when the source sent its timeline. A measurement for the
    report and the benchmark."""
    out: dict[str, dict[str, float]] = {}
    out["mono"] = _summary([(e - t) / 1e3 for (t, _), e in zip(inputs, echoed_us, strict=False)])
    if source is not None and target_offset is not None:
        out["wall"] = _summary([(wall + target_offset) * 1e3 - source.guest_wall_us(t) / 1e3 for t, wall in inputs])
    return out
