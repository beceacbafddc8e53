"""In-place rewrite of the domain XML in a libvirt save header (synthetic images)."""

from __future__ import annotations

from pathlib import Path

import pytest

from replay_migrate.errors import ImageError
from vm.savehdr import HEADER, read_header, rewrite_xml

TAIL = b"QEVM\x00\x00\x00\x03" + bytes(range(256)) * 8


def make(path: Path, xml: str, cookie: str = "<cookie/>", data_len: int = 4096) -> Path:
    xb, cb = xml.encode() + b"\0", cookie.encode() + b"\0"
    data = (xb + cb).ljust(data_len, b"\0")
    path.write_bytes(HEADER.pack(b"LibvirtQemudSave", 2, data_len, 1, 6, len(xb), *([0] * 14)) + data + TAIL)
    return path


def test_read_header(tmp_path: Path) -> None:
    h = read_header(make(tmp_path / "a.sav", "<domain><name>a</name></domain>"))
    assert (h.version, h.data_len, h.was_running, h.format) == (2, 4096, 1, 6)
    assert h.xml == "<domain><name>a</name></domain>" and h.cookie == "<cookie/>"


def test_rewrite_keeps_everything_after_the_header(tmp_path: Path) -> None:
    p = make(tmp_path / "a.sav", "<domain><name>a</name></domain>")
    before = p.read_bytes()
    new = "<domain><name>a-much-longer-clone-name</name></domain>"
    rewrite_xml(p, new, was_running=0)
    after = p.read_bytes()
    h = read_header(p)
    assert h.xml == new and h.cookie == "<cookie/>" and h.was_running == 0
    assert len(after) == len(before)
    assert after[HEADER.size + 4096:] == before[HEADER.size + 4096:]


def test_rewrite_refuses_xml_that_does_not_fit(tmp_path: Path) -> None:
    p = make(tmp_path / "a.sav", "<d/>", data_len=64)
    before = p.read_bytes()
    with pytest.raises(ImageError, match="does not fit"):
        rewrite_xml(p, "<domain>" + "x" * 100 + "</domain>")
    assert p.read_bytes() == before


@pytest.mark.parametrize("blob, msg", [
    (b"", "too short"),
    (b"NotASaveImage!!!" + bytes(76), "not a libvirt save image"),
    (HEADER.pack(b"LibvirtQemudSave", 2, 0, 0, 6, 0, *([0] * 14)), "implausible"),
    (HEADER.pack(b"LibvirtQemudSave", 2, 100, 0, 6, 0, *([0] * 14)) + b"<d/>", "truncated"),
    (HEADER.pack(b"LibvirtQemudSave", 2, 4, 0, 6, 0, *([0] * 14)) + b"<d/>", "not terminated"),
])
def test_bad_headers(tmp_path: Path, blob: bytes, msg: str) -> None:
    p = tmp_path / "bad.sav"
    p.write_bytes(blob)
    with pytest.raises(ImageError, match=msg):
        read_header(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read"):
        read_header(tmp_path / "nope.sav")
