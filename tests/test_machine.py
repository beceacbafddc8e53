"""The VM layer against real guests: clones of the shared test checkpoint (restored, not booted)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from replay_migrate.errors import NoSuchDomainError, VMError
from replayer.drive import drive
from replayer.workload import parse_workload
from vm import input as vi
from vm.machine import Hypervisor, Machine, MachineState

pytestmark = pytest.mark.vm

WHITE = (255, 255, 255)


def test_clone_shows_the_desktop(make_clone: Callable[..., Machine]) -> None:
    m = make_clone()
    assert m.state is MachineState.RUNNING
    shot = m.screenshot()
    assert (shot.width, shot.height) == m.screen_size == (1280, 800)
    assert shot.pixel(250, 400) == WHITE                 # xterm's window, left half
    assert shot.pixel(760, 400) == WHITE                 # the notepad's text area, right half
    r, g, b = shot.pixel(578, 15)                        # the notepad's Save button (Tk grey)
    assert r == g == b and 180 < r < 240
    assert shot.pixel(1200, 780) == (0, 0, 0)            # bare root window
    assert shot.distinct_colours() > 2


def test_type_into_the_notepad_save_and_read_back(make_clone: Callable[..., Machine]) -> None:
    m = make_clone()
    m.wait_agent()
    # at a typist's pace: back-to-back QMP key events overflow the guest's PS/2 queue under TCG
    drive(m, parse_workload('click 760 300\ntype "Hello from QMP, 42!\\nsecond line"\nkey ctrl+s\nwait 1'))
    deadline = time.monotonic() + 30
    while m.exec("cat /root/notes.txt 2>/dev/null").stdout != "Hello from QMP, 42!\nsecond line":
        assert time.monotonic() < deadline, "the notepad did not save the typed text"
        time.sleep(0.2)
    assert m.read_file("/root/notes.txt") == b"Hello from QMP, 42!\nsecond line"


def test_state_guard_refuses_wrong_calls(make_clone: Callable[..., Machine]) -> None:
    m = make_clone(paused=True)
    assert m.state is MachineState.PAUSED
    with pytest.raises(VMError, match="it is paused, needs running"):
        m.send_input([vi.key(38, True)])
    with pytest.raises(VMError, match="cannot pause"):
        m.pause()
    m.resume()
    assert m.state is MachineState.RUNNING
    with pytest.raises(VMError, match="cannot resume"):
        m.resume()


def test_save_and_restore(make_clone: Callable[..., Machine], hv: Hypervisor, tmp_path: Path) -> None:
    m = make_clone()
    m.exec("echo kept-in-memory > /dev/shm/marker")
    image = tmp_path / "m.sav"
    m.save(image)
    with pytest.raises(NoSuchDomainError):
        hv.lookup(m.name)
    back = hv.restore(image)
    assert back.name == m.name and back.state is MachineState.RUNNING
    back.wait_agent()
    assert back.exec("cat /dev/shm/marker").stdout == "kept-in-memory\n"


def test_clones_are_independent(make_clone: Callable[..., Machine]) -> None:
    a, b = make_clone(), make_clone()
    assert a.dom.UUIDString() != b.dom.UUIDString()
    a.wait_agent()
    b.wait_agent()
    a.exec("echo only-in-a > /root/a.txt && sync")
    assert b.exec("test -e /root/a.txt").exit_code == 1


def test_missing_domain(hv: Hypervisor) -> None:
    with pytest.raises(NoSuchDomainError, match="rm-test-none"):
        hv.lookup("rm-test-none")
