"""What the recorder agent needs from the desktop it records, behind one small interface.

The agent itself (``recorder.agent``: framing, the channel, sync-mark timing, the fallback log) knows
nothing about X. A *backend* gives it two things:

- a :class:`CaptureBackend`: start/stop, and every keyboard and pointer event as a :class:`Captured`
  (X keycode or button number, pointer position, the backend's own millisecond clock), handed to
  ``emit`` from the backend's thread in the order the input happened;
- a :class:`ScreenSource`: the screen size, the region a sync mark samples and a region's pixels as
  canonical RGB (``recorder.logformat.region_digest`` hashes them), used from the agent's screen
  thread only, plus ``service()``, which that thread calls every tick to keep capture flowing.

One backend exists and is tested: ``pynput-xorg`` (``recorder.pynput_xorg``: pynput's listener on
X RECORD for the input, python-xlib for the screen and RECORD's flush). Another (pynput's win32,
darwin or uinput back-ends) is a module with an ``open_desktop(display)`` function returning a
:class:`Desktop`, registered in :data:`BACKENDS`; it must deliver X keycodes (evdev code + 8 on
Linux, a translation table elsewhere) because the log format carries them.

Standard library only: the guest runs this with Debian's python3.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

DEFAULT_BACKEND = "pynput-xorg"
BACKENDS = {"pynput-xorg": "recorder.pynput_xorg"}
"""Backend name → module with ``open_desktop(display: str) -> Desktop``."""


class InputKind(enum.Enum):
    KEY = "key"
    BUTTON = "button"
    MOTION = "motion"


@dataclass(frozen=True, slots=True)
class Captured:
    """One input event as the backend saw it."""

    kind: InputKind
    code: int
    """X keycode (8..255) for a key, button number (1..255) for a button, 0 for motion."""
    down: bool
    x: int
    y: int
    """Pointer position on the screen (pixels) when the event happened."""
    time_ms: int
    """The backend's clock in milliseconds, 32-bit and wrapping (X server time on X): the gaps between
    events come from here, not from when the agent got them."""


@dataclass(frozen=True, slots=True)
class CaptureStarted:
    """Capture is live: every event from here on is delivered (the agent's ready mark waits for it)."""


Emit = Callable[[Captured | CaptureStarted], None]


class CaptureBackend(Protocol):
    name: str
    """What the agent's hello reports, e.g. ``pynput-xorg``."""

    def now_ms(self) -> int:
        """The current time on the clock of :attr:`Captured.time_ms` (anchors the log's clock)."""
        ...

    def start(self, emit: Emit) -> None:
        """Start capturing; ``emit`` is called from the backend's thread and must never block."""
        ...

    def wait(self) -> None:
        """Block until capture ends by itself (an error: see :attr:`error`). A signal handler that
        raises interrupts it."""
        ...

    def stop(self, timeout_s: float) -> None:
        """Stop capturing; returns within about ``timeout_s`` even if the backend hangs."""
        ...

    @property
    def error(self) -> str | None:
        """Why capture ended by itself, if it did."""
        ...


class SampleError(Exception):
    """A region could not be sampled now (a window went away, the screen changed size)."""


class ScreenSource(Protocol):
    """The screen side of a backend, used from one thread (the agent's screen thread) only."""

    width: int
    height: int
    readable: bool
    """Whether regions can be sampled at all (a screen format the backend cannot read: no sync marks)."""

    def fileno(self) -> int | None:
        """A descriptor that becomes readable when :meth:`service` has work, or None."""
        ...

    def service(self, timed_out: bool) -> None:
        """Keep capture flowing; called when :meth:`fileno` is readable or a tick passed (``timed_out``)."""
        ...

    def region(self, label: str) -> tuple[int, int, int, int]:
        """The region a sync mark samples: around the pointer after a click, the focused window after
        typing (``label`` ``click`` or ``typing``). May raise SampleError."""
        ...

    def sample(self, x: int, y: int, w: int, h: int) -> bytes:
        """Canonical RGB (3 bytes a pixel, rows top down) of a region wholly on the screen; SampleError
        if it cannot be read now."""
        ...


@dataclass
class Desktop:
    capture: CaptureBackend
    screen: ScreenSource
    keymap: str
    """The keyboard layout, e.g. ``us`` or ``de(nodeadkeys)`` (the log header's keymap)."""


DEFAULT_SYNC_SIZE = 64
"""Side of the square sampled around the pointer after a click (px)."""
DEFAULT_SYNC_WINDOW_MAX = (640, 800)
"""Largest region sampled from the focused window after typing (from its top-left corner)."""


DEFAULT_SYNC_SETTLE_MS = 1000
"""A sync mark names a screen only once its region has looked the same for this long, all of it
after the mark was due (``recorder.agent.Settler``). Two equal samples 100 ms apart (the rule before)
could name the xterm between a command's Enter and its output under TCG, a screen the replaying
target had already left when it looked. Longer than the output pauses of the shipped workloads'
commands, shorter than a user's pause to read."""
DEFAULT_SYNC_MAX_PHASES = 2
"""A region that alternates between at most this many looks, the current one seen before, counts as
settled: a blinking text cursor (Tk's 600/300 ms) never holds still for ``DEFAULT_SYNC_SETTLE_MS``,
and the target sees every phase again while it waits."""
DEFAULT_SYNC_SAMPLE_MS = 200
"""How often a region is sampled while it settles: a window-sized GetImage is ~1 MB of pixels the
guest copies and digests, and the settle rule needs the interval covered, not every frame of it."""
DEFAULT_SYNC_MAX_WAIT_MS = 5000
"""A region still changing this long after the mark was due gets no mark then (a mark of a screen in
motion names a moment the target may pass before it looks: a failed mark that costs the replay its
wait and proves nothing); it is still watched (``DEFAULT_SYNC_FOLLOW_MS``) and marked once it settles."""
DEFAULT_SYNC_FOLLOW_MS = 180_000
"""How long after the last key or button the region of the due mark is watched for screens that
come without input: a command's output and prompt arriving after the screen had held still for
``DEFAULT_SYNC_SETTLE_MS`` (``tar`` under TCG: 8 s of a still command line, then its output). Each
new look it settles on gets a mark of its own, so the replayer waits for the command to finish before
it types the next one (typed into a running command, the same keys echo twice and the screen
differs for good). Longer than the longest command of the shipped workloads (``build``: ~150 s)."""
DEFAULT_SYNC_FOLLOW_SAMPLE_MS = 500
"""How often a region that was marked is sampled while it is watched for output without input:
slower than while it settles (a window-sized sample is ~1 MB the guest copies and digests, for
minutes), fast enough to cover ``DEFAULT_SYNC_SETTLE_MS`` with samples."""


@dataclass(frozen=True)
class SyncPolicy:
    """The regions sync marks sample (``ScreenSource.region``), and when a sampled region counts as
    settled enough to be marked (``recorder.agent.Settler``)."""

    size: int = DEFAULT_SYNC_SIZE
    window_max: tuple[int, int] = DEFAULT_SYNC_WINDOW_MAX
    settle_ms: int = DEFAULT_SYNC_SETTLE_MS
    sample_ms: int = DEFAULT_SYNC_SAMPLE_MS
    max_phases: int = DEFAULT_SYNC_MAX_PHASES
    max_wait_ms: int = DEFAULT_SYNC_MAX_WAIT_MS
    follow_ms: int = DEFAULT_SYNC_FOLLOW_MS
    follow_sample_ms: int = DEFAULT_SYNC_FOLLOW_SAMPLE_MS


class BackendUnavailable(Exception):
    """The backend cannot run here; the message says what to install or change. ``missing_package``:
    a package is missing (the agent exits 3), else the desktop is not usable (exit 4)."""

    def __init__(self, message: str, *, missing_package: bool = False) -> None:
        super().__init__(message)
        self.missing_package = missing_package


def open_desktop(backend: str, display: str, policy: SyncPolicy | None = None) -> Desktop:
    """Open ``backend`` on ``display`` (BackendUnavailable if it cannot run here)."""
    module = BACKENDS.get(backend)
    if module is None:
        raise BackendUnavailable(f"unknown capture backend {backend!r} (known: {', '.join(sorted(BACKENDS))})")
    opener: Callable[[str, SyncPolicy], Desktop] = importlib.import_module(module).open_desktop
    return opener(display, policy or SyncPolicy())
