"""bench/levers.py: the results file round-trips, the tables compute each percentage against the
baselines of the same run and the net time of a zstd level at each link, and a migration run that
wrote nothing is a failure, not a row (no VM here: the measuring paths are run by `make bench
BENCH=levers`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import levers
from bench.levers import (
    WORD_KERNEL,
    WORD_MOVED,
    WORD_OTHER,
    WORD_USER,
    CostRow,
    MigrationRow,
    ResidueRow,
    Results,
    ZstdRow,
)


def _row(variant: str, wire: int, plain: int, no_replay: int, rnd: str = "r1") -> MigrationRow:
    return MigrationRow(variant, list(levers.VARIANTS[variant]), "build", rnd, wire, 9.9, 11.8, plain, no_replay,
                        True)


def test_results_round_trip_through_the_json_file(tmp_path: Path) -> None:
    res = Results([_row("base", 100, 1000, 200)], [ZstdRow("base", "build", 3, 500, 400, 1.5)],
                  [CostRow("iof", ["init_on_free=1"], [10, 12, 11])],
                  [ResidueRow("both", "notes", "r1", 10, 4, 900, {"unrecognised": 4}, {"unrecognised": 900},
                              {WORD_MOVED: 4, WORD_USER: 1, WORD_KERNEL: 2, WORD_OTHER: 3})])
    path = tmp_path / "sub" / "levers.json"
    res.save(path)
    back = Results.load(path)
    assert back == res
    assert Results.load(tmp_path / "missing.json") == Results()


def test_percentages_are_against_the_runs_own_baselines() -> None:
    base, iof = _row("base", 5_000, 28_000, 5_800), _row("iof", 2_000, 25_000, 4_000)
    assert abs(base.of_plain - 5_000 / 28_000) < 1e-12
    assert abs(iof.of_no_replay - 0.5) < 1e-12
    table = levers.migration_table([base, iof], [CostRow("base", [], [1000, 1200, 1100]),
                                                 CostRow("iof", ["init_on_free=1"], [1210, 1200, 1320])])
    lines = table.splitlines()
    assert "| 17.9 % | 86.2 % |" in lines[2]
    assert "| 8.0 % | 50.0 % |" in lines[3]
    # the cost of a variant against the baseline's median compile: 1210 / 1100 - 1
    assert "1.2 s (+10.0 %)" in lines[3] and lines[2].endswith("| 1.1 s |")
    summary = levers.summary_table([base, iof, _row("iof", 3_000, 25_000, 4_000, "r2")])
    assert "| build | iof | 2 | 10.0 % | 62.5 % | 2,500 | 9.9 s |" in summary


def test_a_zstd_level_pays_where_its_bytes_save_more_link_time_than_its_cpu() -> None:
    rows = [ZstdRow("base", "build", 3, 1_000_000, 900_000, 2.0),
            ZstdRow("base", "build", 19, 875_000, 775_000, 2.5)]
    table = levers.zstd_table(rows).splitlines()
    # 125,000 bytes saved: 0.1 s at 10 Mbit/s, 0.01 s at 100 Mbit/s; 0.5 s more CPU; overlapped with
    # the link (0.8 s at level 3, 0.7 s at 19) the CPU is the bound: 2.5 - 2.0
    assert "| -125,000 | +0.50 s | +0.40 s | +0.49 s | +0.50 s |" in table[3]
    assert table[2].endswith("| +0 | +0.00 s | +0.00 s | +0.00 s | +0.00 s |")
    # where the link is the bound, a level that saves bytes for less CPU than the link time pays
    slow = levers.zstd_table([ZstdRow("base", "b", 3, 10_000_000, 0, 2.0),
                              ZstdRow("base", "b", 6, 9_500_000, 0, 3.0)]).splitlines()[3]
    assert slow.endswith("| +0.60 s | +0.96 s | -0.40 s |")


def test_the_report_holds_every_section_and_the_verdict() -> None:
    res = Results([_row("base", 1, 2, 3)], [ZstdRow("base", "build", 3, 5, 4, 1.0)], [CostRow("base", [], [5])])
    md = levers.render(res, "init_on_free=1 adopted.")
    for heading in ("## What was adopted", "## Migrations", "## What a kernel argument costs the user",
                    "## The blocks' zstd level"):
        assert heading in md
    assert "init_on_free=1 adopted." in md
    assert "## What was adopted" not in levers.render(res)


def test_a_migration_that_wrote_nothing_fails_and_adds_no_row(tmp_path: Path) -> None:
    args = argparse.Namespace(root=tmp_path, variant="iof", kernel_arg=None, workloads=["build"], round="r1",
                              lock=None, keep=False, zstd_levels=[], analyse_only=True)
    assert levers.migrate(args) == 1
    assert Results.load(tmp_path / "levers.json") == Results()


def test_the_lock_wraps_the_command_only_when_asked() -> None:
    assert levers._locked(["x", "y"], None) == ["x", "y"]
    assert levers._locked(["x"], Path("/tmp/l")) == ["flock", "/tmp/l", "x"]


def _words(*ws: int) -> bytes:
    return b"".join(w.to_bytes(8, "little") for w in ws)


def test_the_word_census_names_each_differing_word_by_what_either_side_holds() -> None:
    heap, lib, kern = 0x5612_3456_7890, 0x7F3A_0000_1000, 0xFFFF_8880_0123_4560
    # the heap pointer relocated by whole pages (as ASLR moves it), a pointer to another object,
    # a pointer on one side only, a kernel pointer, data
    a = _words(1, heap, heap, 7, kern, 0, 42, lib, kern)
    b = _words(1, 0x55AB_0000_1890, heap + 0x10, 8, kern + 64, kern, 42, 3, lib)
    # equal words are not counted; a user-space address on either side wins over a kernel one
    assert levers.word_census(a, b) == {WORD_MOVED: 1, WORD_USER: 3, WORD_KERNEL: 2, WORD_OTHER: 1}
    assert levers.word_census(a, a) == {WORD_MOVED: 0, WORD_USER: 0, WORD_KERNEL: 0, WORD_OTHER: 0}
    # a trailing partial word is ignored rather than misread
    assert sum(levers.word_census(a + b"x", b + b"y").values()) == 7


def test_the_residue_table_gives_each_word_kind_its_share() -> None:
    row = ResidueRow("both", "notes", "r1", 2_976, 2_193, 600_000, {"a": 5, "b": 9, "c": 1, "d": 2, "e": 3},
                     {}, {WORD_MOVED: 500, WORD_USER: 100, WORD_KERNEL: 300, WORD_OTHER: 100})
    line = levers.residue_table([row]).splitlines()[2]
    assert "| 2,976 | 2,193 | 600,000 | b 9, a 5, e 3, d 2 |" in line
    assert line.endswith("| 500 (50 %) | 100 (10 %) | 300 (30 %) | 100 (10 %) |")
    assert "## Where the residue is" in levers.render(Results(residue=[row]))


def test_a_residue_without_kept_states_fails_and_adds_no_row(tmp_path: Path) -> None:
    args = argparse.Namespace(root=tmp_path, variant="both", round="r1", workloads=["notes"])
    assert levers.residue_cmd(args) == 1
    assert Results.load(tmp_path / "levers.json") == Results()
