"""The input log format: a sans-I/O codec (bytes in, events out) shared by the recorder and the replayer.

A log is a sequence of **frames**, each self-delimiting and checksummed so it can be streamed over a
byte pipe, resent after a reconnect, and appended to a file::

    offset  size  field
    0       2     magic b"RM"
    2       1     format version (FORMAT_VERSION)
    3       1     frame type: 0 = header, 1 = events
    4       4     seq, uint32 big-endian: 0 for the header frame, then 1, 2, ... without gaps
    8       4     payload length n, uint32 big-endian (<= max_frame_bytes)
    12      n     payload (msgpack)
    12+n    4     crc32 of bytes [0, 12+n), big-endian

The header payload is the msgpack array ``[width, height, keymap, checkpoint_id, clock_origin_us,
agent_version]``; the format version is the frame's version byte, so every frame says which format it
is in and a future one is refused at its first byte that matters.

An events payload is ``[base_us, event, event, ...]``: ``base_us`` is the time of the last event
before this frame (0 for the first), so a frame decodes to absolute times on its own and the decoder
can check that frames join up. Each event is a flat msgpack array ``[dt_us, kind, *fields]`` (the
fields are inlined rather than nested in a payload array: one byte less per event). ``dt_us`` is the
time since the previous event (the first one: since the clock origin). Kinds reuse the X11 core event
numbers so that a recorded event maps to X and back without a table:

    kind  name            fields
    2     KEY_PRESS       keycode (X keycode 8..255; X = Linux keycode + 8)
    3     KEY_RELEASE     keycode
    4     BUTTON_PRESS    button (X button 1..255)
    5     BUTTON_RELEASE  button
    6     MOTION          x, y (absolute root-window pixels)
    7     SYNC            x, y, w, h, digest (bin, 1..32 bytes), label (str)
    8     END             (none): the last event of a log

**Scroll** is recorded as X buttons 4-7 press/release pairs, not as a kind of its own: that is what
the X core protocol (and so RECORD) delivers, QMP injects a wheel notch as a ``wheel-up``/``-down``
button press and release, and the closed loop echoes each press and release separately. A scroll kind
would save ~6 bytes per notch at the cost of pairing in the recorder and un-pairing in the replayer.

**Sync marks** carry ``region_digest`` of the screen region in canonical RGB (see there): the replayer
computes the same digest from a screenshot of the target and waits for it to match.

Size: a key event is 5-9 bytes, a motion 8-11, a sync mark ~30, a frame adds 16 bytes of framing and
~6 of base time. The shipped workloads framed as the agent frames them (64 events or 250 ms) measure
14.7 bytes/event raw, 8.2 with zstd (``python -m bench.bench_log``); ``python -m recorder.logformat
LOG`` reports a recorded log's.
"""

from __future__ import annotations

import argparse
import hashlib
import struct
import sys
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple

import msgpack

from replay_migrate.errors import LogFormatError, ReplayMigrateError

FORMAT_VERSION = 1
"""The version this module writes and the newest it reads."""

MAGIC = b"RM"
_PREFIX = struct.Struct(">2sBBII")
_CRC = struct.Struct(">I")
FRAME_OVERHEAD = _PREFIX.size + _CRC.size
"""Bytes a frame adds around its payload (16)."""

DEFAULT_MAX_FRAME_BYTES = 256 * 1024
"""Largest frame payload accepted or written: ~8000 typical events, far above what a frame needs."""
DEFAULT_MAX_EVENTS_PER_FRAME = 4096
"""Most events one frame may hold when decoding."""
DEFAULT_MAX_LOG_BYTES = 256 * 1024 * 1024
"""Largest whole log accepted: ~20 M events, days of interactive use."""
DEFAULT_FRAME_EVENTS = 256
"""The encoder cuts a frame after this many events (the agent also cuts on time)."""
DEFAULT_MOTION_WINDOW_US = 20_000
"""Consecutive motions within this window of the first one collapse to the last (50 Hz path)."""

MAX_COORD = 32767
"""X root coordinates and sizes are INT16/CARD16 on the wire; the root window is never larger."""
MAX_DT_US = 2**48
"""Largest delta time (~9 years): anything larger is corruption, not idleness."""
MAX_DIGEST_BYTES = 32
MAX_LABEL_CHARS = 64
MAX_NAME_CHARS = 256
"""Limit for the header's strings (keymap, checkpoint id, agent version)."""
SYNC_DIGEST_BYTES = 8
"""Digest size ``region_digest`` produces: 64 bits is plenty to tell screen states apart."""


class Kind(IntEnum):
    """Event kinds: the X11 core event numbers where one exists."""

    KEY_PRESS = 2
    KEY_RELEASE = 3
    BUTTON_PRESS = 4
    BUTTON_RELEASE = 5
    MOTION = 6
    SYNC = 7
    END = 8


class FrameType(IntEnum):
    HEADER = 0
    EVENTS = 1


# --------------------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Key:
    """A key press (``down``) or release; ``keycode`` is the X keycode."""

    t_us: int
    keycode: int
    down: bool

    @property
    def kind(self) -> Kind:
        return Kind.KEY_PRESS if self.down else Kind.KEY_RELEASE


@dataclass(frozen=True, slots=True)
class Button:
    """A pointer button press or release; 4-7 are the wheel (up, down, left, right)."""

    t_us: int
    button: int
    down: bool

    @property
    def kind(self) -> Kind:
        return Kind.BUTTON_PRESS if self.down else Kind.BUTTON_RELEASE


@dataclass(frozen=True, slots=True)
class Motion:
    """The pointer moved to absolute root coordinates (x, y)."""

    t_us: int
    x: int
    y: int

    @property
    def kind(self) -> Kind:
        return Kind.MOTION


@dataclass(frozen=True, slots=True)
class SyncMark:
    """The screen region (x, y, w, h) had ``digest`` (see ``region_digest``) at ``t_us``."""

    t_us: int
    x: int
    y: int
    w: int
    h: int
    digest: bytes
    label: str

    @property
    def kind(self) -> Kind:
        return Kind.SYNC


@dataclass(frozen=True, slots=True)
class End:
    """End of the log: nothing follows."""

    t_us: int

    @property
    def kind(self) -> Kind:
        return Kind.END


Event = Key | Button | Motion | SyncMark | End


@dataclass(frozen=True, slots=True)
class LogHeader:
    """What a log needs to be replayed: the screen it was recorded on, the keymap, the checkpoint it
    starts from, and the wall clock (µs since the epoch) that event time 0 corresponds to."""

    width: int
    height: int
    keymap: str
    checkpoint_id: str
    clock_origin_us: int
    agent_version: str
    format_version: int = FORMAT_VERSION


@dataclass(frozen=True, slots=True)
class HeaderFrame:
    seq: int
    header: LogHeader


@dataclass(frozen=True, slots=True)
class EventsFrame:
    seq: int
    base_us: int
    events: tuple[Event, ...]


Frame = HeaderFrame | EventsFrame


class EncodedFrame(NamedTuple):
    """One frame ready to send or store: its seq and its complete bytes."""

    seq: int
    data: bytes


def region_digest(rgb: bytes) -> bytes:
    """Digest of a screen region given as canonical RGB: rows top to bottom, pixels left to right,
    one byte each of red, green, blue. Both the guest (X ``GetImage``) and the host (a screenshot)
    can produce that, whatever their native pixel layout."""
    return hashlib.blake2b(rgb, digest_size=SYNC_DIGEST_BYTES).digest()


# ------------------------------------------------------------------------------------- validation


def _is_int(v: object, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi


def _is_str(v: object, max_chars: int) -> bool:
    return type(v) is str and len(v) <= max_chars


def _check_header(h: LogHeader) -> str | None:
    """Return what is wrong with ``h``, or None."""
    if not (_is_int(h.width, 1, MAX_COORD) and _is_int(h.height, 1, MAX_COORD)):
        return f"screen size {h.width!r}x{h.height!r} not in 1..{MAX_COORD}"
    for name in ("keymap", "checkpoint_id", "agent_version"):
        if not _is_str(getattr(h, name), MAX_NAME_CHARS):
            return f"{name} is not a string of at most {MAX_NAME_CHARS} characters"
    if not _is_int(h.clock_origin_us, 0, 2**63 - 1):
        return "clock origin is not a non-negative 64-bit integer"
    return None


def _check_fields(kind: int, fields: Sequence[object]) -> str | None:
    """Check an event's fields (as on the wire, after dt and kind); return the problem or None."""
    if kind in (Kind.KEY_PRESS, Kind.KEY_RELEASE):
        if len(fields) != 1 or not _is_int(fields[0], 8, 255):
            return "a key event needs one X keycode in 8..255"
    elif kind in (Kind.BUTTON_PRESS, Kind.BUTTON_RELEASE):
        if len(fields) != 1 or not _is_int(fields[0], 1, 255):
            return "a button event needs one X button in 1..255"
    elif kind == Kind.MOTION:
        if len(fields) != 2 or not all(_is_int(v, 0, MAX_COORD) for v in fields):
            return f"a motion needs x, y in 0..{MAX_COORD}"
    elif kind == Kind.SYNC:
        if len(fields) != 6:
            return "a sync mark needs x, y, w, h, digest, label"
        x, y, w, h, digest, label = fields
        if not (_is_int(x, 0, MAX_COORD) and _is_int(y, 0, MAX_COORD)):
            return f"sync region origin not in 0..{MAX_COORD}"
        if not (_is_int(w, 1, MAX_COORD) and _is_int(h, 1, MAX_COORD)):
            return f"sync region size not in 1..{MAX_COORD}"
        if type(digest) is not bytes or not 1 <= len(digest) <= MAX_DIGEST_BYTES:
            return f"sync digest is not 1..{MAX_DIGEST_BYTES} bytes"
        if not _is_str(label, MAX_LABEL_CHARS):
            return f"sync label is not a string of at most {MAX_LABEL_CHARS} characters"
    elif kind == Kind.END:
        if fields:
            return "an end-of-log event has no fields"
    else:
        return f"unknown event kind {kind!r}"
    return None


def event_fields(ev: Event) -> list[object]:
    """The wire fields of an event after dt and kind (also used by the channel's ``expect``)."""
    if isinstance(ev, Key):
        return [ev.keycode]
    if isinstance(ev, Button):
        return [ev.button]
    if isinstance(ev, Motion):
        return [ev.x, ev.y]
    if isinstance(ev, SyncMark):
        return [ev.x, ev.y, ev.w, ev.h, ev.digest, ev.label]
    return []


def make_event(t_us: int, kind: int, fields: Sequence[object]) -> Event:
    """Build an event from wire fields; raise LogFormatError (naming the problem) if they are invalid."""
    problem = _check_fields(kind, fields)
    if problem is not None:
        raise LogFormatError(problem)
    f: Any = fields
    if kind in (Kind.KEY_PRESS, Kind.KEY_RELEASE):
        return Key(t_us, f[0], kind == Kind.KEY_PRESS)
    if kind in (Kind.BUTTON_PRESS, Kind.BUTTON_RELEASE):
        return Button(t_us, f[0], kind == Kind.BUTTON_PRESS)
    if kind == Kind.MOTION:
        return Motion(t_us, f[0], f[1])
    if kind == Kind.SYNC:
        return SyncMark(t_us, f[0], f[1], f[2], f[3], f[4], f[5])
    return End(t_us)


def check_event(ev: Event) -> None:
    """Raise LogFormatError if ``ev`` cannot be encoded (a caller's bug or bad input, said plainly)."""
    if not isinstance(ev, Key | Button | Motion | SyncMark | End):
        raise LogFormatError(f"not an event: {type(ev).__name__}")
    if not _is_int(ev.t_us, 0, 2**63 - 1):
        raise LogFormatError(f"event time {ev.t_us!r} is not a non-negative integer")
    if isinstance(ev, Key | Button) and type(ev.down) is not bool:
        raise LogFormatError("event 'down' is not a bool")
    problem = _check_fields(ev.kind, event_fields(ev))
    if problem is not None:
        raise LogFormatError(problem)


# ----------------------------------------------------------------------------------------- framing


def _array_header(n: int) -> bytes:
    """msgpack array header for n elements (the encoder joins pre-packed events under it)."""
    if n < 16:
        return bytes([0x90 | n])
    if n < 2**16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _frame(ftype: FrameType, seq: int, payload: bytes) -> bytes:
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, ftype, seq, len(payload))
    return head + payload + _CRC.pack(zlib.crc32(payload, zlib.crc32(head)))


def _packb(obj: object) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


class LogEncoder:
    """Turns events into frames: delta times, motion coalescing, frame cutting.

    Call ``start()`` once for the header frame (seq 0), then ``add()`` events in time order, ``flush()``
    whenever a frame should go out now (the agent does so on a timer) and ``end()`` last. Each returns
    the frames completed by that call.

    Motion coalescing: a motion is held back; motions that follow it with no other event in between
    and less than ``motion_window_us`` after the first one of the group replace it, so at most one
    motion per window is written and the last position of each group is kept (0 disables it).
    """

    def __init__(
        self,
        header: LogHeader,
        *,
        motion_window_us: int = DEFAULT_MOTION_WINDOW_US,
        frame_events: int = DEFAULT_FRAME_EVENTS,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        problem = _check_header(header)
        if problem is not None:
            raise LogFormatError(f"bad log header: {problem}")
        if header.format_version != FORMAT_VERSION:
            raise LogFormatError(f"cannot write format version {header.format_version}")
        if not 1 <= frame_events <= DEFAULT_MAX_EVENTS_PER_FRAME:
            raise LogFormatError(f"frame_events must be in 1..{DEFAULT_MAX_EVENTS_PER_FRAME}")
        if not 1024 <= max_frame_bytes <= DEFAULT_MAX_FRAME_BYTES:
            raise LogFormatError(f"max_frame_bytes must be in 1024..{DEFAULT_MAX_FRAME_BYTES}")
        if motion_window_us < 0:
            raise LogFormatError("motion_window_us must be >= 0")
        self.header = header
        self.motion_window_us = motion_window_us
        self.frame_events = frame_events
        self.max_frame_bytes = max_frame_bytes
        self.next_seq = 0
        self.ended = False
        self._last_t = 0  # time of the last event written into a frame (or the frame being built)
        self._base = 0  # base_us of the frame being built
        self._packed: list[bytes] = []
        self._size = 0
        self._motion: Motion | None = None
        self._motion_group_t = 0

    @property
    def pending(self) -> int:
        """Events accepted but not yet in a returned frame (including a held-back motion)."""
        return len(self._packed) + (self._motion is not None)

    @property
    def last_t_us(self) -> int:
        """The time of the latest event accepted (events must not go back before it)."""
        return self._motion.t_us if self._motion is not None else self._last_t

    def start(self) -> EncodedFrame:
        """The header frame (seq 0)."""
        if self.next_seq != 0:
            raise LogFormatError("the encoder was already started")
        h = self.header
        payload = _packb(
            [h.width, h.height, h.keymap, h.checkpoint_id, h.clock_origin_us, h.agent_version]
        )
        self.next_seq = 1
        return EncodedFrame(0, _frame(FrameType.HEADER, 0, payload))

    def add(self, ev: Event) -> list[EncodedFrame]:
        """Accept one event (not End: use ``end()``); return the frames it completed."""
        if self.next_seq == 0:
            raise LogFormatError("start() the encoder before adding events")
        if self.ended:
            raise LogFormatError("event after end of log")
        check_event(ev)
        if isinstance(ev, End):
            raise LogFormatError("use end() to end the log")
        if ev.t_us < self.last_t_us:
            raise LogFormatError(f"event time {ev.t_us} µs goes back before {self.last_t_us} µs")
        out: list[EncodedFrame] = []
        if isinstance(ev, Motion) and self.motion_window_us > 0:
            if self._motion is not None and ev.t_us - self._motion_group_t < self.motion_window_us:
                self._motion = ev
                return out
            if self._motion is not None:
                out += self._commit(self._motion)
            self._motion, self._motion_group_t = ev, ev.t_us
            return out
        if self._motion is not None:
            out += self._commit(self._motion)
            self._motion = None
        out += self._commit(ev)
        return out

    def flush(self) -> list[EncodedFrame]:
        """Cut a frame now from everything pending (a held-back motion included)."""
        out: list[EncodedFrame] = []
        if self._motion is not None:
            out += self._commit(self._motion)
            self._motion = None
        if self._packed:
            out.append(self._cut())
        return out

    def end(self, t_us: int | None = None) -> list[EncodedFrame]:
        """Append the end-of-log event (at ``t_us``, default the last event's time) and flush."""
        if self.next_seq == 0:
            raise LogFormatError("start() the encoder before ending it")
        if self.ended:
            raise LogFormatError("the log was already ended")
        t = self.last_t_us if t_us is None else t_us
        if type(t) is not int or t < self.last_t_us:
            raise LogFormatError(f"end time {t!r} goes back before {self.last_t_us} µs")
        out = self.flush()
        out += self._commit(End(t))
        if self._packed:
            out.append(self._cut())
        self.ended = True
        return out

    def _commit(self, ev: Event) -> list[EncodedFrame]:
        packed = _packb([ev.t_us - self._last_t, int(ev.kind), *event_fields(ev)])
        out: list[EncodedFrame] = []
        # 5 bytes of array header + 9 of base_us at most
        if self._packed and self._size + len(packed) + 14 > self.max_frame_bytes:
            out.append(self._cut())
        self._packed.append(packed)
        self._size += len(packed)
        self._last_t = ev.t_us
        if len(self._packed) >= self.frame_events:
            out.append(self._cut())
        return out

    def _cut(self) -> EncodedFrame:
        payload = _array_header(1 + len(self._packed)) + _packb(self._base) + b"".join(self._packed)
        seq = self.next_seq
        frame = EncodedFrame(seq, _frame(FrameType.EVENTS, seq, payload))
        self.next_seq += 1
        self._base = self._last_t
        self._packed.clear()
        self._size = 0
        return frame


# ----------------------------------------------------------------------------------------- decoding


def _unpack(payload: bytes, where: str) -> Any:
    try:
        return msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=True)
    except Exception as e:  # msgpack raises many types (ValueError, ExtraData, FormatError, ...)
        raise LogFormatError(f"{where}: payload is not valid msgpack ({type(e).__name__})") from None


def _decode_payload(
    ftype: int, version: int, seq: int, payload: bytes, where: str, max_events: int
) -> Frame:
    obj = _unpack(payload, where)
    if ftype == FrameType.HEADER:
        if type(obj) is not list or len(obj) != 6:
            raise LogFormatError(f"{where}: header is not an array of 6 fields")
        header = LogHeader(obj[0], obj[1], obj[2], obj[3], obj[4], obj[5], format_version=version)
        problem = _check_header(header)
        if problem is not None:
            raise LogFormatError(f"{where}: bad header: {problem}")
        return HeaderFrame(seq, header)
    if type(obj) is not list or len(obj) < 2:
        raise LogFormatError(f"{where}: events payload is not an array of base time and events")
    if len(obj) - 1 > max_events:
        raise LogFormatError(f"{where}: {len(obj) - 1} events exceed the limit of {max_events} per frame")
    base = obj[0]
    if not _is_int(base, 0, 2**63 - 1):
        raise LogFormatError(f"{where}: base time is not a non-negative integer")
    t = base
    events: list[Event] = []
    for i, raw in enumerate(obj[1:]):
        if type(raw) is not list or len(raw) < 2:
            raise LogFormatError(f"{where}, event {i}: not an array [dt, kind, ...]")
        dt, kind = raw[0], raw[1]
        if not _is_int(dt, 0, MAX_DT_US):
            raise LogFormatError(f"{where}, event {i}: delta time not in 0..{MAX_DT_US} µs")
        if type(kind) is not int:
            raise LogFormatError(f"{where}, event {i}: kind is not an integer")
        if events and isinstance(events[-1], End):
            raise LogFormatError(f"{where}, event {i}: event after end-of-log")
        t += dt
        if t > 2**63 - 1:
            raise LogFormatError(f"{where}, event {i}: time overflows 63 bits")
        try:
            events.append(make_event(t, kind, raw[2:]))
        except LogFormatError as e:
            raise LogFormatError(f"{where}, event {i}: {e}") from None
    return EventsFrame(seq, base, tuple(events))


def peek_frame(data: bytes | bytearray | memoryview, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
               where: str = "frame") -> tuple[int, int, int]:
    """Check a frame's 12-byte prefix; return (frame type, seq, total frame length).

    Raises LogFormatError for a prefix that is short, not a frame, of a future version or oversized.
    """
    if len(data) < _PREFIX.size:
        raise LogFormatError(f"{where}: truncated frame prefix ({len(data)} of {_PREFIX.size} bytes)")
    problem = _prefix_problem(bytes(data[: _PREFIX.size]), max_frame_bytes)
    if problem is not None:
        raise LogFormatError(f"{where}: {problem}")
    _, _, ftype, seq, length = _PREFIX.unpack_from(data)
    return ftype, seq, FRAME_OVERHEAD + length


def _prefix_problem(head: bytes, max_frame_bytes: int) -> str | None:
    """What is wrong with the (possibly partial) frame prefix ``head``, or None so far."""
    if head[:2] != MAGIC[: len(head)]:
        return "not a frame (bad magic)"
    if len(head) >= 3:
        version = head[2]
        if version > FORMAT_VERSION:
            return f"format version {version} is newer than this reader's {FORMAT_VERSION}"
        if version < 1:
            return f"unknown format version {version}"
    if len(head) >= 4 and head[3] not in (FrameType.HEADER, FrameType.EVENTS):
        return f"unknown frame type {head[3]}"
    if len(head) >= _PREFIX.size:
        length = int.from_bytes(head[8:12], "big")
        if length > max_frame_bytes:
            return f"frame payload of {length} bytes exceeds the limit of {max_frame_bytes}"
    return None


def decode_frame(
    data: bytes,
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    max_events_per_frame: int = DEFAULT_MAX_EVENTS_PER_FRAME,
) -> Frame:
    """Decode exactly one complete frame on its own (no continuity checks)."""
    _, seq, total = peek_frame(data, max_frame_bytes=max_frame_bytes)
    if len(data) != total:
        raise LogFormatError(f"frame {seq}: {len(data)} bytes given, the frame is {total}")
    return _decode_one(bytes(data), f"frame {seq}", max_events_per_frame)


def _decode_one(data: bytes, where: str, max_events: int) -> Frame:
    _, version, ftype, seq, length = _PREFIX.unpack_from(data)
    end = _PREFIX.size + length
    (crc,) = _CRC.unpack_from(data, end)
    if zlib.crc32(data[:end]) != crc:
        raise LogFormatError(f"{where}: checksum mismatch (corrupt frame)")
    return _decode_payload(ftype, version, seq, data[_PREFIX.size : end], where, max_events)


class LogDecoder:
    """Incremental decoder: ``feed()`` bytes split anywhere, get back the frames they completed.

    Checks, besides each frame's own integrity: the header comes first (seq 0) and only once, seqs
    follow without gaps, each frame's base time joins the previous frame's last event, nothing follows
    the end-of-log event, and the whole log stays within ``max_log_bytes``. ``close()`` says whether
    the input stopped in the middle of a frame (or, if required, before the end of the log).

    ``resume_at``, ``origin_us``: the log goes on from a checkpoint taken while its agent recorded
    (``store.chain``, ``store.fromdomain``): frames 1 .. ``resume_at`` - 1 are in the checkpoint's
    state, so the header is followed by frame ``resume_at``, whose base time starts where it does. Only
    for the agent's log the checkpoint saw, whose header has clock origin ``origin_us``: a log of an
    agent started since (another origin) is read from frame 1 as any other.
    """

    def __init__(
        self,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_log_bytes: int = DEFAULT_MAX_LOG_BYTES,
        max_events_per_frame: int = DEFAULT_MAX_EVENTS_PER_FRAME,
        resume_at: int = 1,
        origin_us: int = 0,
    ) -> None:
        if resume_at < 1:
            raise ValueError("resume_at is a frame after the header (>= 1)")
        self.resume_at = resume_at
        self.origin_us = origin_us
        self._joining = False
        """The next events frame is the first after a checkpoint's cut: its base time starts anew."""
        self.max_frame_bytes = max_frame_bytes
        self.max_log_bytes = max_log_bytes
        self.max_events_per_frame = max_events_per_frame
        self.header: LogHeader | None = None
        self.ended = False
        self.offset = 0
        """Bytes of the log consumed as complete frames."""
        self.next_seq = 0
        self.t_us = 0
        """Time of the last decoded event."""
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        if self.offset + len(self._buf) + len(data) > self.max_log_bytes:
            raise LogFormatError(
                f"log byte {self.offset}: the log exceeds the limit of {self.max_log_bytes} bytes"
            )
        self._buf += data
        frames: list[Frame] = []
        while self._buf:
            where = f"log byte {self.offset}, frame {self.next_seq}"
            if self.ended:
                raise LogFormatError(f"{where}: data after the end of the log")
            head = bytes(self._buf[: _PREFIX.size])
            problem = _prefix_problem(head, self.max_frame_bytes)
            if problem is not None:
                raise LogFormatError(f"{where}: {problem}")
            if len(head) < _PREFIX.size:
                break
            length = int.from_bytes(head[8:12], "big")
            total = FRAME_OVERHEAD + length
            if len(self._buf) < total:
                break
            frame = _decode_one(bytes(self._buf[:total]), where, self.max_events_per_frame)
            self._accept(frame, where)
            del self._buf[:total]
            self.offset += total
            frames.append(frame)
        return frames

    def _accept(self, frame: Frame, where: str) -> None:
        if frame.seq != self.next_seq:
            raise LogFormatError(f"{where}: frame has seq {frame.seq}, expected {self.next_seq}")
        if isinstance(frame, HeaderFrame):
            if self.header is not None:
                raise LogFormatError(f"{where}: a second header")
            self.header = frame.header
            if self.resume_at > 1 and frame.header.clock_origin_us == self.origin_us:
                self.next_seq = self.resume_at - 1      # + 1 below
                self._joining = True
        else:
            if self.header is None:
                raise LogFormatError(f"{where}: events before the header")
            if self._joining:
                if frame.base_us < self.t_us:
                    raise LogFormatError(f"{where}: frame starts at {frame.base_us} µs, before the header's clock")
                self.t_us = frame.base_us
                self._joining = False
            if frame.base_us != self.t_us:
                raise LogFormatError(
                    f"{where}: frame starts at {frame.base_us} µs, the previous one ended at {self.t_us} µs"
                )
            self.t_us = frame.events[-1].t_us
            self.ended = isinstance(frame.events[-1], End)
        self.next_seq += 1

    def end_frame(self) -> bytes:
        """The frame that ends the log decoded so far: one end-of-log event at its last event's
        time, numbered next. For a relay that ends a log it did not encode: a migration's source
        ends the log it forwarded from its agent (which records on until the VM is saved), so the
        target can tell a whole log from one cut short."""
        if self.header is None or self._buf or self.ended:
            raise LogFormatError("only a log with its header, whole frames and no end yet can be ended")
        payload = _array_header(2) + _packb(self.t_us) + _packb([0, int(Kind.END), *event_fields(End(self.t_us))])
        return _frame(FrameType.EVENTS, self.next_seq, payload)

    def close(self, *, require_end: bool = True) -> None:
        """Declare the input finished; raise LogFormatError if it stopped short."""
        if self._buf:
            raise LogFormatError(
                f"log byte {self.offset}, frame {self.next_seq}: truncated "
                f"({len(self._buf)} bytes of an incomplete frame)"
            )
        if self.header is None:
            raise LogFormatError("log byte 0: empty log (no header)")
        if require_end and not self.ended:
            raise LogFormatError(f"log byte {self.offset}: truncated (no end-of-log event)")


# -------------------------------------------------------------------------------------- whole logs


@dataclass(frozen=True, slots=True)
class Log:
    header: LogHeader
    events: tuple[Event, ...]
    frames: int
    nbytes: int
    ended: bool


def encode_log(
    header: LogHeader,
    events: Iterable[Event],
    *,
    end: bool = True,
    motion_window_us: int = DEFAULT_MOTION_WINDOW_US,
    frame_events: int = DEFAULT_FRAME_EVENTS,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> bytes:
    """Encode a whole log. An ``End`` among ``events`` ends it; else ``end=True`` appends one at the
    last event's time."""
    enc = LogEncoder(
        header, motion_window_us=motion_window_us, frame_events=frame_events, max_frame_bytes=max_frame_bytes
    )
    parts = [enc.start().data]
    for ev in events:
        if enc.ended:
            raise LogFormatError("event after end of log")
        frames = enc.end(ev.t_us) if isinstance(ev, End) else enc.add(ev)
        parts += [f.data for f in frames]
    if not enc.ended:
        parts += [f.data for f in (enc.end() if end else enc.flush())]
    return b"".join(parts)


def decode_log(
    data: bytes,
    *,
    require_end: bool = True,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    max_log_bytes: int = DEFAULT_MAX_LOG_BYTES,
    max_events_per_frame: int = DEFAULT_MAX_EVENTS_PER_FRAME,
) -> Log:
    """Decode a whole log (``require_end=False`` accepts one still being written, cut at a frame)."""
    dec = LogDecoder(
        max_frame_bytes=max_frame_bytes, max_log_bytes=max_log_bytes, max_events_per_frame=max_events_per_frame
    )
    frames = dec.feed(data)
    dec.close(require_end=require_end)
    assert dec.header is not None
    events = tuple(ev for f in frames if isinstance(f, EventsFrame) for ev in f.events)
    return Log(dec.header, events, len(frames), len(data), dec.ended)


def write_log(path: str, header: LogHeader, events: Iterable[Event], **params: Any) -> int:
    """Write a whole log file; return its size. ``params`` go to ``encode_log``."""
    data = encode_log(header, events, **params)
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def read_log(path: str, *, require_end: bool = True, max_log_bytes: int = DEFAULT_MAX_LOG_BYTES,
             **limits: int) -> Log:
    """Read and decode a whole log file, refusing one larger than ``max_log_bytes`` before reading."""
    with open(path, "rb") as f:
        data = f.read(max_log_bytes + 1)
    if len(data) > max_log_bytes:
        raise LogFormatError(f"{path}: larger than the limit of {max_log_bytes} bytes")
    try:
        return decode_log(data, require_end=require_end, max_log_bytes=max_log_bytes, **limits)
    except LogFormatError as e:
        raise LogFormatError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------------------------- CLI


def summary(log: Log) -> str:
    """A human-readable summary: header, counts by kind, bytes per event, duration."""
    h = log.header
    counts = Counter(ev.kind for ev in log.events)
    n = len(log.events)
    dur = log.events[-1].t_us / 1e6 if log.events else 0.0
    lines = [
        f"format version   {h.format_version}",
        f"screen           {h.width}x{h.height}",
        f"keymap           {h.keymap}",
        f"checkpoint       {h.checkpoint_id or '-'}",
        f"clock origin     {h.clock_origin_us} µs",
        f"agent version    {h.agent_version}",
        f"frames           {log.frames}",
        f"bytes            {log.nbytes}",
        f"events           {n}",
    ]
    lines += [f"  {k.name.lower():<15}{counts.get(k, 0)}" for k in Kind]
    lines.append(f"bytes/event      {log.nbytes / n:.2f}" if n else "bytes/event      -")
    lines.append(f"duration         {dur:.3f} s")
    lines.append(f"end-of-log       {'yes' if log.ended else 'missing (still recording or cut short)'}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recorder.logformat", description="Summarise an input log.")
    p.add_argument("log", help="log file (.rmlog)")
    p.add_argument("--events", action="store_true", help="also print every event")
    p.add_argument("--max-log-bytes", type=int, default=DEFAULT_MAX_LOG_BYTES)
    args = p.parse_args(argv)
    try:
        log = read_log(args.log, require_end=False, max_log_bytes=args.max_log_bytes)
    except OSError as e:
        print(f"error: {args.log}: {e.strerror}", file=sys.stderr)
        return 1
    except ReplayMigrateError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(summary(log))
    if args.events:
        for ev in log.events:
            print(ev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
