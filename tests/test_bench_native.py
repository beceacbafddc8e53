"""bench/bench_native.py's model of shaped-link times and its rows in the migration report (pure:
the migrations themselves run in `make bench`, between two libvirt hosts)."""

from __future__ import annotations

from typing import Any

from bench import tables
from bench.bench_native import DOWNTIME_LIMIT_S, JOB_ROUND_TRIPS, merge_into, modelled_timing
from bench.netns import SHAPES, Shape

ROW = {"variant": "precopy", "compression": None, "wire_bytes": 340 << 20, "veth_bytes": 352 << 20,
       "memory_bytes": 330 << 20, "disk_bytes": 10 << 20, "total_s": 2.6, "downtime_s": 0.159, "wall_s": 3.0,
       "iterations": 3, "postcopy_requests": 0, "dirty_bytes_s": 500_000}


def test_shaped_times_are_bytes_over_the_rate_and_never_faster_than_measured() -> None:
    thin, fat = SHAPES
    t = modelled_timing(ROW, thin)
    # the veth's count (352 MiB: the disk copy too), not the job statistics' 340 MiB
    assert t["e2e_s"] == round((352 << 20) / thin.bytes_per_s + JOB_ROUND_TRIPS * 0.04, 3)   # ~4.9 min
    assert t["downtime_s"] == round(0.159 + DOWNTIME_LIMIT_S, 3)
    assert "modelled" in t["how"] and "converges" not in t
    huge = Shape(100_000, 0)                       # faster than the veth measured: the measurement stands
    assert modelled_timing(ROW, huge)["e2e_s"] == 2.6
    assert modelled_timing(ROW, fat)["e2e_s"] < t["e2e_s"]


def test_a_precopy_dirtying_faster_than_the_link_is_marked_not_converging() -> None:
    thin = SHAPES[0]
    busy = {**ROW, "dirty_bytes_s": 2 * thin.bytes_per_s}
    t = modelled_timing(busy, thin)
    assert t["converges"] is False and "would not converge" in t["how"]
    assert "converges" not in modelled_timing({**busy, "variant": "postcopy"}, thin)   # post-copy always ends


def _results(native: dict[str, Any]) -> dict[str, Any]:
    w: dict[str, Any] = {"bytes": {"replay-migrate": 400_000, "plain": 2_000_000},
                         "timing": {SHAPES[0].key: {"replay-migrate": {"e2e_s": 30.0, "downtime_s": 9.0, "how": "m"}}}}
    merge_into(w, native)
    return {"meta": {"link": {"shapes": [{"key": s.key, "name": s.name} for s in SHAPES]}}, "workloads": {"notes": w}}


def test_native_rows_join_the_report_beside_replay_and_the_reason_one_could_not_run_is_shown() -> None:
    rows = {"native-precopy": ROW, "native-postcopy": {"variant": "postcopy", "error": "post-copy cannot run: X"}}
    native = {"rows": rows, "timing": {s.key: {"native-precopy": modelled_timing(ROW, s)} for s in SHAPES}}
    results = _results(native)
    w = results["workloads"]["notes"]
    assert w["bytes"]["native-precopy"] == 352 << 20 and "native-postcopy" not in w["bytes"]
    assert w["timing"][SHAPES[0].key]["replay-migrate"]["e2e_s"] == 30.0          # kept
    md = tables.render_markdown(results)
    assert "libvirt live migration, pre-copy" in md
    assert "two libvirt hosts" in md
    assert "could not run: post-copy cannot run: X" in md
    assert "340.0 MiB" in md and "159 ms" in md


def test_a_switched_post_copy_leg_shows_its_downtime_and_statistics_as_unknown_never_zero() -> None:
    """libvirt keeps no completed statistics of a job that switched to post-copy: the row used to
    print 0 B and 0 ms. Its bytes are the veth's count; its downtime is unknown."""
    post = {**ROW, "variant": "postcopy", "wire_bytes": 0, "memory_bytes": 0, "disk_bytes": 0,
            "downtime_s": None, "postcopy_requests": 120, "postcopy_switched": True}
    t = modelled_timing(post, SHAPES[0])
    assert t["downtime_s"] is None and "downtime unknown" in t["how"]
    assert t["e2e_s"] == round((352 << 20) / SHAPES[0].bytes_per_s + JOB_ROUND_TRIPS * 0.04, 3)
    native = {"rows": {"native-postcopy": post}, "timing": {s.key: {"native-postcopy": modelled_timing(post, s)}
                                                            for s in SHAPES}}
    md = tables.render_markdown(_results(native))
    row = next(line for line in md.splitlines() if "| native-postcopy" in line)
    assert "unknown (no statistics after post-copy)" in row and "| unknown |" in row
    assert "0 ms" not in row and "| 0 B" not in row
