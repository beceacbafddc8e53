"""bench/bench_scaling.py: a small run writes its table, JSON and plot, measures every phase and
leaves no image behind (no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import bench_scaling


def test_small_run_writes_every_table(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    assert bench_scaling.main(["--sizes", "0.004,0.008", "--fractions", "0.01,0.1", "--divergences", "0.001,0.05",
                               "--divergence-size", "0.008", "--ram", "0.004", "--dir", str(work),
                               "--out", str(out)]) == 0
    text = (out / "scaling.md").read_text()
    for heading in ("## Tree build against image size", "From 4.09 MiB to 8.19 MiB", "## Walk and transfer",
                    "## Hashing inside the downtime"):
        assert heading in text
    assert "- 10.0% divergent: walk" in text  # how each phase grew with the size
    raw = json.loads((out / "scaling.json").read_text())
    assert [b["leaves"] for b in raw["builds"]] == [1048, 2097]
    assert {(d["size"], d["fraction"]) for d in raw["diffs"]} == {
        (1048 * 4096, 0.01), (1048 * 4096, 0.1), (2097 * 4096, 0.001), (2097 * 4096, 0.01), (2097 * 4096, 0.05),
        (2097 * 4096, 0.1)}
    assert all(d["divergent"] >= 1 and d["round_trips"] >= 1 and d["block_bytes"] > 0 for d in raw["diffs"])
    assert {r["backend"] for r in raw["downtime"]} >= {"python"}
    assert (out / "scaling.png").stat().st_size > 0
    assert list(work.iterdir()) == []  # the images went with the run
