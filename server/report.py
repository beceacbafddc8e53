"""Tables for people and JSON for programs: every command's final report goes through here."""

from __future__ import annotations

import json
import sys
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
