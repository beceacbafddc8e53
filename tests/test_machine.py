"""The VM layer against real guests (``vm``: clones of the shared test checkpoint, restored, not
booted), and its host-tool helpers without any (qemu-img, cp)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from replay_migrate.errors import ImageError, NoSuchDomainError, VMError
from replayer.drive import drive
from replayer.workload import parse_workload
from vm import input as vi
from vm.machine import Hypervisor, Machine, MachineState, create_overlay

WHITE = (255, 255, 255)


@pytest.mark.vm
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


@pytest.mark.vm
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


@pytest.mark.vm
def test_state_guard_refuses_wrong_calls(make_clone: Callable[..., Machine]) -> None:
    m = make_clone(paused=True)
    state = m.state             # read anew each time: libvirt's, never cached
    assert state is MachineState.PAUSED
    with pytest.raises(VMError, match="it is paused, needs running"):
        m.send_input([vi.key(38, True)])
    with pytest.raises(VMError, match="cannot pause"):
        m.pause()
    m.resume()
    state = m.state
    assert state is MachineState.RUNNING
    with pytest.raises(VMError, match="cannot resume"):
        m.resume()


@pytest.mark.vm
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


@pytest.mark.vm
def test_clones_are_independent(make_clone: Callable[..., Machine]) -> None:
    a, b = make_clone(), make_clone()
    assert a.dom.UUIDString() != b.dom.UUIDString()
    a.wait_agent()
    b.wait_agent()
    a.exec("echo only-in-a > /root/a.txt && sync")
    assert b.exec("test -e /root/a.txt").exit_code == 1


@pytest.mark.vm
def test_missing_domain(hv: Hypervisor) -> None:
    with pytest.raises(NoSuchDomainError, match="rm-test-none"):
        hv.lookup("rm-test-none")


def test_a_test_not_marked_vm_cannot_reach_the_daemon() -> None:
    """conftest's guard: the unit tests (``-m "not vm"``) need no libvirtd."""
    with pytest.raises(pytest.fail.Exception, match=r"mark it @pytest\.mark\.vm"):
        Hypervisor(connect_timeout=0)
    with Hypervisor("test:///default") as hv:        # the in-process test driver is no daemon
        assert hv.exists("test")


def test_overlays_through_the_tool_runner(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    with pytest.raises(ImageError, match="does not exist"):
        create_overlay(tmp_path / "o.qcow2", base)
    base.write_bytes(b"not a qcow2 image")
    with pytest.raises(ImageError, match=r"o\.qcow2: qemu-img create \(a new overlay\) failed: Could not open backing"):
        create_overlay(tmp_path / "o.qcow2", base)
