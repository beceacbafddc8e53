"""Sync-mark diagnosis: what each side's screen showed in a mark's region, kept as PNG files.

A failed sync mark is either a replay that drifted (the target settled on another screen), a mark
that named a screen the source only showed for a moment, or a target too slow for its wait. The
log carries only the region's digest, so telling them apart needs the pixels: with a dump folder
(``record --sync-dump``/``follow --sync-dump``, ``bench.sides --sync-dump``) the source saves the
region of every mark as its screen shows it when the mark reaches the host, and the log as it
forwarded it; the target saves the region of every mark whose wait ran out, with the looks it
showed meanwhile (``replayer.replay.SyncWait``). ``source-marks.jsonl`` and ``target-marks.jsonl``
list them, one object a line (``host_t``: the host's monotonic clock when the region was taken, one
clock for both sides on one host): both sides may share one folder.

The pixels come from QEMU's screendump (``Machine.screenshot``), not from the agent: that one
includes X's software cursor, which the agent's GetImage leaves out, so a difference of one
pointer-sized patch where the pointer is means nothing.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Protocol

from recorder.logformat import SyncMark
from replay_migrate.errors import ReplayMigrateError
from replay_migrate.safeopen import open_output, write_output
from replayer.replay import SyncWait
from vm.screen import Screenshot

MARKS_FILE = "{side}-marks.jsonl"
LOG_FILE = "source.rmlog"
"""The log as the source forwarded it (every frame, the checkpoint's too): ``python -m
recorder.logformat`` reads it, ``read_log(..., require_end=False)`` too."""

log = logging.getLogger("replay_migrate.syncdump")


class Screen(Protocol):
    """What a dump needs of a VM (``vm.machine.Machine`` is one)."""

    def screenshot(self) -> Screenshot: ...


def crop(shot: Screenshot, x: int, y: int, w: int, h: int) -> Screenshot:
    """The rectangle of ``shot`` (clipped to the screen) as a screenshot of its own."""
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(shot.width, x + w), min(shot.height, y + h)
    return Screenshot(max(0, x1 - x0), max(0, y1 - y0), shot.region(x, y, w, h))


def mark_name(side: str, mark: SyncMark) -> str:
    """``source-68162-typing.png``: the mark's log time in ms and label (a label is the agent's
    ``click`` or ``typing``; anything else in a hostile log becomes ``mark``)."""
    label = mark.label if mark.label in ("click", "typing") else "mark"
    return f"{side}-{mark.t_us // 1000}-{label}.png"


class SyncDump:
    """One side's region images, its ``{side}-marks.jsonl`` and (the source's) the forwarded log, in
    ``folder``; safe to call from several threads. Once open, a dump that cannot be written is
    logged, never a failed migration: it is diagnosis only."""

    def __init__(self, folder: Path, side: str) -> None:
        if side not in ("source", "target"):
            raise ValueError(f"side must be source or target, not {side!r}")
        self.folder, self.side = folder, side
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._marks = open_output(folder / MARKS_FILE.format(side=side), "sync marks' list")
        self._log = open_output(folder / LOG_FILE, "forwarded log") if side == "source" else None

    def close(self) -> None:
        with self._lock:
            self._marks.close()
            if self._log is not None:
                self._log.close()

    def log_frame(self, data: bytes) -> None:
        """Append one frame of the log as the source forwarded it."""
        if self._log is None:
            return
        with self._lock:
            self._log.write(data)
            self._log.flush()

    def source_mark(self, screen: Screen, mark: SyncMark) -> None:
        """The source's region of ``mark``, as its screen shows it now (the mark just arrived)."""
        self._save(screen, mark, {})

    def target_unmet(self, screen: Screen, mark: SyncMark, wait: SyncWait) -> None:
        """The target's region of ``mark`` when its wait ran out, and what it showed meanwhile."""
        looks = [{"t": round(t - wait.start, 3), "digest": d.hex()} for t, d in wait.looks]
        self._save(screen, mark, {"waited_from": wait.start, "looks": looks})

    def _save(self, screen: Screen, mark: SyncMark, extra: dict[str, object]) -> None:
        name = mark_name(self.side, mark)
        try:
            png = crop(screen.screenshot(), mark.x, mark.y, mark.w, mark.h).png()
            write_output(self.folder / name, png, "sync mark's region")
        except ReplayMigrateError as e:
            log.warning("sync dump: %s", e)
            return
        entry = {"side": self.side, "host_t": time.monotonic(), "t_s": mark.t_us / 1e6, "label": mark.label,
                 "region": [mark.x, mark.y, mark.w, mark.h], "digest": mark.digest.hex(), "png": name, **extra}
        with self._lock:
            self._marks.write((json.dumps(entry) + "\n").encode())
            self._marks.flush()
