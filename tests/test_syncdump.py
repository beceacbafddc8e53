"""migration.syncdump: a mark's region cropped from the screen, listed with what the target showed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from migration.syncdump import LOG_FILE, SyncDump, crop, mark_name
from recorder.logformat import SyncMark
from replayer.replay import SyncWait
from vm.screen import Screenshot


def _screen(w: int = 8, h: int = 4) -> Screenshot:
    return Screenshot(w, h, bytes((x + 10 * y) % 256 for y in range(h) for x in range(w) for _ in range(3)))


class _Vm:
    def __init__(self, shot: Screenshot) -> None:
        self.shot = shot

    def screenshot(self) -> Screenshot:
        return self.shot


def test_crop_is_clipped_to_the_screen() -> None:
    c = crop(_screen(), 6, 2, 4, 4)
    assert (c.width, c.height) == (2, 2)
    assert c.pixel(0, 0) == _screen().pixel(6, 2) and c.pixel(1, 1) == _screen().pixel(7, 3)


def test_a_hostile_label_does_not_become_a_path() -> None:
    assert mark_name("source", SyncMark(68_162_000, 0, 0, 1, 1, b"d", "../../x")) == "source-68162-mark.png"
    assert mark_name("target", SyncMark(1_000, 0, 0, 1, 1, b"d", "typing")) == "target-1-typing.png"


def test_both_sides_write_their_regions_and_lists_into_one_folder(tmp_path: Path) -> None:
    mark = SyncMark(2_000_000, 1, 1, 4, 2, b"\x01\x02", "typing")
    src, tgt = SyncDump(tmp_path, "source"), SyncDump(tmp_path, "target")
    src.log_frame(b"frame")
    src.source_mark(_Vm(_screen()), mark)
    wait = SyncWait(10.0)
    wait.add(10.0, b"x")
    wait.add(10.5, b"x")
    wait.add(11.0, b"y")
    tgt.target_unmet(_Vm(_screen()), mark, wait)
    src.close()
    tgt.close()
    assert (tmp_path / LOG_FILE).read_bytes() == b"frame"
    assert (tmp_path / "source-2000-typing.png").read_bytes() == crop(_screen(), 1, 1, 4, 2).png()
    entry = json.loads((tmp_path / "target-marks.jsonl").read_text())
    assert entry["png"] == "target-2000-typing.png" and entry["digest"] == "0102"
    assert entry["looks"] == [{"t": 0.0, "digest": "78"}, {"t": 1.0, "digest": "79"}]
    assert json.loads((tmp_path / "source-marks.jsonl").read_text())["region"] == [1, 1, 4, 2]
    with pytest.raises(ValueError):
        SyncDump(tmp_path, "other")
