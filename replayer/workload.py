"""Workload files: a scripted user session, parsed sans-I/O into abstract input actions.

One action per line; ``#`` starts a comment (outside quotes); blank lines are ignored::

    type "ls -la\\n"          type text (escapes: \\n \\t \\\\ \\"), US keyboard
    key ctrl+s               key combinations, in order; NAME*N repeats: key backspace*3 ctrl+s
    move 10 20               move the pointer to (x, y)
    click 250 400 [left|middle|right]
    doubleclick 250 400
    drag 10 20 300 400 [left|middle|right]
    scroll 250 400 up|down|left|right [N]     N wheel notches (default 1)
    wait 1.5                 seconds of idleness (the user reads, a command runs)
    check "sha256sum -c /root/x.sha256"
                             not typed: after a migration, run this with /bin/sh in the migrated VM
                             (guest agent); it must exit 0. Only checks may follow a check.

Keyboard focus in the guest follows the pointer (there is no window manager), so a workload moves
the pointer into a window before typing into it. ``synthesize()`` turns actions into the primitive
timed events a real user would produce (key press/release with human gaps, pointer paths), as log
events: the bench encodes them, a driver can inject them.

A ``check`` proves that the user's work arrived: the state-making workloads have the user type a
checksum of their result at the source (``sha256sum FILES > F.sha256``, part of the migrated state)
and check it at the target with ``sha256sum -c F.sha256``, computed in the guest after the
migration. The benchmark runs every check and fails loudly when one does not pass.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from recorder.logformat import Button, Event, Key, Motion
from replay_migrate.errors import ReplayMigrateError, UsageError
from replay_migrate.safeopen import read_regular
from replayer.keymap import Combo, Stroke, combo_keys, parse_combo, stroke_keys, text_strokes

DEFAULT_SCREEN = (1280, 800)
DEFAULT_MAX_WAIT_S = 600.0
"""Longest single ``wait``: longer is almost surely a typo (ms for s)."""
DEFAULT_MAX_TEXT_CHARS = 4096
"""Longest ``type`` string."""
DEFAULT_MAX_REPEAT = 100
"""Largest ``NAME*N`` repeat and scroll count."""
DEFAULT_MAX_ACTIONS = 100_000
DEFAULT_MAX_BYTES = 4 * 1024 * 1024
"""Largest workload file read."""

BUTTONS = {"left": 1, "middle": 2, "right": 3}
WHEEL = {"up": 4, "down": 5, "left": 6, "right": 7}
"""X buttons of the wheel directions."""


@dataclass(frozen=True, slots=True)
class TypeText:
    text: str
    strokes: tuple[Stroke, ...]
    line: int = 0


@dataclass(frozen=True, slots=True)
class PressKeys:
    combos: tuple[Combo, ...]
    line: int = 0


@dataclass(frozen=True, slots=True)
class Move:
    x: int
    y: int
    line: int = 0


@dataclass(frozen=True, slots=True)
class Click:
    x: int
    y: int
    button: int = 1
    count: int = 1
    line: int = 0


@dataclass(frozen=True, slots=True)
class Drag:
    x1: int
    y1: int
    x2: int
    y2: int
    button: int = 1
    line: int = 0


@dataclass(frozen=True, slots=True)
class Scroll:
    x: int
    y: int
    button: int
    """X wheel button: 4 up, 5 down, 6 left, 7 right."""
    count: int = 1
    line: int = 0


@dataclass(frozen=True, slots=True)
class Wait:
    seconds: float
    line: int = 0


@dataclass(frozen=True, slots=True)
class Check:
    """A shell command run in the migrated VM after a migration (not typed); exit 0 passes."""

    command: str
    line: int = 0


Action = TypeText | PressKeys | Move | Click | Drag | Scroll | Wait | Check


class _LineError(Exception):
    """A problem on the current line (internal; becomes UsageError with file:line)."""


def _tokens(line: str) -> list[str | tuple[str]]:
    """Split a line into words and quoted strings (as 1-tuples, escapes decoded); drop a comment."""
    out: list[str | tuple[str]] = []
    i, n = 0, len(line)
    escapes = {"n": "\n", "t": "\t", "\\": "\\", '"': '"'}
    while i < n:
        c = line[i]
        if c.isspace():
            i += 1
        elif c == "#":
            break
        elif c == '"':
            i += 1
            buf: list[str] = []
            while True:
                if i >= n:
                    raise _LineError("unterminated string")
                c = line[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\":
                    if i + 1 >= n or line[i + 1] not in escapes:
                        raise _LineError(f"unknown escape {line[i:i + 2]!r} (use \\n \\t \\\\ \\\")")
                    buf.append(escapes[line[i + 1]])
                    i += 2
                else:
                    buf.append(c)
                    i += 1
            out.append(("".join(buf),))
        else:
            j = i
            while j < n and not line[j].isspace() and line[j] not in '"#':
                j += 1
            out.append(line[i:j])
            i = j
    return out


@dataclass
class _Parser:
    screen: tuple[int, int]
    max_wait_s: float
    max_text_chars: int
    max_repeat: int
    line: int = 0
    args: list[str | tuple[str]] = field(default_factory=list)

    def word(self, i: int, what: str) -> str:
        if i >= len(self.args):
            raise _LineError(f"missing {what}")
        a = self.args[i]
        if isinstance(a, tuple):
            raise _LineError(f"{what} must not be quoted")
        return a

    def int_(self, i: int, what: str, lo: int, hi: int) -> int:
        w = self.word(i, what)
        if not (w.isascii() and w.isdigit()):
            raise _LineError(f"{what} {w!r} is not a whole number")
        v = int(w)
        if not lo <= v <= hi:
            raise _LineError(f"{what} {v} is not in {lo}..{hi}")
        return v

    def xy(self, i: int) -> tuple[int, int]:
        return (self.int_(i, "x", 0, self.screen[0] - 1), self.int_(i + 1, "y", 0, self.screen[1] - 1))

    def nargs(self, lo: int, hi: int) -> None:
        if not lo <= len(self.args) - 1 <= hi:
            want = str(lo) if lo == hi else f"{lo} to {hi}"
            raise _LineError(f"{self.args[0]} takes {want} arguments, got {len(self.args) - 1}")

    def button(self, i: int) -> int:
        if i >= len(self.args):
            return 1
        w = self.word(i, "button").lower()
        if w not in BUTTONS:
            raise _LineError(f"unknown button {w!r} (left, middle, right)")
        return BUTTONS[w]

    def action(self) -> Action:
        verb = self.word(0, "action").lower()
        ln = self.line
        if verb == "type":
            self.nargs(1, 1)
            arg = self.args[1]
            if not isinstance(arg, tuple):
                raise _LineError('type takes a quoted string: type "text\\n"')
            text = arg[0]
            if not text or len(text) > self.max_text_chars:
                raise _LineError(f"text must have 1..{self.max_text_chars} characters")
            try:
                strokes = text_strokes(text)
            except UsageError as e:
                raise _LineError(str(e)) from None
            return TypeText(text, tuple(strokes), ln)
        if verb == "key":
            if len(self.args) < 2:
                raise _LineError("key takes one or more key combinations")
            combos: list[Combo] = []
            for i in range(1, len(self.args)):
                spec = self.word(i, "key combination")
                name, star, rep = spec.rpartition("*") if "*" in spec[1:] else (spec, "", "")
                count = 1
                if star:
                    if not (rep.isascii() and rep.isdigit()) or not 1 <= int(rep) <= self.max_repeat:
                        raise _LineError(f"repeat count in {spec!r} is not in 1..{self.max_repeat}")
                    count = int(rep)
                try:
                    combos += [parse_combo(name)] * count
                except UsageError as e:
                    raise _LineError(str(e)) from None
            return PressKeys(tuple(combos), ln)
        if verb == "move":
            self.nargs(2, 2)
            return Move(*self.xy(1), line=ln)
        if verb in ("click", "doubleclick"):
            self.nargs(2, 3 if verb == "click" else 2)
            x, y = self.xy(1)
            return Click(x, y, self.button(3), 2 if verb == "doubleclick" else 1, ln)
        if verb == "drag":
            self.nargs(4, 5)
            x1, y1 = self.xy(1)
            x2, y2 = self.xy(3)
            return Drag(x1, y1, x2, y2, self.button(5), ln)
        if verb == "scroll":
            self.nargs(3, 4)
            x, y = self.xy(1)
            d = self.word(3, "direction").lower()
            if d not in WHEEL:
                raise _LineError(f"unknown scroll direction {d!r} (up, down, left, right)")
            n = self.int_(4, "count", 1, self.max_repeat) if len(self.args) > 4 else 1
            return Scroll(x, y, WHEEL[d], n, ln)
        if verb == "wait":
            self.nargs(1, 1)
            w = self.word(1, "seconds")
            try:
                s = float(w)
            except ValueError:
                raise _LineError(f"wait {w!r} is not a number of seconds") from None
            if not (math.isfinite(s) and 0 <= s <= self.max_wait_s):
                raise _LineError(f"wait {w} is not in 0..{self.max_wait_s} s")
            return Wait(s, ln)
        if verb == "check":
            self.nargs(1, 1)
            arg = self.args[1]
            if not isinstance(arg, tuple):
                raise _LineError('check takes a quoted shell command: check "sha256sum -c /root/x.sha256"')
            if not arg[0].strip() or len(arg[0]) > self.max_text_chars:
                raise _LineError(f"command must have 1..{self.max_text_chars} characters")
            return Check(arg[0], ln)
        raise _LineError(f"unknown action {verb!r} (type, key, move, click, doubleclick, drag, scroll, wait, "
                         "check)")


def parse_workload(
    text: str,
    *,
    source: str = "<workload>",
    screen: tuple[int, int] = DEFAULT_SCREEN,
    max_wait_s: float = DEFAULT_MAX_WAIT_S,
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
    max_repeat: int = DEFAULT_MAX_REPEAT,
    max_actions: int = DEFAULT_MAX_ACTIONS,
) -> list[Action]:
    """Parse workload text; raise UsageError naming ``source:line`` and the problem."""
    p = _Parser(screen, max_wait_s, max_text_chars, max_repeat)
    actions: list[Action] = []
    for ln, line in enumerate(text.splitlines(), 1):
        p.line = ln
        try:
            p.args = _tokens(line)
            if not p.args:
                continue
            action = p.action()
            if actions and isinstance(actions[-1], Check) and not isinstance(action, Check):
                raise _LineError("only checks may follow a check (they run after the migration)")
            actions.append(action)
        except _LineError as e:
            raise UsageError(f"{source}:{ln}: {e}") from None
        if len(actions) > max_actions:
            raise UsageError(f"{source}:{ln}: more than {max_actions} actions")
    return actions


def load_workload(
    path: str | Path, *, screen: tuple[int, int] = DEFAULT_SCREEN, max_bytes: int = DEFAULT_MAX_BYTES
) -> list[Action]:
    """Read and parse a workload file (UTF-8): a regular file (a FIFO or a device is refused, not
    waited on or read forever), at most ``max_bytes``."""
    p = Path(path)
    data = read_regular(p, "workload", max_bytes=max_bytes, error=UsageError)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{p}: not UTF-8 (byte {e.start})") from None
    return parse_workload(text, source=str(p), screen=screen)


WORKLOADS_DIR = Path(__file__).with_name("workloads")


def shipped_workloads() -> dict[str, Path]:
    """The workloads shipped with the package, by name (notes, shell, mixed, bigfile, and the
    state-making unpack, build, generate)."""
    return {p.stem: p for p in sorted(WORKLOADS_DIR.glob("*.wl"))}


def find_workload(name: str | Path) -> Path:
    """A shipped workload by name, else a workload file; UsageError naming the choices if neither.
    Every command that takes a workload looks it up here (``workload run``, ``migrate``, ``demo``)."""
    shipped = shipped_workloads()
    if str(name) in shipped:
        return shipped[str(name)]
    p = Path(name)
    if not os.path.lexists(p):
        raise UsageError(f"no workload {str(name)!r}: no such file, nor one of the shipped ones "
                         f"({', '.join(shipped)})")
    return p          # whatever it is: load_workload says why if it is not a readable regular file


def get_workload(name: str | Path, *, screen: tuple[int, int] = DEFAULT_SCREEN) -> tuple[Path, list[Action]]:
    """:func:`find_workload` and :func:`load_workload`: the path and its actions, checked before a
    command starts anything."""
    path = find_workload(name)
    return path, load_workload(path, screen=screen)


# ----------------------------------------------------------------------------------------- synthesis


@dataclass(frozen=True, slots=True)
class Timing:
    """How a synthetic user moves: ranges (min, max) in seconds, drawn uniformly."""

    key_hold: tuple[float, float] = (0.04, 0.09)
    key_gap: tuple[float, float] = (0.06, 0.20)
    """Between releasing one key and pressing the next (~7 characters/s)."""
    modifier_lead: tuple[float, float] = (0.03, 0.08)
    button_hold: tuple[float, float] = (0.06, 0.12)
    double_click_gap: tuple[float, float] = (0.08, 0.14)
    settle: tuple[float, float] = (0.10, 0.25)
    """Pause after arriving at a target before pressing."""
    motion_interval: float = 0.010
    """A pointer path reports a position this often (a 100 Hz tablet)."""
    pointer_speed: float = 1200.0
    """Pixels per second along a path."""
    scroll_gap: tuple[float, float] = (0.04, 0.10)


def synthesize(
    actions: Sequence[Action],
    *,
    seed: int = 0,
    start: tuple[int, int] = (640, 400),
    timing: Timing | None = None,
) -> list[Event]:
    """Primitive timed events (µs from 0) a user performing ``actions`` would produce; deterministic
    for a given seed. Pointer paths are straight lines with an ease-in-out, sampled every
    ``timing.motion_interval``; waits become idle time; checks make no events."""
    return timeline(actions, seed=seed, start=start, timing=timing)[0]


def session_seconds(actions: Sequence[Action], *, seed: int = 0, timing: Timing | None = None) -> float:
    """How long a user performing ``actions`` is at it, trailing waits included: what a driver
    must let pass before the session counts as done. The last event's time is not that: a workload
    that ends with ``wait 5`` (its last command's effects) has no event after it."""
    return timeline(actions, seed=seed, timing=timing)[1]


def timeline(
    actions: Sequence[Action],
    *,
    seed: int = 0,
    start: tuple[int, int] = (640, 400),
    timing: Timing | None = None,
) -> tuple[list[Event], float]:
    """:func:`synthesize`'s events, and the session's length in seconds (:func:`session_seconds`)."""
    tm = timing or Timing()
    rng = random.Random(seed)
    events: list[Event] = []
    t = 0.0
    pos = start

    def us() -> int:
        return round(t * 1e6)

    def pause(r: tuple[float, float]) -> None:
        nonlocal t
        t += rng.uniform(*r)

    def keys(seq: list[tuple[int, bool]]) -> None:
        for i, (code, down) in enumerate(seq):
            if i:
                prev_code, prev_down = seq[i - 1]
                pause(tm.key_hold if prev_down and not down and prev_code == code else tm.modifier_lead)
            events.append(Key(us(), code, down))

    def go(x: int, y: int) -> None:
        nonlocal t, pos
        x0, y0 = pos
        dist = math.hypot(x - x0, y - y0)
        steps = max(1, math.ceil(dist / (tm.pointer_speed * tm.motion_interval)))
        for i in range(1, steps + 1):
            t += tm.motion_interval
            f = i / steps
            f = f * f * (3 - 2 * f)  # ease in and out
            events.append(Motion(us(), round(x0 + (x - x0) * f), round(y0 + (y - y0) * f)))
        pos = (x, y)

    def press(button: int, down: bool) -> None:
        events.append(Button(us(), button, down))

    for a in actions:
        if isinstance(a, TypeText):
            for s in a.strokes:
                keys(stroke_keys(s))
                pause(tm.key_gap)
        elif isinstance(a, PressKeys):
            for c in a.combos:
                keys(combo_keys(c))
                pause(tm.key_gap)
        elif isinstance(a, Move):
            go(a.x, a.y)
        elif isinstance(a, Click):
            go(a.x, a.y)
            pause(tm.settle)
            for i in range(a.count):
                if i:
                    pause(tm.double_click_gap)
                press(a.button, True)
                pause(tm.button_hold)
                press(a.button, False)
            pause(tm.settle)
        elif isinstance(a, Drag):
            go(a.x1, a.y1)
            pause(tm.settle)
            press(a.button, True)
            pause(tm.button_hold)
            go(a.x2, a.y2)
            pause(tm.settle)
            press(a.button, False)
        elif isinstance(a, Scroll):
            go(a.x, a.y)
            pause(tm.settle)
            for _ in range(a.count):
                press(a.button, True)
                press(a.button, False)
                pause(tm.scroll_gap)
        elif isinstance(a, Wait):
            t += a.seconds
    return events, t


def checks(actions: Sequence[Action]) -> list[Check]:
    """The workload's checks, in order (what runs in the migrated VM after a migration)."""
    return [a for a in actions if isinstance(a, Check)]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m replayer.workload FILE...``: check workloads, print their actions and duration."""
    ap = argparse.ArgumentParser(prog="python -m replayer.workload", description="Check workload files.")
    ap.add_argument("files", nargs="+")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every action")
    args = ap.parse_args(argv)
    try:
        for f in args.files:
            actions = load_workload(find_workload(f))
            evs, dur = timeline(actions)
            waits = sum(a.seconds for a in actions if isinstance(a, Wait))
            n_checks = len(checks(actions))
            print(f"{f}: {len(actions)} actions, {len(evs)} events, ~{dur:.0f} s ({waits:.0f} s waiting)"
                  + (f", {n_checks} checks after a migration" if n_checks else ""))
            if args.verbose:
                for a in actions:
                    print(f"  {a}")
    except ReplayMigrateError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
