"""The peers' side of a handoff session, sans-I/O: both the source and the target use it.

:class:`ClientState` owns the journal of what this side sent and decides, from the service's
``attached`` answer, exactly what to re-send after a reconnect; it takes the service's messages
(bytes) and returns events and the bytes to send.  :class:`server.client.SessionClient`
is its asyncio adapter.

Two kinds of error stay apart (as in h11): the *service* breaking the protocol raises
:class:`~server.wire.SessionViolation` (a ``ProtocolError``, exit 10) from :meth:`ClientState.receive`;
this side's own caller asking for something its role never sends, or that the state it has seen
does not allow yet (:mod:`server._state`'s table), or that cannot be sent at all (a payload above
the service's limit, roots of the wrong shape) raises
:class:`~replay_migrate.errors.LocalProtocolError` (exit 70) before anything is queued.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from replay_migrate.errors import LocalProtocolError, ProtocolError, UsageError
from server._state import MAY_SEND, TRANSITIONS, PeerMessage
from server.limits import Limits
from server.wire import (
    ENVELOPE_OVERHEAD,
    FRAME_COST,
    MAX_REPORT_MESSAGE,
    MAX_ROOT_BYTES,
    MAX_ROOT_NAME,
    MAX_ROOTS,
    PEER_REASONS,
    SESSION_ID_RE,
    Claim,
    Phase,
    Reason,
    Role,
    SessionViolation,
    State,
    Stream,
    decode,
    encode,
    frame_cost,
    frame_message,
    state_reached,
    valid_figures,
    valid_roots,
)

_DEFAULTS: Final = Limits()
REPLAYED_INTERVAL_S: Final = 0.1
"""Most often the target tells its replay progress (``replayed``), unless it reached the last log
frame it received: the source, waiting to pause, learns of that at once; in between, one message
per 100 ms costs the link nothing (about 20 bytes each) and the source polls no faster."""


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
class Reported:
    """The other side's figures of the migration (``report``), as the service relayed them: the
    shape is checked (:func:`~server.wire.valid_figures`), the names and types are the caller's."""

    figures: Mapping[str, Any]


@dataclass(frozen=True)
class Failed:
    code: int
    reason: Reason
    keep_vm: bool


Event = Frame | LogEnded | StateChanged | Verified | Confirmed | Released | Reported | Failed


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
    transmitted while the stream's unacked bytes (:func:`~server.wire.frame_cost`) stay within
    the service's ``window``.  Every attach carries :meth:`claim`, what this side knows, so that a
    service that lost the session (a restart) can re-create it; nothing else is needed from it.
    """

    def __init__(self, role: Role, session_id: str, *, max_message_size: int = _DEFAULTS.max_message_size,
                 ack_every: int = 32, ack_fraction: float = 0.25,
                 replayed_interval: float = REPLAYED_INTERVAL_S) -> None:
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
        self.peer_report: dict[str, Any] | None = None
        """The other side's figures, once its ``report`` came."""
        self._reported = False
        self.replayed_interval = replayed_interval
        self.replayed = 0
        """(Target) the last log frame this side replayed; (source) the last the target said it did."""
        self._replayed_told = 0
        self._replayed_at: float | None = None
        self._replayed_due = False
        self.failed: Failed | None = None
        self.duplicates = 0
        self._service_log_end = False
        self._sent_resumed = False
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
        return self.role is Role.SOURCE or self._allowed_now(PeerMessage.DIFF_T2S)

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
        if _FRAMES[stream] not in MAY_SEND[self.role]:
            raise LocalProtocolError(f"a {self.role.value} does not send {stream.value} frames")
        if stream is Stream.LOG and self.log_end is not None:
            raise LocalProtocolError(f"log frame after the log ended at {self.log_end}")
        if stream is Stream.T2S and not self.may_send_diff():
            raise LocalProtocolError("the target sends diff messages only once the session is suspending")
        if len(data) > self.max_payload:
            raise LocalProtocolError(f"payload of {len(data)} bytes exceeds the service's limit of "
                                     f"{self.max_payload}: split it")
        seq = self._next_seq[stream]
        self._next_seq[stream] = seq + 1
        msg = frame_message(stream, seq, data)
        key = next(self._order)
        self._journal[key] = _Entry(msg, stream, seq, frame_cost(data))
        self._by_stream[stream].append(key)
        self._unsent.append(key)
        return seq

    def end_log(self) -> int:
        self._need(PeerMessage.LOG_END)
        if self.log_end is not None:
            raise LocalProtocolError("the log already ended")
        self.log_end = seq = self._next_seq[Stream.LOG] - 1
        self._control(encode("log_end", seq=seq),
                      lambda: self._service_log_end or state_reached(self.state, State.DIFFING))
        return seq

    def suspend(self) -> None:
        self._need(PeerMessage.SUSPEND)
        self._control(encode("suspend"), lambda: state_reached(self.state, State.SUSPENDING))

    def phase(self, phase: Phase) -> None:
        kind = PeerMessage.PHASE_DIFFING if phase is Phase.DIFFING else PeerMessage.PHASE_TRANSFERRING
        self._need(kind)
        if phase is Phase.DIFFING and not self._allowed_now(kind):
            # the source's suspend may trail its log_end: announcing now could hit RECORDING
            raise LocalProtocolError("phase diffing only once the session is suspending")
        wanted = State.DIFFING if phase is Phase.DIFFING else State.TRANSFERRING
        self._control(encode("phase", phase=phase.value), lambda: state_reached(self.state, wanted))

    def verified(self, roots: Mapping[str, bytes]) -> None:
        self._need(PeerMessage.VERIFIED)
        if not valid_roots(dict(roots)):
            raise LocalProtocolError(f"roots must be 1..{MAX_ROOTS} names of at most {MAX_ROOT_NAME} characters, "
                                     f"each a hash of at most {MAX_ROOT_BYTES} bytes")
        if self.roots is not None and self.roots != dict(roots):
            raise LocalProtocolError("verified with other roots than the session holds")
        self.roots = dict(roots)
        self._control(encode("verified", roots=dict(roots)), lambda: state_reached(self.state, State.VERIFIED))

    def resumed(self) -> None:
        self._need(PeerMessage.RESUMED)
        self._sent_resumed = True
        self._control(encode("resumed"), lambda: state_reached(self.state, State.RESUMED))

    def acknowledge_confirm(self) -> None:
        """(Source) tell the target, through the service, that the confirm arrived: it stays
        attached until then, so that a restarted service can still learn that it resumed."""
        self._need(PeerMessage.RELEASED)
        if not self.confirmed:
            raise LocalProtocolError("released before the confirm")
        self._control(encode("released"), lambda: self.released)

    def report(self, figures: Mapping[str, Any]) -> None:
        """Send this side's figures of the migration to the other side, once: the target's after
        its ``resumed``, the source's after the confirm and before its ``released`` (the target
        leaves once it has that).  Journalled until ``released`` is seen: the service relays them
        in order before it, so by then the other side has them (or was away and gets them from the
        service when it attaches)."""
        self._need(PeerMessage.REPORT)
        if self._reported:
            raise LocalProtocolError("this side reported already")
        if self.role is Role.SOURCE and not self.confirmed:
            raise LocalProtocolError("the source reports after the confirm")
        if self.role is Role.TARGET and not (self._sent_resumed or state_reached(self.state, State.RESUMED)):
            raise LocalProtocolError("the target reports after its resumed")
        if self.released:
            raise LocalProtocolError("report after released: the other side may be gone")
        if not valid_figures(dict(figures)):
            raise LocalProtocolError("figures must be at most a few dozen lower-case names of numbers, flags, "
                                     "short text, nil or small maps of numbers (server.wire.valid_figures)")
        msg = encode("report", figures=dict(figures))
        if len(msg) > MAX_REPORT_MESSAGE:
            raise LocalProtocolError(f"report of {len(msg)} bytes exceeds {MAX_REPORT_MESSAGE}")
        self._reported = True
        self._control(msg, lambda: self.released)

    def replay_progress(self, seq: int, now: float) -> bool:
        """(Target) the replay went through every event of log frame ``seq`` and the frames before
        it.  Queued for the source at most once per ``replayed_interval`` (``now``: monotonic
        seconds), and at once when ``seq`` is the last frame received; an older value still
        queued is replaced.  True when it was queued.  Not journalled: a newer one supersedes it,
        and the last one is told again after a reconnect."""
        self._need(PeerMessage.REPLAYED)
        if self.state is not None and not self._allowed_now(PeerMessage.REPLAYED):
            raise LocalProtocolError(f"replay progress in state {self.state.value}: the replay is over")
        last = self._recv_next[Stream.LOG] - 1
        if not self.replayed <= seq <= last:
            raise LocalProtocolError(f"replayed {seq}: frames received up to {last}, replayed up to {self.replayed}")
        self.replayed = seq
        if seq == self._replayed_told:
            return False
        if seq != last and self._replayed_at is not None and now - self._replayed_at < self.replayed_interval:
            return False
        self._replayed_at = now
        self._replayed_told = seq
        self._replayed_due = True
        return True

    def abort(self, reason: Reason) -> None:
        if reason not in PEER_REASONS:
            raise LocalProtocolError(f"{reason.value} is not a reason a peer may give")
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
        if self._replayed_due and self._allowed_now(PeerMessage.REPLAYED):
            out.append(encode("replayed", seq=self._replayed_told))
        self._replayed_due = False
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
        on = _FROM_SERVICE.get(t)
        if on is None or self.role not in on[0]:
            raise SessionViolation(Reason.BAD_MESSAGE, f"service sent {t} to a {self.role.value}")
        return on[1](self, msg)

    # -- internals
    def _need(self, kind: PeerMessage) -> None:
        """Our caller's mistake when this role never sends ``kind`` (the table says who sends what)."""
        if kind not in MAY_SEND[self.role]:
            raise LocalProtocolError(f"only the {self.role.peer.value} sends {kind.value}")

    def _allowed_now(self, kind: PeerMessage) -> bool:
        """Whether the table allows ``kind`` from this role in the state this side last saw."""
        return self.state is not None and kind in TRANSITIONS[self.state][self.role]

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
        # the last progress told may have been lost with the connection (a restarted service lost it)
        self._replayed_due = self.role is Role.TARGET and self._replayed_told > 0
        self.attached = self.ever_attached = True
        if msg["roots"] is not None:
            if self.role is Role.SOURCE:
                events += self._on_roots(msg["roots"])
            elif self.roots is None:
                self.roots = dict(msg["roots"])
            elif self.roots != msg["roots"]:
                raise SessionViolation(Reason.BAD_SEQUENCE, "the service holds other roots than this target verified")
        return events

    def _on_log(self, msg: dict[str, Any]) -> list[Event]:
        return self._on_frame(Stream.LOG, msg["seq"], msg["data"])

    def _on_diff(self, msg: dict[str, Any]) -> list[Event]:
        return self._on_frame(Stream(msg["dir"]), msg["seq"], msg["data"])

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

    def _on_ack(self, msg: dict[str, Any]) -> list[Event]:
        stream, seq = Stream(msg["stream"]), msg["seq"]
        if stream.sender is not self.role:
            raise SessionViolation(Reason.WRONG_ROLE, f"ack of {stream.value} sent to the {self.role.value}")
        if seq >= self._next_seq[stream]:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"ack of {stream.value} {seq}, never sent")
        self._set_acked(stream, seq)
        return []

    def _on_state(self, msg: dict[str, Any]) -> list[Event]:
        return self._set_state(State(msg["state"]))

    def _on_log_end(self, msg: dict[str, Any]) -> list[Event]:
        seq = msg["seq"]
        if seq != self._recv_next[Stream.LOG] - 1:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"log_end {seq} after frame {self._recv_next[Stream.LOG] - 1}")
        if self.log_end == seq:
            return []
        if self.log_end is not None:
            raise SessionViolation(Reason.BAD_SEQUENCE, "log_end moved")
        self.log_end = seq
        return [LogEnded(seq)]

    def _on_replayed(self, msg: dict[str, Any]) -> list[Event]:
        """(Source) the target's replay progress: no event, a position (:attr:`replayed`) that the
        source's suspend waits on."""
        seq, sent = msg["seq"], self._next_seq[Stream.LOG] - 1
        if seq > sent:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"replayed {seq}, but this side sent log frames up to {sent}")
        if seq < self.replayed:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"replayed {seq} after {self.replayed}: backwards")
        self.replayed = seq
        return []

    def _on_verified(self, msg: dict[str, Any]) -> list[Event]:
        return self._on_roots(msg["roots"])

    def _on_confirm(self, msg: dict[str, Any]) -> list[Event]:
        if self.confirmed:
            return []
        self.confirmed = True
        return [Confirmed()]

    def _on_released(self, msg: dict[str, Any]) -> list[Event]:
        if self.released:
            return []
        self.released = True
        self._prune()
        return [Released()] if self.role is Role.TARGET else []

    def _on_report(self, msg: dict[str, Any]) -> list[Event]:
        if self.state is not State.RESUMED:
            raise SessionViolation(Reason.WRONG_STATE, "the other side's report before the session resumed")
        figures = dict(msg["figures"])
        if self.peer_report == figures:
            return []                   # given again on a re-attach
        if self.peer_report is not None:
            raise SessionViolation(Reason.BAD_SEQUENCE, "the other side's report changed")
        self.peer_report = figures
        return [Reported(figures)]

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


_BOTH: Final = frozenset(Role)
#: what the service sends an attached peer: message type → (the roles it may go to, its handler)
_FROM_SERVICE: Final[Mapping[str, tuple[frozenset[Role], Callable[[ClientState, dict[str, Any]], list[Event]]]]] = {
    "log": (_BOTH, ClientState._on_log), "diff": (_BOTH, ClientState._on_diff),   # the stream says who
    "ack": (_BOTH, ClientState._on_ack), "state": (_BOTH, ClientState._on_state),
    "log_end": (frozenset({Role.TARGET}), ClientState._on_log_end),
    "replayed": (frozenset({Role.SOURCE}), ClientState._on_replayed),
    "verified": (frozenset({Role.SOURCE}), ClientState._on_verified),
    "confirm": (frozenset({Role.SOURCE}), ClientState._on_confirm),
    "released": (_BOTH, ClientState._on_released),
    "report": (_BOTH, ClientState._on_report),
}
_FRAMES: Final[Mapping[Stream, PeerMessage]] = {
    Stream.LOG: PeerMessage.LOG, Stream.S2T: PeerMessage.DIFF_S2T, Stream.T2S: PeerMessage.DIFF_T2S}
