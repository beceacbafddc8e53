"""One websocket connection as the handoff service's sans-I/O core sees it (DESIGN.md §8).

A :class:`Link` takes the peer's messages (bytes, with ``now``), routes them to session creation,
to the attach, or to its session, and queues what goes back, bounded; the adapter
(:mod:`server.service`) only moves bytes and closes the connection when asked to.  Errors before a
successful attach only refuse that connection; once attached, the session fails and tells both peers.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from server.keyring import Grant
from server.wire import Claim, Reason, Role, SessionViolation, Stream, decode, encode, error_message

if TYPE_CHECKING:
    from server.registry import SessionRegistry
    from server.session import Session

# websocket close codes the core asks for
CLOSE_NORMAL: Final = 1000
CLOSE_POLICY: Final = 1008
CLOSE_SUPERSEDED: Final = 4001

_log = logging.getLogger("replay_migrate.service")


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
                self.refuse(e.reason, keep_vm=self.grant.role is Role.SOURCE)
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
            self.refuse(Reason.NOT_ATTACHED, keep_vm=False)

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
            self.session.pump_to(self.role)
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

    # -- what the session calls
    def bind(self, session: Session, role: Role) -> None:
        """This connection is ``role`` of ``session`` from now on."""
        self.session = session
        self.role = role

    def unbind(self) -> None:
        """The session let go of this connection (superseded, failed, finished)."""
        self.session = None

    def push(self, data: bytes, frame: bool = False) -> None:
        """Queue one message; a ``frame`` counts against ``max_outgoing_bytes``."""
        if self.closing:
            return
        size = len(data) if frame else 0
        self._out.append((data, size))
        self._frame_bytes += size
        self.registry.queued_bytes += size
        self._wake()

    def push_ack(self, stream: Stream, seq: int) -> None:
        """Queue a relayed ack, or update the one still queued for ``stream``."""
        if self.closing:
            return
        slot = self._acks.get(stream)
        if slot is not None:
            slot.seq = seq
            return
        slot = self._acks[stream] = _AckSlot(stream, seq)
        self._out.append((slot, 0))
        self._wake()

    def refuse(self, reason: Reason, keep_vm: bool, code: int = CLOSE_POLICY) -> None:
        """Send ``error`` and close: the end of this connection, not necessarily of its session."""
        if self.closing:
            return
        self.push(error_message(reason, keep_vm))
        self.request_close(code)

    def request_close(self, code: int) -> None:
        """Ask the adapter to close the connection with ``code`` once the output is drained."""
        if self.close_code is None:
            self.close_code = code
            self._wake()

    # -- internals
    def _create(self, msg: dict[str, Any]) -> None:
        if msg["t"] != "create":
            raise SessionViolation(Reason.NOT_ATTACHED, f"first message on the creation path is {msg['t']}")
        source, target = self.registry.new_session()
        _log.info("session %s created", source.session)
        self.push(encode("created", session=source.session, source=str(source), target=str(target)))
        self.request_close(CLOSE_NORMAL)

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
            self.refuse(found, keep_vm=role is Role.SOURCE, code=CLOSE_NORMAL)
            return
        found.attach(self, role, {Stream(k): v for k, v in msg["resume_from"].items()},
                     Claim.from_wire(msg["claim"]), msg["resume"], now)

    def _violation(self, e: SessionViolation, now: float) -> None:
        if self.session is not None:
            self.session.log.warning("message from %s rejected: %s", self.role.value if self.role else "?", e)
            self.session.fail(e.reason, now)
        else:
            _log.info("connection for %s refused: %s", self.session_id or "session creation", e)
            self.refuse(e.reason, keep_vm=self.grant.role is Role.SOURCE)

    def _wake(self) -> None:
        if self.on_output is not None:
            self.on_output()

    def discard(self) -> None:
        """The writer is done with this connection: forget what it did not send."""
        self.registry.queued_bytes -= self._frame_bytes
        self._frame_bytes = 0
        self._out.clear()
        self._acks.clear()

