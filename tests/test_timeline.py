"""migration.timeline: each side's phases and the downtime's critical path through them."""

from __future__ import annotations

import itertools

import pytest

from migration.timeline import (
    READY,
    SOURCE,
    TARGET,
    Span,
    Timeline,
    downtime_breakdown,
    excluded_seconds,
    merge,
    spans_of,
)


def _spans(side: str, *phases: tuple[str, float, float]) -> list[Span]:
    return [Span(side, name, a, b) for name, a, b in phases]


SOURCE_SPANS = _spans(SOURCE, ("freeze", -0.4, -0.1), ("pause", -0.1, 0.0), ("drain", 0.0, 0.3),
                      ("save", 0.3, 1.0), ("hash", 1.1, 1.4), (READY, 1.4, 1.4), ("walk", 1.4, 3.6),
                      ("read", 3.7, 3.8), ("blocks", 3.6, 4.9), ("confirm", 4.9, 6.2))
TARGET_SPANS = _spans(TARGET, ("replay", -30.0, 2.0), ("settle", 2.0, 2.2), ("save", 2.5, 3.0),
                      ("hash", 3.0, 3.3), (READY, 3.3, 3.3), ("walk", 3.3, 3.6), ("blocks", 3.6, 4.8),
                      ("patch", 3.9, 4.0), ("verify", 4.6, 4.8), ("inspect", 4.8, 5.0),
                      ("restore", 5.0, 5.9), ("thaw", 5.9, 6.0))


def test_a_phase_is_noted_also_when_it_fails() -> None:
    ticks = itertools.count()
    tl = Timeline(TARGET, clock=lambda: float(next(ticks)))
    with tl.phase("save"):
        pass
    with pytest.raises(RuntimeError), tl.phase("hash"):
        raise RuntimeError("the hash failed")
    tl.ready()
    assert tl.spans == [Span(TARGET, "save", 0, 1), Span(TARGET, "hash", 2, 3), Span(TARGET, READY, 4, 4)]
    assert tl.seconds("hash") == 1


def test_before_the_walk_the_side_ready_last_is_the_path_then_the_target() -> None:
    spans = merge(SOURCE_SPANS, TARGET_SPANS)
    b = downtime_breakdown(spans, 0.0, 6.0)
    # the target was ready last (3.3 s against 1.4 s): the source's save and hash ran in its shadow
    assert list(b) == ["target replay", "target settle", "target gap", "target save", "target hash",
                       "target walk", "target blocks", "target patch", "target verify", "target restore",
                       "target thaw"]
    assert b["target replay"] == pytest.approx(2.0)
    assert b["target gap"] == pytest.approx(0.3)
    assert b["target patch"] == pytest.approx(0.1)      # nested in the blocks: it wins while it runs
    assert b["target blocks"] == pytest.approx(1.2 - 0.1 - 0.2)
    # the test's hook (inspect) is left out of the downtime
    assert sum(b.values()) == pytest.approx(6.0 - 0.2)
    assert excluded_seconds(spans, 0.0, 6.0) == pytest.approx(0.2)


def test_a_source_ready_last_is_the_path_until_the_walk() -> None:
    late_source = _spans(SOURCE, ("drain", 0.0, 0.3), ("save", 0.3, 1.0), ("hash", 3.6, 3.9), (READY, 3.9, 3.9))
    spans = merge(late_source, TARGET_SPANS)
    b = downtime_breakdown(spans, 0.0, 6.0)
    assert list(b)[:4] == ["source drain", "source save", "source gap", "source hash"]
    assert b["source gap"] == pytest.approx(2.6)          # 1.0 -> 3.6: the source waited on something
    # the path joins the target's at the source's readiness (3.9 s), not at the target's hello
    assert "target walk" not in b and b["target blocks"] == pytest.approx(0.9 - 0.1 - 0.2)
    assert sum(b.values()) == pytest.approx(5.8)


def test_one_side_alone_is_its_own_path() -> None:
    b = downtime_breakdown(SOURCE_SPANS, 0.0, 6.2)
    assert list(b) == ["source drain", "source save", "source gap", "source hash", "source walk", "source blocks",
                       "source read", "source confirm"]
    assert sum(b.values()) == pytest.approx(6.2)
    assert downtime_breakdown([], 0.0, 1.0) == {"target gap": 1.0}
    assert downtime_breakdown(SOURCE_SPANS, 1.0, 1.0) == {}


def test_hooks_that_overlap_count_once() -> None:
    hooks = _spans(TARGET, ("keep state", 1.0, 3.0), ("inspect", 2.0, 4.0), ("inspect", 5.0, 9.0))
    assert excluded_seconds(hooks, 0.0, 6.0) == pytest.approx(4.0)


def test_spans_travel_as_lists_in_a_report() -> None:
    spans = merge(SOURCE_SPANS, TARGET_SPANS)
    assert spans_of({"timeline": [s.as_list() for s in spans]}) == spans
    assert spans_of({}) == []
    with pytest.raises(ValueError):
        spans_of({"timeline": [[1, 2, 3, 4]]})


def test_the_wait_for_the_target_before_the_pause_is_no_downtime_and_its_settle_none_after() -> None:
    """The source waited for the target to catch up (migration.catchup) before its pause: its flush
    and catch-up are outside the downtime, and the target's tail is only the log's end arriving
    (the source's drain), its settle of no length (it settled while the source still ran)."""
    src = _spans(SOURCE, ("flush", -3.0, -1.0), ("catch-up", -1.0, -0.4), ("freeze", -0.4, -0.1),
                 ("pause", -0.1, 0.0), ("drain", 0.0, 0.15), ("save", 0.15, 0.85), ("hash", 0.9, 1.1),
                 (READY, 1.1, 1.1), ("walk", 1.3, 2.0))
    tgt = _spans(TARGET, ("replay", -30.0, 0.2), ("settle", 0.2, 0.2), ("freeze", 0.2, 0.3), ("pause", 0.3, 0.31),
                 ("save", 0.31, 1.0), ("hash", 1.0, 1.3), (READY, 1.3, 1.3), ("walk", 1.3, 2.0))
    b = downtime_breakdown(merge(src, tgt), 0.0, 2.0)
    assert list(b) == ["target replay", "target freeze", "target pause", "target save", "target hash",
                       "target walk"]
    assert b["target replay"] == pytest.approx(0.2)
    assert sum(b.values()) == pytest.approx(2.0)
