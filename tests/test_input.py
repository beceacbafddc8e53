"""QMP input events from X terms."""

from __future__ import annotations

import pytest

from replay_migrate.errors import VMError
from vm import input as vi


def test_keys() -> None:
    assert vi.key(38, True) == {"type": "key", "data": {"down": True, "key": {"type": "number", "data": 30}}}
    assert vi.qnum(111 + 8) == 0xD3          # Delete has the e0 prefix
    assert vi.qnum(105 + 8) == 0xCB          # Left arrow
    with pytest.raises(VMError):
        vi.qnum(300)


def test_pointer_is_pixel_centred() -> None:
    ev = vi.pointer(0, 799, (1280, 800))
    assert ev[0]["data"] == {"axis": "x", "value": int(0.5 * 0x8000 / 1280)}
    assert ev[1]["data"]["value"] == int(799.5 * 0x8000 / 800)
    with pytest.raises(VMError, match="outside"):
        vi.pointer(1280, 0, (1280, 800))


def test_buttons() -> None:
    assert vi.button(3, False)["data"] == {"down": False, "button": "right"}
    assert vi.button(4, True)["data"]["button"] == "wheel-up"
    with pytest.raises(VMError):
        vi.button(12, True)
