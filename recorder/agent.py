"""The in-guest recorder agent: capture the user's input, encode the log, stream it to the host.

Runs on the guest's own python3 with python3-pynput, python3-xlib and python3-msgpack only (Debian
bookworm: Python 3.11, pynput 1.7.5, python-xlib 0.33, msgpack 1.0.3)::

    PYTHONPATH=/usr/local/lib/replay-migrate python3 -m recorder.agent \\
        --port /dev/virtio-ports/org.replaymigrate.log.0 --display :0 --ready-mark /dev/ttyS0

Capture and the screen are behind ``recorder.capture``'s interface; the one backend is
``pynput-xorg`` (``recorder.pynput_xorg``: pynput's listener on X RECORD, python-xlib for the screen).
Its name is in the channel's hello.

Threads, and why:

- main: waits on the capture backend (``CaptureBackend.wait``) and takes the signals.
- capture (the backend's: pynput's listener thread): parses events and puts them on a queue, nothing
  else; it never blocks on I/O, so a slow or absent host never stalls capture.
- pump: the only owner of the log encoder, the channel protocol (``AgentSide``), the fallback log
  file and the port. Frames every ``frame_events`` events or ``frame_ms``, appends each frame to the
  fallback file, reads attach/ack/expect/check and writes hello/frames/echoes/check answers when the
  port is writable. It hands check requests to the flusher (``CheckQueue``) and gets the digests
  back on its queue, so sampling the screen never holds up the port.
- flusher (the screen thread): services the backend's screen every ``flush_ms`` (on X, RECORD hands
  over intercepted events only when the server flushes output to *some* client, DESIGN.md §7, so
  ``recorder.xorg.XScreen`` keeps it flowing) and takes the screen samples for sync marks and for the
  host's checks: one code path (``ScreenSource.sample``), so a check on the replay target computes
  its digest exactly as the recording's sync mark was computed.

The port is opened non-blocking: with no host connected a virtio port reports POLLHUP and a write
would block, so nothing is ever written blindly; frames wait in the resend buffer (bounded; the
fallback file has every frame) until a host attaches (``recorder.channel``).

Timing: events carry the backend's millisecond clock (on X, the server's), which is taken as is
(unwrapped across its 32-bit wrap) rather than the moment the agent got them, so buffering does not
distort the gaps (a double click recorded 100 ms apart would replay as two single clicks). That clock
is anchored to ours once at start (``CaptureBackend.now_ms``).

On SIGTERM/SIGINT the agent ends the log (an END event), tries for ``drain_s`` to get everything
to an attached host, and exits 0.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import enum
import logging
import os
import queue
import select
import signal
import sys
import threading
import time
import tty
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType

from recorder.capture import (
    BACKENDS,
    DEFAULT_BACKEND,
    DEFAULT_SYNC_FOLLOW_MS,
    DEFAULT_SYNC_FOLLOW_SAMPLE_MS,
    DEFAULT_SYNC_MAX_PHASES,
    DEFAULT_SYNC_MAX_WAIT_MS,
    DEFAULT_SYNC_SAMPLE_MS,
    DEFAULT_SYNC_SETTLE_MS,
    DEFAULT_SYNC_SIZE,
    DEFAULT_SYNC_WINDOW_MAX,
    BackendUnavailable,
    CaptureBackend,
    Captured,
    CaptureStarted,
    InputKind,
    SampleError,
    ScreenSource,
    SyncPolicy,
    open_desktop,
)
from recorder.channel import (
    DEFAULT_MAX_PENDING_CHECKS,
    DEFAULT_RESEND_LIMIT_BYTES,
    AgentSide,
    AgentState,
    Attached,
    CheckRequested,
    Expected,
    Skipped,
)
from recorder.logformat import (
    MAX_COORD,
    Button,
    EncodedFrame,
    Event,
    Key,
    LogEncoder,
    LogHeader,
    Motion,
    SyncMark,
    region_digest,
)

log = logging.getLogger("recorder.agent")

try:
    from replay_migrate import __version__ as AGENT_VERSION
except ImportError:  # pragma: no cover - the package is copied into the guest beside this one
    AGENT_VERSION = "0"

DEFAULT_PORT = "/dev/virtio-ports/org.replaymigrate.log.0"
DEFAULT_LOG_FILE = "/run/replay-migrate/session.rmlog"
"""tmpfs: the fallback log must not dirty the guest's disk (it would show up as divergent blocks)."""
DEFAULT_FRAME_EVENTS = 64
"""Cut a frame after this many events..."""
DEFAULT_FRAME_MS = 250
"""...or when its oldest event is this old. Bounds how far a live replay trails (not the downtime: the
log is flushed when recording stops). Each frame costs 16 bytes of framing, so this sets the log
size: typing makes ~14 events/s, and 100 ms frames measured 18.6 bytes/event, 250 ms 14.7, 500 ms
11.7 (``python -m bench.bench_log --frame-ms``)."""
DEFAULT_MOTION_WINDOW_MS = 20
DEFAULT_FLUSH_MS = 100
"""RECORD flush round trip period (DESIGN.md §7: motion otherwise sits buffered for seconds)."""
DEFAULT_SYNC_IDLE_MS = 300
"""A sync mark is taken once no key or button event came for this long after one did."""
DEFAULT_RETRY_MS = 200
"""How often to look again at a port that is missing or has no host (POLLHUP)."""
DEFAULT_QUEUE_MAX = 100_000
"""Captured events waiting for the pump; beyond this they are dropped and counted (never blocks)."""
DEFAULT_DRAIN_S = 2.0
"""On exit, how long to keep sending to an attached host."""
STOP_TIMEOUT_S = 2.0
"""On exit, how long the capture backend gets to stop."""
READ_CHUNK = 64 * 1024



def uptime() -> float:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return time.monotonic()


# ------------------------------------------------------------------------------------------- pieces


class Clock:
    """Maps X server time (ms, 32-bit, wrapping) and the monotonic clock to µs since the origin."""

    def __init__(self, server_ms: int, mono_ns: int, wall_us: int) -> None:
        self.origin_wall_us = wall_us
        self._mono0 = mono_ns
        self._last_ms = server_ms
        self._acc_ms = 0

    def from_server(self, ms: int) -> int:
        d = (ms - self._last_ms) & 0xFFFFFFFF
        if d >= 1 << 31:  # slightly older than the previous one
            d -= 1 << 32
        self._last_ms = ms
        self._acc_ms += d
        return max(0, self._acc_ms * 1000)

    def from_mono(self, mono_ns: int) -> int:
        return max(0, (mono_ns - self._mono0) // 1000)


class FallbackLog:
    """Every frame appended to a log file (a valid log: ``python -m recorder.logformat FILE``), with an
    in-memory index so the pump can re-read frames evicted from the resend buffer. A write error
    disables it (logged once) rather than stopping the recording."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._offsets: list[tuple[int, int]] = []
        self._size = 0
        self._fd: int | None = None
        try:
            parent = os.path.dirname(path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as e:
            log.error("fallback log %s unusable (%s): frames evicted from memory will be lost", path, e)

    def append(self, frame: EncodedFrame) -> None:
        if frame.seq != len(self._offsets):
            raise RuntimeError(f"fallback log: frame {frame.seq} after {len(self._offsets)}")
        self._offsets.append((self._size, len(frame.data)))
        self._size += len(frame.data)
        if self._fd is None:
            return
        try:
            view = memoryview(frame.data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as e:
            log.error("fallback log %s: write failed (%s); no longer written", self.path, e)
            self._close()

    def read(self, seq: int) -> bytes | None:
        if self._fd is None or not 0 <= seq < len(self._offsets):
            return None
        off, n = self._offsets[seq]
        try:
            data = os.pread(self._fd, n, off)
        except OSError:
            return None
        return data if len(data) == n else None

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        self._close()


class Port:
    """The virtio-serial port (or a tty standing in for it), non-blocking, reopened if it vanishes.

    ``hup`` means no host is connected: a virtio port then polls POLLHUP and reads return 0; a pty
    whose master is closed returns EIO. While hung up it is left out of poll for ``retry_ms``.
    """

    def __init__(self, path: str, retry_ms: int) -> None:
        self.path = path
        self.retry_s = retry_ms / 1000
        self.fd: int | None = None
        self.retry_at = 0.0
        self._last_errno: int | None = None

    def ensure_open(self, now: float) -> bool:
        if self.fd is not None:
            return True
        if now < self.retry_at:
            return False
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as e:
            if e.errno != self._last_errno:  # say it once per reason, not every retry
                log.info("port %s not available yet (%s)", self.path, e.strerror)
                self._last_errno = e.errno
            self.retry_at = now + self.retry_s
            return False
        self._last_errno = None
        if os.isatty(fd):
            tty.setraw(fd)  # no line discipline: bytes through unchanged, no echo
        self.fd = fd
        log.info("port %s open", self.path)
        return True

    def backoff(self, now: float) -> None:
        self.retry_at = now + self.retry_s

    def usable(self, now: float) -> bool:
        return self.fd is not None and now >= self.retry_at

    def reopen_later(self, now: float) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        self.retry_at = now + self.retry_s


class Settle(enum.Enum):
    """What ``Settler.add`` decided about a region."""

    WAIT = "wait"
    """Not settled yet: sample it again."""
    SETTLED = "settled"
    """Mark it with the sample just added."""
    GAVE_UP = "gave up"
    """Still changing after ``max_wait_ms``: no mark."""


class Settler:
    """Decides from timed digests of one region, sampled after a mark fell due, whether the region
    has settled: the same digest over the last ``settle_ms`` (or at most ``max_phases`` digests
    taking turns, the current one seen before: a blinking cursor). Sans-I/O: the times are passed in
    (ns on any monotonic scale), so the rule is checked without a screen or a clock.

    The window must be *observed*: the first sample opens it, so a region is never called settled
    on less than ``settle_ms`` of looking, and nothing seen before the mark was due counts."""

    def __init__(self, policy: SyncPolicy, due_ns: int) -> None:
        self.settle_ns = policy.settle_ms * 1_000_000
        self.max_wait_ns = policy.max_wait_ms * 1_000_000
        self.max_phases = policy.max_phases
        self.due_ns = due_ns
        self._samples: collections.deque[tuple[int, bytes]] = collections.deque()

    def add(self, t_ns: int, digest: bytes) -> Settle:
        s = self._samples
        s.append((t_ns, digest))
        start = t_ns - self.settle_ns
        while len(s) >= 2 and s[1][0] <= start:  # keep the one sample that shows the window's start
            s.popleft()
        if s[0][0] <= start:
            runs = [d for i, (_, d) in enumerate(s) if i == 0 or s[i - 1][1] != d]
            if len(runs) == 1 or (len(set(runs)) <= self.max_phases and runs.count(digest) >= 2):
                return Settle.SETTLED
        if t_ns - self.due_ns >= self.max_wait_ns:
            return Settle.GAVE_UP
        return Settle.WAIT

    @property
    def looks(self) -> frozenset[bytes]:
        """The digests in the current window: one look, or a blinking cursor's phases."""
        return frozenset(d for _, d in self._samples)

    @property
    def since_ns(self) -> int:
        """When the window's first sample was taken: the region showed its look (or its phases)
        from then on, so the look follows from the input before that moment alone."""
        return self._samples[0][0]


class RegionWatch:
    """One region, from the moment its mark fell due until the next key or button (the caller ends
    it) or ``follow_ms`` after ``input_ns``: the first look it settles on is marked, and so is every
    later look it settles on that is not one of the marked one's phases. Sans-I/O, like ``Settler``.

    Why watch on: a screen that held still for ``settle_ms`` after the input may still change without
    input (a command that ran quietly prints and returns to the prompt). A mark names the screen
    the user saw while the command ran, a moment the target may have passed; without a mark of
    the screen that followed, the replay types the user's next command into the target's still
    running one, where the keys echo twice and the screen differs for good (``unpack``'s marks,
    README). The replayer passes over a marked look the target skipped when the next mark of the
    region, before any input, is met (``replayer.replay``)."""

    def __init__(self, policy: SyncPolicy, due_ns: int, input_ns: int | None = None) -> None:
        self.policy = policy
        self.until_ns = (due_ns if input_ns is None else input_ns) + policy.follow_ms * 1_000_000
        self._settler = Settler(policy, due_ns)
        self._marked: frozenset[bytes] = frozenset()
        self._offered: frozenset[bytes] = frozenset()
        self.since_ns = 0
        """When the look :meth:`add` offered was first seen (``Settler.since_ns``): the mark's place
        in the log. Input logged after that moment but before the mark would make the replay wait,
        with that input replayed, for a look the source showed without it."""
        self.marks = 0
        self.gave_up = False
        """The region did not settle within ``max_wait_ms`` of the mark falling due (it may still,
        later, while it is watched)."""

    @property
    def interval_ns(self) -> int:
        """How long to wait before the next sample: slower once a look was offered (marked, or
        left out for input logged since it was first seen)."""
        ms = self.policy.follow_sample_ms if self._offered else self.policy.sample_ms
        return ms * 1_000_000

    def expired(self, t_ns: int) -> bool:
        return t_ns >= self.until_ns

    def add(self, t_ns: int, digest: bytes) -> bytes | None:
        """The digest to mark now, or None (not settled, or settled on the look already marked).
        ``t_ns`` is when the sample was *started*: a look is placed no later than it was seen.
        The caller confirms with :meth:`taken`; a look it could not mark is offered again once it
        has settled anew."""
        verdict = self._settler.add(t_ns, digest)
        if verdict is Settle.WAIT:
            return None
        looks, since = self._settler.looks, self._settler.since_ns
        self._settler = Settler(self.policy, t_ns)  # a new window from this sample: the next change
        self._settler.add(t_ns, digest)
        if verdict is Settle.GAVE_UP:
            if not self.marks:
                self.gave_up = True
            return None
        if digest in self._marked:
            return None
        self._offered, self.since_ns = looks, since
        return digest

    def taken(self) -> None:
        """The look :meth:`add` offered was marked: its phases are not marked again."""
        self._marked = self._offered
        self.marks += 1


class SyncTrigger:
    """Shared between the pump (which sees input) and the flusher (which samples the screen): a
    mark is due ``idle_ms`` after the last key or button event, around the pointer if the burst
    ended with a button release, else over the focused window."""

    def __init__(self, idle_ms: int) -> None:
        self.idle_ns = idle_ms * 1_000_000
        self._lock = threading.Lock()
        self._gen = 0
        self._pending: tuple[str, int, int] | None = None
        self._last_ns = 0
        self._last_event_us = 0

    def note(self, ev: Event, mono_ns: int) -> None:
        with self._lock:
            self._last_event_us = max(self._last_event_us, ev.t_us)
        if isinstance(ev, Motion):
            return
        with self._lock:
            self._gen += 1
            self._last_ns = mono_ns
            if isinstance(ev, Button) and not ev.down and ev.button <= 3:
                self._pending = ("click", 0, 0)
            elif isinstance(ev, Key) or self._pending is None:
                self._pending = ("typing", 0, 0)

    def due(self, mono_ns: int) -> tuple[str, int] | None:
        with self._lock:
            if self._pending is None or mono_ns - self._last_ns < self.idle_ns:
                return None
            return self._pending[0], self._gen

    def generation(self) -> tuple[int, int]:
        """How many key and button events came so far, and when the last one did (monotonic ns)."""
        with self._lock:
            return self._gen, self._last_ns

    def last_event_us(self) -> int:
        """Log time of the latest event the pump has logged, pointer motion included."""
        with self._lock:
            return self._last_event_us

    def done(self, gen: int) -> bool:
        """Clear the pending mark if no input came since ``due()``; say whether to emit it."""
        with self._lock:
            if gen != self._gen:
                return False
            self._pending = None
            return True


def mark_place(seen_us: int, trigger: SyncTrigger) -> int | None:
    """The log time of a mark of a look first seen at ``seen_us`` (log µs), or None if the pump
    logged input since (pointer motion: a key or button ends the watch). A mark goes into the log
    after every event logged before it; the target replays those and then waits for the look, so
    one logged after the look was seen may be why the target never shows it (``notes``: the
    pointer entering the Save button lights it up; the mark named the notepad from before)."""
    return None if trigger.last_event_us() >= seen_us else seen_us


@dataclass(frozen=True, slots=True)
class CheckAnswer:
    """Flusher → pump: the digest for a host's check (b"" if the region could not be sampled)."""

    req_id: int
    digest: bytes


class CheckQueue:
    """Pump → flusher: check requests, newest ``maxlen`` kept, with a pipe that wakes the flusher
    (it would otherwise sleep up to ``flush_ms`` in select)."""

    def __init__(self, maxlen: int = DEFAULT_MAX_PENDING_CHECKS) -> None:
        self._lock = threading.Lock()
        self._reqs: collections.deque[CheckRequested] = collections.deque(maxlen=maxlen)
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self._r

    def put(self, req: CheckRequested) -> None:
        with self._lock:
            self._reqs.append(req)
        with contextlib.suppress(BlockingIOError):
            os.write(self._w, b"\0")

    def take(self) -> list[CheckRequested]:
        with contextlib.suppress(BlockingIOError):
            os.read(self._r, 4096)
        with self._lock:
            reqs = list(self._reqs)
            self._reqs.clear()
        return reqs


# ------------------------------------------------------------------------------------------ threads


class Flusher(threading.Thread):
    """The screen thread: services the backend's screen every ``flush_ms`` (on X: the RECORD flush),
    takes sync marks and answers the host's checks. ``sampler`` is the screen, or None if it cannot be
    sampled: no marks, and every check is answered with an empty digest."""

    def __init__(self, screen: ScreenSource, flush_ms: int, sampler: ScreenSource | None,
                 trigger: SyncTrigger | None, checks: CheckQueue, clock: Clock, put: Callable[[object], None],
                 on_fatal: Callable[[str], None], policy: SyncPolicy | None = None) -> None:
        super().__init__(name="flusher", daemon=True)
        self.screen, self.flush_s = screen, flush_ms / 1000
        self.sampler, self.trigger, self.checks, self.clock, self.put = sampler, trigger, checks, clock, put
        self.on_fatal = on_fatal
        self.stop = threading.Event()
        self.policy = policy or SyncPolicy()
        self._watch: tuple[int, str, tuple[int, int, int, int], RegionWatch] | None = None
        """(the due mark's input generation, its label, its region, what was seen of it so far)"""
        self._sampled_ns = 0
        self.unsettled = 0
        """Marks not taken when due because their region did not settle within ``max_wait_ms``."""
        self.followed = 0
        """Marks of a look a region settled on without input after its first mark."""
        self.misplaced = 0
        """Looks not marked (when they settled) because input came after they were first seen."""

    def run(self) -> None:
        try:
            self.screen.service(False)
            fd = self.screen.fileno()
            fds = [self.checks.fileno()] + ([fd] if fd is not None else [])
            while not self.stop.is_set():
                ready, _, _ = select.select(fds, [], [], self.flush_s)
                self.screen.service(fd not in ready)
                for req in self.checks.take():
                    self.put(CheckAnswer(req.req_id, self._check(req)))
                self._maybe_sync()
        except Exception as e:  # X went away or a bug: the agent cannot work on without this thread
            if not self.stop.is_set():
                self.on_fatal(f"flusher: {type(e).__name__}: {e}")

    def _check(self, req: CheckRequested) -> bytes:
        """The digest a sync mark of that region would carry now; b"" if the region is not wholly on
        the screen (clipping it would answer for another region) or cannot be sampled."""
        s = self.sampler
        if s is None or req.x + req.w > s.width or req.y + req.h > s.height:
            return b""
        try:
            return region_digest(s.sample(req.x, req.y, req.w, req.h))
        except SampleError as e:  # e.g. the screen shrank (RandR) since we connected
            log.debug("check %d: sample failed: %s", req.req_id, e)
            return b""

    def _maybe_sync(self) -> None:
        """Take the due mark once its region has settled, and one more for each new look it
        settles on before the next input (``RegionWatch``); none while it keeps changing."""
        if self.sampler is None or self.trigger is None:
            return
        now = time.monotonic_ns()
        due = self.trigger.due(now)
        gen, input_ns = self.trigger.generation()
        if self._watch is not None and (self._watch[0] != gen or self._watch[3].expired(now)):
            self._end_watch()  # input came since (its own mark falls due later), or watched long enough
        if self._watch is None:
            if due is None:
                return
            label, gen = due
        else:
            label = self._watch[1]
            if now - self._sampled_ns < self._watch[3].interval_ns:
                return
        self._sampled_ns = now
        try:
            if self._watch is None:
                self._watch = (gen, label, self.sampler.region(label), RegionWatch(self.policy, now, input_ns))
            _, _, region, watch = self._watch
            digest = region_digest(self.sampler.sample(*region))
        except SampleError as e:  # a window went away between the queries: no mark this time
            log.debug("sync sample failed: %s", e)
            self._watch = None
            self.trigger.done(gen)
            return
        mark = watch.add(now, digest)
        if mark is None:
            return
        if not self.trigger.done(gen):
            self._watch = None
            return  # input came while sampling: the next mark is due later
        t_us = mark_place(self.clock.from_mono(watch.since_ns), self.trigger)
        if t_us is None:
            self.misplaced += 1     # offered again once it settles anew
            return
        watch.taken()
        if watch.marks > 1:
            self.followed += 1
        x, y, w, h = region
        self.put(SyncMark(t_us, x, y, w, h, mark, label))

    def _end_watch(self) -> None:
        assert self._watch is not None
        watch = self._watch[3]
        if watch.gave_up and not watch.marks:
            self.unsettled += 1
            x, y, w, h = self._watch[2]
            log.debug("no sync mark: %dx%d at %d,%d never settled", w, h, x, y)
        self._watch = None

@dataclass
class PumpConfig:
    frame_events: int = DEFAULT_FRAME_EVENTS
    frame_ms: int = DEFAULT_FRAME_MS
    motion_window_ms: int = DEFAULT_MOTION_WINDOW_MS
    resend_bytes: int = DEFAULT_RESEND_LIMIT_BYTES
    retry_ms: int = DEFAULT_RETRY_MS
    drain_s: float = DEFAULT_DRAIN_S


class Pump(threading.Thread):
    """Captured events → frames → fallback file + port; host messages → acks, resends, echoes."""

    def __init__(self, header: LogHeader, clock: Clock, port: Port, fallback: FallbackLog,
                 cfg: PumpConfig, q: queue.Queue[object], wake_r: int, trigger: SyncTrigger | None,
                 checks: CheckQueue, ready_mark: str | None, on_fatal: Callable[[str], None], *,
                 backend: str = "") -> None:
        super().__init__(name="pump", daemon=True)
        self.clock, self.port, self.fallback, self.cfg = clock, port, fallback, cfg
        self.q, self.wake_r, self.trigger, self.ready_mark = q, wake_r, trigger, ready_mark
        self.checks = checks
        self.on_fatal = on_fatal
        self.encoder = LogEncoder(header, motion_window_us=cfg.motion_window_ms * 1000,
                                  frame_events=cfg.frame_events)
        self.agent = AgentSide(agent_version=header.agent_version, backend=backend, width=header.width,
                               height=header.height, keymap=header.keymap,
                               resend_limit_bytes=cfg.resend_bytes, fallback=fallback.read)
        self.out = b""
        self.first_pending_ns: int | None = None
        self.stop_requested = threading.Event()
        self.stats: collections.Counter[str] = collections.Counter()
        self._store([self.encoder.start()])

    # -- events and frames
    def _store(self, frames: list[EncodedFrame]) -> None:
        for f in frames:
            self.fallback.append(f)
            self.agent.add_frame(f.seq, f.data)
            self.stats["frames"] += 1
        if self.encoder.pending == 0:
            self.first_pending_ns = None

    def _take(self, item: object) -> None:
        now = time.monotonic_ns()
        if isinstance(item, CheckAnswer):
            self.stats["checks"] += self.agent.checked(item.req_id, item.digest)
            return
        if self.encoder.ended:
            return  # stopping: the log is closed
        if isinstance(item, CaptureStarted):
            self._ready()
            return
        ev: Event
        if isinstance(item, SyncMark):
            if item.t_us < self.encoder.last_t_us:
                # input the flusher had not heard of (RECORD hands it over late) came after the
                # look was first seen: in the log before the mark, it would be replayed before it
                self.stats["sync_misplaced"] += 1
                return
            ev = item
            self.stats["sync"] += 1
        elif isinstance(item, Captured):
            t = max(self.clock.from_server(item.time_ms), self.encoder.last_t_us)
            if item.kind is InputKind.KEY:
                if not 8 <= item.code <= 255:
                    return
                ev = Key(t, item.code, item.down)
            elif item.kind is InputKind.BUTTON:
                if not 1 <= item.code <= 255:
                    return
                ev = Button(t, item.code, item.down)
            else:
                ev = Motion(t, min(max(item.x, 0), MAX_COORD), min(max(item.y, 0), MAX_COORD))
            self.agent.captured(ev)
            if self.trigger is not None:
                self.trigger.note(ev, now)
            self.stats["events"] += 1
        else:
            return
        self._store(self.encoder.add(ev))
        if self.encoder.pending and self.first_pending_ns is None:
            self.first_pending_ns = now

    def _ready(self) -> None:
        log.info("capturing")
        if self.ready_mark:
            try:
                with open(self.ready_mark, "a") as f:
                    f.write(f"RM_MARK AGENT_READY uptime={uptime():.2f}\n")
            except OSError as e:
                log.error("cannot write the ready mark to %s: %s", self.ready_mark, e)

    # -- port
    def _read(self, now: float) -> None:
        assert self.port.fd is not None
        try:
            data = os.read(self.port.fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as e:
            self._hangup(now, f"read: {e.strerror}")
            return
        if not data:
            self._hangup(now, "no host")
            return
        for ev in self.agent.receive_data(data):
            if isinstance(ev, Attached):
                self.out = b""  # a half-sent message is useless to the new host (it scans for hello)
                log.info("host attached, resending from frame %d%s", ev.resume_from,
                         " (new session)" if ev.new_session else "")
            elif isinstance(ev, Skipped):
                log.warning("skipped %d bytes from the host: %s", ev.nbytes, ev.reason)
            elif isinstance(ev, Expected):
                self.stats["expects"] += 1
            elif isinstance(ev, CheckRequested):
                self.checks.put(ev)

    def _write(self, now: float) -> None:
        assert self.port.fd is not None
        if not self.out:
            self.out = self.agent.data_to_send()
        while self.out:
            try:
                n = os.write(self.port.fd, self.out)
            except BlockingIOError:
                return
            except OSError as e:
                self._hangup(now, f"write: {e.strerror}")
                return
            self.out = self.out[n:]
            if not self.out:
                self.out = self.agent.data_to_send()

    def _hangup(self, now: float, why: str) -> None:
        if self.agent.state is AgentState.ATTACHED:
            log.info("host gone (%s); keeping frames from %d", why, self.agent.first_kept)
        self.agent.connection_lost()
        self.out = b""
        if os.path.exists(self.port.path):
            self.port.backoff(now)
        else:
            self.port.reopen_later(now)  # hot-unplugged: open it again when it comes back

    def _wants_write(self) -> bool:
        return bool(self.out) or self.agent.wants_to_send

    # -- loop
    def run(self) -> None:
        try:
            self._loop()
        except Exception as e:
            log.exception("pump failed")
            self.on_fatal(f"pump: {type(e).__name__}: {e}")

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self.wake_r, select.POLLIN)
        registered: int | None = None
        drain_until: float | None = None
        while True:
            now = time.monotonic()
            if self.stop_requested.is_set() and drain_until is None:
                self._drain_queue()
                self._store(self.encoder.end(max(self.clock.from_mono(time.monotonic_ns()),
                                                 self.encoder.last_t_us)))
                drain_until = now + self.cfg.drain_s
            if drain_until is not None and (now >= drain_until or not self._wants_write()
                                            or self.agent.state is not AgentState.ATTACHED):
                return
            self.port.ensure_open(now)
            fd = self.port.fd if self.port.usable(now) else None
            if registered is not None and registered != fd:
                poller.unregister(registered)
                registered = None
            if fd is not None:
                mask = select.POLLIN | (select.POLLOUT if self._wants_write() else 0)
                if registered is None:
                    poller.register(fd, mask)
                else:
                    poller.modify(fd, mask)
                registered = fd
            timeout = self._timeout(now)
            for rfd, revents in poller.poll(timeout):
                now = time.monotonic()
                if rfd == self.wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake_r, 4096)
                    continue
                if self.port.fd != rfd:
                    continue
                if revents & select.POLLIN:
                    self._read(now)
                elif revents & (select.POLLHUP | select.POLLERR):
                    self._hangup(now, "POLLHUP")
                    continue
                if self.port.fd == rfd and revents & select.POLLOUT:
                    self._write(now)
            self._drain_queue()
            if (self.first_pending_ns is not None
                    and time.monotonic_ns() - self.first_pending_ns >= self.cfg.frame_ms * 1_000_000):
                self._store(self.encoder.flush())
            if self.port.usable(time.monotonic()) and self._wants_write():
                self._write(time.monotonic())

    def _drain_queue(self) -> None:
        while True:
            try:
                item = self.q.get_nowait()
            except queue.Empty:
                return
            self._take(item)

    def _timeout(self, now: float) -> int:
        """Poll timeout (ms): until the frame deadline or the next look at the port."""
        waits = [1000.0]
        if self.first_pending_ns is not None:
            due = self.first_pending_ns + self.cfg.frame_ms * 1_000_000 - time.monotonic_ns()
            waits.append(max(0.0, due / 1e6))
        if self.port.fd is None or not self.port.usable(now):
            waits.append(max(0.0, (self.port.retry_at - now) * 1000))
        return int(min(waits)) + 1


# ---------------------------------------------------------------------------------------------- main


class _Stop(Exception):
    pass


def _size(s: str) -> tuple[int, int]:
    w, _, h = s.lower().partition("x")
    try:
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {s!r}") from None


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {s}")
    return v


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m recorder.agent", description=__doc__.split("\n")[0])
    p.add_argument("--port", default=DEFAULT_PORT, help="virtio-serial port (default %(default)s)")
    p.add_argument("--log-file", default=DEFAULT_LOG_FILE,
                   help="fallback log with every frame (default %(default)s, on tmpfs)")
    p.add_argument("--display", default=os.environ.get("DISPLAY", ":0"), help="X display (default $DISPLAY)")
    p.add_argument("--backend", choices=sorted(BACKENDS), default=DEFAULT_BACKEND,
                   help="capture backend (default %(default)s)")
    p.add_argument("--ready-mark", help="file/tty to write 'RM_MARK AGENT_READY uptime=S' to when capturing")
    p.add_argument("--checkpoint-id", default="", help="checkpoint the session starts from (log header)")
    p.add_argument("--frame-events", type=_positive, default=DEFAULT_FRAME_EVENTS)
    p.add_argument("--frame-ms", type=_positive, default=DEFAULT_FRAME_MS)
    p.add_argument("--motion-window-ms", type=int, default=DEFAULT_MOTION_WINDOW_MS,
                   help="coalesce motion within this window, 0 = off (default %(default)s)")
    p.add_argument("--flush-ms", type=_positive, default=DEFAULT_FLUSH_MS)
    p.add_argument("--resend-bytes", type=_positive, default=DEFAULT_RESEND_LIMIT_BYTES,
                   help="unacked frames kept in memory (default %(default)s)")
    p.add_argument("--sync-size", type=_positive, default=DEFAULT_SYNC_SIZE)
    p.add_argument("--sync-idle-ms", type=_positive, default=DEFAULT_SYNC_IDLE_MS)
    p.add_argument("--sync-window-max", type=_size, default=DEFAULT_SYNC_WINDOW_MAX, metavar="WxH")
    p.add_argument("--sync-settle-ms", type=_positive, default=DEFAULT_SYNC_SETTLE_MS,
                   help="a region must look the same this long to be marked (default %(default)s)")
    p.add_argument("--sync-sample-ms", type=_positive, default=DEFAULT_SYNC_SAMPLE_MS,
                   help="how often a settling region is sampled (default %(default)s)")
    p.add_argument("--sync-max-wait-ms", type=_positive, default=DEFAULT_SYNC_MAX_WAIT_MS,
                   help="no mark if the region has not settled by then (default %(default)s)")
    p.add_argument("--sync-follow-ms", type=_positive, default=DEFAULT_SYNC_FOLLOW_MS,
                   help="how long after the last input a marked region is watched for new looks that come "
                        "without input, each marked once settled (default %(default)s)")
    p.add_argument("--sync-follow-sample-ms", type=_positive, default=DEFAULT_SYNC_FOLLOW_SAMPLE_MS,
                   help="how often a marked region is sampled while watched (default %(default)s)")
    p.add_argument("--no-sync", action="store_true", help="no sync marks")
    p.add_argument("--retry-ms", type=_positive, default=DEFAULT_RETRY_MS)
    p.add_argument("--queue-max", type=_positive, default=DEFAULT_QUEUE_MAX)
    p.add_argument("--drain-s", type=float, default=DEFAULT_DRAIN_S)
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="recorder-agent: %(levelname)s %(message)s", stream=sys.stderr)
    policy = SyncPolicy(args.sync_size, args.sync_window_max, settle_ms=args.sync_settle_ms,
                        sample_ms=args.sync_sample_ms, max_phases=DEFAULT_SYNC_MAX_PHASES,
                        max_wait_ms=args.sync_max_wait_ms, follow_ms=args.sync_follow_ms,
                        follow_sample_ms=args.sync_follow_sample_ms)
    try:
        desktop = open_desktop(args.backend, args.display, policy)
    except BackendUnavailable as e:
        log.error("%s", e)
        return 3 if e.missing_package else 4
    capture: CaptureBackend = desktop.capture

    # the clock anchor and the header
    clock = Clock(capture.now_ms(), time.monotonic_ns(), time.time_ns() // 1000)
    screen = desktop.screen
    header = LogHeader(screen.width, screen.height, desktop.keymap, args.checkpoint_id, clock.origin_wall_us,
                       AGENT_VERSION)

    q: queue.Queue[object] = queue.Queue(maxsize=args.queue_max)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    dropped = [0]
    fatal: list[str] = []

    def wake() -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(wake_w, b"\0")

    def put(item: object) -> None:
        # called from the capture backend's thread for every event: never blocks
        try:
            q.put_nowait(item)
        except queue.Full:
            dropped[0] += 1
        wake()

    def on_fatal(why: str) -> None:
        fatal.append(why)
        os.kill(os.getpid(), signal.SIGTERM)

    sampler = screen if screen.readable else None  # the host's checks need it even with --no-sync
    trigger = SyncTrigger(args.sync_idle_ms) if sampler is not None and not args.no_sync else None
    checks = CheckQueue()
    cfg = PumpConfig(args.frame_events, args.frame_ms, args.motion_window_ms, args.resend_bytes,
                     args.retry_ms, args.drain_s)
    fallback = FallbackLog(args.log_file)
    pump = Pump(header, clock, Port(args.port, args.retry_ms), fallback, cfg, q, wake_r, trigger, checks,
                args.ready_mark, on_fatal, backend=capture.name)
    flusher = Flusher(screen, args.flush_ms, sampler, trigger, checks, clock, put, on_fatal, policy)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the shutdown short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise _Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    status = 0
    try:
        pump.start()
        flusher.start()
        capture.start(put)
        log.info("recording %s through %s (%dx%d, keymap %s) to %s and %s", args.display, capture.name,
                 header.width, header.height, header.keymap, args.port, args.log_file)
        capture.wait()  # returns only if capture ends by itself; a signal raises _Stop here
        log.error("capture ended: %s", capture.error or "no reason given")
        status = 1
    except _Stop as e:
        log.info("stopping (%s)", e)
    except Exception as e:
        log.error("capture failed: %s: %s", type(e).__name__, e)
        status = 1
    if fatal:
        log.error("%s", fatal[0])
        status = 1
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    flusher.stop.set()
    pump.stop_requested.set()
    wake()
    capture.stop(STOP_TIMEOUT_S)
    if pump.is_alive():
        pump.join(args.drain_s + 5)
    fallback.close()
    s = pump.stats
    log.info("%d events, %d sync marks (%d of screens that came without input; %d not taken: the screen "
             "never settled; %d not taken: input came after the look was first seen), %d checks answered, "
             "%d frames (%d re-read from the fallback log, %d lost), %d events dropped (queue full)",
             s["events"], s["sync"], flusher.followed, flusher.unsettled,
             flusher.misplaced + s["sync_misplaced"], s["checks"], s["frames"],
             pump.agent.recovered_frames, pump.agent.lost_frames, dropped[0])
    return status


if __name__ == "__main__":
    sys.exit(main())
