"""The ``pynput-xorg`` capture backend: keyboard and pointer through pynput's Xorg listener.

What pynput's listeners hand their callbacks on X (read in pynput 1.7.5, Debian 12's and Ubuntu
22.04's python3-pynput, and upstream up to 1.8.1): ``on_press(key)``/``on_release(key)`` with a
``KeyCode`` whose ``vk`` is the *keysym* of the key, not its keycode (the keypad's digits and the
main row's share keysyms, so keycodes cannot be recovered from it), and ``on_move``/``on_click``/
``on_scroll(x, y, ...)``, with no event time at all. The log needs both: X keycodes (the replayer
injects them) and the X server's event times (a double click recorded 100 ms apart must replay as a
double click, whenever the agent happened to get it). The raw X events pynput receives carry both.

So this module reaches into pynput in exactly one place, :func:`listener_class`: it subclasses
pynput's (Xorg) mouse ``Listener`` and overrides two members of pynput's ``ListenerMixin`` that have
kept their name and meaning from pynput 1.4 to 1.8.1:

- ``_EVENTS``: the core device-event range its RECORD context records. pynput's mouse listener asks
  for (4, 8), ButtonPress..LeaveNotify; ours for KeyPress..MotionNotify, so keys, buttons and motion
  come through **one** RECORD context in the server's order (a shift-click stays a shift-click: a
  keyboard and a mouse listener would deliver on two threads, interleaved as the scheduler likes).
- ``_handler(reply)``: the callback pynput registers with RECORD for every reply. Ours decodes the
  32-byte core events itself (type, detail = keycode or button, root x/y, server time) instead of
  turning them into pynput's key objects, and says when RECORD's data starts (``StartOfData``).

Everything else is pynput's: the listener thread, the RECORD context's creation, enabling and
freeing, its displays, stop. ``tests/test_pynput_xorg.py`` runs this against the installed pynput on
a real X server. The screen and RECORD's flush are python-xlib (``recorder.xorg``): pynput has no
screen access, and its RECORD client needs the flush like any other.

pynput's Xorg backend connects to ``$DISPLAY`` when it is imported: :func:`open_desktop` sets it.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from recorder.capture import (
    BackendUnavailable,
    Captured,
    CaptureStarted,
    Desktop,
    Emit,
    InputKind,
    SyncPolicy,
)
from recorder.xorg import XScreen, check_xlib, keymap_name, server_time

log = logging.getLogger("recorder.pynput_xorg")
NAME = "pynput-xorg"
PACKAGES = "python3-pynput (Debian, Ubuntu, Fedora)"

_KEY_PRESS, _KEY_RELEASE, _BUTTON_PRESS, _BUTTON_RELEASE, _MOTION = 2, 3, 4, 5, 6
_KINDS = {
    _KEY_PRESS: (InputKind.KEY, True), _KEY_RELEASE: (InputKind.KEY, False),
    _BUTTON_PRESS: (InputKind.BUTTON, True), _BUTTON_RELEASE: (InputKind.BUTTON, False),
    _MOTION: (InputKind.MOTION, False),
}
EVENT_SIZE = 32
"""Every core X event is 32 bytes."""


def pynput_version() -> str:
    """The installed pynput's version, e.g. ``1.7.5`` (imports pynput: needs ``$DISPLAY``)."""
    from pynput import _info

    return ".".join(str(p) for p in _info.__version__)


def listener_class() -> type[Any]:
    """pynput's Xorg mouse Listener, subclassed to record every core device event raw (see the module
    docstring). The one place that depends on pynput's internals; BackendUnavailable if the installed
    pynput does not have them (or picked another backend than Xorg)."""
    import pynput.mouse
    from Xlib import X
    from Xlib.ext import record
    from Xlib.protocol import rq

    base: Any = pynput.mouse.Listener
    if not str(base.__module__).endswith("._xorg"):
        raise BackendUnavailable(f"pynput chose its {base.__module__} backend, not Xorg's (is $PYNPUT_BACKEND set?)")
    missing = [name for name in ("_EVENTS", "_handler") if not hasattr(base, name)]
    if missing:
        raise BackendUnavailable(f"pynput {pynput_version()} has no {' or '.join(missing)} in its Xorg listener: "
                                 "this agent knows pynput 1.4-1.8")

    class RawListener(base):  # type: ignore[misc]
        """pynput's listener thread and RECORD context, recording core device events raw."""

        _EVENTS = (X.KeyPress, X.MotionNotify)

        def __init__(self, emit: Emit, parse_display: Any) -> None:
            super().__init__()
            self._emit_raw = emit
            self._parse_display = parse_display
            self._field = rq.EventField(None)  # type: ignore[arg-type]  # python-xlib passes None itself
            self.failure: str | None = None

        def _handler(self, reply: Any) -> None:
            try:
                if reply.category == record.StartOfData:
                    self._emit_raw(CaptureStarted())
                    return
                if reply.category != record.FromServer or reply.client_swapped or not reply.data:
                    return
                data = reply.data
                while len(data) >= EVENT_SIZE:
                    ev, data = self._field.parse_binary_value(data, self._parse_display, None, None)
                    kind = _KINDS.get(ev.type & 0x7F)
                    if kind is not None:
                        self._emit_raw(Captured(kind[0], int(ev.detail) if kind[0] is not InputKind.MOTION else 0,
                                                kind[1], int(ev.root_x), int(ev.root_y), int(ev.time)))
            except Exception as e:  # ends pynput's RECORD loop (it swallows the exception): wait() returns
                self.failure = f"{type(e).__name__}: {e}"
                raise

    return RawListener


class PynputXorgCapture:
    """:class:`recorder.capture.CaptureBackend` over :func:`listener_class`'s listener."""

    name = NAME

    def __init__(self, listener_cls: type[Any], local: Any) -> None:
        self._cls = listener_cls
        self._local = local
        """A connection of the main thread's: the clock anchor, and event parsing (read only)."""
        self._listener: Any = None

    def now_ms(self) -> int:
        return server_time(self._local)

    def start(self, emit: Emit) -> None:
        self._listener = self._cls(emit, self._local.display)
        self._listener.start()

    def wait(self) -> None:
        self._listener.join()

    def stop(self, timeout_s: float) -> None:
        """pynput 1.7's stop waits for a reply on the RECORD connection that is busy recording, which
        can hang: it runs in a thread of its own, abandoned after ``timeout_s`` (the agent is exiting)."""
        if self._listener is None:
            return
        stopper = threading.Thread(target=self._listener.stop, name="pynput-stop", daemon=True)
        stopper.start()
        stopper.join(timeout_s)
        if stopper.is_alive():
            log.warning("pynput's listener did not stop within %.1f s", timeout_s)

    @property
    def error(self) -> str | None:
        if self._listener is None:
            return None
        failure: str | None = self._listener.failure
        return failure or ("pynput's listener ended" if not self._listener.is_alive() else None)


def open_desktop(display: str, policy: SyncPolicy) -> Desktop:
    """The pynput-xorg backend on ``display`` (BackendUnavailable: what is missing, what to install)."""
    problem = check_xlib()
    if problem is not None:
        raise BackendUnavailable(f"python3-xlib is missing: {problem}", missing_package=True)
    from Xlib import display as xdisplay
    from Xlib.error import DisplayError

    os.environ["DISPLAY"] = display  # pynput's Xorg backend connects to $DISPLAY when imported
    try:
        local, aux = xdisplay.Display(display), xdisplay.Display(display)
    except (DisplayError, OSError) as e:
        raise BackendUnavailable(f"cannot open display {display}: {e}") from e
    if not local.has_extension("RECORD"):
        raise BackendUnavailable(f"display {display} has no RECORD extension")
    try:
        cls = listener_class()
    except ImportError as e:
        raise BackendUnavailable(f"pynput is missing or cannot use the display: {e}; install {PACKAGES}",
                                 missing_package=isinstance(e, ModuleNotFoundError)) from e
    return Desktop(PynputXorgCapture(cls, local), XScreen(aux, policy), keymap_name(local))
