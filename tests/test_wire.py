"""The session protocol on the wire (server/wire.py): every message type round-trips through its
schema, and everything else is refused with the reason the peer will see; the claim, the frame
envelope, the reasons' codes and the order of states."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from sessionkit import FUZZ_TEMPLATES, ROOTS, SID

from replay_migrate.errors import ProtocolError
from server.wire import (
    HAPPY_PATH,
    MAX_FIGURE_ENTRIES,
    MAX_FIGURE_NAME,
    MAX_FIGURE_TEXT,
    MAX_FIGURES,
    MAX_REPORT_MESSAGE,
    MAX_ROOT_BYTES,
    MAX_ROOT_NAME,
    MAX_ROOTS,
    MESSAGE_TYPES,
    PEER_REASONS,
    PROTOCOL_VERSION,
    Claim,
    Reason,
    Role,
    SessionViolation,
    State,
    Stream,
    decode,
    encode,
    error_message,
    frame_message,
    state_reached,
    valid_figures,
    valid_roots,
)

pytestmark = pytest.mark.timeout(30)

LIMIT = 1 << 16


def packed(**fields: Any) -> bytes:
    out: bytes = msgpack.packb(fields, use_bin_type=True)
    return out


def refused(data: bytes, limit: int = LIMIT) -> Reason:
    with pytest.raises(SessionViolation) as e:
        decode(data, limit)
    return e.value.reason


def test_every_message_type_round_trips() -> None:
    assert {t["t"] for t in FUZZ_TEMPLATES} == MESSAGE_TYPES
    for template in FUZZ_TEMPLATES:
        fields = {k: v for k, v in template.items() if k != "t"}
        assert decode(encode(template["t"], **fields), LIMIT) == {"v": PROTOCOL_VERSION, **template}


@pytest.mark.parametrize(("data", "reason"), [
    (b"\xc1", Reason.BAD_MESSAGE),                                          # not msgpack
    (msgpack.packb([1, 2]), Reason.BAD_MESSAGE),                            # not a map
    (packed(v=1, t="suspend"), Reason.BAD_VERSION),
    (packed(v="2", t="suspend"), Reason.BAD_VERSION),
    (packed(v=3.0, t="suspend"), Reason.BAD_VERSION),
    (packed(v=2, t="suspend"), Reason.BAD_VERSION),                         # before replayed existed
    (packed(t="suspend"), Reason.BAD_VERSION),
    (packed(v=3, t="nonsense"), Reason.BAD_MESSAGE),
    (packed(v=3, t=7), Reason.BAD_MESSAGE),
    (packed(v=3, t="log", seq=1), Reason.BAD_MESSAGE),                      # a field missing
    (packed(v=3, t="log", seq=1, data=b"", more=1), Reason.BAD_MESSAGE),    # one too many
    (packed(v=3, t="log", seq=0, data=b""), Reason.BAD_MESSAGE),            # seqs start at 1
    (packed(v=3, t="log", seq=True, data=b""), Reason.BAD_MESSAGE),         # a bool is no int here
    (packed(v=3, t="log", seq=2**63, data=b""), Reason.BAD_MESSAGE),
    (packed(v=3, t="log", seq=1, data="text"), Reason.BAD_MESSAGE),
    (packed(v=3, t="diff", dir="log", seq=1, data=b""), Reason.BAD_MESSAGE),
    (packed(v=3, t="ack", stream="x", seq=1), Reason.BAD_MESSAGE),
    (packed(v=3, t="replayed"), Reason.BAD_MESSAGE),
    (packed(v=3, t="replayed", seq=-1), Reason.BAD_MESSAGE),
    (packed(v=3, t="replayed", seq=2**63), Reason.BAD_MESSAGE),
    (packed(v=3, t="replayed", seq=1.0), Reason.BAD_MESSAGE),
    (packed(v=3, t="replayed", seq=False), Reason.BAD_MESSAGE),
    (packed(v=3, t="replayed", seq=1, data=b""), Reason.BAD_MESSAGE),
    (packed(v=3, t="abort", reason="wrong_state"), Reason.BAD_MESSAGE),     # not a reason a peer gives
    (packed(v=3, t="verified", roots={}), Reason.BAD_MESSAGE),
    (packed(v=3, t="attach", role="source", session="no dots.", resume_from={"t2s": 1}, resume=False,
            claim=Claim.initial(Role.SOURCE).to_wire()), Reason.BAD_MESSAGE),
])
def test_what_the_schema_refuses(data: bytes, reason: Reason) -> None:
    assert refused(data) is reason


def test_a_message_above_the_limit_is_refused_before_it_is_parsed() -> None:
    data = encode("log", seq=1, data=b"x" * 100)
    assert decode(data, len(data))["t"] == "log"
    assert refused(data, len(data) - 1) is Reason.TOO_LARGE


def test_roots_are_bounded() -> None:
    assert valid_roots(ROOTS) and valid_roots({"m" * MAX_ROOT_NAME: b"\1" * MAX_ROOT_BYTES})
    for bad in ({}, {"m": b""}, {"": b"\1"}, {"m" * (MAX_ROOT_NAME + 1): b"\1"}, {"m": b"\1" * (MAX_ROOT_BYTES + 1)},
                {f"r{i}": b"\1" for i in range(MAX_ROOTS + 1)}, {"m": "text"}, [b"\1"], None):
        assert not valid_roots(bad), bad


def test_report_figures_are_bounded_in_shape_and_size() -> None:
    """Issue 12 item 5: what one side tells the other of the migration crosses the service, which
    keeps it: names, types, counts and the message's size are bounded before anything is kept."""
    full = {f"f{i}": i for i in range(MAX_FIGURES - 1)} | {"m": {f"k{i}": None for i in range(MAX_FIGURE_ENTRIES)}}
    assert valid_figures({}) and valid_figures(full)
    assert valid_figures({"x": -1.5, "y": None, "z": True, "t": "t" * MAX_FIGURE_TEXT, "n": 2**62})
    bad: Any
    for bad in ({**full, "one_more": 1}, {"Caps": 1}, {"": 1}, {"n" * (MAX_FIGURE_NAME + 1): 1}, {"x": float("nan")},
                {"x": float("inf")}, {"x": 2**63}, {"x": b"bytes"}, {"x": "t" * (MAX_FIGURE_TEXT + 1)},
                {"x": "new\nline"}, {"x": [1]}, {"m": {f"k{i}": 1 for i in range(MAX_FIGURE_ENTRIES + 1)}},
                {"m": {"k": "text"}}, {"m": {"k": {"deeper": 1}}}, {"m": {"K": 1}}, {1: 1}, [], None):
        assert not valid_figures(bad), bad
        assert refused(encode("report", figures=bad)) is Reason.BAD_MESSAGE
    # within the counts, but the text adds up beyond what the service keeps per side
    big = {f"t{i}": "t" * MAX_FIGURE_TEXT for i in range(MAX_FIGURES)}
    assert valid_figures(big) and len(encode("report", figures=big)) > MAX_REPORT_MESSAGE
    assert refused(encode("report", figures=big)) is Reason.TOO_LARGE


def test_a_claim_round_trips_and_must_be_consistent() -> None:
    claim = Claim(State.TRANSFERRING, {Stream.T2S: 4}, {Stream.T2S: 3}, 2, ROOTS, False)
    attach = encode("attach", role="target", session=SID, resume_from={"log": 3, "s2t": 5}, resume=True,
                    claim=claim.to_wire())
    assert Claim.from_wire(decode(attach, LIMIT)["claim"]) == claim
    assert Claim.initial(Role.SOURCE) == Claim(State.RECORDING, {Stream.LOG: 1, Stream.S2T: 1},
                                               {Stream.LOG: 0, Stream.S2T: 0}, None, None)
    for change in ({"acked": {"t2s": 4}},                      # everything acked must have been sent
                   {"acked": {"log": 0}},                      # next and acked name the same streams
                   {"state": "failed"},                        # a claim is of a live (or resumed) state
                   {"released": 1}):
        bad = {**claim.to_wire(), **change}
        assert refused(encode("attach", role="target", session=SID, resume_from={"log": 3, "s2t": 5},
                              resume=True, claim=bad)) is Reason.BAD_MESSAGE, change


def test_frames_and_errors_have_one_envelope_each() -> None:
    assert decode(frame_message(Stream.LOG, 3, b"f"), LIMIT) == {"v": 3, "t": "log", "seq": 3, "data": b"f"}
    assert decode(frame_message(Stream.T2S, 1, b"d"), LIMIT) == {"v": 3, "t": "diff", "dir": "t2s", "seq": 1,
                                                                 "data": b"d"}
    assert decode(error_message(Reason.IDLE_TIMEOUT, True), LIMIT) == {
        "v": 3, "t": "error", "code": 408, "reason": "idle_timeout", "keep_vm": True}


def test_reasons_have_codes_and_a_violation_is_the_peers_protocol_error() -> None:
    assert all(100 <= r.code < 600 for r in Reason)
    assert {r.code for r in PEER_REASONS} == {499} and Reason.WRONG_STATE.code == 409
    e = SessionViolation(Reason.BAD_SEQUENCE, "frame 5, expected 4")
    assert isinstance(e, ProtocolError) and e.exit_code == 10 and e.reason is Reason.BAD_SEQUENCE
    assert str(e) == "bad_sequence: frame 5, expected 4"


def test_states_are_reached_along_the_happy_path_only() -> None:
    for i, a in enumerate(HAPPY_PATH):
        for j, b in enumerate(HAPPY_PATH):
            assert state_reached(a, b) is (i >= j)
        assert not state_reached(a, State.FAILED) and not state_reached(State.FAILED, a)
        assert not state_reached(None, a)
    assert state_reached(State.FAILED, State.FAILED)
    assert [s for s in State if s.terminal] == [State.RESUMED, State.FAILED]
    assert Role.SOURCE.sends == (Stream.LOG, Stream.S2T) and Role.TARGET.receives == (Stream.LOG, Stream.S2T)
    assert Role.TARGET.sends == (Stream.T2S,) and Role.SOURCE.peer is Role.TARGET
