"""The session core (server/session.py): the state machine through its connections, roles,
sequencing, resume, re-creation after a restart from the peers' claims; and the fuzz target for
the session messages (decoder, service connections in every state, both clients)."""

from __future__ import annotations

import logging
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from sessionkit import (
    BIG,
    FUZZ_TEMPLATES,
    ROOTS,
    SID,
    Peer,
    V,
    assert_failed,
    claim_of,
    drive_to,
    fuzz_session_message,
    pair,
    registry,
    st,
)

from replay_migrate.errors import ProtocolError
from server.keyring import Grant
from server.limits import Limits
from server.link import CLOSE_POLICY, CLOSE_SUPERSEDED, Link
from server.wire import FRAME_COST, Claim, Reason, Role, SessionViolation, State, Stream, decode, encode

pytestmark = pytest.mark.timeout(30)


# ---- happy path -----------------------------------------------------------------------------------
def test_happy_path(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    reg = registry()
    src, tgt = Peer(reg, Role.SOURCE), Peer(reg, Role.TARGET)
    src.attach()
    [att] = src.out()
    assert att["t"] == "attached" and att["state"] == "recording"
    assert att["next"] == {"log": 1, "s2t": 1} and att["acked"] == {"log": 0, "s2t": 0}
    assert att["window"] == Limits().max_buffered_bytes and att["log_end"] is None and att["roots"] is None
    for seq in (1, 2, 3):
        src.send("log", seq=seq, data=b"frame%d" % seq)  # buffered: the target is not here yet
    tgt.attach()
    got = tgt.out()
    assert got[0]["t"] == "attached" and got[0]["next"] == {"t2s": 1}
    assert [(m["t"], m["seq"], m["data"]) for m in got[1:]] == [("log", i, b"frame%d" % i) for i in (1, 2, 3)]
    s = reg.lookup(SID)
    assert s is not None and s.buffered(Stream.LOG) == (len(b"frame1") + FRAME_COST) * 3

    tgt.send("ack", stream="log", seq=3)
    assert src.out() == [{"v": V, "t": "ack", "stream": "log", "seq": 3}]
    assert s.buffered(Stream.LOG) == 0
    src.send("log_end", seq=3)
    assert tgt.out() == [{"v": V, "t": "log_end", "seq": 3}]
    src.send("suspend")
    assert src.types() == tgt.types() == ["state"] and st(s) is State.SUSPENDING

    src.send("diff", dir="s2t", seq=1, data=b"source roots")     # allowed while the target replays
    tgt.send("phase", phase="diffing")
    assert st(s) is State.DIFFING
    assert [m["t"] for m in tgt.out()] == ["diff", "state"]
    tgt.send("diff", dir="t2s", seq=1, data=b"target level 0")
    diffs = [(m["dir"], m["data"]) for m in src.out() if m["t"] == "diff"]
    assert diffs == [("t2s", b"target level 0")]
    tgt.send("phase", phase="transferring")
    src.send("diff", dir="s2t", seq=2, data=b"blocks")
    tgt.send("ack", stream="s2t", seq=2)
    src.send("ack", stream="t2s", seq=1)
    tgt.send("verified", roots=ROOTS)
    assert st(s) is State.VERIFIED
    src_msgs = src.out()
    assert [m["t"] for m in src_msgs][-2:] == ["verified", "state"]     # roots before the state
    assert {"v": V, "t": "verified", "roots": ROOTS} in src_msgs
    tgt.send("resumed")
    assert st(s) is State.RESUMED
    assert [m["t"] for m in src.out()] == ["state", "confirm"]
    assert [(m["t"], m.get("state") or m.get("stream") or m.get("dir")) for m in tgt.out()] == [
        ("state", "transferring"), ("diff", "s2t"), ("ack", "t2s"), ("state", "verified"), ("state", "resumed")]
    assert s.duplicates == 0
    assert any(r.name == f"replay_migrate.session.{SID}" for r in caplog.records)


# ---- every message in every state -----------------------------------------------------------------
LIVE = [State.RECORDING, State.SUSPENDING, State.DIFFING, State.TRANSFERRING, State.VERIFIED]
# (role, type, fields, states where it is allowed) - written independently of the implementation
MESSAGES: list[tuple[Role, str, dict[str, Any], set[State]]] = [
    (Role.SOURCE, "log", {"seq": 2, "data": b"x"}, {State.RECORDING, State.SUSPENDING}),
    (Role.SOURCE, "log_end", {"seq": 1}, {State.RECORDING, State.SUSPENDING}),
    (Role.SOURCE, "suspend", {}, {State.RECORDING}),
    (Role.SOURCE, "diff", {"dir": "s2t", "seq": 1, "data": b"x"},
     {State.SUSPENDING, State.DIFFING, State.TRANSFERRING}),
    (Role.TARGET, "diff", {"dir": "t2s", "seq": 1, "data": b"x"},
     {State.SUSPENDING, State.DIFFING, State.TRANSFERRING}),
    (Role.TARGET, "phase", {"phase": "diffing"}, {State.SUSPENDING}),
    (Role.TARGET, "phase", {"phase": "transferring"}, {State.DIFFING}),
    (Role.TARGET, "verified", {"roots": ROOTS}, {State.TRANSFERRING}),
    (Role.TARGET, "resumed", {}, {State.VERIFIED}),
]
CASES = [(st, role, t, f, st in ok) for st in LIVE for role, t, f, ok in MESSAGES]


@pytest.mark.parametrize(("state", "role", "t", "fields", "allowed"), CASES,
                         ids=[f"{c[0].value}-{c[1].value}-{c[2]}-{next(iter(c[3].values()), '')}" for c in CASES])
def test_message_in_state(state: State, role: Role, t: str, fields: dict[str, Any], allowed: bool) -> None:
    # SUSPENDING with the log still open, so that log frames and log_end are legal there
    _, s, src, tgt = drive_to(state, log_ended=state is not State.SUSPENDING or t == "phase")
    peer = src if role is Role.SOURCE else tgt
    if t == "log_end" and state is State.SUSPENDING:
        fields = {"seq": 1}
    peer.send(t, **fields)
    if allowed:
        assert s.state is not State.FAILED
    else:
        assert_failed(s, src, tgt, Reason.WRONG_STATE)


@pytest.mark.parametrize(("role", "t", "fields"), [
    (Role.TARGET, "log", {"seq": 2, "data": b"x"}), (Role.TARGET, "log_end", {"seq": 1}),
    (Role.TARGET, "suspend", {}), (Role.TARGET, "diff", {"dir": "s2t", "seq": 1, "data": b"x"}),
    (Role.SOURCE, "diff", {"dir": "t2s", "seq": 1, "data": b"x"}), (Role.SOURCE, "phase", {"phase": "diffing"}),
    (Role.SOURCE, "verified", {"roots": ROOTS}), (Role.SOURCE, "resumed", {}),
    (Role.SOURCE, "ack", {"stream": "log", "seq": 1}), (Role.TARGET, "ack", {"stream": "t2s", "seq": 0}),
])
def test_wrong_role(role: Role, t: str, fields: dict[str, Any]) -> None:
    _, s, src, tgt = drive_to(State.RECORDING)
    (src if role is Role.SOURCE else tgt).send(t, **fields)
    assert_failed(s, src, tgt, Reason.WRONG_ROLE)


def test_session_receive_raises_protocol_error() -> None:
    _, s, src, tgt = drive_to(State.RECORDING)
    with pytest.raises(ProtocolError, match="wrong_state"):
        s.receive(Role.TARGET, {"v": V, "t": "resumed"}, 0.0)
    assert_failed(s, src, tgt, Reason.WRONG_STATE)


def test_phase_diffing_needs_the_whole_log_acked() -> None:
    _, s, src, tgt = drive_to(State.SUSPENDING, log_ended=False)
    src.send("log", seq=2, data=b"tail")
    src.send("log_end", seq=2)
    tgt.send("phase", phase="diffing")          # frame 2 relayed but not acked
    assert_failed(s, src, tgt, Reason.WRONG_STATE)


@pytest.mark.parametrize(("t", "fields", "reason"), [
    ("log", {"seq": 2, "data": b"after end"}, Reason.BAD_SEQUENCE),
    ("log_end", {"seq": 1}, Reason.WRONG_STATE),
])
def test_log_after_log_end(t: str, fields: dict[str, Any], reason: Reason) -> None:
    _, s, src, tgt = drive_to(State.SUSPENDING, log_ended=True)
    src.send(t, **fields)
    assert_failed(s, src, tgt, reason)


def test_log_end_must_name_the_last_frame() -> None:
    _, s, src, tgt = drive_to(State.RECORDING)
    src.send("log_end", seq=5)
    assert_failed(s, src, tgt, Reason.BAD_SEQUENCE)


def test_finished_session_refuses_late_messages_but_stays_resumed() -> None:
    _, s, src, tgt = drive_to(State.RESUMED)
    tgt.send("ack", stream="s2t", seq=0)                 # acks stay harmless
    src.send("abort", reason="cancelled")
    assert s.state is State.RESUMED
    assert src.out() == [{"v": V, "t": "error", "code": 409, "reason": "wrong_state", "keep_vm": False}]
    assert src.link.close_code == CLOSE_POLICY


def test_abort_fails_and_tells_the_source_to_keep_its_vm() -> None:
    _, s, src, tgt = drive_to(State.TRANSFERRING)
    tgt.send("abort", reason="verify_failed")
    assert_failed(s, src, tgt, Reason.VERIFY_FAILED)
    # a late re-attach learns the same
    src2 = Peer(src.reg, Role.SOURCE)
    src2.attach(resume=True)
    assert src2.out() == [{"v": V, "t": "error", "code": 499, "reason": "verify_failed", "keep_vm": True}]


@pytest.mark.parametrize("payload", [
    b"\xc1", msgpack.packb([1, 2]), encode("log", seq="1", data=b""), encode("log", seq=0, data=b""),
    encode("log", seq=1, data=b"", extra=1), encode("suspend")[:-1], encode("nonsense"),
    encode("attached", session=SID, state="recording", next={}, acked={}, window=1, max_message=1,
           log_end=None, roots=None),
])
def test_malformed_message_fails_an_attached_session(payload: bytes) -> None:
    _, s, src, tgt = drive_to(State.RECORDING)
    src.link.receive(payload, 0.0)
    assert_failed(s, src, tgt, Reason.BAD_MESSAGE)


def test_bad_version_and_text_frames() -> None:
    _, s, src, tgt = drive_to(State.RECORDING)
    src.link.receive(msgpack.packb({"v": 1, "t": "suspend"}), 0.0)        # the protocol before credentials
    assert_failed(s, src, tgt, Reason.BAD_VERSION)
    _, s, src, tgt = drive_to(State.RECORDING)
    tgt.link.receive_text(0.0)
    assert_failed(s, src, tgt, Reason.BAD_MESSAGE)


def test_too_large_is_refused() -> None:
    limits = Limits(max_message_size=2048, max_buffered_bytes=8192)
    _, s, src, tgt = pair(limits)
    src.send("log", seq=1, data=b"x" * 4096)
    assert_failed(s, src, tgt, Reason.TOO_LARGE)


# ---- sequencing, duplicates, resume ---------------------------------------------------------------
def test_duplicates_are_dropped_and_gaps_fail() -> None:
    _, s, src, tgt = pair()
    for seq in (1, 2, 2, 1, 3):
        src.send("log", seq=seq, data=b"f%d" % seq)
    assert [(m["seq"], m["data"]) for m in tgt.out()] == [(1, b"f1"), (2, b"f2"), (3, b"f3")]
    assert s.duplicates == 2 and s.state is State.RECORDING
    tgt.send("ack", stream="log", seq=2)
    tgt.send("ack", stream="log", seq=1)                 # stale ack: ignored
    assert s.acked(Stream.LOG) == 2 and s.state is State.RECORDING
    src.send("log", seq=5, data=b"gap")
    assert_failed(s, src, tgt, Reason.BAD_SEQUENCE)


def test_ack_beyond_what_was_relayed_fails() -> None:
    _, s, src, tgt = pair()
    src.send("log", seq=1, data=b"a")
    tgt.send("ack", stream="log", seq=2)
    assert_failed(s, src, tgt, Reason.BAD_SEQUENCE)


def test_target_resume_resends_exactly_the_unacked_frames() -> None:
    _, s, src, tgt = pair()
    for seq in range(1, 6):
        src.send("log", seq=seq, data=b"f%d" % seq)
    assert [m["seq"] for m in tgt.out()] == [1, 2, 3, 4, 5]
    tgt.send("ack", stream="log", seq=2)
    src.out()
    tgt.reconnect()                                    # frame 5 was lost in flight: it has 1..4
    assert not s.attached(Role.TARGET)
    src.send("log", seq=6, data=b"f6")                 # buffered while the target is away
    src.send("log", seq=7, data=b"f7")
    tgt.attach({"log": 5, "s2t": 1}, resume=True)
    got = tgt.out()
    assert got[0]["t"] == "attached"
    assert [(m["seq"], m["data"]) for m in got[1:]] == [(5, b"f5"), (6, b"f6"), (7, b"f7")]
    assert src.out() == [{"v": V, "t": "ack", "stream": "log", "seq": 4}]   # resume_from acked 3..4
    assert s.buffered(Stream.LOG) == 3 * (2 + FRAME_COST)
    # a second cut after it got everything: nothing is sent twice
    tgt.reconnect()
    tgt.attach({"log": 8, "s2t": 1}, resume=True)
    assert [m["t"] for m in tgt.out()] == ["attached"]
    assert s.buffered(Stream.LOG) == 0


def test_log_end_is_repeated_to_a_returning_target_before_any_diff_message() -> None:
    _, _, src, tgt = pair()
    src.send("log", seq=1, data=b"a")
    tgt.reconnect()
    src.send("log_end", seq=1)
    src.send("suspend")
    src.send("diff", dir="s2t", seq=1, data=b"roots")
    tgt.attach({"log": 1, "s2t": 1}, resume=True)
    assert [m["t"] for m in tgt.out()] == ["attached", "log", "log_end", "diff"]   # the live order


def test_source_resume_learns_where_to_continue() -> None:
    _, s, src, tgt = pair()
    for seq in (1, 2, 3):
        src.send("log", seq=seq, data=b"f%d" % seq)
    tgt.send("ack", stream="log", seq=1)
    assert [m["seq"] for m in tgt.out()] == [1, 2, 3]
    src.reconnect()
    src.attach({"t2s": 1}, resume=True)
    [att] = src.out()
    assert att["next"] == {"log": 4, "s2t": 1} and att["acked"] == {"log": 1, "s2t": 0}
    src.send("log", seq=3, data=b"f3")                 # the client re-sends one too many: dropped
    src.send("log", seq=4, data=b"f4")
    assert [m["seq"] for m in tgt.out()] == [4]
    assert s.duplicates == 1


@pytest.mark.parametrize("resume_from", [1, 2, 9])
def test_impossible_resume_point_fails(resume_from: int) -> None:
    _, s, src, tgt = pair()
    for seq in (1, 2, 3):
        src.send("log", seq=seq, data=b"x")
    tgt.send("ack", stream="log", seq=2)
    src.out()
    tgt.reconnect()
    tgt.attach({"log": resume_from, "s2t": 1}, resume=True)
    assert_failed(s, src, tgt, Reason.BAD_SEQUENCE)


def test_newer_connection_supersedes_the_old_one() -> None:
    reg, s, src, tgt = pair()
    src.send("log", seq=1, data=b"a")
    old = tgt.link
    tgt.link = Link(reg, Grant(SID, Role.TARGET), 0.0)  # the service did not notice the drop yet
    tgt.attach({"log": 1, "s2t": 1}, resume=True)
    assert old.close_code == CLOSE_SUPERSEDED
    assert [decode(m, BIG).get("reason") for m in old.data_to_send()] == [None, "superseded"]  # log 1, error
    assert [m["t"] for m in tgt.out()] == ["attached", "log"]
    old.receive(encode("ack", stream="log", seq=1), 0.0)   # the old connection can do nothing any more
    assert s.acked(Stream.LOG) == 0 and s.state is State.RECORDING


def test_buffer_limit() -> None:
    limits = Limits(max_message_size=1024, max_buffered_bytes=2048)
    _, s, src, tgt = pair(limits)
    src.send("log", seq=1, data=b"a" * 700)
    src.send("log", seq=2, data=b"b" * 700)
    tgt.send("ack", stream="log", seq=1)               # acks make room
    src.send("log", seq=3, data=b"c" * 700)
    assert s.buffered(Stream.LOG) == 2 * (700 + FRAME_COST) and s.state is State.RECORDING
    src.send("log", seq=4, data=b"d" * 700)            # 3 x 764 > 2048: the sender ignored the window
    assert_failed(s, src, tgt, Reason.BUFFER_FULL)
    assert s.buffered(Stream.LOG) == 0


def test_resumed_session_repeats_confirm_to_a_returning_source() -> None:
    _, _, src, _ = drive_to(State.RESUMED)
    src.reconnect()
    src.attach({"t2s": 1}, resume=True)
    out = src.out()
    assert [m["t"] for m in out] == ["attached", "confirm"] and out[0]["state"] == "resumed"
    assert out[0]["roots"] == ROOTS


def test_attach_to_failed_session_gets_the_reason() -> None:
    _, s, src, _ = drive_to(State.RECORDING)
    s.fail(Reason.CANCELLED, 0.0)
    src.out()
    again = Peer(src.reg, Role.SOURCE)
    again.attach(resume=True)
    assert again.out() == [{"v": V, "t": "error", "code": 499, "reason": "cancelled", "keep_vm": True}]


# ---- a service that dies: the session re-created from what the peers say ------------------------
def test_the_receiver_ahead_of_what_the_sender_re_sends_gets_nothing_twice() -> None:
    reg = registry()
    src, tgt = Peer(reg, Role.SOURCE), Peer(reg, Role.TARGET)
    # the source comes back first: it holds 3..6 unacked; the target later says it has 1..5
    src.attach({"t2s": 1}, resume=True, claim=claim_of(State.RECORDING, Role.SOURCE, nxt={Stream.LOG: 7},
                                                       acked={Stream.LOG: 2}))
    [att] = src.out()
    assert att["next"]["log"] == 3 and att["acked"]["log"] == 2
    for seq in (3, 4):
        src.send("log", seq=seq, data=b"f%d" % seq)
    tgt.attach({"log": 6, "s2t": 1}, resume=True)
    assert tgt.types() == ["attached"]                   # 3 and 4 are dropped, not re-sent
    assert src.out() == [{"v": V, "t": "ack", "stream": "log", "seq": 5}]
    src.send("log", seq=5, data=b"f5")                   # was in flight: a duplicate now
    src.send("log", seq=6, data=b"f6")
    assert [(m["t"], m["seq"]) for m in tgt.out()] == [("log", 6)]


def test_a_restored_session_moves_to_the_furthest_state_a_peer_saw_and_repeats_are_no_ops() -> None:
    reg = registry()
    src, tgt = Peer(reg, Role.SOURCE), Peer(reg, Role.TARGET)
    # the target sent phase transferring and saw it applied; the source only saw suspending
    tgt.attach({"log": 3, "s2t": 5}, resume=True,
               claim=claim_of(State.TRANSFERRING, Role.TARGET, nxt={Stream.T2S: 4}, acked={Stream.T2S: 3},
                              log_end=2))
    [att, end] = tgt.out()
    assert att["state"] == "transferring" and att["log_end"] == 2 and end["t"] == "log_end"
    src.attach({"t2s": 4}, resume=True,
               claim=claim_of(State.SUSPENDING, Role.SOURCE, nxt={Stream.LOG: 3, Stream.S2T: 7},
                              acked={Stream.LOG: 2, Stream.S2T: 2}, log_end=None))
    [att] = src.out()
    assert att["state"] == "transferring" and att["log_end"] == 2
    assert att["next"] == {"log": 3, "s2t": 5} and att["acked"] == {"log": 2, "s2t": 4}
    s = reg.lookup(SID)
    assert s is not None and s.state is State.TRANSFERRING
    # the source's journal still holds log_end and suspend: applied already, so no-ops
    src.send("log_end", seq=2)
    src.send("suspend")
    tgt.send("phase", phase="diffing")
    src.send("diff", dir="s2t", seq=5, data=b"block")    # journalled before: accepted
    src.send("diff", dir="s2t", seq=6, data=b"block2")
    assert s.state is State.TRANSFERRING
    assert [(m["t"], m.get("seq")) for m in tgt.out()] == [("diff", 5), ("diff", 6)]
    tgt.send("verified", roots=ROOTS)
    tgt.send("verified", roots=ROOTS)                    # a repeat after a cut
    tgt.send("resumed")
    assert st(s) is State.RESUMED
    assert [m["t"] for m in src.out()] == ["verified", "state", "state", "confirm"]


def test_a_log_frame_journalled_before_the_restart_is_accepted_after_suspend() -> None:
    reg = registry()
    src, tgt = Peer(reg, Role.SOURCE), Peer(reg, Role.TARGET)
    tgt.attach({"log": 2, "s2t": 1}, resume=True, claim=claim_of(State.SUSPENDING, Role.TARGET))
    src.attach({"t2s": 1}, resume=True, claim=claim_of(State.RECORDING, Role.SOURCE, nxt={Stream.LOG: 3}))
    src.out()
    s = reg.lookup(SID)
    assert s is not None and s.state is State.SUSPENDING
    src.send("log", seq=2, data=b"late")     # sent in RECORDING, before the restart; re-sent now
    src.send("log_end", seq=2)
    src.send("suspend")                     # applied before the restart: the target saw SUSPENDING
    assert s.state is State.SUSPENDING
    assert [m["t"] for m in tgt.out()] == ["attached", "log", "log_end"]
    src.send("log", seq=3, data=b"new")     # but nothing new after the log ended
    assert st(s) is State.FAILED and s.failure is Reason.BAD_SEQUENCE


@pytest.mark.parametrize(("first", "second", "why"), [
    ((Role.TARGET, {"log": 4, "s2t": 1}, claim_of(State.SUSPENDING, Role.TARGET, log_end=3)),
     (Role.SOURCE, {"t2s": 1}, claim_of(State.SUSPENDING, Role.SOURCE, nxt={Stream.LOG: 6}, acked={Stream.LOG: 3},
                                        log_end=5)), "log_end differs"),
    ((Role.TARGET, {"log": 4, "s2t": 1}, claim_of(State.SUSPENDING, Role.TARGET, log_end=3)),
     (Role.SOURCE, {"t2s": 1}, claim_of(State.RECORDING, Role.SOURCE, nxt={Stream.LOG: 6})),
     "the source holds frames past the log's end"),
    ((Role.SOURCE, {"t2s": 1}, claim_of(State.RECORDING, Role.SOURCE, nxt={Stream.LOG: 3})),
     (Role.TARGET, {"log": 5, "s2t": 1}, claim_of(State.RECORDING, Role.TARGET)),
     "the receiver has frames the sender never had"),
    ((Role.SOURCE, {"t2s": 1}, claim_of(State.RECORDING, Role.SOURCE, nxt={Stream.LOG: 9}, acked={Stream.LOG: 6})),
     (Role.TARGET, {"log": 3, "s2t": 1}, claim_of(State.RECORDING, Role.TARGET)),
     "the sender saw acked what the receiver does not have"),
    ((Role.SOURCE, {"t2s": 1}, claim_of(State.VERIFIED, Role.SOURCE, nxt={Stream.LOG: 2}, acked={Stream.LOG: 1},
                                        log_end=1, roots=ROOTS)),
     (Role.TARGET, {"log": 2, "s2t": 1}, claim_of(State.VERIFIED, Role.TARGET, log_end=1,
                                                  roots={"memory": b"\x09" * 32})), "other roots"),
])
def test_contradictory_claims_fail_the_restored_session(first: tuple[Role, dict[str, int], Claim],
                                                        second: tuple[Role, dict[str, int], Claim], why: str) -> None:
    reg = registry()
    peers = {r: Peer(reg, r) for r in Role}
    (r1, from1, c1), (r2, from2, c2) = first, second
    peers[r1].attach(from1, resume=True, claim=c1)
    assert peers[r1].types()[0] == "attached"
    peers[r2].attach(from2, resume=True, claim=c2)
    s = reg.lookup(SID)
    assert s is not None and s.state is State.FAILED and s.failure is Reason.BAD_SEQUENCE, why
    for role, peer in peers.items():
        assert [m["reason"] for m in peer.out() if m["t"] == "error"] == ["bad_sequence"]
        assert peer.link.close_code is not None, role


@pytest.mark.parametrize(("role", "resume_from", "claim"), [
    (Role.TARGET, {"log": 1, "s2t": 1}, claim_of(State.DIFFING, Role.TARGET)),               # no log_end
    (Role.TARGET, {"log": 2, "s2t": 1}, claim_of(State.SUSPENDING, Role.TARGET, log_end=4)),  # end ≠ held
    (Role.SOURCE, {"t2s": 1}, claim_of(State.VERIFIED, Role.SOURCE, log_end=0)),             # no roots
    (Role.SOURCE, {"t2s": 1}, claim_of(State.SUSPENDING, Role.SOURCE, nxt={Stream.LOG: 3}, log_end=5)),
])
def test_a_claim_must_agree_with_the_claimants_own_positions(role: Role, resume_from: dict[str, int],
                                                              claim: Claim) -> None:
    reg = registry()
    p = Peer(reg, role)
    p.attach(resume_from, resume=True, claim=claim)
    assert [m["reason"] for m in p.out()] == ["bad_sequence"]


def test_a_known_role_cannot_claim_a_state_its_session_never_reached() -> None:
    # what a proxy that sent this peer to another instance would look like
    _, s, _src, tgt = drive_to(State.RECORDING)
    tgt.reconnect()
    tgt.attach({"log": 2, "s2t": 1}, resume=True, claim=claim_of(State.DIFFING, Role.TARGET, log_end=1))
    assert s.state is State.FAILED and s.failure is Reason.BAD_SEQUENCE


def test_released_only_after_resumed_and_only_from_the_source() -> None:
    _, s, src, tgt = drive_to(State.VERIFIED)
    src.send("released")
    assert_failed(s, src, tgt, Reason.WRONG_STATE)
    _, s, src, tgt = drive_to(State.RESUMED)
    tgt.send("released")
    assert s.state is State.RESUMED and [m["reason"] for m in tgt.out()] == ["wrong_role"]


def test_each_sides_report_goes_to_the_other_and_is_given_again_on_attach() -> None:
    """Issue 12 item 5: the service relays each side's figures to the other, keeps them for a
    side that is away (the target leaves once released: it gets the source's first), takes the
    same report again as a no-op and refuses another one (in RESUMED: that connection only)."""
    _, s, src, tgt = drive_to(State.RESUMED)
    figures = {"replay_s": 2.5, "downtime_s": None}
    tgt.send("report", figures=figures)
    assert [m for m in src.out() if m["t"] == "report"] == [{"v": V, "t": "report", "figures": figures}]
    assert tgt.out() == []
    src.reconnect()
    src.attach({"t2s": 1}, resume=True, claim=claim_of(State.RESUMED, Role.SOURCE, nxt={Stream.LOG: 2},
                                                       acked={Stream.LOG: 1}, log_end=1, roots=ROOTS))
    assert [m["t"] for m in src.out()] == ["attached", "confirm", "report"]
    src.send("report", figures={"downtime_s": 1.25})
    src.send("released")
    assert [m["t"] for m in tgt.out()] == ["report", "released"]
    assert [m["t"] for m in src.out()] == ["released"]
    tgt.send("report", figures=figures)                              # again, after a reconnect: a no-op
    assert s.state is State.RESUMED and src.out() == [] and tgt.out() == []
    tgt.send("report", figures={"replay_s": 0.0})
    assert s.state is State.RESUMED and [m["reason"] for m in tgt.out()] == ["bad_sequence"]
    assert tgt.link.close_code is not None and src.link.close_code is None


# ---- fuzzing: only the project's own errors come out of the session message decoder -------------
# (the target and its seeds are in tests/sessionkit.py, where `make fuzz` finds them)
def _mutations() -> hs.SearchStrategy[bytes]:
    """Valid envelopes with a field dropped, added or replaced by any msgpack value, or re-typed."""
    values = hs.recursive(hs.none() | hs.booleans() | hs.integers(min_value=-(2**63), max_value=2**64 - 1)
                          | hs.floats() | hs.text(max_size=20) | hs.binary(max_size=40),
                          lambda inner: hs.lists(inner, max_size=4) | hs.dictionaries(hs.text(max_size=8), inner,
                                                                                      max_size=4), max_leaves=12)

    @hs.composite
    def mutated(draw: hs.DrawFn) -> bytes:
        msg = dict(draw(hs.sampled_from(FUZZ_TEMPLATES)))
        msg["v"] = draw(hs.sampled_from([V, V, V, 1, 3, "2", 2.0]))
        for _ in range(draw(hs.integers(1, 3))):
            if not msg:
                break
            how = draw(hs.sampled_from(["replace", "drop", "add", "nest"]))
            key = draw(hs.sampled_from(sorted(msg)))
            if how == "replace":
                msg[key] = draw(values)
            elif how == "drop":
                msg.pop(key)
            elif how == "add":
                msg[draw(hs.text(max_size=6))] = draw(values)
            elif isinstance(msg.get(key), dict) and msg[key]:
                inner = dict(msg[key])
                inner[draw(hs.sampled_from(sorted(inner, key=str)))] = draw(values)
                msg[key] = inner
        packed: bytes = msgpack.packb(msg, use_bin_type=draw(hs.booleans()))
        return packed

    return mutated()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutations())
def test_fuzz_mutated_envelopes(data: bytes) -> None:
    fuzz_session_message(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hs.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    fuzz_session_message(data)


def test_replayed_goes_to_the_source_once_per_new_frame_and_again_when_it_attaches() -> None:
    _, s, src, tgt = pair()
    for seq in (1, 2, 3):
        src.send("log", seq=seq, data=b"L")
    tgt.out()
    tgt.send("replayed", seq=2)
    assert [m for m in src.out() if m["t"] == "replayed"] == [{"v": V, "t": "replayed", "seq": 2}]
    tgt.send("replayed", seq=2)                 # again (after a reconnect): nothing new
    assert src.out() == []
    src.reconnect()
    src.attach(resume=True, claim=claim_of(State.RECORDING, Role.SOURCE, nxt={Stream.LOG: 4}))
    assert [m for m in src.out() if m["t"] == "replayed"] == [{"v": V, "t": "replayed", "seq": 2}]
    src.send("suspend")
    tgt.send("replayed", seq=3)
    assert [m["seq"] for m in src.out() if m["t"] == "replayed"] == [3]
    assert s.replayed == 3 and s.failure is None


@pytest.mark.parametrize(("seq", "what"), [(4, "the source sent log frames up to 3"), (1, "backwards")])
def test_replayed_beyond_what_the_source_sent_or_backwards_fails_the_session(seq: int, what: str,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    _, s, src, tgt = pair()
    for n in (1, 2, 3):
        src.send("log", seq=n, data=b"L")
    tgt.send("replayed", seq=2)
    src.out()
    tgt.out()
    with pytest.raises(SessionViolation, match=what):
        s.receive(Role.TARGET, {"v": V, "t": "replayed", "seq": seq}, 0.0)
    assert_failed(s, src, tgt, Reason.BAD_SEQUENCE)
    assert what in caplog.text
