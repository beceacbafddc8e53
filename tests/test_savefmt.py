"""replay_migrate.savefmt: the libvirt save header read, checked and rewritten in place (synthetic
images); the one codec both the VM layer and ``differ.saveimage`` go through."""

from __future__ import annotations

import os
import threading
import tracemalloc
from pathlib import Path

import pytest
from fuzzkit import fuzz_tests
from test_saveimage import build_save_image

from differ.saveimage import parse_save_image
from replay_migrate.errors import ImageError
from replay_migrate.savefmt import (
    DEFAULT_MAX_DATA_LEN,
    HEADER,
    encode,
    read_header,
    rewrite_xml,
    unpack_area,
    unpack_fixed,
)

TAIL = b"QEVM\x00\x00\x00\x03" + bytes(range(256)) * 8


def make(path: Path, xml: str, cookie: str = "<cookie/>", data_len: int = 4096) -> Path:
    xb, cb = xml.encode() + b"\0", cookie.encode() + b"\0"
    data = (xb + cb).ljust(data_len, b"\0")
    path.write_bytes(HEADER.pack(b"LibvirtQemudSave", 2, data_len, 1, 6, len(xb), *([0] * 14)) + data + TAIL)
    return path


def test_read_header(tmp_path: Path) -> None:
    h = read_header(make(tmp_path / "a.sav", "<domain><name>a</name></domain>"))
    assert (h.version, h.data_len, h.was_running, h.format) == (2, 4096, True, 6)
    assert h.xml == "<domain><name>a</name></domain>" and h.cookie == "<cookie/>"


def test_rewrite_keeps_everything_after_the_header(tmp_path: Path) -> None:
    p = make(tmp_path / "a.sav", "<domain><name>a</name></domain>")
    before = p.read_bytes()
    new = "<domain><name>a-much-longer-clone-name</name></domain>"
    rewrite_xml(p, new, was_running=False)
    after = p.read_bytes()
    h = read_header(p)
    assert h.xml == new and h.cookie == "<cookie/>" and h.was_running is False
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
    with pytest.raises(ImageError, match="no such file"):
        read_header(tmp_path / "nope.sav")


def _hdr(data_len: int, *, magic: bytes = b"LibvirtQemudSave", version: int = 2, running: int = 1,
         fmt: int = 6, cookie_off: int = 0) -> bytes:
    return HEADER.pack(magic, version, data_len, running, fmt, cookie_off, *([0] * 14))


def test_data_len_is_bounded_by_the_file_before_reading(tmp_path: Path) -> None:
    """A header announcing the largest XML area in a tiny file is refused before anything of that
    size is allocated (issue 10: bound every allocation by the file's real size)."""
    p = tmp_path / "a.sav"
    p.write_bytes(_hdr(DEFAULT_MAX_DATA_LEN) + b"<d/>\0" + bytes(100))
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match="truncated"):
            read_header(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize("blob, msg", [
    (_hdr(8, magic=b"LibvirtQemudPart") + b"<d/>\0\0\0\0", "incomplete"),
    (_hdr(8, version=1) + b"<d/>\0\0\0\0", "version 1"),
    (_hdr(8, version=3) + b"<d/>\0\0\0\0", "version 3"),
    (_hdr(8, running=7) + b"<d/>\0\0\0\0", "was_running"),
    (_hdr(8) + b"<\xff/>\0\0\0\0", "UTF-8"),
    (_hdr(12, cookie_off=5) + b"<d/>\0c\xffk\0\0\0\0", "UTF-8"),
    (_hdr(12, cookie_off=5) + b"<d/>\0cookie!", "cookie"),
    (_hdr(8, cookie_off=9) + b"<d/>\0\0\0\0", "cookie offset"),
], ids=["partial", "v1", "v3", "running", "xml-utf8", "cookie-utf8", "cookie-nul", "cookie-off"])
def test_every_header_field_is_checked(tmp_path: Path, blob: bytes, msg: str) -> None:
    """Fields that ``rewrite_xml`` writes back must be what libvirt wrote: a lossy decode of the XML
    or cookie would rewrite them changed, and a partial image is not one to restore."""
    p = tmp_path / "bad.sav"
    p.write_bytes(blob + TAIL)
    with pytest.raises(ImageError, match=msg):
        read_header(p)


def test_rewrite_refuses_xml_with_a_nul(tmp_path: Path) -> None:
    p = make(tmp_path / "a.sav", "<d/>")
    with pytest.raises(ImageError, match="NUL"):
        rewrite_xml(p, "<d>\0</d>")


def test_a_header_without_a_cookie_is_rewritten_without_one(tmp_path: Path) -> None:
    p = tmp_path / "a.sav"
    p.write_bytes(_hdr(64) + b"<d/>".ljust(64, b"\0") + TAIL)
    assert read_header(p).cookie is None
    rewrite_xml(p, "<domain/>")
    h = read_header(p)
    assert (h.xml, h.cookie, h.cookie_offset) == ("<domain/>", None, 0)


def test_encode_and_decode_are_inverse_on_bytes() -> None:
    blob = _hdr(40, cookie_off=5) + b"<d/>\0<c/>\0".ljust(40, b"\0")
    h = unpack_area(unpack_fixed(blob, "mem", file_size=len(blob)), blob[HEADER.size:], "mem")
    assert (h.xml, h.cookie, h.qemu_offset) == ("<d/>", "<c/>", len(blob))
    assert encode(h) == blob
    again = encode(h, "<domain/>", was_running=False)
    h2 = unpack_area(unpack_fixed(again, "mem", file_size=len(again)), again[HEADER.size:], "mem")
    assert (h2.xml, h2.cookie, h2.was_running, len(again)) == ("<domain/>", "<c/>", False, len(blob))


BAD_FOR_BOTH = [
    _hdr(8, magic=b"LibvirtQemudPart") + b"<d/>\0\0\0\0",
    _hdr(8, version=3) + b"<d/>\0\0\0\0",
    _hdr(8, running=7) + b"<d/>\0\0\0\0",
    _hdr(0),
    _hdr(1 << 20) + b"<d/>\0",
    _hdr(4) + b"<d/>",
    _hdr(4) + b"\0<d>",
    _hdr(8) + b"<\xff/>\0\0\0\0",
    _hdr(12, cookie_off=5) + b"<d/>\0c\xffk\0\0\0\0",
    _hdr(12, cookie_off=5) + b"<d/>\0cookie!",
    _hdr(8, cookie_off=9) + b"<d/>\0\0\0\0",
    b"LibvirtQemudSave",
]


@pytest.mark.parametrize("blob", BAD_FOR_BOTH, ids=range(len(BAD_FOR_BOTH)))
def test_the_memory_image_reader_refuses_the_same_headers_in_the_same_words(tmp_path: Path, blob: bytes) -> None:
    """Issue 11 finding 4: ``differ.saveimage`` had a header parser of its own that accepted what
    this one refused (an empty XML) and said other things about the rest. Now both are this codec."""
    p = tmp_path / "bad.sav"
    p.write_bytes(blob + TAIL)
    with pytest.raises(ImageError) as here:
        read_header(p)
    with pytest.raises(ImageError) as there:
        parse_save_image(p)
    assert str(there.value) == str(here.value)


def test_the_memory_image_reader_returns_this_header(tmp_path: Path) -> None:
    img = build_save_image(tmp_path / "a.sav")
    assert parse_save_image(img.path).header == read_header(img.path)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "a.sav"
    os.mkfifo(fifo)
    out: list[BaseException | None] = []

    def run() -> None:
        try:
            read_header(fifo)
            out.append(None)
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=20)
    assert out and isinstance(out[0], ImageError) and "not a regular file" in str(out[0])


# -- fuzz: the target `make fuzz` runs on 100,000 inputs (bench/fuzz_targets), here on a few -------------

test_fuzz_save_header, test_fuzz_save_header_raw_bytes = fuzz_tests("save-header")
