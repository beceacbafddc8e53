"""Tables for people and JSON for programs: every command's final report goes through here."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO


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


class Progress:
    """A one-line progress display on a terminal (stderr), nothing when not a TTY: what a long step
    is doing, ``done`` of ``total`` (total 0: a count without an end). Updates are throttled."""

    def __init__(self, out: TextIO | None = None, *, enabled: bool | None = None, interval_s: float = 0.2) -> None:
        self.out = out or sys.stderr
        self.enabled = self.out.isatty() if enabled is None else enabled
        self.interval_s = interval_s
        self._last = 0.0
        self._shown = False

    def __call__(self, what: str, done: int, total: int = 0) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < self.interval_s and not (total and done >= total):
            return
        self._last = now
        if total:
            width = 30
            filled = min(width, width * done // total)
            line = f"{what:<12} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
        else:
            line = f"{what:<12} {done}"
        self.out.write("\r" + line.ljust(72)[:100])
        self.out.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            self.out.write("\r" + " " * 72 + "\r")
            self.out.flush()
            self._shown = False
