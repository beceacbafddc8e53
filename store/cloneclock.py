"""How a clone's wall clock was set when it started, kept in its folder (``clock.json``).

``store.checkpoint.set_clock_of`` writes it; a migration's source reads it to tell the target its
timeline (``migration.guestclock``). A file, so read as hostile: bounded, and anything that is not
a record is no record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECORD = "clock.json"
"""A clone's clock record in its folder."""
MAX_RECORD_BYTES = 256
MAX_STEP_S = 20 * 365 * 86_400.0
"""Largest clock step a record may hold (the checkpoint's clock was that old)."""
MAX_OFFSET_S = 86_400.0
"""Largest guest clock offset to its host (1 day) a record, or a migration's source, may hold: a
guest further off is taken for a broken or hostile one."""


@dataclass(frozen=True)
class CloneClock:
    """How a clone's wall clock was set at its start: ``step_us``, how far the set moved it (its
    wall clock after minus before, both against the host's), and ``offset_us``, the guest's wall
    clock minus the host's right after."""

    step_us: int
    offset_us: int

    @staticmethod
    def measured(before_s: float, after_s: float) -> CloneClock:
        """From the guest-minus-host offsets read before and after the set (seconds): the step is
        their difference, so the guest agent's reply latency, the same in both reads, cancels."""
        return CloneClock(round((after_s - before_s) * 1e6), round(after_s * 1e6))


def save_record(run_dir: Path, clock: CloneClock) -> None:
    (run_dir / RECORD).write_text(json.dumps({"step_us": clock.step_us, "offset_us": clock.offset_us}) + "\n")


def load_record(run_dir: Path) -> CloneClock | None:
    """A clone's clock record, or None if there is none or it is not one."""
    try:
        with open(run_dir / RECORD, "rb") as f:
            raw = f.read(MAX_RECORD_BYTES + 1)
        if len(raw) > MAX_RECORD_BYTES:
            return None
        obj: Any = json.loads(raw)
    except (OSError, ValueError):
        return None
    if type(obj) is not dict or set(obj) != {"step_us", "offset_us"}:
        return None
    step, offset = obj["step_us"], obj["offset_us"]
    if type(step) is not int or type(offset) is not int:
        return None
    if abs(step) > MAX_STEP_S * 1e6 or abs(offset) > MAX_OFFSET_S * 1e6:
        return None
    return CloneClock(step, offset)
