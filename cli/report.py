"""Tables for people and JSON for programs: every command's final report goes through here."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TextIO


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str] | None = None,
          out: TextIO | None = None) -> None:
    """Print a plain-text table (markdown-compatible pipes, aligned)."""
    out = out or sys.stdout
    cells = [[str(c) for c in r] for r in rows]
    if headers:
        cells.insert(0, [str(h) for h in headers])
    if not cells:
        return
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(max(map(len, cells)))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + " |"

    if headers:
        print(line(cells[0]), file=out)
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
        cells = cells[1:]
    for r in cells:
        print(line(r), file=out)


def emit_json(obj: Any, out: TextIO | None = None) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True), file=out or sys.stdout)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


PHASE_UNITS: Final[Mapping[str, str]] = {
    "recording": "B", "saving": "B", "hashing": "B", "walk": "B", "blocks": "B", "transfer": "blocks",
    "replay": "events", "verify": "B", "restore": "", "catch-up": "frames",
}
"""What each phase of a migration counts (``B``: bytes, shown as KiB/MiB with a rate); a phase
not listed counts plain units."""


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def progress_line(what: str, done: int, total: int, elapsed_s: float, rate: float | None,
                  note: str = "") -> str:
    """One redraw of the progress line, like rsync's ``--info=progress2``: the phase, how far (of
    how much, in %), the rate, the time in this phase; ``note`` adds what else the phase knows."""
    unit = PHASE_UNITS.get(what, "")

    def amount(n: float) -> str:
        return human_bytes(n) if unit == "B" else f"{n:,.0f}"

    howfar = amount(done) + (f" of {amount(total)}" if total else "") + ("" if unit in ("B", "") else f" {unit}")
    pct = f"{min(100, 100 * done // total):3d}%" if total > 0 else "    "
    speed = "" if rate is None else f"{amount(rate)}/s" if unit == "B" else f"{rate:.1f}/s"
    line = f"{what:<9} {howfar:>24} {pct} {speed:>11} {_clock(elapsed_s)}"
    return f"{line}  {note}" if note else line


class Progress:
    """A one-line progress display on a terminal (stderr), nothing when not a TTY: the phase of a
    long step, how far it is, its rate and its time, redrawn in place (``\\r``) and throttled to
    ``interval_s``. A new phase is drawn at once and restarts the rate and the time. Callers pass
    (phase, done, total): total 0 when the end is not known; :meth:`note` adds a detail to the
    phase (the target's lag behind the source)."""

    def __init__(self, out: TextIO | None = None, *, enabled: bool | None = None, interval_s: float = 0.2,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out or sys.stderr
        self.enabled = self.out.isatty() if enabled is None else enabled
        self.interval_s = interval_s
        self.clock = clock
        self._last = -float("inf")
        self._shown = 0
        self._phase: str | None = None
        self._start = (0.0, 0)
        self._at = (0, 0)
        self._note = ""

    def note(self, text: str) -> None:
        """A detail shown after the line until the phase changes."""
        self._note = text

    def tick(self) -> None:
        """Redraw the current phase (its time goes on while a step reports nothing: a save)."""
        if self._phase is not None:
            self(self._phase, *self._at)

    def __call__(self, what: str, done: int, total: int = 0) -> None:
        if not self.enabled:
            return
        self._at = (done, total)
        now = self.clock()
        if what != self._phase:
            self._phase, self._start, self._note = what, (now, done), ""
        elif now - self._last < self.interval_s and not (total and done >= total):
            return
        self._last = now
        t0, d0 = self._start
        elapsed = now - t0
        rate = (done - d0) / elapsed if elapsed >= 1.0 and done > d0 else None
        line = progress_line(what, done, total, elapsed, rate, self._note)
        width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)
        line = line[:width]
        self.out.write("\r" + line.ljust(self._shown))
        self.out.flush()
        self._shown = len(line)

    def close(self) -> None:
        """Clear the line (the report comes next)."""
        if self._shown:
            self.out.write("\r" + " " * self._shown + "\r")
            self.out.flush()
            self._shown = 0
        self._phase = None


async def keep_drawing(progress: Progress, every_s: float = 1.0) -> None:
    """Redraw ``progress`` every ``every_s`` until cancelled (run beside a command's work)."""
    if not progress.enabled:
        return
    while True:
        await asyncio.sleep(every_s)
        progress.tick()
