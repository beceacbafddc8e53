"""Helpers for the tests that run guest-side code on a real X server: Xvfb with RECORD, xdotool, and
Debian's /usr/bin/python3 with the packages the guest image has (python3-pynput, python3-xlib,
python3-msgpack): ``tests/test_agent.py``, ``test_pynput_xorg.py``, ``test_xorg.py``."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = "/usr/bin/python3"
XVFB = "/usr/bin/Xvfb"
W, H = 1280, 800
GUEST_MODULES = (("Xlib", "python3-xlib"), ("msgpack", "python3-msgpack"), ("pynput", "python3-pynput"))
"""What the guest's python3 must import, and the Debian package that has it."""


def missing_prerequisites() -> list[str]:
    missing = []
    if not os.access(XVFB, os.X_OK):
        missing.append(f"{XVFB} (apt-get install xvfb)")
    if shutil.which("xdotool") is None:
        missing.append("xdotool (apt-get install xdotool)")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        missing.append(SYSTEM_PYTHON)
    else:
        for mod, pkg in GUEST_MODULES:
            # find_spec, not import: pynput's Xorg backend connects to $DISPLAY when imported
            r = subprocess.run([SYSTEM_PYTHON, "-c", f"import importlib.util as u, sys; "
                                f"sys.exit(u.find_spec({mod!r}) is None)"], capture_output=True)
            if r.returncode != 0:
                missing.append(f"{pkg} for {SYSTEM_PYTHON} (apt-get install {pkg})")
    return missing


@contextmanager
def xvfb() -> Iterator[str]:
    """An Xvfb with RECORD on a free display; yields its name (``:N``)."""
    missing = missing_prerequisites()
    if missing:
        pytest.fail("cannot test guest-side code on X; missing: " + "; ".join(missing))
    r, w = os.pipe()
    proc = subprocess.Popen(
        [XVFB, "-displayfd", str(w), "-screen", "0", f"{W}x{H}x24", "+extension", "RECORD",
         "-nolisten", "tcp", "-br", "-noreset"],
        pass_fds=[w], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 20)
        num = os.read(r, 64).decode().strip() if ready else ""
        if not num.isdigit():
            pytest.fail("Xvfb did not start (no display number on -displayfd)")
        yield f":{num}"
    finally:
        os.close(r)
        proc.terminate()
        proc.wait(10)


def xdo(disp: str, *args: str) -> None:
    subprocess.run(["xdotool", *args], env={**os.environ, "DISPLAY": disp}, check=True, timeout=30)


def guest_env(disp: str) -> dict[str, str]:
    """The environment guest-side code runs in here: the system python, this checkout's modules."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO), "DISPLAY": disp}
