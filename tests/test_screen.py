"""Screenshots: PPM parsing, regions, PNG output."""

from __future__ import annotations

import struct
import zlib

import pytest

from replay_migrate.errors import VMError
from vm.screen import Screenshot


def ppm(w: int, h: int, px: bytes, comment: bool = False) -> bytes:
    return b"P6\n" + (b"# made by a test\n" if comment else b"") + f"{w} {h}\n255\n".encode() + px


def test_parse_and_pixels() -> None:
    px = bytes([10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120])
    s = Screenshot.from_ppm(ppm(2, 2, px, comment=True))
    assert (s.width, s.height) == (2, 2)
    assert s.pixel(1, 1) == (100, 110, 120)
    assert s.region(1, 0, 5, 5) == bytes([40, 50, 60, 100, 110, 120])
    assert s.region_hash(0, 0, 1, 1) != s.region_hash(1, 0, 1, 1)


@pytest.mark.parametrize("blob", [b"P6\n2 2\n", ppm(2, 2, b"\0" * 11), b"P5\n1 1\n255\n\0"])
def test_bad_ppm(blob: bytes) -> None:
    with pytest.raises(VMError):
        Screenshot.from_ppm(blob)


def test_png_round_trip() -> None:
    px = bytes(range(48))
    png = Screenshot.from_ppm(ppm(4, 4, px)).png()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", png[16:24])
    idat_len = struct.unpack(">I", png[33:37])[0]
    raw = zlib.decompress(png[41 : 41 + idat_len])
    assert (w, h) == (4, 4)
    assert b"".join(raw[r * 13 + 1 : (r + 1) * 13] for r in range(4)) == px
