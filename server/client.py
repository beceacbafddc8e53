"""The peers' side of the session-handoff service: both the source and the target use it.

Two layers, like the service: :class:`ClientState` is sans-I/O (it owns the journal of what this
side sent and decides, from the service's ``attached`` answer, exactly what to re-send after a
reconnect), and :class:`SessionClient` is the asyncio adapter over ``websockets`` that connects
with a role credential, reconnects with :class:`Backoff` and feeds the state object.
:func:`create_session` asks the service for a new session with the shared token.

Usage::

    source, target = await create_session("wss://svc:8765", token, cafile=ca)   # at the source
    # ... hand str(target) to the target site (a 0600 file, see server/credentials.py) ...
    async with SessionClient("wss://svc:8765", target, cafile=ca) as c:
        while True:
            ev = await c.recv()          # Frame / LogEnded / StateChanged / Verified / Confirmed / Released
            ...

Payloads are opaque bytes.  A frame is acked when :meth:`SessionClient.recv` hands it over, so
"acked" means "consumed", and a sender's window only opens as fast as its receiver consumes.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import os
import random
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from replay_migrate import __version__
from replay_migrate.errors import AuthError, ProtocolError, ReplayMigrateError, TransportError, UsageError
from server.session import (
    CREATE_PATH,
    ENVELOPE_OVERHEAD,
    FRAME_COST,
    MAX_ROOT_BYTES,
    MAX_ROOT_NAME,
    MAX_ROOTS,
    PEER_REASONS,
    SESSION_ID_RE,
    TOKEN_ENV,
    Claim,
    Credential,
    Limits,
    Phase,
    Reason,
    Role,
    SessionViolation,
    State,
    Stream,
    decode,
    encode,
    frame_cost,
    state_reached,
    valid_roots,
)

_DEFAULTS: Final = Limits()


# ---- events ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Frame:
    """A log frame (``stream`` LOG) or a diff-protocol message (S2T / T2S), in order, exactly once."""

    stream: Stream
    seq: int
    data: bytes


@dataclass(frozen=True)
class LogEnded:
    """The source ended its log after frame ``seq`` (every log frame came before this)."""

    seq: int


@dataclass(frozen=True)
class StateChanged:
    state: State


@dataclass(frozen=True)
class Verified:
    """(Source) the target verified these roots; compare them with your own."""

    roots: Mapping[str, bytes]


@dataclass(frozen=True)
class Confirmed:
    """(Source) the target resumed: the source may now release its VM."""


@dataclass(frozen=True)
class Released:
    """(Target) the source has the confirm: the target need not stay attached any longer."""


@dataclass(frozen=True)
class Failed:
    code: int
    reason: Reason
    keep_vm: bool


Event = Frame | LogEnded | StateChanged | Verified | Confirmed | Released | Failed


class SessionFailedError(ProtocolError):
    """The session ended FAILED (or the service refused us).  ``keep_vm``: the source must keep its VM."""

    def __init__(self, session_id: str, failed: Failed) -> None:
        tail = "; the source VM must stay intact" if failed.keep_vm else ""
        super().__init__(f"session {session_id} failed: {failed.reason.value}{tail}")
        self.reason = failed.reason
        self.code = failed.code
        self.keep_vm = failed.keep_vm


# ---- sans-I/O client state ------------------------------------------------------------------------
@dataclass
class _Entry:
    """One message this side sent: a frame (``stream`` set) or a control (``done`` set)."""

    msg: bytes
    stream: Stream | None = None
    seq: int = 0
    size: int = 0
    done: Callable[[], bool] | None = None


class ClientState:
    """What one peer knows about its session, and its journal of unacknowledged output.

    Frames stay in the journal until the receiver's ack comes back through the service; controls
    (suspend, log_end, phase, verified, resumed, released, abort) until the session shows them
    applied.  On re-attach, ``attached`` says where the service stands and :meth:`data_to_send`
    yields exactly the missing frames and controls, in their original order.  Frames are only
    transmitted while the stream's unacked bytes (:func:`~server.session.frame_cost`) stay within
    the service's ``window``.  Every attach carries :meth:`claim`, what this side knows, so that a
    service that lost the session (a restart) can re-create it; nothing else is needed from it.
    """

    def __init__(self, role: Role, session_id: str, *, max_message_size: int = _DEFAULTS.max_message_size,
                 ack_every: int = 32, ack_fraction: float = 0.25) -> None:
        if SESSION_ID_RE.fullmatch(session_id) is None:
            raise UsageError(f"bad session id {session_id!r} (letters, digits, _ and -, at most 64)")
        self.role = role
        self.session_id = session_id
        self.ack_every = ack_every
        self.ack_fraction = ack_fraction
        self.max_message = max_message_size         # what we accept (our websockets max_size)
        self.service_max_message = max_message_size  # what the service accepts (from attached)
        self.window = _DEFAULTS.max_buffered_bytes
        self.state: State | None = None
        self.attached = False
        self.ever_attached = False
        self.log_end: int | None = None
        self.roots: dict[str, bytes] | None = None
        self.confirmed = False
        self.released = False
        self.failed: Failed | None = None
        self.duplicates = 0
        self._service_log_end = False
        self._order = itertools.count()
        self._journal: dict[int, _Entry] = {}
        self._unsent: deque[int] = deque()
        self._by_stream: dict[Stream, deque[int]] = {s: deque() for s in role.sends}
        self._next_seq = dict.fromkeys(role.sends, 1)
        self._acked = dict.fromkeys(role.sends, 0)
        self._sent_upto = dict.fromkeys(role.sends, 0)
        self._in_flight = dict.fromkeys(role.sends, 0)
        self._recv_next = dict.fromkeys(role.receives, 1)
        self._consumed = dict.fromkeys(role.receives, 0)
        self._ack_sent = dict.fromkeys(role.receives, 0)
        self._since_ack = {s: [0, 0] for s in role.receives}  # frames, bytes consumed since the last ack

    # -- queries
    @property
    def max_payload(self) -> int:
        return min(self.service_max_message - ENVELOPE_OVERHEAD, self.window - FRAME_COST)

    def may_send_diff(self) -> bool:
        """Diff messages are legal from SUSPENDING on.  The source gets there by its own suspend
        (ordered before its diff messages); the target must have *seen* it, or it races the source."""
        if self.role is Role.SOURCE:
            return True
        return self.state in (State.SUSPENDING, State.DIFFING, State.TRANSFERRING)

    def transmitted(self, stream: Stream, seq: int) -> bool:
        """The frame left the journal's queue (it may still be re-sent after a reconnect)."""
        return seq <= max(self._sent_upto[stream], self._acked[stream])

    def all_acked(self) -> bool:
        return all(self._acked[s] == self._next_seq[s] - 1 for s in self.role.sends)

    def in_flight(self, stream: Stream) -> int:
        return self._in_flight[stream]

    @property
    def journal_size(self) -> int:
        return len(self._journal)

    def claim(self) -> Claim:
        """What this side knows of the session, for a service that has to re-create it: the state
        it last saw, its streams' positions, the log's end (the source's only once the service took
        it), the verified roots (once it saw them applied) and whether the source's release arrived."""
        state = self.state if self.state is not None and self.state is not State.FAILED else State.RECORDING
        log_end = self.log_end
        if self.role is Role.SOURCE and not (self._service_log_end or state_reached(state, State.DIFFING)):
            log_end = None
        roots = self.roots if state_reached(state, State.VERIFIED) else None
        return Claim(state, dict(self._next_seq), dict(self._acked), log_end, roots, self.released)

    # -- connection lifecycle
    def attach_message(self) -> bytes:
        """The first message of every connection; ``resume_from`` acks all frames received so far."""
        self.attached = False
        return encode("attach", role=self.role.value, session=self.session_id,
                      resume_from={s.value: self._recv_next[s] for s in self.role.receives},
                      resume=self.ever_attached, claim=self.claim().to_wire())

    def connection_lost(self) -> None:
        self.attached = False

    # -- output
    def send_frame(self, stream: Stream, data: bytes) -> int:
        """Journal one frame; returns its seq.  Transmission waits for attach and window room."""
        if stream.sender is not self.role:
            raise ProtocolError(f"a {self.role.value} does not send {stream.value} frames")
        if stream is Stream.LOG and self.log_end is not None:
            raise ProtocolError(f"log frame after the log ended at {self.log_end}")
        if stream is Stream.T2S and not self.may_send_diff():
            raise ProtocolError("the target sends diff messages only once the session is suspending")
        if len(data) > self.max_payload:
            raise ProtocolError(f"payload of {len(data)} bytes exceeds the service's limit of "
                                f"{self.max_payload}: split it")
        seq = self._next_seq[stream]
        self._next_seq[stream] = seq + 1
        msg = (encode("log", seq=seq, data=data) if stream is Stream.LOG
               else encode("diff", dir=stream.value, seq=seq, data=data))
        key = next(self._order)
        self._journal[key] = _Entry(msg, stream, seq, frame_cost(data))
        self._by_stream[stream].append(key)
        self._unsent.append(key)
        return seq

    def end_log(self) -> int:
        self._need(Role.SOURCE, "end_log")
        if self.log_end is not None:
            raise ProtocolError("the log already ended")
        self.log_end = seq = self._next_seq[Stream.LOG] - 1
        self._control(encode("log_end", seq=seq),
                      lambda: self._service_log_end or state_reached(self.state, State.DIFFING))
        return seq

    def suspend(self) -> None:
        self._need(Role.SOURCE, "suspend")
        self._control(encode("suspend"), lambda: state_reached(self.state, State.SUSPENDING))

    def phase(self, phase: Phase) -> None:
        self._need(Role.TARGET, f"phase {phase.value}")
        if phase is Phase.DIFFING and self.state is not State.SUSPENDING:
            # the source's suspend may trail its log_end: announcing now could hit RECORDING
            raise ProtocolError("phase diffing only once the session is suspending")
        wanted = State.DIFFING if phase is Phase.DIFFING else State.TRANSFERRING
        self._control(encode("phase", phase=phase.value), lambda: state_reached(self.state, wanted))

    def verified(self, roots: Mapping[str, bytes]) -> None:
        self._need(Role.TARGET, "verified")
        if not valid_roots(dict(roots)):
            raise ProtocolError(f"roots must be 1..{MAX_ROOTS} names of at most {MAX_ROOT_NAME} characters, "
                                f"each a hash of at most {MAX_ROOT_BYTES} bytes")
        if self.roots is not None and self.roots != dict(roots):
            raise ProtocolError("verified with other roots than the session holds")
        self.roots = dict(roots)
        self._control(encode("verified", roots=dict(roots)), lambda: state_reached(self.state, State.VERIFIED))

    def resumed(self) -> None:
        self._need(Role.TARGET, "resumed")
        self._control(encode("resumed"), lambda: state_reached(self.state, State.RESUMED))

    def acknowledge_confirm(self) -> None:
        """(Source) tell the target, through the service, that the confirm arrived: it stays
        attached until then, so that a restarted service can still learn that it resumed."""
        self._need(Role.SOURCE, "released")
        if not self.confirmed:
            raise ProtocolError("released before the confirm")
        self._control(encode("released"), lambda: self.released)

    def abort(self, reason: Reason) -> None:
        if reason not in PEER_REASONS:
            raise ProtocolError(f"{reason.value} is not a reason a peer may give")
        self._control(encode("abort", reason=reason.value), lambda: self.state is State.FAILED)

    def consumed(self, frame: Frame) -> bool:
        """The application took ``frame``; True when an ack should go out now (else it is coalesced)."""
        s = frame.stream
        if frame.seq > self._consumed[s]:
            self._consumed[s] = frame.seq
            counts = self._since_ack[s]
            counts[0] += 1
            counts[1] += len(frame.data)
        frames, size = self._since_ack[s]
        return frames >= self.ack_every or size >= self.window * self.ack_fraction

    def data_to_send(self) -> list[bytes]:
        """Due acks first (a phase announcement must follow them), then journal entries in order, up to
        the first frame that does not fit its stream's window."""
        if not self.attached:
            return []
        out = []
        for s in self.role.receives:
            if self._consumed[s] > self._ack_sent[s]:
                self._ack_sent[s] = self._consumed[s]
                self._since_ack[s] = [0, 0]
                out.append(encode("ack", stream=s.value, seq=self._consumed[s]))
        while self._unsent:
            key = self._unsent[0]
            entry = self._journal.get(key)
            if entry is not None and entry.done is not None and entry.done():
                del self._journal[key]              # applied meanwhile (another peer's claim got there)
                entry = None
            if entry is None:                        # acked or applied meanwhile
                self._unsent.popleft()
                continue
            if entry.stream is not None:
                if self._in_flight[entry.stream] + entry.size > self.window:
                    break
                self._in_flight[entry.stream] += entry.size
                self._sent_upto[entry.stream] = entry.seq
            self._unsent.popleft()
            out.append(entry.msg)
        return out

    # -- input
    def receive(self, data: bytes) -> list[Event]:
        """One message from the service.  Raises ProtocolError when the service breaks the protocol."""
        msg = decode(data, self.max_message)
        t = msg["t"]
        if t == "error":
            self.failed = Failed(msg["code"], Reason(msg["reason"]), msg["keep_vm"])
            self.state = State.FAILED
            self.attached = False
            return [self.failed]
        if t == "attached":
            if self.attached:
                raise SessionViolation(Reason.BAD_MESSAGE, "second attached on one connection")
            return self._on_attached(msg)
        if not self.attached:
            raise SessionViolation(Reason.NOT_ATTACHED, f"service sent {t} before attached")
        if t == "log":
            return self._on_frame(Stream.LOG, msg["seq"], msg["data"])
        if t == "diff":
            return self._on_frame(Stream(msg["dir"]), msg["seq"], msg["data"])
        if t == "ack":
            return self._on_ack(Stream(msg["stream"]), msg["seq"])
        if t == "state":
            return self._set_state(State(msg["state"]))
        if t == "log_end" and self.role is Role.TARGET:
            return self._on_log_end(msg["seq"])
        if t == "verified" and self.role is Role.SOURCE:
            return self._on_roots(msg["roots"])
        if t == "confirm" and self.role is Role.SOURCE:
            if self.confirmed:
                return []
            self.confirmed = True
            return [Confirmed()]
        if t == "released":
            if self.released:
                return []
            self.released = True
            self._prune()
            return [Released()] if self.role is Role.TARGET else []
        raise SessionViolation(Reason.BAD_MESSAGE, f"service sent {t} to a {self.role.value}")

    # -- internals
    def _need(self, role: Role, what: str) -> None:
        if self.role is not role:
            raise ProtocolError(f"only the {role.value} sends {what}")

    def _control(self, msg: bytes, done: Callable[[], bool]) -> None:
        key = next(self._order)
        self._journal[key] = _Entry(msg, done=done)
        self._unsent.append(key)

    def _on_attached(self, msg: dict[str, Any]) -> list[Event]:
        if msg["session"] != self.session_id:
            raise SessionViolation(Reason.BAD_MESSAGE, "attached names another session")
        sends = {s.value for s in self.role.sends}
        if set(msg["next"]) != sends or set(msg["acked"]) != sends:
            raise SessionViolation(Reason.BAD_MESSAGE, "attached lists other streams than this role sends")
        nxt = {s: int(msg["next"][s.value]) for s in self.role.sends}
        acked = {s: int(msg["acked"][s.value]) for s in self.role.sends}
        for s in self.role.sends:
            if not (acked[s] < nxt[s] <= self._next_seq[s]) or acked[s] < self._acked[s]:
                raise SessionViolation(Reason.BAD_SEQUENCE, (
                    f"the service holds {s.value} {acked[s] + 1}..{nxt[s] - 1} (acked {acked[s]}), this side sent "
                    f"up to {self._next_seq[s] - 1} with {self._acked[s]} acked: frames were lost"))
        for s in self.role.sends:
            self._set_acked(s, acked[s])
        self.window = int(msg["window"])
        self.service_max_message = int(msg["max_message"])
        self._service_log_end = msg["log_end"] is not None
        events = self._set_state(State(msg["state"]))
        # re-plan: frames the service holds count against the window; the rest goes again, in order
        self._unsent.clear()
        for s in self.role.sends:
            self._in_flight[s] = 0
            self._sent_upto[s] = nxt[s] - 1
        for key, e in list(self._journal.items()):
            if e.stream is None:
                self._unsent.append(key)        # not applied, or _set_state would have dropped it
            elif e.seq >= nxt[e.stream]:
                self._unsent.append(key)
            else:
                self._in_flight[e.stream] += e.size
        for r in self.role.receives:
            self._ack_sent[r] = max(self._ack_sent[r], self._recv_next[r] - 1)
        self.attached = self.ever_attached = True
        if msg["roots"] is not None:
            if self.role is Role.SOURCE:
                events += self._on_roots(msg["roots"])
            elif self.roots is None:
                self.roots = dict(msg["roots"])
            elif self.roots != msg["roots"]:
                raise SessionViolation(Reason.BAD_SEQUENCE, "the service holds other roots than this target verified")
        return events

    def _on_frame(self, stream: Stream, seq: int, data: bytes) -> list[Event]:
        if stream.receiver is not self.role:
            raise SessionViolation(Reason.WRONG_ROLE, f"{stream.value} frame sent to the {self.role.value}")
        expected = self._recv_next[stream]
        if seq < expected:
            self.duplicates += 1
            return []
        if seq > expected:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"{stream.value} frame {seq}, expected {expected}")
        self._recv_next[stream] = seq + 1
        return [Frame(stream, seq, data)]

    def _on_ack(self, stream: Stream, seq: int) -> list[Event]:
        if stream.sender is not self.role:
            raise SessionViolation(Reason.WRONG_ROLE, f"ack of {stream.value} sent to the {self.role.value}")
        if seq >= self._next_seq[stream]:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"ack of {stream.value} {seq}, never sent")
        self._set_acked(stream, seq)
        return []

    def _on_log_end(self, seq: int) -> list[Event]:
        if seq != self._recv_next[Stream.LOG] - 1:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"log_end {seq} after frame {self._recv_next[Stream.LOG] - 1}")
        if self.log_end == seq:
            return []
        if self.log_end is not None:
            raise SessionViolation(Reason.BAD_SEQUENCE, "log_end moved")
        self.log_end = seq
        return [LogEnded(seq)]

    def _on_roots(self, roots: dict[str, bytes]) -> list[Event]:
        if self.roots == roots:
            return []
        self.roots = dict(roots)
        return [Verified(dict(roots))]

    def _set_state(self, state: State) -> list[Event]:
        changed = state is not self.state
        self.state = state
        self._prune()
        return [StateChanged(state)] if changed else []

    def _prune(self) -> None:
        for key in [k for k, e in self._journal.items() if e.done is not None and e.done()]:
            del self._journal[key]

    def _set_acked(self, stream: Stream, seq: int) -> None:
        if seq <= self._acked[stream]:
            return
        self._acked[stream] = seq
        keys = self._by_stream[stream]
        while keys and self._journal[keys[0]].seq <= seq:
            entry = self._journal.pop(keys.popleft())
            if entry.seq <= self._sent_upto[stream]:
                self._in_flight[stream] -= entry.size


# ---- reconnect policy (sans-I/O) ------------------------------------------------------------------
@dataclass(frozen=True)
class ReconnectPolicy:
    """How hard a client tries to (re)connect before giving up with TransportError.  ``max_elapsed``
    stays below the service's default ``idle_timeout`` (120 s) so the session is still there."""

    max_attempts: int = 30
    max_elapsed: float = 90.0
    initial_delay: float = 0.05
    max_delay: float = 5.0
    factor: float = 2.0
    jitter: float = 0.2      # each delay is shortened by up to this fraction, so peers do not march in step


class Backoff:
    """Exponential backoff with jitter, bounded by attempts and by elapsed time."""

    def __init__(self, policy: ReconnectPolicy, started: float, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.started = started
        self.attempts = 0
        self._rng = rng if rng is not None else random.Random()

    def next_delay(self, now: float) -> float | None:
        """Seconds to wait before the next attempt, or None when the budget is spent."""
        p = self.policy
        left = p.max_elapsed - (now - self.started)
        if self.attempts >= p.max_attempts or left <= 0:
            return None
        delay = min(p.max_delay, p.initial_delay * p.factor ** self.attempts)
        delay *= 1.0 - p.jitter * self._rng.random()
        self.attempts += 1
        return max(0.0, min(delay, left))


# ---- asyncio adapter ------------------------------------------------------------------------------
_CONNECT_TAKES_PROXY: Final = "proxy" in inspect.signature(connect.__init__).parameters


def session_url(base: str, session_id: str) -> str:
    """``ws://host:port`` + id → the session's URL."""
    return f"{base.rstrip('/')}{CREATE_PATH}/{session_id}"


def _service_base(url: str) -> tuple[str, str]:
    """Check a service URL (``ws[s]://HOST:PORT``, no path); returns (url without a trailing /, host:port)."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment:
        raise UsageError(f"bad service URL {url!r}: expected ws[s]://HOST:PORT")
    return url.rstrip("/"), parts.netloc


def check_service(url: str, cafile: str | os.PathLike[str] | None = None) -> None:
    """Refuse a bad service URL or CA file at once (UsageError): commands check it before they
    touch libvirt or a guest."""
    _service_base(url)
    _client_ssl(url, cafile)


def _client_ssl(url: str, cafile: str | os.PathLike[str] | None) -> ssl.SSLContext | None:
    """TLS for a wss:// URL: the system's CAs, or only ``cafile`` (a self-signed service certificate)."""
    if not url.startswith("wss:"):
        if cafile is not None:
            raise UsageError("a CA file only makes sense with a wss:// URL")
        return None
    try:
        return ssl.create_default_context(cafile=os.fspath(cafile) if cafile is not None else None)
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"cannot load the CA file {cafile}: {getattr(e, 'strerror', None) or e}") from None


def _refused(where: str, status: int, what: str) -> ReplayMigrateError | None:
    """The error for a handshake answered ``status`` (None: worth retrying)."""
    if status in (401, 403):
        return AuthError(f"the handoff service at {where} refused the {what} (HTTP {status})")
    if 400 <= status < 500:
        return ProtocolError(f"the handoff service at {where} refused the request (HTTP {status})")
    return None


def _connect_options() -> dict[str, Any]:
    # site to site: never through an environment proxy
    return {"proxy": None} if _CONNECT_TAKES_PROXY else {}


async def create_session(service: str, token: str | None = None, *, cafile: str | os.PathLike[str] | None = None,
                         open_timeout: float = 10.0) -> tuple[Credential, Credential]:
    """A new session at ``service`` (``ws[s]://HOST:PORT``) with the shared creation ``token``
    (default: ``$REPLAY_MIGRATE_TOKEN``); returns its (source, target) credentials."""
    base, where = _service_base(service)
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    if not token:
        raise UsageError(f"no token to create a session with: set ${TOKEN_ENV} or pass a token file")
    tls = _client_ssl(base, cafile)
    try:
        async with asyncio.timeout(open_timeout):
            async with connect(f"{base}{CREATE_PATH}", additional_headers={"Authorization": f"Bearer {token}"},
                               compression=None, open_timeout=open_timeout, max_size=4096, ssl=tls,
                               user_agent_header=f"replay-migrate/{__version__}", **_connect_options()) as ws:
                await ws.send(encode("create"))
                data = await ws.recv()
    except InvalidStatus as e:
        status = e.response.status_code
        raise _refused(where, status, "token") or TransportError(
            f"the handoff service at {where} cannot create a session now (HTTP {status})") from None
    except ssl.SSLCertVerificationError as e:
        raise TransportError(f"TLS verification of {where} failed: {e.verify_message}") from None
    except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as e:
        raise TransportError(f"cannot create a session at {where}: {type(e).__name__}") from None
    if isinstance(data, str):
        raise ProtocolError(f"the handoff service at {where} sent a text frame")
    msg = decode(data, 4096)
    if msg["t"] == "error":
        raise ProtocolError(f"the handoff service at {where} refused to create a session: {msg['reason']}")
    if msg["t"] != "created":
        raise ProtocolError(f"the handoff service at {where} answered {msg['t']} to create")
    source, target = Credential.parse(msg["source"]), Credential.parse(msg["target"])
    if source is None or target is None or (source.role, target.role) != (Role.SOURCE, Role.TARGET) \
            or not source.session == target.session == msg["session"]:
        raise ProtocolError(f"the handoff service at {where} sent inconsistent credentials")
    return source, target


class SessionClient:
    """One peer of one session over websockets, surviving dropped connections.

    ``send_*`` return once the message is journalled and inside the window (backpressure);
    ``suspend``/``phase``/``verified``/``resumed`` once the service applied them; ``recv`` yields
    events in order.  The session failing raises :class:`SessionFailedError` (``keep_vm`` tells the
    source to keep its VM); a connection not restored within ``reconnect`` raises TransportError; a
    refused credential AuthError.  Use as ``async with``, or call :meth:`connect` and :meth:`close`.

    ``service`` is the service's ``ws[s]://HOST:PORT``; ``credential`` (or its text) names the
    session and the role, and is the only secret this side presents.
    """

    def __init__(self, service: str, credential: Credential | str, *,
                 cafile: str | os.PathLike[str] | None = None, reconnect: ReconnectPolicy | None = None,
                 open_timeout: float = 10.0, close_timeout: float = 5.0, ping_interval: float | None = 20.0,
                 ping_timeout: float | None = 20.0, max_message_size: int = _DEFAULTS.max_message_size,
                 max_queue: int = 16) -> None:
        base, where = _service_base(service)
        cred = credential if isinstance(credential, Credential) else Credential.parse(credential)
        if cred is None:
            raise UsageError("that is not a replay-migrate session credential (rm1.SESSION.ROLE.SECRET)")
        self.url = session_url(base, cred.session)
        self.role = cred.role
        self._where = where
        self._authorization = f"Bearer {cred}"
        self._ssl = _client_ssl(base, cafile)
        self._policy = reconnect if reconnect is not None else ReconnectPolicy()
        self._open_timeout = open_timeout
        self._close_timeout = close_timeout
        self._ping = (ping_interval, ping_timeout)
        self._max_message = max_message_size
        self._max_queue = max_queue
        self._core = ClientState(self.role, cred.session, max_message_size=max_message_size)
        self.log = logging.getLogger(f"replay_migrate.session.{cred.session}")
        self._events: deque[Event] = deque()
        self._changed = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._fatal: ReplayMigrateError | None = None
        self._closing = False
        self.reconnects = 0
        self.wire_bytes_sent = 0
        self.wire_bytes_received = 0

    # -- properties
    @property
    def session_id(self) -> str:
        return self._core.session_id

    @property
    def state(self) -> State | None:
        return self._core.state

    @property
    def confirmed(self) -> bool:
        return self._core.confirmed

    @property
    def roots(self) -> Mapping[str, bytes] | None:
        return self._core.roots

    @property
    def max_payload(self) -> int:
        return self._core.max_payload

    @property
    def duplicates(self) -> int:
        """Frames the service delivered twice and this side dropped (0 when the protocol holds)."""
        return self._core.duplicates

    @property
    def connection(self) -> ClientConnection | None:
        """The current websocket, if any (tests cut it with ``connection.transport.abort()``)."""
        return self._ws

    # -- lifecycle
    async def __aenter__(self) -> SessionClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect and attach (retrying per the policy); returns once attached."""
        if self._task is not None:
            raise UsageError("this client is already connected")
        self._task = asyncio.create_task(self._supervise(), name=f"session-{self.session_id}-{self.role.value}")
        await self._wait(lambda: self._core.ever_attached)

    async def close(self) -> None:
        """Stop (re)connecting and close the connection.  Unsent journal entries are dropped."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._notify()

    # -- sending
    async def send_log(self, data: bytes) -> int:
        """(Source) one opaque log frame; returns its seq."""
        return await self._send_frame(Stream.LOG, data)

    async def end_log(self) -> int:
        """(Source) no more log frames; returns the last seq."""
        self._check()
        seq = self._core.end_log()
        await self._flush()
        return seq

    async def suspend(self) -> None:
        """(Source) RECORDING → SUSPENDING; returns once the service moved."""
        await self._control(self._core.suspend, State.SUSPENDING)

    async def send_diff(self, data: bytes) -> int:
        """One opaque diff-protocol message to the other side; returns its seq.  The target's first
        one waits until the session is SUSPENDING (the source's doing)."""
        if self.role is Role.TARGET:
            self._check()
            await self._wait(self._core.may_send_diff)
        return await self._send_frame(Stream.S2T if self.role is Role.SOURCE else Stream.T2S, data)

    async def phase(self, phase: Phase | str) -> None:
        """(Target) announce diffing (waits for SUSPENDING first) or transferring; returns once the
        service moved."""
        p = Phase(phase)
        if p is Phase.DIFFING:
            self._check()
            await self._wait(lambda: state_reached(self._core.state, State.SUSPENDING))
        await self._control(lambda: self._core.phase(p),
                            State.DIFFING if p is Phase.DIFFING else State.TRANSFERRING)

    async def verified(self, roots: Mapping[str, bytes]) -> None:
        """(Target) the patched images hash to ``roots``; returns once the session is VERIFIED."""
        await self._control(lambda: self._core.verified(roots), State.VERIFIED)

    async def resumed(self) -> None:
        """(Target) the VM runs; returns once the session is RESUMED (the source gets confirm)."""
        await self._control(self._core.resumed, State.RESUMED)

    async def acknowledge_confirm(self, timeout: float | None = None) -> None:
        """(Source) after the confirm: tell the target it may go; returns once the service took it."""
        self._check()
        self._core.acknowledge_confirm()
        await self._flush()
        async with asyncio.timeout(timeout):
            await self._wait(lambda: self._core.released)

    async def wait_released(self, timeout: float | None = None) -> None:
        """(Target) after ``resumed``: until the source has the confirm.  Staying attached until
        then lets a restarted service learn from this side that the target resumed."""
        async with asyncio.timeout(timeout):
            await self._wait(lambda: self._core.released)

    async def abort(self, reason: Reason | str) -> None:
        """Give up the session (either side); returns once the service failed it."""
        r = Reason(reason)
        self._check()
        self._core.abort(r)
        await self._flush()
        await self._wait(lambda: self._core.failed is not None)

    # -- receiving and waiting
    async def recv(self, timeout: float | None = None) -> Event:
        """The next event, in order.  Frames are acked as they are handed over.  Raises
        SessionFailedError when the failure is next, the fatal error once nothing is left."""
        async with asyncio.timeout(timeout):
            while not self._events:
                if self._fatal is not None:
                    raise self._fatal
                await self._changed.wait()
        ev = self._events.popleft()
        if isinstance(ev, Failed):
            raise SessionFailedError(self.session_id, ev)
        if isinstance(ev, Frame) and (self._core.consumed(ev) or not self._events):
            await self._flush()
        return ev

    async def wait_state(self, state: State, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout):
            await self._wait(lambda: state_reached(self._core.state, state))

    async def wait_confirmed(self, timeout: float | None = None) -> None:
        """(Source) until the target has resumed; only then may the source release its VM."""
        async with asyncio.timeout(timeout):
            await self._wait(lambda: self._core.confirmed)

    async def drain(self, timeout: float | None = None) -> None:
        """Until the receiver has acked every frame this side sent."""
        async with asyncio.timeout(timeout):
            await self._wait(self._core.all_acked)

    # -- internals
    def _check(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._task is None:
            raise UsageError("the session client is not connected")

    async def _send_frame(self, stream: Stream, data: bytes) -> int:
        self._check()
        seq = self._core.send_frame(stream, bytes(data))
        await self._flush()
        await self._wait(lambda: self._core.transmitted(stream, seq))
        return seq

    async def _control(self, apply: Callable[[], None], wanted: State) -> None:
        self._check()
        apply()
        await self._flush()
        await self._wait(lambda: state_reached(self._core.state, wanted))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait(self, done: Callable[[], bool]) -> None:
        while not done():
            if self._fatal is not None:
                raise self._fatal
            await self._changed.wait()

    async def _flush(self) -> None:
        async with self._send_lock:
            ws = self._ws
            if ws is None:
                return
            for msg in self._core.data_to_send():
                try:
                    await ws.send(msg)
                except ConnectionClosed:
                    return  # the reader notices; the next attach re-plans what to send
                self.wire_bytes_sent += len(msg)

    async def _supervise(self) -> None:
        backoff: Backoff | None = None
        try:
            while not self._closing:
                attached = await self._connection_round()
                if self._closing:
                    return
                now = time.monotonic()
                if attached or backoff is None:
                    backoff = Backoff(self._policy, now)
                delay = backoff.next_delay(now)
                if delay is None:
                    raise TransportError(
                        f"session {self.session_id}: lost the handoff service at {self._where} and could not get "
                        f"back within {backoff.attempts} attempts / {now - backoff.started:.1f} s")
                self.log.info("%s: reconnecting in %.2f s (attempt %d)", self.role.value, delay, backoff.attempts)
                await asyncio.sleep(delay)
        except ReplayMigrateError as e:
            self.log.warning("%s: %s", self.role.value, e)
            self._fatal = e
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("%s: bug in the session client", self.role.value)
            self._fatal = TransportError(f"session {self.session_id}: internal error in the client")
        finally:
            self._notify()

    async def _open(self) -> ClientConnection | None:
        try:
            return await connect(
                self.url, additional_headers={"Authorization": self._authorization}, compression=None,
                open_timeout=self._open_timeout, close_timeout=self._close_timeout, ping_interval=self._ping[0],
                ping_timeout=self._ping[1], max_size=self._max_message, max_queue=self._max_queue, ssl=self._ssl,
                user_agent_header=f"replay-migrate/{__version__}", **_connect_options())
        except InvalidStatus as e:
            status = e.response.status_code
            error = _refused(self._where, status, f"{self.role.value} credential")
            if error is not None:
                raise error from None
            self.log.info("%s: handshake answered HTTP %d", self.role.value, status)
        except ssl.SSLCertVerificationError as e:
            raise TransportError(f"TLS verification of {self._where} failed: {e.verify_message}") from None
        except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as e:
            self.log.info("%s: cannot connect to %s: %s", self.role.value, self._where, type(e).__name__)
        return None

    async def _connection_round(self) -> bool:
        """One connection: attach, then read until it drops.  True if it got attached."""
        ws = await self._open()
        if ws is None:
            return False
        self._ws = ws
        attached, resumed = False, self._core.ever_attached
        try:
            async with asyncio.timeout(self._open_timeout):
                await ws.send(self._core.attach_message())
                data = await ws.recv()
            while True:
                self.wire_bytes_received += len(data)
                if isinstance(data, str):
                    raise ProtocolError("the handoff service sent a text frame")
                events = self._core.receive(data)
                if self._core.attached and not attached:
                    attached = True
                    if resumed:
                        self.reconnects += 1
                    self.log.info("%s: %s in state %s", self.role.value, "re-attached" if resumed else "attached",
                                  self._core.state.value if self._core.state else "?")
                self._events.extend(events)
                if self._core.failed is not None:
                    raise SessionFailedError(self.session_id, self._core.failed)
                await self._flush()
                self._notify()
                data = await ws.recv()
        except ConnectionClosed as e:
            codes = {c.code for c in (e.rcvd, e.sent) if c is not None}
            if 1009 in codes:
                raise ProtocolError(f"session {self.session_id}: a message was too big for the other end "
                                    "(close code 1009)") from None
            self.log.info("%s: connection lost (%s)", self.role.value, sorted(codes) or "no close frame")
        except TimeoutError:
            self.log.info("%s: no answer to attach within %.1f s", self.role.value, self._open_timeout)
        except OSError as e:
            self.log.info("%s: connection error %s", self.role.value, type(e).__name__)
        finally:
            self._ws = None
            self._core.connection_lost()
            self._notify()
            await ws.close()
        return attached
