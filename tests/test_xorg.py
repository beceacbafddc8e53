"""recorder.xorg on Xvfb (python-xlib, in this process): regions, samples, the clock, the keymap."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from xkit import H, W, xdo, xvfb
from Xlib import display as xdisplay

from recorder.capture import SampleError, SyncPolicy
from recorder.xorg import XScreen, keymap_name, server_time


@pytest.fixture(scope="module")
def disp() -> Iterator[Any]:
    with xvfb() as name:
        d = xdisplay.Display(name)
        yield d
        d.close()


def test_samples_regions_as_canonical_rgb(disp: Any) -> None:
    s = XScreen(disp, SyncPolicy(size=64))
    assert (s.width, s.height, s.readable) == (W, H, True)
    assert s.sample(0, 0, 4, 2) == bytes(4 * 2 * 3)       # Xvfb -br: a black root
    with pytest.raises(SampleError):
        s.sample(W - 1, 0, 2, 1)                          # leaves the screen: X's BadMatch
    xdo(disp.get_display_name(), "mousemove", "10", "700")
    assert s.region("click") == (0, 668, 42, 64)          # 64x64 around the pointer, clipped
    s.service(True)                                       # selects on root, round trip: no error


def test_clock_and_keymap(disp: Any) -> None:
    a = server_time(disp)
    b = server_time(disp)
    assert 0 <= b - a < 10_000
    assert keymap_name(disp) == "us"
