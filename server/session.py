"""Sans-I/O core of the websocket session-handoff service (DESIGN.md §1, §8).

Bytes in, bytes out: no sockets, no asyncio and no clock (callers pass ``now``, monotonic seconds),
so every state transition and every resend decision is testable without a network.
``server/service.py`` is the asyncio adapter; ``server/client.py`` holds the peers' side.

Wire format
-----------
One websocket **binary** message = one msgpack map ``{"v": PROTOCOL_VERSION, "t": TYPE, ...}``.
Unknown or missing fields, a wrong type or another version are rejected. Payloads (``data``: log
frames, diff-protocol messages; ``roots``) are opaque bytes: relayed, never parsed.

==============  ==============  =============================================================
type            direction       fields and meaning
==============  ==============  =============================================================
attach          peer → svc      ``role`` source|target, ``session`` (= URL id), ``resume_from``
                                {stream: next seq wanted} for the streams this role receives,
                                ``resume`` (true once the peer has been attached before: never
                                re-create a session that expired).  Must be the first message.
attached        svc → peer      ``session``, ``state``, ``next``/``acked`` {stream: seq} for the
                                streams this role sends (resend from ``next``; the receiver has
                                everything ≤ ``acked``), ``window`` (max unacked payload bytes per
                                stream), ``max_message``, ``log_end`` (int|nil), ``roots`` (|nil).
log             src → svc → tgt ``seq``, ``data``.  RECORDING, SUSPENDING; none after log_end.
log_end         src → svc → tgt ``seq`` = last log seq (0: empty log); every frame before it.
suspend         src → svc       RECORDING → SUSPENDING.
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
state           svc → both      ``state``: sent to both peers on every transition but FAILED.
abort           peer → svc      ``reason`` (one of PEER_REASONS): any live state → FAILED.
error           svc → peer      ``code``, ``reason`` (Reason vocabulary), ``keep_vm`` (true to a
                                source that was not confirmed: its VM must stay intact).
==============  ==============  =============================================================

Streams, acknowledgements, resume
---------------------------------
Three relayed streams, ``log`` and ``s2t`` (source → target) and ``t2s`` (target → source), each
numbered from 1.  The service keeps a frame from the moment it accepts it until the *receiver*
acks it, and relays that ack to the sender: acks are end to end, so a sender that keeps its unacked
payload bytes within ``window`` can never overflow the service's buffer (one that does fails the
session with ``buffer_full``).  On re-attach the receiver's ``resume_from`` acknowledges everything
before it and the service re-sends exactly the rest; the sender learns ``next`` and re-sends from
there.  A frame below ``next`` is a duplicate and is dropped; one above it is a gap (``bad_sequence``).

Failure
-------
Once attached, any violation (malformed message, wrong role, wrong state, bad sequence, overflow)
raises :class:`SessionViolation` (a ``ProtocolError``) after moving the session to FAILED and
sending ``error`` to both peers (``keep_vm`` to the source), then closing their connections.
Errors before a successful attach only refuse that connection.  Exception text stays in the logs.
"""

from __future__ import annotations

import enum
import logging
import re
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from replay_migrate.errors import ProtocolError

PROTOCOL_VERSION: Final = 1
#: where both adapters look for the bearer token when none is given (keeps it out of ``ps``)
TOKEN_ENV: Final = "REPLAY_MIGRATE_TOKEN"
#: bytes a data message adds around its payload, generously: senders keep payloads under
#: ``max_message - ENVELOPE_OVERHEAD``.
ENVELOPE_OVERHEAD: Final = 256
MAX_ROOTS: Final = 8
MAX_ROOT_NAME: Final = 32
MAX_ROOT_BYTES: Final = 64
_MAX_SEQ: Final = 2**63 - 1
# no dots: the id ends a logger name, and dots would make it a hierarchy
SESSION_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")

# websocket close codes the core asks for
CLOSE_NORMAL: Final = 1000
CLOSE_POLICY: Final = 1008
CLOSE_SUPERSEDED: Final = 4001

_log = logging.getLogger("replay_migrate.service")


class State(enum.Enum):
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


_ORDER: Final = (State.RECORDING, State.SUSPENDING, State.DIFFING, State.TRANSFERRING, State.VERIFIED,
                 State.RESUMED)


def state_reached(current: State | None, wanted: State) -> bool:
    """True when ``current`` is ``wanted`` or past it on the happy path (FAILED reaches only itself)."""
    if current is None or State.FAILED in (current, wanted):
        return current is wanted
    return _ORDER.index(current) >= _ORDER.index(wanted)


class Role(enum.Enum):
    SOURCE = "source"
    TARGET = "target"

    @property
    def peer(self) -> Role:
        return Role.TARGET if self is Role.SOURCE else Role.SOURCE

    @property
    def sends(self) -> tuple[Stream, ...]:
        return tuple(s for s in Stream if s.sender is self)

    @property
    def receives(self) -> tuple[Stream, ...]:
        return tuple(s for s in Stream if s.receiver is self)


class Stream(enum.Enum):
    LOG = "log"
    S2T = "s2t"
    T2S = "t2s"

    @property
    def sender(self) -> Role:
        return Role.TARGET if self is Stream.T2S else Role.SOURCE

    @property
    def receiver(self) -> Role:
        return self.sender.peer


#: the states in which a stream's frames are accepted from its sender
STREAM_STATES: Final[Mapping[Stream, frozenset[State]]] = {
    Stream.LOG: frozenset({State.RECORDING, State.SUSPENDING}),
    Stream.S2T: frozenset({State.SUSPENDING, State.DIFFING, State.TRANSFERRING}),
    Stream.T2S: frozenset({State.SUSPENDING, State.DIFFING, State.TRANSFERRING}),
}


class Phase(enum.Enum):
    DIFFING = "diffing"
    TRANSFERRING = "transferring"


class Reason(enum.Enum):
    """The fixed vocabulary of ``error`` reasons: the only words about a failure that cross the wire."""

    BAD_MESSAGE = "bad_message"            # not a valid envelope, unknown type or fields, text frame
    BAD_VERSION = "bad_version"            # another protocol version
    NOT_ATTACHED = "not_attached"          # the first message was not attach (or never came)
    WRONG_ROLE = "wrong_role"              # this role may not send that message
    WRONG_STATE = "wrong_state"            # not allowed in the session's current state
    BAD_SEQUENCE = "bad_sequence"          # gap, ack beyond what was sent, bad log_end or resume point
    TOO_LARGE = "too_large"                # message above max_message_size
    BUFFER_FULL = "buffer_full"            # the sender ignored the window
    UNKNOWN_SESSION = "unknown_session"    # resume of a session the service does not (any longer) hold
    SESSION_LIMIT = "session_limit"        # max_sessions live sessions already
    SUPERSEDED = "superseded"              # a newer connection attached as this role
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
    Reason.UNKNOWN_SESSION: 404, Reason.SESSION_LIMIT: 503, Reason.SUPERSEDED: 409, Reason.IDLE_TIMEOUT: 408,
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


@dataclass(frozen=True)
class Limits:
    """Every bound of the service.  Worst-case buffer memory is
    ``max_sessions * 3 streams * max_buffered_bytes`` (768 MiB with the defaults)."""

    #: largest websocket message, envelope included (also the adapter's websockets ``max_size``)
    max_message_size: int = 4 * 2**20
    #: payload bytes kept per stream until the receiver acks them; announced to senders as ``window``
    max_buffered_bytes: int = 16 * 2**20
    #: a live session fails when one of its roles is detached (or never came) for this long;
    #: an attached but quiet peer is not idle (websockets' pings police the connection)
    idle_timeout: float = 120.0
    #: how long a RESUMED or FAILED session stays for a late re-attach (to learn confirm or failure)
    finished_ttl: float = 600.0
    #: sessions held at once; finished ones are evicted, oldest first, to make room
    max_sessions: int = 16

    def __post_init__(self) -> None:
        if self.max_message_size < 4 * ENVELOPE_OVERHEAD:
            raise ValueError(f"max_message_size must be at least {4 * ENVELOPE_OVERHEAD}")
        if self.max_buffered_bytes < self.max_message_size:
            raise ValueError("max_buffered_bytes must be at least max_message_size (a frame must fit the window)")
        if self.idle_timeout <= 0 or self.finished_ttl < 0 or self.max_sessions < 1:
            raise ValueError("idle_timeout must be > 0, finished_ttl >= 0 and max_sessions >= 1")

    @property
    def max_payload(self) -> int:
        """The largest ``data`` a peer may put in one log or diff message."""
        return self.max_message_size - ENVELOPE_OVERHEAD


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


def _optional(check: _Check) -> _Check:
    return lambda x: x is None or check(x)


def _is_bytes(x: Any) -> bool:
    return isinstance(x, bytes)


def _is_bool(x: Any) -> bool:
    return isinstance(x, bool)


_STREAM_NAMES: Final = frozenset(s.value for s in Stream)
_SCHEMA: Final[Mapping[str, Mapping[str, _Check]]] = {
    "attach": {"role": _words(frozenset(r.value for r in Role)),
               "session": lambda x: isinstance(x, str) and SESSION_ID_RE.fullmatch(x) is not None,
               "resume_from": _seq_map(1), "resume": _is_bool},
    "attached": {"session": lambda x: isinstance(x, str), "state": _words(frozenset(s.value for s in State)),
                 "next": _seq_map(1), "acked": _seq_map(0), "window": _seq(1), "max_message": _seq(1),
                 "log_end": _optional(_seq(0)), "roots": _optional(valid_roots)},
    "log": {"seq": _seq(1), "data": _is_bytes},
    "log_end": {"seq": _seq(0)},
    "suspend": {},
    "diff": {"dir": _words(frozenset({Stream.S2T.value, Stream.T2S.value})), "seq": _seq(1), "data": _is_bytes},
    "ack": {"stream": _words(_STREAM_NAMES), "seq": _seq(0)},
    "phase": {"phase": _words(frozenset(p.value for p in Phase))},
    "verified": {"roots": valid_roots},
    "resumed": {},
    "confirm": {},
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
    if set(obj) != {"v", "t", *schema}:
        raise SessionViolation(Reason.BAD_MESSAGE, f"{t}: missing or unknown fields")
    for name, check in schema.items():
        if not check(obj[name]):
            raise SessionViolation(Reason.BAD_MESSAGE, f"{t}: bad field {name}")
    return obj


def error_message(reason: Reason, keep_vm: bool) -> bytes:
    return encode("error", code=reason.code, reason=reason.value, keep_vm=keep_vm)


# ---- one stream inside the service ----------------------------------------------------------------
class _Relay:
    """The frames of one stream the sender handed over and the receiver has not acked yet."""

    def __init__(self, stream: Stream, limit: int) -> None:
        self.stream = stream
        self.limit = limit
        self.next_in = 1        # next seq expected from the sender
        self.acked = 0          # the receiver's cumulative ack
        self.sent_to = 0        # highest seq pushed to the receiver's current connection
        self.frames: deque[tuple[int, bytes]] = deque()
        self.buffered = 0
        self.duplicates = 0

    def accept(self, seq: int, data: bytes) -> bool:
        """Take a frame from the sender; False for a duplicate (already taken), dropped."""
        if seq < self.next_in:
            self.duplicates += 1
            return False
        if seq > self.next_in:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"{self.stream.value} frame {seq}, expected {self.next_in}")
        if self.buffered + len(data) > self.limit:
            raise SessionViolation(Reason.BUFFER_FULL, f"{self.stream.value} would buffer "
                                   f"{self.buffered + len(data)} bytes, window is {self.limit}")
        self.frames.append((seq, data))
        self.buffered += len(data)
        self.next_in += 1
        return True

    def ack(self, seq: int) -> bool:
        """The receiver's cumulative ack; False when it acknowledges nothing new."""
        if seq <= self.acked:
            return False
        if seq > self.sent_to:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"{self.stream.value} ack {seq} beyond {self.sent_to} sent")
        while self.frames and self.frames[0][0] <= seq:
            self.buffered -= len(self.frames.popleft()[1])
        self.acked = seq
        return True

    def rewind(self, resume_from: int) -> bool:
        """A receiver (re-)attached wanting ``resume_from`` next: everything before is acked, the rest
        goes again.  True when that acknowledged something new."""
        if not self.acked + 1 <= resume_from <= self.next_in:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"{self.stream.value} resume from {resume_from}, "
                                   f"service holds {self.acked + 1}..{self.next_in - 1}")
        self.sent_to = max(self.sent_to, resume_from - 1)
        advanced = self.ack(resume_from - 1)
        self.sent_to = resume_from - 1
        return advanced

    def take_unsent(self) -> list[tuple[int, bytes]]:
        out = [(seq, data) for seq, data in self.frames if seq > self.sent_to]
        if out:
            self.sent_to = out[-1][0]
        return out

    def clear(self) -> None:
        self.frames.clear()
        self.buffered = 0


def _frame_message(stream: Stream, seq: int, data: bytes) -> bytes:
    if stream is Stream.LOG:
        return encode("log", seq=seq, data=data)
    return encode("diff", dir=stream.value, seq=seq, data=data)


# ---- the session ----------------------------------------------------------------------------------
class Session:
    """One migration's shared state and its state machine; peers reach it through :class:`Link`s.

    :meth:`receive` raises :class:`SessionViolation` after failing the session and telling both
    peers, so a caller never has to remember to do that.
    """

    def __init__(self, session_id: str, limits: Limits, now: float) -> None:
        self.id = session_id
        self.limits = limits
        self.log = logging.getLogger(f"replay_migrate.session.{session_id}")
        self.state = State.RECORDING
        self.created = now
        self.finished_at: float | None = None
        self.failure: Reason | None = None
        self.log_end: int | None = None
        self.roots: dict[str, bytes] | None = None
        self._links: dict[Role, Link | None] = dict.fromkeys(Role)
        self._absent_since: dict[Role, float | None] = dict.fromkeys(Role, now)
        self._relays = {s: _Relay(s, limits.max_buffered_bytes) for s in Stream}
        self._handlers: dict[str, Callable[[Role, dict[str, Any], float], None]] = {
            "log": self._on_log, "diff": self._on_diff, "ack": self._on_ack, "log_end": self._on_log_end,
            "suspend": self._on_suspend, "phase": self._on_phase, "verified": self._on_verified,
            "resumed": self._on_resumed, "abort": self._on_abort,
        }

    # -- introspection (tests, the adapter's logs)
    def attached(self, role: Role) -> bool:
        return self._links[role] is not None

    def buffered(self, stream: Stream) -> int:
        return self._relays[stream].buffered

    def next_expected(self, stream: Stream) -> int:
        return self._relays[stream].next_in

    def acked(self, stream: Stream) -> int:
        return self._relays[stream].acked

    @property
    def duplicates(self) -> int:
        return sum(r.duplicates for r in self._relays.values())

    # -- peers coming and going
    def attach(self, link: Link, role: Role, resume_from: Mapping[Stream, int], now: float) -> None:
        """Bind ``link`` as ``role`` (superseding an older connection), then answer ``attached`` and
        re-send what that role has not received.  Raises SessionViolation (session FAILED) when the
        resume point contradicts what the service holds: frames would be lost or duplicated."""
        if self.state is State.FAILED:
            self.log.info("%s attached to the failed session", role.value)
            link._refuse(self._failure_reason(), keep_vm=role is Role.SOURCE, code=CLOSE_NORMAL)
            return
        old = self._links[role]
        if old is not None and old is not link:
            self.log.info("%s re-attached: its previous connection is superseded", role.value)
            old._unbind()
            old._refuse(Reason.SUPERSEDED, keep_vm=self._keep_vm(role), code=CLOSE_SUPERSEDED)
        self._links[role] = link
        link._bind(self, role)
        self._absent_since[role] = None
        try:
            advanced = [s for s in role.receives if self._relays[s].rewind(resume_from[s])]
        except SessionViolation as e:
            raise self._violate(role, "attach", e, now) from None
        self.log.info("%s attached in state %s (resume_from %s)", role.value, self.state.value,
                      {s.value: resume_from[s] for s in role.receives})
        link._push(encode(
            "attached", session=self.id, state=self.state.value,
            next={s.value: self._relays[s].next_in for s in role.sends},
            acked={s.value: self._relays[s].acked for s in role.sends},
            window=self.limits.max_buffered_bytes, max_message=self.limits.max_message_size,
            log_end=self.log_end, roots=self.roots))
        if role is Role.SOURCE and self.state is State.RESUMED:
            link._push(encode("confirm"))
        for stream in role.receives:           # LOG first: the same order as live operation,
            if stream in advanced:               # log frames, log_end, then diff messages
                self._forward_ack(stream)
            self._pump(stream)
            if stream is Stream.LOG and self.log_end is not None:
                link._push(encode("log_end", seq=self.log_end))

    def detach(self, link: Link, now: float) -> None:
        """The connection is gone: buffered frames stay until the role comes back or time runs out."""
        role = link.role
        if role is not None and self._links[role] is link:
            self._links[role] = None
            self._absent_since[role] = now
            self.log.info("%s detached in state %s", role.value, self.state.value)

    # -- messages
    def receive(self, role: Role, msg: dict[str, Any], now: float) -> None:
        """Apply one decoded message from ``role``'s current connection."""
        t = msg["t"]
        link = self._links[role]
        if self.state is State.FAILED:
            if link is not None:
                self._unbind_and_refuse(role, self._failure_reason(), CLOSE_NORMAL)
            return
        if self.state is State.RESUMED and t != "ack":
            # finished: a late message must not turn a confirmed migration into a failed one
            self.log.warning("%s sent %s after the session resumed: connection refused", role.value, t)
            self._unbind_and_refuse(role, Reason.WRONG_STATE, CLOSE_POLICY)
            raise SessionViolation(Reason.WRONG_STATE, f"{t} after resumed")
        handler = self._handlers.get(t)
        try:
            if handler is None:
                raise SessionViolation(Reason.BAD_MESSAGE, f"{t} is not a message a peer sends once attached")
            handler(role, msg, now)
        except SessionViolation as e:
            raise self._violate(role, t, e, now) from None

    def fail(self, reason: Reason, now: float) -> None:
        """Move to FAILED, drop the buffers, tell every attached peer and close their connections."""
        if self.state.terminal:
            return
        self.log.warning("session failed in state %s: %s; the source keeps its VM", self.state.value, reason.value)
        self.state = State.FAILED
        self.failure = reason
        self.finished_at = now
        for relay in self._relays.values():
            relay.clear()
        for role in Role:
            if self._links[role] is not None:
                self._unbind_and_refuse(role, reason, CLOSE_NORMAL)

    def tick(self, now: float) -> None:
        """Fail a live session whose source or target has been away longer than ``idle_timeout``."""
        if self.state.terminal:
            return
        for role in Role:
            since = self._absent_since[role]
            if since is not None and now - since >= self.limits.idle_timeout:
                self.log.warning("%s absent for %.1f s (idle_timeout %.1f s)", role.value, now - since,
                                 self.limits.idle_timeout)
                self.fail(Reason.IDLE_TIMEOUT, now)
                return

    def finished(self, now: float) -> bool:
        """True once a terminal session has lingered ``finished_ttl``: the registry may drop it."""
        return self.finished_at is not None and now - self.finished_at >= self.limits.finished_ttl

    def close_links(self) -> None:
        for role in Role:
            link = self._links[role]
            if link is not None:
                self._links[role] = None
                link._unbind()
                link._close(CLOSE_NORMAL)

    # -- handlers: role first, then state, then sequence
    def _require(self, role: Role, allowed: Role | None, states: frozenset[State] | set[State], what: str) -> None:
        if allowed is not None and role is not allowed:
            raise SessionViolation(Reason.WRONG_ROLE, f"{what} from {role.value}")
        if self.state not in states:
            raise SessionViolation(Reason.WRONG_STATE, f"{what} in state {self.state.value}")

    def _frame(self, role: Role, stream: Stream, seq: int, data: bytes, what: str) -> None:
        self._require(role, stream.sender, STREAM_STATES[stream], what)
        if stream is Stream.LOG and self.log_end is not None:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"log frame {seq} after log_end {self.log_end}")
        if self._relays[stream].accept(seq, data):
            self._pump(stream)
        else:
            self.log.debug("duplicate %s frame %d dropped", stream.value, seq)

    def _on_log(self, role: Role, msg: dict[str, Any], now: float) -> None:
        self._frame(role, Stream.LOG, msg["seq"], msg["data"], "log")

    def _on_diff(self, role: Role, msg: dict[str, Any], now: float) -> None:
        self._frame(role, Stream(msg["dir"]), msg["seq"], msg["data"], f"diff {msg['dir']}")

    def _on_ack(self, role: Role, msg: dict[str, Any], now: float) -> None:
        stream = Stream(msg["stream"])
        if role is not stream.receiver:
            raise SessionViolation(Reason.WRONG_ROLE, f"ack of {stream.value} from {role.value}")
        if self._relays[stream].ack(msg["seq"]):
            self._forward_ack(stream)

    def _on_log_end(self, role: Role, msg: dict[str, Any], now: float) -> None:
        self._require(role, Role.SOURCE, STREAM_STATES[Stream.LOG], "log_end")
        if self.log_end is not None:
            raise SessionViolation(Reason.WRONG_STATE, "second log_end")
        last = self._relays[Stream.LOG].next_in - 1
        if msg["seq"] != last:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"log_end {msg['seq']} but the last log frame is {last}")
        self.log_end = last
        self.log.info("log ended at frame %d", last)
        self._send(Role.TARGET, encode("log_end", seq=last))

    def _on_suspend(self, role: Role, msg: dict[str, Any], now: float) -> None:
        self._require(role, Role.SOURCE, {State.RECORDING}, "suspend")
        self._transition(State.SUSPENDING, now)

    def _on_phase(self, role: Role, msg: dict[str, Any], now: float) -> None:
        if Phase(msg["phase"]) is Phase.DIFFING:
            self._require(role, Role.TARGET, {State.SUSPENDING}, "phase diffing")
            if self.log_end is None or self._relays[Stream.LOG].acked != self.log_end:
                raise SessionViolation(Reason.WRONG_STATE, "phase diffing before the whole log was acked")
            self._transition(State.DIFFING, now)
        else:
            self._require(role, Role.TARGET, {State.DIFFING}, "phase transferring")
            self._transition(State.TRANSFERRING, now)

    def _on_verified(self, role: Role, msg: dict[str, Any], now: float) -> None:
        self._require(role, Role.TARGET, {State.TRANSFERRING}, "verified")
        self.roots = dict(msg["roots"])
        # roots first: a source that wakes on the VERIFIED state must already hold them (it once
        # read no roots, failed a migration that had verified, and resumed its VM)
        self._send(Role.SOURCE, encode("verified", roots=self.roots))
        self._transition(State.VERIFIED, now)

    def _on_resumed(self, role: Role, msg: dict[str, Any], now: float) -> None:
        self._require(role, Role.TARGET, {State.VERIFIED}, "resumed")
        self._transition(State.RESUMED, now)
        self.finished_at = now
        self._send(Role.SOURCE, encode("confirm"))

    def _on_abort(self, role: Role, msg: dict[str, Any], now: float) -> None:
        reason = Reason(msg["reason"])
        self.log.warning("%s aborted the session: %s", role.value, reason.value)
        self.fail(reason, now)

    # -- plumbing
    def _transition(self, new: State, now: float) -> None:
        self.log.info("%s -> %s", self.state.value, new.value)
        self.state = new
        for role in Role:
            self._send(role, encode("state", state=new.value))

    def _violate(self, role: Role, what: str, e: SessionViolation, now: float) -> SessionViolation:
        self.log.warning("%s from %s rejected: %s", what, role.value, e)
        self.fail(e.reason, now)
        return e

    def _send(self, role: Role, data: bytes) -> None:
        link = self._links[role]
        if link is not None:
            link._push(data)

    def _pump(self, stream: Stream) -> None:
        link = self._links[stream.receiver]
        if link is None:
            return
        for seq, data in self._relays[stream].take_unsent():
            link._push(_frame_message(stream, seq, data))

    def _forward_ack(self, stream: Stream) -> None:
        self._send(stream.sender, encode("ack", stream=stream.value, seq=self._relays[stream].acked))

    def _keep_vm(self, role: Role) -> bool:
        return role is Role.SOURCE and self.state is not State.RESUMED

    def _failure_reason(self) -> Reason:
        return self.failure if self.failure is not None else Reason.INTERNAL

    def _unbind_and_refuse(self, role: Role, reason: Reason, code: int) -> None:
        link = self._links[role]
        if link is not None:
            self._links[role] = None
            self._absent_since[role] = None  # only called once the session is terminal
            link._unbind()
            link._refuse(reason, keep_vm=self._keep_vm(role), code=code)


# ---- one connection -------------------------------------------------------------------------------
class Link:
    """One websocket connection as the core sees it: feed it messages, drain :meth:`data_to_send`,
    and close the connection with :attr:`close_code` once that is set and the output is drained.

    ``on_output`` is called whenever output or a close request appears, also when another
    connection's message caused it: the adapter uses it to wake this connection's writer.
    """

    def __init__(self, registry: SessionRegistry, session_id: str, now: float,
                 on_output: Callable[[], None] | None = None) -> None:
        self.registry = registry
        self.session_id = session_id
        self.created = now
        self.on_output = on_output
        self.session: Session | None = None
        self.role: Role | None = None
        self.close_code: int | None = None
        self.lost = False
        self._claimed_role: Role | None = None
        self._out: deque[bytes] = deque()

    @property
    def closing(self) -> bool:
        return self.close_code is not None or self.lost

    def receive(self, data: bytes, now: float) -> None:
        """One binary message from the peer.  Never raises a protocol error: it becomes output."""
        if self.closing:
            return
        try:
            msg = decode(data, self.registry.limits.max_message_size)
        except SessionViolation as e:
            self._violation(e, now)
            return
        session = self.session
        if session is None:
            try:
                self._attach(msg, now)
            except SessionViolation as e:
                _log.info("connection for session %s refused: %s", self.session_id, e)
                self._refuse(e.reason, keep_vm=self._claimed_role is Role.SOURCE)
            return
        assert self.role is not None
        try:
            session.receive(self.role, msg, now)
        except SessionViolation:
            pass  # the session has failed (or refused us) and told the peers

    def receive_text(self, now: float) -> None:
        """A text frame: the protocol is binary only."""
        self._violation(SessionViolation(Reason.BAD_MESSAGE, "text frame"), now)

    def attach_timeout(self, now: float) -> None:
        """The peer connected but sent no attach in time."""
        if self.session is None:
            self._refuse(Reason.NOT_ATTACHED, keep_vm=False)

    def internal_error(self, now: float) -> None:
        """The adapter caught a bug while handling this connection's input."""
        self._violation(SessionViolation(Reason.INTERNAL, "bug in the service"), now)

    def connection_lost(self, now: float) -> None:
        self.lost = True
        if self.session is not None:
            self.session.detach(self, now)
            self.session = None

    def data_to_send(self) -> list[bytes]:
        out = list(self._out)
        self._out.clear()
        return out

    # -- internals, also called by Session
    def _attach(self, msg: dict[str, Any], now: float) -> None:
        if msg["t"] != "attach":
            raise SessionViolation(Reason.NOT_ATTACHED, f"first message is {msg['t']}")
        role = self._claimed_role = Role(msg["role"])
        if msg["session"] != self.session_id:
            raise SessionViolation(Reason.BAD_MESSAGE, "attach names another session than the URL")
        wanted = {s.value for s in role.receives}
        if set(msg["resume_from"]) != wanted:
            raise SessionViolation(Reason.BAD_MESSAGE, f"resume_from must name exactly {sorted(wanted)}")
        session = self.registry.lookup(self.session_id)
        if session is None:
            if msg["resume"]:
                raise SessionViolation(Reason.UNKNOWN_SESSION, "resume of a session the service does not hold")
            session = self.registry.create(self.session_id, now)
        session.attach(self, role, {Stream(k): v for k, v in msg["resume_from"].items()}, now)

    def _violation(self, e: SessionViolation, now: float) -> None:
        if self.session is not None:
            self.session.log.warning("message from %s rejected: %s", self.role.value if self.role else "?", e)
            self.session.fail(e.reason, now)
        else:
            _log.info("connection for session %s refused: %s", self.session_id, e)
            self._refuse(e.reason, keep_vm=self._claimed_role is Role.SOURCE)

    def _bind(self, session: Session, role: Role) -> None:
        self.session = session
        self.role = role

    def _unbind(self) -> None:
        self.session = None

    def _push(self, data: bytes) -> None:
        if self.closing:
            return
        self._out.append(data)
        if self.on_output is not None:
            self.on_output()

    def _refuse(self, reason: Reason, keep_vm: bool, code: int = CLOSE_POLICY) -> None:
        if self.closing:
            return
        self._push(error_message(reason, keep_vm))
        self._close(code)

    def _close(self, code: int) -> None:
        if self.close_code is None:
            self.close_code = code
            if self.on_output is not None:
                self.on_output()


# ---- the registry ---------------------------------------------------------------------------------
class SessionRegistry:
    """The sessions a service holds, by id.  Sessions are created by the first attach."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits if limits is not None else Limits()
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions

    def ids(self) -> list[str]:
        return list(self._sessions)

    def lookup(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def create(self, session_id: str, now: float) -> Session:
        """A new session in RECORDING; at ``max_sessions`` the oldest finished one is evicted first."""
        if SESSION_ID_RE.fullmatch(session_id) is None:
            raise SessionViolation(Reason.BAD_MESSAGE, "bad session id")
        if session_id in self._sessions:
            raise SessionViolation(Reason.WRONG_STATE, f"session {session_id} exists")
        if len(self._sessions) >= self.limits.max_sessions:
            finished = sorted((s for s in self._sessions.values() if s.finished_at is not None),
                              key=lambda s: s.finished_at or 0.0)
            if not finished:
                raise SessionViolation(Reason.SESSION_LIMIT, f"{len(self._sessions)} live sessions")
            self.remove(finished[0].id)
        session = Session(session_id, self.limits, now)
        self._sessions[session_id] = session
        session.log.info("session created")
        return session

    def remove(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            session.close_links()
            session.log.info("session removed in state %s", session.state.value)

    def expire(self, now: float) -> list[str]:
        """Fail sessions whose peers stayed away too long; drop finished ones past their ttl."""
        gone = []
        for session in list(self._sessions.values()):
            session.tick(now)
            if session.finished(now):
                self.remove(session.id)
                gone.append(session.id)
        return gone
