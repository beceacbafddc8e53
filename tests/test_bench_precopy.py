"""bench/bench_precopy.py: the token bucket's commands, the rows of a converged and of an aborted
pre-copy, and the report (pure: the migrations themselves run in `make bench-precopy`)."""

from __future__ import annotations

from typing import Any

from bench.bench_precopy import (
    BURST_BYTES,
    aborted_row,
    bandwidth_text,
    converged_row,
    merge_runs,
    render_markdown,
    running_job,
    summary,
    suspended_row,
    tbf_argv,
    untbf_argv,
)
from bench.linkemu import QUEUE_BYTES


def test_the_veth_is_shaped_by_a_token_bucket_with_netems_queue_at_either_end() -> None:
    assert tbf_argv("rm-sa", 10) == ["tc", "qdisc", "replace", "dev", "rm-sa", "root", "tbf", "rate", "10mbit",
                                     "burst", str(BURST_BYTES), "limit", str(QUEUE_BYTES)]
    there = tbf_argv("rm-sb", 2.5, netns="rm-site-b")
    assert there[:4] == ["ip", "netns", "exec", "rm-site-b"] and "2.5mbit" in there
    assert untbf_argv("rm-sb", netns="rm-site-b")[-5:] == ["qdisc", "del", "dev", "rm-sb", "root"]


NATIVE = {"total_s": 262.4, "downtime_s": 0.385, "setup_s": 0.012, "memory_bytes": 300 << 20, "disk_bytes": 1 << 20,
          "iterations": 5, "dirty_rate_pages_s": 50, "page_bytes": 4096}


def test_a_converged_precopy_keeps_the_job_statistics_and_the_worst_dirty_rate_seen() -> None:
    row = converged_row(NATIVE, max_dirty_pages_s=80)
    assert row["converged"] and (row["total_s"], row["downtime_s"], row["setup_s"]) == (262.4, 0.385, 0.012)
    assert row["dirty_bytes_s"] == 50 * 4096 and row["dirty_bytes_s_max"] == 80 * 4096
    # the completed job's last rate counts if no sample saw more
    assert converged_row(NATIVE, max_dirty_pages_s=0)["dirty_bytes_s_max"] == 50 * 4096


def test_an_aborted_precopy_reports_its_last_sample_and_no_time_nor_downtime() -> None:
    sample = {"memory_processed": 500 << 20, "memory_remaining": 40 << 20, "disk_processed": 0,
              "memory_iteration": 31, "memory_dirty_rate": 400, "memory_page_size": 4096, "setup_time": 9}
    row = aborted_row(sample, 360.0, max_dirty_pages_s=600)
    assert not row["converged"] and row["total_s"] is None and row["downtime_s"] is None
    assert (row["iterations"], row["memory_remaining_bytes"], row["aborted_after_s"]) == (31, 40 << 20, 360.0)
    assert row["dirty_bytes_s"] == 400 * 4096 and row["dirty_bytes_s_max"] == 600 * 4096
    # no sample at all (the job never got going): zeros, not a crash
    assert aborted_row({}, 360.0, 0)["iterations"] == 0


def test_only_samples_of_a_job_under_way_are_kept() -> None:
    assert running_job({"type": 2, "memory_processed": 5})
    assert not running_job({"type": 0})                                     # ended
    assert not running_job({"type": 5, "memory_processed": 0, "memory_iteration": 0})   # aborted: zeroed


def test_a_precopy_finished_by_pausing_the_guest_has_the_pause_as_downtime_and_the_progress_when_paused() -> None:
    at = {"type": 2, "memory_processed": 356 << 20, "memory_remaining": 6 << 20, "memory_iteration": 12,
          "memory_dirty_rate": 302, "memory_page_size": 4096, "downtime": 6508}
    row = suspended_row({**NATIVE, "iterations": 13, "downtime_s": 0.9}, at, 360.0, paused_s=7.25,
                        max_dirty_pages_s=336)
    assert row["finish"] == "suspended" and not row["converged"]
    assert (row["downtime_s"], row["qemu_downtime_s"], row["total_s"]) == (7.25, 0.9, 262.4)
    assert (row["memory_remaining_bytes"], row["expected_downtime_s"]) == (6 << 20, 6.508)
    assert row["dirty_bytes_s"] == 302 * 4096 and row["iterations"] == 13
    md = render_markdown({**_results(), "runs": [{**_results()["runs"][0], **row}]})
    assert "the guest was paused to finish" in md and "QEMU expected a 6.5 s downtime" in md
    assert "| 7250 ms (paused) |" in md
    assert "guest paused to finish" in summary({**row, "veth_bytes": 1})


def _results() -> dict[str, Any]:
    base = {"workload": "notes", "drove": "notes.wl", "rate_mbit": 10.0, "link": "10 Mbit/s each way",
            "bandwidth": bandwidth_text(8796093022207), "veth_bytes": 302 << 20}
    ok = {**base, **converged_row(NATIVE, 80)}
    stuck = {**base, "rate_mbit": 1.0, "link": "1 Mbit/s each way",
             **aborted_row({"memory_processed": 40 << 20, "memory_remaining": 260 << 20, "memory_iteration": 1,
                            "memory_dirty_rate": 100, "memory_page_size": 4096}, 360.0, 100)}
    return {"meta": {"date": "2026-11-28 01:30 UTC", "commit": "abc1234", "host": "vm, 2 CPUs",
                     "libvirt": "libvirt 11.3.0", "qemu": "QEMU 10.0.0", "checkpoint": "bench", "memory_mib": 1024,
                     "elapsed_s": 600.0},
            "runs": [ok, stuck]}


def test_the_report_has_time_downtime_bytes_passes_dirty_rate_and_convergence_per_link() -> None:
    md = render_markdown(_results())
    assert "at commit `abc1234`" in md and "2026-11-28 01:30 UTC" in md
    ok = next(line for line in md.splitlines() if "| 10 Mbit/s each way" in line)
    assert "| unlimited (libvirt's default) | yes | 262.4 s | 385 ms | 0.01 s |" in ok
    assert "302.0 MiB (memory 300.0 MiB, disk 1.0 MiB)" in ok and "| 5 |" in ok and "1.64 Mbit/s (max 2.62)" in ok
    stuck = next(line for line in md.splitlines() if "| 1 Mbit/s each way" in line)
    assert "no: aborted after 360 s, 260.0 MiB still to send" in stuck and "| > 360 s | - |" in stuck
    assert "driven by `notes.wl` at site A" in md
    assert "did not converge in 360 s" in summary(_results()["runs"][1])
    assert bandwidth_text(12) == "12 MiB/s"


def test_a_merged_file_keeps_earlier_runs_of_what_was_not_measured_again() -> None:
    earlier = [{"workload": "notes", "rate_mbit": 10.0, "date": "old"}, {"workload": "notes", "rate_mbit": 100.0,
                                                                          "date": "old"}]
    new = [{"workload": "notes", "rate_mbit": 10, "date": "new"}, {"workload": "shell", "rate_mbit": 10.0,
                                                                   "date": "new"}]
    merged = merge_runs(earlier, new)
    assert [(r["workload"], r["rate_mbit"], r["date"]) for r in merged] == [
        ("notes", 100.0, "old"), ("notes", 10, "new"), ("shell", 10.0, "new")]
    md = render_markdown({**_results(), "runs": [{**_results()["runs"][0], "date": "2026-01-02 03:04 UTC",
                                                   "commit": "fedcba9"}]})
    assert "| 2026-01-02 03:04 UTC, `fedcba9` |" in md
