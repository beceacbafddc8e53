"""An input log arriving in pieces, turned into events: the one pump every reader of a log uses.

:class:`LogPump` is the sans-I/O core: bytes in, events out, the decoder's checks on every piece
(frame integrity, sequence, time, size) and, when the input ends, the check that it did not stop
short (in the middle of a frame, or before its end-of-log event when one is required). The
adapters around it:

- :func:`events_from_chunks` pulls chunks (a file, a growing file: :func:`file_chunks`);
- :class:`EventFeed` hands the events from the thread that receives a log (a migration target's
  session reader) to the thread that replays it, and checks the log is whole when the sender says
  it ended;
- the recorder's host side (``replayer.link.record``) and a migration's source feed it what they
  forward, so garbage is refused before it is written or sent on.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from recorder.logformat import End, Event, EventsFrame, LogDecoder, LogHeader
from replay_migrate.errors import UsageError
from replay_migrate.safeopen import open_regular
from replayer.clock import REAL_CLOCK, Clock

FOLLOW_POLL_S = 0.05
"""How often a growing log file is checked for new bytes."""
CHUNK_BYTES = 1 << 16


class LogPump:
    """Decode a log fed in pieces split anywhere; :meth:`finish` when the input ends.

    ``require_end``: a log must end with its end-of-log event (a migration's, whose source ends
    it); without, a log may stop after any whole frame (a recording cut by the user)."""

    def __init__(self, *, require_end: bool = True, on_header: Callable[[LogHeader], None] | None = None,
                 decoder: LogDecoder | None = None) -> None:
        self.require_end = require_end
        self.on_header = on_header
        self.decoder = decoder or LogDecoder()
        self.events = 0
        """Events decoded so far."""

    @property
    def ended(self) -> bool:
        """The end-of-log event was decoded (anything more is an error)."""
        return self.decoder.ended

    @property
    def header(self) -> LogHeader | None:
        return self.decoder.header

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """The events ``data`` completed, in order; LogFormatError for anything malformed."""
        out: list[Event] = []
        for frame in self.decoder.feed(data):
            if isinstance(frame, EventsFrame):
                out += frame.events
            elif self.on_header is not None:
                self.on_header(frame.header)
        self.events += len(out)
        return out

    def finish(self) -> None:
        """The input ended: LogFormatError if it stopped in the middle of a frame, before the
        header, or (``require_end``) before the end-of-log event."""
        self.decoder.close(require_end=self.require_end)

    def end_frame(self) -> bytes:
        """The frame that ends the log fed so far (see ``LogDecoder.end_frame``)."""
        return self.decoder.end_frame()


def events_from_chunks(chunks: Iterable[bytes], *, on_header: Callable[[LogHeader], None] | None = None,
                       require_end: bool = False) -> Iterator[Event]:
    """The events of a log arriving in ``chunks``; stops at its end-of-log event (yielded) or when
    the chunks run out, checking then that the log is whole (:meth:`LogPump.finish`)."""
    pump = LogPump(require_end=require_end, on_header=on_header)
    for chunk in chunks:
        yield from pump.feed(chunk)
        if pump.ended:
            break
    pump.finish()


def file_chunks(path: Path, *, follow: bool = False, chunk: int = CHUNK_BYTES, idle_timeout_s: float | None = None,
                clock: Clock = REAL_CLOCK, poll_s: float = FOLLOW_POLL_S) -> Iterator[bytes]:
    """The bytes of ``path``; with ``follow`` keep reading what is appended (tail -f) until the
    caller stops (the pump saw the end of the log) or nothing new came for ``idle_timeout_s``."""
    fd, _ = open_regular(path, "log", error=UsageError)     # a FIFO: refused, not waited on
    with os.fdopen(fd, "rb") as f:
        idle_since = clock.now()
        while True:
            data = f.read(chunk)
            if data:
                idle_since = clock.now()
                yield data
                continue
            if not follow:
                return
            if idle_timeout_s is not None and clock.now() - idle_since > idle_timeout_s:
                return
            clock.sleep(poll_s)


_DONE = None


class EventFeed:
    """Events handed from the thread that receives a log to the one that replays it, in order.

    The receiver calls :meth:`put` with each piece of the log (a malformed one raises there, in
    the receiver, which then fails), :meth:`end` once the sender ended the log (it raises
    LogFormatError if the log is not whole: a target must not take a cut log for a replayed one),
    and :meth:`close` in any case (a failure, a cancellation) so the replay thread stops waiting.
    The replay thread iterates: it gets every event up to the end-of-log, or until closed."""

    def __init__(self, pump: LogPump | None = None) -> None:
        self.pump = pump or LogPump(require_end=True)
        self._q: queue.SimpleQueue[Event | None] = queue.SimpleQueue()

    def put(self, data: bytes) -> int:
        """Decode one piece of the log and queue its events; returns how many (the target shows
        how far its replay is behind what arrived)."""
        events = self.pump.feed(data)
        for ev in events:
            self._q.put(ev)
        return len(events)

    def end(self) -> None:
        """The sender ended the log: check that it is whole, then let the replay finish."""
        self.pump.finish()
        self._q.put(_DONE)

    def close(self) -> None:
        """Stop the replay thread's iteration after what it has (idempotent)."""
        self._q.put(_DONE)

    def __iter__(self) -> Iterator[Event]:
        while True:
            ev = self._q.get()
            if ev is _DONE:
                return
            yield ev
            if isinstance(ev, End):
                return
