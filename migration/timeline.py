"""Where a migration's downtime goes: each side notes its phases on the host's monotonic clock, and
:func:`downtime_breakdown` lays them along the critical path from the source's pause to the
target's resume.

Both sides run their own phases at once until the tree walk: the source drains its recorder, saves
and hashes; the target replays the last events, settles, freezes, saves and hashes. The walk starts
when the later of the two is ready (each side marks that moment, :data:`READY`), so before the walk
the downtime is the phases of that side (the *critical* side); the other side's ran in its shadow.
From the walk on, the target's phases are the path (walk, blocks, patching inside the blocks,
verify, commit, restore, resume and thaw): the source's reads and sends are what the target waits
on inside "walk" and "blocks". Time that no phase of the side on the path covers is a
*gap* (messages in flight, the event loop, a phase nobody timed). Phases nested in another (the
patch writes inside the blocks) take precedence over the outer one while they run.

Hooks of the benchmark and the tests (a state kept, a state compared) are phases too, marked
:data:`EXCLUDED`: they are cut out of the downtime, since a real migration does not run them.

``time.monotonic`` is CLOCK_MONOTONIC: one clock for every process of a host, so the two sides'
timelines merge when both run on one host (the embedded migration, the benchmark); across hosts
each side's own timeline is still its share.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

SOURCE = "source"
TARGET = "target"
EXCLUDED = frozenset({"keep state", "inspect"})
"""Phases that are not part of a migration (benchmark and test hooks): cut out of the downtime."""
READY = "ready"
"""A side's mark (a phase of no length) when it is ready for the walk: trees built, hello sent or
answered. The walk starts at the later side's mark, where the two sides' paths join."""
GAP = "gap"


@dataclass(frozen=True)
class Span:
    """One phase of one side, from ``start`` to ``end`` on the host's monotonic clock."""

    side: str
    phase: str
    start: float
    end: float

    @property
    def key(self) -> str:
        return f"{self.side} {self.phase}"

    def as_list(self) -> list[object]:
        return [self.side, self.phase, round(self.start, 4), round(self.end, 4)]

    @staticmethod
    def from_list(v: Sequence[object]) -> Span:
        side, phase, start, end = v
        if not isinstance(side, str) or not isinstance(phase, str):
            raise ValueError(f"not a span: {v!r}")
        return Span(side, phase, float(start), float(end))  # type: ignore[arg-type]


@dataclass
class Timeline:
    """The phases of one side, noted as they happen."""

    side: str
    clock: Callable[[], float] = time.monotonic
    spans: list[Span] = field(default_factory=list)

    def add(self, phase: str, start: float, end: float | None = None) -> Span:
        span = Span(self.side, phase, start, self.clock() if end is None else end)
        self.spans.append(span)
        return span

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Note the block's duration as phase ``name`` (also when it raises: a failed save took its
        time too)."""
        start = self.clock()
        try:
            yield
        finally:
            self.add(name, start)

    def ready(self) -> None:
        """Mark this side ready for the walk (see :data:`READY`)."""
        now = self.clock()
        self.add(READY, now, now)

    def seconds(self, phase: str) -> float:
        return sum(s.end - s.start for s in self.spans if s.phase == phase)


def _clip(spans: Iterable[Span], start: float, end: float) -> list[Span]:
    return [Span(s.side, s.phase, max(s.start, start), min(s.end, end)) for s in spans
            if s.end > start and s.start < end]


def ready_times(spans: Sequence[Span]) -> dict[str, float]:
    """When each side was ready for the walk (its :data:`READY` mark), for the sides that have one."""
    out: dict[str, float] = {}
    for s in spans:
        if s.phase == READY:
            out[s.side] = max(out.get(s.side, s.start), s.start)
    return out


def downtime_breakdown(spans: Sequence[Span], start: float, end: float) -> dict[str, float]:
    """Seconds per phase along the critical path of ``[start, end]`` (the source's pause to the
    target's resume), keyed ``"<side> <phase>"`` in the order they first ran, gaps as
    ``"<side> gap"``; the values add up to ``end - start`` minus the :data:`EXCLUDED` hooks, which
    are left out. See the module's docstring for the path: before the walk (the later side's
    :data:`READY` mark) the side that was ready last, from there the target (or the one side
    noted)."""
    if end <= start:
        return {}
    ready = ready_times(spans)
    spans = _clip(spans, start, end)
    sides = {s.side for s in spans} | set(ready)
    after = TARGET if TARGET in sides or not sides else next(iter(sides))
    if ready:
        before = max(ready, key=lambda side: (ready[side], side == TARGET))
        join = min(max(ready.values()), end)
    else:
        before, join = after, start
    cuts = sorted({start, end, join, *(s.start for s in spans), *(s.end for s in spans)})
    out: dict[str, float] = {}
    for a, b in itertools.pairwise(cuts):
        side = before if b <= join else after
        active = [s for s in spans if s.start <= a and s.end >= b and (s.side == side or s.phase in EXCLUDED)]
        if any(s.phase in EXCLUDED for s in active):
            continue  # a hook of the benchmark or a test: not part of a migration
        if active:
            key = max(active, key=lambda s: (s.start, -s.end)).key  # the innermost phase
        else:
            key = f"{side} {GAP}"
        out[key] = out.get(key, 0.0) + (b - a)
    return {k: round(v, 4) for k, v in out.items()}


def excluded_seconds(spans: Sequence[Span], start: float, end: float) -> float:
    """Time inside ``[start, end]`` that a hook (:data:`EXCLUDED`) took."""
    hooks = sorted((s.start, s.end) for s in _clip(spans, start, end) if s.phase in EXCLUDED)
    total, reach = 0.0, start
    for a, b in hooks:
        a = max(a, reach)
        if b > a:
            total += b - a
            reach = b
    return total


def merge(*timelines: Iterable[Span]) -> list[Span]:
    """One list of both sides' spans, in time order."""
    return sorted((s for t in timelines for s in t), key=lambda s: (s.start, s.end))


def spans_of(report: Mapping[str, object]) -> list[Span]:
    """The spans a report's ``timeline`` holds (as :meth:`Span.as_list` wrote them)."""
    raw = report.get("timeline") or []
    if not isinstance(raw, list):
        raise ValueError("a report's timeline is a list")
    return [Span.from_list(v) for v in raw]
