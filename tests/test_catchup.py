"""migration/catchup.py: the target's replay position from frames and events, when the source may
pause, and the source's wait (the target catches up, the bound is reached, the user types
meanwhile) on a clock the test moves, with the target's progress told through the real session
client core."""

from __future__ import annotations

import asyncio
import threading

import pytest

from migration.catchup import CATCHUP_TIMEOUT_S, PauseGate, ReplayProgress, Waited, wait_to_pause
from migration.sides import FLUSH_S, MIN_FLUSH_S
from server.clientcore import ClientState
from server.wire import Role, Stream, encode

pytestmark = pytest.mark.timeout(30)


def test_a_frame_is_replayed_once_its_events_and_all_before_it_went_through() -> None:
    p = ReplayProgress()
    assert p.arrived(1, 0) and p.replayed == 1  # the header: nothing in it to replay
    assert not p.went_through(0)
    p.arrived(2, 3)
    p.arrived(3, 2)
    assert not p.went_through(2) and p.replayed == 1    # frame 2 is not done yet
    assert p.went_through(3) and p.replayed == 2
    assert not p.went_through(2)                # a count never goes back
    assert p.went_through(5) and p.replayed == 3
    assert p.arrived(4, 0) and p.replayed == 4  # a frame of no events after everything was replayed
    assert not p.arrived(5, 1)


def test_the_position_is_consistent_across_threads() -> None:
    p = ReplayProgress()
    frames = 2000
    seen: list[int] = []

    def replay() -> None:
        for n in range(1, frames * 2 + 1):
            p.went_through(n)
            seen.append(p.replayed)

    t = threading.Thread(target=replay)
    t.start()
    for seq in range(1, frames + 1):
        p.arrived(seq, 2)
    t.join()
    p.went_through(frames * 2)
    assert p.replayed == frames
    assert seen == sorted(seen)


def test_the_gate_waits_for_the_screen_and_the_target_within_the_bound() -> None:
    g = PauseGate(100.0, FLUSH_S, MIN_FLUSH_S)
    assert not g.may_pause(100.0, settled=True, sent=5, replayed=5)                  # under MIN_FLUSH_S
    assert g.may_pause(100.0 + MIN_FLUSH_S, settled=True, sent=5, replayed=5)
    assert not g.may_pause(101.0, settled=True, sent=5, replayed=4)                  # the target is behind
    assert not g.may_pause(101.0, settled=False, sent=5, replayed=5)                 # the screen is not
    assert g.may_pause(100.0 + FLUSH_S, settled=False, sent=5, replayed=5)           # ... for FLUSH_S
    g.input(101.0)                                                                   # a key meanwhile
    assert not g.may_pause(100.0 + FLUSH_S, settled=False, sent=5, replayed=5)
    assert g.may_pause(101.0 + FLUSH_S, settled=False, sent=5, replayed=5)
    assert g.may_pause(100.0 + CATCHUP_TIMEOUT_S, settled=False, sent=9, replayed=0)  # the bound
    assert CATCHUP_TIMEOUT_S > FLUSH_S


def ended(w: Waited, caught_up: bool, sent: int, replayed: int, seconds: float) -> bool:
    """How the wait ended, its time within one read of the recorder channel (the clock's step)."""
    return (w.caught_up, w.sent, w.replayed) == (caught_up, sent, replayed) and abs(w.seconds - seconds) <= 0.051


class World:
    """The source's side of the wait on a manual clock: each forward() is one read of the recorder
    channel, which moves the clock and runs what the script says happens by then (the user types,
    the target tells its progress: a real target client core's ``replayed``, delivered to a real
    source client core)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.settled = True
        self.src = ClientState(Role.SOURCE, "catch")
        self.tgt = ClientState(Role.TARGET, "catch", replayed_interval=0.1)
        for c in (self.src, self.tgt):
            sends = [s.value for s in c.role.sends]
            c.attach_message()
            c.receive(encode("attached", session="catch", state="recording", next=dict.fromkeys(sends, 1),
                             acked=dict.fromkeys(sends, 0), window=1 << 20, max_message=1 << 20, log_end=None,
                             roots=None))
        self.sent = 0
        self.script: list[tuple[float, str, int]] = []
        self.waits: list[tuple[int, int]] = []

    def send(self) -> None:
        """The source forwards one log frame (the target receives it)."""
        self.sent = self.src.send_frame(Stream.LOG, b"f")
        self.src.data_to_send()
        self.tgt.receive(encode("log", seq=self.sent, data=b"f"))

    def tell(self, seq: int) -> None:
        """The target replayed frame ``seq``: its message, relayed as the service does."""
        self.tgt.replay_progress(seq, self.now)
        for m in self.tgt.data_to_send():
            if b"replayed" in m:
                self.src.receive(m)

    async def forward(self) -> None:
        self.now += 0.05
        while self.script and self.script[0][0] <= self.now:
            _, what, n = self.script.pop(0)
            if what == "type":
                self.send()
                self.settled = False
                self.gate.input(self.now)
            elif what == "settle":
                self.send()
                self.settled = True
            else:
                self.tell(n)

    def run(self, script: list[tuple[float, str, int]]) -> Waited:
        self.script = list(script)
        self.gate = PauseGate(self.now, FLUSH_S, MIN_FLUSH_S)
        return asyncio.run(wait_to_pause(self.gate, self.forward, lambda: (self.settled, self.sent, self.src.replayed),
                                         clock=lambda: self.now, on_wait=lambda s, r: self.waits.append((s, r))))


def test_the_source_pauses_once_the_target_replayed_everything_forwarded() -> None:
    w = World()
    for _ in range(3):
        w.send()
    waited = w.run([(0.3, "replayed", 2), (1.2, "replayed", 3)])
    assert ended(waited, True, 3, 3, 1.2)   # not at MIN_FLUSH_S: the target was behind
    assert w.waits[0] == (3, 0) and w.waits[-1] == (3, 2)      # what the progress line shows


def test_the_source_pauses_at_the_bound_when_the_target_never_reports() -> None:
    w = World()
    w.send()
    waited = w.run([])
    assert ended(waited, False, 1, 0, CATCHUP_TIMEOUT_S)


def test_input_typed_meanwhile_is_waited_for_too_within_the_bound() -> None:
    w = World()
    w.send()
    # the user types at 0.3 s, before the target replayed frame 1 (0.5 s); the screen settles at
    # 1.5 s, and the target replays the typing at 1.8 s and the settled screen's frame at 2.5 s
    waited = w.run([(0.3, "type", 0), (0.5, "replayed", 1), (1.5, "settle", 0), (1.8, "replayed", 2),
                    (2.5, "replayed", 3)])
    assert ended(waited, True, 3, 3, 2.5)
    assert (2, 1) in w.waits and (3, 2) in w.waits
    # a user who types on and on: the bound still holds
    w = World()
    w.send()
    waited = w.run([(0.5 * i, "type", 0) for i in range(1, 40)])
    assert not waited.caught_up and waited.seconds == pytest.approx(CATCHUP_TIMEOUT_S)
