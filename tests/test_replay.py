"""replayer.replay: the closed-loop schedule on a manual clock with an in-process machine and link
(exact, instant), and for real: record a workload in one clone, replay it into another, compare."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from recorder.channel import HostEvent
from recorder.logformat import Button, Event, Key, Motion, SyncMark, read_log
from replay_migrate.errors import ReplayError
from replayer.clock import ManualClock
from replayer.drive import drive
from replayer.link import CheckTimeout, RecorderLink, record
from replayer.logfeed import LogPump
from replayer.replay import SYNC_POLL_MAX_S, SYNC_POLL_S, ReplayConfig, Replayer, describe
from replayer.workload import load_workload, parse_workload, shipped_workloads, synthesize
from vm.machine import Machine

SHORT_WORKLOAD = """
click 250 400
type "mkdir -p /root/w && cd /root/w && seq 1 300 > n.txt && echo done > d.txt; sync\\n"
wait 2
click 770 420
type "replayed notes\\n"
key ctrl+s
wait 3
"""
FILES = "cat /root/w/n.txt /root/w/d.txt /root/notes.txt | md5sum"


def comparable(events: list[Event]) -> list[tuple[object, ...]]:
    """Keys and buttons, each with where the pointer was: what the applications saw. Times, sync
    marks and the pointer's path in between are left out: each recorder coalesces motion within
    20 ms, and a replay catching up moves the pointer faster than the user did."""
    out: list[tuple[object, ...]] = []
    pointer: tuple[int, int] | None = None
    for e in events:
        if isinstance(e, Motion):
            pointer = (e.x, e.y)
        elif isinstance(e, Key):
            out.append(("key", e.keycode, e.down, pointer))
        elif isinstance(e, Button):
            out.append(("button", e.button, e.down, pointer))
    return out


def motions(events: list[Event]) -> list[tuple[int, int]]:
    return [(e.x, e.y) for e in events if isinstance(e, Motion)]


def is_subsequence(short: list[tuple[int, int]], long: list[tuple[int, int]]) -> bool:
    it = iter(long)
    return all(any(x == y for y in it) for x in short)


def whole_frames(data: bytes) -> list[Event]:
    """The events of the whole frames of a log being written (its last frame may be partial)."""
    return LogPump(require_end=False).feed(data)


def wait_until(cond: Callable[[], bool], timeout: float, poll_s: float = 0.1) -> bool:
    """Poll ``cond`` (state another process writes) until it holds or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def test_describe_names_the_event() -> None:
    assert describe(Key(1_500_000, 38, True)) == "key 38 press at 1.500 s"
    assert "pointer to 3,4" in describe(Motion(0, 3, 4))


@pytest.mark.vm
def test_record_then_replay_converges(make_clone: Callable[..., Machine], tmp_path: Path) -> None:
    source, target = make_clone(), make_clone()
    log_path = tmp_path / "session.rmlog"
    stop = threading.Event()
    result: dict[str, object] = {}

    with RecorderLink(source) as link, open(log_path, "wb") as out:
        link.open()
        rec = threading.Thread(target=lambda: result.update(st=record(link, out, stop=stop.is_set)))
        rec.start()
        actions = parse_workload(SHORT_WORKLOAD)
        drive(source, actions)
        # the agent frames events every few hundred ms: stop once every key driven is in the log
        driven = sum(isinstance(e, Key) for e in synthesize(actions))
        wait_until(lambda: sum(isinstance(e, Key) for e in whole_frames(log_path.read_bytes())) >= driven, 30)
        stop.set()
        rec.join(30)
    log = read_log(str(log_path), require_end=False)
    recorded = comparable(list(log.events))
    assert sum(1 for e in recorded if e[0] == "key") >= 2 * len("replayed notes")
    assert len(motions(list(log.events))) > 10
    assert any(isinstance(e, SyncMark) for e in log.events)

    with RecorderLink(target) as tlink:
        tlink.open()
        stats = Replayer(target, tlink, ReplayConfig(sync_slack_s=20)).replay(iter(log.events))
    # sync marks are hints (a mark of a moment the target passes before it looks can fail: counted,
    # not fatal); at least one must have been met, i.e. the agents' digests agree
    assert stats.injected > 0 and stats.sync_met >= 1, stats.as_dict()

    src_files = source.exec(FILES).stdout
    assert target.exec(FILES).stdout == src_files
    assert source.exec("cat /root/w/d.txt").stdout == "done\n"

    # what the target's own recorder saw (its fallback log in the guest) is what the source recorded
    def replayed() -> list[Event]:
        return whole_frames(target.read_file("/run/replay-migrate/session.rmlog"))

    wait_until(lambda: comparable(replayed()) == recorded, 30)
    assert comparable(replayed()) == recorded
    assert is_subsequence(motions(replayed()), motions(list(log.events)))


def test_shipped_workloads_parse() -> None:
    names = shipped_workloads()
    assert {"notes", "shell", "mixed"} <= set(names)
    for p in names.values():
        assert load_workload(p)


class _Machine:
    """Takes the injected input (a replay's view of a VM: ``InputTarget``)."""

    name = "fake"
    screen_size = (1280, 800)

    def __init__(self) -> None:
        self.sent: list[Sequence[dict[str, Any]]] = []

    def send_input(self, events: Sequence[dict[str, Any]]) -> None:
        self.sent.append(events)


class _Link:
    """An agent that echoes every event after ``echo_s`` of the clock's time and sees ``screen`` in
    every region it is asked about (a replay's view of the recorder: ``EchoLink``)."""

    def __init__(self, clock: ManualClock, screen: bytes = b"A", echo_s: float = 0.0) -> None:
        self.clock, self.screen, self.echo_s = clock, screen, echo_s
        self.expected: list[int] = []
        self.checks = 0

    def expect(self, replay_seq: int, event: Key | Button | Motion) -> None:
        self.expected.append(replay_seq)

    def wait_echo(self, replay_seq: int, timeout: float, on_event: list[HostEvent] | None = None) -> bool:
        self.clock.advance(self.echo_s)
        return replay_seq in self.expected

    def check(self, x: int, y: int, w: int, h: int, timeout: float,
              on_event: list[HostEvent] | None = None) -> bytes:
        self.checks += 1
        return self.screen

    def ack(self, seq: int) -> None:
        pass


def test_schedule_does_not_accumulate_echo_latency() -> None:
    """Each event is due at the previous one's due time plus the recorded gap (capped): 100 ms gaps
    with 40 ms spent on each injection and echo leave 60 ms waits, and a 5 s gap is cut to 2 s."""
    clock = ManualClock(100.0)
    link = _Link(clock, echo_s=0.04)
    keys = [Key(t, 38, n % 2 == 0) for n, t in enumerate((0, 100_000, 200_000, 5_200_000, 5_300_000))]
    stats = Replayer(_Machine(), link, ReplayConfig(gap_cap_s=2.0), clock=clock).replay(keys)
    assert [round(s, 3) for s in clock.waits] == [0.06, 0.06, 1.96, 0.06]
    assert stats.injected == 5 and link.expected == [1, 2, 3, 4, 5]
    assert round(stats.seconds, 3) == round(0.1 + 0.1 + 2.0 + 0.1 + 0.04, 3)
    assert round(stats.echo_max_s, 3) == 0.04


def test_a_replay_that_fell_behind_catches_up_without_waiting() -> None:
    clock = ManualClock()
    link = _Link(clock, echo_s=0.5)             # every echo takes longer than the recorded gaps
    keys = [Key(t, 38, n % 2 == 0) for n, t in enumerate(range(0, 1_000_000, 100_000))]
    Replayer(_Machine(), link, clock=clock).replay(keys)
    assert clock.waits == []


def test_stop_ends_a_wait_at_once() -> None:
    clock = ManualClock()
    rep = Replayer(_Machine(), _Link(clock), clock=clock)
    rep.stop()
    assert rep.replay([Key(0, 38, True), Key(2_000_000, 38, False)]).injected == 0 and clock.waits == []


@pytest.mark.parametrize("events, screen, settled", [
    ([Key(0, 38, True), Key(1000, 38, False), SyncMark(400_000, 0, 0, 8, 8, b"A", "typing")], b"A", True),
    ([Key(0, 38, True), SyncMark(400_000, 0, 0, 8, 8, b"A", "typing"), Motion(900_000, 5, 5)], b"A", True),
    ([SyncMark(0, 0, 0, 8, 8, b"A", "typing"), Button(100_000, 1, True)], b"A", False),
    ([Key(0, 38, True), SyncMark(400_000, 0, 0, 8, 8, b"A", "typing")], b"B", False),   # mark not met
    ([Motion(0, 5, 5)], b"A", False),
])
def test_settled_means_a_met_mark_after_the_last_key_or_button(
        events: list[Event], screen: bytes, settled: bool) -> None:
    clock = ManualClock()
    rep = Replayer(_Machine(), _Link(clock, screen), ReplayConfig(sync_slack_s=0), clock=clock)
    assert rep.replay(events).settled is settled


def test_an_unmet_mark_waits_less_once_the_source_ended_the_log() -> None:
    clock = ManualClock()
    mark = SyncMark(0, 0, 0, 8, 8, b"A", "typing")
    rep = Replayer(_Machine(), _Link(clock, b"B"), ReplayConfig(sync_slack_s=5, sync_slack_ended_s=1),
                   clock=clock)
    rep.replay([mark])
    assert 5.0 <= clock.now() < 5.5 and len(rep.stats.sync_failed) == 1
    assert clock.waits[0] == SYNC_POLL_S and max(clock.waits) <= SYNC_POLL_MAX_S
    clock.t = 100.0
    rep.log_ended()
    rep.replay([mark])
    assert 101.0 <= clock.now() < 101.5 and len(rep.stats.sync_failed) == 2


class _LateScreen(_Link):
    """A target whose screen shows the mark's region (``b"A"``) only from ``at`` on (clock s)."""

    def __init__(self, clock: ManualClock, at: float, echo_s: float = 0.0) -> None:
        super().__init__(clock, b"B", echo_s)
        self.at = at

    def check(self, x: int, y: int, w: int, h: int, timeout: float,
              on_event: list[HostEvent] | None = None) -> bytes:
        self.checks += 1
        return b"A" if self.clock.now() >= self.at else b"B"


def _typed_then_marked(reach_s: float) -> list[Event]:
    """A key typed at 0 s and a mark the source's agent took ``reach_s`` after its release."""
    return [Key(0, 38, True), Key(100_000, 38, False),
            SyncMark(100_000 + int(reach_s * 1e6), 0, 0, 8, 8, b"A", "typing")]


def test_a_mark_waits_as_long_as_the_source_took_to_reach_it_plus_the_slack() -> None:
    """The source's screen took 8 s to settle after the last key (a slow command): the target is
    given those 8 s plus the slack from its own echo of that key, not a fixed 5 s, and meets it
    at 9 s; a mark it never shows fails right after 8 s + slack, not later."""
    clock = ManualClock()
    link = _LateScreen(clock, at=9.0, echo_s=0.05)
    rep = Replayer(_Machine(), link, ReplayConfig(sync_slack_s=2.0), clock=clock)
    assert rep.replay(_typed_then_marked(8.0)).sync_met == 1 and 9.0 <= clock.now() < 9.0 + SYNC_POLL_MAX_S
    clock = ManualClock()
    rep = Replayer(_Machine(), _LateScreen(clock, at=1e9, echo_s=0.05), ReplayConfig(sync_slack_s=2.0), clock=clock)
    stats = rep.replay(_typed_then_marked(8.0))
    echoed = 0.1 + 0.05                           # the release's echo: the wait counts from there
    assert len(stats.sync_failed) == 1 and echoed + 8.0 + 2.0 <= clock.now() <= echoed + 10.0 + 2 * SYNC_POLL_S


def test_a_mark_a_log_claims_took_long_waits_at_most_the_named_bound() -> None:
    clock = ManualClock()
    rep = Replayer(_Machine(), _LateScreen(clock, at=1e9), ReplayConfig(sync_slack_s=1.0, sync_reach_max_s=30.0,
                                                                      gap_cap_s=0.0), clock=clock)
    rep.replay(_typed_then_marked(3600.0))
    assert 31.0 <= clock.now() <= 31.0 + 2 * SYNC_POLL_S


def test_once_the_log_ended_a_mark_still_gets_the_source_time_but_less_slack() -> None:
    clock = ManualClock()
    rep = Replayer(_Machine(), _LateScreen(clock, at=1e9), ReplayConfig(sync_slack_s=5.0, sync_slack_ended_s=0.5,
                                                                      gap_cap_s=0.0), clock=clock)
    rep.log_ended()
    rep.replay(_typed_then_marked(3.0))
    assert 3.5 <= clock.now() <= 3.5 + 2 * SYNC_POLL_S


def test_an_unmet_mark_fails_a_strict_replay() -> None:
    clock = ManualClock()
    rep = Replayer(_Machine(), _Link(clock, b"B"), ReplayConfig(sync_slack_s=1, strict_sync=True), clock=clock)
    with pytest.raises(ReplayError, match=re.escape("'typing' at 0.000 s (8x8 at 0,0) was not met within 1.")):
        rep.replay([SyncMark(0, 0, 0, 8, 8, b"A", "typing")])


class _Screens(_Link):
    """A target whose region shows ``looks[i]`` from ``looks[i][0]`` s on (clock)."""

    def __init__(self, clock: ManualClock, looks: list[tuple[float, bytes]]) -> None:
        super().__init__(clock)
        self.looks = looks

    def check(self, x: int, y: int, w: int, h: int, timeout: float,
              on_event: list[HostEvent] | None = None) -> bytes:
        self.checks += 1
        return [d for t, d in self.looks if self.clock.now() >= t][-1]


def _command_then_output() -> list[Event]:
    """unpack's find | sha256sum as recorded: Enter at 0 s, a mark of the running command at 1.7 s
    (it had held still for 1 s), the prompt 0.3 s later without input and its own mark at 3.5 s,
    then the user's next key."""
    return [Key(0, 36, True), Key(100_000, 36, False),
            SyncMark(1_700_000, 1, 1, 508, 732, b"running", "typing"),
            SyncMark(3_500_000, 1, 1, 508, 732, b"prompt", "typing"),
            Key(15_000_000, 25, True), Key(15_100_000, 25, False)]


def test_a_mark_of_a_screen_the_target_skipped_is_passed_by_the_next_look_it_meets() -> None:
    """The target's command finished sooner: it never showed the running command when it looked,
    but it reaches the prompt, which the next mark names before any input: not a failed mark."""
    clock = ManualClock()
    rep = Replayer(_Machine(), _Screens(clock, [(0.0, b"typing"), (1.0, b"prompt")]),
                   ReplayConfig(sync_slack_s=1.0), clock=clock)
    stats = rep.replay(_command_then_output())
    assert (stats.sync_met, stats.sync_passed, stats.sync_failed) == (1, 1, [])


def test_an_unmet_mark_is_failed_by_the_next_input_or_the_end() -> None:
    clock = ManualClock()
    rep = Replayer(_Machine(), _Screens(clock, [(0.0, b"elsewhere")]), ReplayConfig(sync_slack_s=1.0),
                   clock=clock)
    stats = rep.replay(_command_then_output())
    assert stats.sync_met == 0 and stats.sync_passed == 0 and len(stats.sync_failed) == 2
    clock = ManualClock()
    rep = Replayer(_Machine(), _Screens(clock, [(0.0, b"typing"), (1.0, b"prompt")]),
                   ReplayConfig(sync_slack_s=1.0), clock=clock)
    stats = rep.replay(_command_then_output()[:3])    # the source froze before its next mark
    assert stats.sync_met == 0 and len(stats.sync_failed) == 1
    other_region = [*_command_then_output()[:3], SyncMark(3_500_000, 0, 0, 64, 64, b"prompt", "click")]
    rep = Replayer(_Machine(), _Screens(clock, [(0.0, b"prompt")]), ReplayConfig(sync_slack_s=1.0), clock=clock)
    stats = rep.replay(other_region)
    assert (stats.sync_met, stats.sync_passed, len(stats.sync_failed)) == (1, 0, 1)


class _SlowChecks(_Link):
    """An agent too loaded to answer the first ``slow`` screen checks in time."""

    def __init__(self, clock: ManualClock, slow: int) -> None:
        super().__init__(clock)
        self.slow = slow

    def check(self, x: int, y: int, w: int, h: int, timeout: float,
              on_event: list[HostEvent] | None = None) -> bytes:
        self.checks += 1
        if self.checks <= self.slow:
            self.clock.advance(timeout)
            raise CheckTimeout("the recorder agent of 'x' did not answer a screen check in 10 s")
        return self.screen


def test_a_check_the_agent_answers_late_is_a_mark_not_yet_met() -> None:
    """A loaded TCG guest once took over 10 s to sample a 508x732 region: that costs the mark its
    time, not the whole replay; the next check is met. A strict replay still fails at once."""
    mark = SyncMark(0, 0, 0, 8, 8, b"A", "typing")
    clock = ManualClock()
    rep = Replayer(_Machine(), _SlowChecks(clock, slow=1), ReplayConfig(sync_slack_s=20), clock=clock)
    assert rep.replay([mark]).sync_met == 1
    rep = Replayer(_Machine(), _SlowChecks(clock, slow=5), ReplayConfig(sync_slack_s=20), clock=clock)
    assert len(rep.replay([mark]).sync_failed) == 1
    strict = Replayer(_Machine(), _SlowChecks(clock, slow=1), ReplayConfig(strict_sync=True), clock=clock)
    with pytest.raises(CheckTimeout):
        strict.replay([mark])


def test_an_event_the_guest_does_not_echo_fails_the_replay() -> None:
    class Deaf(_Link):
        def wait_echo(self, replay_seq: int, timeout: float, on_event: list[HostEvent] | None = None) -> bool:
            self.clock.advance(timeout)
            return False

    clock = ManualClock()
    with pytest.raises(ReplayError, match=re.escape("(key 38 press at 0.000 s) was not echoed by the guest within 10")):
        Replayer(_Machine(), Deaf(clock), clock=clock).replay([Key(0, 38, True)])


def test_an_unmet_mark_says_what_the_target_showed_and_calls_the_hook() -> None:
    """A target that settled on another screen (one look, held) reads differently from one still
    changing when the wait ran out; the hook gets the mark and the looks, in the replay thread."""
    clock = ManualClock()
    got: list[tuple[SyncMark, list[bytes]]] = []
    rep = Replayer(_Machine(), _Screens(clock, [(0.0, b"x"), (0.5, b"y"), (0.9, b"x")]),
                   ReplayConfig(sync_slack_s=2.0), clock=clock)
    rep.on_unmet = lambda mark, wait: got.append((mark, [d for _, d in wait.looks]))
    stats = rep.replay(_typed_then_marked(0.0))
    assert len(got) == 1 and got[0][0].digest == b"A" and got[0][1] == [b"x", b"y", b"x"]
    assert "3 look(s), 2 distinct, the last for 1." in stats.sync_failed[0]


def _computed_then_marked() -> list[Event]:
    """generate's data set as recorded: Enter at 0 s, the running command's mark at 1.5 s, then,
    without input, the prompt's mark when the command finished, 50 s after the Enter."""
    return [Key(0, 36, True), Key(100_000, 36, False),
            SyncMark(1_600_000, 1, 1, 508, 732, b"running", "typing"),
            SyncMark(50_100_000, 1, 1, 508, 732, b"prompt", "typing")]


def test_a_target_still_running_the_command_is_behind_not_drifted() -> None:
    """The target computes the same 50 s as the source, on cores both VMs share: it finished 8 s
    later (the bench's failed generate marks). Still showing the region's previous mark, it is
    behind and gets ``sync_behind_ratio`` of the source's time more; a target showing any other
    look gets the plain bound."""
    clock = ManualClock()
    looks = [(0.0, b"running"), (58.0, b"prompt")]
    stats = Replayer(_Machine(), _Screens(clock, looks), ReplayConfig(sync_slack_s=5.0, gap_cap_s=60.0),
                     clock=clock).replay(_computed_then_marked())
    assert (stats.sync_met, stats.sync_failed) == (2, []) and 58.0 <= clock.now() < 58.0 + SYNC_POLL_MAX_S
    clock = ManualClock()
    looks = [(0.0, b"running"), (10.0, b"elsewhere")]
    stats = Replayer(_Machine(), _Screens(clock, looks), ReplayConfig(sync_slack_s=5.0, gap_cap_s=60.0),
                     clock=clock).replay(_computed_then_marked())
    assert stats.sync_met == 1 and len(stats.sync_failed) == 1 and 55.0 <= clock.now() < 55.0 + SYNC_POLL_MAX_S


def test_a_long_wait_checks_the_region_less_often() -> None:
    """A check samples a window-sized region in the target's guest, CPU its computation lacks:
    every 0.1 s at first, then ever less often, never less than every SYNC_POLL_MAX_S."""
    clock = ManualClock()
    link = _Screens(clock, [(0.0, b"running"), (50.0, b"prompt")])
    stats = Replayer(_Machine(), link, clock=clock).replay(_computed_then_marked())
    assert stats.sync_met == 2 and 50.0 <= clock.now() < 50.0 + SYNC_POLL_MAX_S
    assert link.checks < 50.0 / SYNC_POLL_MAX_S + 30           # every 0.1 s: ~480


def test_a_mark_that_reaches_the_target_late_still_gets_the_slack() -> None:
    """The mark is placed where its look was first seen, and reaches the target only after the
    source's agent saw the look settle (1 s and more later): once the replay gets to it, it still
    has the slack (here once the log ended: 1 s), not a deadline already past."""
    clock = ManualClock()

    def feed() -> Iterator[Event]:
        *typed, mark = _typed_then_marked(0.3)
        yield from typed
        clock.advance(3.0)                          # the frame with the mark arrives
        yield mark

    rep = Replayer(_Machine(), _Link(clock, b"B"), ReplayConfig(sync_slack_s=5.0, sync_slack_ended_s=1.0),
                   clock=clock)
    rep.log_ended()
    stats = rep.replay(feed())
    assert len(stats.sync_failed) == 1 and 4.1 <= clock.now() <= 4.1 + 2 * SYNC_POLL_S
