"""replayer.workload: the workload format, its errors (with line numbers), the shipped workloads and
event synthesis."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from recorder.logformat import Button, Key, Motion
from replay_migrate.errors import UsageError
from replayer import workload as wl
from replayer.keymap import CTRL, Combo, Stroke
from replayer.workload import (
    Check,
    Click,
    Drag,
    Move,
    PressKeys,
    Scroll,
    TypeText,
    Wait,
    checks,
    find_workload,
    get_workload,
    load_workload,
    parse_workload,
    session_seconds,
    shipped_workloads,
    synthesize,
    timeline,
)


def test_parse_every_action() -> None:
    text = '''
# a comment
type "Hi \\"you\\"\\n"   # trailing comment with "quotes"
key ctrl+s Return backspace*3
move 10 20
click 250 400
click 250 400 right
doubleclick 1 2
drag 1 2 300 400 middle
scroll 5 6 down 3
scroll 5 6 left
wait 1.5
TYPE "#not a comment"
'''
    acts = parse_workload(text)
    first, last = acts[0], acts[-1]
    assert isinstance(last, TypeText)
    assert isinstance(first, TypeText)
    assert first == TypeText('Hi "you"\n', first.strokes, 3)
    assert first.strokes[0] == Stroke(43, True)
    assert acts[1] == PressKeys((Combo((CTRL,), 39), Combo((), 36), *[Combo((), 22)] * 3), 4)
    assert acts[2:] == [
        Move(10, 20, 5), Click(250, 400, 1, 1, 6), Click(250, 400, 3, 1, 7), Click(1, 2, 1, 2, 8),
        Drag(1, 2, 300, 400, 2, 9), Scroll(5, 6, 5, 3, 10), Scroll(5, 6, 6, 1, 11), Wait(1.5, 12),
        TypeText("#not a comment", last.strokes, 13),
    ]


@pytest.mark.parametrize(
    ("line", "msg"),
    [
        ("fly 1 2", "unknown action"),
        ('type "abc', "unterminated"),
        ('type "a\\qb"', "unknown escape"),
        ("type abc", "quoted string"),
        ('type ""', "1..4096"),
        ('type "ü"', "US keyboard"),
        ("key", "one or more"),
        ("key ctrl+nokey", "unknown key"),
        ("key a*0", "repeat count"),
        ("key a*1000", "repeat count"),
        ("move 10", "takes 2 arguments"),
        ("move 1280 0", "not in 0..1279"),
        ("move 0 800", "not in 0..799"),
        ("move -1 0", "whole number"),
        ("move 1.5 0", "whole number"),
        ("click 1 2 left extra", "takes 2 to 3"),
        ("click 1 2 fourth", "unknown button"),
        ("scroll 1 2 sideways", "direction"),
        ("scroll 1 2 up 0", "count"),
        ("wait soon", "number of seconds"),
        ("wait -1", "not in 0..600"),
        ("wait 1e9", "not in 0..600"),
        ("wait nan", "not in 0..600"),
        ('move "1" 2', "must not be quoted"),
        ("check sha256sum", "quoted shell command"),
        ('check "  "', "1..4096"),
        ('check "true"\nwait 1', "only checks may follow a check"),
    ],
)
def test_errors_name_the_line(line: str, msg: str) -> None:
    with pytest.raises(UsageError, match=msg) as ei:
        parse_workload(f"# ok\nwait 1\n{line}\n", source="w.wl")
    assert str(ei.value).startswith(f"w.wl:{3 + line.count(chr(10))}: ")


def test_checks_run_after_the_session_and_make_no_input() -> None:
    text = 'type "make\\n"\nwait 2\ncheck "sha256sum -c /root/x.sha256"\ncheck "test -x \\"/root/a b\\""\n'
    acts = parse_workload(text)
    assert checks(acts) == [Check("sha256sum -c /root/x.sha256", 3), Check('test -x "/root/a b"', 4)]
    assert synthesize(acts, seed=3) == synthesize(acts[:2], seed=3)


def test_limits_are_parameters() -> None:
    assert parse_workload("move 1500 900", screen=(1920, 1080)) == [Move(1500, 900, 1)]
    with pytest.raises(UsageError, match="more than 2 actions"):
        parse_workload("wait 1\nwait 1\nwait 1", max_actions=2)
    with pytest.raises(UsageError, match=r"0\.\.10"):
        parse_workload("wait 11", max_wait_s=10)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot open the workload: no such file"):
        load_workload(tmp_path / "missing.wl")
    p = tmp_path / "bad.wl"
    p.write_bytes(b"type \"\xff\"")
    with pytest.raises(UsageError, match="not UTF-8"):
        load_workload(p)
    p.write_text("wait 1\n" * 10)
    with pytest.raises(UsageError, match="larger than"):
        load_workload(p, max_bytes=20)


STATE_MAKING = ("unpack", "build", "generate")
"""The workloads where a few keystrokes make tens of MiB of state (issue 13)."""


def test_shipped_workloads_parse_and_end_quiescent() -> None:
    shipped = shipped_workloads()
    assert {"notes", "shell", "mixed", *STATE_MAKING} <= set(shipped)
    durations = {}
    for name, path in shipped.items():
        acts = load_workload(path)
        assert acts, name
        session = [a for a in acts if not isinstance(a, Check)]
        assert isinstance(session[-1], Wait) and session[-1].seconds >= 1, name  # time for the last effects
        evs = synthesize(acts)
        durations[name] = evs[-1].t_us / 1e6
        text = "".join(a.text for a in acts if isinstance(a, TypeText))
        if name in ("shell", "mixed", *STATE_MAKING):
            assert "sync\n" in text
        if name in STATE_MAKING:
            # the user's checksums at the source, checked in the migrated VM
            assert ".sha256" in text
            assert any("sha256sum" in c.command and " -c " in c.command for c in checks(acts)), name
        if name in ("notes", "mixed"):
            # saved with ctrl+s and with the Save button (top-left of the notepad at +520+0)
            assert any(isinstance(a, PressKeys) and Combo((CTRL,), 39) in a.combos for a in acts)
            assert any(isinstance(a, Click) and 520 <= a.x < 620 and a.y < 28 for a in acts)
        kinds = {type(e) for e in evs}
        assert {Key, Motion, Button} <= kinds
    assert durations["mixed"] >= 180  # several minutes


def test_typing_into_a_window_happens_with_the_pointer_over_it() -> None:
    """No window manager: keys go to the window under the pointer. Every type/key action must
    happen while the pointer is over the xterm (x < 508) or the notepad text area (x >= 520, y > 28)."""
    for name, path in shipped_workloads().items():
        pos: tuple[int, int] | None = None
        for a in load_workload(path):
            if isinstance(a, Move | Click | Scroll):
                pos = (a.x, a.y)
            elif isinstance(a, Drag):
                pos = (a.x2, a.y2)
            elif isinstance(a, TypeText | PressKeys):
                assert pos is not None, (name, a.line)
                x, y = pos
                assert (x < 508 and y < 732) or (x >= 520 and 28 < y < 740), (name, a.line)


def test_synthesis_is_deterministic_and_plausible() -> None:
    acts = parse_workload('click 100 100\ntype "aB"\nkey ctrl+s\nwait 2\nscroll 10 10 up 2\ndrag 0 0 50 50')
    evs = synthesize(acts, seed=1)
    assert evs == synthesize(acts, seed=1)
    assert evs != synthesize(acts, seed=2)
    ts = [e.t_us for e in evs]
    assert ts == sorted(ts)
    keys = [(e.keycode, e.down) for e in evs if isinstance(e, Key)]
    assert keys == [(38, True), (38, False), (50, True), (56, True), (56, False), (50, False),
                    (37, True), (39, True), (39, False), (37, False)]
    buttons = [(e.button, e.down) for e in evs if isinstance(e, Button)]
    assert buttons == [(1, True), (1, False), (4, True), (4, False), (4, True), (4, False), (1, True), (1, False)]
    motions = [e for e in evs if isinstance(e, Motion)]
    assert motions[0] != Motion(motions[0].t_us, 100, 100)  # a path, not a jump
    assert any((m.x, m.y) == (100, 100) for m in motions)
    assert (motions[-1].x, motions[-1].y) == (50, 50)
    # the wait shows as a gap of at least 2 s
    gaps = [b.t_us - a.t_us for a, b in itertools.pairwise(evs)]
    assert max(gaps) >= 2_000_000


def test_main(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert wl.main([str(p) for p in shipped_workloads().values()]) == 0
    assert "actions" in capsys.readouterr().out
    bad = tmp_path / "x.wl"
    bad.write_text("jump\n")
    assert wl.main([str(bad)]) == UsageError.exit_code
    assert "x.wl:1" in capsys.readouterr().err


def test_one_lookup_by_name_or_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`workload run`, `migrate --workload` and `demo --workload` all take a shipped name or a file."""
    path, actions = get_workload("notes")
    assert path == shipped_workloads()["notes"] and actions
    mine = tmp_path / "mine.wl"
    mine.write_text("wait 0.5\n")
    assert get_workload(str(mine)) == (mine, [Wait(0.5, 1)])
    monkeypatch.chdir(tmp_path)
    assert find_workload("mine.wl") == Path("mine.wl")
    with pytest.raises(UsageError, match=r"no workload 'nosuch': no such file, nor one of the shipped ones \(.*notes"):
        get_workload("nosuch")
    with pytest.raises(UsageError, match="dangling symbolic link"):
        (tmp_path / "gone.wl").symlink_to(tmp_path / "nowhere")
        get_workload("gone.wl")


@pytest.mark.timeout(30)
def test_a_fifo_or_a_device_is_refused_not_read(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "fifo.wl")
    with pytest.raises(UsageError, match="is a FIFO"):
        get_workload(str(tmp_path / "fifo.wl"))
    with pytest.raises(UsageError, match="is a character device"):
        get_workload("/dev/zero")
    assert wl.main(["notes", str(tmp_path / "fifo.wl")]) == UsageError.exit_code


def test_build_types_no_key_while_a_command_runs() -> None:
    """Keys typed while a command prints echo among its output in the order they and it came: a
    target whose command ends a key earlier or later shows another screen for good, and the sync
    mark after it fails (bench/results/marks.md, "build": the source's make ended among the keys of
    the next command, typed after a fixed wait shorter than the build on a loaded host). So the
    user of ``build`` waits for the prompt after ``cp`` and queues the rest on make's command line:
    no key comes after it, whatever the build's flags and duration."""
    acts = [a for a in load_workload(shipped_workloads()["build"]) if not isinstance(a, Check)]
    typed = [i for i, a in enumerate(acts) if isinstance(a, TypeText)]
    make = next(i for i in typed if isinstance(a := acts[i], TypeText) and a.text.startswith("make"))
    assert any(isinstance(a, Wait) and a.seconds >= 1 for a in acts[typed[0]:make]), "no wait after cp"
    assert typed[-1] == make, "keys typed after make started"
    line = acts[make]
    assert isinstance(line, TypeText) and "src/lua -e" in line.text and "sha256sum" in line.text
    build_wait = acts[make + 1:]
    assert len(build_wait) == 1 and isinstance(build_wait[0], Wait) and build_wait[0].seconds >= 150


def test_a_session_lasts_until_its_trailing_wait_ends() -> None:
    """A workload's last ``wait`` is time for its last command's effects (the checksums written,
    the build done): the driver must let it pass before the session is over, though no event
    comes after it. The bench drove ``build`` for the time of its last key and migrated while make
    still ran."""
    acts = parse_workload('click 10 10\ntype "make\\n"\nwait 185')
    evs, length = timeline(acts, seed=3)
    assert evs == synthesize(acts, seed=3)
    assert length == session_seconds(acts, seed=3)
    assert length == pytest.approx(evs[-1].t_us / 1e6 + 185, abs=1.0)
    assert session_seconds(parse_workload("wait 2")) == 2
    assert session_seconds(parse_workload("")) == 0
    for name, path in shipped_workloads().items():
        session = [a for a in load_workload(path) if not isinstance(a, Check)]
        trailing = 0.0
        while session and isinstance(last := session[-1], Wait):
            trailing += last.seconds
            session.pop()
        # the trailing waits, after the last key's own gap (< 1 s)
        extra = session_seconds(load_workload(path)) - synthesize(load_workload(path))[-1].t_us / 1e6
        assert trailing <= extra < trailing + 1, name
