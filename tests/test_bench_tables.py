"""bench/tables.py: the markdown report and the plots from a results dict (real matplotlib)."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.tables import (
    apply_shaped_precopy,
    break_even_mbit,
    breakdown_rows,
    bytes_rows,
    checks_rows,
    downtime_tables,
    goal_lines,
    human,
    load_shaped_precopy,
    mark_rows,
    md_table,
    phase_group,
    plot_bytes,
    plot_divergence,
    plot_downtime,
    plot_time,
    render_markdown,
    residue_section,
    saving,
    short_cause,
    time_rows,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _run(wire: int) -> dict[str, Any]:
    return {"link": "10M-40ms", "e2e_s": 20.0, "downtime_s": 18.0, "replay_lag_s": 5.0, "restore_s": 1.5,
            "report": {"wire_bytes": wire, "log_bytes": 1000, "hash_bytes": 2000, "block_bytes": 50_000,
                       "fingerprint_bytes": 0},
            "target_report": {"hash_bytes": 3000, "fingerprint_bytes": 4000, "block_bytes": 0,
                              "divergent_blocks": {"memory": 100, "disk": 3}, "referenced_blocks": 40,
                              "delta_blocks": 50, "full_blocks": 13, "round_trips": 4}}


def _workload(wire: int, plain: int) -> dict[str, Any]:
    return {
        "bytes": {"replay-migrate": wire, "plain": plain, "full": 90_000_000, "rsync": 8_000_000,
                  "no-replay": 1_000_000},
        "runs": {"10M-40ms": _run(wire)},
        "timing": {
            "10M-40ms": {"replay-migrate": {"e2e_s": 20.0, "downtime_s": 18.0, "how": "measured migration"},
                         "plain": {"e2e_s": 25.0, "downtime_s": 23.0, "how": "bytes sent over the link"}},
            "100M-5ms": {"plain": {"e2e_s": 8.0, "downtime_s": 7.0, "how": "bytes sent over the link"}},
        },
        "divergence": {
            "memory": {"total": 100, "by_block": {"pc.ram": 95, "non-ram": 5},
                       "by_cause": {"content present elsewhere at the target (page placement)": 60,
                                    "<= 8 bytes differ (counters, timestamps)": 35,
                                    "device state / save header (non-RAM)": 5},
                       "by_owner": {"pixels (X framebuffer, pixmaps)": 60, "unrecognised": 35},
                       "owner_cause": {"pixels (X framebuffer, pixmaps)": {
                           "content present elsewhere at the target (page placement)": 60}},
                       "gpa_mib": {"192-256": 95}, "median_bytes_differing": 12.0},
            "disk": {"total": 3, "by_class": {"journal": 2, "inode table (inode fields: times, sizes, generation)": 1},
                     "files": {}, "inodes": {"/root/notes.txt": 1}, "note": ""},
        },
    }


RESULTS: dict[str, Any] = {
    "meta": {"date": "2026-01-01 00:00 UTC", "host": "test", "checkpoint": "bench", "virt": "TCG",
             "memory_mib": 1024, "elapsed_s": 600.0, "notes": ["a note"],
             "link": {"netem": True, "message": None,
                      "shapes": [{"key": "10M-40ms", "name": "10 Mbit/s, 40 ms RTT", "rate_mbit": 10, "rtt_ms": 40},
                                 {"key": "100M-5ms", "name": "100 Mbit/s, 5 ms RTT", "rate_mbit": 100,
                                  "rtt_ms": 5}]}},
    "workloads": {"notes": _workload(150_000, 2_000_000), "shell": _workload(400_000, 2_000_000)},
}


def test_human_and_saving() -> None:
    assert human(512) == "512 B"
    assert human(1536) == "1.5 KiB"
    assert human(3 << 30) == "3.0 GiB"
    assert saving(25, 100) == "75.0 %"
    assert saving(300, 100) == "-200.0 %"
    assert saving(1, 0) == "-"


def test_md_table_escapes_pipes() -> None:
    assert md_table(["a", "b"], [["x|y", 1]]) == "| a | b |\n|---|---|\n| x\\|y | 1 |\n"


def test_bytes_rows_compare_every_method_with_every_baseline() -> None:
    rows = bytes_rows(RESULTS)
    rm = rows[0]
    assert rm[:2] == ["notes", "replay-migrate (replay + Merkle diff)"]
    assert rm[3] == "150,000"
    assert rm[4:] == ["92.5 %", "99.8 %", "98.1 %", "85.0 %"]      # vs plain, full, rsync, no-replay
    plain = next(r for r in rows if r[1].startswith("plain"))
    assert plain[4] == ""                                          # not against itself


def test_time_rows_name_the_link_and_the_replay_lag() -> None:
    rows = time_rows(RESULTS)
    assert ["notes", "replay-migrate (replay + Merkle diff)", "10 Mbit/s, 40 ms RTT", "20.0 s", "18.0 s"] == rows[0][:5]
    assert "the target was saved 5.0 s after the source paused" in rows[0][5]
    assert any(r[2] == "100 Mbit/s, 5 ms RTT" and r[3] == "8.0 s" for r in rows)


def test_breakdown_adds_both_sides() -> None:
    row = breakdown_rows(RESULTS)[0]
    assert row[3] == human(5000) and row[4] == human(4000) and row[5] == human(50_000)
    assert row[10] == "100 / 3" and row[11] == "40 / 50 / 13"
    assert row[8] == "-"                                # no session detail in that run


def test_breakdown_accounts_every_byte_of_the_socket() -> None:
    """The session's envelopes, acks, replay progress and control messages, and the diff's leaf
    kinds and envelopes, each in a column: nothing is left as an unexplained rest."""
    results = copy.deepcopy(RESULTS)
    run = results["workloads"]["notes"]["runs"]["10M-40ms"]
    run["report"].update(kind_bytes=300, framing_bytes=200, wire_detail={
        "log_data": 1000, "log_envelopes": 2700, "diff_data": 5000 + 4000 + 50_000 + 550 + 350,
        "diff_envelopes": 400, "acks": 2600,
        "replayed": 1800, "control": 900})
    run["target_report"].update(kind_bytes=250, framing_bytes=150)
    run["report"]["wire_bytes"] = sum(run["report"]["wire_detail"].values())
    row = breakdown_rows(results)[0]
    assert row[6] == human(550) and row[7] == human(350)
    assert row[8] == " / ".join(human(v) for v in (2700, 400, 2600, 1800, 900))
    assert row[9] == human(0)


def test_sync_marks_are_reported_per_workload_and_link() -> None:
    results = copy.deepcopy(RESULTS)
    results["workloads"]["notes"]["runs"]["10M-40ms"]["replay"] = {"sync_met": 6, "sync_passed": 1, "sync_failed": []}
    results["workloads"]["shell"]["runs"]["10M-40ms"]["replay"] = {
        "sync_met": 1, "sync_failed": ["sync mark 'typing' at 102.276 s (508x732 at 1,1)"]}
    assert mark_rows(results) == [
        ["notes", "10 Mbit/s, 40 ms RTT", "6", "1", "0", "-"],
        ["shell", "10 Mbit/s, 40 ms RTT", "1", "0", "1", "sync mark 'typing' at 102.276 s (508x732 at 1,1)"]]
    lines = goal_lines(results)
    assert "- notes: 0 of 7 sync marks failed over 1 run(s) (goal: none): met" in lines
    assert "- shell: 1 of 2 sync marks failed over 1 run(s) (goal: none): NOT met" in lines
    md = render_markdown(results)
    assert "## Sync marks" in md and "| shell | 10 Mbit/s, 40 ms RTT | 1 | 0 | 1 |" in md
    assert mark_rows(RESULTS) == [] and "## Sync marks" not in render_markdown(RESULTS)   # runs without it


def test_goals_are_reported_not_asserted() -> None:
    lines = goal_lines(RESULTS)
    assert "notes: replay-migrate ships 7.5 % of the plain transfer's bytes (goal <= 10 %): met" in lines[0]
    assert "shell: replay-migrate ships 20.0 %" in lines[1] and "NOT met" in lines[1]
    assert any("notes at 10 Mbit/s" in line and "faster (met)" in line for line in lines)


def test_render_markdown(tmp_path: Path) -> None:
    md = render_markdown(RESULTS, ["bytes.png"])
    for text in ("# Migration benchmark", "## Bytes on the wire", "## Time", "## Divergence", "### notes",
                 "| pixels (X framebuffer, pixmaps) | 60 | 60 |", "/root/notes.txt", "## Goals", "![bytes](bytes.png)",
                 "- a note"):
        assert text in md
    assert "**Shaped link:** tc netem." in md               # a run from before "shaper" was recorded
    no_link = copy.deepcopy(RESULTS)
    no_link["meta"]["link"] = {"netem": False, "message": "no netem here", "shapes": []}
    assert "**Shaped link: not available.** no netem here" in render_markdown(no_link)
    assert "**Shaped link:**" not in render_markdown(no_link)
    emulated = copy.deepcopy(RESULTS)
    emulated["meta"]["link"].update(netem=False, shaper="userspace link emulator (bench/linkemu.py)")
    md = render_markdown(emulated)
    assert "**Shaped link:** userspace link emulator (bench/linkemu.py)." in md
    assert "not available" not in md and "| 10 Mbit/s, 40 ms RTT |" in md


def test_downtime_tables_per_workload_with_the_plain_transfer_for_scale() -> None:
    results = copy.deepcopy(RESULTS)
    results["workloads"]["notes"]["runs"]["10M-40ms"]["downtime_breakdown"] = {
        "target replay": 2.5, "target save": 0.75, "target gap": 0.25, "target restore": 1.0}
    md = downtime_tables(results)
    assert "### notes" in md and "### shell" not in md            # shell's run has no breakdown
    assert "| phase | 10 Mbit/s, 40 ms RTT (s) | on the critical path (10 Mbit/s, 40 ms RTT, s) |" in md
    # the groups issue 13 names, in its order, each with its phases
    assert "| target tail | 2.50 | target replay 2.50 |" in md and "| save | 0.75 | target save 0.75 |" in md
    assert md.index("| save |") < md.index("| restore |") < md.index("| gaps |")
    assert "| **downtime** | **18.00** |  |" in md
    assert "| plain transfer's downtime (same link, modelled) | 23.00 |  |" in md
    assert "## Where the downtime goes" in render_markdown(results)
    assert "## Where the downtime goes" not in render_markdown(RESULTS)
    assert phase_group("target save") == "save" and phase_group("target settle") == "target tail"
    assert phase_group("source gap") == "gaps" and phase_group("target something new") == "other"


def test_short_cause_names() -> None:
    assert short_cause("content present elsewhere at the target (page placement)") == "moved"
    assert short_cause("something new") == "something new"


def test_plots_are_pngs(tmp_path: Path) -> None:
    for fn, name in ((plot_bytes, "bytes.png"), (plot_time, "time.png"), (plot_divergence, "div.png")):
        path = fn(RESULTS, tmp_path / name)
        assert path is not None and path.read_bytes()[:8] == PNG
    assert plot_downtime(RESULTS, tmp_path / "none.png") is None    # no run has a breakdown
    with_breakdown = copy.deepcopy(RESULTS)
    with_breakdown["workloads"]["notes"]["runs"]["10M-40ms"]["downtime_breakdown"] = {"target save": 1.0,
                                                                                     "source gap": 0.5}
    path = plot_downtime(with_breakdown, tmp_path / "downtime.png")
    assert path is not None and path.read_bytes()[:8] == PNG
    no_link = copy.deepcopy(RESULTS)
    no_link["meta"]["link"]["shapes"] = []
    assert plot_time(no_link, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_break_even_rate_from_fixed_times_and_bytes() -> None:
    w = _workload(500_000, 2_000_000)
    w["timing"]["10M-40ms"]["plain"] = {"e2e_s": 5.0, "link_s": 1.6, "downtime_s": 4.0}
    w["timing"]["10M-40ms"]["replay-migrate"] = {"e2e_s": 7.4, "downtime_s": 6.0}
    # fixed: replay-migrate 7.4 - 0.4 = 7.0 s, plain 5.0 - 1.6 = 3.4 s; 12 Mbit saved / 3.6 s
    assert break_even_mbit(w, 10) == pytest.approx(12 / 3.6)
    w["timing"]["10M-40ms"]["replay-migrate"]["e2e_s"] = 3.0
    assert break_even_mbit(w, 10) == math.inf
    results = {**RESULTS, "workloads": {"notes": w}}
    w["timing"]["10M-40ms"]["replay-migrate"]["e2e_s"] = 7.4
    assert any("faster below ~3.3 Mbit/s" in line for line in goal_lines(results))


RESIDUE: dict[str, Any] = {
    "images": {
        "memory": {"divergent": 10, "held": {"the target's memory (another page)": 6, "nowhere at the target": 4},
                   "nowhere_bytes": 9000,
                   "nowhere_kinds": {"free (buddy allocator)": 3, "anonymous (process heap, stacks)": 1},
                   "nowhere_kind_bytes": {"free (buddy allocator)": 8000, "anonymous (process heap, stacks)": 1000},
                   "pairs": {"free (buddy allocator) -> page cache (file data)": 3,
                             "anonymous (process heap, stacks) -> anonymous (process heap, stacks)": 1},
                   "nowhere_like_target": {"> 1 KiB": 3, "<= 8 B": 1}},
        "disk": {"divergent": 2, "held": {"the checkpoint's disk": 2}, "nowhere_bytes": 0, "nowhere_kinds": {},
                 "nowhere_kind_bytes": {}, "pairs": {}, "nowhere_like_target": {}},
    },
    "sent": {"memory": {"referenced": 6, "duplicate": 0, "base": 0, "zero": 0, "full": 3, "delta": 0, "xbase": 1,
                        "xsim": 2},
             "disk": {"referenced": 0, "duplicate": 0, "base": 2, "zero": 0, "full": 0, "delta": 0, "xbase": 0}},
    "block_bytes": 8500, "kinds_from": "page flags", "held_anywhere": 8, "sent_as_held": 8,
}


def test_residue_section_says_where_the_residue_is_and_what_it_costs() -> None:
    md = residue_section("generate", RESIDUE)
    assert "### generate: where the residue goes" in md
    assert "Divergent leaves: memory 10, disk 2. The target holds 8 of them somewhere; the transfer took 8" in md
    assert "| the target's memory (another page) | 6 | 0 |" in md and "| the checkpoint's disk | 0 | 2 |" in md
    assert "| memory | 6 | 0 | 0 | 0 | 1 | 2 | 3 | 0 |" in md                # referenced ... xbase, xsim, full, delta
    assert "| free (buddy allocator) | 3 | 7.8 KiB | 89 % |" in md           # of 9000 bytes
    assert "| free (buddy allocator) -> page cache (file data) | 3 |" in md
    assert "> 1 KiB: 3, <= 8 B: 1" in md


def test_checks_and_state_making_goals() -> None:
    res = copy.deepcopy(RESULTS)
    wl = _workload(40_000, 2_000_000)        # 2 % of plain, 4 % of the diff without replay (1,000,000)
    wl["runs"]["10M-40ms"]["checks"] = [{"command": "sha256sum -c x", "exit_code": 0, "output": ""},
                                        {"command": "test -x y", "exit_code": 1, "output": "no y"}]
    wl["residue"] = RESIDUE
    res["workloads"]["generate"] = wl
    res["workloads"]["unpack"] = _workload(150_000, 2_000_000)    # 7.5 % of plain: not met
    assert checks_rows(res) == [["generate", "10 Mbit/s, 40 ms RTT", "`sha256sum -c x`", "passed"],
                                ["generate", "10 Mbit/s, 40 ms RTT", "`test -x y`", "FAILED (exit 1): no y"]]
    lines = goal_lines(res)
    assert any(line.startswith("- unpack: replay-migrate ships 7.5 % of the plain transfer's bytes (goal <= 5 %) "
                               "and 15.0 % of the diff without replay's (goal <= 20 %): NOT met") for line in lines)
    assert any(line.startswith("- generate: replay-migrate ships 2.0 %") and line.endswith(": met") for line in lines)
    md = render_markdown(res)
    assert "## Where the residue goes" in md and "## Checks in the migrated VM" in md
    assert "FAILED (exit 1): no y" in md


def test_the_report_names_the_checkpoints_kernel_arguments() -> None:
    """A report's bytes depend on them (init_on_free=1 cut build's ninefold): the header says which."""
    with_args = copy.deepcopy(RESULTS)
    with_args["meta"]["kernel_args"] = ["init_on_free=1"]
    assert "MiB guest, kernel arguments `init_on_free=1`)" in render_markdown(with_args)
    assert "kernel arguments none)" in render_markdown(RESULTS)


# ---- libvirt's pre-copy: measured on the shaped link where bench_precopy has it, modelled otherwise ----
MODELLED = {"e2e_s": 251.9, "downtime_s": 0.406, "how": "modelled from a migration measured ... on the unshaped veth"}


def _shaped_run(rate: float, **kw: Any) -> dict[str, Any]:
    run = {"workload": "notes", "rate_mbit": rate, "converged": True, "total_s": 262.4, "downtime_s": 0.385,
           "iterations": 5, "dirty_bytes_s": 300_000, "bandwidth": "unlimited (libvirt's default)",
           "memory_remaining_bytes": 0, "aborted_after_s": None}
    return {**run, **kw}


def _with_native() -> dict[str, Any]:
    results = copy.deepcopy(RESULTS)
    for w in results["workloads"].values():
        for link in ("10M-40ms", "100M-5ms"):
            w["timing"].setdefault(link, {})["native-precopy"] = dict(MODELLED)
    return results


def test_measured_shaped_precopy_replaces_the_model_only_for_its_workload_and_link_rate() -> None:
    results = _with_native()
    shaped = {"meta": {"date": "2026-11-28 01:30 UTC"},
              "runs": [_shaped_run(10.0, total_s=999.0), _shaped_run(10.0), _shaped_run(40.0),
                       {**_shaped_run(100.0), "workload": "elsewhere"}]}
    assert apply_shaped_precopy(results, shaped) == 1
    notes = results["workloads"]["notes"]["timing"]
    got = notes["10M-40ms"]["native-precopy"]
    # the last run of that workload at that rate; its time and downtime as measured
    assert (got["e2e_s"], got["downtime_s"]) == (262.4, 0.385)
    assert got["how"].startswith("measured on the shaped link, 2026-11-28 01:30 UTC")
    # no run of notes at 100 Mbit/s (one at 40, one of another workload): the model stays
    assert notes["100M-5ms"]["native-precopy"] == MODELLED
    assert results["workloads"]["shell"]["timing"]["10M-40ms"]["native-precopy"] == MODELLED
    # a workload without a modelled row gets none made up
    bare = copy.deepcopy(RESULTS)
    assert apply_shaped_precopy(bare, shaped) == 0
    assert "native-precopy" not in bare["workloads"]["notes"]["timing"]["10M-40ms"]
    md = render_markdown(results)
    assert "| 262.4 s | 0.4 s | measured on the shaped link, 2026-11-28 01:30 UTC" in md
    assert "modelled from a migration measured" in md                    # the others
    assert apply_shaped_precopy(_with_native(), None) == 0
    # a run merged from an earlier file names its own date
    dated = _with_native()
    apply_shaped_precopy(dated, {"meta": {"date": "file"}, "runs": [_shaped_run(10.0, date="its own")]})
    assert dated["workloads"]["notes"]["timing"]["10M-40ms"]["native-precopy"]["how"].startswith(
        "measured on the shaped link, its own")


def test_a_shaped_precopy_that_did_not_converge_has_no_downtime_and_says_so() -> None:
    results = _with_native()
    stuck = _shaped_run(10.0, converged=False, total_s=None, downtime_s=None, aborted_after_s=360.0,
                        memory_remaining_bytes=40 << 20, iterations=30, dirty_bytes_s=2_000_000)
    assert apply_shaped_precopy(results, {"meta": {"date": "d"}, "runs": [stuck]}) == 1
    got = results["workloads"]["notes"]["timing"]["10M-40ms"]["native-precopy"]
    assert got["downtime_s"] is None and got["e2e_s"] is None and got["converges"] is False
    assert "did not converge in 360 s" in got["how"] and "40.0 MiB still to send" in got["how"]
    assert "16.00 Mbit/s" in got["how"]                                   # the dirty rate against the link
    assert not any(ln.startswith("- notes at 100 Mbit/s") for ln in goal_lines(results))  # no replay run there
    line = next(ln for ln in goal_lines(results) if ln.startswith("- notes at 10 Mbit/s, 40 ms RTT: downtime"))
    assert "did not converge" in line


def test_a_shaped_precopy_finished_by_pausing_the_guest_counts_the_pause_as_its_downtime() -> None:
    results = _with_native()
    forced = _shaped_run(10.0, converged=False, finish="suspended", suspended_after_s=360.0, total_s=371.5,
                         downtime_s=7.2, memory_remaining_bytes=6 << 20, dirty_bytes_s=1_240_000)
    apply_shaped_precopy(results, {"meta": {"date": "d"}, "runs": [forced]})
    got = results["workloads"]["notes"]["timing"]["10M-40ms"]["native-precopy"]
    assert (got["e2e_s"], got["downtime_s"], got["converges"]) == (371.5, 7.2, False)
    assert "did not converge in 360 s (6.0 MiB still to send" in got["how"] and "--timeout-suspend" in got["how"]
    line = next(ln for ln in goal_lines(results) if ln.startswith("- notes at 10 Mbit/s, 40 ms RTT: downtime"))
    assert "the guest paused to finish" in line and "2.5x" in line


def test_the_downtime_goal_against_precopy_names_what_it_compares_with() -> None:
    results = _with_native()
    modelled = [ln for ln in goal_lines(results) if "vs libvirt pre-copy" in ln]
    assert any("notes" in ln and "(modelled)" in ln and "44.3x" in ln and "NOT met" in ln for ln in modelled)
    apply_shaped_precopy(results, {"meta": {"date": "d"}, "runs": [_shaped_run(10.0, downtime_s=2.0)]})
    measured = next(ln for ln in goal_lines(results) if ln.startswith("- notes at 10 Mbit/s, 40 ms RTT: downtime"))
    assert "(measured on the shaped link)" in measured and "9.0x" in measured and ": met" in measured


def test_the_shaped_precopy_file_is_read_if_there_and_refused_if_it_is_not_one(tmp_path: Path) -> None:
    assert load_shaped_precopy(tmp_path / "none.json") is None
    good = tmp_path / "p.json"
    good.write_text('{"meta": {"date": "d"}, "runs": [{"workload": "notes"}]}')
    assert load_shaped_precopy(good) == {"meta": {"date": "d"}, "runs": [{"workload": "notes"}]}
    for text in ("not json", "[]", '{"runs": []}', '{"meta": {"date": "d"}, "runs": [1]}'):
        good.write_text(text)
        with pytest.raises(ValueError, match="not a bench_precopy result"):
            load_shaped_precopy(good)


def test_the_report_written_uses_the_shaped_precopy_file_and_says_where_it_comes_from(tmp_path: Path) -> None:
    from bench.bench_migration import write_results

    shaped = tmp_path / "precopy-shaped.json"
    shaped.write_text(json.dumps({"meta": {"date": "2026-11-28 01:30 UTC", "commit": "abc1234"},
                                  "runs": [_shaped_run(10.0)]}))
    results = _with_native()
    md = write_results(results, tmp_path / "out", shaped_precopy=shaped).read_text()
    assert "measured on the shaped link, 2026-11-28 01:30 UTC" in md and "commit abc1234" in md
    # rendered again (``--render``): the note once
    again = write_results(json.loads((tmp_path / "out" / "migration.json").read_text()), tmp_path / "out",
                          shaped_precopy=shaped).read_text()
    assert again.count("are `make bench-precopy`'s") == 1
    plain = write_results(_with_native(), tmp_path / "out2", shaped_precopy=tmp_path / "absent.json").read_text()
    assert "measured on the shaped link" not in plain.split("## Time")[1].split("## libvirt")[0]
