"""The report from its two halves (migration/halves.py, issue 12 item 5): run as two processes,
each side printed only its half and zeros for the rest. Now each side sends its half, both make
the same whole, the transfer's counts add up to what the one-process merge of both sides' stats
gives, and a figure no half brought is None (unknown), never 0."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, fields
from typing import Any

import pytest

from differ.protocol import ImageStats, TransferStats, TransferSummary
from migration import halves
from migration.sides import Report, whole_report
from server.wire import MAX_REPORT_MESSAGE, Role, encode, valid_figures

SOURCE_STATS = TransferStats(images={"memory": ImageStats(divergent=9, full=6, delta=4, xbase=1),
                                     "disk": ImageStats(divergent=2, full=2)},
                             root_bytes=64, walk_digest_bytes=300, leaf_digest_bytes=96, block_bytes=5000)
TARGET_STATS = TransferStats(images={"memory": ImageStats(divergent=9, referenced=2, duplicate=1, base=3),
                                     "disk": ImageStats(divergent=2)},
                             root_bytes=64, walk_digest_bytes=40, bitmap_bytes=12, fingerprint_bytes=7,
                             round_trips=5)


def source_report() -> Report:
    r = Report(log_bytes=900, log_frames=12, wire_bytes=8000, baseline_bytes=40000, downtime_s=3.25,
               catchup_s=0.8, diff_s=0.4, transfer_s=0.6, verified=True)
    r.add_transfer(SOURCE_STATS)
    r.finish()
    return r


def target_report() -> Report:
    r = Report(log_bytes=900, log_frames=12, wire_bytes=7900, events_replayed=80, sync_marks_met=3,
               replay_s=11.5, diff_s=0.5, transfer_s=0.7, verified=True)
    r.add_transfer(TARGET_STATS)
    return r


def test_a_half_leaves_what_only_the_other_side_knows_unknown() -> None:
    src, tgt = source_report().half(Role.SOURCE), target_report().half(Role.TARGET)
    assert set(src) == set(tgt) == halves.carried(Report)
    assert src["events_replayed"] is src["replay_s"] is src["sync_marks_met"] is None
    assert tgt["downtime_s"] is tgt["baseline_bytes"] is tgt["savings"] is tgt["wire_bytes"] is None
    assert tgt["catchup_s"] is None
    assert src["downtime_s"] == 3.25 and src["catchup_s"] == 0.8 and tgt["replay_s"] == 11.5


def test_both_sides_make_the_same_whole_and_the_transfer_adds_up_as_in_one_process() -> None:
    src, tgt = source_report().half(Role.SOURCE), target_report().half(Role.TARGET)
    at_source, at_target = whole_report(Role.SOURCE, src, tgt), whole_report(Role.TARGET, tgt, src)
    assert at_source == at_target
    # what migrate (one process) reports from both sides' stats merged
    one = Report()
    one.add_transfer(SOURCE_STATS.merged(TARGET_STATS))
    for f in fields(TransferSummary):
        assert at_source[f.name] == getattr(one, f.name), f.name
    assert at_source["divergent_blocks"] == {"memory": 9, "disk": 2}
    # each figure from the side that measures it; both measure the walk's times: the target's
    assert (at_source["downtime_s"], at_source["baseline_bytes"], at_source["wire_bytes"]) == (3.25, 40000, 8000)
    assert at_source["savings"] == 0.8
    assert (at_source["events_replayed"], at_source["replay_s"], at_source["sync_marks_met"]) == (80, 11.5, 3)
    assert (at_source["diff_s"], at_source["transfer_s"]) == (0.5, 0.7)
    assert at_source["log_bytes"] == 900 and at_source["verified"] is True
    assert None not in at_source.values()


def test_without_the_other_half_its_figures_are_unknown_never_zero() -> None:
    """What each side printed before: the source 'events replayed 0', 'replay 0.0 s', its own
    blocks as if they were all; the target 'downtime 0.0 s', 'savings 0.0 %'."""
    at_source = whole_report(Role.SOURCE, source_report().half(Role.SOURCE), None)
    for name in ("events_replayed", "sync_marks_met", "replay_s", "hash_bytes", "block_bytes", "referenced_blocks",
                 "delta_blocks", "full_blocks", "round_trips"):
        assert at_source[name] is None, name
    assert at_source["downtime_s"] == 3.25 and at_source["divergent_blocks"] == {"memory": 9, "disk": 2}
    at_target = whole_report(Role.TARGET, target_report().half(Role.TARGET), None)
    for name in ("downtime_s", "baseline_bytes", "savings", "wire_bytes", "block_bytes", "hash_bytes"):
        assert at_target[name] is None, name
    assert at_target["replay_s"] == 11.5 and at_target["verified"] is True


def test_the_other_sides_half_is_checked(caplog: pytest.LogCaptureFixture) -> None:
    """A peer's figures: names this version does not know are dropped, a figure only this side
    measures is never taken from the other, and a figure of the wrong type voids the half."""
    src = source_report().half(Role.SOURCE)
    tgt = {**target_report().half(Role.TARGET), "downtime_s": 0.001, "native_bytes": 5}
    at_source = whole_report(Role.SOURCE, src, tgt)
    assert at_source["downtime_s"] == 3.25 and "native_bytes" not in at_source
    for bad in ({"replay_s": "fast"}, {"events_replayed": 1.5}, {"verified": 1}, {"divergent_blocks": {"m": 1.5}},
                {"block_bytes": True}):
        with caplog.at_level(logging.WARNING, logger="replay_migrate.report"):
            assert halves.check_half(Report, {**tgt, **bad}, Role.TARGET) is None, bad
        assert whole_report(Role.SOURCE, src, {**tgt, **bad})["replay_s"] is None
    assert "not shown" in caplog.text
    assert halves.check_half(Report, {}, Role.TARGET) == dict.fromkeys(halves.carried(Report))


def test_a_half_fits_the_sessions_report_message() -> None:
    for half in (source_report().half(Role.SOURCE), target_report().half(Role.TARGET), Report().half(Role.SOURCE)):
        assert valid_figures(half)
        assert len(encode("report", figures=half)) < MAX_REPORT_MESSAGE // 4


@dataclasses.dataclass
class Later:
    """A report with a field added later and no rule declared: both know it, the source's wins."""

    strategy: str = "replay"
    hash_bytes: int = halves.added()
    replay_s: float = halves.measured_by(Role.TARGET, 0.0)


def test_a_field_without_a_rule_merges_too() -> None:
    src = halves.half(Later, asdict(Later(strategy="native", hash_bytes=3, replay_s=9.0)), Role.SOURCE)
    tgt: dict[str, Any] = halves.half(Later, asdict(Later(hash_bytes=4, replay_s=2.0)), Role.TARGET)
    assert src == {"strategy": "native", "hash_bytes": 3, "replay_s": None}
    assert halves.merge(Later, src, tgt) == {"strategy": "native", "hash_bytes": 7, "replay_s": 2.0}
    assert halves.merge(Later, None, tgt) == {"strategy": "replay", "hash_bytes": None, "replay_s": 2.0}


def test_a_sides_timeline_stays_with_it() -> None:
    """Each side's phases (a list of spans, a breakdown in seconds) are for its own report and the
    benchmark: they would not fit the report message's bounds, and are not figures of the whole."""
    r = source_report()
    r.timeline = [["source", "save", 1.0, 2.0]] * 1000
    r.downtime_breakdown = {"source save": 1.0}
    assert {"timeline", "downtime_breakdown"} <= set(r.as_dict())
    assert {"timeline", "downtime_breakdown"}.isdisjoint(halves.carried(Report))
    sent = r.half(Role.SOURCE)
    assert "timeline" not in sent and len(encode("report", figures=sent)) <= MAX_REPORT_MESSAGE
