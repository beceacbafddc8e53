"""The handoff service's session core (DESIGN.md §1, §8): one migration's shared state and its
state machine, sans-I/O.

Bytes in, bytes out: no sockets, no asyncio and no clock (callers pass ``now``, monotonic seconds),
so every state transition and every resend decision is testable without a network.  The core is
split by role: the wire format (:mod:`server.wire`), the table of who may send what in which state
(:mod:`server._state`), credentials (:mod:`server.keyring`), the bounds (:mod:`server.limits`),
one stream's buffer (:mod:`server.relay`), a session (here), a connection (:mod:`server.link`) and
the sessions a service holds (:mod:`server.registry`).  ``server/service.py`` is the asyncio
adapter; ``server/clientcore.py`` and ``server/client.py`` are the peers' side.

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
What the table (:mod:`server._state`) does not allow in the session's state is such a violation
(``wrong_role`` or ``wrong_state``); in a finished (RESUMED) session it only refuses the offending
connection.  Errors before a successful attach only refuse that connection.  Exception text stays
in the logs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from server._state import MAY_SEND, PeerMessage, guard
from server.limits import Limits
from server.link import CLOSE_NORMAL, CLOSE_POLICY, CLOSE_SUPERSEDED
from server.relay import Relay
from server.wire import (
    ENVELOPE_OVERHEAD,
    HAPPY_PATH,
    Claim,
    Reason,
    Role,
    SessionViolation,
    State,
    Stream,
    encode,
    frame_message,
    state_reached,
)

if TYPE_CHECKING:
    from server.link import Link


class Session:
    """One migration's shared state and its state machine; peers reach it through their
    connections (:class:`~server.link.Link`).

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
        self.replayed = 0
        """The last log frame the target said it replayed (``replayed``), relayed to the source."""
        #: some peer was attached to this session before this object existed (a service restart,
        #: or the session was dropped while nobody was attached): controls may repeat
        self.restored = state is not State.RECORDING
        self._seen: set[Role] = set()
        self._links: dict[Role, Link | None] = dict.fromkeys(Role)
        self._absent_since: dict[Role, float | None] = dict.fromkeys(Role, now)
        self._relays = {s: Relay(s, limits.max_buffered_bytes) for s in Stream}
        #: each role's last ``report`` as relayed (encoded, at most MAX_REPORT_MESSAGE bytes): the
        #: peer gets it on every attach, so one that was away when it came still does
        self._reports: dict[Role, bytes] = {}

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
            link.refuse(self._failure_reason(), keep_vm=role is Role.SOURCE, code=CLOSE_NORMAL)
            return
        first = role not in self._seen
        try:
            if first:
                self.restored = self.restored or resume
                self._merge(role, claim, resume_from, now)
            elif HAPPY_PATH.index(claim.state) > HAPPY_PATH.index(self.state):
                raise SessionViolation(Reason.BAD_SEQUENCE, f"{role.value} claims state {claim.state.value}, "
                                       f"which this session never reached")
        except SessionViolation as e:
            raise self._violate(role, "attach", e, now) from None
        old = self._links[role]
        if old is not None and old is not link:
            self.log.info("%s re-attached: its previous connection is superseded", role.value)
            old.unbind()
            old.refuse(Reason.SUPERSEDED, keep_vm=self._keep_vm(role), code=CLOSE_SUPERSEDED)
        self._links[role] = link
        link.bind(self, role)
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
        link.push(encode(
            "attached", session=self.id, state=self.state.value,
            next={s.value: self._relays[s].next_in for s in role.sends},
            acked={s.value: self._relays[s].acked for s in role.sends},
            window=self.limits.max_buffered_bytes, max_message=self.limits.max_message_size,
            log_end=self.log_end, roots=self.roots))
        if role is Role.SOURCE and self.state is State.RESUMED:
            link.push(encode("confirm"))
        report = self._reports.get(role.peer)
        if report is not None:          # before released: the target leaves once it has that
            link.push(report)
        if self.released:
            link.push(encode("released"))
        if role is Role.SOURCE and self.replayed:   # a source that was away when it came
            link.push(encode("replayed", seq=self.replayed))
        for stream in advanced:
            self._forward_ack(stream)
        self.pump_to(role)         # log frames, log_end, then diff messages: the live order

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
        if HAPPY_PATH.index(claim.state) > HAPPY_PATH.index(self.state):
            self.log.info("%s saw the session in %s: restored there", role.value, claim.state.value)
            self._transition(claim.state, now)
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
        """Apply one decoded message from ``role``'s current connection.  The table
        (:func:`server._state.guard`) decides whether ``role`` may send it now and which state it
        leads to; the message's handler checks the rest (sequence, the log's end) and does it."""
        t = msg["t"]
        if self.state is State.FAILED:     # no row in the table: the failure answers everything
            if self._links[role] is not None:
                self._unbind_and_refuse(role, self._failure_reason(), CLOSE_NORMAL)
            return
        kind = PeerMessage.of(msg)
        try:
            if kind is None:
                raise SessionViolation(Reason.BAD_MESSAGE, f"{t} is not a message a peer sends once attached")
            if self._repeated(role, kind, msg):
                return
            new = self.state if self._journalled(role, kind, msg) else guard(self.state, role, kind)
            _HANDLERS[kind](self, role, msg, now)
            if new is not self.state:       # (abort's handler failed the session itself, with its reason)
                self._transition(new, now)
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
                link.unbind()
                link.request_close(CLOSE_NORMAL)

    # -- the two rules beside the table, for a restored session
    def _repeated(self, role: Role, kind: PeerMessage, msg: Mapping[str, Any]) -> bool:
        """In a restored session, a control whose effect is already there is a no-op: its sender
        never saw it applied (or another peer's claim got there first)."""
        applied = _APPLIED.get(kind)
        if not self.restored or applied is None or kind not in MAY_SEND[role] or not applied(self, msg):
            return False
        self.log.info("%s from %s is already applied: ignored", kind.value, role.value)
        return True

    def _journalled(self, role: Role, kind: PeerMessage, msg: Mapping[str, Any]) -> bool:
        """A frame its sender journalled before it attached to this restored session: it was legal
        when first sent, and its receiver may still need it (the source reads the target's last diff
        message after the target resumed), so the state does not matter."""
        stream = _FRAME_STREAMS.get(kind)
        return (stream is not None and self.restored and role is stream.sender
                and msg["seq"] < self._relays[stream].resend_below)

    # -- handlers, looked up by the table's message (_HANDLERS) once the guard let it through
    def _on_frame(self, role: Role, msg: dict[str, Any], now: float) -> None:
        stream, seq = (Stream(msg["dir"]) if msg["t"] == "diff" else Stream.LOG), msg["seq"]
        if stream is Stream.LOG and self.log_end is not None \
                and (seq > self.log_end or not self._journalled(role, PeerMessage.LOG, msg)):
            raise SessionViolation(Reason.BAD_SEQUENCE, f"log frame {seq} after log_end {self.log_end}")
        if self._relays[stream].accept(seq, msg["data"]):
            self.pump_to(stream.receiver)
        else:
            self.log.debug("duplicate %s frame %d dropped", stream.value, seq)

    def _on_ack(self, role: Role, msg: dict[str, Any], now: float) -> None:
        stream = Stream(msg["stream"])
        if self._relays[stream].ack(msg["seq"]):
            self._forward_ack(stream)

    def _on_log_end(self, role: Role, msg: dict[str, Any], now: float) -> None:
        if self.log_end is not None:
            raise SessionViolation(Reason.WRONG_STATE, "second log_end")
        last = self._relays[Stream.LOG].next_in - 1
        if msg["seq"] != last:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"log_end {msg['seq']} but the last log frame is {last}")
        self.log_end = last
        self.log.info("log ended at frame %d", last)
        self.pump_to(Role.TARGET)

    def _on_replayed(self, role: Role, msg: dict[str, Any], now: float) -> None:
        """Relay the target's replay progress to the source, once per new frame: only frames the
        source sent (the service holds or held them), never backwards."""
        seq = msg["seq"]
        log = self._relays[Stream.LOG]
        sent = max(log.next_in, log.resend_below) - 1
        if seq > sent:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"replayed {seq}, but the source sent log frames up to {sent}")
        if seq < self.replayed:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"replayed {seq} after {self.replayed}: backwards")
        if seq == self.replayed:
            return                          # again, after a reconnect
        self.replayed = seq
        self._send(Role.SOURCE, encode("replayed", seq=seq))

    def _on_phase_diffing(self, role: Role, msg: dict[str, Any], now: float) -> None:
        if self.log_end is None or self._relays[Stream.LOG].acked != self.log_end:
            raise SessionViolation(Reason.WRONG_STATE, "phase diffing before the whole log was acked")

    def _on_verified(self, role: Role, msg: dict[str, Any], now: float) -> None:
        self.roots = dict(msg["roots"])

    def _on_released(self, role: Role, msg: dict[str, Any], now: float) -> None:
        if not self.released:
            self.log.info("the source has the confirm")
        self.released = True
        for r in Role:          # the source's control is done; the target may go
            self._send(r, encode("released"))

    def _on_report(self, role: Role, msg: dict[str, Any], now: float) -> None:
        """Keep the side's figures and relay them to the other side; the service reads nothing in
        them.  A side reports once: the same report again (re-sent after a reconnect) is a no-op,
        another one is refused."""
        data = encode("report", figures=msg["figures"])
        old = self._reports.get(role)
        if old == data:
            return
        if old is not None:
            raise SessionViolation(Reason.BAD_SEQUENCE, f"a second, different report from the {role.value}")
        self._reports[role] = data
        self.log.info("%s reported %d figures", role.value, len(msg["figures"]))
        self._send(role.peer, data)

    def _on_abort(self, role: Role, msg: dict[str, Any], now: float) -> None:
        reason = Reason(msg["reason"])
        self.log.warning("%s aborted the session: %s", role.value, reason.value)
        self.fail(reason, now)

    def _only_the_transition(self, role: Role, msg: dict[str, Any], now: float) -> None:
        """suspend, phase transferring, resumed: the table's transition is all they do."""

    # -- plumbing
    def _transition(self, new: State, now: float) -> None:
        """Move along the happy path to ``new`` (FAILED is :meth:`fail`'s) and tell both peers.
        Reaching VERIFIED sends the roots to the source first: a source that wakes on the VERIFIED
        state must already hold them (it once read no roots, failed a migration that had verified,
        and resumed its VM).  Reaching RESUMED finishes the session and confirms to the source."""
        if state_reached(new, State.VERIFIED) and not state_reached(self.state, State.VERIFIED):
            self._send(Role.SOURCE, encode("verified", roots=self.roots))
        self.log.info("%s -> %s", self.state.value, new.value)
        self.state = new
        for role in Role:
            self._send(role, encode("state", state=new.value))
        if new is State.RESUMED:
            self.finished_at = now
            self._send(Role.SOURCE, encode("confirm"))

    def _violate(self, role: Role, what: str, e: SessionViolation, now: float) -> SessionViolation:
        self.log.warning("%s from %s rejected: %s", what, role.value, e)
        self.fail(e.reason, now)
        return e

    def _send(self, role: Role, data: bytes) -> None:
        link = self._links[role]
        if link is not None:
            link.push(data)

    def pump_to(self, role: Role) -> None:
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
                link.push(frame_message(stream, *item), frame=True)
            if stream is Stream.LOG and self.log_end is not None and not link.log_end_sent:
                link.log_end_sent = True
                link.push(encode("log_end", seq=self.log_end))

    def _forward_ack(self, stream: Stream) -> None:
        link = self._links[stream.sender]
        if link is not None:
            link.push_ack(stream, self._relays[stream].acked)

    def _keep_vm(self, role: Role) -> bool:
        return role is Role.SOURCE and self.state is not State.RESUMED

    def _failure_reason(self) -> Reason:
        return self.failure if self.failure is not None else Reason.INTERNAL

    def _unbind_and_refuse(self, role: Role, reason: Reason, code: int) -> None:
        link = self._links[role]
        if link is not None:
            self._links[role] = None
            self._absent_since[role] = None  # only called once the session is terminal
            link.unbind()
            link.refuse(reason, keep_vm=self._keep_vm(role), code=code)


_Handler = Callable[[Session, Role, dict[str, Any], float], None]
#: what each message of the table does once the guard let it through
_HANDLERS: Final[Mapping[PeerMessage, _Handler]] = {
    PeerMessage.LOG: Session._on_frame, PeerMessage.DIFF_S2T: Session._on_frame,
    PeerMessage.DIFF_T2S: Session._on_frame, PeerMessage.ACK_LOG: Session._on_ack,
    PeerMessage.ACK_S2T: Session._on_ack, PeerMessage.ACK_T2S: Session._on_ack,
    PeerMessage.LOG_END: Session._on_log_end, PeerMessage.SUSPEND: Session._only_the_transition,
    PeerMessage.REPLAYED: Session._on_replayed,
    PeerMessage.PHASE_DIFFING: Session._on_phase_diffing,
    PeerMessage.PHASE_TRANSFERRING: Session._only_the_transition, PeerMessage.VERIFIED: Session._on_verified,
    PeerMessage.RESUMED: Session._only_the_transition, PeerMessage.RELEASED: Session._on_released,
    PeerMessage.REPORT: Session._on_report, PeerMessage.ABORT: Session._on_abort,
}
#: the controls a restored session may see again, and how it tells they are applied already
_APPLIED: Final[Mapping[PeerMessage, Callable[[Session, Mapping[str, Any]], bool]]] = {
    PeerMessage.LOG_END: lambda s, m: s.log_end == m["seq"],
    PeerMessage.SUSPEND: lambda s, m: state_reached(s.state, State.SUSPENDING),
    PeerMessage.PHASE_DIFFING: lambda s, m: state_reached(s.state, State.DIFFING),
    PeerMessage.PHASE_TRANSFERRING: lambda s, m: state_reached(s.state, State.TRANSFERRING),
    PeerMessage.VERIFIED: lambda s, m: state_reached(s.state, State.VERIFIED) and s.roots == m["roots"],
    PeerMessage.RESUMED: lambda s, m: s.state is State.RESUMED,
}
_FRAME_STREAMS: Final[Mapping[PeerMessage, Stream]] = {
    PeerMessage.LOG: Stream.LOG, PeerMessage.DIFF_S2T: Stream.S2T, PeerMessage.DIFF_T2S: Stream.T2S}
