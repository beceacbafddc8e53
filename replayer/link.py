"""The host end of a guest's recorder channel: a blocking adapter around ``recorder.channel.HostSide``.

Both sides use it: the source to *record* (receive log frames, ack them once stored) and the
target to *replay* closed loop (announce each injected event with ``expect`` and wait for the
guest agent's ``echo``). A dropped socket is reconnected and the channel protocol resumes from the
first frame not yet received, so nothing is lost or duplicated.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from recorder.channel import Checked, Echo, Gap, Hello, HostEvent, HostSide, LogFrame, Resync
from recorder.logformat import Button, Key, Motion
from replay_migrate.errors import ReplayError, TransportError
from replayer.logfeed import LogPump
from vm.machine import Machine

RECV_BYTES = 1 << 16
RECONNECT_TIMEOUT_S = 30.0
"""How long a lost channel may stay down before recording or replay gives up."""
HELLO_TIMEOUT_S = 15.0
"""How long the agent may take to answer an attach (it answers in milliseconds when it runs)."""



class CheckTimeout(ReplayError):
    """The agent did not answer one screen check in time: under load a large region can take
    seconds to sample in a TCG guest. A sync mark waiting on it counts as unmet (not fatal unless
    ``strict_sync``); an agent that stopped answering altogether fails the next event's echo."""

class RecorderLink:
    """One connection (and its reconnections) to the recorder agent of ``machine``."""

    def __init__(self, machine: Machine, *, resume_from: int = 0, session: bytes = b"",
                 reconnect_timeout: float = RECONNECT_TIMEOUT_S) -> None:
        self.machine = machine
        self.host = HostSide(resume_from=resume_from, session=session)
        self.reconnect_timeout = reconnect_timeout
        self.hello: Hello | None = None
        self.gaps: list[Gap] = []
        self.reconnects = 0
        self._check_id = 0
        self._sock: socket.socket | None = None
        self._pending: list[HostEvent] = []
        self.log = logging.getLogger(f"replay_migrate.recorder.{machine.name}")

    # ---- connection ----------------------------------------------------------------------
    def open(self, timeout: float = HELLO_TIMEOUT_S) -> Hello:
        """Connect and wait for the agent's hello (which starts the frames ≥ resume_from)."""
        self._connect(timeout)
        deadline = time.monotonic() + timeout
        while self.hello is None or self.host.state.value != "streaming":
            left = deadline - time.monotonic()
            if left <= 0:
                raise ReplayError(f"the recorder agent of {self.machine.name!r} did not answer in "
                                  f"{timeout:.0f} s (is it running? see /run/replay-migrate/agent.err "
                                  "in the guest)")
            self._pending += self._read(min(left, 0.5))
        return self.hello

    def _connect(self, timeout: float) -> None:
        self._sock = self.machine.open_recorder(timeout=timeout)
        self.host.connect()
        self._flush()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.host.connection_lost()

    def __enter__(self) -> RecorderLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _flush(self) -> None:
        data = self.host.data_to_send()
        if data and self._sock is not None:
            try:
                self._sock.sendall(data)
            except OSError:
                self._lost()

    def _lost(self) -> None:
        """The socket died: reconnect within the time limit; the attach resumes the stream."""
        self.log.info("recorder channel lost; reconnecting from frame %d", self.host.next_seq)
        self.close()
        self.reconnects += 1
        try:
            self._connect(self.reconnect_timeout)
        except Exception as e:
            raise TransportError(f"the recorder channel of {self.machine.name!r} is gone and did not "
                                 f"come back in {self.reconnect_timeout:.0f} s") from e

    def _read(self, timeout: float) -> list[HostEvent]:
        if self._sock is None:
            self._connect(self.reconnect_timeout)
        assert self._sock is not None
        ready, _, _ = select.select([self._sock], [], [], max(0.0, timeout))
        if not ready:
            return []
        try:
            data = self._sock.recv(RECV_BYTES)
        except OSError:
            data = b""
        if not data:
            self._lost()
            return []
        events = self.host.receive_data(data)
        self._flush()                        # a resync queues a new attach
        for ev in events:
            if isinstance(ev, Hello):
                self.hello = ev
            elif isinstance(ev, Gap):
                self.gaps.append(ev)
                self.log.warning("recorder frames %d..%d are lost", ev.first, ev.last)
            elif isinstance(ev, Resync):
                self.log.info("recorder stream resynchronised: %s", ev.reason)
        return events

    # ---- what callers use ----------------------------------------------------------------
    def poll(self, timeout: float) -> list[HostEvent]:
        """Events that arrived within ``timeout`` seconds (frames in order, once; echoes)."""
        if self._pending:
            out, self._pending = self._pending, []
            return out
        return self._read(timeout)

    def frames(self, timeout: float) -> list[LogFrame]:
        return [e for e in self.poll(timeout) if isinstance(e, LogFrame)]

    def ack(self, seq: int) -> None:
        self.host.ack(seq)
        self._flush()

    def expect(self, replay_seq: int, event: Key | Button | Motion) -> None:
        self.host.expect(replay_seq, event)
        self._flush()

    def check(self, x: int, y: int, w: int, h: int, timeout: float,
              on_event: list[HostEvent] | None = None) -> bytes:
        """The digest of a screen region as the guest's own agent sees it (X GetImage, no software
        cursor): what sync marks were made with. b"" if the agent could not sample it."""
        self._check_id += 1
        req = self._check_id
        self.host.check(req, x, y, w, h)
        self._flush()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.poll(max(0.0, deadline - time.monotonic())):
                if isinstance(ev, Checked) and ev.req_id == req:
                    return ev.digest
                if on_event is not None and not isinstance(ev, Checked):
                    on_event.append(ev)
        raise CheckTimeout(f"the recorder agent of {self.machine.name!r} did not answer a screen check "
                           f"in {timeout:.0f} s")

    def wait_echo(self, replay_seq: int, timeout: float, on_event: list[HostEvent] | None = None) -> bool:
        """Wait for the echo of ``replay_seq``; other events go to ``on_event`` if given."""
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.poll(max(0.0, deadline - time.monotonic())):
                if isinstance(ev, Echo):
                    if ev.replay_seq == replay_seq:
                        return True
                elif on_event is not None:
                    on_event.append(ev)
            if time.monotonic() >= deadline:
                return False


@dataclass
class RecordStats:
    frames: int
    bytes: int
    seconds: float
    ended: bool
    reconnects: int
    gaps: int


def record(link: RecorderLink, out: BinaryIO, *, stop: Callable[[], bool] = lambda: False,
           duration_s: float | None = None, poll_s: float = 0.1) -> RecordStats:
    """Append the agent's log frames to ``out`` as they come, acking each once written, until
    ``stop()`` says so, ``duration_s`` passed, or the log ended (the agent stopped)."""
    t0 = time.monotonic()
    pump = LogPump(require_end=False)
    frames = nbytes = 0
    while not pump.ended and not stop() and (duration_s is None or time.monotonic() - t0 < duration_s):
        for fr in link.frames(poll_s):
            pump.feed(fr.data)           # refuse garbage before it reaches the file
            out.write(fr.data)
            out.flush()
            link.ack(fr.seq)
            frames += 1
            nbytes += len(fr.data)
    os.fsync(out.fileno())
    return RecordStats(frames, nbytes, time.monotonic() - t0, pump.ended, link.reconnects, len(link.gaps))
