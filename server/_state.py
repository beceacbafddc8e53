"""The session's state machine as one table (h11's ``_state.py`` is the model).

:data:`TRANSITIONS` says, for every state, which messages each role may send there and the state
the session moves to.  The session core (:class:`server.session.Session`) looks up its handlers from
it and refuses everything else through :func:`guard`, with an error naming the state and the
role.  What the table refuses there is the *peer's* mistake: a
:class:`~server.wire.SessionViolation` whose reason the service sends to both peers.  The client
core (:class:`server.clientcore.ClientState`) asks the same table before it queues a message, so
its own caller's mistake (a message its role never sends, or one the state it has seen does not
allow yet) is a :class:`~replay_migrate.errors.LocalProtocolError` that never reaches the wire.

What the table does not say, the handlers check: sequence numbers, the log's end, that the target
acked the whole log before ``phase diffing``, that ``replayed`` names a log frame the source sent
and never goes backwards.  Two rules of a session that a restarted service
re-created (:attr:`server.session.Session.restored`) sit beside it in the core: a control already
applied is a no-op, and a frame its sender journalled before it attached there is accepted in any
live state.  A FAILED session has no row: its failure is the answer to everything.

The README's state diagram and the tests of every (state, role, message) are generated from the
table (``tests/test_session_state.py``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Final

from server.wire import Reason, Role, SessionViolation, State


class PeerMessage(enum.Enum):
    """An attached peer's message as the table tells them apart: its type, refined by the field
    that decides who may send it when (a diff's direction, an ack's stream, a phase)."""

    LOG = "log"
    LOG_END = "log_end"
    SUSPEND = "suspend"
    REPLAYED = "replayed"
    DIFF_S2T = "diff s2t"
    DIFF_T2S = "diff t2s"
    ACK_LOG = "ack log"
    ACK_S2T = "ack s2t"
    ACK_T2S = "ack t2s"
    PHASE_DIFFING = "phase diffing"
    PHASE_TRANSFERRING = "phase transferring"
    VERIFIED = "verified"
    RESUMED = "resumed"
    RELEASED = "released"
    REPORT = "report"
    ABORT = "abort"

    @staticmethod
    def of(msg: Mapping[str, Any]) -> PeerMessage | None:
        """The table's entry for a decoded message (:func:`server.wire.decode` checked its fields);
        None for a type no peer sends once attached (``attach``, ``create``, the service's own)."""
        t = msg["t"]
        refined_by = _REFINED_BY.get(t)
        return _BY_NAME.get(t if refined_by is None else f"{t} {msg[refined_by]}")


_REFINED_BY: Final[Mapping[str, str]] = {"diff": "dir", "ack": "stream", "phase": "phase"}
_BY_NAME: Final[Mapping[str, PeerMessage]] = {m.value: m for m in PeerMessage}


def _table() -> dict[State, dict[Role, dict[PeerMessage, State]]]:
    M, S, SRC, TGT = PeerMessage, State, Role.SOURCE, Role.TARGET

    def stay(state: State, *messages: PeerMessage) -> dict[PeerMessage, State]:
        return dict.fromkeys(messages, state)

    return {
        S.RECORDING: {
            SRC: {**stay(S.RECORDING, M.LOG, M.LOG_END, M.ACK_T2S), M.SUSPEND: S.SUSPENDING, M.ABORT: S.FAILED},
            TGT: {**stay(S.RECORDING, M.REPLAYED, M.ACK_LOG, M.ACK_S2T), M.ABORT: S.FAILED},
        },
        S.SUSPENDING: {     # the source's diff messages may start while the target still replays
            SRC: {**stay(S.SUSPENDING, M.LOG, M.LOG_END, M.DIFF_S2T, M.ACK_T2S), M.ABORT: S.FAILED},
            TGT: {**stay(S.SUSPENDING, M.REPLAYED, M.DIFF_T2S, M.ACK_LOG, M.ACK_S2T), M.PHASE_DIFFING: S.DIFFING,
                  M.ABORT: S.FAILED},
        },
        S.DIFFING: {
            SRC: {**stay(S.DIFFING, M.DIFF_S2T, M.ACK_T2S), M.ABORT: S.FAILED},
            TGT: {**stay(S.DIFFING, M.DIFF_T2S, M.ACK_LOG, M.ACK_S2T), M.PHASE_TRANSFERRING: S.TRANSFERRING,
                  M.ABORT: S.FAILED},
        },
        S.TRANSFERRING: {
            SRC: {**stay(S.TRANSFERRING, M.DIFF_S2T, M.ACK_T2S), M.ABORT: S.FAILED},
            TGT: {**stay(S.TRANSFERRING, M.DIFF_T2S, M.ACK_LOG, M.ACK_S2T), M.VERIFIED: S.VERIFIED,
                  M.ABORT: S.FAILED},
        },
        S.VERIFIED: {
            SRC: {**stay(S.VERIFIED, M.ACK_T2S), M.ABORT: S.FAILED},
            TGT: {**stay(S.VERIFIED, M.ACK_LOG, M.ACK_S2T), M.RESUMED: S.RESUMED, M.ABORT: S.FAILED},
        },
        S.RESUMED: {        # finished: a late message must not turn a confirmed migration into a failed one
            SRC: stay(S.RESUMED, M.RELEASED, M.REPORT, M.ACK_T2S),     # the sides' figures, each to the other
            TGT: stay(S.RESUMED, M.REPORT, M.ACK_LOG, M.ACK_S2T),
        },
        S.FAILED: {SRC: {}, TGT: {}},
    }


TRANSITIONS: Final[Mapping[State, Mapping[Role, Mapping[PeerMessage, State]]]] = _table()
"""state → role → a message that role may send in that state → the state the session moves to."""

MAY_SEND: Final[Mapping[Role, frozenset[PeerMessage]]] = {
    role: frozenset(m for row in TRANSITIONS.values() for m in row[role]) for role in Role}
"""Every message a role may send in some state (the rest it never sends)."""


def allowed_in(role: Role, message: PeerMessage) -> list[State]:
    """The states in which ``role`` may send ``message``, in the table's order."""
    return [state for state, row in TRANSITIONS.items() if message in row[role]]


def guard(state: State, role: Role, message: PeerMessage) -> State:
    """The state the session moves to when ``role`` sends ``message`` in ``state``.  Anything else
    is the peer's protocol error: WRONG_ROLE when that role never sends it, else WRONG_STATE."""
    new = TRANSITIONS[state][role].get(message)
    if new is not None:
        return new
    what = f"{message.value} from the {role.value} in state {state.value}"
    if message not in MAY_SEND[role]:
        raise SessionViolation(Reason.WRONG_ROLE, f"{what}: only the {role.peer.value} sends it")
    raise SessionViolation(Reason.WRONG_STATE, f"{what}: allowed in "
                           f"{', '.join(s.value for s in allowed_in(role, message))} only")
