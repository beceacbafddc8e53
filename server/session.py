"""Sans-I/O core of the websocket session-handoff service (DESIGN.md §1, §8).

Bytes in, bytes out: no sockets, no asyncio and no clock (callers pass ``now``, monotonic seconds),
so every state transition and every resend decision is testable without a network.
``server/service.py`` is the asyncio adapter; ``server/client.py`` holds the peers' side.

Credentials
-----------
The shared bearer *token* only lets its holder create sessions (``/sessions``).  Creating one
returns a fresh random session id and one credential per role, ``rm1.<id>.<role>.<secret>``, where
``secret = HMAC-SHA256(service key, id, role)``.  A connection to ``/sessions/<id>`` must present its
role's credential (checked in constant time before the websocket opens) and can then attach as that
role of that session and nothing else.  The secrets are derived, not stored: a restarted service
(or another instance with the same key) verifies them without any state of its own.

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
bytes within ``window`` can never overflow the service's buffer (one that does fails the session
with ``buffer_full``).  On re-attach the receiver's ``resume_from`` acknowledges everything before
it and the service re-sends exactly the rest; the sender learns ``next`` and re-sends from there.
A frame below ``next`` is a duplicate and is dropped; one above it is a gap (``bad_sequence``).

A service that dies
-------------------
The peers, not the service, hold what a resume needs: each sender keeps every frame until its ack
comes back, and every control until it sees it applied.  So a session whose peers are both gone
is dropped at once, and a new service instance needs no state: the first attach of each role to a
session it does not hold re-creates it from that role's ``claim``.  The session moves forward to
the furthest state a peer saw, a stream's positions come from its sender (``acked``, ``next``) and
its receiver (``resume_from``), and every claim is checked against the claimant's own positions
and against what the other role said (``log_end`` and ``roots`` must agree, a receiver cannot hold
frames its sender never had): a contradiction fails the session.  In such a *restored* session a
control that is already applied (the peer never saw it applied) is a no-op, and a frame the
sender had journalled before is accepted in any state but FAILED (it was legal when first sent,
and its receiver may still need it: the source reads the target's last diff message after the
target resumed).
Finished sessions leave a tombstone (state, reason) for ``finished_ttl``.

Failure
-------
Once attached, any violation (malformed message, wrong role, wrong state, bad sequence, overflow)
raises :class:`SessionViolation` (a ``ProtocolError``) after moving the session to FAILED and
sending ``error`` to both peers (``keep_vm`` to the source), then closing their connections.
Errors before a successful attach only refuse that connection.  Exception text stays in the logs.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import logging
import os
import re
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

from replay_migrate.errors import ProtocolError

PROTOCOL_VERSION: Final = 2
#: where the adapters look for the creation token (keeps it out of ``ps``)
TOKEN_ENV: Final = "REPLAY_MIGRATE_TOKEN"
#: where the peers look for their role credential when no file is given
CREDENTIAL_ENV: Final = "REPLAY_MIGRATE_CREDENTIAL"
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
# no dots: the id ends a logger name, and dots would make it a hierarchy
SESSION_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
SESSION_ID_BYTES: Final = 16          # 128 random bits, 22 characters
SECRET_BYTES: Final = 32
MIN_KEY_BYTES: Final = 32
CREDENTIAL_RE: Final = re.compile(r"rm1\.([A-Za-z0-9_-]{1,64})\.(source|target)\.([A-Za-z0-9_-]{43})")
CREATE_PATH: Final = "/sessions"
SESSION_PATH_RE: Final = re.compile(r"/sessions/([A-Za-z0-9_-]{1,64})")
_SECRET_LABEL: Final = b"replay-migrate role secret v1"

# websocket close codes the core asks for
CLOSE_NORMAL: Final = 1000
CLOSE_POLICY: Final = 1008
CLOSE_SUPERSEDED: Final = 4001

KiB: Final = 1024
MiB: Final = 1024 * KiB
#: what one tombstone (a finished session's id, state and reason) costs, generously
TOMBSTONE_BYTES: Final = 512
#: the most a socket read hands websockets at once (asyncio's selector transports read 256 KiB)
READ_CHUNK: Final = 256 * KiB

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


# ---- credentials ----------------------------------------------------------------------------------
def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class Credential:
    """One role of one session: what a peer presents as ``Authorization: Bearer <str(credential)>``.
    The secret stays out of ``repr`` (and so out of tracebacks and logs)."""

    session: str
    role: Role
    secret: bytes = field(repr=False)

    def __str__(self) -> str:
        return f"rm1.{self.session}.{self.role.value}.{_b64(self.secret)}"

    @staticmethod
    def parse(text: str) -> Credential | None:
        """The credential in ``text`` (surrounding white space allowed), or None if it is not one."""
        m = CREDENTIAL_RE.fullmatch(text.strip())
        if m is None:
            return None
        return Credential(m[1], Role(m[2]), base64.urlsafe_b64decode(m[3] + "="))


@dataclass(frozen=True)
class Grant:
    """What one connection was authorised for: creating sessions (``session`` None: the shared
    token) or one role of one session (its credential)."""

    session: str | None = None
    role: Role | None = None

    @property
    def creates(self) -> bool:
        return self.session is None


CREATE: Final = Grant()


class Keyring:
    """The service key and the creation token, and everything derived from them.

    Role secrets are ``HMAC-SHA256(key, label, session id, role)``: nothing is stored, so whoever
    holds the key (this instance after a restart, another instance behind a proxy) verifies them.
    Every comparison is constant time, and none of them depends on whether a session exists.
    """

    def __init__(self, key: bytes, token: str | None) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the service key must have at least {MIN_KEY_BYTES} bytes")
        self._key = key
        self._token = token.encode("utf-8") if token else None

    def secret(self, session_id: str, role: Role) -> bytes:
        msg = b"\0".join((_SECRET_LABEL, session_id.encode("ascii"), role.value.encode("ascii")))
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def credential(self, session_id: str, role: Role) -> Credential:
        return Credential(session_id, role, self.secret(session_id, role))

    def new_session(self, seed: bytes) -> tuple[Credential, Credential]:
        """A new session id from ``seed`` (random bytes) and its (source, target) credentials."""
        if len(seed) < SESSION_ID_BYTES:
            raise ValueError(f"a session id needs {SESSION_ID_BYTES} random bytes")
        session_id = _b64(seed[:SESSION_ID_BYTES])
        return self.credential(session_id, Role.SOURCE), self.credential(session_id, Role.TARGET)

    def authorize(self, path: str, authorization: str) -> Grant | None:
        """The grant for a request to ``path`` (no query) with this ``Authorization`` header, or None.
        The token opens only :data:`CREATE_PATH`; a session path needs that session's credential."""
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value:
            return None
        if path == CREATE_PATH:
            if self._token is None:
                return None
            try:
                given = value.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                return None
            return CREATE if hmac.compare_digest(given, self._token) else None
        m = SESSION_PATH_RE.fullmatch(path)
        cred = Credential.parse(value) if m is not None else None
        if m is None or cred is None or cred.session != m[1]:
            return None
        if not hmac.compare_digest(self.secret(cred.session, cred.role), cred.secret):
            return None
        return Grant(cred.session, cred.role)


def known_path(path: str) -> bool:
    """Whether ``path`` is one the service answers at all (the rest is 404, before any auth)."""
    return path == CREATE_PATH or SESSION_PATH_RE.fullmatch(path) is not None


# ---- limits ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    """Every bound of the service, and the memory they add up to (:attr:`worst_case_memory`, which
    must fit ``memory_budget``).  The defaults make 444 MiB of a 512 MiB budget."""

    #: largest websocket message, envelope included (also websockets' ``max_size``, each way); the
    #: diff protocol's messages are at most 1 MiB
    max_message_size: int = 2 * MiB
    #: bytes kept per stream until the receiver acks them (payload + FRAME_COST per frame); announced
    #: to senders as ``window``
    max_buffered_bytes: int = 8 * MiB
    #: frame bytes queued for one connection's writer; the rest waits in the stream's buffer
    max_outgoing_bytes: int = 2 * MiB
    #: websockets' incoming frame queue per connection (its high-water mark, ``max_queue``)
    max_queue: int = 2
    #: websockets' outgoing transport buffer per connection (its high-water mark, ``write_limit``)
    write_limit: int = 64 * KiB
    #: open websocket connections (handshakes beyond it are answered 503)
    max_connections: int = 24
    #: open connections from one client address (behind a proxy: the proxy's)
    max_connections_per_address: int = 8
    #: sessions with an attached peer; a session nobody is attached to is dropped at once
    max_sessions: int = 8
    #: finished sessions remembered (state and reason, for a late re-attach)
    max_tombstones: int = 1024
    #: a live session fails when one of its roles is detached (or never came) for this long
    #: while the other is attached; an attached but quiet peer is not idle (pings police it)
    idle_timeout: float = 120.0
    #: how long a finished session is remembered, and how long a finished session may stay attached
    finished_ttl: float = 600.0
    #: what :attr:`worst_case_memory` may reach
    memory_budget: int = 512 * MiB

    def __post_init__(self) -> None:
        ints = ("max_message_size", "max_buffered_bytes", "max_outgoing_bytes", "max_queue", "write_limit",
                "max_connections", "max_connections_per_address", "max_sessions", "max_tombstones",
                "memory_budget")
        for name in ints:
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer")
        if self.max_message_size < 4 * ENVELOPE_OVERHEAD:
            raise ValueError(f"max_message_size must be at least {4 * ENVELOPE_OVERHEAD}")
        if self.max_buffered_bytes < self.max_message_size + FRAME_COST:
            raise ValueError("max_buffered_bytes must be at least max_message_size (a frame must fit the window)")
        if self.max_outgoing_bytes < self.max_message_size:
            raise ValueError("max_outgoing_bytes must be at least max_message_size")
        if self.max_connections_per_address > self.max_connections:
            raise ValueError("max_connections_per_address must not exceed max_connections")
        if self.idle_timeout <= 0 or self.finished_ttl < 0:
            raise ValueError("idle_timeout must be > 0 and finished_ttl >= 0")
        if self.worst_case_memory > self.memory_budget:
            raise ValueError(f"these limits need up to {self.worst_case_memory / MiB:.1f} MiB, more than "
                             f"memory_budget ({self.memory_budget / MiB:.1f} MiB): lower max_sessions, "
                             "max_connections, max_buffered_bytes, max_queue or max_message_size")

    @property
    def max_payload(self) -> int:
        """The largest ``data`` a peer may put in one log or diff message."""
        return self.max_message_size - ENVELOPE_OVERHEAD

    @property
    def connection_memory(self) -> int:
        """One connection at worst: websockets' queued frames, the frame being parsed and one socket
        read; the core's output queue, the message being written and the transport's buffer."""
        incoming = (self.max_queue + 1) * self.max_message_size + READ_CHUNK
        outgoing = self.max_outgoing_bytes + self.max_message_size + self.write_limit
        return incoming + outgoing

    @property
    def worst_case_memory(self) -> int:
        """Every queue of the service at once: the streams' buffers of every session, every
        connection's queues, the one message being decoded (and its payload) and the tombstones."""
        return (self.max_sessions * len(Stream) * self.max_buffered_bytes
                + self.max_connections * self.connection_memory
                + 2 * self.max_message_size
                + self.max_tombstones * TOMBSTONE_BYTES)


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


def _is_session_id(x: Any) -> bool:
    return isinstance(x, str) and SESSION_ID_RE.fullmatch(x) is not None


def _is_credential(x: Any) -> bool:
    return isinstance(x, str) and CREDENTIAL_RE.fullmatch(x) is not None


_STREAM_NAMES: Final = frozenset(s.value for s in Stream)
_LIVE_STATE_NAMES: Final = frozenset(s.value for s in _ORDER)
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
    "diff": {"dir": _words(frozenset({Stream.S2T.value, Stream.T2S.value})), "seq": _seq(1), "data": _is_bytes},
    "ack": {"stream": _words(_STREAM_NAMES), "seq": _seq(0)},
    "phase": {"phase": _words(frozenset(p.value for p in Phase))},
    "verified": {"roots": valid_roots},
    "resumed": {},
    "confirm": {},
    "released": {},
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


# ---- one stream inside the service ----------------------------------------------------------------
def frame_cost(data: bytes) -> int:
    """What one frame counts against a window and a buffer."""
    return len(data) + FRAME_COST


class _Relay:
    """The frames of one stream the sender handed over and the receiver has not acked yet: those
    pushed to the receiver's current connection (``sent``) and those still waiting (``unsent``)."""

    def __init__(self, stream: Stream, limit: int) -> None:
        self.stream = stream
        self.limit = limit
        self.next_in = 1        # next seq expected from the sender
        self.acked = 0          # the receiver's cumulative ack
        self.sent: deque[tuple[int, bytes]] = deque()
        self.unsent: deque[tuple[int, bytes]] = deque()
        self.buffered = 0
        self.duplicates = 0
        self.sender_seen = False
        self.receiver_seen = False
        #: frames below this seq were journalled by the sender before it attached here
        self.resend_below = 1

    @property
    def sent_to(self) -> int:
        """The highest seq pushed to the receiver's current connection (or acked)."""
        return self.sent[-1][0] if self.sent else self.acked

    def accept(self, seq: int, data: bytes) -> bool:
        """Take a frame from the sender; False for a duplicate (already taken), dropped."""
        if seq < self.next_in:
            self.duplicates += 1
            return False
        if seq > self.next_in:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"{self.stream.value} frame {seq}, expected {self.next_in}")
        cost = frame_cost(data)
        if self.buffered + cost > self.limit:
            raise SessionViolation(Reason.BUFFER_FULL, f"{self.stream.value} would buffer "
                                   f"{self.buffered + cost} bytes, window is {self.limit}")
        self.unsent.append((seq, data))
        self.buffered += cost
        self.next_in += 1
        return True

    def ack(self, seq: int) -> bool:
        """The receiver's cumulative ack; False when it acknowledges nothing new."""
        if seq <= self.acked:
            return False
        if seq > self.sent_to:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"{self.stream.value} ack {seq} beyond {self.sent_to} sent")
        while self.sent and self.sent[0][0] <= seq:
            self.buffered -= frame_cost(self.sent.popleft()[1])
        self.acked = seq
        return True

    def peek(self) -> tuple[int, bytes] | None:
        return self.unsent[0] if self.unsent else None

    def mark_sent(self) -> None:
        self.sent.append(self.unsent.popleft())

    def rewind(self, resume_from: int) -> bool:
        """A receiver (re-)attached wanting ``resume_from`` next: everything before is acked, the rest
        goes again.  True when that acknowledged something new."""
        if not self.acked + 1 <= resume_from <= self.next_in:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"{self.stream.value} resume from {resume_from}, "
                                   f"service holds {self.acked + 1}..{self.next_in - 1}")
        self.unsent.extendleft(reversed(self.sent))
        self.sent.clear()
        self._drop_below(resume_from)
        advanced = resume_from - 1 > self.acked
        self.acked = max(self.acked, resume_from - 1)
        return advanced

    def claim_sender(self, acked: int, nxt: int) -> None:
        """The sender's first attach to this session object: it holds every frame ``acked+1..nxt-1``
        and saw everything up to ``acked`` acknowledged."""
        if self.receiver_seen:
            # no frame came from this sender yet, so next_in and acked are the receiver's word
            if not acked <= self.acked <= nxt - 1:
                raise SessionViolation(Reason.BAD_SEQUENCE, (
                    f"{self.stream.value}: the sender holds {acked + 1}..{nxt - 1}, the receiver has everything "
                    f"up to {self.acked}"))
        else:
            self.acked = acked
            self.next_in = acked + 1
        self.sender_seen = True
        self.resend_below = nxt

    def claim_receiver(self, resume_from: int) -> bool:
        """The receiver's first attach to this session object: it holds every frame before
        ``resume_from``.  True when that acknowledged something the sender should learn."""
        self.receiver_seen = True
        if not self.sender_seen:
            self.acked = resume_from - 1
            self.next_in = resume_from
            return False
        if not self.acked + 1 <= resume_from <= max(self.next_in, self.resend_below):
            raise SessionViolation(Reason.BAD_SEQUENCE, (
                f"{self.stream.value}: the receiver has everything before {resume_from}, the sender saw "
                f"{self.acked} acked and holds up to {max(self.next_in, self.resend_below) - 1}"))
        if resume_from <= self.next_in:
            return self.rewind(resume_from)
        # the receiver has frames the sender has yet to re-send here: those become duplicates
        self._drop_below(resume_from)
        self.sent.clear()
        self.unsent.clear()
        self.buffered = 0
        self.acked = resume_from - 1
        self.next_in = resume_from
        return True

    def _drop_below(self, seq: int) -> None:
        while self.unsent and self.unsent[0][0] < seq:
            self.buffered -= frame_cost(self.unsent.popleft()[1])

    def clear(self) -> None:
        self.sent.clear()
        self.unsent.clear()
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

    def __init__(self, session_id: str, limits: Limits, now: float, *, state: State = State.RECORDING,
                 released: bool = False) -> None:
        self.id = session_id
        self.limits = limits
        self.log = logging.getLogger(f"replay_migrate.session.{session_id}")
        self.state = state
        self.created = now
        self.finished_at: float | None = now if state.terminal else None
        self.failure: Reason | None = None
        self.log_end: int | None = None
        self.roots: dict[str, bytes] | None = None
        self.released = released
        #: some peer was attached to this session before this object existed (a service restart,
        #: or the session was dropped while nobody was attached): controls may repeat
        self.restored = state is not State.RECORDING
        self._seen: set[Role] = set()
        self._links: dict[Role, Link | None] = dict.fromkeys(Role)
        self._absent_since: dict[Role, float | None] = dict.fromkeys(Role, now)
        self._relays = {s: _Relay(s, limits.max_buffered_bytes) for s in Stream}
        self._handlers: dict[str, Callable[[Role, dict[str, Any], float], None]] = {
            "log": self._on_log, "diff": self._on_diff, "ack": self._on_ack, "log_end": self._on_log_end,
            "suspend": self._on_suspend, "phase": self._on_phase, "verified": self._on_verified,
            "resumed": self._on_resumed, "released": self._on_released, "abort": self._on_abort,
        }

    # -- introspection (tests, the adapter's logs, the registry)
    def attached(self, role: Role) -> bool:
        return self._links[role] is not None

    @property
    def vacant(self) -> bool:
        """No peer is attached: the registry drops the session (its peers can re-create it)."""
        return all(link is None for link in self._links.values())

    def buffered(self, stream: Stream) -> int:
        return self._relays[stream].buffered

    @property
    def buffered_total(self) -> int:
        return sum(r.buffered for r in self._relays.values())

    def next_expected(self, stream: Stream) -> int:
        return self._relays[stream].next_in

    def acked(self, stream: Stream) -> int:
        return self._relays[stream].acked

    @property
    def duplicates(self) -> int:
        return sum(r.duplicates for r in self._relays.values())

    # -- peers coming and going
    def attach(self, link: Link, role: Role, resume_from: Mapping[Stream, int], claim: Claim, resume: bool,
               now: float) -> None:
        """Bind ``link`` as ``role`` (superseding an older connection of the same credential), then
        answer ``attached`` and re-send what that role has not received.  The role's first attach to
        this object brings its ``claim`` in.  Raises SessionViolation (session FAILED) when the resume
        point or the claim contradicts what the service holds: frames would be lost or duplicated."""
        if self.state is State.FAILED:
            self.log.info("%s attached to the failed session", role.value)
            link._refuse(self._failure_reason(), keep_vm=role is Role.SOURCE, code=CLOSE_NORMAL)
            return
        first = role not in self._seen
        try:
            if first:
                self.restored = self.restored or resume
                self._merge(role, claim, resume_from, now)
            elif _ORDER.index(claim.state) > _ORDER.index(self.state):
                raise SessionViolation(Reason.BAD_SEQUENCE, f"{role.value} claims state {claim.state.value}, "
                                       f"which this session never reached")
        except SessionViolation as e:
            raise self._violate(role, "attach", e, now) from None
        old = self._links[role]
        if old is not None and old is not link:
            self.log.info("%s re-attached: its previous connection is superseded", role.value)
            old._unbind()
            old._refuse(Reason.SUPERSEDED, keep_vm=self._keep_vm(role), code=CLOSE_SUPERSEDED)
        self._links[role] = link
        link._bind(self, role)
        self._absent_since[role] = None
        try:
            advanced = []
            for s in role.receives:
                relay = self._relays[s]
                if relay.claim_receiver(resume_from[s]) if first else relay.rewind(resume_from[s]):
                    advanced.append(s)
            if first:
                for s in role.sends:
                    self._relays[s].claim_sender(claim.acked[s], claim.next[s])
        except SessionViolation as e:
            raise self._violate(role, "attach", e, now) from None
        self._seen.add(role)
        self.log.info("%s attached in state %s (resume_from %s%s)", role.value, self.state.value,
                      {s.value: resume_from[s] for s in role.receives}, ", restored" if self.restored else "")
        link._push(encode(
            "attached", session=self.id, state=self.state.value,
            next={s.value: self._relays[s].next_in for s in role.sends},
            acked={s.value: self._relays[s].acked for s in role.sends},
            window=self.limits.max_buffered_bytes, max_message=self.limits.max_message_size,
            log_end=self.log_end, roots=self.roots))
        if role is Role.SOURCE and self.state is State.RESUMED:
            link._push(encode("confirm"))
        if self.released:
            link._push(encode("released"))
        for stream in advanced:
            self._forward_ack(stream)
        self._pump_to(role)         # log frames, log_end, then diff messages: the live order

    def _merge(self, role: Role, claim: Claim, resume_from: Mapping[Stream, int], now: float) -> None:
        """Take in what a role's first attach says it knows; refuse what contradicts the session or
        the claimant's own positions."""
        if state_reached(claim.state, State.VERIFIED) and claim.roots is None:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"{role.value} claims {claim.state.value} without roots")
        if claim.released and claim.state is not State.RESUMED:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"{role.value} claims released before resumed")
        if state_reached(claim.state, State.DIFFING) and claim.log_end is None:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"{role.value} claims {claim.state.value} before log_end")
        # the last log frame this peer holds: the source sent it, the target received it
        last = claim.next[Stream.LOG] - 1 if role is Role.SOURCE else resume_from[Stream.LOG] - 1
        if claim.log_end is not None and claim.log_end != last:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"{role.value} claims log_end {claim.log_end} "
                                   f"holding log frames up to {last}")
        known_end = self.log_end if self.log_end is not None else claim.log_end
        if known_end is not None and (claim.log_end not in (None, known_end)
                                      or (role is Role.SOURCE and last != known_end)):
            raise SessionViolation(Reason.BAD_SEQUENCE, f"{role.value} disagrees with log_end {known_end}")
        log = self._relays[Stream.LOG]
        if known_end is not None and log.sender_seen and max(log.next_in, log.resend_below) - 1 != known_end:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"{role.value} claims log_end {known_end}, the source "
                                   f"holds log frames up to {max(log.next_in, log.resend_below) - 1}")
        if claim.roots is not None and self.roots is not None and dict(claim.roots) != self.roots:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"{role.value} claims other roots")
        self.log_end = known_end
        if claim.roots is not None and self.roots is None:
            self.roots = dict(claim.roots)
        if _ORDER.index(claim.state) > _ORDER.index(self.state):
            self.log.info("%s saw the session in %s: restored there", role.value, claim.state.value)
            if state_reached(claim.state, State.VERIFIED) and not state_reached(self.state, State.VERIFIED):
                self._send(Role.SOURCE, encode("verified", roots=self.roots))
            self._transition(claim.state, now)
            if claim.state is State.RESUMED:
                self.finished_at = now
                self._send(Role.SOURCE, encode("confirm"))
        if claim.released and not self.released:
            self.released = True
            self._send(role.peer, encode("released"))

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
        if self.state is State.FAILED:
            if self._links[role] is not None:
                self._unbind_and_refuse(role, self._failure_reason(), CLOSE_NORMAL)
            return
        handler = self._handlers.get(t)
        try:
            if handler is None:
                raise SessionViolation(Reason.BAD_MESSAGE, f"{t} is not a message a peer sends once attached")
            handler(role, msg, now)
        except SessionViolation as e:
            if self.state is State.RESUMED:
                # finished: a late message must not turn a confirmed migration into a failed one
                self.log.warning("%s sent %s after the session resumed: connection refused (%s)", role.value, t, e)
                self._unbind_and_refuse(role, e.reason, CLOSE_POLICY)
                raise
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
        """True once a terminal session has lingered ``finished_ttl``: the registry closes it."""
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

    def _repeated(self, applied: bool, role: Role, what: str) -> bool:
        """In a restored session, a control whose effect is already there is a no-op: its sender
        never saw it applied (or another peer's claim got there first)."""
        if self.restored and applied:
            self.log.info("%s from %s is already applied: ignored", what, role.value)
            return True
        return False

    def _frame(self, role: Role, stream: Stream, seq: int, data: bytes, what: str) -> None:
        relay = self._relays[stream]
        if self.restored and seq < relay.resend_below and self.state is not State.FAILED and role is stream.sender:
            # journalled before the sender attached here: it was legal when first sent
            after_end = self.log_end is not None and seq > self.log_end
        else:
            self._require(role, stream.sender, STREAM_STATES[stream], what)
            after_end = self.log_end is not None
        if stream is Stream.LOG and after_end:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"log frame {seq} after log_end {self.log_end}")
        if relay.accept(seq, data):
            self._pump_to(stream.receiver)
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
        if self._repeated(role is Role.SOURCE and self.log_end == msg["seq"], role, "log_end"):
            return
        self._require(role, Role.SOURCE, STREAM_STATES[Stream.LOG], "log_end")
        if self.log_end is not None:
            raise SessionViolation(Reason.WRONG_STATE, "second log_end")
        last = self._relays[Stream.LOG].next_in - 1
        if msg["seq"] != last:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"log_end {msg['seq']} but the last log frame is {last}")
        self.log_end = last
        self.log.info("log ended at frame %d", last)
        self._pump_to(Role.TARGET)

    def _on_suspend(self, role: Role, msg: dict[str, Any], now: float) -> None:
        if self._repeated(role is Role.SOURCE and state_reached(self.state, State.SUSPENDING), role, "suspend"):
            return
        self._require(role, Role.SOURCE, {State.RECORDING}, "suspend")
        self._transition(State.SUSPENDING, now)

    def _on_phase(self, role: Role, msg: dict[str, Any], now: float) -> None:
        phase = Phase(msg["phase"])
        wanted = State.DIFFING if phase is Phase.DIFFING else State.TRANSFERRING
        if self._repeated(role is Role.TARGET and state_reached(self.state, wanted), role, f"phase {phase.value}"):
            return
        if phase is Phase.DIFFING:
            self._require(role, Role.TARGET, {State.SUSPENDING}, "phase diffing")
            if self.log_end is None or self._relays[Stream.LOG].acked != self.log_end:
                raise SessionViolation(Reason.WRONG_STATE, "phase diffing before the whole log was acked")
        else:
            self._require(role, Role.TARGET, {State.DIFFING}, "phase transferring")
        self._transition(wanted, now)

    def _on_verified(self, role: Role, msg: dict[str, Any], now: float) -> None:
        if self._repeated(role is Role.TARGET and state_reached(self.state, State.VERIFIED)
                          and self.roots == msg["roots"], role, "verified"):
            return
        self._require(role, Role.TARGET, {State.TRANSFERRING}, "verified")
        self.roots = dict(msg["roots"])
        # roots first: a source that wakes on the VERIFIED state must already hold them (it once
        # read no roots, failed a migration that had verified, and resumed its VM)
        self._send(Role.SOURCE, encode("verified", roots=self.roots))
        self._transition(State.VERIFIED, now)

    def _on_resumed(self, role: Role, msg: dict[str, Any], now: float) -> None:
        if self._repeated(role is Role.TARGET and self.state is State.RESUMED, role, "resumed"):
            return
        self._require(role, Role.TARGET, {State.VERIFIED}, "resumed")
        self._transition(State.RESUMED, now)
        self.finished_at = now
        self._send(Role.SOURCE, encode("confirm"))

    def _on_released(self, role: Role, msg: dict[str, Any], now: float) -> None:
        self._require(role, Role.SOURCE, {State.RESUMED}, "released")
        if not self.released:
            self.log.info("the source has the confirm")
        self.released = True
        for r in Role:          # the source's control is done; the target may go
            self._send(r, encode("released"))

    def _on_abort(self, role: Role, msg: dict[str, Any], now: float) -> None:
        if self.state.terminal:
            raise SessionViolation(Reason.WRONG_STATE, f"abort in state {self.state.value}")
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

    def _pump_to(self, role: Role) -> None:
        """Move frames into ``role``'s connection while its output has room, in the live order: log
        frames, then log_end, then diff messages (none overtakes the log)."""
        link = self._links[role]
        if link is None:
            return
        for stream in role.receives:
            relay = self._relays[stream]
            while (item := relay.peek()) is not None:
                if not link.has_room(len(item[1]) + ENVELOPE_OVERHEAD):
                    return
                relay.mark_sent()
                link._push(_frame_message(stream, *item), frame=True)
            if stream is Stream.LOG and self.log_end is not None and not link.log_end_sent:
                link.log_end_sent = True
                link._push(encode("log_end", seq=self.log_end))

    def _forward_ack(self, stream: Stream) -> None:
        link = self._links[stream.sender]
        if link is not None:
            link._push_ack(stream, self._relays[stream].acked)

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
@dataclass
class _AckSlot:
    """A queued ack: a newer one for the same stream updates it instead of queueing another, so a
    peer that does not read cannot make acks pile up."""

    stream: Stream
    seq: int


class Link:
    """One websocket connection as the core sees it: feed it messages, take :meth:`next_message`
    until None, and close the connection with :attr:`close_code` once that is set and the output is
    drained.  Its queue holds at most ``max_outgoing_bytes`` of frames (plus a few small controls);
    taking messages out refills it from the session's buffers.

    ``on_output`` is called whenever output or a close request appears, also when another
    connection's message caused it: the adapter uses it to wake this connection's writer.
    """

    def __init__(self, registry: SessionRegistry, grant: Grant, now: float,
                 on_output: Callable[[], None] | None = None) -> None:
        self.registry = registry
        self.grant = grant
        self.created = now
        self.on_output = on_output
        self.session: Session | None = None
        self.role: Role | None = None
        self.close_code: int | None = None
        self.lost = False
        self.log_end_sent = False
        self._out: deque[tuple[bytes | _AckSlot, int]] = deque()
        self._acks: dict[Stream, _AckSlot] = {}
        self._frame_bytes = 0

    @property
    def session_id(self) -> str | None:
        return self.grant.session

    @property
    def closing(self) -> bool:
        return self.close_code is not None or self.lost

    @property
    def queued_frame_bytes(self) -> int:
        return self._frame_bytes

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
                if self.grant.creates:
                    self._create(msg)
                else:
                    self._attach(msg, now)
            except SessionViolation as e:
                _log.info("connection for %s refused: %s", self.session_id or "session creation", e)
                self._refuse(e.reason, keep_vm=self.grant.role is Role.SOURCE)
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
        """The peer connected but sent no attach (or create) in time."""
        if self.session is None:
            self._refuse(Reason.NOT_ATTACHED, keep_vm=False)

    def internal_error(self, now: float) -> None:
        """The adapter caught a bug while handling this connection's input."""
        self._violation(SessionViolation(Reason.INTERNAL, "bug in the service"), now)

    def connection_lost(self, now: float) -> None:
        """The connection is gone (what is queued may still be flushed, then :meth:`discard`)."""
        self.lost = True
        session = self.session
        if session is not None:
            session.detach(self, now)
            self.session = None
            self.registry.release(session, now)

    def next_message(self) -> bytes | None:
        """The next message to write, or None; refills the queue from the session's buffers."""
        if self.session is not None and self.role is not None \
                and self._frame_bytes <= self.registry.limits.max_outgoing_bytes // 2:
            self.session._pump_to(self.role)
        if not self._out:
            return None
        item, size = self._out.popleft()
        self._frame_bytes -= size
        self.registry.queued_bytes -= size
        if isinstance(item, _AckSlot):
            del self._acks[item.stream]
            return encode("ack", stream=item.stream.value, seq=item.seq)
        return item

    def data_to_send(self) -> list[bytes]:
        """Everything :meth:`next_message` would give now (tests; the adapter takes one at a time)."""
        out = []
        while (msg := self.next_message()) is not None:
            out.append(msg)
        return out

    def has_room(self, size: int) -> bool:
        """Whether a frame of ``size`` bytes may be queued now (one always may into an empty queue)."""
        return self._frame_bytes == 0 or self._frame_bytes + size <= self.registry.limits.max_outgoing_bytes

    # -- internals, also called by Session
    def _create(self, msg: dict[str, Any]) -> None:
        if msg["t"] != "create":
            raise SessionViolation(Reason.NOT_ATTACHED, f"first message on the creation path is {msg['t']}")
        source, target = self.registry.new_session()
        _log.info("session %s created", source.session)
        self._push(encode("created", session=source.session, source=str(source), target=str(target)))
        self._close(CLOSE_NORMAL)

    def _attach(self, msg: dict[str, Any], now: float) -> None:
        if msg["t"] != "attach":
            raise SessionViolation(Reason.NOT_ATTACHED, f"first message is {msg['t']}")
        role = Role(msg["role"])
        if role is not self.grant.role or msg["session"] != self.grant.session:
            raise SessionViolation(Reason.WRONG_ROLE, "attach names another role or session than its credential")
        if set(msg["resume_from"]) != {s.value for s in role.receives}:
            raise SessionViolation(Reason.BAD_MESSAGE, f"resume_from must name the streams a {role.value} receives")
        if set(msg["claim"]["next"]) != {s.value for s in role.sends}:
            raise SessionViolation(Reason.BAD_MESSAGE, f"claim must name the streams a {role.value} sends")
        found = self.registry.open(role, msg["session"], now)
        if isinstance(found, Reason):
            self._refuse(found, keep_vm=role is Role.SOURCE, code=CLOSE_NORMAL)
            return
        found.attach(self, role, {Stream(k): v for k, v in msg["resume_from"].items()},
                     Claim.from_wire(msg["claim"]), msg["resume"], now)

    def _violation(self, e: SessionViolation, now: float) -> None:
        if self.session is not None:
            self.session.log.warning("message from %s rejected: %s", self.role.value if self.role else "?", e)
            self.session.fail(e.reason, now)
        else:
            _log.info("connection for %s refused: %s", self.session_id or "session creation", e)
            self._refuse(e.reason, keep_vm=self.grant.role is Role.SOURCE)

    def _bind(self, session: Session, role: Role) -> None:
        self.session = session
        self.role = role

    def _unbind(self) -> None:
        self.session = None

    def _push(self, data: bytes, frame: bool = False) -> None:
        if self.closing:
            return
        size = len(data) if frame else 0
        self._out.append((data, size))
        self._frame_bytes += size
        self.registry.queued_bytes += size
        self._wake()

    def _push_ack(self, stream: Stream, seq: int) -> None:
        if self.closing:
            return
        slot = self._acks.get(stream)
        if slot is not None:
            slot.seq = seq
            return
        slot = self._acks[stream] = _AckSlot(stream, seq)
        self._out.append((slot, 0))
        self._wake()

    def _refuse(self, reason: Reason, keep_vm: bool, code: int = CLOSE_POLICY) -> None:
        if self.closing:
            return
        self._push(error_message(reason, keep_vm))
        self._close(code)

    def _close(self, code: int) -> None:
        if self.close_code is None:
            self.close_code = code
            self._wake()

    def _wake(self) -> None:
        if self.on_output is not None:
            self.on_output()

    def discard(self) -> None:
        """The writer is done with this connection: forget what it did not send."""
        self.registry.queued_bytes -= self._frame_bytes
        self._frame_bytes = 0
        self._out.clear()
        self._acks.clear()


# ---- the registry ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tombstone:
    """What a finished session leaves: enough to answer a late re-attach as the session would."""

    state: State
    failure: Reason | None
    finished_at: float
    released: bool
    log_end: int | None
    roots: dict[str, bytes] | None


class SessionRegistry:
    """The sessions a service holds, by id, and the keyring that authorises them.

    Sessions exist only while a peer is attached: the first authorised attach creates (or, after a
    restart, re-creates) one, and the last detach drops it, leaving a tombstone if it had finished.
    """

    def __init__(self, keyring: Keyring, limits: Limits | None = None, *,
                 random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self.keyring = keyring
        self.limits = limits if limits is not None else Limits()
        self.queued_bytes = 0
        """Frame bytes in the connections' output queues (the streams' buffers hold the rest)."""
        self._random = random_bytes
        self._sessions: dict[str, Session] = {}
        self._tombstones: OrderedDict[str, _Tombstone] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions

    def ids(self) -> list[str]:
        return list(self._sessions)

    def lookup(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def memory_in_use(self) -> int:
        """Bytes in the core's queues: every stream's buffer and every connection's output."""
        return sum(s.buffered_total for s in self._sessions.values()) + self.queued_bytes

    def new_session(self) -> tuple[Credential, Credential]:
        """A fresh session id and its (source, target) credentials.  Nothing is stored: the session
        comes into being when one of them attaches."""
        return self.keyring.new_session(self._random(SESSION_ID_BYTES))

    def open(self, role: Role, session_id: str, now: float) -> Session | Reason:
        """The session an authorised attach goes to: the one held, or a new (re-created) one; the
        reason to refuse when it failed (a tombstone) or ``max_sessions`` are attached."""
        session = self._sessions.get(session_id)
        if session is not None:
            return session
        tomb = self._tombstones.get(session_id)
        if tomb is not None and tomb.state is State.FAILED:
            return tomb.failure or Reason.INTERNAL
        if len(self._sessions) >= self.limits.max_sessions:
            self.expire(now)
            if len(self._sessions) >= self.limits.max_sessions:
                _log.warning("refused session %s: %d sessions held", session_id, len(self._sessions))
                return Reason.SESSION_LIMIT
        if tomb is not None:
            del self._tombstones[session_id]
            session = Session(session_id, self.limits, now, state=tomb.state, released=tomb.released)
            session.finished_at = tomb.finished_at
            session.log_end, session.roots = tomb.log_end, tomb.roots
        else:
            session = Session(session_id, self.limits, now)
        self._sessions[session_id] = session
        session.log.info("session opened by its %s", role.value)
        return session

    def release(self, session: Session, now: float) -> None:
        """Drop ``session`` if nobody is attached to it any more: its peers hold what a resume needs."""
        if not session.vacant or self._sessions.get(session.id) is not session:
            return
        del self._sessions[session.id]
        session.log.info("session released in state %s", session.state.value)
        if session.state.terminal:
            self._tombstones[session.id] = _Tombstone(
                session.state, session.failure, session.finished_at if session.finished_at is not None else now,
                session.released, session.log_end, session.roots)
            self._tombstones.move_to_end(session.id)
            while len(self._tombstones) > self.limits.max_tombstones:
                self._tombstones.popitem(last=False)

    def remove(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            session.close_links()
            session.log.info("session removed in state %s", session.state.value)

    def expire(self, now: float) -> list[str]:
        """Fail sessions whose peers stayed away too long, close finished ones past their ttl,
        release vacant ones and forget old tombstones; returns the ids no longer held."""
        gone = []
        for session in list(self._sessions.values()):
            session.tick(now)
            if session.finished(now):
                session.close_links()
            self.release(session, now)
            if session.id not in self._sessions:
                gone.append(session.id)
        while self._tombstones:
            oldest = next(iter(self._tombstones.values()))
            if now - oldest.finished_at < self.limits.finished_ttl:
                break
            self._tombstones.popitem(last=False)
        return gone
