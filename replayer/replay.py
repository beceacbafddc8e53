"""Closed-loop replay of an input log into a VM clone.

Each key, button and pointer event is injected with one QMP ``input-send-event`` call, announced
first to the guest's recorder agent with ``expect``; the next event goes only after the agent has
*echoed* this one, i.e. after X really delivered it (DESIGN.md §7: open-loop batches lost 20 % of
events and let a button release overtake later keys). Idle gaps longer than ``gap_cap_s`` are
compressed. A sync mark makes the replayer wait until the screen region it names shows the recorded
digest: a click is only replayed once the window it lands in looks as it did. The wait is as long
as the source took to reach the mark from the input before it, plus a slack (``SYNC_SLACK_S``).
The agent marks every look a region settles on until the next input (``recorder.agent.RegionWatch``):
the first may be a screen the source showed while a command ran quietly, which a faster target can
skip; such a mark is *passed* when the next mark of that region, before any key or button, is met.

Time comes from a :class:`replayer.clock.Clock` passed in (the host's by default), and the machine
and the recorder link are what :class:`InputTarget` and :class:`EchoLink` say a replay needs of
them: the schedule can be checked with a manual clock and an in-process link, exactly and at once.
The log arrives through ``replayer.logfeed`` (a file, or a migration's session).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from recorder.capture import DEFAULT_SYNC_FOLLOW_MS, DEFAULT_SYNC_MAX_WAIT_MS
from recorder.channel import HostEvent, LogFrame
from recorder.logformat import Button, End, Event, Key, LogHeader, Motion, SyncMark
from replay_migrate.errors import ReplayError
from replayer.clock import REAL_CLOCK, Clock
from replayer.drive import to_qmp
from replayer.link import CheckTimeout

GAP_CAP_S = 2.0
"""Longest idle gap kept from the recording; longer ones are cut to this."""
ECHO_TIMEOUT_S = 10.0
"""How long one injected event may take to be echoed by the guest (TCG guests are slow)."""
SYNC_SLACK_S = 5.0
"""How much longer than the source took to reach a sync mark the target may take (it replays on a
loaded host, behind the source) before the mark counts as failed. A mark is waited on from the
moment the target's guest echoed the last key or button before it, for as long as the recording
says the source took from that input to the mark, plus this."""
SYNC_SLACK_ENDED_S = 1.0
"""The same once the source has ended the log: its VM is frozen and every second of waiting is
downtime. The agent marks only settled screens, so a mark the target does not show by then is one
the replay drifted from; giving up costs at most some divergence, never correctness."""
SYNC_REACH_MAX_S = (DEFAULT_SYNC_FOLLOW_MS + DEFAULT_SYNC_MAX_WAIT_MS) / 1000
"""Longest time a log may claim the source took to reach a mark: the agent watches a region for new
looks up to ``DEFAULT_SYNC_FOLLOW_MS`` after the last input (a command's output and prompt), so a
true mark comes within that and one settle; bounds the wait a hostile or broken log can ask for."""
SYNC_BEHIND_RATIO = 1.0
"""While the target's region still shows the look of that region's previous met mark (the screen
the source left *without input*: a command still running), the target is behind, not drifted: it
computes what the source computed, on a host where both VMs and the replay share the cores. It may
then take this fraction of the source's time longer, on top of the slack: ``generate``'s data set
took the source ~50 s, and a target 10 % slower missed a 5 s slack. A target that shows any other
look gets the plain bound (a drifted replay costs no more waiting than before)."""
SYNC_POLL_S = 0.1
"""How often an unmet sync mark's region is checked again, at first..."""
SYNC_POLL_GROWTH = 0.05
"""...then every this fraction of the time waited so far (a check samples a window-sized region in
the target's guest: ~1 MB copied and digested, CPU the guest's own computation, the one the mark
waits for, then lacks)..."""
SYNC_POLL_MAX_S = 0.5
"""...but at least this often (what a long wait adds to the moment the mark is seen met; the
source's agent samples a watched region as often, ``DEFAULT_SYNC_FOLLOW_SAMPLE_MS``)."""


class InputTarget(Protocol):
    """What a replay needs of a VM (``vm.machine.Machine`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def screen_size(self) -> tuple[int, int]: ...

    def send_input(self, events: Sequence[dict[str, Any]]) -> None: ...


class EchoLink(Protocol):
    """What a replay needs of the guest's recorder agent (``replayer.link.RecorderLink`` is one)."""

    def expect(self, replay_seq: int, event: Key | Button | Motion) -> None: ...

    def wait_echo(self, replay_seq: int, timeout: float, on_event: list[HostEvent] | None = None) -> bool: ...

    def check(self, x: int, y: int, w: int, h: int, timeout: float,
              on_event: list[HostEvent] | None = None) -> bytes: ...

    def ack(self, seq: int) -> None: ...


@dataclass
class ReplayConfig:
    gap_cap_s: float = GAP_CAP_S
    echo_timeout_s: float = ECHO_TIMEOUT_S
    sync_slack_s: float = SYNC_SLACK_S
    sync_slack_ended_s: float = SYNC_SLACK_ENDED_S
    sync_reach_max_s: float = SYNC_REACH_MAX_S
    sync_behind_ratio: float = SYNC_BEHIND_RATIO
    strict_sync: bool = False
    """Fail (ReplayError) on a sync mark that is not met instead of counting it."""
    speed: float = 1.0
    """>1 replays gaps faster; the closed loop bounds the real rate anyway."""


@dataclass
class ReplayStats:
    events: int = 0
    injected: int = 0
    skipped_motion: int = 0
    sync_met: int = 0
    sync_passed: int = 0
    """Marks not met whose region's next mark, before any key or button, was: a screen the source
    showed while a command ran, which the target had already left when it looked."""
    sync_failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    echo_max_s: float = 0.0
    echo_total_s: float = 0.0
    ended: bool = False
    settled: bool = False
    """No key or button event since the last sync mark, and that mark was met: the target's
    screen shows what the source's did once the user stopped (pointer motion brings no mark)."""

    def as_dict(self) -> dict[str, object]:
        return {"events": self.events, "injected": self.injected, "skipped_motion": self.skipped_motion,
                "sync_met": self.sync_met, "sync_passed": self.sync_passed,
                "sync_failed": list(self.sync_failed),
                "seconds": round(self.seconds, 3), "echo_max_s": round(self.echo_max_s, 4),
                "echo_mean_s": round(self.echo_total_s / self.injected, 4) if self.injected else 0.0,
                "ended": self.ended, "settled": self.settled}


def describe(ev: Event) -> str:
    if isinstance(ev, Key):
        return f"key {ev.keycode} {'press' if ev.down else 'release'} at {ev.t_us / 1e6:.3f} s"
    if isinstance(ev, Button):
        return f"button {ev.button} {'press' if ev.down else 'release'} at {ev.t_us / 1e6:.3f} s"
    if isinstance(ev, Motion):
        return f"pointer to {ev.x},{ev.y} at {ev.t_us / 1e6:.3f} s"
    if isinstance(ev, SyncMark):
        return f"sync mark {ev.label!r} at {ev.t_us / 1e6:.3f} s"
    return f"end of log at {ev.t_us / 1e6:.3f} s"


@dataclass
class SyncWait:
    """What the target's region showed while one sync mark was waited on: tells a target that
    settled on another screen (drift: one look, held) from one still changing (a slow target, or a
    screen that never holds still) in the failed mark's own message."""

    start: float
    looks: list[tuple[float, bytes]] = field(default_factory=list)
    """(clock s, digest) each time the answer changed; b"" for a check the agent did not answer."""

    def add(self, t: float, digest: bytes) -> None:
        if not self.looks or self.looks[-1][1] != digest:
            self.looks.append((t, digest))

    @property
    def distinct(self) -> int:
        return len({d for _, d in self.looks})

    def describe(self, now: float) -> str:
        if not self.looks:
            return "no check answered"
        held = now - self.looks[-1][0]
        return f"the target showed {len(self.looks)} look(s), {self.distinct} distinct, the last for {held:.1f} s"


class Replayer:
    """Injects events into ``machine`` one at a time, closed loop over ``link``, on ``clock``'s time."""

    def __init__(self, machine: InputTarget, link: EchoLink, config: ReplayConfig | None = None, *,
                 clock: Clock = REAL_CLOCK) -> None:
        self.machine = machine
        self.link = link
        self.config = config or ReplayConfig()
        self.clock = clock
        self.stats = ReplayStats()
        self.pointer: tuple[int, int] | None = None
        self._seq = 0
        self._last_t_us: int | None = None
        self._due = 0.0
        """Wall time the current event is due at: the previous one's due time plus the recorded
        gap (capped). Echo latency does not push the schedule back, so a replay that fell behind
        catches up instead of trailing the source by the sum of all echo waits."""
        self._t0 = clock.now()
        self._input: tuple[int, float] | None = None
        """The last key or button: its time in the log (µs) and when the target echoed it (clock s)."""
        self._last_met: SyncMark | None = None
        """The last mark met while no key or button came after it (``_behind``)."""
        self._unmet: tuple[SyncMark, str] | None = None
        """The last mark not met, while no key or button came after it: a later mark of its region
        that is met passes it, the next input (or the end of the replay) fails it."""
        self._log_ended = threading.Event()
        self._stop = threading.Event()
        self.on_progress: Callable[[int], None] | None = None
        """Called with the number of events replayed so far, after each one."""
        self.on_unmet: Callable[[SyncMark, SyncWait], None] | None = None
        """Called (in the replay thread) when a mark's wait ran out, with what the target's region
        showed meanwhile: a diagnosis hook (``TargetSide.sync_dump`` saves the region's pixels)."""
        self.log = logging.getLogger(f"replay_migrate.replay.{machine.name}")

    def log_ended(self) -> None:
        """The source has ended the log (it is frozen): from now on sync marks wait only
        ``sync_slack_ended_s`` beyond the source's time. Thread-safe: called while :meth:`replay`
        runs in another thread."""
        self._log_ended.set()

    def stop(self) -> None:
        """Make :meth:`replay` return after the event in progress (its echo wait is bounded by
        ``echo_timeout_s``) instead of going through every event still queued: the migration was
        cancelled. Thread-safe."""
        self._stop.set()

    def _pause(self, seconds: float) -> bool:
        """Wait up to ``seconds``; True once :meth:`stop` was called (it ends the wait)."""
        return self.clock.wait(self._stop, seconds)

    def check_header(self, header: LogHeader) -> None:
        if (header.width, header.height) != self.machine.screen_size:
            raise ReplayError(f"the log was recorded on a {header.width}x{header.height} screen; "
                              f"{self.machine.name!r} has {self.machine.screen_size[0]}x{self.machine.screen_size[1]}")

    def replay(self, events: Iterable[Event]) -> ReplayStats:
        for ev in events:
            if self._stop.is_set():
                break
            self.stats.events += 1
            if isinstance(ev, End):
                self.stats.ended = True
                break
            self._wait_gap(ev.t_us)
            if self._stop.is_set():
                break
            if isinstance(ev, SyncMark):
                self._sync(ev)
            else:
                if not isinstance(ev, Motion):
                    self._fail_unmet()
                self._inject(ev)
            self._last_t_us = ev.t_us
            if self.on_progress is not None:
                self.on_progress(self.stats.events)
        if not self._stop.is_set():
            self._fail_unmet()
        self.stats.seconds = self.clock.now() - self._t0
        return self.stats

    def _fail_unmet(self) -> None:
        """The last unmet mark was not passed by a later one of its region: it failed."""
        if self._unmet is None:
            return
        _, what = self._unmet
        self._unmet = None
        if self.config.strict_sync:
            raise ReplayError(what)
        self.log.warning("%s", what)
        self.stats.sync_failed.append(what)

    def _wait_gap(self, t_us: int) -> None:
        now = self.clock.now()
        if self._last_t_us is None:
            self._due = now
            return
        gap = min(max(0, t_us - self._last_t_us) / 1e6, self.config.gap_cap_s) / self.config.speed
        self._due += gap
        if self._due > now:
            self._pause(self._due - now)

    def _inject(self, ev: Key | Button | Motion) -> None:
        if isinstance(ev, Motion):
            if self.pointer == (ev.x, ev.y):   # X reports no motion to where the pointer is
                self.stats.skipped_motion += 1
                return
            self.pointer = (ev.x, ev.y)
        else:
            self.stats.settled = False
            self._last_met = None
        qmp = to_qmp(ev, self.machine.screen_size)
        self._seq += 1
        self.link.expect(self._seq, ev)
        t = self.clock.now()
        self.machine.send_input(qmp)
        others: list[HostEvent] = []
        if not self.link.wait_echo(self._seq, self.config.echo_timeout_s, others):
            raise ReplayError(f"event {self.stats.events} ({describe(ev)}) was not echoed by the guest "
                              f"within {self.config.echo_timeout_s:.0f} s")
        self._ack_frames(others)
        dt = self.clock.now() - t
        self.stats.injected += 1
        self.stats.echo_total_s += dt
        self.stats.echo_max_s = max(self.stats.echo_max_s, dt)
        if not isinstance(ev, Motion):
            self._input = (ev.t_us, self.clock.now())

    def _sync_deadline(self, mark: SyncMark, start: float, behind: bool = False) -> float:
        """When to give up on ``mark``: the source took ``mark.t - t`` from its last key or button
        (at log time ``t``) to show the mark's screen, so the target gets as long from its echo of
        that input (or from ``start``, when the replay got to the mark, if that is later), plus the
        slack (less once the source ended the log). ``behind``: the target
        still shows the region's previous mark, so ``sync_behind_ratio`` of that time more."""
        ended = self._log_ended.is_set() and not self.config.strict_sync
        slack = min(self.config.sync_slack_s, self.config.sync_slack_ended_s) if ended else self.config.sync_slack_s
        if self._input is None:
            return start + slack
        t_us, echoed_at = self._input
        reach = min(max(0, mark.t_us - t_us) / 1e6, self.config.sync_reach_max_s)
        if behind:
            reach *= 1 + self.config.sync_behind_ratio
        # never less than the slack from when the replay got to the mark: a mark is placed where its
        # look was first seen, and reaches the target only once the source's agent saw it settle
        return max(echoed_at + reach, start) + slack

    def _behind(self, mark: SyncMark, digest: bytes) -> bool:
        """Whether the target's region shows the look of that region's last met mark, with no key
        or button since: where the source's screen was before it changed by itself."""
        last = self._last_met
        return (last is not None and digest == last.digest
                and (last.x, last.y, last.w, last.h) == (mark.x, mark.y, mark.w, mark.h))

    def _sync(self, mark: SyncMark) -> None:
        """Wait until the target's agent sees the region as the source's did. Asked of the agent,
        not taken from a QEMU screenshot: that one includes X's software cursor, GetImage not."""
        start = self.clock.now()
        seen = SyncWait(start)
        while True:
            others: list[HostEvent] = []
            try:
                digest = self.link.check(mark.x, mark.y, mark.w, mark.h, self.config.echo_timeout_s, others)
            except CheckTimeout as e:
                if self.config.strict_sync:
                    raise
                self.log.warning("%s", e)
                digest = b""
            self._ack_frames(others)
            seen.add(self.clock.now(), digest)
            if digest == mark.digest:
                self.stats.sync_met += 1
                self.stats.settled = True
                self._last_met = mark
                if self._unmet is not None:
                    if (self._unmet[0].x, self._unmet[0].y, self._unmet[0].w, self._unmet[0].h) == \
                            (mark.x, mark.y, mark.w, mark.h):
                        self.log.info("%s passed: the target reached the next look of its region", self._unmet[1])
                        self.stats.sync_passed += 1
                        self._unmet = None
                    else:
                        self._fail_unmet()
                return
            deadline = self._sync_deadline(mark, start, self._behind(mark, digest))
            if self.clock.now() >= deadline:
                self._fail_unmet()
                what = f"{describe(mark)} ({mark.w}x{mark.h} at {mark.x},{mark.y})"
                self._unmet = (mark, f"{what} was not met within {self.clock.now() - start:.1f} s "
                                     f"({seen.describe(self.clock.now())})")
                self.stats.settled = False
                if self.on_unmet is not None:
                    self.on_unmet(mark, seen)
                return
            now = self.clock.now()
            poll = min(SYNC_POLL_MAX_S, max(SYNC_POLL_S, (now - start) * SYNC_POLL_GROWTH))
            if self._pause(min(poll, deadline - now)):      # the last check at the deadline
                return

    def _ack_frames(self, events: list[HostEvent]) -> None:
        """Ack the target agent's own recording of what we replay, so its resend buffer stays as
        small as the source's (whose host acked every frame)."""
        for ev in events:
            if isinstance(ev, LogFrame):
                self.link.ack(ev.seq)
