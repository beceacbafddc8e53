"""recorder.agent for real: Xvfb with RECORD, the agent on Debian's /usr/bin/python3 (python3-pynput,
python3-xlib, python3-msgpack: its capture backend is pynput-xorg), real input from xdotool, and the host
side of the channel in this process.

The port stand-in is a pty: like a virtio-serial port its slave end is a character device the agent
opens by path (``O_RDWR | O_NONBLOCK``), it is bidirectional, and a host that does not read makes
the agent's writes fail with EAGAIN once the kernel buffer is full, just as a virtio port whose
host is slow or absent does. (The agent puts a tty into raw mode; a virtio port is not a tty.) A
host disconnect is modelled by dropping the host-side object and every byte in flight, then
attaching with a new one, which is what the agent sees when a real host reconnects.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import time
import tty
from collections.abc import Callable, Iterator
from functools import partial
from operator import contains
from pathlib import Path

import pytest
from xkit import REPO, SYSTEM_PYTHON, H, W, xdo, xvfb

from recorder.agent import (
    CheckQueue,
    Clock,
    FallbackLog,
    Port,
    Pump,
    PumpConfig,
    RegionWatch,
    Settle,
    Settler,
    SyncTrigger,
    mark_place,
)
from recorder.capture import (
    DEFAULT_SYNC_FOLLOW_MS,
    DEFAULT_SYNC_MAX_WAIT_MS,
    DEFAULT_SYNC_SETTLE_MS,
    Captured,
    InputKind,
    SyncPolicy,
)
from recorder.channel import Checked, Echo, Hello, HostSide, LogFrame
from recorder.logformat import (
    Button,
    End,
    Event,
    EventsFrame,
    Key,
    LogDecoder,
    LogHeader,
    Motion,
    SyncMark,
    read_log,
    region_digest,
)
from replayer.clock import ManualClock
from replayer.keymap import char_stroke
from replayer.logfeed import LogPump


@pytest.fixture(scope="module")
def display() -> Iterator[str]:
    with xvfb() as disp:
        yield disp


class Agent:
    """The agent in a subprocess on the system python, its port a pty whose master we hold."""

    def __init__(self, disp: str, tmp: Path, *extra: str, port: str | None = None) -> None:
        self.master, self.slave = pty.openpty()
        tty.setraw(self.slave)  # before the agent opens it: no window where bytes are cooked
        os.set_blocking(self.master, False)
        self.port = port or os.ttyname(self.slave)
        self.log_file = tmp / "session.rmlog"
        self.ready = tmp / "ready"
        self.err = tmp / "agent.err"
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [SYSTEM_PYTHON, "-m", "recorder.agent", "--port", self.port, "--log-file", str(self.log_file),
                 "--display", disp, "--ready-mark", str(self.ready), "-v", *extra],
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO)},
                cwd="/", stderr=err,
            )
        deadline = time.monotonic() + 30
        while "RM_MARK AGENT_READY uptime=" not in (self.ready.read_text() if self.ready.exists() else ""):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"agent not ready (exit {self.proc.poll()}):\n{self.stderr()}")
            time.sleep(0.05)

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"agent did not stop on SIGTERM:\n{self.stderr()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)

    def discard_pending(self) -> int:
        """Throw away whatever the agent wrote that nobody read (lost in a disconnect)."""
        n = 0
        while True:
            try:
                n += len(os.read(self.master, 65536))
            except BlockingIOError:
                return n

    def discard_until_quiet(self, quiet_s: float = 0.2, timeout: float = 10) -> int:
        """Throw away what the agent writes until it has written nothing for ``quiet_s``: a frame
        reaches the fallback file a moment before the port, and a disconnect loses both."""
        n = 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], quiet_s)
            if not ready:
                return n
            n += self.discard_pending()
        raise AssertionError(f"the agent kept writing for {timeout} s:\n{self.stderr()}")

    def recorded(self) -> list[tuple[object, ...]]:
        """The inputs in the whole frames of the agent's fallback log so far."""
        data = self.log_file.read_bytes() if self.log_file.exists() else b""
        return [summary(e) for e in LogPump(require_end=False).feed(data) if not isinstance(e, SyncMark | End)]

    def wait_recorded(self, expected: list[tuple[object, ...]], timeout: float = 10) -> None:
        """Wait until the agent has recorded ``expected`` (its fallback log holds every frame)."""
        deadline = time.monotonic() + timeout
        while self.recorded() != expected:
            assert time.monotonic() < deadline, (self.recorded(), expected, self.stderr())
            time.sleep(0.02)              # polling a file the agent writes


class Host:
    """The host end: a HostSide on the pty master, decoding the log as frames arrive."""

    def __init__(self, agent: Agent, decoder: LogDecoder | None = None, *, resume_from: int = 0,
                 session: bytes = b"") -> None:
        self.agent = agent
        self.side = HostSide(resume_from=resume_from, session=session)
        self.decoder = decoder or LogDecoder()
        self.events: list[Event] = []
        self.echoes: dict[int, float] = {}
        self.checks: dict[int, bytes] = {}
        self.hellos: list[Hello] = []

    def connect(self) -> None:
        self.side.connect()
        self._send()

    def _send(self) -> None:
        data = self.side.data_to_send()
        while data:
            try:
                data = data[os.write(self.agent.master, data) :]
            except BlockingIOError:       # the agent reads the pty: wait until it has room again
                select.select([], [self.agent.master], [], 1.0)

    def pump(self, until: Callable[[], bool], timeout: float = 10, max_bytes: int | None = None) -> bool:
        deadline = time.monotonic() + timeout
        taken = 0
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            select.select([self.agent.master], [], [], min(left, 0.05))
            try:
                data = os.read(self.agent.master, 65536 if max_bytes is None else max_bytes - taken)
            except BlockingIOError:
                continue
            taken += len(data)
            self.feed(data)
            if max_bytes is not None and taken >= max_bytes:
                return until()
        return True

    def feed(self, data: bytes) -> None:
        now = time.monotonic()
        for ev in self.side.receive_data(data):
            if isinstance(ev, LogFrame):
                for f in self.decoder.feed(ev.data):
                    if isinstance(f, EventsFrame):
                        self.events += f.events
            elif isinstance(ev, Echo):
                self.echoes[ev.replay_seq] = now
            elif isinstance(ev, Hello):
                self.hellos.append(ev)
            elif isinstance(ev, Checked):
                self.checks[ev.req_id] = ev.digest
            else:
                raise AssertionError(f"unexpected channel event {ev}")
        self._send()

    def check(self, req_id: int, x: int, y: int, w: int, h: int, timeout: float = 5) -> bytes:
        """Ask the agent for a region's digest and wait for the answer."""
        self.side.check(req_id, x, y, w, h)
        self._send()
        assert self.pump(lambda: req_id in self.checks, timeout), (req_id, self.agent.stderr())
        return self.checks[req_id]

    def inputs(self) -> list[tuple[object, ...]]:
        return [summary(e) for e in self.events if not isinstance(e, SyncMark | End)]


def summary(e: Event) -> tuple[object, ...]:
    if isinstance(e, Key):
        return ("key", e.keycode, e.down)
    if isinstance(e, Button):
        return ("button", e.button, e.down)
    if isinstance(e, Motion):
        return ("motion", e.x, e.y)
    return (type(e).__name__,)


def typed(text: str) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for ch in text:
        s = char_stroke(ch)
        assert not s.shift
        out += [("key", s.keycode, True), ("key", s.keycode, False)]
    return out


def click(button: int) -> list[tuple[object, ...]]:
    return [("button", button, True), ("button", button, False)]


@pytest.fixture
def agent_factory(display: str, tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    agents: list[Agent] = []

    def make(*extra: str, port: str | None = None) -> Agent:
        a = Agent(display, tmp_path, *extra, port=port)
        agents.append(a)
        return a

    yield make
    for a in agents:
        a.close()


def test_records_real_input_in_order(display: str, agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory()
    host = Host(agent)
    host.connect()
    assert host.pump(lambda: bool(host.hellos), 10), agent.stderr()
    hello = host.hellos[0]
    assert (hello.width, hello.height, hello.keymap) == (W, H, "us")
    assert hello.backend == "pynput-xorg"

    xdo(display, "mousemove", "100", "150")
    xdo(display, "type", "--delay", "30", "hello world 42")
    xdo(display, "keydown", "shift", "keydown", "a", "keyup", "a", "keyup", "shift")
    xdo(display, "keydown", "ctrl", "keydown", "s", "keyup", "s", "keyup", "ctrl")  # xdotool key's order varies
    xdo(display, "mousemove", "300", "400")
    xdo(display, "click", "1")
    xdo(display, "click", "3")
    xdo(display, "click", "4", "click", "5")  # the wheel: up, down
    expected = [
        ("motion", 100, 150), *typed("hello world 42"),
        ("key", 50, True), ("key", 38, True), ("key", 38, False), ("key", 50, False),
        ("key", 37, True), ("key", 39, True), ("key", 39, False), ("key", 37, False),
        ("motion", 300, 400), *click(1), *click(3), *click(4), *click(5),
    ]
    assert host.pump(lambda: len(host.inputs()) >= len(expected), 10), (host.inputs(), agent.stderr())
    assert host.inputs() == expected

    # a sync mark once input is idle: 64x64 around the pointer, of a black root window (Xvfb -br)
    assert host.pump(lambda: any(isinstance(e, SyncMark) for e in host.events[-3:]), 5), agent.stderr()
    mark = next(e for e in reversed(host.events) if isinstance(e, SyncMark))
    assert (mark.x, mark.y, mark.w, mark.h, mark.label) == (268, 368, 64, 64, "click")
    assert mark.digest == region_digest(bytes(64 * 64 * 3))

    # times: from the X server clock, in order, with the typing gaps
    keys = [e for e in host.events if isinstance(e, Key)]
    assert keys[27].t_us - keys[0].t_us >= 200_000  # 14 characters at 30 ms
    assert host.decoder.header is not None and host.decoder.header.width == W

    # SIGTERM: the log is ended and drained to the attached host
    assert agent.stop() == 0, agent.stderr()
    host.pump(lambda: host.decoder.ended, 5)
    assert host.decoder.ended and isinstance(host.events[-1], End)
    # the fallback file holds exactly the same log
    log = read_log(str(agent.log_file))
    assert list(log.events) == host.events


def test_gaps_are_the_x_servers_not_when_the_agent_got_the_events(
    display: str, agent_factory: Callable[..., Agent]
) -> None:
    """A double click 100 ms apart stays 100 ms apart in the log though the agent gets both clicks at
    once (it is stopped while they happen): the times are the X server's, which pynput's public
    callbacks do not give (recorder.pynput_xorg)."""
    agent = agent_factory()
    host = Host(agent)
    host.connect()
    assert host.pump(lambda: bool(host.hellos), 10), agent.stderr()
    xdo(display, "mousemove", "200", "200")
    assert host.pump(lambda: ("motion", 200, 200) in host.inputs(), 5), agent.stderr()
    os.kill(agent.proc.pid, signal.SIGSTOP)
    try:
        xdo(display, "click", "--repeat", "2", "--delay", "100", "1")
        xdo(display, "keydown", "KP_1", "keyup", "KP_1", "keydown", "1", "keyup", "1")
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)
    # the keypad's 1 and the main row's: one keysym to pynput's callbacks, two keycodes here (xdotool
    # toggles NumLock, keycode 77, around KP_1)
    want = [*click(1), *click(1), ("key", 87, True), ("key", 87, False), ("key", 10, True), ("key", 10, False)]

    def recorded() -> list[tuple[object, ...]]:
        return [i for i in host.inputs()[1:] if i[:2] != ("key", 77)]

    assert host.pump(lambda: recorded() == want, 5), (recorded(), agent.stderr())
    presses = [e for e in host.events if isinstance(e, Button) and e.down]
    assert 90_000 <= presses[1].t_us - presses[0].t_us <= 250_000, presses
    assert agent.stop() == 0


def test_reconnect_loses_and_duplicates_nothing(display: str, agent_factory: Callable[..., Agent]) -> None:
    # a resend buffer smaller than any frame: every frame the new host gets is re-read from the
    # fallback file (with 300 bytes, whether any was depended on how many sync marks the pauses
    # between the batches left time for)
    agent = agent_factory("--resend-bytes", "1", "--frame-ms", "20", "--motion-window-ms", "0")
    expected: list[tuple[object, ...]] = []

    # batch A: nobody attached yet
    xdo(display, "mousemove", "10", "10", "type", "--delay", "5", "abc def")
    expected += [("motion", 10, 10), *typed("abc def")]
    agent.wait_recorded(expected)

    host = Host(agent)
    host.connect()
    assert host.pump(lambda: len(host.inputs()) >= len(expected), 10), agent.stderr()
    host.side.ack(host.side.next_seq - 1)

    # batch B while attached; the host reads only part of it, then "disconnects"
    xdo(display, "type", "--delay", "5", "ghi jkl mno")
    expected += typed("ghi jkl mno")
    agent.wait_recorded(expected)
    host.pump(lambda: False, 2, max_bytes=150)
    assert len(host.inputs()) < len(expected)

    # batch C while nobody reads; whatever was in flight is lost
    xdo(display, "mousemove", "20", "30", "click", "1", "type", "--delay", "5", "pqr stu")
    expected += [("motion", 20, 30), *click(1), *typed("pqr stu")]
    agent.wait_recorded(expected)
    agent.discard_until_quiet()

    # a new host object resumes from what the old one had decoded (its persisted state)
    host2 = Host(agent, host.decoder, resume_from=host.side.next_seq, session=host.side.session)
    host2.events = list(host.events)
    host2.connect()
    assert host2.pump(lambda: len(host2.inputs()) >= len(expected), 15), (host2.inputs(), agent.stderr())
    assert not host2.hellos[0].restarted
    host2.pump(lambda: False, 0.5)
    assert host2.inputs() == expected
    assert host2.side.duplicates == 0
    assert agent.stop() == 0
    m = re.search(r"\((\d+) re-read from the fallback log, (\d+) lost\)", agent.stderr())
    assert m is not None and int(m[1]) > 0 and int(m[2]) == 0, agent.stderr()


def test_expect_echo_round_trip(display: str, agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory()
    host = Host(agent)
    host.connect()
    assert host.pump(lambda: bool(host.hellos), 10), agent.stderr()
    steps: list[tuple[Key | Button | Motion, list[str]]] = [
        (Key(0, 38, True), ["keydown", "a"]),
        (Key(0, 38, False), ["keyup", "a"]),
        (Motion(0, 321, 222), ["mousemove", "321", "222"]),
        (Button(0, 1, True), ["mousedown", "1"]),
        (Button(0, 1, False), ["mouseup", "1"]),
    ]
    latencies = []
    for seq, (ev, cmd) in enumerate(steps, 1):
        host.side.expect(seq, ev)
        host.check(100 + seq, 0, 0, 1, 1)   # answered in order: the expect is there before the event
        t0 = time.monotonic()
        xdo(display, *cmd)
        assert host.pump(partial(contains, host.echoes, seq), 5), (seq, ev, agent.stderr())
        latencies.append(host.echoes[seq] - t0)
    assert sorted(host.echoes) == [1, 2, 3, 4, 5]
    assert sorted(latencies)[2] < 1.0  # median, including an xdotool process start

    # the event first, the expect after it: still echoed (once)
    xdo(display, "key", "b")
    assert host.pump(lambda: ("key", 56, False) in host.inputs(), 5), agent.stderr()   # recorded first
    host.side.expect(10, Key(0, 56, True))
    host.side.expect(11, Key(0, 56, True))
    host._send()
    assert host.pump(lambda: 10 in host.echoes, 5), agent.stderr()
    host.pump(lambda: False, 0.5)
    assert 11 not in host.echoes
    assert agent.stop() == 0


def test_records_with_no_port_and_keeps_everything_in_the_fallback(
    display: str, agent_factory: Callable[..., Agent], tmp_path: Path
) -> None:
    agent = agent_factory(port=str(tmp_path / "no-such-port"))
    xdo(display, "mousemove", "50", "60", "type", "--delay", "10", "offline")
    agent.wait_recorded([("motion", 50, 60), *typed("offline")])
    assert agent.stop() == 0, agent.stderr()
    log = read_log(str(agent.log_file))
    inputs = [summary(e) for e in log.events if not isinstance(e, SyncMark | End)]
    assert inputs == [("motion", 50, 60), *typed("offline")]
    assert isinstance(log.events[-1], End)
    assert "not available" in agent.stderr()


PAINTER = """
import sys
from Xlib import X, display
root_px, win_px, x, y, w, h = (int(a, 0) for a in sys.argv[1:])
d = display.Display()
s = d.screen()
s.root.change_attributes(background_pixel=root_px)
s.root.clear_area()
win = s.root.create_window(x, y, w, h, 0, s.root_depth, X.InputOutput, X.CopyFromParent,
                           background_pixel=win_px, override_redirect=True)
win.map()
d.sync()
print("painted", flush=True)
sys.stdin.read()
s.root.change_attributes(background_pixel=s.black_pixel)
s.root.clear_area()
d.sync()
"""
ROOT_RGB, WIN_RGB = bytes([0x33, 0x66, 0x99]), bytes([0xC0, 0x80, 0x40])
WIN = (400, 300, 200, 100)


def painted_rgb(x: int, y: int, w: int, h: int) -> bytes:
    """Canonical RGB of a region of the screen PAINTER draws: ROOT_RGB with a WIN_RGB rectangle."""
    wx, wy, ww, wh = WIN
    lo, hi = min(max(wx - x, 0), w), min(max(wx + ww - x, 0), w)
    through = ROOT_RGB * lo + WIN_RGB * (hi - lo) + ROOT_RGB * (w - hi)
    return b"".join(through if wy <= row < wy + wh else ROOT_RGB * w for row in range(y, y + h))


@pytest.fixture
def painted(display: str) -> Iterator[None]:
    """The root in one colour, an override-redirect window in another; black again afterwards (the
    other tests expect Xvfb -br's black root)."""
    proc = subprocess.Popen([SYSTEM_PYTHON, "-c", PAINTER, "0x336699", "0xC08040", *map(str, WIN)],
                            env={"DISPLAY": display, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready and proc.stdout.readline() == b"painted\n", proc.stderr.read() if proc.stderr else ""
        yield
    finally:
        proc.stdin.close()
        proc.wait(10)


def test_check_digests_a_region_as_the_sync_marks_do(
    display: str, agent_factory: Callable[..., Agent], painted: None
) -> None:
    agent = agent_factory()
    host = Host(agent)
    host.connect()
    assert host.pump(lambda: bool(host.hellos), 10), agent.stderr()

    # a region straddling the window's corner: layout and channel order both matter
    assert host.check(1, 368, 268, 64, 64) == region_digest(painted_rgb(368, 268, 64, 64))
    # the pointer in the region does not count (GetImage leaves X's cursor out), as for the marks
    xdo(display, "mousemove", "400", "300", "click", "1")
    assert host.pump(lambda: any(isinstance(e, SyncMark) for e in host.events), 5), agent.stderr()
    mark = next(e for e in host.events if isinstance(e, SyncMark))
    assert (mark.x, mark.y, mark.w, mark.h, mark.label) == (368, 268, 64, 64, "click")
    assert host.check(2, mark.x, mark.y, mark.w, mark.h) == mark.digest == region_digest(
        painted_rgb(368, 268, 64, 64))
    # a whole screen, promptly (the flusher is woken, not left to its next flush)
    t0 = time.monotonic()
    assert host.check(3, 0, 0, W, H) == region_digest(painted_rgb(0, 0, W, H))
    assert time.monotonic() - t0 < 2.0
    assert host.check(4, 599, 399, 1, 1) == region_digest(WIN_RGB)
    # a region that leaves the screen is not clipped (that would answer for another region): empty
    assert host.check(5, W - 10, 0, 11, 10) == b""
    assert host.check(6, 0, H, 1, 1) == b""
    # several in one write are all answered
    for i in range(10, 14):
        host.side.check(i, i, 0, 8, 8)
    host._send()
    assert host.pump(lambda: all(i in host.checks for i in range(10, 14)), 5), agent.stderr()
    assert {host.checks[i] for i in range(10, 14)} == {region_digest(ROOT_RGB * 64)}
    assert agent.stop() == 0
    assert "10 checks answered" in agent.stderr()


# ---- the settle rule of sync marks, on a manual clock (no screen, no sleeps) ----------------------
def _settle(looks: Callable[[float], bytes], *, tick_s: float = 0.1, policy: SyncPolicy | None = None
            ) -> tuple[Settle, float, bytes]:
    """Sample a region every ``tick_s`` from the moment its mark fell due (clock 0), as the
    flusher does, until the settler decides; ``looks(t)`` is the region's digest at ``t``."""
    clock = ManualClock()
    settler = Settler(policy or SyncPolicy(), 0)
    while True:
        digest = looks(clock.now())
        verdict = settler.add(round(clock.now() * 1e9), digest)
        if verdict is not Settle.WAIT:
            return verdict, clock.now(), digest
        clock.sleep(tick_s)


def test_a_still_region_settles_after_the_settle_interval_not_two_samples() -> None:
    verdict, t, digest = _settle(lambda t: b"A")
    assert verdict is Settle.SETTLED and digest == b"A"
    assert abs(t - DEFAULT_SYNC_SETTLE_MS / 1000) < 1e-6


def test_a_command_whose_output_comes_late_is_marked_after_its_output() -> None:
    """The xterm shows the command line for 0.6 s (a TCG guest forking ``wc``), then its output:
    two equal samples 100 ms apart (the old rule) named the first screen, which the replaying
    target had already left; the settle interval waits the output out."""
    verdict, t, digest = _settle(lambda t: b"command line" if t < 0.6 else b"output and prompt")
    assert verdict is Settle.SETTLED and digest == b"output and prompt"
    assert t >= 0.6 + DEFAULT_SYNC_SETTLE_MS / 1000 - 1e-6


def test_a_blinking_cursor_settles_on_a_phase_seen_before() -> None:
    def blink(t: float) -> bytes:                 # Tk's text cursor: on 600 ms, off 300 ms
        return b"cursor on" if (t + 1e-9) % 0.9 < 0.6 else b"cursor off"

    verdict, t, digest = _settle(blink)
    assert verdict is Settle.SETTLED and t <= DEFAULT_SYNC_MAX_WAIT_MS / 1000
    assert digest == blink(t)


def test_a_region_that_keeps_changing_gets_no_mark() -> None:
    verdict, t, _ = _settle(lambda t: f"output line {round(t * 10)}".encode())
    assert verdict is Settle.GAVE_UP and abs(t - DEFAULT_SYNC_MAX_WAIT_MS / 1000) < 0.1 + 1e-6
    three = [b"a", b"b", b"c"]                    # more looks than a cursor's two phases
    verdict, _, _ = _settle(lambda t: three[round(t * 10) % 3])
    assert verdict is Settle.GAVE_UP


def _watch(looks: Callable[[float], bytes], until_s: float, policy: SyncPolicy | None = None
           ) -> tuple[list[tuple[float, bytes]], RegionWatch]:
    """Sample a region from the moment its mark fell due (clock 0) as the flusher does, at the
    watch's own rate, until ``until_s`` or the watch expires: the marks it takes, with their times."""
    clock = ManualClock()
    watch = RegionWatch(policy or SyncPolicy(), 0)
    marks: list[tuple[float, bytes]] = []
    while clock.now() < until_s and not watch.expired(round(clock.now() * 1e9)):
        mark = watch.add(round(clock.now() * 1e9), looks(clock.now()))
        if mark is not None:
            watch.taken()
            marks.append((clock.now(), mark))
        clock.sleep(watch.interval_ns / 1e9)
    return marks, watch


def test_output_that_comes_without_input_after_the_screen_held_still_gets_a_mark_of_its_own() -> None:
    """unpack's ``tar``: the xterm showed the command line, still, for 8 s, then "unpacked" and the
    prompt, with no input in between. The first mark named the running command; the screen the user
    typed the next command into was never marked, so the replay typed it into the target's running
    tar, where it echoed twice (the target's screen never matched again: README, sync marks)."""
    marks, _ = _watch(lambda t: b"tar running" if t < 8.0 else b"unpacked, prompt", until_s=30.0)
    assert [m for _, m in marks] == [b"tar running", b"unpacked, prompt"]
    assert marks[1][0] >= 8.0 + DEFAULT_SYNC_SETTLE_MS / 1000 - 1e-6


def test_a_watched_region_that_holds_still_or_blinks_is_marked_once() -> None:
    marks, _ = _watch(lambda t: b"A", until_s=60.0)
    assert [m for _, m in marks] == [b"A"]
    marks, _ = _watch(lambda t: b"on" if (t + 1e-9) % 0.9 < 0.6 else b"off", until_s=60.0)
    assert len(marks) == 1


def test_a_region_that_settles_only_after_the_mark_gave_up_is_still_marked() -> None:
    """A compiler printing for 20 s, then the prompt: no mark while it prints (a moving screen),
    one once it settles, though that is long after ``max_wait_ms``."""
    marks, watch = _watch(lambda t: f"line {round(t * 10)}".encode() if t < 20.0 else b"prompt", until_s=40.0)
    assert watch.gave_up and [m for _, m in marks] == [b"prompt"]


def test_a_region_is_watched_for_the_follow_interval_only() -> None:
    marks, watch = _watch(lambda t: b"A", until_s=1e9)
    assert watch.expired(DEFAULT_SYNC_FOLLOW_MS * 1_000_000) and len(marks) == 1
    policy = SyncPolicy(follow_ms=10_000)
    marks, _ = _watch(lambda t: b"A" if t < 20.0 else b"B", until_s=1e9, policy=policy)
    assert [m for _, m in marks] == [b"A"]


def test_the_settle_interval_is_observed_even_when_samples_are_slow() -> None:
    """Under load one sample of a large region takes ~0.4 s: the region must still be seen still
    over a whole interval, never on two samples that happen to span less."""
    policy = SyncPolicy(settle_ms=1000, max_wait_ms=5000)
    verdict, t, digest = _settle(lambda t: b"old" if t < 0.5 else b"new", tick_s=0.4, policy=policy)
    assert verdict is Settle.SETTLED and digest == b"new" and t >= 0.5 + 1.0


# ---- where a sync mark goes in the log ------------------------------------------------------------
def test_a_mark_is_placed_where_its_look_was_first_seen_not_where_it_settled() -> None:
    """The look held from the first sample of its window: the mark's place in the log is there,
    not a settle interval (and a slow sample) later, when input may have come meanwhile."""
    watch = RegionWatch(SyncPolicy(), 0)
    t = 0.0
    while (mark := watch.add(round(t * 1e9), b"notepad")) is None:
        t += 0.2
    assert mark == b"notepad" and t >= DEFAULT_SYNC_SETTLE_MS / 1000 and watch.since_ns == 0
    watch.taken()
    assert watch.marks == 1


def test_a_look_not_marked_is_offered_again_once_it_settles_anew() -> None:
    watch = RegionWatch(SyncPolicy(), 0)
    offered = [t for t in range(0, 5000, 200) if watch.add(t * 1_000_000, b"notepad") is not None]
    assert len(offered) >= 2 and offered[1] - offered[0] >= DEFAULT_SYNC_SETTLE_MS   # never taken()
    # placed from the sample that ended the previous window on: after the input that kept it out
    assert watch.since_ns == offered[-2] * 1_000_000
    assert watch.interval_ns == SyncPolicy().follow_sample_ms * 1_000_000     # sampled as a watched one


def test_pointer_motion_logged_after_the_look_was_seen_keeps_the_mark_out() -> None:
    """notes: the notepad held still from 1.0 s; the pointer entered the Save button (lighting it up)
    at 1.2 s, before the mark was taken. Logged after that motion, the mark made the target replay
    it and wait for the unlit button: never met. No mark there; one seen after the motion is fine."""
    trigger = SyncTrigger(300)
    trigger.note(Key(0, 36, False), 0)
    assert mark_place(1_000_000, trigger) == 1_000_000
    trigger.note(Motion(1_200_000, 560, 14), 0)
    assert mark_place(1_000_000, trigger) is None
    assert mark_place(1_300_000, trigger) == 1_300_000


def test_the_pump_drops_a_mark_seen_before_input_it_has_logged(tmp_path: Path) -> None:
    """RECORD hands the flusher's thread input late (while a large region is sampled, nothing flushes
    it): a motion the flusher had not heard of may reach the log first. The mark would follow it."""
    r, w = os.pipe()
    try:
        clock = Clock(0, 0, 0)
        log_path = tmp_path / "session.rmlog"
        pump = Pump(LogHeader(W, H, "us", "", 0, "0"), clock, Port(str(tmp_path / "port"), 200),
                    FallbackLog(str(log_path)), PumpConfig(), None, r, SyncTrigger(300),  # type: ignore[arg-type]
                    CheckQueue(), None, lambda why: None)
        pump._take(Captured(InputKind.MOTION, 0, False, 560, 14, 1200))
        pump._take(SyncMark(1_000_000, 520, 0, 500, 740, b"unlit", "typing"))
        pump._take(SyncMark(1_300_000, 520, 0, 500, 740, b"lit", "typing"))
        pump._store(pump.encoder.flush())
        pump.fallback.close()
    finally:
        os.close(r)
        os.close(w)
    marks = [e for e in LogPump(require_end=False).feed(log_path.read_bytes()) if isinstance(e, SyncMark)]
    assert [m.digest for m in marks] == [b"lit"] and pump.stats["sync_misplaced"] == 1
