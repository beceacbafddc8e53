"""recorder.channel: attach/resume without loss or duplication, resend buffer and fallback,
resynchronisation on a damaged stream, expect/echo, screen checks, and hostile bytes."""

from __future__ import annotations

import itertools
import struct
import zlib
from typing import Any

import msgpack
import pytest
from fuzzkit import fuzz_tests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recorder import channel as ch
from recorder.channel import (
    AgentSide,
    AgentState,
    Attached,
    Checked,
    CheckRequested,
    Echo,
    Expected,
    Gap,
    Hello,
    HostSide,
    HostState,
    LogFrame,
    Resync,
    Skipped,
)
from recorder.logformat import (
    MAX_COORD,
    Button,
    EncodedFrame,
    Key,
    LogDecoder,
    LogEncoder,
    LogHeader,
    Motion,
    region_digest,
)
from replay_migrate.errors import ProtocolError

HEADER = LogHeader(1280, 800, "us", "", 0, "t")
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Log:
    """Makes real log frames, one event each, and keeps a copy of all of them (the fallback file)."""

    def __init__(self) -> None:
        self.enc = LogEncoder(HEADER, frame_events=1, motion_window_us=0)
        self.frames: list[EncodedFrame] = [self.enc.start()]
        self.t = 0

    def next(self) -> EncodedFrame:
        self.t += 1000
        (f,) = self.enc.add(Key(self.t, 38, self.t % 2000 == 0))
        self.frames.append(f)
        return f

    def fallback(self, seq: int) -> bytes | None:
        return self.frames[seq].data if seq < len(self.frames) else None


def agent_with(log: Log, n: int, **kw: Any) -> AgentSide:
    a = AgentSide(agent_version="t", width=1280, height=800, keymap="us", session=b"S1" * 4, **kw)
    a.add_frame(0, log.frames[0].data)
    for _ in range(n):
        f = log.next()
        a.add_frame(f.seq, f.data)
    return a


def exchange(a: AgentSide, h: HostSide, rounds: int = 10) -> list[ch.HostEvent]:
    """Shuttle bytes both ways until quiet."""
    out: list[ch.HostEvent] = []
    for _ in range(rounds):
        down = h.data_to_send()
        if down:
            a.receive_data(down)
        up = a.data_to_send()
        if up:
            out += h.receive_data(up)
        if not down and not up:
            break
    return out


def frames_of(events: list[ch.HostEvent]) -> list[int]:
    return [e.seq for e in events if isinstance(e, LogFrame)]


def msg(mtype: int, body: object) -> bytes:
    """A well-framed message with any body (crc right), as a buggy or hostile peer could send."""
    data: bytes = msgpack.packb(body)
    head = struct.pack(">2sBI", b"Rc", mtype, len(data))
    return head + data + struct.pack(">I", zlib.crc32(head + data))


def attached(log: Log, n: int = 0, **kw: object) -> tuple[AgentSide, HostSide]:
    a = agent_with(log, n, **kw)
    h = HostSide()
    h.connect()
    exchange(a, h)
    assert h.state is HostState.STREAMING
    return a, h


def test_attach_hello_and_streaming() -> None:
    log = Log()
    a = agent_with(log, 3)
    assert a.state is AgentState.DETACHED and a.data_to_send() == b""  # nothing goes out unattached
    h = HostSide()
    h.connect()
    evs = exchange(a, h)
    hello = evs[0]
    assert isinstance(hello, Hello)
    assert (hello.width, hello.height, hello.keymap, hello.next_seq, hello.resume_from) == (1280, 800, "us", 4, 0)
    assert not hello.restarted and h.session == a.session
    assert frames_of(evs) == [0, 1, 2, 3]
    assert h.state is HostState.STREAMING
    assert a.state.value == AgentState.ATTACHED.value  # (mypy narrowed it to DETACHED above)
    f = log.next()
    a.add_frame(f.seq, f.data)
    assert frames_of(exchange(a, h)) == [4]
    # the frames decode as a log
    dec = LogDecoder()
    for e in evs:
        if isinstance(e, LogFrame):
            dec.feed(e.data)
    assert dec.header == HEADER


def test_ack_trims_the_resend_buffer() -> None:
    log = Log()
    a = agent_with(log, 5)
    h = HostSide()
    h.connect()
    exchange(a, h)
    h.ack(3)
    exchange(a, h)
    assert a.first_kept == 4
    with pytest.raises(ProtocolError):
        h.ack(99)


def test_reconnect_resumes_without_loss_or_duplication() -> None:
    log = Log()
    a = agent_with(log, 4)
    h = HostSide()
    h.connect()
    got = frames_of(exchange(a, h))
    h.ack(2)
    exchange(a, h)
    # more frames while the host is away; the last message is cut in half by the disconnect
    for _ in range(3):
        f = log.next()
        a.add_frame(f.seq, f.data)
    wire = a.data_to_send()
    half = wire[: len(wire) - 7]
    got += frames_of(h.receive_data(half))
    a.connection_lost()
    h2 = HostSide(resume_from=h.next_seq, session=h.session)
    h2.connect()
    evs = h2.receive_data(wire[len(wire) - 7 :])  # the tail of the old connection: skipped
    assert evs == []
    for _ in range(2):
        f = log.next()
        a.add_frame(f.seq, f.data)
    evs = exchange(a, h2)
    assert isinstance(evs[0], Hello) and not evs[0].restarted
    got += frames_of(evs)
    assert got == list(range(len(log.frames)))
    assert h2.duplicates == 0


def test_reattach_on_the_same_connection_skips_what_was_in_flight() -> None:
    log = Log()
    a = agent_with(log, 3)
    h = HostSide()
    h.connect()
    a.receive_data(h.data_to_send())
    in_flight = a.data_to_send()  # hello + frames for the first attach
    h.connect()  # the host gives up on that attach and sends another
    a.receive_data(h.data_to_send())
    evs = h.receive_data(in_flight + a.data_to_send())
    hellos = [e for e in evs if isinstance(e, Hello)]
    assert len(hellos) == 1 and frames_of(evs) == [0, 1, 2, 3]


def test_evicted_frames_come_back_from_the_fallback() -> None:
    log = Log()
    a = agent_with(log, 40, resend_limit_bytes=200, fallback=log.fallback)
    assert a.first_kept > 10  # most were evicted from memory
    h = HostSide()
    h.connect()
    assert frames_of(exchange(a, h, rounds=100)) == list(range(41))
    assert a.lost_frames == 0 and a.recovered_frames == a.first_kept


def test_a_frame_lost_everywhere_shows_as_a_gap() -> None:
    log = Log()
    a = agent_with(log, 10, resend_limit_bytes=100, fallback=lambda s: None if s == 3 else log.fallback(s))
    h = HostSide()
    h.connect()
    evs = exchange(a, h, rounds=100)
    assert Gap(3, 3) in evs
    assert frames_of(evs) == [0, 1, 2, *range(4, 11)]
    assert a.lost_frames == 1


def test_data_to_send_is_bounded_per_call() -> None:
    log = Log()
    a = agent_with(log, 100)
    h = HostSide()
    h.connect()
    a.receive_data(h.data_to_send())
    chunk = a.data_to_send(max_bytes=200)
    assert 200 <= len(chunk) < 400
    assert a.wants_to_send


def test_agent_restart_is_a_new_session() -> None:
    log = Log()
    a = agent_with(log, 5)
    h = HostSide()
    h.connect()
    exchange(a, h)
    assert h.next_seq == 6
    log2 = Log()
    a2 = agent_with(log2, 2)
    a2.session = b"S2" * 4
    h.connection_lost()
    h.connect()
    evs = exchange(a2, h)
    assert isinstance(evs[0], Hello) and evs[0].restarted and evs[0].resume_from == 0
    assert frames_of(evs) == [0, 1, 2]


def test_corruption_mid_stream_resyncs_and_loses_nothing() -> None:
    log = Log()
    a = agent_with(log, 6)
    h = HostSide()
    h.connect()
    a.receive_data(h.data_to_send())
    wire = bytearray(a.data_to_send())
    wire[len(wire) // 2] ^= 0xFF
    evs = h.receive_data(bytes(wire))
    assert any(isinstance(e, Resync) for e in evs)
    got = frames_of(evs)
    evs = exchange(a, h)
    got += frames_of(evs)
    assert got == list(range(7))


def test_garbage_before_hello_and_stale_hellos_are_skipped() -> None:
    log = Log()
    a = agent_with(log, 1)
    old = HostSide(token_source=lambda: b"old-tokn")
    old.connect()
    a.receive_data(old.data_to_send())
    stale = a.data_to_send()
    h = HostSide(token_source=lambda: b"new-tokn")
    h.connect()
    a.receive_data(h.data_to_send())
    fresh = a.data_to_send()
    evs = h.receive_data(b"Rc\x02\xff\xff\xff\xffRRc" + stale + b"\x00garbage" + fresh)
    assert [type(e) for e in evs] == [Hello, LogFrame, LogFrame]


def test_hello_of_another_channel_version_is_fatal() -> None:
    h = HostSide(token_source=lambda: b"tok")
    h.connect()
    body = msgpack.packb([99, b"tok", b"s", "v", 1, 1, "us", 0, 0])
    head = struct.pack(">2sBI", b"Rc", ch.MsgType.HELLO, len(body))
    with pytest.raises(ProtocolError, match="channel version"):
        h.receive_data(head + body + struct.pack(">I", zlib.crc32(head + body)))


def test_hello_says_the_capture_backend_and_an_older_agents_says_nothing() -> None:
    a = AgentSide(agent_version="t", backend="pynput-xorg", width=1, height=1, keymap="us")
    h = HostSide()
    h.connect()
    (hello,) = [e for e in exchange(a, h) if isinstance(e, Hello)]
    assert hello.backend == "pynput-xorg"
    for extra, expect in (([], ""), ([7], None)):   # a 9-field hello (before backends), a bad one
        h = HostSide(token_source=lambda: b"tok")
        h.connect()
        raw = msg(ch.MsgType.HELLO, [ch.CHANNEL_VERSION, b"tok", b"s", "v", 1, 1, "us", 0, 0, *extra])
        if expect is None:
            with pytest.raises(ProtocolError, match="backend"):
                h.receive_data(raw)
        else:
            (old,) = h.receive_data(raw)
            assert isinstance(old, Hello) and old.backend == expect


def test_expect_then_capture_echoes_once() -> None:
    log = Log()
    a = agent_with(log, 0)
    h = HostSide()
    h.connect()
    exchange(a, h)
    h.expect(7, Key(0, 38, True))
    h.expect(8, Motion(0, 10, 20))
    evs = a.receive_data(h.data_to_send())
    assert len(evs) == 2 and all(isinstance(e, Expected) and not e.echoed for e in evs)
    a.captured(Key(5, 38, False))  # not a match
    a.captured(Motion(6, 10, 20))
    a.captured(Key(7, 38, True))
    a.captured(Key(8, 38, True))  # the expect was used up
    assert [e for e in h.receive_data(a.data_to_send()) if isinstance(e, Echo)] == [Echo(8), Echo(7)]


def test_capture_before_expect_still_echoes() -> None:
    log = Log()
    a = agent_with(log, 0)
    h = HostSide()
    h.connect()
    exchange(a, h)
    a.captured(Button(1, 1, True))
    a.captured(Button(2, 1, False))
    h.expect(1, Button(0, 1, True))
    h.expect(2, Button(0, 1, False))
    h.expect(3, Button(0, 1, False))  # no second release captured: no echo
    evs = a.receive_data(h.data_to_send())
    assert [e.echoed for e in evs if isinstance(e, Expected)] == [True, True, False]
    assert [e for e in h.receive_data(a.data_to_send()) if isinstance(e, Echo)] == [Echo(1), Echo(2)]
    a.captured(Button(3, 1, False))
    assert h.receive_data(a.data_to_send()) == [Echo(3)]


def test_expect_checks_its_event() -> None:
    h = HostSide()
    with pytest.raises(ProtocolError):
        h.expect(1, Key(0, 38, True))  # not connected
    h.connect()
    with pytest.raises(ProtocolError):
        h.expect(1, Key(0, 3, True))
    with pytest.raises(ProtocolError):
        h.expect(-1, Key(0, 38, True))


def test_agent_reports_bad_host_messages_and_goes_on() -> None:
    log = Log()
    a = agent_with(log, 0)

    evs = a.receive_data(b"junk" + msg(ch.MsgType.ACK, ["x"]) + msg(ch.MsgType.EXPECT, [1, 7])
                         + msg(ch.MsgType.ATTACH, [1, b"t", b"", 0]))
    assert [type(e) for e in evs] == [Skipped, Skipped, Skipped, Attached]
    assert a.state is AgentState.ATTACHED


@FAST
@given(st.binary(max_size=400), st.integers(1, 50))
def test_hostile_bytes_never_break_either_side(data: bytes, step: int) -> None:
    log = Log()
    a = agent_with(log, 2)
    for i in range(0, len(data), step):
        a.receive_data(data[i : i + step])  # never raises
    h = HostSide()
    h.connect()
    a.receive_data(h.data_to_send())
    wire = a.data_to_send()
    try:
        for i in range(0, len(data), step):
            h.receive_data(data[i : i + step])
        evs = h.receive_data(wire)
    except ProtocolError:
        return
    if h.state is HostState.ATTACHING:  # random bytes were taken for the hello's tail: re-attach
        evs += exchange(a, h)
    assert frames_of(evs) == [0, 1, 2]


@FAST
@given(st.data())
def test_stream_split_anywhere(data: st.DataObject) -> None:
    log = Log()
    a = agent_with(log, 5)
    h = HostSide()
    h.connect()
    a.receive_data(h.data_to_send())
    h.expect(1, Key(0, 38, True))
    h.check(5, 0, 0, 8, 8)
    a.receive_data(h.data_to_send())
    a.captured(Key(0, 38, True))
    a.checked(5, b"D" * 8)
    wire = a.data_to_send()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    evs: list[ch.HostEvent] = []
    for lo, hi in itertools.pairwise([0, *cuts, len(wire)]):
        evs += h.receive_data(wire[lo:hi])
    assert frames_of(evs) == list(range(6))
    assert Echo(1) in evs and Checked(5, b"D" * 8) in evs


def test_add_frame_out_of_order_is_a_bug() -> None:
    a = AgentSide(agent_version="t", width=1, height=1, keymap="us")
    with pytest.raises(ProtocolError):
        a.add_frame(1, b"x")


def test_a_garbage_header_claiming_a_long_body_does_not_stall_the_scan() -> None:
    log = Log()
    a = agent_with(log, 0)
    h = HostSide()
    h.connect()
    a.receive_data(h.data_to_send())
    bogus = struct.pack(">2sBI", b"Rc", ch.MsgType.HELLO, 1000)
    evs = h.receive_data(bogus + a.data_to_send())
    assert [type(e) for e in evs] == [Hello, LogFrame]


# ------------------------------------------------------------------------------------ screen checks

DIGEST = region_digest(bytes(64 * 64 * 3))


def test_check_round_trip() -> None:
    log = Log()
    a, h = attached(log, 2)
    h.check(1, 10, 20, 64, 64)
    h.check(2, 0, 0, MAX_COORD, MAX_COORD)  # the largest region the protocol carries
    assert a.receive_data(h.data_to_send()) == [CheckRequested(1, 10, 20, 64, 64),
                                                CheckRequested(2, 0, 0, MAX_COORD, MAX_COORD)]
    assert a.checked(1, DIGEST)
    assert a.checked(2, b"")  # empty: the agent could not sample it (here: off its screen)
    f = log.next()
    a.add_frame(f.seq, f.data)
    assert a.wants_to_send
    evs = h.receive_data(a.data_to_send())
    assert evs == [Checked(1, DIGEST), Checked(2, b""), LogFrame(f.seq, f.data)]
    assert not a.checked(1, DIGEST)  # answered already: nothing is sent twice
    assert a.data_to_send() == b""


def test_a_check_of_an_earlier_attachment_is_not_answered() -> None:
    log = Log()
    a, h = attached(log)
    h.check(1, 0, 0, 8, 8)
    h.check(2, 0, 0, 8, 8)
    a.receive_data(h.data_to_send())
    h.connect()  # the host re-attaches (e.g. after a resync) while the agent samples
    a.receive_data(h.data_to_send())
    assert not a.checked(1, DIGEST)
    assert [e for e in exchange(a, h) if isinstance(e, Checked)] == []
    h.check(3, 0, 0, 8, 8)
    a.receive_data(h.data_to_send())
    a.connection_lost()  # the port went away before the answer
    assert not a.checked(3, DIGEST)
    assert not a.checked(99, DIGEST)  # never asked
    assert a.data_to_send() == b""


def test_checks_held_by_the_agent_are_bounded() -> None:
    log = Log()
    a, h = attached(log, max_pending_checks=2)
    for i in range(5):
        h.check(i, 0, 0, 8, 8)
    assert len(a.receive_data(h.data_to_send())) == 5
    assert [a.checked(i, DIGEST) for i in range(5)] == [False, False, False, True, True]  # newest 2 kept
    for i in range(5, 10):  # answered, but the host does not read
        h.check(i, 0, 0, 8, 8)
        a.receive_data(h.data_to_send())
        assert a.checked(i, DIGEST)
    assert [e.req_id for e in h.receive_data(a.data_to_send()) if isinstance(e, Checked)] == [8, 9]


@pytest.mark.parametrize("args", [
    (-1, 0, 0, 1, 1), (1, -1, 0, 1, 1), (1, 0, MAX_COORD + 1, 1, 1), (1, 0, 0, 0, 1), (1, 0, 0, 1, 0),
    (1, 0, 0, MAX_COORD + 1, 1), (1, 0, 0, 1, 2**40), (1.0, 0, 0, 1, 1), (1, True, 0, 1, 1), (1, 0, 0, "8", 8),
    (2**63, 0, 0, 1, 1),
])
def test_check_refuses_bad_arguments(args: tuple[int, int, int, int, int]) -> None:
    h = HostSide()
    h.connect()
    assert h.data_to_send()  # the attach
    with pytest.raises(ProtocolError):
        h.check(*args)
    assert h.data_to_send() == b""  # nothing of the refused check


def test_check_while_disconnected_and_bad_answers_are_bugs() -> None:
    with pytest.raises(ProtocolError, match="disconnected"):
        HostSide().check(1, 0, 0, 8, 8)
    a = AgentSide(agent_version="t", width=1, height=1, keymap="us")
    for req_id, digest in ((-1, DIGEST), (1, b"x" * 33), (1, "digest")):
        with pytest.raises(ProtocolError):
            a.checked(req_id, digest)  # type: ignore[arg-type]  # wrong on purpose: the check under test


def test_malformed_checks_are_skipped_and_the_agent_goes_on() -> None:
    log = Log()
    a, h = attached(log)
    bad = [[1, 0, 0, 8], [1, 0, 0, 8, 8, 9], [1, 0, 0, 0, 8], [1, -1, 0, 8, 8], ["1", 0, 0, 8, 8],
           [1, 0, 0, 8, MAX_COORD + 1], {"x": 1}]
    wire = b"".join(msg(ch.MsgType.CHECK, b) for b in bad) + msg(ch.MsgType.CHECK, [1, 0, 0, 8, 8])
    broken = bytearray(msg(ch.MsgType.CHECK, [2, 0, 0, 8, 8]))
    broken[-1] ^= 1  # bad crc
    evs = a.receive_data(bytes(broken) + wire)
    assert [type(e) for e in evs] == [Skipped] * (len(bad) + 1) + [CheckRequested]
    assert a.checked(1, DIGEST) and not a.checked(2, DIGEST)
    assert a.state is AgentState.ATTACHED
    assert [e for e in h.receive_data(a.data_to_send()) if isinstance(e, Checked)] == [Checked(1, DIGEST)]


@pytest.mark.parametrize("body", [[1], [1, DIGEST, 0], [-1, DIGEST], [1, "digest"], [1, b"x" * 33], [1, None]])
def test_a_malformed_check_answer_resyncs_and_loses_nothing(body: list[object]) -> None:
    log = Log()
    a, h = attached(log, 2)
    for _ in range(2):
        f = log.next()
        a.add_frame(f.seq, f.data)
    evs = h.receive_data(msg(ch.MsgType.CHECKED, body) + a.data_to_send())
    assert isinstance(evs[0], Resync) and h.state is HostState.ATTACHING
    evs += exchange(a, h)
    assert frames_of(evs) == [3, 4]  # after 0..2 before it


# -- fuzz: the target `make fuzz` runs on 100,000 inputs (bench/fuzz_targets), here on a few -------------

test_fuzz_channel_host, test_fuzz_channel_host_raw_bytes = fuzz_tests("channel-host")
test_fuzz_channel_agent, test_fuzz_channel_agent_raw_bytes = fuzz_tests("channel-agent")
