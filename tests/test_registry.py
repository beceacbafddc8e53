"""The sessions a service holds (server/registry.py): idle timeouts, tombstones, max_sessions and
prompt release of a slot, vacant sessions dropped and re-created from their peers' claims, the
core's queues within their share of the memory budget."""

from __future__ import annotations

import pytest
from sessionkit import ROOTS, SID, Peer, V, claim_of, drive_to, pair, registry, st

from server.limits import Limits
from server.wire import Reason, Role, State, Stream

pytestmark = pytest.mark.timeout(30)


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
