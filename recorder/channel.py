"""The agent⇄host channel protocol on the virtio-serial byte stream: sans-I/O (bytes in, events out).

Every message, in both directions, is framed so that a reader can find the next one in a stream
that a disconnect cut in the middle::

    magic b"Rc" (2) | type (1) | body length n (4, big-endian) | body (msgpack array, n) | crc32 (4)

The crc32 covers everything before it. Bodies (positional msgpack arrays):

    guest → host
      1  HELLO   [version, token, session, agent_version, width, height, keymap, next_seq, resume_from,
                  backend]            backend: the agent's capture backend, e.g. "pynput-xorg" (absent
                                      from agents before it: read as "")
      2  FRAME   [seq, frame]           frame = one log frame (recorder.logformat), its own seq inside
      3  ECHO    [replay_seq]
      4  CHECKED [req_id, digest]       digest = region_digest of the region, or b"" if it cannot be sampled
    host → guest
      17 ATTACH  [version, token, session, resume_from]
      18 ACK     [seq]
      19 EXPECT  [replay_seq, kind, *fields]    kind and fields as in the log (key, button or motion)
      20 CHECK   [req_id, x, y, w, h]   region as in a sync mark: x, y in 0..32767, w, h in 1..32767

Connection life: the host side connects and sends ``attach`` with a fresh random ``token``, the agent's
``session`` it knows (empty the first time) and ``resume_from`` = the first log seq it does not hold.
The agent answers ``hello`` echoing the token, then every frame ≥ ``resume_from`` in order, then new
frames as they are made. Until that hello the host skips everything (bytes of an older connection,
a half-sent message); after it the stream must be clean, else the host re-attaches by itself. If the
agent restarted (its session differs) it sends its whole new log from seq 0 and says so in the hello.

Resend buffer: the agent keeps unacknowledged frames in memory up to ``resend_limit_bytes``, oldest
evicted first. Every frame is also appended to the agent's fallback log file (a plain log file); an
evicted frame that the host still needs is read back from that file through the ``fallback``
callable, so a host that comes back after any outage still gets a complete log over the channel. If
the file is unreadable too, the host sees a ``Gap`` event (whatever part of the file exists can
still be fetched with qemu-guest-agent ``guest-file-read`` and decoded with
``recorder.logformat.read_log(..., require_end=False)``).

Closed loop: the replayer sends ``expect`` for the event it is about to inject; when the agent
captures a matching event (same kind, keycode/button or position) it sends ``echo`` with that
replay seq. Events captured before their expect arrived are remembered briefly (``echo_history``)
so that race does not lose an echo; each captured event answers at most one expect.

Screen checks: the replayer waits for a sync mark by asking the target's own agent for the digest
of the mark's region (``check``), so both digests come from X ``GetImage`` the same way. A host
screenshot cannot stand in: with std VGA it includes X's software cursor, which ``GetImage`` leaves
out, so a mark near the pointer would never match. The agent answers ``checked`` with the same
``req_id`` and ``recorder.logformat.region_digest`` of the region's canonical RGB, or an empty digest
when it cannot sample it (the region leaves the screen, an X error, a screen format it cannot read).
A check is a read, so nothing about it is resent: a request or answer lost in a reconnection is
simply asked again. The agent answers only requests of the current attachment, and of those only
the newest ``max_pending_checks`` (a replayer that asks faster than the agent samples gets answers
to its latest requests).

Both sides keep their output in an outbox drained with ``data_to_send()``: replies are caused by
input (hello and resend on attach, re-attach on a corrupt stream) as well as by calls, and the
agent's frames are pulled lazily from its resend buffer so a port that does not drain never makes
memory grow beyond that buffer.
"""

from __future__ import annotations

import collections
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any

import msgpack

from recorder.logformat import (
    DEFAULT_MAX_FRAME_BYTES,
    FRAME_OVERHEAD,
    MAX_COORD,
    MAX_DIGEST_BYTES,
    Button,
    Event,
    Key,
    Kind,
    Motion,
    event_fields,
    make_event,
    peek_frame,
)
from replay_migrate.errors import LogFormatError, ProtocolError

CHANNEL_VERSION = 2
"""2: CHECK/CHECKED (screen region digests asked of the agent)."""
MSG_MAGIC = b"Rc"
_HEAD = struct.Struct(">2sBI")
_CRC = struct.Struct(">I")
MSG_OVERHEAD = _HEAD.size + _CRC.size

DEFAULT_RESEND_LIMIT_BYTES = 1024 * 1024
"""Unacknowledged frames the agent keeps in memory (~an hour of typing); older ones are re-read from
its fallback log file when needed."""
DEFAULT_SEND_CHUNK = 64 * 1024
"""Soft cap on what one ``AgentSide.data_to_send()`` returns, so a resend does not build one huge write."""
DEFAULT_MAX_PENDING_EXPECTS = 64
"""Expects the agent holds unanswered; the oldest is dropped beyond this (the replayer has timed out)."""
DEFAULT_ECHO_HISTORY = 64
"""Captured events remembered for an expect that arrives after its event did."""
DEFAULT_MAX_PENDING_CHECKS = 16
"""Check answers waiting to be sent (and, in the agent, requests waiting to be sampled); the oldest
is dropped beyond this."""
MAX_CONTROL_BODY = 1024
"""Largest body of any message but FRAME: everything else is a few small fields."""
TOKEN_BYTES = 8


class MsgType(IntEnum):
    HELLO = 1
    FRAME = 2
    ECHO = 3
    CHECKED = 4
    ATTACH = 17
    ACK = 18
    EXPECT = 19
    CHECK = 20


def _encode(mtype: MsgType, body: list[Any]) -> bytes:
    payload: bytes = msgpack.packb(body, use_bin_type=True)
    head = _HEAD.pack(MSG_MAGIC, mtype, len(payload))
    return head + payload + _CRC.pack(zlib.crc32(payload, zlib.crc32(head)))


def _is_uint(v: object, hi: int = 2**63 - 1) -> bool:
    return type(v) is int and 0 <= v <= hi


class _Corrupt(Exception):
    """The stream at the read position is not a valid message (internal)."""


_AGENT_ALLOWED: dict[int, int] = {
    MsgType.ATTACH: MAX_CONTROL_BODY, MsgType.ACK: MAX_CONTROL_BODY, MsgType.EXPECT: MAX_CONTROL_BODY,
    MsgType.CHECK: MAX_CONTROL_BODY,
}
_HOST_SCAN_ALLOWED: dict[int, int] = {
    MsgType.HELLO: MAX_CONTROL_BODY, MsgType.ECHO: MAX_CONTROL_BODY, MsgType.CHECKED: MAX_CONTROL_BODY
}


class _Reader:
    """Finds messages in a byte stream: strictly (the next bytes must be a message) or by scanning
    (skip to the first magic that starts a complete message of an allowed type and size whose crc
    matches). A scan never waits on a candidate while a later one is already complete, so a garbage
    header claiming a long body cannot stall it; it only accepts small messages."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.skipped = 0

    def next(self, allowed: dict[int, int], *, scan: bool) -> tuple[int, bytes] | None:
        if not scan:
            if len(self.buf) < _HEAD.size:
                if self.buf[:2] != MSG_MAGIC[: len(self.buf[:2])]:
                    raise _Corrupt("not a message (bad magic)")
                return None
            got = self._at(0, allowed)
            if isinstance(got, str):
                raise _Corrupt(got)
            return None if got is None else self._take(0, *got)
        pos, waiting = 0, -1
        while True:
            i = self.buf.find(MSG_MAGIC, pos)
            if i < 0:
                break
            got = self._at(i, allowed)
            if isinstance(got, tuple):
                return self._take(i, *got)
            if got is None and waiting < 0:
                waiting = i  # may complete later: keep it
            pos = i + 1
        if waiting >= 0:
            self._drop(waiting)
        else:
            self._drop(len(self.buf) - (1 if self.buf[-1:] == MSG_MAGIC[:1] else 0))
        return None

    def _at(self, i: int, allowed: dict[int, int]) -> tuple[int, int] | str | None:
        """The message at ``i``: (type, end) if complete and valid, None if it may still be, or what
        is wrong with it."""
        if len(self.buf) - i < _HEAD.size:
            return None
        magic, mtype, length = _HEAD.unpack_from(self.buf, i)
        if magic != MSG_MAGIC:
            return "not a message (bad magic)"
        if mtype not in allowed:
            return f"message type {mtype} not allowed here"
        if length > allowed[mtype]:
            return f"message of {length} bytes exceeds the limit of {allowed[mtype]}"
        end = i + _HEAD.size + length
        if len(self.buf) < end + _CRC.size:
            return None
        (crc,) = _CRC.unpack_from(self.buf, end)
        if zlib.crc32(self.buf[i:end]) != crc:
            return "checksum mismatch"
        return mtype, end

    def _take(self, i: int, mtype: int, end: int) -> tuple[int, bytes]:
        body = bytes(self.buf[i + _HEAD.size : end])
        self._drop(i)
        del self.buf[: end - i + _CRC.size]
        return mtype, body

    def _drop(self, n: int) -> None:
        if n:
            del self.buf[:n]
            self.skipped += n


def _body(data: bytes, what: str, min_len: int, max_len: int | None = None) -> list[Any]:
    try:
        obj = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except Exception:  # msgpack raises a zoo of exception types
        raise _Corrupt(f"{what}: body is not msgpack") from None
    if type(obj) is not list or len(obj) < min_len or (max_len is not None and len(obj) > max_len):
        raise _Corrupt(f"{what}: body is not an array of the right length")
    return obj


_EXPECTABLE = (Kind.KEY_PRESS, Kind.KEY_RELEASE, Kind.BUTTON_PRESS, Kind.BUTTON_RELEASE, Kind.MOTION)


def _region_problem(req_id: object, x: object, y: object, w: object, h: object) -> str | None:
    """What is wrong with a check's fields, or None: the bounds of a sync mark's region."""
    if not _is_uint(req_id):
        return f"request id {req_id!r} is not an unsigned integer"
    if not (_is_uint(x, MAX_COORD) and _is_uint(y, MAX_COORD)):
        return f"region origin {x!r},{y!r} not in 0..{MAX_COORD}"
    if not (_is_uint(w, MAX_COORD) and _is_uint(h, MAX_COORD)) or not w or not h:
        return f"region size {w!r}x{h!r} not in 1..{MAX_COORD}"
    return None


def _is_digest(v: object) -> bool:
    return type(v) is bytes and len(v) <= MAX_DIGEST_BYTES


def _expect_event(kind: object, fields: list[Any], what: str) -> Event:
    if type(kind) is not int or kind not in _EXPECTABLE:
        raise _Corrupt(f"{what}: kind {kind!r} cannot be expected")
    try:
        return make_event(0, kind, fields)
    except LogFormatError as e:
        raise _Corrupt(f"{what}: {e}") from None


# --------------------------------------------------------------------------------------- agent side


class AgentState(Enum):
    DETACHED = "detached"
    """No host attached: frames are kept (resend buffer, fallback file), nothing is sent."""
    ATTACHED = "attached"


@dataclass(frozen=True, slots=True)
class Attached:
    """The host attached; frames from ``resume_from`` on are being (re)sent."""

    resume_from: int
    new_session: bool


@dataclass(frozen=True, slots=True)
class Acked:
    seq: int


@dataclass(frozen=True, slots=True)
class Expected:
    replay_seq: int
    event: Event
    echoed: bool
    """True if an event captured earlier already answered it."""


@dataclass(frozen=True, slots=True)
class CheckRequested:
    """The host asks for the digest of a screen region: sample it and answer with ``checked``."""

    req_id: int
    x: int
    y: int
    w: int
    h: int


@dataclass(frozen=True, slots=True)
class Skipped:
    """Input that was not a valid message for the agent (corruption, a stale connection, a bug)."""

    nbytes: int
    reason: str


AgentEvent = Attached | Acked | Expected | CheckRequested | Skipped


def _matches(ev: Event, kind: int, fields: list[object]) -> bool:
    return isinstance(ev, Key | Button | Motion) and ev.kind == kind and event_fields(ev) == fields


class AgentSide:
    """The guest end: holds the resend buffer, answers attach/ack/expect, produces hello/frame/echo.

    Feed it the frames the log encoder makes (``add_frame``), every captured input event
    (``captured``, for echoes) and the bytes read from the port (``receive_data``); write out what
    ``data_to_send()`` returns whenever the port is writable.
    """

    def __init__(
        self,
        *,
        agent_version: str,
        backend: str = "",
        width: int,
        height: int,
        keymap: str,
        session: bytes | None = None,
        resend_limit_bytes: int = DEFAULT_RESEND_LIMIT_BYTES,
        fallback: Callable[[int], bytes | None] | None = None,
        max_pending_expects: int = DEFAULT_MAX_PENDING_EXPECTS,
        echo_history: int = DEFAULT_ECHO_HISTORY,
        max_pending_checks: int = DEFAULT_MAX_PENDING_CHECKS,
    ) -> None:
        self.agent_version = agent_version
        self.backend = backend
        self.width, self.height, self.keymap = width, height, keymap
        self.session = session if session is not None else os.urandom(TOKEN_BYTES)
        self.resend_limit_bytes = resend_limit_bytes
        self.fallback = fallback
        self.state = AgentState.DETACHED
        self.next_seq = 0
        """Seq the next ``add_frame`` must carry."""
        self.first_kept = 0
        """Oldest seq still in the resend buffer."""
        self.lost_frames = 0
        """Frames that were needed but neither in memory nor available from the fallback."""
        self.recovered_frames = 0
        """Frames sent from the fallback because the resend buffer had evicted them."""
        self._frames: collections.deque[bytes] = collections.deque()
        self._kept_bytes = 0
        self._cursor = 0
        self._control: list[bytes] = []
        self._reader = _Reader()
        self._expects: collections.deque[tuple[int, int, list[object]]] = collections.deque(
            maxlen=max_pending_expects
        )
        self._history: collections.deque[Event] = collections.deque(maxlen=echo_history)
        self._asked: collections.deque[int] = collections.deque(maxlen=max_pending_checks)
        """Check requests of this attachment not answered yet."""
        self._checked: collections.deque[bytes] = collections.deque(maxlen=max_pending_checks)
        """Check answers not yet sent, apart from ``_control`` so a host that asks but does not read
        cannot make them pile up."""

    # -- frames
    def add_frame(self, seq: int, frame: bytes) -> None:
        """Keep a new log frame for sending (and resending until acked)."""
        if seq != self.next_seq:
            raise ProtocolError(f"frame seq {seq} added, expected {self.next_seq}")
        self._frames.append(frame)
        self._kept_bytes += len(frame)
        self.next_seq += 1
        while self._frames and self._kept_bytes > self.resend_limit_bytes:
            self._kept_bytes -= len(self._frames.popleft())
            self.first_kept += 1

    def _ack(self, seq: int) -> None:
        while self._frames and self.first_kept <= seq:  # invariant: first_kept + len(_frames) == next_seq
            self._kept_bytes -= len(self._frames.popleft())
            self.first_kept += 1
        self._cursor = max(self._cursor, min(seq + 1, self.next_seq))

    # -- closed loop
    def captured(self, ev: Event) -> None:
        """An input event was captured: echo the oldest expect it answers, or remember it."""
        for i, (replay_seq, kind, fields) in enumerate(self._expects):
            if _matches(ev, kind, fields):
                del self._expects[i]
                self._echo(replay_seq)
                return
        if isinstance(ev, Key | Button | Motion):
            self._history.append(ev)

    def _echo(self, replay_seq: int) -> None:
        if self.state is AgentState.ATTACHED:
            self._control.append(_encode(MsgType.ECHO, [replay_seq]))

    # -- screen checks
    def checked(self, req_id: int, digest: bytes) -> bool:
        """Answer a ``CheckRequested``: ``region_digest`` of the region, or b"" if it could not be
        sampled. Returns whether the answer is queued: one to a request of an earlier attachment (or
        one forgotten beyond ``max_pending_checks``) is dropped, as the host asking it is gone."""
        if not _is_uint(req_id) or not _is_digest(digest):
            raise ProtocolError(f"bad check answer: request {req_id!r}, digest {digest!r}")
        if req_id not in self._asked:
            return False
        self._asked.remove(req_id)
        if self.state is not AgentState.ATTACHED:
            return False
        self._checked.append(_encode(MsgType.CHECKED, [req_id, digest]))
        return True

    # -- input
    def receive_data(self, data: bytes) -> list[AgentEvent]:
        """Bytes read from the port → what the host asked for. Never raises on bad input: the agent
        must keep recording whatever the host sends; bad input is reported as ``Skipped``."""
        r = self._reader
        r.buf += data
        events: list[AgentEvent] = []
        while True:
            before = r.skipped
            msg = r.next(_AGENT_ALLOWED, scan=True)
            if r.skipped > before:
                events.append(Skipped(r.skipped - before, "not a valid message"))
            if msg is None:
                return events
            try:
                events.append(self._handle(*msg))
            except _Corrupt as e:
                events.append(Skipped(len(msg[1]) + MSG_OVERHEAD, str(e)))

    def _handle(self, mtype: int, data: bytes) -> AgentEvent:
        if mtype == MsgType.ATTACH:
            body = _body(data, "attach", 4)
            version, token, session, resume_from = body[:4]
            if not _is_uint(version) or version < 1:
                raise _Corrupt("attach: bad version")
            if type(token) is not bytes or type(session) is not bytes or not _is_uint(resume_from):
                raise _Corrupt("attach: bad fields")
            new_session = session != self.session
            start = 0 if new_session else min(resume_from, self.next_seq)
            self.state = AgentState.ATTACHED
            self._control = [_encode(MsgType.HELLO, [
                CHANNEL_VERSION, token, self.session, self.agent_version, self.width, self.height,
                self.keymap, self.next_seq, start, self.backend,
            ])]
            self._asked.clear()  # an older host's requests: nobody waits for their answers
            self._checked.clear()
            self._cursor = start
            if not new_session and start > 0:
                self._ack(start - 1)  # the host holds everything before resume_from
            return Attached(start, new_session)
        if mtype == MsgType.ACK:
            (seq,) = _body(data, "ack", 1, 1)
            if not _is_uint(seq):
                raise _Corrupt("ack: seq is not an unsigned integer")
            self._ack(seq)
            return Acked(seq)
        if mtype == MsgType.CHECK:
            body = _body(data, "check", 5, 5)
            problem = _region_problem(*body)
            if problem is not None:
                raise _Corrupt(f"check: {problem}")
            self._asked.append(body[0])
            return CheckRequested(*body)
        body = _body(data, "expect", 2)
        replay_seq, kind = body[0], body[1]
        if not _is_uint(replay_seq):
            raise _Corrupt("expect: replay seq is not an unsigned integer")
        ev = _expect_event(kind, body[2:], "expect")
        fields = event_fields(ev)
        for i, past in enumerate(self._history):
            if past.kind == ev.kind and event_fields(past) == fields:
                del self._history[i]
                self._echo(replay_seq)
                return Expected(replay_seq, ev, True)
        self._expects.append((replay_seq, int(ev.kind), fields))
        return Expected(replay_seq, ev, False)

    # -- output
    @property
    def wants_to_send(self) -> bool:
        if self._control or self._checked:
            return True
        return self.state is AgentState.ATTACHED and self._cursor < self.next_seq

    def data_to_send(self, max_bytes: int = DEFAULT_SEND_CHUNK) -> bytes:
        """Bytes to write to the port now: control messages, then frames from the resend cursor, up
        to about ``max_bytes`` (a message is never split). Empty when there is nothing to send."""
        out = bytearray(b"".join(self._control))
        self._control.clear()
        while self._checked:
            out += self._checked.popleft()
        if self.state is not AgentState.ATTACHED:
            return bytes(out)
        while self._cursor < self.next_seq and len(out) < max_bytes:
            seq = self._cursor
            self._cursor += 1
            frame: bytes | None
            if seq >= self.first_kept:
                frame = self._frames[seq - self.first_kept]
            else:
                frame = self.fallback(seq) if self.fallback is not None else None
                self.recovered_frames += frame is not None
            if frame is None:
                self.lost_frames += 1
                continue
            out += _encode(MsgType.FRAME, [seq, frame])
        return bytes(out)

    def connection_lost(self) -> None:
        """The host went away: forget partial input and queued output, keep every frame."""
        self.state = AgentState.DETACHED
        self._control.clear()
        self._asked.clear()
        self._checked.clear()
        self._reader.buf.clear()


# ---------------------------------------------------------------------------------------- host side


class HostState(Enum):
    DISCONNECTED = "disconnected"
    ATTACHING = "attaching"
    """Attach sent; skipping input until the hello that answers it."""
    STREAMING = "streaming"


@dataclass(frozen=True, slots=True)
class Hello:
    agent_version: str
    width: int
    height: int
    keymap: str
    next_seq: int
    resume_from: int
    session: bytes
    restarted: bool
    """The agent is not the one seen before: its log starts again at seq 0 (a new log)."""
    backend: str = ""
    """The agent's capture backend (``recorder.capture``), e.g. ``pynput-xorg``; "" from an agent that
    does not say."""


@dataclass(frozen=True, slots=True)
class LogFrame:
    """The next log frame, in seq order, never twice."""

    seq: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Echo:
    replay_seq: int


@dataclass(frozen=True, slots=True)
class Checked:
    """The agent's answer to ``check(req_id, ...)``: ``region_digest`` of the region as X ``GetImage``
    shows it (no software cursor), or b"" if the agent could not sample that region."""

    req_id: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class Gap:
    """Frames ``first``..``last`` are lost (the agent could not find them): the log has a hole."""

    first: int
    last: int


@dataclass(frozen=True, slots=True)
class Resync:
    """The stream went bad (``reason``); the rest was dropped and a new attach is queued."""

    reason: str


HostEvent = Hello | LogFrame | Echo | Checked | Gap | Resync


class HostSide:
    """The host end: attach (resume), receive frames in order exactly once, ack, expect/echo, check.

    A new ``HostSide`` made with the ``resume_from`` and ``session`` a previous one reached picks up
    where it left off; ``connect()`` (again) after every (re)connection of the port.
    """

    def __init__(
        self,
        *,
        resume_from: int = 0,
        session: bytes = b"",
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        token_source: Callable[[], bytes] = lambda: os.urandom(TOKEN_BYTES),
    ) -> None:
        self.state = HostState.DISCONNECTED
        self.next_seq = resume_from
        """First log seq not yet received."""
        self.session = session
        self.max_frame_bytes = max_frame_bytes
        self.duplicates = 0
        self._token_source = token_source
        self._token = b""
        self._out: list[bytes] = []
        self._reader = _Reader()
        frame_limit = max_frame_bytes + FRAME_OVERHEAD + 16  # + the msgpack around it
        self._stream_allowed: dict[int, int] = {
            MsgType.FRAME: frame_limit, MsgType.ECHO: MAX_CONTROL_BODY, MsgType.HELLO: MAX_CONTROL_BODY,
            MsgType.CHECKED: MAX_CONTROL_BODY,
        }

    def connect(self) -> None:
        """(Re)attach: ask the agent to send everything from ``next_seq`` on."""
        self._token = self._token_source()
        self._reader.buf.clear()
        self._out = [_encode(MsgType.ATTACH, [CHANNEL_VERSION, self._token, self.session, self.next_seq])]
        self.state = HostState.ATTACHING

    def connection_lost(self) -> None:
        self.state = HostState.DISCONNECTED
        self._reader.buf.clear()
        self._out.clear()

    def ack(self, seq: int) -> None:
        """Tell the agent it may forget frames ≤ ``seq`` (call once they are stored safely). Not sent
        while (re)attaching: the attach's ``resume_from`` says as much."""
        if not _is_uint(seq) or seq >= self.next_seq:
            raise ProtocolError(f"cannot ack frame {seq}: only frames < {self.next_seq} were received")
        if self.state is HostState.STREAMING:
            self._out.append(_encode(MsgType.ACK, [seq]))

    def expect(self, replay_seq: int, event: Key | Button | Motion) -> None:
        """Announce the event about to be injected; the agent echoes ``replay_seq`` when it sees it."""
        if not _is_uint(replay_seq):
            raise ProtocolError(f"replay seq {replay_seq!r} is not an unsigned integer")
        try:
            _expect_event(int(event.kind), event_fields(event), "expect")
        except _Corrupt as e:
            raise ProtocolError(str(e)) from None
        if self.state is HostState.DISCONNECTED:
            raise ProtocolError("expect while disconnected: connect() first")
        self._out.append(_encode(MsgType.EXPECT, [replay_seq, int(event.kind), *event_fields(event)]))

    def check(self, req_id: int, x: int, y: int, w: int, h: int) -> None:
        """Ask the agent for the digest of screen region (x, y, w, h); it answers ``Checked(req_id, ...)``.
        An answer can be lost in a reconnection: ask again after a timeout (a fresh ``req_id`` tells a
        late answer from the new one)."""
        problem = _region_problem(req_id, x, y, w, h)
        if problem is not None:
            raise ProtocolError(f"check: {problem}")
        if self.state is HostState.DISCONNECTED:
            raise ProtocolError("check while disconnected: connect() first")
        self._out.append(_encode(MsgType.CHECK, [req_id, x, y, w, h]))

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> list[HostEvent]:
        """Bytes read from the channel → hello, frames (in order, once), echoes, check answers, gaps,
        resyncs.

        Raises ProtocolError only when the agent cannot be talked to at all (another channel version,
        a hello that contradicts what the host holds); a damaged stream is answered by ``Resync``.
        """
        if self.state is HostState.DISCONNECTED:
            return []
        r = self._reader
        r.buf += data
        events: list[HostEvent] = []
        while True:  # a resync re-attaches: the state is ATTACHING or STREAMING throughout
            scan = self.state is HostState.ATTACHING
            try:
                msg = r.next(_HOST_SCAN_ALLOWED if scan else self._stream_allowed, scan=scan)
                if msg is None:
                    break
                events += self._handle(*msg)
            except _Corrupt as e:
                events.append(Resync(str(e)))
                self.connect()
        return events

    def _handle(self, mtype: int, data: bytes) -> list[HostEvent]:
        if mtype == MsgType.ECHO:
            (replay_seq,) = _body(data, "echo", 1, 1)
            if not _is_uint(replay_seq):
                raise _Corrupt("echo: replay seq is not an unsigned integer")
            return [Echo(replay_seq)]
        if mtype == MsgType.CHECKED:
            req_id, digest = _body(data, "checked", 2, 2)
            if not _is_uint(req_id) or not _is_digest(digest):
                raise _Corrupt("checked: bad fields")
            return [Checked(req_id, digest)]
        if mtype == MsgType.HELLO:
            if self.state is not HostState.ATTACHING:
                raise _Corrupt("hello while streaming")
            hello = self._hello(data)
            return [] if hello is None else [hello]
        seq, frame = _body(data, "frame", 2, 2)
        if not _is_uint(seq, 2**32 - 1) or type(frame) is not bytes:
            raise _Corrupt("frame: bad fields")
        try:
            _, inner, total = peek_frame(frame, max_frame_bytes=self.max_frame_bytes)
        except LogFormatError as e:
            raise _Corrupt(f"frame {seq}: {e}") from None
        if inner != seq or total != len(frame):
            raise _Corrupt(f"frame {seq}: the log frame inside has seq {inner} and {total} bytes")
        if seq < self.next_seq:
            self.duplicates += 1
            return []
        out: list[HostEvent] = []
        if seq > self.next_seq:
            out.append(Gap(self.next_seq, seq - 1))
        self.next_seq = seq + 1
        out.append(LogFrame(seq, frame))
        return out

    def _hello(self, data: bytes) -> Hello | None:
        try:
            body = _body(data, "hello", 9)
        except _Corrupt:
            return None  # not the hello we wait for: keep scanning
        version, token, session, agent_version, width, height, keymap, next_seq, resume_from = body[:9]
        if token != self._token:
            return None  # answers an older attach
        if version != CHANNEL_VERSION:
            raise ProtocolError(f"the agent speaks channel version {version!r}, this host {CHANNEL_VERSION}")
        if not (type(session) is bytes and type(agent_version) is str and type(keymap) is str
                and _is_uint(width) and _is_uint(height) and _is_uint(next_seq) and _is_uint(resume_from)):
            raise ProtocolError("the agent's hello has malformed fields")
        restarted = session != self.session
        if restarted and resume_from != 0:
            raise ProtocolError("the agent started a new session but does not resend it from seq 0")
        if not restarted and resume_from != self.next_seq:
            raise ProtocolError(
                f"the agent resumes at frame {resume_from} but the host needs {self.next_seq} "
                f"(the agent has made frames < {next_seq})"
            )
        backend = body[9] if len(body) > 9 else ""
        if type(backend) is not str:
            raise ProtocolError("the agent's hello has a malformed backend name")
        hello = Hello(agent_version, width, height, keymap, next_seq, resume_from, session,
                      restarted and self.session != b"", backend)
        self.session = session
        self.next_seq = resume_from
        self.state = HostState.STREAMING
        return hello
