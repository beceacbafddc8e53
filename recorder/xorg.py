"""The X side of the agent that pynput does not cover, through python-xlib: the screen and RECORD's flush.

- :class:`XScreen` (a :class:`recorder.capture.ScreenSource`): samples screen regions with GetImage
  (the sync marks and the host's checks: one code path, so a check on the replay target computes
  its digest exactly as the recording's mark was computed), and keeps RECORD flowing: RECORD hands
  over intercepted events only when the server flushes output to *some* client (DESIGN.md §7), so
  motion could sit buffered for seconds. Its own connection selects motion and key events on the
  root window (their delivery flushes the server's output at once) and does a round trip on every
  idle tick. pynput's listener uses RECORD the same way and needs this as much as the agent's own
  RECORD client did.
- :func:`server_time`: the X server's clock (ms), which RECORD's events carry.
- :func:`keymap_name`: the XKB layout for the log header.

One connection per thread: the screen thread owns :class:`XScreen`'s; :func:`server_time` and
:func:`keymap_name` use a connection of their own.
"""

from __future__ import annotations

import logging
from typing import Any

from recorder.capture import SampleError, SyncPolicy

log = logging.getLogger("recorder.xorg")

_XLIB_MISSING: str | None = None
try:
    from Xlib import X, Xatom
    from Xlib.error import XError
except ImportError as _e:  # reported by check_xlib(): the agent's other modules work without it
    _XLIB_MISSING = str(_e)

def check_xlib() -> str | None:
    """None if python-xlib imports, else what is wrong (the agent names the package to install)."""
    return _XLIB_MISSING


class XScreen:
    """Samples screen regions to canonical RGB (see ``logformat.region_digest``) via GetImage, and keeps
    RECORD flowing (see the module docstring). Use it from one thread only."""

    def __init__(self, disp: Any, policy: SyncPolicy) -> None:
        self.d = disp
        self.policy = policy
        scr = disp.screen()
        self.root = scr.root
        self.width, self.height = scr.width_in_pixels, scr.height_in_pixels
        info = disp.display.info
        bpp = {f.depth: f.bits_per_pixel for f in info.pixmap_formats}.get(scr.root_depth)
        visual = next((v for dp in scr.allowed_depths for v in dp.visuals if v.visual_id == scr.root_visual),
                      None)
        masks = (visual.red_mask, visual.green_mask, visual.blue_mask) if visual is not None else None
        self.lsb_first = info.image_byte_order == 0
        self.readable = bpp == 32 and masks == (0xFF0000, 0x00FF00, 0x0000FF)
        if not self.readable:
            log.warning("screen is %s bpp with masks %s: sync marks and checks disabled", bpp, masks)
        self._selected = False

    # -- keeping RECORD flowing
    def fileno(self) -> int | None:
        return int(self.d.fileno())

    def service(self, timed_out: bool) -> None:
        if not self._selected:
            self.root.change_attributes(event_mask=X.PointerMotionMask | X.KeyPressMask | X.KeyReleaseMask)
            self.d.sync()
            self._selected = True
        while self.d.pending_events():
            self.d.next_event()
        if timed_out:
            self.d.get_input_focus()  # a round trip: the server writes to us, RECORD flushes

    # -- sampling
    def region(self, label: str) -> tuple[int, int, int, int]:
        """The region to sample: around the pointer for a click, the focused window for typing."""
        try:
            return self._region(label)
        except XError as e:  # a window went away between the queries
            raise SampleError(str(e)) from e

    def _region(self, label: str) -> tuple[int, int, int, int]:
        ptr = self.root.query_pointer()
        px, py = ptr.root_x, ptr.root_y
        win = None
        if label == "typing":
            focus = self.d.get_input_focus().focus
            win = focus if hasattr(focus, "id") and focus.id != self.root.id else None
            if win is None and ptr.child:  # PointerRoot focus (no window manager): the pointer's window
                win = ptr.child
        if win is not None:
            top = self._toplevel(win)
            if top is not None:
                g = top.get_geometry()
                pos = top.translate_coords(self.root, 0, 0)
                x, y = -pos.x, -pos.y
                mw, mh = self.policy.window_max
                return self._clip(x, y, min(g.width, mw), min(g.height, mh))
        s = self.policy.size
        return self._clip(px - s // 2, py - s // 2, s, s)

    def _toplevel(self, win: Any) -> Any:
        for _ in range(64):
            parent = win.query_tree().parent
            pid = getattr(parent, "id", parent)
            if not pid or pid == self.root.id:
                return win
            win = parent
        return None

    def _clip(self, x: int, y: int, w: int, h: int) -> tuple[int, int, int, int]:
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(self.width, x + w), min(self.height, y + h)
        return x0, y0, max(1, x1 - x0), max(1, y1 - y0)

    def sample(self, x: int, y: int, w: int, h: int) -> bytes:
        """Canonical RGB of a region (within the screen; X raises BadMatch otherwise). A whole
        1280x800 screen measured ~35 ms on Xvfb (GetImage + reordering)."""
        try:
            data = self.root.get_image(x, y, w, h, X.ZPixmap, 0xFFFFFFFF).data
        except XError as e:  # e.g. the screen shrank (RandR) since we connected
            raise SampleError(str(e)) from e
        rgb = bytearray(w * h * 3)
        r, g, b = (2, 1, 0) if self.lsb_first else (1, 2, 3)
        rgb[0::3] = data[r::4]
        rgb[1::3] = data[g::4]
        rgb[2::3] = data[b::4]
        return bytes(rgb)


def server_time(disp: Any) -> int:
    """The X server's current time (ms): change a property on a scratch window and read the
    PropertyNotify's timestamp."""
    win = disp.screen().root.create_window(-1, -1, 1, 1, 0, X.CopyFromParent,
                                           override_redirect=True, event_mask=X.PropertyChangeMask)
    win.change_property(Xatom.WM_NAME, Xatom.STRING, 8, b"replay-migrate-clock")
    disp.flush()
    while True:
        ev = disp.next_event()
        if ev.type == X.PropertyNotify and ev.window.id == win.id:
            t = int(ev.time)
            win.destroy()
            disp.flush()
            return t


def keymap_name(disp: Any) -> str:
    """The XKB layout (and variant) from the root window's _XKB_RULES_NAMES, e.g. ``us``."""
    try:
        prop = disp.screen().root.get_full_property(disp.intern_atom("_XKB_RULES_NAMES"), Xatom.STRING)
        if prop is not None:
            raw = prop.value if isinstance(prop.value, bytes | str) else bytes(prop.value)
            names = (raw.decode("latin-1") if isinstance(raw, bytes) else raw).split("\0")
            layout = names[2] if len(names) > 2 else ""
            variant = names[3] if len(names) > 3 else ""
            if layout:
                return f"{layout}({variant})" if variant else layout
    except Exception as e:  # the property is a nicety: never fail the agent for it
        log.debug("no XKB rules names: %s", e)
    return "us"
