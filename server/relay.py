"""One relayed stream inside the handoff service (sans-I/O), and how its frames travel.

Three relayed streams, ``log`` and ``s2t`` (source → target) and ``t2s`` (target → source), each
numbered from 1.  The service keeps a frame from the moment it accepts it until the *receiver*
acks it, and relays that ack to the sender: acks are end to end, so a sender that keeps its unacked
bytes within ``window`` can never overflow the service's buffer (one that does fails the session
with ``buffer_full``).  On re-attach the receiver's ``resume_from`` acknowledges everything before
it and the service re-sends exactly the rest; the sender learns ``next`` and re-sends from there.
A frame below ``next`` is a duplicate and is dropped; one above it is a gap (``bad_sequence``).
"""

from __future__ import annotations

from collections import deque

from server.wire import Reason, SessionViolation, Stream, frame_cost


class Relay:
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

