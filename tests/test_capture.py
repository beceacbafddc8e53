"""recorder.capture: the backend registry and its refusals (the backends themselves: test_pynput_xorg.py)."""

from __future__ import annotations

import importlib.util

import pytest

from recorder.capture import BACKENDS, DEFAULT_BACKEND, BackendUnavailable, open_desktop


def test_every_registered_backend_is_a_module_here() -> None:
    assert DEFAULT_BACKEND in BACKENDS
    for module in BACKENDS.values():
        assert importlib.util.find_spec(module) is not None, module


def test_an_unknown_backend_is_refused_by_name() -> None:
    with pytest.raises(BackendUnavailable, match=r"unknown capture backend 'win32' \(known: pynput-xorg\)"):
        open_desktop("win32", ":0")
