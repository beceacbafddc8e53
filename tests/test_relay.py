"""One relayed stream (server/relay.py): sequence, duplicates and gaps, the window counted with
FRAME_COST per frame, cumulative acks, rewinds on re-attach and the claims of a restored session."""

from __future__ import annotations

import pytest
from sessionkit import assert_failed, pair

from server.limits import Limits
from server.relay import Relay
from server.wire import FRAME_COST, Reason, SessionViolation, State, Stream

pytestmark = pytest.mark.timeout(30)


def test_empty_frames_count_against_the_window() -> None:
    limits = Limits(max_message_size=1024, max_buffered_bytes=1024 + FRAME_COST)
    _, s, src, tgt = pair(limits)
    for seq in range(1, 18):
        src.send("log", seq=seq, data=b"")
    assert s.buffered(Stream.LOG) == 17 * FRAME_COST and s.state is State.RECORDING
    src.send("log", seq=18, data=b"")
    assert_failed(s, src, tgt, Reason.BUFFER_FULL)


def test_frames_are_taken_in_order_once_and_a_gap_is_the_senders_error() -> None:
    r = Relay(Stream.LOG, limit=1000)
    assert r.accept(1, b"a") and r.accept(2, b"bb")
    assert not r.accept(1, b"a") and r.duplicates == 1           # a resend: dropped
    with pytest.raises(SessionViolation, match="log frame 4, expected 3") as gap:
        r.accept(4, b"d")
    assert gap.value.reason is Reason.BAD_SEQUENCE
    assert r.next_in == 3 and r.buffered == 1 + 2 + 2 * FRAME_COST


def test_the_window_counts_what_the_receiver_has_not_acked() -> None:
    r = Relay(Stream.S2T, limit=2 * (100 + FRAME_COST))
    r.accept(1, b"x" * 100)
    r.accept(2, b"x" * 100)
    with pytest.raises(SessionViolation) as full:
        r.accept(3, b"")
    assert full.value.reason is Reason.BUFFER_FULL and r.next_in == 3   # refused: not taken
    while r.peek() is not None:
        r.mark_sent()
    assert r.sent_to == 2
    assert r.ack(1) and not r.ack(1)                                    # cumulative, repeats are no news
    assert r.buffered == 100 + FRAME_COST and r.accept(3, b"")
    with pytest.raises(SessionViolation, match="ack 3 beyond 2 sent"):
        r.ack(3)                                                        # frame 3 was never pushed


def test_a_returning_receiver_gets_exactly_what_it_lacks() -> None:
    r = Relay(Stream.LOG, limit=10_000)
    for seq in range(1, 6):
        r.accept(seq, b"f%d" % seq)
    while r.peek() is not None:
        r.mark_sent()
    r.ack(2)
    assert r.rewind(4)                                                  # it had 1..3: 3 is acked now
    assert r.acked == 3 and [r.peek()] == [(4, b"f4")]
    assert not r.rewind(4)
    for bad in (3, 7):                                                  # before its own ack / beyond the sender
        with pytest.raises(SessionViolation) as e:
            r.rewind(bad)
        assert e.value.reason is Reason.BAD_SEQUENCE


def test_a_restored_stream_takes_its_positions_from_both_ends() -> None:
    # the sender comes back first: it holds 3..6 and saw 2 acked; the receiver then says it has 1..5
    r = Relay(Stream.LOG, limit=10_000)
    r.claim_sender(acked=2, nxt=7)
    assert (r.acked, r.next_in, r.resend_below) == (2, 3, 7)
    assert r.claim_receiver(6)                                          # 3..5 acked: the sender may forget them
    assert (r.acked, r.next_in) == (5, 6)
    assert not r.accept(5, b"f5") and r.accept(6, b"f6")
    # a receiver that has more than its sender ever held is a contradiction
    r = Relay(Stream.LOG, limit=10_000)
    r.claim_sender(acked=0, nxt=3)
    with pytest.raises(SessionViolation) as e:
        r.claim_receiver(5)
    assert e.value.reason is Reason.BAD_SEQUENCE
    # the receiver first: the sender must hold everything after what the receiver has
    r = Relay(Stream.T2S, limit=10_000)
    assert not r.claim_receiver(4)
    with pytest.raises(SessionViolation):
        r.claim_sender(acked=5, nxt=9)
    r.claim_sender(acked=2, nxt=6)
    assert r.next_in == 4 and r.acked == 3
