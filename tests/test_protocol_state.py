"""differ.protocol._state: the transition tables are what the sides enforce. Every (state, message)
pair a table leaves out is refused with an error naming the state (the peer's fault:
ProtocolError); every local call it leaves out raises LocalProtocolError and changes nothing; the
README's diagrams are the tables'."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
from diffpair import PAGE, Pair, V, one, rand

from differ.protocol import FailCode, MsgType, PeerFailed, ProtocolParams, SourceState, TargetState
from differ.protocol._state import SOURCE, TARGET, Call, allowed, diagram
from differ.transfer import BlockingSource, BlockingTarget
from replay_migrate.errors import LocalProtocolError, ProtocolError, ReplayMigrateError

README = Path(__file__).resolve().parent.parent / "README.md"
MESSAGES = [t for t in MsgType if t is not MsgType.FRAG]  # fragments are framing (test_protocol_framing)


def pair() -> Pair:
    """A transfer of several batches, one at a time (window 1): every live state lasts a while."""
    b = rand(64 * PAGE)
    a = bytearray(b)
    for i in range(0, 64, 2):
        a[i * PAGE : (i + 1) * PAGE] = rand(PAGE, 1000 + i)
    return one(bytes(a), b, params=ProtocolParams(max_message_bytes=64 << 10, window=1, max_batch_entries=4))


def step_until(p: Pair, done: Callable[[], bool]) -> None:
    """Deliver one message at a time, target first, until ``done()``."""
    if p.target.state is TargetState.IDLE and not done():
        p.target.start()
    for _ in range(10_000):
        if done():
            return
        sent = p.target.data_to_send()
        for m in sent:
            p.source.receive_data(m)
            if done():
                return
        out = p.source.data_to_send()
        for m in out:
            p.target.receive_data(m)
            if done():
                return
        if not sent and not out:
            break
    assert done()


def source_in(state: SourceState) -> BlockingSource:
    p = pair()
    if state is SourceState.FAILED:
        p.source.abort()
    else:
        step_until(p, lambda: p.source.state is state)
    p.source.data_to_send()
    return p.source


def target_in(state: TargetState) -> BlockingTarget:
    p = pair()
    if state is TargetState.FAILED:
        p.target.abort()
    elif state is not TargetState.IDLE:
        step_until(p, lambda: p.target.state is state)
    p.target.data_to_send()
    return p.target


def bare(t: MsgType) -> bytes:
    return bytes(msgpack.packb({"t": str(t), "v": V}))


def refused() -> list[tuple[str, SourceState | TargetState, MsgType]]:
    return [("source", s, t) for s in SourceState for t in MESSAGES if t not in SOURCE[s]] + \
        [("target", s, t) for s in TargetState for t in MESSAGES if t not in TARGET[s]]


@pytest.mark.parametrize(("side", "state", "t"), refused(), ids=lambda v: getattr(v, "value", v))
def test_every_message_the_table_leaves_out_is_refused_naming_the_state(side: str, state: SourceState | TargetState,
                                                                         t: MsgType) -> None:
    ep = source_in(state) if isinstance(state, SourceState) else target_in(state)
    live = state not in (SourceState.VERIFIED, SourceState.FAILED, TargetState.VERIFIED, TargetState.FAILED)
    with pytest.raises(ProtocolError, match=f"\\({state.value}\\)$" if not live else f"state {state.value}$"):
        ep.receive_data(bare(t))
    if live:  # the side gives up and tells the peer why (its code only)
        assert ep.state.value == "failed"
        (failed,) = ep.data_to_send()
        assert msgpack.unpackb(failed) == {"t": "failed", "v": V, "c": int(FailCode.PROTOCOL)}
    else:  # a finished transfer stays finished
        assert ep.state is state and ep.data_to_send() == []


@pytest.mark.parametrize(("side", "state", "t"),
                         [("source", s, t) for s in SourceState for t in SOURCE[s] if isinstance(t, MsgType)]
                         + [("target", s, t) for s in TargetState for t in TARGET[s] if isinstance(t, MsgType)],
                         ids=lambda v: getattr(v, "value", v))
def test_every_message_the_table_allows_gets_past_the_guard(side: str, state: SourceState | TargetState,
                                                            t: MsgType) -> None:
    """An empty message of an allowed type fails on its fields, never on the state."""
    ep = source_in(state) if isinstance(state, SourceState) else target_in(state)
    try:
        events = ep.receive_data(bare(t))
    except ReplayMigrateError as e:
        assert "not allowed" not in str(e) and "message field" in str(e)
    else:
        assert t is MsgType.VERIFIED and events  # the one message without fields


def local_calls(ep: BlockingSource | BlockingTarget) -> dict[Call, Callable[[], None]]:
    if isinstance(ep, BlockingSource):
        return {Call.RESUME: lambda: ep.resume(0)}
    return {Call.START: ep.start, Call.RESUME: ep.resume}


@pytest.mark.parametrize("state", [*SourceState, *TargetState], ids=lambda s: f"{type(s).__name__}.{s.value}")
def test_every_local_call_the_table_leaves_out_raises_local_protocol_error(state: SourceState | TargetState) -> None:
    ep = source_in(state) if isinstance(state, SourceState) else target_in(state)
    table = SOURCE if isinstance(state, SourceState) else TARGET
    calls = local_calls(ep)
    for call, do in calls.items():
        if call in table[state]:  # type: ignore[index]
            continue
        with pytest.raises(LocalProtocolError, match=re.escape(f"{call.value} not allowed in state {state.value}")):
            do()
        assert ep.state is state and ep.data_to_send() == []  # refused: nothing changed, nothing sent


def test_abort_fails_every_live_state_and_does_nothing_after_the_end() -> None:
    for state in TargetState:
        ep = target_in(state)
        ep.abort()
        if state in (TargetState.VERIFIED, TargetState.FAILED):
            assert ep.state is state and ep.data_to_send() == []
        else:
            assert ep.state is TargetState.FAILED
            assert [msgpack.unpackb(m)["t"] for m in ep.data_to_send()] == ["failed"]


def test_message_in_wrong_state() -> None:
    pair = one(rand(4 * PAGE), rand(4 * PAGE))
    pair.target.start()
    blocks = msgpack.packb({"t": "blocks", "v": V, "n": 0, "o": 0, "k": b"\x02", "h": b"", "dm": b"", "r": b""})
    with pytest.raises(ProtocolError, match="blocks message not allowed in state hello_sent"):
        pair.target.receive_data(blocks)
    assert pair.target.state is TargetState.FAILED and pair.sinks["disk"].aborted
    failed = pair.target.data_to_send()
    assert [msgpack.unpackb(m)["t"] for m in failed] == ["failed"]
    # the source hears about it
    events = pair.source.receive_data(failed[0])
    assert events == [PeerFailed(FailCode.PROTOCOL)] and pair.source.state is SourceState.FAILED

    src = one(rand(4 * PAGE), rand(4 * PAGE)).source
    with pytest.raises(ProtocolError):
        src.receive_data(msgpack.packb({"t": "want", "v": V, "p": [None]}))
    assert src.state is SourceState.FAILED


def test_finished_transfer_stays_verified() -> None:
    a = rand(4 * PAGE)
    pair = one(a, rand(4 * PAGE))
    pair.run()
    with pytest.raises(ProtocolError):
        pair.target.receive_data(msgpack.packb({"t": "end", "v": V, "n": 0}))
    assert pair.target.state is TargetState.VERIFIED and pair.data() == a


def test_the_guard_tells_whose_fault_it_is() -> None:
    with pytest.raises(ProtocolError, match="tree message not allowed in state idle"):
        allowed(SOURCE, SourceState.IDLE, MsgType.TREE, "source")
    with pytest.raises(LocalProtocolError, match="target: start\\(\\) not allowed in state walking"):
        allowed(TARGET, TargetState.WALKING, Call.START, "target")
    assert allowed(TARGET, TargetState.WALKING, MsgType.WALK, "target") == frozenset(
        {TargetState.WALKING, TargetState.RECEIVING})


def test_failure_leads_to_failed_from_every_live_state_and_nothing_leaves_the_end() -> None:
    for s, row in SOURCE.items():
        live = s not in (SourceState.VERIFIED, SourceState.FAILED)
        assert (row[MsgType.FAILED] == row[Call.ABORT] == frozenset({SourceState.FAILED})) if live else row == {}
    for t, trow in TARGET.items():
        live = t not in (TargetState.VERIFIED, TargetState.FAILED)
        assert (trow[MsgType.FAILED] == trow[Call.ABORT] == frozenset({TargetState.FAILED})) if live else trow == {}


@pytest.mark.parametrize(("table", "title"), [(SOURCE, "diff source"), (TARGET, "diff target")])
def test_the_readme_shows_the_tables(table: object, title: str) -> None:
    text = diagram(table, title)  # type: ignore[arg-type]
    assert text in README.read_text(), f"README.md: paste differ.protocol._state.diagram(..., {title!r})"
    assert "    idle --> " in text and "verified --> [*]" in text
