"""The fuzz targets: every decoder that takes bytes from a peer or a file (see ``bench.fuzz``).

Each target is a plain function ``input bytes -> None`` that may raise only project errors, and a
generator that builds a structurally valid input and mutates it where it matters: a log or channel
stream with valid CRCs, protocol message sequences recorded from real transfers (with compressed
batch bodies re-compressed after their content was mutated, or replaced by frames that lie about
their size), synthetic save images with every header and section field known, tree and leaf-digest
files. Some targets also check an invariant on what they accept (a verified transfer wrote the
source's bytes; decoded event times never go back), so an acceptance that should not happen is a
failure too.

**Registering a target** is one line in :func:`targets`. For a decoder whose module defines a
target function and a few valid inputs to mutate (or its own generator), without an import::

    external("session", "server.session:fuzz_message", seeds="server.session:FUZZ_SEEDS"),
    external("cli-files", "cli.main:fuzz_file_argument", generate="cli.main:fuzz_generate"),
"""

from __future__ import annotations

import atexit
import functools
import importlib
import io
import os
import random
import shutil
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import msgpack
import numpy as np
import zstandard
from numpy.lib import format as np_format

from bench.fuzz import (
    DEFAULT_RSS_BOUND_MIB,
    FuzzTarget,
    check_input,
    interesting_int,
    mutate_bytes,
    mutate_obj,
    mutating,
    random_obj,
)
from differ.blocks import LeafDigests, MemoryImageSource
from differ.memsource import MemoryImage, MemorySource
from differ.merkle import MerkleTree, load_or_build
from differ.protocol import (
    ProtocolParams,
    ReferenceImage,
    Source,
    SourceImage,
    SourceState,
    Target,
    TargetImage,
    TargetState,
)
from differ.saveimage import SaveImage, parse_save_image
from differ.source import LEAF_SIZE
from recorder import channel as ch
from recorder import logformat as lf
from replay_migrate.errors import LogFormatError, ReplayMigrateError
from vm import savehdr

PAGE = LEAF_SIZE

# -- scratch files -------------------------------------------------------------------------------------


@functools.cache
def _scratch_dir() -> Path:
    """A private directory for the file targets (tmpfs when there is one: inputs are KiB)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="rm-fuzz-", dir=base))
    atexit.register(shutil.rmtree, path, True)
    return path


def _scratch(name: str, data: bytes) -> Path:
    path = _scratch_dir() / name
    path.write_bytes(data)
    return path


def _packb(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


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


# -- the diff protocol (differ.protocol) -------------------------------------------------------------------

KEY = bytes(range(32))
PROTOCOL_PARAMS = ProtocolParams(max_message_bytes=64 << 10, max_batch_entries=64, window=2)
"""Small batches and windows, so a short transfer has several of each message."""


def _page(rng: random.Random, kind: str) -> bytes:
    if kind == "zero":
        return bytes(PAGE)
    if kind == "text":
        return (rng.choice((b"abcd", b"hello world ", b"\x00\x01")) * PAGE)[:PAGE]
    return rng.randbytes(PAGE)


def _scenario_images(k: int) -> tuple[dict[str, bytes], dict[str, bytes], dict[str, bytes], list[bytes]]:
    """Scenario ``k``: (source images A, target images B, common bases, target references)."""
    rng = random.Random(f"scenario-{k}")
    names = ("disk",) if k % 2 == 0 else ("memory", "disk")
    a: dict[str, bytes] = {}
    b: dict[str, bytes] = {}
    bases: dict[str, bytes] = {}
    for name in names:
        n = rng.randint(12, 40)
        base = [_page(rng, rng.choice(("zero", "text", "rand"))) for _ in range(n)]
        src, tgt = list(base), list(base)
        for i in rng.sample(range(n), n // 3):  # both sides changed (replay), differently or alike
            src[i] = _page(rng, rng.choice(("text", "rand", "zero")))
            tgt[i] = src[i] if rng.random() < 0.4 else _page(rng, "rand")
        for i in rng.sample(range(n), n // 6):  # a few bytes of a page
            p = bytearray(src[i])
            p[rng.randrange(PAGE)] ^= 0xFF
            src[i] = bytes(p)
        if n > 4:
            src[-1] = src[1]  # a duplicate
        tail = rng.choice((0, 0, 100))
        a[name] = b"".join(src) + rng.randbytes(tail) + (b"".join(_page(rng, "text") for _ in range(k % 3)))
        b[name] = b"".join(tgt)
        if k % 3 != 2:
            bases[name] = b"".join(base)
    refs = [b"".join(_page(rng, "rand") for _ in range(4)) + a[names[0]][:PAGE * 2]] if k % 4 == 1 else []
    return a, b, bases, refs


N_SCENARIOS = 6


@functools.cache
def _scenario_trees(k: int) -> dict[str, Any]:
    a, b, bases, refs = _scenario_images(k)
    tree = functools.partial(MerkleTree.from_bytes, fanout=4)
    return {"a": a, "b": b, "bases": bases, "refs": refs,
            "ta": {n: tree(d) for n, d in a.items()}, "tb": {n: tree(d) for n, d in b.items()},
            "tbase": {n: MerkleTree.from_bytes(d) for n, d in bases.items()},
            "tref": [MerkleTree.from_bytes(r) for r in refs]}


def _base(s: dict[str, Any], name: str) -> ReferenceImage | None:
    return ReferenceImage(MemorySource(s["bases"][name]), s["tbase"][name]) if name in s["bases"] else None


def _source(k: int) -> Source:
    s = _scenario_trees(k)
    return Source([SourceImage(n, MemorySource(d), s["ta"][n], base=_base(s, n)) for n, d in s["a"].items()],
                  PROTOCOL_PARAMS)


def _target(k: int) -> tuple[Target, dict[str, MemoryImage]]:
    s = _scenario_trees(k)
    images = {n: MemoryImage(d) for n, d in s["b"].items()}
    target = Target(
        [TargetImage(n, im.source(), s["tb"][n], im.sink(), base=_base(s, n)) for n, im in images.items()],
        PROTOCOL_PARAMS,
        references=[ReferenceImage(MemorySource(r), t) for r, t in zip(s["refs"], s["tref"], strict=True)],
        key=KEY,
    )
    return target, images


@functools.cache
def recorded_transfer(k: int) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """A real transfer of scenario ``k``: (source→target messages, target→source messages)."""
    source, (target, _) = _source(k), _target(k)
    target.start()
    to_target: list[bytes] = []
    to_source: list[bytes] = []
    for _ in range(10_000):
        moved = False
        for m in target.data_to_send():
            moved = True
            to_source.append(m)
            source.receive_data(m)
        for m in source.data_to_send():
            moved = True
            to_target.append(m)
            target.receive_data(m)
        if not moved:
            break
    assert target.state is TargetState.VERIFIED and source.state is SourceState.VERIFIED
    return tuple(to_target), tuple(to_source)


def zstd_frame_declaring(size: int, rle_blocks: int = 0, fill: int = 0) -> bytes:
    """A zstd frame that declares ``size`` bytes and holds ``rle_blocks`` RLE blocks of 128 KiB."""
    head = struct.pack("<IBB", 0xFD2FB528, 0xC0, 7 << 3) + struct.pack("<Q", size)
    if not rle_blocks:
        return head + (1).to_bytes(3, "little")
    return head + b"".join(((128 << 10) << 3 | 1 << 1 | (j == rle_blocks - 1)).to_bytes(3, "little") + bytes([fill])
                           for j in range(rle_blocks))


def _unzstd(z: object, limit: int = 1 << 22) -> bytes:
    """What a (possibly already mutated) zstd frame holds, for a generator: b"" unless it is an
    honest frame of at most ``limit`` bytes (the generator must not fall for a bomb either)."""
    if not isinstance(z, bytes):
        return b""
    try:
        if not 0 <= zstandard.get_frame_parameters(z).content_size <= limit:
            return b""
        return bytes(zstandard.ZstdDecompressor().decompress(z, max_output_size=limit))
    except zstandard.ZstdError:
        return b""


def _mutate_body(rng: random.Random, body: bytes) -> bytes:
    """A compressed batch body: its content mutated and re-compressed (so it reaches the checks
    after decompression), or a frame that lies about its size, or damaged compressed bytes."""
    op = rng.randrange(9)
    if op <= 2:
        return bytes(zstandard.ZstdCompressor().compress(mutate_bytes(rng, body)))
    if op == 3:  # a bomb: few bytes declaring (and some inflating to) far more than the batch holds
        return zstd_frame_declaring(rng.choice((1 << 44, 1 << 36, 1 << 30)), rle_blocks=rng.choice((0, 1, 8, 8192)))
    if op == 8:
        return zstd_frame_declaring(rng.choice((len(body) + 1, len(body), max(0, len(body) - 1))),
                                    rle_blocks=rng.choice((0, 1, 8)), fill=rng.randrange(256))
    if op == 4:
        return bytes(zstandard.ZstdCompressor(write_content_size=False).compress(body))
    if op == 5:
        z = bytes(zstandard.ZstdCompressor().compress(body))
        return z + rng.choice((z, b"\x00", bytes(zstandard.ZstdCompressor().compress(b"x"))))
    return mutate_bytes(rng, bytes(zstandard.ZstdCompressor().compress(body)))


def _mutate_bits(rng: random.Random, bits: bytes) -> bytes:
    if bits and rng.random() < 0.7:
        b = bytearray(bits)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    return mutate_bytes(rng, bits)


def mutate_protocol_message(rng: random.Random, data: bytes) -> bytes:
    """One protocol message, decoded and mutated where it matters: a batch's compressed body, its
    answer kinds, digest rests and delta bitmaps; walk and want bitmaps, digests and levels; image
    shapes; any field at all (generic); or split into fragments that may lie."""
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:
        return mutate_bytes(rng, data)
    if not isinstance(msg, dict):
        return _packb(mutate_obj(rng, msg))
    op = rng.randrange(10)
    t = msg.get("t")
    if op <= 1 and t == "blocks" and isinstance(msg.get("k"), bytes):
        return _packb(_rewrite_blocks(rng, msg))
    if op <= 1 and t == "want" and isinstance(msg.get("p"), list):
        return _packb(_rewrite_want(rng, msg))
    if op <= 2 and t in ("tree", "hello") and isinstance(msg.get("img"), list) and msg["img"]:
        return _packb(_reshape(rng, msg))
    if op <= 3 and t == "blocks":
        field = rng.choice(("z", "z", "z", "k", "h", "dm", "o", "n", "r"))
        if field == "z" and "z" in msg:
            msg["z"] = _mutate_body(rng, _unzstd(msg["z"]))
        elif field == "r" and "z" in msg:
            msg["r"] = _unzstd(msg.pop("z"))
        elif field in msg and isinstance(msg[field], bytes):
            msg[field] = bytes(rng.randrange(6) for _ in msg[field]) if field == "k" and rng.random() < 0.5 \
                else _mutate_bits(rng, msg[field])
        else:
            msg = mutate_obj(rng, msg)
    elif op <= 5 and t in ("tree", "walk", "want", "hello") and isinstance(msg.get(_PARTS.get(t, "")), list):
        key = _PARTS[t]
        parts = msg[key]
        live = [i for i, p in enumerate(parts) if isinstance(p, dict)]
        if live:
            i = rng.choice(live)
            part = dict(parts[i])
            if not part:
                return _packb(mutate_obj(rng, msg))
            f = rng.choice(list(part))
            v = part[f]
            part[f] = _mutate_bits(rng, v) if isinstance(v, bytes) else interesting_int(rng, v) \
                if isinstance(v, int) and not isinstance(v, bool) else mutate_obj(rng, v)
            parts = list(parts)
            parts[i] = part
            msg[key] = parts
        else:
            msg = mutate_obj(rng, msg)
    elif op == 6 and t != "frag":
        return rng.choice(_fragments(rng, msg))
    else:
        fields = [f for f in msg if f not in ("t", "v")]
        if fields and rng.random() < 0.85:  # mostly a field of the message, not its type or version
            f = rng.choice(fields)
            msg[f] = mutate_obj(rng, msg[f])
        else:
            msg = mutate_obj(rng, msg)
    return _packb(msg)


_PARTS = {"tree": "p", "walk": "p", "want": "p", "hello": "img"}
_SUB = PROTOCOL_PARAMS.sub_block_size
_FP = PROTOCOL_PARAMS.fingerprint_bytes
_N_SUB = PAGE // _SUB


def _rewrite_blocks(rng: random.Random, msg: dict[str, Any]) -> dict[str, Any]:
    """A batch re-encoded consistently after one of its answers changed kind or content, so the
    change gets past the layout checks to the per-kind and digest checks: a leaf sent whole
    instead of confirmed, a delta with other sub-blocks, an XOR where no base is, a flipped byte,
    two answers swapped. (Leaves are taken as whole pages; an image's short last leaf is not.)"""
    kinds = list(msg["k"])
    raw, dm = msg.get("r"), msg.get("dm")
    body: bytes = raw if isinstance(raw, bytes) else _unzstd(msg.get("z"))
    masks: bytes = dm if isinstance(dm, bytes) else b""
    entries: list[list[Any]] = []  # [kind, delta mask, payload]
    b_off = m_off = 0
    for kind in kinds:
        mask, payload = b"", b""
        if kind in (2, 4):  # FULL, XBASE
            payload, b_off = body[b_off : b_off + PAGE], b_off + PAGE
        elif kind == 3:  # DELTA
            mask, m_off = masks[m_off : m_off + _N_SUB // 8], m_off + _N_SUB // 8
            n = sum(bin(x).count("1") for x in mask)
            payload, b_off = body[b_off : b_off + n * _SUB], b_off + n * _SUB
        entries.append([kind, mask, payload])
    if entries:
        j = rng.randrange(len(entries))
        op = rng.randrange(5)
        if op == 0:  # another kind, with a payload of its shape
            kind = rng.randrange(6)
            mask = bytes(rng.choice((0, 1, 0x80, 0xFF, rng.randrange(256))) for _ in range(_N_SUB // 8))
            n = sum(bin(x).count("1") for x in mask)
            payload = {2: rng.randbytes(PAGE), 4: rng.randbytes(PAGE), 3: rng.randbytes(n * _SUB)}.get(kind, b"")
            entries[j] = [kind, mask if kind == 3 else b"", payload]
        elif op <= 2 and entries[j][2]:  # a flipped byte in what the leaf is built from
            p = bytearray(entries[j][2])
            p[rng.randrange(len(p))] ^= 1 << rng.randrange(8)
            entries[j][2] = bytes(p)
        elif op == 3 and len(entries) > 1:
            i = rng.randrange(len(entries))
            entries[i], entries[j] = entries[j], entries[i]
        else:
            entries[j][2] = entries[j][2][: rng.randrange(len(entries[j][2]) + 1)]
    body = b"".join(e[2] for e in entries)
    out = {**msg, "k": bytes(e[0] for e in entries), "dm": b"".join(e[1] for e in entries)}
    out.pop("r", None)
    out.pop("z", None)
    if rng.random() < 0.8 and body:
        out["z"] = bytes(zstandard.ZstdCompressor().compress(body))
    else:
        out["r"] = body
    return out


def _reshape(rng: random.Random, msg: dict[str, Any]) -> dict[str, Any]:
    """A tree or hello whose image entry announces another size, consistently (the leaf count that
    goes with it), so the size gets past the shape check to what the side does with it: grown a
    little, doubled, huge, at and past the limits."""
    img = list(msg["img"])
    i = rng.randrange(len(img))
    entry = dict(img[i]) if isinstance(img[i], dict) else {}
    raw = entry.get("s")
    old: int = raw if isinstance(raw, int) else 0
    size = rng.choice((0, 1, PAGE, old + 1, old + PAGE, 2 * old, 3 * old + (64 << 20), 1 << 36, (1 << 24) * PAGE,
                       (1 << 28) * PAGE, (1 << 28) * PAGE + 1, (1 << 32) * PAGE, rng.randrange(1 << 40)))
    entry["s"], entry["l"] = size, -(-size // PAGE)
    if rng.random() < 0.3:
        entry["f"] = rng.choice((2, 3, 4, 16, 256))
    img[i] = entry
    return {**msg, "img": img}


def _rewrite_want(rng: random.Random, msg: dict[str, Any]) -> dict[str, Any]:
    """A want re-encoded consistently after one request changed kind: the candidates, duplicate
    positions and fingerprints resized to what the new kinds need, with duplicate positions that
    may point anywhere (forward, at themselves, far away)."""
    parts = list(msg["p"])
    live = [i for i, p in enumerate(parts) if isinstance(p, dict) and isinstance(p.get("k"), bytes) and p["k"]]
    if not live:
        return msg
    i = rng.choice(live)
    part = dict(parts[i])
    kinds = bytearray(part["k"])
    kinds[rng.randrange(len(kinds))] = rng.randrange(7)
    part["k"] = bytes(kinds)
    n_dup = kinds.count(4)
    part["u"] = b"".join(rng.choice((0, 1, len(kinds), (1 << 32) - 1, rng.randrange(64))).to_bytes(4, "little")
                         for _ in range(n_dup))
    need = kinds.count(1) * _N_SUB * _FP
    raw = part.get("f")
    f: bytes = raw if isinstance(raw, bytes) else b""
    part["f"] = (f + rng.randbytes(max(0, need - len(f))))[:need]
    part["c"] = b""  # check_bytes is 0: a reference confirmation carries nothing
    parts[i] = part
    return {**msg, "p": parts}


def _fragments(rng: random.Random, msg: dict[str, Any]) -> list[bytes]:
    """``msg`` as fragment frames (the protocol's framing), one of which may lie about its place."""
    whole = _packb(msg)
    n = rng.randint(2, 4)
    step = -(-len(whole) // n)
    frames: list[Any] = [
        {"t": "frag", "v": msg.get("v", 2), "lt": msg.get("t"), "i": i, "n": n, "d": whole[i * step : (i + 1) * step]}
        for i in range(n)
    ]
    if rng.random() < 0.5:
        j = rng.randrange(n)
        frames[j] = mutate_obj(rng, frames[j])
    return [_packb(f) for f in frames]


def _protocol_input(rng: random.Random, direction: int) -> bytes:
    k = rng.randrange(N_SCENARIOS)
    msgs = list(recorded_transfer(k)[direction])
    if rng.random() > 0.03:
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(12)
            i = _pick(rng, [_kind(m) for m in msgs])
            if op <= 7:
                msgs[i] = mutate_protocol_message(rng, msgs[i])
            elif op == 8:
                del msgs[i]
            elif op == 9:
                msgs.insert(i, msgs[rng.randrange(len(msgs))])
            elif op == 10:
                try:
                    msg = msgpack.unpackb(msgs[i], raw=False, strict_map_key=False)
                except Exception:
                    msg = None
                msgs[i : i + 1] = _fragments(rng, msg) if isinstance(msg, dict) else [mutate_bytes(rng, msgs[i])]
            elif direction == 1 and rng.random() < 0.5:  # a reconnected target resumes from some batch
                n = rng.choice((0, 1, 2, 3, -1, 1 << 32, (1 << 32) + 1))
                msgs.insert(i, _packb({"t": "resume", "v": 2, "n": n}))
            else:
                other = recorded_transfer(rng.randrange(N_SCENARIOS))[direction]
                msgs.insert(i, rng.choice(other))
    return _packb([k, msgs])


def _kind(data: bytes) -> str:
    try:
        t = msgpack.unpackb(data, raw=False, strict_map_key=False).get("t", "")
    except Exception:
        return ""
    return t if isinstance(t, str) else ""


def _pick(rng: random.Random, kinds: list[str]) -> int:
    """A message to mutate: mostly a block batch, else a walk, want, tree or hello, else any."""
    r = rng.random()
    for want, p in (({"blocks"}, 0.5), ({"walk", "want", "tree", "hello"}, 0.8)):
        pool = [i for i, k in enumerate(kinds) if k in want]
        if pool and r < p:
            return rng.choice(pool)
    return rng.randrange(len(kinds))


def _unpack_input(data: bytes, direction: int) -> tuple[int, list[bytes]]:
    """The (scenario, messages) of a protocol target's input. Bytes that are not in that format
    (raw fuzz bytes) are one message, delivered after a prefix of a recorded transfer that both
    depend on the bytes: so raw bytes too reach a side in every state."""
    try:
        k, msgs = msgpack.unpackb(data, raw=False)
        if type(k) is int and 0 <= k < N_SCENARIOS and isinstance(msgs, list):
            return k, [m for m in msgs if isinstance(m, bytes)]
    except Exception:
        pass
    k = len(data) % N_SCENARIOS
    recorded = recorded_transfer(k)[direction]
    return k, [*recorded[: (data[0] if data else 0) % (len(recorded) + 1)], data]


def generate_protocol_target(rng: random.Random) -> bytes:
    return _protocol_input(rng, 0)


def run_protocol_target(data: bytes) -> None:
    """A target receives a (mutated) source's messages. If it ever verifies, every image it
    committed must be the source's, byte for byte: the root check is the guarantee."""
    k, msgs = _unpack_input(data, 0)
    target, images = _target(k)
    target.start()
    target.data_to_send()
    try:
        for m in msgs:
            if target.state in (TargetState.VERIFIED, TargetState.FAILED):
                break
            target.receive_data(m)
            target.data_to_send()
    finally:
        if target.state is TargetState.VERIFIED:
            a = _scenario_trees(k)["a"]
            assert all(images[n].data == a[n] for n in a), "the target verified images that are not the source's"
        else:
            assert all(images[n].data == _scenario_trees(k)["b"][n] for n in images), "unverified data committed"


def generate_protocol_source(rng: random.Random) -> bytes:
    return _protocol_input(rng, 1)


def run_protocol_source(data: bytes) -> None:
    """A source receives a (mutated) target's messages, and makes its batches as they ask."""
    k, msgs = _unpack_input(data, 1)
    source = _source(k)
    for m in msgs:
        if source.state in (SourceState.VERIFIED, SourceState.FAILED):
            break
        source.receive_data(m)
        source.data_to_send()


# -- save images (differ.saveimage, vm.savehdr, differ.blocks.MemoryImageSource) ---------------------------


def _idstr(s: bytes) -> bytes:
    return bytes([len(s)]) + s


Field = tuple[int, int, Literal["big", "little"]]
"""(offset, width, byte order) of a field of a synthetic save image."""


def build_save_image(rng: random.Random) -> tuple[bytes, list[Field]]:
    """A small synthetic sparse save image laid out as libvirt + QEMU write one (see
    ``differ.saveimage``), and its fields as (offset, width, byte order) to mutate."""
    fields: list[Field] = []
    xml = b"<domain><name>fz</name><uuid>00000000-0000-0000-0000-000000000001</uuid></domain>"
    cookie = b"<qemu-migration/>" if rng.random() < 0.8 else b""
    data_len = len(xml) + len(cookie) + 2 + rng.randrange(64)
    area = (xml + b"\0" + (cookie + b"\0" if cookie else b"")).ljust(data_len, b"\0")
    out = bytearray(struct.pack("<16s5I14I", b"LibvirtQemudSave", 2, data_len, 1, 6,
                                len(xml) + 1 if cookie else 0, *([0] * 14)))
    fields += [(16 + 4 * j, 4, "little") for j in range(5)]
    out += area
    stream = out
    fields.append((len(out) + 4, 4, "big"))
    stream += b"QEVM" + struct.pack(">I", 3)
    caps = [b"mapped-ram"] + ([b"x-ignore-shared"] if rng.random() < 0.2 else [])
    if rng.random() < 0.9:
        machine = b"pc-q35-10.0"
        fields.append((len(stream) + 1, 4, "big"))
        stream += b"\x07" + struct.pack(">I", len(machine)) + machine
        if rng.random() < 0.5:
            stream += b"\x05" + _idstr(b"configuration/target-page-bits") + struct.pack(">I", 1)
            fields.append((len(stream), 4, "big"))
            stream += struct.pack(">I", 12)
        if rng.random() < 0.2:  # unknown subsection: the parser searches for the ram section
            stream += b"\x05" + _idstr(b"configuration/x-future") + struct.pack(">I", 1) + b"\x00\x01ram"
        fields.append((len(stream) + 1 + 27 + 4, 4, "big"))
        stream += b"\x05" + _idstr(b"configuration/capabilities") + struct.pack(">I", 1)
        stream += struct.pack(">I", len(caps)) + b"".join(_idstr(c) for c in caps)
        if rng.random() < 0.2:
            stream += b"\x05" + _idstr(b"configuration/uuid") + struct.pack(">I", 1) + bytes(16)
    blocks = [(b"pc.ram", rng.randint(1, 24)), (b"pc.bios", rng.randint(1, 4)), (b"vga.vram", rng.randint(1, 8))]
    blocks = blocks[: rng.randint(1, 3)]
    ignored = rng.randrange(len(blocks)) if b"x-ignore-shared" in caps and rng.random() < 0.5 else -1
    total = sum(n for _, n in blocks) * PAGE
    section = len(stream)
    stream += b"\x01" + struct.pack(">I", 2) + _idstr(b"ram") + struct.pack(">II", 0, 4)
    fields += [(section + 1, 4, "big"), (section + 9, 4, "big"), (section + 13, 4, "big"), (section + 17, 8, "big")]
    stream += struct.pack(">Q", total | 0x04)
    for j, (name, npages) in enumerate(blocks):
        fields.append((len(stream), 1, "big"))
        stream += _idstr(name)
        fields.append((len(stream), 8, "big"))
        stream += struct.pack(">Q", npages * PAGE)
        if b"x-ignore-shared" in caps:
            stream += struct.pack(">Q", 0xFEED0000)
        hdr_at = len(stream)
        fields += [(hdr_at, 4, "big"), (hdr_at + 4, 8, "big"), (hdr_at + 12, 8, "big"), (hdr_at + 20, 8, "big")]
        if j == ignored:
            stream += struct.pack(">IQQQ", 1, PAGE, 0, 0)
            continue
        bitmap_at = hdr_at + 28
        bitmap_size = (npages + 63) // 64 * 8
        pages_at = -(-(bitmap_at + bitmap_size) // PAGE) * PAGE
        stream += struct.pack(">IQQQ", 1, PAGE, bitmap_at, pages_at)
        present = [rng.random() < 0.5 for _ in range(npages)]
        bits = np.zeros(bitmap_size * 8, dtype=np.uint8)
        bits[:npages] = present
        stream += np.packbits(bits, bitorder="little").tobytes()
        fields.append((bitmap_at, 1, "big"))
        stream += bytes(pages_at - len(stream))
        for p in present:
            stream += rng.randbytes(PAGE) if p else bytes(PAGE)
    fields.append((len(stream), 8, "big"))
    if rng.random() < 0.2:
        stream += struct.pack(">Q", 0x200)
    stream += struct.pack(">Q", 0x10) + b"\x7e" + struct.pack(">I", 2)
    stream += b"\x04" + rng.randbytes(rng.randint(1, 300)) + b"\x00"
    return bytes(stream), fields


def generate_save_image(rng: random.Random) -> bytes:
    data, fields = build_save_image(rng)
    if rng.random() < 0.05:
        return data
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(10)
        if op <= 5:
            off, width, order = rng.choice(fields)
            value = interesting_int(rng, int.from_bytes(buf[off : off + width], order)) % (1 << (8 * width))
            buf[off : off + width] = value.to_bytes(width, order)
        elif op == 6:
            off = rng.choice(fields)[0]
            del buf[off + rng.randrange(-2, 10) :]
        else:
            buf = bytearray(mutate_bytes(rng, bytes(buf)))
    return bytes(buf)


def run_save_image(data: bytes) -> None:
    """Parse a save image as every reader does: the layout, the bitmaps and a page, the block
    source the Merkle tree is built from, and the libvirt header the clones rewrite."""
    path = _scratch("image.sav", data)
    layout = parse_save_image(path)
    assert layout.file_size == len(data)
    assert all(0 <= s <= e <= len(data) for s, e in layout.ram_regions())
    with SaveImage.open(path) as img:
        for b in layout.blocks:
            if not b.ignored:
                present = np.flatnonzero(img.present(b))
                if len(present):
                    img.read_page(b, int(present[0]))
    src = MemoryImageSource(path)
    try:
        MerkleTree.build(src, 4, workers=1)
    finally:
        src.close()
    header = savehdr.read_header(path)
    savehdr.rewrite_xml(path, header.xml)
    _check_rewrite(path, header, data)


def _check_rewrite(path: Path, before: savehdr.SaveHeader, data: bytes, was_running: int | None = None) -> None:
    """An in-place XML rewrite keeps every header field, the XML and cookie, and every byte after
    the XML area (padding and a cookie's place inside the area may change)."""
    after = savehdr.read_header(path)
    want = (before.magic, before.version, before.data_len, before.format, before.unused, before.xml, before.cookie)
    got = (after.magic, after.version, after.data_len, after.format, after.unused, after.xml, after.cookie)
    assert got == want and after.was_running == (before.was_running if was_running is None else was_running)
    end = savehdr.HEADER.size + before.data_len
    assert path.read_bytes()[end:] == data[end:], "an in-place rewrite changed the image after its header"


def generate_save_header(rng: random.Random) -> bytes:
    """Only the libvirt header and XML area (vm.savehdr), its fields mutated."""
    data, fields = build_save_image(rng)
    buf = bytearray(data[: 92 + int.from_bytes(data[20:24], "little") + 8])
    for _ in range(0 if rng.random() < 0.1 else rng.randint(1, 3)):
        if rng.random() < 0.6:
            off, width, order = rng.choice([f for f in fields if f[0] < 92])
            buf[off : off + width] = (interesting_int(rng) % (1 << (8 * width))).to_bytes(width, order)
        else:
            buf = bytearray(mutate_bytes(rng, bytes(buf)))
    return bytes(buf)


def run_save_header(data: bytes) -> None:
    path = _scratch("header.sav", data)
    header = savehdr.read_header(path)
    savehdr.rewrite_xml(path, header.xml, was_running=0)
    _check_rewrite(path, header, data, was_running=0)


# -- tree and leaf-digest files (differ.merkle, differ.blocks) ---------------------------------------------

_TREE_HEADER = struct.Struct("<8sHHIQQ32sH")


def _tree_file(rng: random.Random) -> tuple[bytes, int]:
    """A tree file as ``MerkleTree.save`` writes it, and the size of its image."""
    size = rng.choice((0, 1, PAGE, 5 * PAGE + 7, 40 * PAGE, rng.randrange(64 * PAGE)))
    data = bytearray(size)
    for _ in range(rng.randrange(8)):
        at = rng.randrange(size + 1)
        data[at : at + 64] = rng.randbytes(64)
    tree = MerkleTree.from_bytes(bytes(data[:size]), fanout=rng.choice((2, 4, 16)))
    stamp = rng.choice((b"", b"1:2:3", bytes(40)))
    head = _TREE_HEADER.pack(b"RMMERKLE", 1, tree.fanout, PAGE, tree.size, tree.leaf_count, tree.root, len(stamp))
    body = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(tree.leaves.tobytes())
    return head + stamp + body, size


def generate_tree_file(rng: random.Random) -> bytes:
    data, _ = _tree_file(rng)
    if rng.random() < 0.05:
        return data
    head, rest = bytearray(data[: _TREE_HEADER.size]), data[_TREE_HEADER.size :]
    stamp_len = int.from_bytes(head[-2:], "little")
    stamp, body = rest[:stamp_len], rest[stamp_len:]
    op = rng.randrange(10)
    if op <= 3:  # header fields (offsets of fanout, leaf size, size, leaves, stamp length)
        off, width = rng.choice(((10, 2), (12, 4), (16, 8), (24, 8), (64, 2), (8, 2)))
        head[off : off + width] = (interesting_int(rng) % (1 << (8 * width))).to_bytes(width, "little")
    elif op <= 5:  # the leaf data: re-compressed after a change, or a frame that lies
        body = _mutate_body(rng, _unzstd(body))
    elif op == 6:  # a consistent header for another size, over the same leaf data
        leaves = interesting_int(rng) % (1 << 33)
        head[16:32] = struct.pack("<QQ", leaves * PAGE, leaves)
    else:
        return mutate_bytes(rng, data)
    return bytes(head) + stamp + body


@functools.cache
def _small_image() -> bytes:
    return random.Random(9).randbytes(8 * PAGE)


def run_tree_file(data: bytes) -> None:
    """Load a tree file as the checkpoint code does (with the image's size) and without one."""
    path = _scratch("t.tree", data)
    try:
        tree, _ = MerkleTree.load(path, max_leaves=1 << 20)
        again, _ = MerkleTree.load(path, expect_size=tree.size)
        assert again.root == tree.root
    finally:
        src = MemorySource(_small_image())
        got = load_or_build(src, path, b"stamp", 4)  # rebuilds and overwrites a file that does not fit
        assert got.root == MerkleTree.from_bytes(_small_image(), 4).root


def _npy(value: Any, header: dict[str, Any] | None = None) -> bytes:
    buf = io.BytesIO()
    if header is None:
        np.save(buf, value)
    else:
        np_format.write_array_header_1_0(buf, header)
        buf.write(np.asarray(value).tobytes())
    return buf.getvalue()


def generate_leaf_digests(rng: random.Random) -> bytes:
    """A leaf-digest file as ``LeafDigests.save`` writes it (an uncompressed npz), its members
    mutated: values, .npy headers (shape, dtype, order), member names, compression, zip bytes."""
    n = rng.randrange(12)
    size = n * PAGE - (rng.randrange(PAGE) if n else 0)
    digests = np.frombuffer(rng.randbytes(32 * n), dtype=np.uint8).reshape(n, 32)
    members: dict[str, bytes] = {"digests.npy": _npy(digests), "size.npy": _npy(np.int64(size)),
                                 "format.npy": _npy(np.int64(1))}
    compression = zipfile.ZIP_STORED
    for _ in range(rng.randint(0, 3)):
        op = rng.randrange(9)
        name = rng.choice(sorted(members))
        if op <= 1:
            shape = rng.choice(((n, 32), (interesting_int(rng) % (1 << 40), 32), (n,), (n, 31), (2, n, 32)))
            members["digests.npy"] = _npy(digests, {"descr": rng.choice(("|u1", "<u8", "<f4", "|O")),
                                                   "fortran_order": rng.random() < 0.2, "shape": shape})
        elif op <= 3:
            members[rng.choice(("size.npy", "format.npy"))] = _npy(np.int64(interesting_int(rng) % (1 << 63)))
        elif op == 4:
            members[name + rng.choice(("x", ""))] = members.pop(name)
        elif op == 5:
            compression = zipfile.ZIP_DEFLATED
        elif op == 6:
            members[name] = mutate_bytes(rng, members[name])
        elif op == 7:
            members["size.npy"] = _npy(np.float64(size))
        else:
            members["extra.npy"] = _npy(np.zeros(3))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as z:
        for name, blob in members.items():
            z.writestr(name, blob)
    data = buf.getvalue()
    return mutate_bytes(rng, data) if rng.random() < 0.2 else data


def run_leaf_digests(data: bytes) -> None:
    path = _scratch("d.npz", data)
    d = LeafDigests.load(path, max_leaves=1 << 20)
    assert LeafDigests.load(path, expect_size=d.size).size == d.size


# -- targets defined elsewhere ----------------------------------------------------------------------------


def _resolve(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def external(name: str, run: str, *, seeds: str | None = None, generate: str | None = None, what: str = "",
             rss_bound_mib: int = DEFAULT_RSS_BOUND_MIB) -> FuzzTarget:
    """A target whose function lives in another module, named ``"module:attribute"`` and imported
    when first used: ``run`` the target function (bytes -> None), ``generate`` a generator
    (Random -> bytes) or ``seeds`` a sequence of valid inputs that :func:`bench.fuzz.mutating`
    mutates (else random bytes)."""

    def run_it(data: bytes) -> None:
        _resolve(run)(data)

    def generate_it(rng: random.Random) -> bytes:
        if generate is not None:
            return bytes(_resolve(generate)(rng))
        if seeds is not None:
            return mutating(list(_resolve(seeds)))(rng)
        return rng.randbytes(rng.randrange(512))

    return FuzzTarget(name, run_it, generate_it, rss_bound_mib=rss_bound_mib, what=what or run)


# -- the registry ---------------------------------------------------------------------------------------


def targets() -> list[FuzzTarget]:
    """Every registered target; add one with one line (see the module docstring)."""
    return [
        FuzzTarget("log", run_log, generate_log, what="recorder.logformat: whole and incremental log decoding"),
        FuzzTarget("channel-host", run_channel_host, generate_channel_host,
                   what="recorder.channel: the host reading an agent's stream"),
        FuzzTarget("channel-agent", run_channel_agent, generate_channel_agent,
                   what="recorder.channel: the agent reading a host's stream (never raises)"),
        FuzzTarget("protocol-target", run_protocol_target, generate_protocol_target,
                   what="differ.protocol: a target fed a source's messages"),
        FuzzTarget("protocol-source", run_protocol_source, generate_protocol_source,
                   what="differ.protocol: a source fed a target's messages"),
        FuzzTarget("save-image", run_save_image, generate_save_image,
                   what="differ.saveimage, MemoryImageSource, vm.savehdr: a sparse save image"),
        FuzzTarget("save-header", run_save_header, generate_save_header,
                   what="vm.savehdr: the libvirt header read and rewritten in place"),
        FuzzTarget("tree-file", run_tree_file, generate_tree_file, what="differ.merkle: a saved tree file"),
        FuzzTarget("leaf-digests", run_leaf_digests, generate_leaf_digests,
                   what="differ.blocks.LeafDigests: a saved leaf-digest file"),
        external("session", "tests.test_session:fuzz_session_message", seeds="tests.test_session:FUZZ_SEEDS",
                 what="server.session / server.client: service and client fed a peer's message"),
        external("checkpoint-stream", "tests.test_ckstream:fuzz_stream", generate="tests.test_ckstream:fuzz_generate",
                 what="store.ckstream: a checkpoint import stream (`checkpoint import`)"),
        external("cli-files", "cli.fileargs:fuzz_file_argument",
                 what="cli.fileargs: every file argument of every command given odd files"),
    ]


def targets_by_name(extra: Sequence[FuzzTarget] = ()) -> dict[str, FuzzTarget]:
    return {t.name: t for t in [*targets(), *extra]}


def fuzz_one(name: str, source: random.Random | bytes) -> bool:
    """For the unit tests: run target ``name`` on an input generated from ``source`` (a Random, which
    hypothesis drives) or on ``source`` itself (bytes). True if accepted, False if refused with a
    project error; anything else propagates."""
    target = targets_by_name()[name]
    return check_input(target, source if isinstance(source, bytes) else target.generate(source))
