"""The session-handoff protocol on the wire, version 3 (DESIGN.md §8): its vocabulary (states,
roles, streams, phases, the reasons a failure may give), the envelope codec with one schema per
message type, and the claim a peer attaches with.  Everything here crosses the wire; what may be
sent when is :mod:`server._state`'s table.

Wire format
-----------
One websocket **binary** message = one msgpack map ``{"v": PROTOCOL_VERSION, "t": TYPE, ...}``.
Unknown or missing fields, a wrong type or another version are rejected. Payloads (``data``: log
frames, diff-protocol messages; ``roots``) are opaque bytes: relayed, never parsed.

==============  ==============  =============================================================
type            direction       fields and meaning
==============  ==============  =============================================================
create          peer → svc      (token connections only) a new session, please.
created         svc → peer      ``session``, ``source``, ``target``: the id and both credentials.
attach          peer → svc      ``role``, ``session`` (both must be the credential's),
                                ``resume_from`` {stream: next seq wanted} for the streams this
                                role receives, ``resume`` (the peer was attached before), and
                                ``claim``: what the peer knows (``state`` it last saw, ``next`` /
                                ``acked`` {stream: seq} for the streams it sends, ``log_end``,
                                ``roots``, ``released``), from which a service that lost the
                                session re-creates it.  Must be the first message.
attached        svc → peer      ``session``, ``state``, ``next``/``acked`` {stream: seq} for the
                                streams this role sends (resend from ``next``; the receiver has
                                everything ≤ ``acked``), ``window`` (max unacked bytes per stream,
                                each frame counting ``FRAME_COST`` more than its payload),
                                ``max_message``, ``log_end`` (int|nil), ``roots`` (|nil).
log             src → svc → tgt ``seq``, ``data``.  RECORDING, SUSPENDING; none after log_end.
log_end         src → svc → tgt ``seq`` = last log seq (0: empty log); every frame before it.
suspend         src → svc       RECORDING → SUSPENDING.
replayed        tgt → svc → src ``seq``: the last log frame the target has replayed (every event of
                                it and of every frame before it went through its replay: injected,
                                sync marks waited on).  RECORDING, SUSPENDING; never beyond the
                                log frames the source sent, never backwards (``bad_sequence``),
                                the same again is a no-op.  The source keeps its VM running at
                                suspend until the target caught up (``migration.catchup``); the
                                service gives the last one to a source on every attach.
diff            both via svc    ``dir`` s2t|t2s (must match the sender), ``seq``, ``data``.
                                SUSPENDING, DIFFING, TRANSFERRING.
ack             both ways       ``stream``, ``seq``: cumulative.  Receiver → svc: frames ≤ seq
                                consumed; svc → sender: the same, relayed (the sender may forget).
phase           tgt → svc       ``phase`` diffing (SUSPENDING → DIFFING, only once the log ended
                                and the target acked all of it) | transferring (DIFFING →
                                TRANSFERRING).
verified        tgt → svc → src ``roots`` {name: bytes}.  TRANSFERRING → VERIFIED.
resumed         tgt → svc       VERIFIED → RESUMED; the service then sends ``confirm``.
confirm         svc → src       the target runs: the source may now release its VM.
released        src → svc → both  the source has the confirm (RESUMED only): the target, which
                                stays attached until then, may go.
report          both via svc    ``figures`` {name: number|bool|text|nil|{name: number|nil}}: what
                                this side measured of the migration (RESUMED only; the target's
                                after ``resumed``, the source's before ``released``), relayed to
                                the other side so that both print the whole report.  At most
                                ``MAX_FIGURES`` names, the message at most ``MAX_REPORT_MESSAGE``
                                bytes; the service keeps the last one per role and gives it to the
                                peer on every attach.
state           svc → both      ``state``: sent to both peers on every transition but FAILED.
abort           peer → svc      ``reason`` (one of PEER_REASONS): any live state → FAILED.
error           svc → peer      ``code``, ``reason`` (Reason vocabulary), ``keep_vm`` (true to a
                                source that was not confirmed: its VM must stay intact).
==============  ==============  =============================================================
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from replay_migrate.errors import ProtocolError

PROTOCOL_VERSION: Final = 3
"""2: per-role credentials, sessions re-created from the peers' claims. 3: ``replayed`` (an older
peer would take it for an unknown message mid-migration: refused at attach instead)."""
#: bytes a data message adds around its payload, generously: senders keep payloads under
#: ``max_message - ENVELOPE_OVERHEAD``.
ENVELOPE_OVERHEAD: Final = 256
#: what each buffered frame costs beyond its payload, in the window and the buffers (the deque
#: entry, the tuple, the bytes object): empty frames are not free.
FRAME_COST: Final = 64
MAX_ROOTS: Final = 8
MAX_ROOT_NAME: Final = 32
MAX_ROOT_BYTES: Final = 64
_MAX_SEQ: Final = 2**63 - 1
MAX_FIGURES: Final = 64
"""Names a ``report`` may carry (a migration's report has about 25; room for more)."""
MAX_FIGURE_NAME: Final = 32
MAX_FIGURE_TEXT: Final = 160
"""Longest text figure (a strategy's name, the reason it was chosen)."""
MAX_FIGURE_ENTRIES: Final = 8
"""Entries of one figure that is a map (divergent blocks per image)."""
MAX_FIGURE_VALUE: Final = 2.0**63
"""Largest magnitude of a number figure (no NaN, no infinity)."""
MAX_REPORT_MESSAGE: Final = 8192
"""Largest ``report`` message, envelope included: what the service keeps per role and session."""
FIGURE_NAME_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")
# no dots: the id ends a logger name, and dots would make it a hierarchy
SESSION_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
CREDENTIAL_RE: Final = re.compile(r"rm1\.([A-Za-z0-9_-]{1,64})\.(source|target)\.([A-Za-z0-9_-]{43})")


class State(enum.Enum):
    """A session's state (the transitions are :data:`server._state.TRANSITIONS`)."""

    RECORDING = "recording"
    SUSPENDING = "suspending"
    DIFFING = "diffing"
    TRANSFERRING = "transferring"
    VERIFIED = "verified"
    RESUMED = "resumed"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (State.RESUMED, State.FAILED)


#: the states of a migration that goes well, in order (FAILED is off it)
HAPPY_PATH: Final = (State.RECORDING, State.SUSPENDING, State.DIFFING, State.TRANSFERRING, State.VERIFIED,
                     State.RESUMED)


def state_reached(current: State | None, wanted: State) -> bool:
    """True when ``current`` is ``wanted`` or past it on the happy path (FAILED reaches only itself)."""
    if current is None or State.FAILED in (current, wanted):
        return current is wanted
    return HAPPY_PATH.index(current) >= HAPPY_PATH.index(wanted)


class Role(enum.Enum):
    SOURCE = "source"
    TARGET = "target"

    @property
    def peer(self) -> Role:
        return Role.TARGET if self is Role.SOURCE else Role.SOURCE

    @property
    def sends(self) -> tuple[Stream, ...]:
        return _SENDS[self]

    @property
    def receives(self) -> tuple[Stream, ...]:
        return _RECEIVES[self]


class Stream(enum.Enum):
    LOG = "log"
    S2T = "s2t"
    T2S = "t2s"

    @property
    def sender(self) -> Role:
        return Role.TARGET if self is Stream.T2S else Role.SOURCE

    @property
    def receiver(self) -> Role:
        return Role.SOURCE if self is Stream.T2S else Role.TARGET


# looked up on every frame: computed once (in Stream's order, LOG before S2T: the live order)
_SENDS: Final[Mapping[Role, tuple[Stream, ...]]] = {r: tuple(s for s in Stream if s.sender is r) for r in Role}
_RECEIVES: Final[Mapping[Role, tuple[Stream, ...]]] = {r: tuple(s for s in Stream if s.receiver is r) for r in Role}


class Phase(enum.Enum):
    DIFFING = "diffing"
    TRANSFERRING = "transferring"


class Reason(enum.Enum):
    """The fixed vocabulary of ``error`` reasons: the only words about a failure that cross the wire."""

    BAD_MESSAGE = "bad_message"            # not a valid envelope, unknown type or fields, text frame
    BAD_VERSION = "bad_version"            # another protocol version
    NOT_ATTACHED = "not_attached"          # the first message was not attach / create (or never came)
    WRONG_ROLE = "wrong_role"              # this role may not send that message
    WRONG_STATE = "wrong_state"            # not allowed in the session's current state
    BAD_SEQUENCE = "bad_sequence"          # gap, ack beyond what was sent, contradictory resume or claim
    TOO_LARGE = "too_large"                # message above max_message_size
    BUFFER_FULL = "buffer_full"            # the sender ignored the window
    SESSION_LIMIT = "session_limit"        # max_sessions live sessions already
    SUPERSEDED = "superseded"              # a newer connection with the same credential took the role
    IDLE_TIMEOUT = "idle_timeout"          # a role stayed away longer than idle_timeout
    INTERNAL = "internal"                  # a bug in the service
    # what a peer may give as abort{reason}
    REPLAY_FAILED = "replay_failed"
    DIFF_FAILED = "diff_failed"
    VERIFY_FAILED = "verify_failed"
    VM_FAILED = "vm_failed"
    CANCELLED = "cancelled"

    @property
    def code(self) -> int:
        return _CODES[self]


_CODES: Final[Mapping[Reason, int]] = {
    Reason.BAD_MESSAGE: 400, Reason.BAD_VERSION: 400, Reason.NOT_ATTACHED: 400, Reason.WRONG_ROLE: 403,
    Reason.WRONG_STATE: 409, Reason.BAD_SEQUENCE: 409, Reason.TOO_LARGE: 413, Reason.BUFFER_FULL: 413,
    Reason.SESSION_LIMIT: 503, Reason.SUPERSEDED: 409, Reason.IDLE_TIMEOUT: 408,
    Reason.INTERNAL: 500, Reason.REPLAY_FAILED: 499, Reason.DIFF_FAILED: 499, Reason.VERIFY_FAILED: 499,
    Reason.VM_FAILED: 499, Reason.CANCELLED: 499,
}
PEER_REASONS: Final = frozenset({Reason.REPLAY_FAILED, Reason.DIFF_FAILED, Reason.VERIFY_FAILED, Reason.VM_FAILED,
                                 Reason.CANCELLED})


class SessionViolation(ProtocolError):
    """A ProtocolError that knows which :class:`Reason` to send; its text stays in local logs."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason


# ---- codec ----------------------------------------------------------------------------------------
def encode(t: str, **fields: Any) -> bytes:
    """One envelope.  Callers pass plain values (enum ``.value``s, bytes, ints)."""
    out: bytes = msgpack.packb({"v": PROTOCOL_VERSION, "t": t, **fields}, use_bin_type=True)
    return out


_Check = Callable[[Any], bool]


def _is_int(x: Any, lo: int = 0) -> bool:
    return type(x) is int and lo <= x <= _MAX_SEQ


def _seq(lo: int) -> _Check:
    return lambda x: _is_int(x, lo)


def _words(values: Iterator[str] | frozenset[str]) -> _Check:
    allowed = frozenset(values)
    return lambda x: isinstance(x, str) and x in allowed


def _seq_map(lo: int) -> _Check:
    def check(x: Any) -> bool:
        return (isinstance(x, dict) and len(x) <= len(Stream)
                and all(k in _STREAM_NAMES and _is_int(v, lo) for k, v in x.items()))
    return check


def valid_roots(x: Any) -> bool:
    """What ``verified{roots}`` may carry: 1..MAX_ROOTS names → hashes of at most MAX_ROOT_BYTES."""
    return (isinstance(x, dict) and 0 < len(x) <= MAX_ROOTS
            and all(isinstance(k, str) and 0 < len(k) <= MAX_ROOT_NAME and isinstance(v, bytes)
                    and 0 < len(v) <= MAX_ROOT_BYTES for k, v in x.items()))


def _is_number(x: Any) -> bool:
    if type(x) is int:
        return -MAX_FIGURE_VALUE < x < MAX_FIGURE_VALUE
    return type(x) is float and math.isfinite(x) and abs(x) < MAX_FIGURE_VALUE


def _is_figure_name(x: Any) -> bool:
    return isinstance(x, str) and FIGURE_NAME_RE.fullmatch(x) is not None


def _is_scalar_figure(x: Any) -> bool:
    return (x is None or type(x) is bool or _is_number(x)
            or (isinstance(x, str) and len(x) <= MAX_FIGURE_TEXT and x.isprintable()))


def valid_figures(x: Any) -> bool:
    """What ``report{figures}`` may carry: at most MAX_FIGURES names (lower case, digits, ``_``) of
    numbers, flags, short printable text, nil (unknown), or maps of at most MAX_FIGURE_ENTRIES names
    to numbers or nil.  Which names a side expects, and their types, the receiver checks
    (``migration.halves``): this is the shape the service relays."""
    return (isinstance(x, dict) and len(x) <= MAX_FIGURES
            and all(_is_figure_name(k) and (_is_scalar_figure(v) or (
                isinstance(v, dict) and len(v) <= MAX_FIGURE_ENTRIES
                and all(_is_figure_name(k2) and (v2 is None or _is_number(v2)) for k2, v2 in v.items())))
                for k, v in x.items()))


def _optional(check: _Check) -> _Check:
    return lambda x: x is None or check(x)


def _is_bytes(x: Any) -> bool:
    return isinstance(x, bytes)


def _is_bool(x: Any) -> bool:
    return isinstance(x, bool)


def _is_session_id(x: Any) -> bool:
    return isinstance(x, str) and SESSION_ID_RE.fullmatch(x) is not None


def _is_credential(x: Any) -> bool:
    return isinstance(x, str) and CREDENTIAL_RE.fullmatch(x) is not None


_STREAM_NAMES: Final = frozenset(s.value for s in Stream)
_LIVE_STATE_NAMES: Final = frozenset(s.value for s in HAPPY_PATH)
_CLAIM: Final[Mapping[str, _Check]] = {
    "state": _words(_LIVE_STATE_NAMES), "next": _seq_map(1), "acked": _seq_map(0),
    "log_end": _optional(_seq(0)), "roots": _optional(valid_roots), "released": _is_bool,
}


def _is_claim(x: Any) -> bool:
    return (isinstance(x, dict) and set(x) == set(_CLAIM) and all(check(x[k]) for k, check in _CLAIM.items())
            and set(x["next"]) == set(x["acked"]) and all(x["acked"][s] < x["next"][s] for s in x["next"]))


_SCHEMA: Final[Mapping[str, Mapping[str, _Check]]] = {
    "create": {},
    "created": {"session": _is_session_id, "source": _is_credential, "target": _is_credential},
    "attach": {"role": _words(frozenset(r.value for r in Role)), "session": _is_session_id,
               "resume_from": _seq_map(1), "resume": _is_bool, "claim": _is_claim},
    "attached": {"session": _is_session_id, "state": _words(frozenset(s.value for s in State)),
                 "next": _seq_map(1), "acked": _seq_map(0), "window": _seq(1), "max_message": _seq(1),
                 "log_end": _optional(_seq(0)), "roots": _optional(valid_roots)},
    "log": {"seq": _seq(1), "data": _is_bytes},
    "log_end": {"seq": _seq(0)},
    "suspend": {},
    "replayed": {"seq": _seq(0)},
    "diff": {"dir": _words(frozenset({Stream.S2T.value, Stream.T2S.value})), "seq": _seq(1), "data": _is_bytes},
    "ack": {"stream": _words(_STREAM_NAMES), "seq": _seq(0)},
    "phase": {"phase": _words(frozenset(p.value for p in Phase))},
    "verified": {"roots": valid_roots},
    "resumed": {},
    "confirm": {},
    "released": {},
    "report": {"figures": valid_figures},
    "state": {"state": _words(frozenset(s.value for s in State))},
    "abort": {"reason": _words(frozenset(r.value for r in PEER_REASONS))},
    "error": {"code": _seq(0), "reason": _words(frozenset(r.value for r in Reason)), "keep_vm": _is_bool},
}
MESSAGE_TYPES: Final = frozenset(_SCHEMA)


def decode(data: bytes, max_size: int) -> dict[str, Any]:
    """Parse and check one envelope against its type's schema; raise SessionViolation otherwise."""
    if len(data) > max_size:
        raise SessionViolation(Reason.TOO_LARGE, f"message of {len(data)} bytes exceeds {max_size}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception:  # msgpack raises a handful of unrelated types for bad input
        raise SessionViolation(Reason.BAD_MESSAGE, "not a msgpack document") from None
    if not isinstance(obj, dict):
        raise SessionViolation(Reason.BAD_MESSAGE, "not a msgpack map")
    if obj.get("v") != PROTOCOL_VERSION or type(obj.get("v")) is not int:
        raise SessionViolation(Reason.BAD_VERSION, f"protocol version is not {PROTOCOL_VERSION}")
    t = obj.get("t")
    schema = _SCHEMA.get(t) if isinstance(t, str) else None
    if schema is None:
        raise SessionViolation(Reason.BAD_MESSAGE, "unknown message type")
    if t == "report" and len(data) > MAX_REPORT_MESSAGE:
        raise SessionViolation(Reason.TOO_LARGE, f"report of {len(data)} bytes exceeds {MAX_REPORT_MESSAGE}")
    if set(obj) != {"v", "t", *schema}:
        raise SessionViolation(Reason.BAD_MESSAGE, f"{t}: missing or unknown fields")
    for name, check in schema.items():
        if not check(obj[name]):
            raise SessionViolation(Reason.BAD_MESSAGE, f"{t}: bad field {name}")
    return obj


def message_type(data: bytes) -> str:
    """The type of one envelope, for byte accounting only (no check): :func:`encode` writes
    ``{"v": V, "t": TYPE, ...}``, so the type is read in place without decoding the payload; an
    envelope another encoder made is decoded whole. ``"?"`` when it is not an envelope."""
    if len(data) > 7 and 0x80 <= data[0] <= 0x8F and data[1:3] == b"\xa1v" and data[4:6] == b"\xa1t" \
            and 0xA0 <= data[6] <= 0xBF:
        return bytes(data[7 : 7 + (data[6] & 0x1F)]).decode("ascii", "replace")
    try:
        obj = msgpack.unpackb(data, raw=False)
    except Exception:  # accounting only: whatever msgpack raises for bad input
        return "?"
    t = obj.get("t") if isinstance(obj, dict) else None
    return t if isinstance(t, str) else "?"


def frame_payload(data: bytes) -> int:
    """The payload length of a ``log`` or ``diff`` envelope (0 if it has none), for byte accounting."""
    try:
        obj = msgpack.unpackb(data, raw=False)
    except Exception:  # accounting only: whatever msgpack raises for bad input
        return 0
    payload = obj.get("data") if isinstance(obj, dict) else None
    return len(payload) if isinstance(payload, bytes) else 0


def frame_message(stream: Stream, seq: int, data: bytes) -> bytes:
    """The envelope of one frame: ``log`` for the log, ``diff`` with its direction for the rest."""
    if stream is Stream.LOG:
        return encode("log", seq=seq, data=data)
    return encode("diff", dir=stream.value, seq=seq, data=data)


def error_message(reason: Reason, keep_vm: bool) -> bytes:
    return encode("error", code=reason.code, reason=reason.value, keep_vm=keep_vm)




def frame_cost(data: bytes) -> int:
    """What one frame counts against a window and a buffer."""
    return len(data) + FRAME_COST


@dataclass(frozen=True)
class Claim:
    """What a peer knows of its session when it attaches (``attach{claim}``), from which a service
    that does not hold the session re-creates it."""

    state: State
    next: Mapping[Stream, int]
    acked: Mapping[Stream, int]
    log_end: int | None
    roots: Mapping[str, bytes] | None
    released: bool = False

    @staticmethod
    def initial(role: Role) -> Claim:
        """A peer that has seen nothing and sent nothing."""
        return Claim(State.RECORDING, dict.fromkeys(role.sends, 1), dict.fromkeys(role.sends, 0), None, None)

    @staticmethod
    def from_wire(x: Mapping[str, Any]) -> Claim:
        return Claim(State(x["state"]), {Stream(k): v for k, v in x["next"].items()},
                     {Stream(k): v for k, v in x["acked"].items()}, x["log_end"],
                     dict(x["roots"]) if x["roots"] is not None else None, x["released"])

    def to_wire(self) -> dict[str, Any]:
        return {"state": self.state.value, "next": {s.value: n for s, n in self.next.items()},
                "acked": {s.value: n for s, n in self.acked.items()}, "log_end": self.log_end,
                "roots": dict(self.roots) if self.roots is not None else None, "released": self.released}

