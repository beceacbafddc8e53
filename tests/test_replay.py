"""Record a workload in one clone, replay it closed loop into another, compare what they did."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from recorder.logformat import Button, End, Event, Key, LogHeader, Motion, SyncMark, decode_log, encode_log, read_log
from replay_migrate.errors import LogFormatError
from replayer.drive import drive
from replayer.link import RecorderLink, record
from replayer.replay import ReplayConfig, Replayer, describe, events_from_chunks, file_chunks
from replayer.workload import load_workload, parse_workload, shipped_workloads
from vm.machine import Machine

HEADER = LogHeader(1280, 800, "us", "ck", 0, "test")
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


def test_describe_names_the_event() -> None:
    assert describe(Key(1_500_000, 38, True)) == "key 38 press at 1.500 s"
    assert "pointer to 3,4" in describe(Motion(0, 3, 4))


def test_events_from_chunks_any_split(tmp_path: Path) -> None:
    evs: list[Event] = [Key(10, 38, True), Key(20, 38, False), Motion(30, 5, 6), Button(40, 1, True), End(50)]
    data = encode_log(HEADER, evs)
    for size in (1, 7, 64, len(data)):
        headers: list[LogHeader] = []
        got = list(events_from_chunks((data[i:i + size] for i in range(0, len(data), size)),
                                      on_header=headers.append))
        assert got == evs and headers == [HEADER]
    with pytest.raises(LogFormatError):
        list(events_from_chunks([data[:-3]]))


def test_file_chunks_follows_a_growing_file(tmp_path: Path) -> None:
    p = tmp_path / "log"
    data = encode_log(HEADER, [Key(10, 38, True), Key(20, 38, False), End(30)])
    p.write_bytes(data[:10])

    def grow() -> None:
        time.sleep(0.3)
        with open(p, "ab") as f:
            f.write(data[10:])

    threading.Thread(target=grow).start()
    got = list(events_from_chunks(file_chunks(p, follow=True, idle_timeout_s=5)))
    assert isinstance(got[-1], End) and len(got) == 3


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
        drive(source, parse_workload(SHORT_WORKLOAD))
        time.sleep(1.5)               # the agent frames events every few hundred ms
        stop.set()
        rec.join(30)
    log = read_log(str(log_path), require_end=False)
    recorded = comparable(list(log.events))
    assert sum(1 for e in recorded if e[0] == "key") >= 2 * len("replayed notes")
    assert len(motions(list(log.events))) > 10
    assert any(isinstance(e, SyncMark) for e in log.events)

    with RecorderLink(target) as tlink:
        tlink.open()
        stats = Replayer(target, tlink, ReplayConfig(sync_timeout_s=20)).replay(iter(log.events))
    # sync marks are hints (a mark of a moment the target passes before it looks can fail: counted,
    # not fatal); at least one must have been met, i.e. the agents' digests agree
    assert stats.injected > 0 and stats.sync_met >= 1, stats.as_dict()

    src_files = source.exec(FILES).stdout
    assert target.exec(FILES).stdout == src_files
    assert source.exec("cat /root/w/d.txt").stdout == "done\n"

    # what the target's own recorder saw (its fallback log in the guest) is what the source recorded
    time.sleep(1.0)
    replayed = decode_log(target.read_file("/run/replay-migrate/session.rmlog"), require_end=False)
    assert comparable(list(replayed.events)) == recorded
    assert is_subsequence(motions(list(replayed.events)), motions(list(log.events)))


def test_shipped_workloads_parse() -> None:
    names = shipped_workloads()
    assert {"notes", "shell", "mixed"} <= set(names)
    for p in names.values():
        assert load_workload(p)


def test_schedule_does_not_accumulate_echo_latency(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    slept: list[float] = []
    monkeypatch.setattr(time, "monotonic", lambda: now[0])

    def pause(self: Replayer, s: float) -> bool:     # the replayer's sleep (Replayer.stop ends it)
        slept.append(s)
        now[0] += s
        return False

    monkeypatch.setattr(Replayer, "_pause", pause)
    rep = Replayer.__new__(Replayer)
    rep.config = ReplayConfig(gap_cap_s=2.0)
    rep._last_t_us = None
    rep._due = 0.0
    for t_us in (0, 100_000, 200_000, 5_200_000, 5_300_000):
        rep._wait_gap(t_us)
        rep._last_t_us = t_us
        now[0] += 0.04                     # each event's injection and echo take 40 ms
    # 100 ms gaps with 40 ms spent: 60 ms sleeps; the 5 s gap is capped at 2 s
    assert [round(s, 3) for s in slept] == [0.06, 0.06, 1.96, 0.06]


class _FakeMachine:
    name = "fake"
    screen_size = (1280, 800)

    def send_input(self, events: object) -> None:
        pass


class _FakeLink:
    """Echoes every event at once; the agent sees ``screen`` in every checked region."""

    def __init__(self, screen: bytes) -> None:
        self.screen = screen

    def expect(self, seq: int, ev: object) -> None:
        pass

    def wait_echo(self, seq: int, timeout: float, others: list[object]) -> bool:
        return True

    def check(self, x: int, y: int, w: int, h: int, timeout: float, others: list[object]) -> bytes:
        return self.screen


@pytest.mark.parametrize("events, screen, settled", [
    ([Key(0, 38, True), Key(1000, 38, False), SyncMark(400_000, 0, 0, 8, 8, b"A", "typing")], b"A", True),
    ([Key(0, 38, True), SyncMark(400_000, 0, 0, 8, 8, b"A", "typing"), Motion(900_000, 5, 5)], b"A", True),
    ([SyncMark(0, 0, 0, 8, 8, b"A", "typing"), Button(100_000, 1, True)], b"A", False),
    ([Key(0, 38, True), SyncMark(400_000, 0, 0, 8, 8, b"A", "typing")], b"B", False),   # mark not met
    ([Motion(0, 5, 5)], b"A", False),
])
def test_settled_means_a_met_mark_after_the_last_key_or_button(
        events: list[Event], screen: bytes, settled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "sleep", lambda s: None)
    rep = Replayer(_FakeMachine(), _FakeLink(screen), ReplayConfig(sync_timeout_s=0))  # type: ignore[arg-type]
    assert rep.replay(iter(events)).settled is settled


def test_an_unmet_mark_waits_less_once_the_source_ended_the_log(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    monkeypatch.setattr(time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    monkeypatch.setattr(Replayer, "_pause", lambda self, s: time.sleep(s) or False)
    mark = SyncMark(0, 0, 0, 8, 8, b"A", "typing")
    rep = Replayer(_FakeMachine(), _FakeLink(b"B"), ReplayConfig(sync_timeout_s=5, sync_timeout_ended_s=1))  # type: ignore[arg-type]
    rep.replay(iter([mark]))
    assert 5.0 <= now[0] < 5.5 and len(rep.stats.sync_failed) == 1
    now[0] = 100.0
    rep.log_ended()
    rep.replay(iter([mark]))
    assert 101.0 <= now[0] < 101.5 and len(rep.stats.sync_failed) == 2
