"""recorder.logformat: round trips, coalescing, framing, and that bad input only ever raises
LogFormatError (property tests: every split point, every truncation, fuzzed bytes and payloads)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import msgpack
import pytest
from fuzzkit import fuzz_tests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recorder import logformat as lf
from recorder.logformat import (
    Button,
    End,
    EventsFrame,
    HeaderFrame,
    Key,
    LogDecoder,
    LogEncoder,
    LogHeader,
    Motion,
    SyncMark,
    decode_log,
    encode_log,
)
from replay_migrate.errors import LogFormatError
from replayer.workload import load_workload, shipped_workloads, synthesize

HEADER = LogHeader(1280, 800, "us", "ck-0123", 1_700_000_000_000_000, "0.1.0")
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------ strategies

headers = st.builds(
    LogHeader,
    st.integers(1, lf.MAX_COORD),
    st.integers(1, lf.MAX_COORD),
    st.text(max_size=12),
    st.text(max_size=40),
    st.integers(0, 2**63 - 1),
    st.text(max_size=12),
)


@st.composite
def event_lists(draw: st.DrawFn, max_size: int = 60) -> list[lf.Event]:
    n = draw(st.integers(0, max_size))
    t = 0
    out: list[lf.Event] = []
    coord = st.integers(0, lf.MAX_COORD)
    for _ in range(n):
        t += draw(st.one_of(st.integers(0, 200), st.integers(0, 10**7), st.integers(0, 2**40)))
        kind = draw(st.sampled_from("kbms"))
        if kind == "k":
            out.append(Key(t, draw(st.integers(8, 255)), draw(st.booleans())))
        elif kind == "b":
            out.append(Button(t, draw(st.integers(1, 255)), draw(st.booleans())))
        elif kind == "m":
            out.append(Motion(t, draw(coord), draw(coord)))
        else:
            out.append(SyncMark(t, draw(coord), draw(coord), draw(st.integers(1, lf.MAX_COORD)),
                                draw(st.integers(1, lf.MAX_COORD)), draw(st.binary(min_size=1, max_size=32)),
                                draw(st.text(max_size=lf.MAX_LABEL_CHARS))))
    return out


def coalesce(events: list[lf.Event], window: int) -> list[lf.Event]:
    """Reference model of the encoder's motion coalescing."""
    out: list[lf.Event] = []
    pending: Motion | None = None
    group_t = 0
    for ev in events:
        if isinstance(ev, Motion) and window > 0:
            if pending is not None and ev.t_us - group_t < window:
                pending = ev
                continue
            if pending is not None:
                out.append(pending)
            pending, group_t = ev, ev.t_us
            continue
        if pending is not None:
            out.append(pending)
            pending = None
        out.append(ev)
    if pending is not None:
        out.append(pending)
    return out


def small_log() -> bytes:
    evs: list[lf.Event] = [Motion(1000 * i, 10 + i, 20 + i) for i in range(5)]
    evs += [Key(90_000, 38, True), Key(150_000, 38, False), Button(400_000, 1, True),
            Button(480_000, 1, False), SyncMark(800_000, 0, 0, 64, 64, b"\x01" * 8, "click")]
    return encode_log(HEADER, evs, frame_events=3, motion_window_us=0)


def frame(ftype: int, seq: int, payload: bytes, version: int = lf.FORMAT_VERSION) -> bytes:
    head = struct.pack(">2sBBII", b"RM", version, ftype, seq, len(payload))
    return head + payload + struct.pack(">I", zlib.crc32(head + payload))


HEADER_FRAME = LogEncoder(HEADER).start().data


def only_logformat_error(data: bytes, **kw: Any) -> None:
    """Decoding ``data`` either works or raises LogFormatError: nothing else escapes."""
    try:
        decode_log(data, **kw)
    except LogFormatError:
        pass


# ---------------------------------------------------------------------------------------- round trip


@FAST
@given(headers, event_lists(), st.integers(1, 50))
def test_round_trip_without_coalescing(header: LogHeader, events: list[lf.Event], frame_events: int) -> None:
    data = encode_log(header, events, motion_window_us=0, frame_events=frame_events)
    log = decode_log(data)
    assert log.header == header
    assert list(log.events[:-1]) == events
    assert log.events[-1] == End(events[-1].t_us if events else 0)
    assert log.ended and log.nbytes == len(data)


@FAST
@given(event_lists(), st.integers(0, 50_000))
def test_round_trip_with_coalescing_matches_the_model(events: list[lf.Event], window: int) -> None:
    log = decode_log(encode_log(HEADER, events, motion_window_us=window))
    assert list(log.events[:-1]) == coalesce(events, window)


@FAST
@given(event_lists(max_size=40), st.data())
def test_incremental_decode_at_any_split(events: list[lf.Event], data: st.DataObject) -> None:
    blob = encode_log(HEADER, events, frame_events=4)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=8)))
    dec = LogDecoder()
    frames = []
    prev = 0
    for c in [*cuts, len(blob)]:
        frames += dec.feed(blob[prev:c])
        prev = c
    dec.close()
    assert frames == LogDecoder().feed(blob)


def test_incremental_decode_at_every_split_point() -> None:
    blob = small_log()
    whole = LogDecoder().feed(blob)
    for i in range(len(blob) + 1):
        dec = LogDecoder()
        got = dec.feed(blob[:i]) + dec.feed(blob[i:])
        dec.close()
        assert got == whole, i
    # and byte by byte
    dec = LogDecoder()
    got = [f for b in blob for f in dec.feed(bytes([b]))]
    assert got == whole


def test_frames_carry_seq_and_base_time() -> None:
    frames = LogDecoder().feed(small_log())
    assert isinstance(frames[0], HeaderFrame) and frames[0].seq == 0
    assert [f.seq for f in frames] == list(range(len(frames)))
    t = 0
    for f in frames[1:]:
        assert isinstance(f, EventsFrame)
        assert f.base_us == t
        t = f.events[-1].t_us
    assert isinstance(frames[-1], EventsFrame) and isinstance(frames[-1].events[-1], End)


def test_decode_frame_alone_gives_absolute_times() -> None:
    blob = small_log()
    frames = LogDecoder().feed(blob)
    off = 0
    for f in frames:
        _, seq, total = lf.peek_frame(blob[off:])
        assert seq == f.seq
        assert lf.decode_frame(blob[off : off + total]) == f
        off += total
    with pytest.raises(LogFormatError, match="bytes given"):
        lf.decode_frame(blob)


# ----------------------------------------------------------------------------------------- coalescing


def test_motion_coalescing_keeps_the_last_of_each_window() -> None:
    enc = LogEncoder(HEADER, motion_window_us=20_000)
    enc.start()
    out = []
    for t, x in [(0, 1), (5_000, 2), (19_999, 3), (20_000, 4), (30_000, 5), (45_000, 6)]:
        out += enc.add(Motion(t, x, 0))
    out += enc.add(Key(50_000, 38, True))  # a non-motion ends the group
    out += enc.add(Motion(51_000, 7, 0))
    out += enc.add(Motion(52_000, 8, 0))
    out += enc.end()
    evs = [ev for f in LogDecoder().feed(HEADER_FRAME + b"".join(f.data for f in out))
           if isinstance(f, EventsFrame) for ev in f.events]
    assert evs == [Motion(19_999, 3, 0), Motion(30_000, 5, 0), Motion(45_000, 6, 0), Key(50_000, 38, True),
                   Motion(52_000, 8, 0), End(52_000)]


def test_flush_emits_a_held_back_motion() -> None:
    enc = LogEncoder(HEADER)
    enc.start()
    assert enc.add(Motion(0, 5, 5)) == []
    assert enc.pending == 1
    frames = enc.flush()
    assert len(frames) == 1 and enc.pending == 0
    assert enc.flush() == []


def test_frame_cut_by_count_and_by_size() -> None:
    enc = LogEncoder(HEADER, frame_events=2, motion_window_us=0)
    enc.start()
    assert enc.add(Key(0, 38, True)) == []
    assert [f.seq for f in enc.add(Key(1, 38, False))] == [1]
    enc = LogEncoder(HEADER, max_frame_bytes=1024, frame_events=4096)
    enc.start()
    frames = []
    for i in range(200):
        frames += enc.add(SyncMark(i, 0, 0, 1, 1, b"x" * 32, "l" * 64))
    assert frames and all(len(f.data) <= 1024 + lf.FRAME_OVERHEAD for f in frames)
    frames += enc.end()
    data = HEADER_FRAME + b"".join(f.data for f in frames)
    assert len(decode_log(data).events) == 201


# -------------------------------------------------------------------------------------------- size


def test_bytes_per_event_of_the_shipped_workloads_is_at_most_16() -> None:
    for name, path in shipped_workloads().items():
        events = synthesize(load_workload(path))
        data = encode_log(HEADER, events)
        n = len(decode_log(data).events)
        assert len(data) / n <= 16, (name, len(data) / n)


def test_event_sizes() -> None:
    def size(ev: lf.Event, prev: int = 0) -> int:
        return len(msgpack.packb([ev.t_us - prev, int(ev.kind), *lf.event_fields(ev)]))

    assert size(Key(50_000, 38, True)) == 6
    assert size(Key(100_000, 200, True)) == 9
    assert size(Motion(10_000, 1279, 799)) == 11
    assert size(SyncMark(1000, 600, 300, 64, 64, b"12345678", "click")) <= 32


# ------------------------------------------------------------------------------------- bad input


def test_every_truncation_raises() -> None:
    blob = small_log()
    for i in range(len(blob)):
        with pytest.raises(LogFormatError):
            decode_log(blob[:i])


@FAST
@given(event_lists(max_size=20))
def test_every_truncation_raises_property(events: list[lf.Event]) -> None:
    blob = encode_log(HEADER, events, frame_events=3)
    for i in range(len(blob)):
        with pytest.raises(LogFormatError):
            decode_log(blob[:i])


def test_truncation_at_a_frame_boundary_is_fine_if_the_end_is_not_required() -> None:
    blob = small_log()
    dec = LogDecoder()
    frames = dec.feed(blob)
    cut = len(HEADER_FRAME)
    log = decode_log(blob[:cut], require_end=False)
    assert log.events == () and not log.ended
    assert len(frames) > 2


def test_every_single_byte_change_is_detected() -> None:
    blob = small_log()
    for i in range(len(blob)):
        for delta in (1, 0x80):
            bad = bytearray(blob)
            bad[i] = (bad[i] + delta) % 256
            with pytest.raises(LogFormatError):
                decode_log(bytes(bad))


@FAST
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_logformat_error(data: bytes) -> None:
    only_logformat_error(data)
    only_logformat_error(b"RM\x01" + data)
    only_logformat_error(HEADER_FRAME + data)


@FAST
@given(st.data())
def test_mutated_logs_raise_only_logformat_error(data: st.DataObject) -> None:
    blob = bytearray(small_log())
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        i = data.draw(st.integers(0, len(blob) - 1))
        if op == "flip":
            blob[i] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            blob[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        elif len(blob) > 1:
            del blob[i]
    only_logformat_error(bytes(blob))


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=20,
)


@FAST
@given(msgpack_values, st.sampled_from([0, 1]))
def test_valid_frames_with_arbitrary_payloads_raise_only_logformat_error(value: object, ftype: int) -> None:
    payload = msgpack.packb(value)
    seq = 0 if ftype == 0 else 1
    blob = (b"" if ftype == 0 else HEADER_FRAME) + frame(ftype, seq, payload)
    only_logformat_error(blob)


@FAST
@given(st.lists(st.lists(msgpack_values, max_size=9), min_size=1, max_size=5), st.integers(0, 2**64 - 1))
def test_event_payloads_with_wrong_fields_raise_only_logformat_error(events: list[list[object]],
                                                                    base: int) -> None:
    only_logformat_error(HEADER_FRAME + frame(1, 1, msgpack.packb([base, *events])))


def test_garbage_payload_bytes_and_ext_types() -> None:
    for payload in [b"\xc1", b"\x92\x00", b"\xd9", msgpack.packb([0, [0, 2, 38]]) + b"\x00",
                    msgpack.packb([0, [0, 2, msgpack.ExtType(1, b"x")]]),
                    msgpack.packb([0, [0, 2, True]]), msgpack.packb([0, [0.5, 2, 38]]),
                    msgpack.packb([0, [0, 99, 1]]), msgpack.packb([0, [0, 6, 1, -1]]),
                    msgpack.packb([0, [0, 8], [0, 2, 38]]), msgpack.packb([-1, [0, 2, 38]]),
                    b"\x91" * 100_000, msgpack.packb([0, [0, 2, 7]])]:
        with pytest.raises(LogFormatError):
            decode_log(HEADER_FRAME + frame(1, 1, payload) + frame(1, 2, msgpack.packb([0, [0, 8]])))


def test_future_version_is_refused_at_its_version_byte() -> None:
    future = frame(0, 0, msgpack.packb([1, 1, "us", "", 0, "9"]), version=lf.FORMAT_VERSION + 1)
    with pytest.raises(LogFormatError, match="newer"):
        LogDecoder().feed(future[:3])
    with pytest.raises(LogFormatError, match="newer"):
        decode_log(future)
    with pytest.raises(LogFormatError, match="unknown format version"):
        LogDecoder().feed(b"RM\x00")


def test_oversized_frame_is_refused_before_its_payload_arrives() -> None:
    prefix = struct.pack(">2sBBII", b"RM", 1, 1, 1, 10**6)
    with pytest.raises(LogFormatError, match="exceeds"):
        LogDecoder(max_frame_bytes=1000).feed(prefix)
    with pytest.raises(LogFormatError, match="exceeds"):
        LogDecoder().feed(struct.pack(">2sBBII", b"RM", 1, 1, 1, lf.DEFAULT_MAX_FRAME_BYTES + 1))


def test_log_and_frame_limits() -> None:
    blob = small_log()
    with pytest.raises(LogFormatError, match="exceeds the limit"):
        decode_log(blob, max_log_bytes=len(blob) - 1)
    assert decode_log(blob, max_log_bytes=len(blob)).ended
    with pytest.raises(LogFormatError, match="per frame"):
        decode_log(blob, max_events_per_frame=2)


def test_continuity_errors_name_where() -> None:
    enc = LogEncoder(HEADER, frame_events=1, motion_window_us=0)
    h = enc.start().data
    f1 = enc.add(Key(10, 38, True))[0].data
    f2 = enc.add(Key(20, 38, False))[0].data
    f3 = b"".join(f.data for f in enc.end())
    cases = {
        "expected 2": h + f1 + f3,  # gap
        "second header": h + frame(0, 1, h[12:-4]),
        "seq 1, expected 0": f1,
        "starts at": h + frame(1, 1, msgpack.packb([5, [0, 2, 38]])),
        "after the end": h + f1 + f2 + f3 + f3,
    }
    for msg, blob in cases.items():
        with pytest.raises(LogFormatError, match=msg) as ei:
            decode_log(blob)
        assert "log byte" in str(ei.value)
    with pytest.raises(LogFormatError, match="checksum"):
        decode_log(h[:-1] + bytes([h[-1] ^ 1]))
    with pytest.raises(LogFormatError, match="bad magic"):
        decode_log(b"XX" + h[2:])
    with pytest.raises(LogFormatError, match="empty log"):
        decode_log(b"")


def test_encoder_refuses_bad_use() -> None:
    enc = LogEncoder(HEADER)
    with pytest.raises(LogFormatError):
        enc.add(Key(0, 38, True))  # not started
    enc.start()
    with pytest.raises(LogFormatError):
        enc.start()
    enc.add(Key(100, 38, True))
    bad: list[Any] = [
        Key(50, 38, False), Key(200, 300, True), Key(200, 38, 1),  # type: ignore[arg-type]  # wrong on purpose
        Button(200, 0, True), Motion(200, -1, 0),
        Motion(200, 0, 40000), End(300), SyncMark(200, 0, 0, 0, 1, b"x", ""), SyncMark(200, 0, 0, 1, 1, b"", ""),
        SyncMark(200, 0, 0, 1, 1, b"x", "x" * 65), "not an event",
    ]
    for ev in bad:
        with pytest.raises(LogFormatError):
            enc.add(ev)
    enc.end()
    with pytest.raises(LogFormatError):
        enc.add(Key(500, 38, True))
    with pytest.raises(LogFormatError):
        enc.end()
    for h in [LogHeader(0, 800, "us", "", 0, ""), LogHeader(1, 1, "us", "", -1, ""),
              LogHeader(1, 1, "x" * 300, "", 0, ""), LogHeader(1, 1, "us", "", 0, "", format_version=2)]:
        with pytest.raises(LogFormatError):
            LogEncoder(h)
    with pytest.raises(LogFormatError):
        LogEncoder(HEADER, frame_events=0)
    with pytest.raises(LogFormatError):
        encode_log(HEADER, [End(5), Key(6, 38, True)])


def test_region_digest() -> None:
    d = lf.region_digest(bytes(64 * 64 * 3))
    assert len(d) == lf.SYNC_DIGEST_BYTES
    assert d != lf.region_digest(b"\x01" + bytes(64 * 64 * 3 - 1))


# --------------------------------------------------------------------------------------- files, CLI


def test_write_read_log_and_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "s.rmlog"
    events: list[lf.Event] = [Motion(1000, 5, 5), Key(200_000, 38, True), Key(260_000, 38, False)]
    n = lf.write_log(str(p), HEADER, events)
    assert p.stat().st_size == n
    log = lf.read_log(str(p))
    assert list(log.events[:-1]) == events
    assert lf.main([str(p)]) == 0
    out = capsys.readouterr().out
    assert "1280x800" in out and "key_press" in out and "bytes/event" in out and "duration         0.260 s" in out
    p.write_bytes(p.read_bytes()[:-3])
    assert lf.main([str(p)]) == LogFormatError.exit_code
    assert "truncated" in capsys.readouterr().err
    with pytest.raises(LogFormatError, match="larger than"):
        lf.read_log(str(tmp_path / "s.rmlog"), max_log_bytes=10)
    assert lf.main([str(tmp_path / "missing")]) == 1


# -- fuzz: the target `make fuzz` runs on 100,000 inputs (bench/fuzz_targets), here on a few -------------

test_fuzz_log, test_fuzz_log_raw_bytes = fuzz_tests("log", examples=200)


def test_a_relay_ends_a_log_it_did_not_encode() -> None:
    """``LogDecoder.end_frame``: a migration's source ends the log it forwarded from its agent."""
    events: list[lf.Event] = [Key(10, 38, True), Key(20, 38, False), Motion(30, 5, 6)]
    unended = encode_log(HEADER, events, end=False)
    dec = LogDecoder()
    dec.feed(unended)
    assert decode_log(unended + dec.end_frame()).events == (*events, End(30))
    assert decode_log(unended + dec.end_frame()).ended


def test_only_a_whole_unended_log_can_be_ended() -> None:
    events = [Key(10, 38, True), Key(20, 38, False)]
    unended = encode_log(HEADER, events, end=False)
    whole = encode_log(HEADER, events)
    with pytest.raises(LogFormatError):
        LogDecoder().end_frame()                         # no header
    dec = LogDecoder()
    dec.feed(unended[:-2])
    with pytest.raises(LogFormatError):
        dec.end_frame()                                  # in the middle of a frame
    dec = LogDecoder()
    dec.feed(whole)
    with pytest.raises(LogFormatError):
        dec.end_frame()                                  # ended already


def _frames(n: int) -> list[bytes]:
    enc = LogEncoder(HEADER, frame_events=1, motion_window_us=0)
    out = [enc.start().data]
    for i in range(n):
        out += [f.data for f in enc.add(Key(1000 * (i + 1), 38, i % 2 == 0))]
    return out


def test_a_log_goes_on_from_a_checkpoints_cut() -> None:
    """After a checkpoint taken while the agent recorded, the log's header is followed by the first
    frame the checkpoint does not hold (store.chain): the frames before it are not replayed twice."""
    frames = _frames(5)                                  # header + frames 1..5
    dec = LogDecoder(resume_at=3, origin_us=HEADER.clock_origin_us)
    got = [f for data in (frames[0], *frames[3:]) for f in dec.feed(data)]
    assert [f.seq for f in got] == [0, 3, 4, 5]
    assert [e.t_us for f in got if isinstance(f, EventsFrame) for e in f.events] == [3000, 4000, 5000]
    with pytest.raises(LogFormatError, match="seq 1, expected 3"):      # the checkpoint holds frame 1
        LogDecoder(resume_at=3, origin_us=HEADER.clock_origin_us).feed(frames[0] + frames[1])
    # an agent started since the checkpoint (another clock origin): its whole log is new
    other = LogDecoder(resume_at=3, origin_us=HEADER.clock_origin_us + 1)
    assert [f.seq for data in frames for f in other.feed(data)] == [0, 1, 2, 3, 4, 5]
    with pytest.raises(LogFormatError, match="seq 3, expected 1"):
        other2 = LogDecoder(resume_at=3, origin_us=HEADER.clock_origin_us + 1)
        other2.feed(frames[0] + frames[3])
