"""QMP ``input-send-event`` events from X terms (keycodes, buttons, pixel positions).

X keycodes are Linux evdev codes + 8. QEMU takes keys as "qnum" numbers (XT set 1): equal to the
Linux code for the basic block, e0-prefixed keys get 0x80 + their set-1 code. Absolute pointer
values span 0..0x7fff; aiming at the pixel's centre, ``(x + 0.5) * 32768 / width``, is
pixel-exact (DESIGN.md §7).
"""

from __future__ import annotations

from typing import Any

from replay_migrate.errors import VMError

Event = dict[str, Any]

_EXTENDED = {96: 0x9C, 97: 0x9D, 98: 0xB5, 99: 0xB7, 100: 0xB8, 102: 0xC7, 103: 0xC8, 104: 0xC9,
             105: 0xCB, 106: 0xCD, 107: 0xCF, 108: 0xD0, 109: 0xD1, 110: 0xD2, 111: 0xD3,
             125: 0xDB, 126: 0xDC, 127: 0xDD}
"""Linux keycode → qnum for keys whose scancode has the e0 prefix (KP Enter, R-Ctrl, arrows, ...)."""
_BUTTONS = {1: "left", 2: "middle", 3: "right", 4: "wheel-up", 5: "wheel-down",
            6: "wheel-left", 7: "wheel-right", 8: "side", 9: "extra"}
ABS_MAX = 0x8000


def qnum(x_keycode: int) -> int:
    linux = x_keycode - 8
    if linux in _EXTENDED:
        return _EXTENDED[linux]
    if 0 < linux < 0x59:
        return linux
    raise VMError(f"X keycode {x_keycode} has no QEMU key number")


def key(x_keycode: int, down: bool) -> Event:
    return {"type": "key", "data": {"down": down, "key": {"type": "number", "data": qnum(x_keycode)}}}


def pointer(x: int, y: int, screen: tuple[int, int]) -> list[Event]:
    w, h = screen
    if not (0 <= x < w and 0 <= y < h):
        raise VMError(f"pointer position {x},{y} is outside the {w}x{h} screen")
    return [{"type": "abs", "data": {"axis": "x", "value": int((x + 0.5) * ABS_MAX / w)}},
            {"type": "abs", "data": {"axis": "y", "value": int((y + 0.5) * ABS_MAX / h)}}]


def button(x_button: int, down: bool) -> Event:
    try:
        name = _BUTTONS[x_button]
    except KeyError:
        raise VMError(f"X button {x_button} has no QEMU equivalent") from None
    return {"type": "btn", "data": {"down": down, "button": name}}
