"""The handoff service's sans-I/O core: state machine, roles, sequencing, resume, limits, registry."""

from __future__ import annotations

import logging
from typing import Any

import msgpack
import pytest

from replay_migrate.errors import ProtocolError
from server.session import (
    CLOSE_POLICY,
    CLOSE_SUPERSEDED,
    Limits,
    Link,
    Reason,
    Role,
    Session,
    SessionRegistry,
    State,
    Stream,
    decode,
    encode,
)

pytestmark = pytest.mark.timeout(30)

SID = "mig-1"
ROOTS = {"memory": b"\x01" * 32, "disk": b"\x02" * 32}
BIG = 1 << 30


class Peer:
    """A fake connection: sends encoded messages into a Link and decodes what the core queues."""

    def __init__(self, reg: SessionRegistry, role: Role, sid: str = SID) -> None:
        self.reg, self.role, self.sid = reg, role, sid
        self.link = Link(reg, sid, 0.0)

    def send(self, t: str, now: float = 0.0, **fields: Any) -> None:
        self.link.receive(encode(t, **fields), now)

    def attach(self, resume_from: dict[str, int] | None = None, resume: bool = False, now: float = 0.0) -> None:
        if resume_from is None:
            resume_from = {s.value: 1 for s in self.role.receives}
        self.send("attach", now, role=self.role.value, session=self.sid, resume_from=resume_from, resume=resume)

    def reconnect(self, now: float = 0.0) -> None:
        self.link.connection_lost(now)
        self.link = Link(self.reg, self.sid, now)

    def out(self) -> list[dict[str, Any]]:
        return [decode(m, BIG) for m in self.link.data_to_send()]

    def types(self) -> list[str]:
        return [m["t"] for m in self.out()]


def pair(limits: Limits | None = None) -> tuple[SessionRegistry, Session, Peer, Peer]:
    reg = SessionRegistry(limits)
    src, tgt = Peer(reg, Role.SOURCE), Peer(reg, Role.TARGET)
    src.attach()
    tgt.attach()
    src.out()
    tgt.out()
    session = reg.lookup(SID)
    assert session is not None
    return reg, session, src, tgt


def drive_to(state: State, *, log_ended: bool = True) -> tuple[SessionRegistry, Session, Peer, Peer]:
    """A session in ``state`` with one log frame relayed and acked (and the log ended if asked)."""
    reg, s, src, tgt = pair()
    src.send("log", seq=1, data=b"L1")
    tgt.send("ack", stream="log", seq=1)
    if state is not State.RECORDING:
        if log_ended:
            src.send("log_end", seq=1)
        src.send("suspend")
    if state in (State.DIFFING, State.TRANSFERRING, State.VERIFIED, State.RESUMED):
        tgt.send("phase", phase="diffing")
    if state in (State.TRANSFERRING, State.VERIFIED, State.RESUMED):
        tgt.send("phase", phase="transferring")
    if state in (State.VERIFIED, State.RESUMED):
        tgt.send("verified", roots=ROOTS)
    if state is State.RESUMED:
        tgt.send("resumed")
    assert s.state is state
    src.out()
    tgt.out()
    return reg, s, src, tgt


def st(s: Session) -> State:
    """The state, un-narrowed (the session changes it behind mypy's back)."""
    return s.state


def assert_failed(s: Session, src: Peer, tgt: Peer, reason: Reason) -> None:
    assert s.state is State.FAILED and s.failure is reason
    for peer, keep in ((src, True), (tgt, False)):
        errors = [m for m in peer.out() if m["t"] == "error"]
        assert errors == [{"v": 1, "t": "error", "code": reason.code, "reason": reason.value, "keep_vm": keep}]
        assert peer.link.close_code is not None


# ---- happy path -----------------------------------------------------------------------------------
def test_happy_path(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    reg = SessionRegistry()
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
    assert s is not None and s.buffered(Stream.LOG) == len(b"frame1") * 3

    tgt.send("ack", stream="log", seq=3)
    assert src.out() == [{"v": 1, "t": "ack", "stream": "log", "seq": 3}]
    assert s.buffered(Stream.LOG) == 0
    src.send("log_end", seq=3)
    assert tgt.out() == [{"v": 1, "t": "log_end", "seq": 3}]
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
    assert {"v": 1, "t": "verified", "roots": ROOTS} in src_msgs
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
        s.receive(Role.TARGET, {"v": 1, "t": "resumed"}, 0.0)
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
    assert src.out() == [{"v": 1, "t": "error", "code": 409, "reason": "wrong_state", "keep_vm": False}]
    assert src.link.close_code == CLOSE_POLICY


def test_abort_fails_and_tells_the_source_to_keep_its_vm() -> None:
    _, s, src, tgt = drive_to(State.TRANSFERRING)
    tgt.send("abort", reason="verify_failed")
    assert_failed(s, src, tgt, Reason.VERIFY_FAILED)
    # a late re-attach learns the same
    src2 = Peer(src.reg, Role.SOURCE)
    src2.attach(resume=True)
    assert src2.out() == [{"v": 1, "t": "error", "code": 499, "reason": "verify_failed", "keep_vm": True}]


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
    src.link.receive(msgpack.packb({"v": 2, "t": "suspend"}), 0.0)
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
    assert src.out() == [{"v": 1, "t": "ack", "stream": "log", "seq": 4}]   # resume_from acked 3..4
    assert s.buffered(Stream.LOG) == 6
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
    tgt.link = Link(reg, SID, 0.0)                     # the service did not notice the drop yet
    tgt.attach({"log": 1, "s2t": 1}, resume=True)
    assert old.close_code == CLOSE_SUPERSEDED
    assert [decode(m, BIG).get("reason") for m in old.data_to_send()] == [None, "superseded"]  # log 1, error
    assert [m["t"] for m in tgt.out()] == ["attached", "log"]
    old.receive(encode("ack", stream="log", seq=1), 0.0)   # the old connection can do nothing any more
    assert s.acked(Stream.LOG) == 0 and s.state is State.RECORDING


# ---- limits ---------------------------------------------------------------------------------------
def test_buffer_limit() -> None:
    limits = Limits(max_message_size=1024, max_buffered_bytes=2048)
    _, s, src, tgt = pair(limits)
    src.send("log", seq=1, data=b"a" * 700)
    src.send("log", seq=2, data=b"b" * 700)
    tgt.send("ack", stream="log", seq=1)               # acks make room
    src.send("log", seq=3, data=b"c" * 700)
    assert s.buffered(Stream.LOG) == 1400 and s.state is State.RECORDING
    src.send("log", seq=4, data=b"d" * 700)            # 2100 > 2048: the sender ignored the window
    assert_failed(s, src, tgt, Reason.BUFFER_FULL)
    assert s.buffered(Stream.LOG) == 0


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_buffered_bytes"):
        Limits(max_message_size=4096, max_buffered_bytes=1024)


def test_idle_timeout_fails_and_finished_sessions_expire() -> None:
    limits = Limits(idle_timeout=10.0, finished_ttl=5.0)
    reg, s, src, tgt = pair(limits)
    tgt.reconnect(now=1.0)
    assert reg.expire(10.5) == [] and s.state is State.RECORDING
    reg.expire(11.0)
    assert st(s) is State.FAILED and s.failure is Reason.IDLE_TIMEOUT
    assert src.out() == [{"v": 1, "t": "error", "code": 408, "reason": "idle_timeout", "keep_vm": True}]
    assert reg.expire(15.9) == [] and SID in reg
    assert reg.expire(16.0) == [SID] and len(reg) == 0
    late = Peer(reg, Role.SOURCE)
    late.attach(resume=True)                           # never re-created by a resume
    assert late.out() == [{"v": 1, "t": "error", "code": 404, "reason": "unknown_session", "keep_vm": True}]
    assert len(reg) == 0


def test_a_peer_that_never_comes_times_out() -> None:
    reg = SessionRegistry(Limits(idle_timeout=3.0))
    src = Peer(reg, Role.SOURCE)
    src.attach()
    reg.expire(3.0)
    assert [m["reason"] for m in src.out() if m["t"] == "error"] == ["idle_timeout"]


def test_max_sessions_and_eviction_of_finished_ones() -> None:
    reg = SessionRegistry(Limits(max_sessions=1))
    a = Peer(reg, Role.SOURCE, "a")
    a.attach()
    b = Peer(reg, Role.SOURCE, "b")
    b.attach()
    assert b.out() == [{"v": 1, "t": "error", "code": 503, "reason": "session_limit", "keep_vm": True}]
    assert reg.ids() == ["a"]
    a.send("abort", reason="cancelled")                # finished sessions make room
    c = Peer(reg, Role.TARGET, "c")
    c.attach()
    assert c.types() == ["attached"] and reg.ids() == ["c"]


def test_pre_attach_refusals_create_nothing() -> None:
    reg = SessionRegistry()
    p = Peer(reg, Role.SOURCE)
    p.send("log", seq=1, data=b"x")
    assert [m["reason"] for m in p.out()] == ["not_attached"] and p.link.close_code == CLOSE_POLICY
    p = Peer(reg, Role.TARGET)
    p.send("attach", role="target", session="other", resume_from={"log": 1, "s2t": 1}, resume=False)
    assert [m["reason"] for m in p.out()] == ["bad_message"]
    p = Peer(reg, Role.TARGET)
    p.attach({"log": 1})
    assert [m["reason"] for m in p.out()] == ["bad_message"]
    p = Peer(reg, Role.TARGET)
    p.link.receive(b"garbage", 0.0)
    assert [m["reason"] for m in p.out()] == ["bad_message"]
    assert len(reg) == 0


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
    assert again.out() == [{"v": 1, "t": "error", "code": 499, "reason": "cancelled", "keep_vm": True}]
