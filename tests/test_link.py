"""One connection as the core sees it (server/link.py): session creation, refusals before the
attach, its bounded output queue and coalesced acks."""

from __future__ import annotations

import pytest
from sessionkit import BIG, KEYRING, SID, Peer, V, pair, registry

from server.keyring import CREATE, Credential, Grant
from server.limits import Limits
from server.link import CLOSE_NORMAL, CLOSE_POLICY, Link
from server.wire import Claim, Role, decode, encode

pytestmark = pytest.mark.timeout(30)


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
