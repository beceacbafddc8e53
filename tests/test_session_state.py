"""The session's transition table (server/_state.py): every (state, role, message) is tried against
the service core and does what the table says (allowed: the state it names; refused: wrong_role or
wrong_state, naming the state and the role); the table's shape; and the README's diagram and
table of it, generated here."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from sessionkit import ROOTS, assert_failed, drive_to, st

from server._state import MAY_SEND, TRANSITIONS, PeerMessage, allowed_in, guard
from server.link import CLOSE_POLICY
from server.wire import HAPPY_PATH, MESSAGE_TYPES, Reason, Role, SessionViolation, State, decode, encode

pytestmark = pytest.mark.timeout(30)

README = Path(__file__).resolve().parent.parent / "README.md"

#: one valid instance of every message, fitting a session that drive_to() built
EXAMPLES: dict[PeerMessage, dict[str, Any]] = {
    PeerMessage.LOG: {"t": "log", "seq": 2, "data": b"x"},
    PeerMessage.LOG_END: {"t": "log_end", "seq": 1},
    PeerMessage.SUSPEND: {"t": "suspend"},
    PeerMessage.REPLAYED: {"t": "replayed", "seq": 1},
    PeerMessage.DIFF_S2T: {"t": "diff", "dir": "s2t", "seq": 1, "data": b"x"},
    PeerMessage.DIFF_T2S: {"t": "diff", "dir": "t2s", "seq": 1, "data": b"x"},
    PeerMessage.ACK_LOG: {"t": "ack", "stream": "log", "seq": 1},
    PeerMessage.ACK_S2T: {"t": "ack", "stream": "s2t", "seq": 0},
    PeerMessage.ACK_T2S: {"t": "ack", "stream": "t2s", "seq": 0},
    PeerMessage.PHASE_DIFFING: {"t": "phase", "phase": "diffing"},
    PeerMessage.PHASE_TRANSFERRING: {"t": "phase", "phase": "transferring"},
    PeerMessage.VERIFIED: {"t": "verified", "roots": ROOTS},
    PeerMessage.RESUMED: {"t": "resumed"},
    PeerMessage.RELEASED: {"t": "released"},
    PeerMessage.REPORT: {"t": "report", "figures": {"block_bytes": 1, "replay_s": 0.5, "verified": True}},
    PeerMessage.ABORT: {"t": "abort", "reason": "cancelled"},
}


def message(kind: PeerMessage) -> dict[str, Any]:
    fields = dict(EXAMPLES[kind])
    return decode(encode(fields.pop("t"), **fields), 1 << 20)


CASES = [(state, role, kind) for state in State for role in Role for kind in PeerMessage]


@pytest.mark.parametrize(("state", "role", "kind"), CASES,
                         ids=[f"{s.value}-{r.value}-{k.value.replace(' ', '_')}" for s, r, k in CASES])
def test_every_message_of_every_role_in_every_state_does_what_the_table_says(state: State, role: Role,
                                                                              kind: PeerMessage) -> None:
    # the log stays open where its frames and its end are what is tried; elsewhere it ended
    _, s, src, tgt = drive_to(State.RECORDING if state is State.FAILED else state,
                              log_ended=not (state is State.SUSPENDING and kind in (PeerMessage.LOG,
                                                                                    PeerMessage.LOG_END)))
    if state is State.FAILED:
        s.fail(Reason.CANCELLED, 0.0)
        src.out()
        tgt.out()
    sender, other = (src, tgt) if role is Role.SOURCE else (tgt, src)
    new = TRANSITIONS[state][role].get(kind)
    if state is State.FAILED:                      # no row: the failure answers everything
        s.receive(role, message(kind), 0.0)
        assert st(s) is State.FAILED and s.failure is Reason.CANCELLED
    elif new is not None:
        s.receive(role, message(kind), 0.0)
        assert st(s) is new
        if kind is PeerMessage.ABORT:
            assert_failed(s, src, tgt, Reason.CANCELLED)
        else:
            assert s.failure is None
            assert not [m for p in (src, tgt) for m in p.out() if m["t"] == "error"]
    else:
        reason = Reason.WRONG_ROLE if kind not in MAY_SEND[role] else Reason.WRONG_STATE
        with pytest.raises(SessionViolation) as refused:
            s.receive(role, message(kind), 0.0)
        assert refused.value.reason is reason
        assert f"from the {role.value} in state {state.value}" in str(refused.value)
        if state is State.RESUMED:                 # finished: only that connection is refused
            assert st(s) is State.RESUMED and s.failure is None
            assert [m for m in sender.out() if m["t"] == "error"] == [
                {"v": 3, "t": "error", "code": reason.code, "reason": reason.value, "keep_vm": False}]
            assert sender.link.close_code == CLOSE_POLICY and other.out() == [] and other.link.close_code is None
        else:
            assert_failed(s, src, tgt, reason)


def test_guard_names_the_state_and_the_role() -> None:
    assert guard(State.SUSPENDING, Role.TARGET, PeerMessage.PHASE_DIFFING) is State.DIFFING
    with pytest.raises(SessionViolation, match="resumed from the target in state recording: allowed in verified only"):
        guard(State.RECORDING, Role.TARGET, PeerMessage.RESUMED)
    with pytest.raises(SessionViolation, match="suspend from the target in state recording: only the source sends"):
        guard(State.RECORDING, Role.TARGET, PeerMessage.SUSPEND)
    assert allowed_in(Role.SOURCE, PeerMessage.LOG) == [State.RECORDING, State.SUSPENDING]


def test_every_peer_message_type_has_entries_and_the_rest_none() -> None:
    for kind in PeerMessage:
        assert PeerMessage.of(message(kind)) is kind
    sent_by_peers = {e["t"] for e in EXAMPLES.values()}
    for t in MESSAGE_TYPES - sent_by_peers:        # create, attach and the service's own messages
        assert PeerMessage.of({"t": t}) is None, t
    assert sent_by_peers <= MESSAGE_TYPES


def test_the_table_has_one_row_per_state_and_role_and_only_moves_forward_or_fails() -> None:
    assert set(TRANSITIONS) == set(State)
    for state, rows in TRANSITIONS.items():
        assert set(rows) == set(Role)
        for role, row in rows.items():
            for kind, new in row.items():
                if kind is PeerMessage.ABORT:
                    assert new is State.FAILED and not state.terminal
                elif new is not state:
                    assert HAPPY_PATH.index(new) == HAPPY_PATH.index(state) + 1, (state, role, kind)
    assert TRANSITIONS[State.FAILED] == {Role.SOURCE: {}, Role.TARGET: {}}
    assert all(new is State.RESUMED for row in TRANSITIONS[State.RESUMED].values() for new in row.values())
    # every message is someone's, and every live state has a way out for someone
    assert MAY_SEND[Role.SOURCE] | MAY_SEND[Role.TARGET] == set(PeerMessage)
    for state in HAPPY_PATH[:-1]:
        assert any(new not in (state, State.FAILED) for row in TRANSITIONS[state].values() for new in row.values())


def test_the_peer_fixture_drives_a_session_through_the_table() -> None:
    """The generated cases stand on drive_to(): it must reach each state through allowed messages."""
    for state in HAPPY_PATH:
        _, s, _src, _tgt = drive_to(state)
        assert s.state is state and s.failure is None


# ---- the README's diagram and table ------------------------------------------------------------------
def _ordered(row: Mapping[PeerMessage, State]) -> list[PeerMessage]:
    return [k for k in PeerMessage if k in row]


def render() -> str:
    """The README's state diagram (mermaid) and table, from :data:`TRANSITIONS`."""
    moves: dict[tuple[State, State, PeerMessage], list[Role]] = {}
    for state, rows in TRANSITIONS.items():
        for role, row in rows.items():
            for kind in _ordered(row):
                if row[kind] is not state:
                    moves.setdefault((state, row[kind], kind), []).append(role)
    lines = ["```mermaid", "stateDiagram-v2", f"    [*] --> {HAPPY_PATH[0].value}"]
    for (state, new, kind), roles in sorted(moves.items(), key=lambda m: m[0][1] is State.FAILED):
        lines.append(f"    {state.value} --> {new.value}: {' or '.join(r.value for r in roles)} {kind.value}")
    lines += [f"    {s.value} --> [*]" for s in State if s.terminal]
    lines += ["```", "", "| state | the source may send | the target may send |", "|---|---|---|"]
    for state, rows in TRANSITIONS.items():
        cells = []
        for role in Role:
            row = rows[role]
            cells.append(", ".join(f"`{k.value}`" + (f" → `{row[k].value}`" if row[k] is not state else "")
                                   for k in _ordered(row)) or "nothing")
        lines.append(f"| `{state.value}` | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def test_the_readme_shows_the_table() -> None:
    assert render() in README.read_text(), "README.md: paste tests/test_session_state.py's render()"
