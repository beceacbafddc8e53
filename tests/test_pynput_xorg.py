"""recorder.pynput_xorg against the installed pynput (Debian's python3-pynput on /usr/bin/python3, what
the guest image and ``agent install`` check for), on Xvfb: the one place that reaches into pynput's
internals (``listener_class``) still finds them, and the backend delivers X keycodes, buttons, pointer
positions and the server's times, in the server's order, through one RECORD context."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest
from xkit import SYSTEM_PYTHON, guest_env, xvfb

SCRIPT = r"""
import json, queue, subprocess, sys
from recorder.capture import Captured, CaptureStarted, SyncPolicy, open_desktop
from recorder.pynput_xorg import listener_class, pynput_version
import pynput.mouse

desk = open_desktop("pynput-xorg", sys.argv[1], SyncPolicy())
cls = listener_class()
q = queue.Queue()
t0 = desk.capture.now_ms()
desk.capture.start(q.put)
first = q.get(timeout=10)
subprocess.run(["xdotool", "mousemove", "40", "50", "keydown", "shift", "click", "1", "keyup", "shift",
                "key", "KP_1"], check=True)
events = []
while len(events) < 7:
    ev = q.get(timeout=10)
    if isinstance(ev, Captured) and ev.code != 77:  # xdotool's NumLock around KP_1
        events.append([ev.kind.value, ev.code, ev.down, ev.x, ev.y, ev.time_ms])
desk.capture.stop(5)
print(json.dumps({
    "version": pynput_version(), "base": pynput.mouse.Listener.__module__, "events_range": list(cls._EVENTS),
    "started": isinstance(first, CaptureStarted), "t0": t0, "events": events, "name": desk.capture.name,
    "error": desk.capture.error, "screen": [desk.screen.width, desk.screen.height], "keymap": desk.keymap,
}))
"""


@pytest.fixture(scope="module")
def display() -> Iterator[str]:
    with xvfb() as disp:
        yield disp


def test_the_installed_pynput_records_keycodes_buttons_and_server_times(display: str) -> None:
    r = subprocess.run([SYSTEM_PYTHON, "-c", SCRIPT, display], env=guest_env(display), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["version"].startswith("1."), out["version"]
    assert out["base"] == "pynput.mouse._xorg"
    assert out["events_range"] == [2, 6]       # KeyPress..MotionNotify: one context for all
    assert out["started"] and out["name"] == "pynput-xorg"
    assert out["screen"] == [1280, 800] and out["keymap"] == "us"
    kinds = [e[:3] for e in out["events"]]
    assert kinds == [["motion", 0, False], ["key", 50, True], ["button", 1, True], ["button", 1, False],
                     ["key", 50, False], ["key", 87, True], ["key", 87, False]]
    assert out["events"][0][3:5] == [40, 50]
    times = [e[5] for e in out["events"]]
    assert times == sorted(times) and times[0] >= out["t0"]
    assert out["error"] is None       # stopped on request, not by itself


def test_a_pynput_that_picks_another_backend_is_refused_with_a_reason(display: str) -> None:
    r = subprocess.run([SYSTEM_PYTHON, "-m", "recorder.agent", "--display", display, "--port", "/nonexistent",
                        "--log-file", "/dev/null"], env={**guest_env(display), "PYNPUT_BACKEND": "dummy"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 4, r.stderr
    assert "not Xorg's (is $PYNPUT_BACKEND set?)" in r.stderr


def test_a_missing_pynput_names_the_package(display: str) -> None:
    code = ("import runpy, sys; sys.modules['pynput'] = None; "   # as if python3-pynput were not installed
            "runpy.run_module('recorder.agent', run_name='__main__', alter_sys=True)")
    r = subprocess.run([SYSTEM_PYTHON, "-c", code, "--display", display, "--port", "/nonexistent",
                        "--log-file", "/dev/null"], env=guest_env(display), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 3, r.stderr
    assert "install python3-pynput" in r.stderr
