"""The two state machines of the diff protocol as tables, in code (h11's ``_state.py`` is the model).

For each state of a side: the triggers it accepts (a message from the peer, or a call of this
side's own code) and the states the side may be in after handling it. The endpoints look their
handlers up by message type after :func:`allowed` passed, and check the state a handler left them
in against the table; the README's diagrams are rendered from the tables (:func:`diagram`, checked
by the tests) and the tests walk every pair that is *not* in them.

Two rules hold in every table: in every live state a ``failed`` message, :meth:`abort` or an error
lead to FAILED (added by :func:`_with_failure`, so no state can forget them); in a terminal state
(VERIFIED, FAILED) nothing is accepted: a late message is refused without changing the state (a
verified side has committed, and a bogus message must not turn that into FAILED), and ``abort()``
does nothing.

A message that is not allowed is the peer's fault (:class:`ProtocolError`); a call that is not
allowed is this side's (:class:`LocalProtocolError`: refused, nothing changes, nothing is sent).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TypeVar

from differ.protocol.messages import MsgType
from replay_migrate.errors import LocalProtocolError, ProtocolError


class SourceState(enum.Enum):
    IDLE = "idle"
    """Waiting for the target's hello."""
    WALKING = "walking"
    SENDING = "sending"
    SENT = "sent"
    """All batches and the end message are out; waiting for acks, verified or resume."""
    VERIFIED = "verified"
    FAILED = "failed"


class TargetState(enum.Enum):
    IDLE = "idle"
    """Before :meth:`Target.start`."""
    HELLO_SENT = "hello_sent"
    WALKING = "walking"
    RECEIVING = "receiving"
    VERIFIED = "verified"
    FAILED = "failed"


class Call(enum.Enum):
    """This side's own calls that move it (its caller's, not the peer's doing)."""

    START = "start()"
    RESUME = "resume()"
    ABORT = "abort()"


S = TypeVar("S", SourceState, TargetState)
Trigger = MsgType | Call
Table = Mapping[S, Mapping[Trigger, frozenset[S]]]


def _with_failure(table: dict[S, dict[Trigger, frozenset[S]]], failed: S) -> dict[S, dict[Trigger, frozenset[S]]]:
    """The table with ``failed`` messages and ``abort()`` leading to FAILED from every live state."""
    for row in table.values():
        if row:  # live
            row[MsgType.FAILED] = row[Call.ABORT] = frozenset({failed})
    return table


def _to(*states: S) -> frozenset[S]:
    return frozenset(states)


_S = SourceState
SOURCE: Table[SourceState] = _with_failure({
    _S.IDLE: {MsgType.HELLO: _to(_S.WALKING)},
    _S.WALKING: {MsgType.WALK: _to(_S.WALKING), MsgType.WANT: _to(_S.SENDING, _S.SENT)},
    # the source emits batches up to the window and then the end message: SENT once it is out
    _S.SENDING: {MsgType.ACK: _to(_S.SENDING, _S.SENT), MsgType.RESUME: _to(_S.SENDING, _S.SENT),
                 Call.RESUME: _to(_S.SENDING, _S.SENT)},
    _S.SENT: {MsgType.ACK: _to(_S.SENT), MsgType.RESUME: _to(_S.SENDING, _S.SENT),
              Call.RESUME: _to(_S.SENDING, _S.SENT), MsgType.VERIFIED: _to(_S.VERIFIED)},
    _S.VERIFIED: {},
    _S.FAILED: {},
}, _S.FAILED)

_T = TargetState
TARGET: Table[TargetState] = _with_failure({
    _T.IDLE: {Call.START: _to(_T.HELLO_SENT)},
    # a tree with nothing to walk, or a walk that ends, is answered with the want at once
    _T.HELLO_SENT: {MsgType.TREE: _to(_T.WALKING, _T.RECEIVING)},
    _T.WALKING: {MsgType.WALK: _to(_T.WALKING, _T.RECEIVING)},
    _T.RECEIVING: {MsgType.BLOCKS: _to(_T.RECEIVING), MsgType.END: _to(_T.VERIFIED), Call.RESUME: _to(_T.RECEIVING)},
    _T.VERIFIED: {},
    _T.FAILED: {},
}, _T.FAILED)


def terminal(table: Table[S], state: S) -> bool:
    return not table[state]


def allowed(table: Table[S], state: S, trigger: Trigger, side: str) -> frozenset[S]:
    """The states ``trigger`` may lead to from ``state``; raises if the table does not allow it:
    :class:`ProtocolError` for a peer's message, :class:`LocalProtocolError` for our own call."""
    nexts = table[state].get(trigger)
    if nexts is not None:
        return nexts
    if isinstance(trigger, Call):
        raise LocalProtocolError(f"{side}: {trigger.value} not allowed in state {state.value}")
    if terminal(table, state):
        raise ProtocolError(f"{trigger} message after the transfer ended ({state.value})")
    raise ProtocolError(f"{trigger} message not allowed in state {state.value}")


def diagram(table: Table[S], title: str) -> str:
    """The table as a mermaid state diagram (the README shows one per side)."""
    first = next(iter(table))
    lines = ["```mermaid", "stateDiagram-v2", f"    %% {title}", f"    [*] --> {first.value}"]
    for state, row in table.items():
        by_target: dict[S, list[str]] = {}
        for trigger, nexts in row.items():
            for nxt in sorted(nexts, key=list(table).index):
                by_target.setdefault(nxt, []).append(str(trigger.value))
        for nxt in sorted(by_target, key=list(table).index):
            lines.append(f"    {state.value} --> {nxt.value}: {', '.join(by_target[nxt])}")
        if not row:
            lines.append(f"    {state.value} --> [*]")
    lines.append("```")
    return "\n".join(lines) + "\n"
