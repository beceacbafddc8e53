"""A migration's report from its two halves (issue 12 item 5), sans-I/O.

Each side measures part of a migration: the source the log it sent, the baseline and the downtime
(paused until the confirm); the target the replay; both count what they *send* of the transfer.
Run as two processes, each side sends the other its half at the end (the session's ``report``
message) and both print the same whole.  A figure that neither half brought (the other side's
report never came) is ``None``, shown as unknown, never as 0.

How a field of the report is made from the halves is declared with the field, so the merge is one
loop over the fields and a field added later merges without touching it:

- :func:`measured_by` ``(role)``: only that side can know it; the other side's half says None.
- :func:`added`: each side counts its part (what it sent); the whole is the sum, unknown unless
  both halves came.
- :func:`largest`: both sides know it alike (a map of counts per image): either, per key the larger.
- :func:`preferred` ``(role)``: both measure it; that side's value when its half came.
- :func:`all_true`: a flag that holds only when it holds on every side whose half came.
- anything else: both sides know it; the source's value when its half came, else the target's.

:func:`check_half` takes a peer's figures (already bounded in shape by the session's
:func:`server.wire.valid_figures`) against the report's fields: a name it does not know is
dropped, a figure of the wrong type is refused (the whole half is then unknown, logged: the
migration itself is done and verified, its report is a courtesy).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

from server.wire import Role

log = logging.getLogger("replay_migrate.report")

Figures = dict[str, Any]
"""One side's half, or the whole: a report's ``as_dict()``, None for what is not known."""


class Rule(enum.Enum):
    MEASURED_BY = "measured_by"
    ADDED = "added"
    LARGEST = "largest"
    PREFERRED = "preferred"
    ALL_TRUE = "all_true"
    LOCAL = "local"


_RULE: Final = "halves.rule"
_ROLE: Final = "halves.role"


def measured_by(role: Role, default: Any = 0) -> Any:
    """A field only ``role`` can know."""
    return dataclasses.field(default=default, metadata={_RULE: Rule.MEASURED_BY, _ROLE: role})


def added(default: Any = 0) -> Any:
    """A count each side keeps of what it sent: the whole is the sum of both."""
    return dataclasses.field(default=default, metadata={_RULE: Rule.ADDED})


def largest() -> Any:
    """A map of counts both sides know alike: per key, the larger."""
    return dataclasses.field(default_factory=dict, metadata={_RULE: Rule.LARGEST})


def preferred(role: Role, default: Any = 0) -> Any:
    """Both sides measure it; ``role``'s value wins when its half came."""
    return dataclasses.field(default=default, metadata={_RULE: Rule.PREFERRED, _ROLE: role})


def all_true(default: bool = False) -> Any:
    """A flag that holds only where it holds on every side that reported."""
    return dataclasses.field(default=default, metadata={_RULE: Rule.ALL_TRUE})


def local(factory: Callable[[], Any] = dict) -> Any:
    """Detail kept in this side's own report (a timeline, a breakdown of its phases, for the
    benchmark, which lays both sides' side by side): never sent to the other side (it would not fit
    the report message's bounds) and not part of the whole."""
    return dataclasses.field(default_factory=factory, metadata={_RULE: Rule.LOCAL})


def _fields(report_type: type) -> tuple[dataclasses.Field[Any], ...]:
    """The fields the halves carry (every one but the :func:`local` ones)."""
    assert dataclasses.is_dataclass(report_type)
    return tuple(f for f in dataclasses.fields(report_type) if f.metadata.get(_RULE) is not Rule.LOCAL)


def carried(report_type: type) -> frozenset[str]:
    """The names of the figures a half carries and the whole holds."""
    return frozenset(f.name for f in _fields(report_type))


def half(report_type: type, own: Mapping[str, Any], role: Role) -> Figures:
    """``own`` (a report's ``as_dict()`` as ``role`` filled it) with what only the other side can
    know set to None: what ``role`` sends the other side, and what it prints alone."""
    out = {}
    for f in _fields(report_type):
        other = f.metadata.get(_RULE) is Rule.MEASURED_BY and f.metadata[_ROLE] is not role
        out[f.name] = None if other else own.get(f.name)
    return out


def merge(report_type: type, source: Mapping[str, Any] | None, target: Mapping[str, Any] | None) -> Figures:
    """The whole report from the source's and the target's halves (either may be missing: None)."""
    halves = {Role.SOURCE: source, Role.TARGET: target}
    out: Figures = {}
    for f in _fields(report_type):
        values = {r: h.get(f.name) for r, h in halves.items() if h is not None}
        known = [v for v in values.values() if v is not None]
        rule = f.metadata.get(_RULE)
        if rule is Rule.MEASURED_BY:
            out[f.name] = values.get(f.metadata[_ROLE])
        elif rule is Rule.ADDED:
            out[f.name] = _sum(list(values.values())) if len(values) == len(Role) else None
        elif rule is Rule.LARGEST:
            out[f.name] = _largest(known)
        elif rule is Rule.ALL_TRUE:
            out[f.name] = all(known) if known else None
        else:
            first = f.metadata[_ROLE] if rule is Rule.PREFERRED else Role.SOURCE
            mine = values.get(first)
            out[f.name] = mine if mine is not None else (known[0] if known else None)
    return out


def _sum(values: list[Any]) -> Any:
    if any(v is None for v in values):
        return None
    total = sum(values)
    return round(total, 6) if isinstance(total, float) else total


def _largest(maps: list[Any]) -> dict[str, Any] | None:
    if not maps:
        return None
    out: dict[str, Any] = {}
    for m in maps:
        for k, v in m.items():
            out[k] = v if out.get(k) is None else (out[k] if v is None else max(out[k], v))
    return out


def _kind(annotation: Any) -> Callable[[Any], bool]:
    """What a field's value may be, from its annotation (the report's fields are numbers, flags,
    text and maps of counts)."""
    text = str(annotation)
    if text.startswith("bool"):
        return lambda v: type(v) is bool
    if text.startswith("int"):
        return lambda v: type(v) is int
    if text.startswith("float"):
        return lambda v: type(v) in (int, float)
    if text.startswith("str"):
        return lambda v: isinstance(v, str)
    if text.startswith("dict"):
        return lambda v: isinstance(v, dict) and all(x is None or type(x) is int for x in v.values())
    return lambda v: False


def check_half(report_type: type, figures: Mapping[str, Any], role: Role) -> Figures | None:
    """The other side's half (``role``'s), checked against the report's fields: every known name
    of the right type or None; unknown names dropped; figures that only this side can know are
    not taken from the other. None (and a warning) when a figure has the wrong type."""
    out: Figures = {}
    for f in _fields(report_type):
        v = figures.get(f.name)
        if f.metadata.get(_RULE) is Rule.MEASURED_BY and f.metadata[_ROLE] is not role:
            v = None
        elif v is not None and not _kind(f.type)(v):
            log.warning("the %s's report has a %s of type %s: its figures are not shown", role.value, f.name,
                        type(v).__name__)
            return None
        out[f.name] = v
    unknown = sorted(set(figures) - set(out))
    if unknown:
        log.info("the %s's report has figures this version does not know: %s", role.value, ", ".join(unknown))
    return out
