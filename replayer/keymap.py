"""US keyboard layout: text and key names → X keycodes (X keycode = Linux keycode + 8).

QMP ``input-send-event`` takes the Linux keycode (``qnum`` after translation), X and the log use the X
keycode; everything here is X keycodes, ``linux_keycode()`` converts. The guest runs Xorg with evdev
keycodes and the ``us`` layout, which is what these tables assume (``KEYMAP_NAME`` goes into the log
header so a replayer can refuse a log recorded with another layout).
"""

from __future__ import annotations

from dataclasses import dataclass

from replay_migrate.errors import UsageError

KEYMAP_NAME = "us"
X_OFFSET = 8
"""X keycode = Linux keycode + X_OFFSET."""


def _x(linux: int) -> int:
    return linux + X_OFFSET


# unshifted character → Linux keycode
_CHAR_LINUX: dict[str, int] = {
    **dict(zip("1234567890", range(2, 12), strict=True)),
    **dict(zip("qwertyuiop", range(16, 26), strict=True)),
    **dict(zip("asdfghjkl", range(30, 39), strict=True)),
    **dict(zip("zxcvbnm", range(44, 51), strict=True)),
    "-": 12, "=": 13, "[": 26, "]": 27, ";": 39, "'": 40, "`": 41, "\\": 43, ",": 51, ".": 52, "/": 53,
    " ": 57, "\n": 28, "\t": 15,
}
# shifted character → the unshifted character on the same key
_SHIFTED: dict[str, str] = {
    "!": "1", "@": "2", "#": "3", "$": "4", "%": "5", "^": "6", "&": "7", "*": "8", "(": "9", ")": "0",
    "_": "-", "+": "=", "{": "[", "}": "]", ":": ";", '"': "'", "~": "`", "|": "\\", "<": ",", ">": ".",
    "?": "/",
    **{c.upper(): c for c in "abcdefghijklmnopqrstuvwxyz"},
}

SHIFT = _x(42)
"""Shift_L, the shift used for shifted characters."""
CTRL = _x(29)
ALT = _x(56)
SUPER = _x(125)

# key name (lower case) → X keycode
_NAMED: dict[str, int] = {
    "escape": _x(1), "esc": _x(1), "backspace": _x(14), "tab": _x(15), "return": _x(28), "enter": _x(28),
    "space": _x(57), "capslock": _x(58), "minus": _x(12), "equal": _x(13), "bracketleft": _x(26),
    "bracketright": _x(27), "semicolon": _x(39), "apostrophe": _x(40), "grave": _x(41),
    "backslash": _x(43), "comma": _x(51), "period": _x(52), "slash": _x(53),
    "home": _x(102), "up": _x(103), "pageup": _x(104), "pgup": _x(104), "prior": _x(104), "left": _x(105),
    "right": _x(106), "end": _x(107), "down": _x(108), "pagedown": _x(109), "pgdn": _x(109),
    "next": _x(109), "insert": _x(110), "delete": _x(111), "del": _x(111), "menu": _x(127),
    **{f"f{i}": _x(58 + i) for i in range(1, 11)}, "f11": _x(87), "f12": _x(88),
}
_MODIFIERS: dict[str, int] = {
    "ctrl": CTRL, "control": CTRL, "ctrl_l": CTRL, "ctrl_r": _x(97),
    "shift": SHIFT, "shift_l": SHIFT, "shift_r": _x(54),
    "alt": ALT, "alt_l": ALT, "alt_r": _x(100),
    "super": SUPER, "super_l": SUPER, "super_r": _x(126),
}
MODIFIER_KEYCODES = frozenset(_MODIFIERS.values())


@dataclass(frozen=True, slots=True)
class Stroke:
    """One key to tap, with or without Shift held."""

    keycode: int
    shift: bool = False


@dataclass(frozen=True, slots=True)
class Combo:
    """Modifiers held (in press order) while ``key`` is tapped, e.g. ctrl+s."""

    modifiers: tuple[int, ...]
    key: int


def linux_keycode(x_keycode: int) -> int:
    """X keycode → Linux keycode (what QMP ``input-send-event`` wants, before its qnum mapping)."""
    return x_keycode - X_OFFSET


def char_stroke(ch: str) -> Stroke:
    """The key (and shift) that types ``ch`` on a US keyboard."""
    if ch in _CHAR_LINUX:
        return Stroke(_x(_CHAR_LINUX[ch]))
    if ch in _SHIFTED:
        return Stroke(_x(_CHAR_LINUX[_SHIFTED[ch]]), True)
    raise UsageError(f"no key types {ch!r} on a US keyboard")


def text_strokes(text: str) -> list[Stroke]:
    """The strokes that type ``text`` (ASCII printable, newline and tab)."""
    return [char_stroke(ch) for ch in text]


def key_code(name: str) -> int:
    """X keycode of a key by name: a letter, digit or punctuation character, a modifier, or a named key
    (return, tab, backspace, escape, space, delete, insert, home, end, pageup, pagedown, up, down, left,
    right, f1-f12, menu, capslock, minus, slash, ...). Case-insensitive for names."""
    low = name.lower()
    if low in _MODIFIERS:
        return _MODIFIERS[low]
    if low in _NAMED:
        return _NAMED[low]
    if len(name) == 1 and low in _CHAR_LINUX:
        return _x(_CHAR_LINUX[low])
    raise UsageError(f"unknown key name {name!r}")


def parse_combo(spec: str) -> Combo:
    """``ctrl+shift+t``, ``alt+f4``, ``Return``, ``ctrl+A`` (an upper-case letter or a shifted
    character as the key implies shift). Modifiers first, the key last, joined by ``+``."""
    parts = spec.split("+")
    if len(parts) >= 2 and parts[-1] == parts[-2] == "":  # "ctrl++" or "+": the key is '+'
        parts = [*parts[:-2], "+"]
    if not parts or any(p == "" for p in parts):
        raise UsageError(f"bad key combination {spec!r}")
    mods: list[int] = []
    for p in parts[:-1]:
        if p.lower() not in _MODIFIERS:
            raise UsageError(f"{p!r} in {spec!r} is not a modifier (ctrl, shift, alt, super)")
        code = _MODIFIERS[p.lower()]
        if code not in mods:
            mods.append(code)
    last = parts[-1]
    if len(last) == 1 and (last in _SHIFTED or last in _CHAR_LINUX):
        stroke = char_stroke(last)
        key = stroke.keycode
        if stroke.shift and SHIFT not in mods and _MODIFIERS["shift_r"] not in mods:
            mods.append(SHIFT)
    else:
        key = key_code(last)
    return Combo(tuple(mods), key)


def stroke_keys(stroke: Stroke) -> list[tuple[int, bool]]:
    """(keycode, down) in order to type one stroke."""
    keys = [(stroke.keycode, True), (stroke.keycode, False)]
    return [(SHIFT, True), *keys, (SHIFT, False)] if stroke.shift else keys


def combo_keys(combo: Combo) -> list[tuple[int, bool]]:
    """(keycode, down) in order: modifiers down, key down and up, modifiers up in reverse."""
    return (
        [(m, True) for m in combo.modifiers]
        + [(combo.key, True), (combo.key, False)]
        + [(m, False) for m in reversed(combo.modifiers)]
    )
