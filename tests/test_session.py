"""The handoff service's sans-I/O core: credentials, state machine, roles, sequencing, resume,
re-creation after a restart, limits, registry; and the fuzz target for its message decoder."""

from __future__ import annotations

import logging
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from replay_migrate.errors import ProtocolError
from server.keyring import CREATE, Credential, Grant, Keyring
from server.limits import Limits, MiB
from server.link import CLOSE_NORMAL, CLOSE_POLICY, CLOSE_SUPERSEDED, Link
from server.registry import SessionRegistry
from server.session import Session
from server.wire import FRAME_COST, PROTOCOL_VERSION, Claim, Reason, Role, State, Stream, decode, encode

pytestmark = pytest.mark.timeout(30)

SID = "mig-1"
ROOTS = {"memory": b"\x01" * 32, "disk": b"\x02" * 32}
BIG = 1 << 30
V = PROTOCOL_VERSION
KEYRING = Keyring(b"k" * 32, "the-token")


def registry(limits: Limits | None = None) -> SessionRegistry:
    return SessionRegistry(KEYRING, limits)


class Peer:
    """A fake connection: sends encoded messages into a Link and decodes what the core queues."""

    def __init__(self, reg: SessionRegistry, role: Role, sid: str = SID) -> None:
        self.reg, self.role, self.sid = reg, role, sid
        self.link = Link(reg, Grant(sid, role), 0.0)

    def send(self, t: str, now: float = 0.0, **fields: Any) -> None:
        self.link.receive(encode(t, **fields), now)

    def attach(self, resume_from: dict[str, int] | None = None, resume: bool = False, now: float = 0.0,
               claim: Claim | None = None) -> None:
        if resume_from is None:
            resume_from = {s.value: 1 for s in self.role.receives}
        claim = claim if claim is not None else Claim.initial(self.role)
        self.send("attach", now, role=self.role.value, session=self.sid, resume_from=resume_from, resume=resume,
                  claim=claim.to_wire())

    def reconnect(self, now: float = 0.0) -> None:
        self.link.connection_lost(now)
        self.link = Link(self.reg, Grant(self.sid, self.role), now)

    def out(self) -> list[dict[str, Any]]:
        return [decode(m, BIG) for m in self.link.data_to_send()]

    def types(self) -> list[str]:
        return [m["t"] for m in self.out()]


def pair(limits: Limits | None = None) -> tuple[SessionRegistry, Session, Peer, Peer]:
    reg = registry(limits)
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
        assert errors == [{"v": V, "t": "error", "code": reason.code, "reason": reason.value, "keep_vm": keep}]
        assert peer.link.close_code is not None


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


# ---- limits ---------------------------------------------------------------------------------------
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


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_buffered_bytes"):
        Limits(max_message_size=4096, max_buffered_bytes=1024)


def test_idle_timeout_fails_and_a_failed_session_is_remembered_for_finished_ttl() -> None:
    limits = Limits(idle_timeout=10.0, finished_ttl=5.0)
    reg, s, src, tgt = pair(limits)
    tgt.reconnect(now=1.0)
    assert reg.expire(10.5) == [] and s.state is State.RECORDING
    assert reg.expire(11.0) == [SID] and len(reg) == 0        # failed, and nobody is attached any more
    assert st(s) is State.FAILED and s.failure is Reason.IDLE_TIMEOUT
    assert src.out() == [{"v": V, "t": "error", "code": 408, "reason": "idle_timeout", "keep_vm": True}]
    late = Peer(reg, Role.TARGET)
    late.attach(resume=True, now=15.9)                          # the tombstone answers
    assert late.out() == [{"v": V, "t": "error", "code": 408, "reason": "idle_timeout", "keep_vm": False}]
    reg.expire(16.0)
    later = Peer(reg, Role.TARGET)                              # forgotten: re-created from its claim
    later.attach(resume=True, now=16.0)
    assert later.types() == ["attached"] and SID in reg


def test_a_peer_that_never_comes_times_out() -> None:
    reg = registry(Limits(idle_timeout=3.0))
    src = Peer(reg, Role.SOURCE)
    src.attach()
    reg.expire(3.0)
    assert [m["reason"] for m in src.out() if m["t"] == "error"] == ["idle_timeout"]


def test_max_sessions_and_prompt_release_of_slots() -> None:
    reg = registry(Limits(max_sessions=1))
    a = Peer(reg, Role.SOURCE, "a")
    a.attach()
    b = Peer(reg, Role.SOURCE, "b")
    b.attach()
    assert b.out() == [{"v": V, "t": "error", "code": 503, "reason": "session_limit", "keep_vm": True}]
    assert reg.ids() == ["a"]
    a.reconnect(now=1.0)                               # its only peer left: the slot is free at once
    assert reg.ids() == []
    c = Peer(reg, Role.TARGET, "c")
    c.attach(now=1.0)
    assert c.types() == ["attached"] and reg.ids() == ["c"]
    c.send("abort", reason="cancelled")                # failed: refused and released on the next tick
    reg.expire(1.0)
    d = Peer(reg, Role.TARGET, "d")
    d.attach(now=1.0)
    assert d.types() == ["attached"] and reg.ids() == ["d"]


def test_pre_attach_refusals_create_nothing() -> None:
    reg = registry()
    p = Peer(reg, Role.SOURCE)
    p.send("log", seq=1, data=b"x")
    assert [m["reason"] for m in p.out()] == ["not_attached"] and p.link.close_code == CLOSE_POLICY
    p = Peer(reg, Role.TARGET)
    p.send("attach", role="target", session="other", resume_from={"log": 1, "s2t": 1}, resume=False,
           claim=Claim.initial(Role.TARGET).to_wire())
    assert [m["reason"] for m in p.out()] == ["wrong_role"]        # not the session its credential names
    p = Peer(reg, Role.TARGET)
    p.send("attach", role="source", session=SID, resume_from={"t2s": 1}, resume=False,
           claim=Claim.initial(Role.SOURCE).to_wire())
    assert [m["reason"] for m in p.out()] == ["wrong_role"]        # not the role its credential names
    p = Peer(reg, Role.TARGET)
    p.attach({"log": 1})
    assert [m["reason"] for m in p.out()] == ["bad_message"]
    p = Peer(reg, Role.TARGET)
    p.attach(claim=Claim.initial(Role.SOURCE))
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
    assert again.out() == [{"v": V, "t": "error", "code": 499, "reason": "cancelled", "keep_vm": True}]


# ---- credentials ----------------------------------------------------------------------------------
def test_credentials_are_derived_from_the_key_and_checked_per_session_and_role() -> None:
    src, tgt = KEYRING.new_session(b"\x07" * 16)
    assert src.session == tgt.session and len(src.session) == 22 and (src.role, tgt.role) == (Role.SOURCE, Role.TARGET)
    assert src.secret != tgt.secret and len(src.secret) == 32
    assert Credential.parse(f"  {src}\n") == src and str(src).startswith(f"rm1.{src.session}.source.")
    assert src.secret.hex() not in repr(src) and str(src).split(".")[-1] not in repr(src)
    other_key = Keyring(b"K" * 32, "the-token")
    assert other_key.credential(src.session, Role.SOURCE) != src          # the key is what makes it
    path = f"/sessions/{src.session}"
    assert KEYRING.authorize(path, f"Bearer {src}") == Grant(src.session, Role.SOURCE)
    assert KEYRING.authorize(path, f"bearer {tgt}") == Grant(src.session, Role.TARGET)
    forged = Credential(src.session, Role.TARGET, bytes(32))
    elsewhere = KEYRING.credential("someone-else", Role.SOURCE)
    for header in (f"Bearer {forged}", "Bearer the-token", f"Bearer {elsewhere}", f"Basic {src}", str(src), "",
                   "Bearer ", f"Bearer {str(src)[:-1]}", f"Bearer {src}x", "Bearer \udcff\ud800"):
        assert KEYRING.authorize(path, header) is None, header
    assert KEYRING.authorize("/sessions", "Bearer the-token") == CREATE
    for header in (f"Bearer {src}", "Bearer the-token2", "Bearer \ud800"):
        assert KEYRING.authorize("/sessions", header) is None, header
    assert Keyring(b"k" * 32, None).authorize("/sessions", "Bearer the-token") is None
    with pytest.raises(ValueError, match="at least 32"):
        Keyring(b"short", "t")


def test_create_returns_a_fresh_id_and_both_credentials_and_stores_nothing() -> None:
    reg = registry()
    made = []
    for _ in range(2):
        link = Link(reg, CREATE, 0.0)
        link.receive(encode("create"), 0.0)
        [created] = [decode(m, BIG) for m in link.data_to_send()]
        assert created["t"] == "created" and link.close_code == CLOSE_NORMAL
        src, tgt = Credential.parse(created["source"]), Credential.parse(created["target"])
        assert src is not None and tgt is not None and src.session == tgt.session == created["session"]
        assert KEYRING.authorize(f"/sessions/{src.session}", f"Bearer {src}") == Grant(src.session, Role.SOURCE)
        made.append(src.session)
    assert made[0] != made[1] and len(reg) == 0
    # the creation path does nothing else: an attach there is refused and touches no session
    link = Link(reg, CREATE, 0.0)
    link.receive(encode("attach", role="target", session=made[0], resume_from={"log": 1, "s2t": 1}, resume=True,
                        claim=Claim.initial(Role.TARGET).to_wire()), 0.0)
    assert [decode(m, BIG)["reason"] for m in link.data_to_send()] == ["not_attached"] and len(reg) == 0


# ---- a service that dies: the session re-created from what the peers say ------------------------
def claim_of(state: State, role: Role, *, nxt: dict[Stream, int] | None = None, acked: dict[Stream, int] | None = None,
             log_end: int | None = None, roots: dict[str, bytes] | None = None) -> Claim:
    base = Claim.initial(role)
    return Claim(state, {**base.next, **(nxt or {})}, {**base.acked, **(acked or {})}, log_end, roots)


def test_a_vacant_session_is_dropped_and_its_peers_re_create_it() -> None:
    reg, s, src, tgt = pair()
    for seq in (1, 2, 3):
        src.send("log", seq=seq, data=b"f%d" % seq)
    assert [m["seq"] for m in tgt.out()] == [1, 2, 3]
    tgt.send("ack", stream="log", seq=1)               # the ack reaches the service, not the source
    src.reconnect()
    tgt.reconnect()
    assert len(reg) == 0                               # nobody attached: the slot is free, nothing kept
    # the target had consumed 1..2 and received 3; the source saw nothing acked
    tgt.attach({"log": 4, "s2t": 1}, resume=True)
    assert tgt.types() == ["attached"]
    src.attach({"t2s": 1}, resume=True, claim=claim_of(State.RECORDING, Role.SOURCE, nxt={Stream.LOG: 4}))
    [att] = src.out()                                  # acked 3: the source may forget 1..3
    assert att["next"] == {"log": 4, "s2t": 1} and att["acked"] == {"log": 3, "s2t": 0}
    s2 = reg.lookup(SID)
    assert s2 is not None and s2 is not s and s2.restored
    src.send("log", seq=3, data=b"f3")                 # a resend the client would not make: a duplicate
    src.send("log", seq=4, data=b"f4")
    assert [(m["t"], m["seq"]) for m in tgt.out()] == [("log", 4)]


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
    assert s.state is State.RESUMED
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
    assert s.state is State.FAILED and s.failure is Reason.BAD_SEQUENCE


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


def test_a_resumed_session_confirms_a_late_source_from_its_tombstone_or_the_targets_claim() -> None:
    reg, _s, src, tgt = drive_to(State.RESUMED)
    tgt.reconnect()
    src.reconnect()                                      # the source missed the confirm: both gone
    assert len(reg) == 0
    late = Peer(reg, Role.SOURCE)
    late.attach({"t2s": 1}, resume=True, claim=claim_of(State.VERIFIED, Role.SOURCE, nxt={Stream.LOG: 2},
                                                         acked={Stream.LOG: 1}, log_end=1, roots=ROOTS))
    assert late.types() == ["attached", "confirm"]
    # after a restart there is no tombstone: the target, still attached until released, says so
    reg2 = registry()
    src2, tgt2 = Peer(reg2, Role.SOURCE), Peer(reg2, Role.TARGET)
    src2.attach({"t2s": 1}, resume=True, claim=claim_of(State.VERIFIED, Role.SOURCE, nxt={Stream.LOG: 2},
                                                         acked={Stream.LOG: 1}, log_end=1, roots=ROOTS))
    assert [m["t"] for m in src2.out()] == ["attached"]
    tgt2.attach({"log": 2, "s2t": 1}, resume=True, claim=claim_of(State.RESUMED, Role.TARGET, log_end=1,
                                                                    roots=ROOTS))
    assert [m["t"] for m in src2.out()] == ["state", "confirm"]
    src2.send("released")
    assert [m["t"] for m in tgt2.out()] == ["attached", "log_end", "released"]
    assert [m["t"] for m in src2.out()] == ["released"]
    src2.send("abort", reason="cancelled")              # too late: the target runs
    restored = reg2.lookup(SID)
    assert restored is not None and restored.state is State.RESUMED


def test_released_only_after_resumed_and_only_from_the_source() -> None:
    _, s, src, tgt = drive_to(State.VERIFIED)
    src.send("released")
    assert_failed(s, src, tgt, Reason.WRONG_STATE)
    _, s, src, tgt = drive_to(State.RESUMED)
    tgt.send("released")
    assert s.state is State.RESUMED and [m["reason"] for m in tgt.out()] == ["wrong_role"]


# ---- limits ---------------------------------------------------------------------------------------
def test_the_worst_case_memory_counts_every_queue_and_fits_the_budget() -> None:
    d = Limits()
    per_connection = (d.max_queue + 1) * d.max_message_size + 256 * 1024 \
        + d.max_outgoing_bytes + d.max_message_size + d.write_limit
    assert d.connection_memory == per_connection
    assert d.worst_case_memory == (d.max_sessions * 3 * d.max_buffered_bytes + d.max_connections * per_connection
                                   + 2 * d.max_message_size + d.max_tombstones * 512)
    assert d.worst_case_memory <= d.memory_budget == 512 * MiB
    assert d.worst_case_memory == 444 * MiB                      # what the README states
    with pytest.raises(ValueError, match="memory_budget"):
        Limits(max_connections=64)
    with pytest.raises(ValueError, match="max_connections_per_address"):
        Limits(max_connections=4, max_connections_per_address=5)
    with pytest.raises(ValueError, match="max_queue"):
        Limits(max_queue=0)
    assert Limits(max_connections=64, memory_budget=2048 * MiB).max_connections == 64


def test_a_slow_reader_gets_frames_in_order_through_a_bounded_queue() -> None:
    limits = Limits(max_message_size=4096, max_buffered_bytes=64 * 1024, max_outgoing_bytes=8192)
    reg, s, src, tgt = pair(limits)
    for seq in range(1, 21):
        src.send("log", seq=seq, data=bytes([seq]) * 1000)
    src.send("log_end", seq=20)
    src.send("suspend")
    src.send("diff", dir="s2t", seq=1, data=b"d" * 1000)
    assert tgt.link.queued_frame_bytes <= 8192 < 20 * 1000          # the rest waits in the stream's buffer
    assert reg.memory_in_use() == s.buffered_total + tgt.link.queued_frame_bytes
    got = []
    while (msg := tgt.link.next_message()) is not None:
        assert tgt.link.queued_frame_bytes <= 8192
        got.append(decode(msg, BIG))
    kinds = [(m["t"], m.get("seq")) for m in got if m["t"] != "state"]
    assert kinds == [("log", i) for i in range(1, 21)] + [("log_end", 20), ("diff", 1)]


def test_acks_to_a_peer_that_does_not_read_do_not_pile_up() -> None:
    _, _, src, tgt = pair()
    for seq in range(1, 1001):
        src.send("log", seq=seq, data=b"")
        tgt.link.data_to_send()
        tgt.send("ack", stream="log", seq=seq)
    assert src.out() == [{"v": V, "t": "ack", "stream": "log", "seq": 1000}]


def test_empty_frames_count_against_the_window() -> None:
    limits = Limits(max_message_size=1024, max_buffered_bytes=1024 + FRAME_COST)
    _, s, src, tgt = pair(limits)
    for seq in range(1, 18):
        src.send("log", seq=seq, data=b"")
    assert s.buffered(Stream.LOG) == 17 * FRAME_COST and s.state is State.RECORDING
    src.send("log", seq=18, data=b"")
    assert_failed(s, src, tgt, Reason.BUFFER_FULL)


def test_the_cores_queues_stay_within_their_share_of_the_budget() -> None:
    limits = Limits(max_message_size=4096, max_buffered_bytes=16 * 1024, max_outgoing_bytes=8192, max_sessions=3)
    reg = registry(limits)
    peers = []
    for i in range(5):                                   # two more sessions than allowed
        src, tgt = Peer(reg, Role.SOURCE, f"s{i}"), Peer(reg, Role.TARGET, f"s{i}")
        src.attach()
        tgt.attach()
        peers.append((src, tgt))
    seq = 1
    for _ in range(10):                                  # senders that respect the window, readers that never read
        for src, _tgt in peers:
            src.send("log", seq=seq, data=b"x" * 4000)
        seq += 1
        bound = (limits.max_sessions * 3 * limits.max_buffered_bytes
                 + 2 * limits.max_sessions * (limits.max_outgoing_bytes + 4096))
        assert reg.memory_in_use() <= bound
    assert len(reg) == 3


# ---- fuzzing: only the project's own errors come out of the session message decoder -------------
_FUZZ_LIMIT = 1 << 16
_FUZZ_TEMPLATES: list[dict[str, Any]] = [
    {"t": "create"},
    {"t": "attach", "role": "target", "session": SID, "resume_from": {"log": 1, "s2t": 1}, "resume": True,
     "claim": Claim.initial(Role.TARGET).to_wire()},
    {"t": "log", "seq": 1, "data": b"x"}, {"t": "log_end", "seq": 0}, {"t": "suspend"},
    {"t": "diff", "dir": "s2t", "seq": 1, "data": b""}, {"t": "ack", "stream": "log", "seq": 1},
    {"t": "phase", "phase": "diffing"}, {"t": "verified", "roots": ROOTS}, {"t": "resumed"}, {"t": "released"},
    {"t": "abort", "reason": "cancelled"},
    {"t": "attached", "session": SID, "state": "recording", "next": {"log": 1}, "acked": {"log": 0}, "window": 1,
     "max_message": 1, "log_end": None, "roots": None},
    {"t": "created", "session": SID, "source": str(KEYRING.credential(SID, Role.SOURCE)),
     "target": str(KEYRING.credential(SID, Role.TARGET))},
    {"t": "error", "code": 400, "reason": "bad_message", "keep_vm": True}, {"t": "confirm"},
    {"t": "state", "state": "failed"},
]

FUZZ_SEEDS: list[bytes] = [encode(str(t["t"]), **{k: v for k, v in t.items() if k != "t"}) for t in _FUZZ_TEMPLATES]
"""Valid messages of every type, for ``make fuzz`` to mutate."""


def fuzz_session_message(data: bytes) -> None:
    """The fuzz target (``make fuzz``): ``data`` as a message to the decoder, to a service
    connection that created a session, to one attached to a session in every state, and to both
    clients.  Anything but a ReplayMigrateError escaping is a failure; the core never raises."""
    from replay_migrate.errors import ReplayMigrateError
    from server.clientcore import ClientState

    try:
        decode(data, _FUZZ_LIMIT)
    except ReplayMigrateError:
        pass
    reg = registry(Limits(max_message_size=_FUZZ_LIMIT, max_buffered_bytes=4 * _FUZZ_LIMIT))
    Link(reg, CREATE, 0.0).receive(data, 0.0)
    Link(reg, Grant(SID, Role.TARGET), 0.0).receive(data, 0.0)
    for state in (State.RECORDING, State.TRANSFERRING, State.RESUMED):
        _, _, src, tgt = drive_to(state)
        src.link.receive(data, 0.0)
        tgt.link.receive(data, 0.0)
        src.link.data_to_send()
        tgt.link.data_to_send()
    for role in Role:
        client = ClientState(role, SID)
        client.attach_message()
        try:
            client.receive(encode("attached", session=SID, state="recording",
                                  next={s.value: 1 for s in role.sends}, acked={s.value: 0 for s in role.sends},
                                  window=1 << 20, max_message=1 << 20, log_end=None, roots=None))
            client.receive(data)
        except ReplayMigrateError:
            pass


def _mutations() -> hs.SearchStrategy[bytes]:
    """Valid envelopes with a field dropped, added or replaced by any msgpack value, or re-typed."""
    values = hs.recursive(hs.none() | hs.booleans() | hs.integers(min_value=-(2**63), max_value=2**64 - 1)
                          | hs.floats() | hs.text(max_size=20) | hs.binary(max_size=40),
                          lambda inner: hs.lists(inner, max_size=4) | hs.dictionaries(hs.text(max_size=8), inner,
                                                                                      max_size=4), max_leaves=12)

    @hs.composite
    def mutated(draw: hs.DrawFn) -> bytes:
        msg = dict(draw(hs.sampled_from(_FUZZ_TEMPLATES)))
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
