"""Fuzz targets of the recorder's decoders: the input log (recorder.logformat) and the
virtio-serial channel (recorder.channel), both ends."""

from __future__ import annotations

import functools
import random
import struct
import zlib
from collections.abc import Callable
from typing import Any

import msgpack

from bench.fuzz import (
    interesting_int,
    mutate_bytes,
    mutate_obj,
    random_obj,
)
from bench.fuzz_targets.common import _packb
from recorder import channel as ch
from recorder import logformat as lf
from replay_migrate.errors import LogFormatError, ReplayMigrateError

# -- the input log (recorder.logformat) ------------------------------------------------------------------


def _events(rng: random.Random, n: int) -> list[lf.Event]:
    t = 0
    out: list[lf.Event] = []
    for _ in range(n):
        t += rng.choice((0, 1, 999, 20_000, 250_000, rng.randrange(1 << 24)))
        k = rng.randrange(5)
        if k == 0:
            out.append(lf.Key(t, rng.randint(8, 255), rng.random() < 0.5))
        elif k == 1:
            out.append(lf.Button(t, rng.randint(1, 9), rng.random() < 0.5))
        elif k == 2:
            out.append(lf.SyncMark(t, rng.randrange(1000), rng.randrange(700), rng.randint(1, 64), rng.randint(1, 64),
                                   rng.randbytes(lf.SYNC_DIGEST_BYTES), rng.choice(("", "click", "typed"))))
        else:
            out.append(lf.Motion(t, rng.randrange(1920), rng.randrange(1080)))
    return out


def _log(rng: random.Random) -> bytes:
    header = lf.LogHeader(rng.choice((1024, 1920, 1)), rng.choice((768, 1080, 32767)), "us",
                          rng.choice(("", "ck-1")), rng.randrange(1 << 52), "fuzz")
    return lf.encode_log(header, _events(rng, rng.randrange(0, 40)), end=rng.random() < 0.8,
                         motion_window_us=rng.choice((0, 20_000)), frame_events=rng.choice((1, 3, 16, 256)))


def _split_frames(data: bytes) -> list[bytes]:
    """The frames of a valid log (as the encoder wrote them)."""
    out, pos = [], 0
    while pos + lf.FRAME_OVERHEAD <= len(data):
        n = int.from_bytes(data[pos + 8 : pos + 12], "big")
        out.append(data[pos : pos + lf.FRAME_OVERHEAD + n])
        pos += lf.FRAME_OVERHEAD + n
    return out


def _log_frame(version: int, ftype: int, seq: int, payload: bytes, length: int | None = None) -> bytes:
    """A log frame with a valid CRC over whatever prefix it is given."""
    head = struct.pack(">2sBBII", lf.MAGIC, version, ftype, seq, len(payload) if length is None else length)
    return head + payload + struct.pack(">I", zlib.crc32(payload, zlib.crc32(head)))


def mutate_log_frame(rng: random.Random, frame: bytes) -> bytes:
    """One log frame mutated past its checksum: payload values, prefix fields, raw payload bytes."""
    if len(frame) < lf.FRAME_OVERHEAD:
        return mutate_bytes(rng, frame)
    _, version, ftype, seq, _ = struct.unpack_from(">2sBBII", frame)
    payload = frame[12:-4]
    op = rng.randrange(6)
    if op <= 2:
        try:
            obj = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except Exception:
            obj = random_obj(rng)
        payload = _packb(mutate_obj(rng, obj))
    elif op == 3:
        payload = mutate_bytes(rng, payload)
    elif op == 4:
        field = rng.randrange(4)
        if field == 0:
            version = rng.choice((0, 2, 255))
        elif field == 1:
            ftype = rng.choice((0, 1, 2, 255))
        elif field == 2:
            seq = interesting_int(rng, seq) % (1 << 32)
        else:
            return _log_frame(version, ftype, seq, payload, interesting_int(rng, len(payload)) % (1 << 32))
    else:
        return mutate_bytes(rng, frame)  # the CRC no longer matches
    return _log_frame(version, ftype, seq, payload)


def _mutate_frames(rng: random.Random, frames: list[bytes], mutate_one: Callable[[random.Random, bytes], bytes],
                   extra: Callable[[random.Random], bytes]) -> list[bytes]:
    frames = list(frames)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(16)
        i = rng.randrange(len(frames)) if frames else 0
        if op <= 11 and frames:
            frames[i] = mutate_one(rng, frames[i])
        elif op == 6 and frames:
            del frames[i]
        elif op == 7 and frames:
            frames.insert(rng.randrange(len(frames) + 1), frames[i])
        elif op == 8 and len(frames) > 1:
            j = rng.randrange(len(frames))
            frames[i], frames[j] = frames[j], frames[i]
        else:
            frames.insert(rng.randrange(len(frames) + 1), extra(rng))
    return frames


def _resequence(frames: list[bytes]) -> list[bytes]:
    """Frames numbered 0, 1, ... again (valid CRCs), so a dropped, repeated or foreign frame gets
    past the sequence check to the time and end-of-log checks."""
    out = []
    for seq, f in enumerate(frames):
        if len(f) >= lf.FRAME_OVERHEAD and f[:2] == lf.MAGIC:
            _, version, ftype, _, length = struct.unpack_from(">2sBBII", f)
            f = _log_frame(version, ftype, seq, f[12:-4], length)
        out.append(f)
    return out


def generate_log(rng: random.Random) -> bytes:
    data = _log(rng)
    if rng.random() < 0.05:
        return data
    if rng.random() < 0.15:
        return mutate_bytes(rng, data)
    frames = _mutate_frames(rng, _split_frames(data), mutate_log_frame, lambda r: r.choice(_split_frames(_log(r))))
    return b"".join(_resequence(frames) if rng.random() < 0.3 else frames)


def run_log(data: bytes) -> None:
    """Decode a whole log, and the same bytes fed in pieces; what is accepted must be consistent."""
    try:
        log = lf.decode_log(data, require_end=False)
    except LogFormatError:
        log = None
    if log is not None:
        times = [ev.t_us for ev in log.events]
        assert times == sorted(times), "decoded event times go back"
        assert not any(isinstance(ev, lf.End) for ev in log.events[:-1]), "an event after the end of the log"
    dec = lf.LogDecoder()
    step = 1 + len(data) % 61
    frames: list[lf.Frame] = []
    for i in range(0, len(data), step):
        frames += dec.feed(data[i : i + step])
    dec.close(require_end=False)
    if log is not None:
        events = [ev for f in frames if isinstance(f, lf.EventsFrame) for ev in f.events]
        assert tuple(events) == log.events, "incremental decoding disagrees with whole decoding"
    try:
        _, _, total = lf.peek_frame(data)
    except LogFormatError:
        return
    if total <= len(data):
        lf.decode_frame(data[:total])


# -- the recorder channel (recorder.channel) --------------------------------------------------------------

TOKEN = b"\x01" * ch.TOKEN_BYTES
AGENT_SESSION = b"\x02" * ch.TOKEN_BYTES


def channel_message(mtype: int, body: Any) -> bytes:
    """A channel message with a valid CRC around any body (``recorder.channel`` framing)."""
    payload = _packb(body)
    head = struct.pack(">2sBI", ch.MSG_MAGIC, mtype, len(payload))
    return head + payload + struct.pack(">I", zlib.crc32(payload, zlib.crc32(head)))


def _mutate_channel_message(rng: random.Random, msg: bytes) -> bytes:
    if len(msg) < ch.MSG_OVERHEAD:
        return mutate_bytes(rng, msg)
    mtype = msg[2]
    try:
        body = msgpack.unpackb(msg[7:-4], raw=False, strict_map_key=False)
    except Exception:
        body = random_obj(rng)
    op = rng.randrange(8)
    if op <= 3:
        return channel_message(mtype, mutate_obj(rng, body))
    if op == 4 and isinstance(body, list) and len(body) == 2 and isinstance(body[1], bytes):  # a FRAME
        return channel_message(mtype, [body[0], mutate_log_frame(rng, body[1])])
    if op == 5:
        return channel_message(rng.choice([int(t) for t in ch.MsgType] + [0, 255]), body)
    if op == 6:  # a length field that lies, with a CRC that matches the lie
        payload = msg[7:-4]
        head = struct.pack(">2sBI", ch.MSG_MAGIC, mtype, interesting_int(rng, len(payload)) % (1 << 32))
        return head + payload + struct.pack(">I", zlib.crc32(payload, zlib.crc32(head)))
    return mutate_bytes(rng, msg)


def _agent_stream(rng: random.Random) -> list[bytes]:
    """What an agent sends a host: hello answering the attach, log frames, echoes, check answers."""
    frames = _split_frames(_log(rng))
    out = [channel_message(ch.MsgType.HELLO, [ch.CHANNEL_VERSION, TOKEN, AGENT_SESSION, "fuzz", 1920, 1080, "us",
                                              len(frames), 0])]
    for seq, frame in enumerate(frames):
        out.append(channel_message(ch.MsgType.FRAME, [seq, frame]))
        if rng.random() < 0.3:
            out.append(channel_message(ch.MsgType.ECHO, [rng.randrange(100)]))
        if rng.random() < 0.2:
            out.append(channel_message(ch.MsgType.CHECKED, [rng.randrange(100), rng.randbytes(8)]))
    return out


def generate_channel_host(rng: random.Random) -> bytes:
    msgs = _agent_stream(rng)
    if rng.random() < 0.05:
        return b"".join(msgs)
    msgs = _mutate_frames(rng, msgs, _mutate_channel_message,
                          lambda r: r.choice((r.randbytes(r.randint(1, 40)), b"Rc", r.choice(_agent_stream(r)))))
    return b"".join(msgs)


def run_channel_host(data: bytes) -> None:
    """The host side reads an agent's stream; frames it delivers must be in order, once each."""
    host = ch.HostSide(token_source=lambda: TOKEN)
    host.connect()
    host.data_to_send()
    step = 1 + len(data) % 97
    last = -1
    for i in range(0, len(data), step):
        for ev in host.receive_data(data[i : i + step]):
            if isinstance(ev, ch.LogFrame):
                assert ev.seq > last, "a log frame delivered out of order or twice"
                last = ev.seq
                lf.peek_frame(ev.data)
                host.ack(ev.seq)
        host.data_to_send()


def _host_stream(rng: random.Random) -> list[bytes]:
    """What a host sends an agent: attach, acks, expects, checks."""
    out = [channel_message(ch.MsgType.ATTACH, [ch.CHANNEL_VERSION, TOKEN,
                                               rng.choice((AGENT_SESSION, b"", b"other")), rng.randrange(4)])]
    for _ in range(rng.randrange(8)):
        k = rng.randrange(4)
        if k == 0:
            out.append(channel_message(ch.MsgType.ACK, [rng.randrange(6)]))
        elif k == 1:
            ev = rng.choice([e for e in _events(rng, 4) if not isinstance(e, lf.SyncMark)] or [lf.Key(0, 38, True)])
            out.append(channel_message(ch.MsgType.EXPECT, [rng.randrange(50), int(ev.kind), *lf.event_fields(ev)]))
        elif k == 2:
            out.append(channel_message(ch.MsgType.CHECK, [rng.randrange(50), 10, 20, 30, 40]))
        else:
            out.append(channel_message(ch.MsgType.ATTACH, [ch.CHANNEL_VERSION, TOKEN, AGENT_SESSION, rng.randrange(6)]))
    return out


def generate_channel_agent(rng: random.Random) -> bytes:
    msgs = _host_stream(rng)
    if rng.random() < 0.05:
        return b"".join(msgs)
    msgs = _mutate_frames(rng, msgs, _mutate_channel_message,
                          lambda r: r.choice((r.randbytes(r.randint(1, 40)), b"Rc", r.choice(_host_stream(r)))))
    return b"".join(msgs)


@functools.cache
def _agent_frames() -> tuple[bytes, ...]:
    return tuple(_split_frames(_log(random.Random(3))))


def run_channel_agent(data: bytes) -> None:
    """The agent side reads a host's stream. Its contract is stricter: it never raises on input."""
    agent = ch.AgentSide(agent_version="fuzz", width=1920, height=1080, keymap="us", session=AGENT_SESSION,
                         resend_limit_bytes=256, fallback=lambda seq: None)
    for seq, frame in enumerate(_agent_frames()):
        agent.add_frame(seq, frame)
    step = 1 + len(data) % 89
    try:
        for i in range(0, len(data), step):
            for ev in agent.receive_data(data[i : i + step]):
                if isinstance(ev, ch.CheckRequested):
                    agent.checked(ev.req_id, b"\x00" * 8)
                elif isinstance(ev, ch.Expected) and not ev.echoed:
                    agent.captured(ev.event)
            while agent.data_to_send(max_bytes=512):
                pass
    except ReplayMigrateError as e:
        raise AssertionError(f"AgentSide.receive_data raised on input: {e!r}") from e
