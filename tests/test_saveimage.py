"""differ.saveimage: parsing libvirt's sparse save image, and the sparse-file writer.

The images here are synthetic but laid out byte for byte as libvirt 11 + QEMU 10 write them
(``build_save_image``, also used by test_blocks and test_patch)."""

from __future__ import annotations

import filecmp
import itertools
import os
import random
import shutil
import struct
import threading
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fuzzkit import fuzz_tests

from differ import saveimage
from differ.saveimage import ImageWriter, SaveImage, copy_range, parse_save_image, punch_hole
from replay_migrate.errors import ImageError
from replay_migrate.sparse import data_extents
from vm.machine import Hypervisor, Machine

PAGE = 4096
MIB = 1 << 20


@dataclass
class BlockSpec:
    name: str
    npages: int
    pages: dict[int, bytes] = field(default_factory=dict)
    """Present pages and their (non-zero) content; every other page is a zero page (hole)."""


@dataclass
class BuiltBlock:
    spec: BlockSpec
    header_offset: int
    bitmap_offset: int
    pages_offset: int


@dataclass
class BuiltImage:
    path: Path
    xml: str
    cookie: str
    data_len: int
    qemu_offset: int
    ram_section_offset: int
    blocks: list[BuiltBlock]
    tail_offset: int
    size: int


def default_blocks(seed: int = 1, ram_pages: int = 2048) -> list[BlockSpec]:
    """A small PC: RAM with ~30% present pages, ROM-like blocks, a mostly empty VRAM."""
    rng = np.random.default_rng(seed)

    def page(tag: int) -> bytes:
        data = bytearray(rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes())
        data[0] = tag or 1  # never all zeros
        return bytes(data)

    ram = {int(n): page(n % 251) for n in rng.choice(ram_pages, ram_pages * 3 // 10, replace=False)}
    return [
        BlockSpec("pc.ram", ram_pages, ram),
        BlockSpec("/rom@etc/acpi/tables", 32, {n: page(n) for n in range(0, 32, 3)}),
        BlockSpec("pc.bios", 64, {n: page(n) for n in range(64)}),
        BlockSpec("0000:00:02.0/vga.vram", 256, {0: page(7), 255: page(9)}),
        BlockSpec("/rom@etc/table-loader", 1, {0: page(3)}),
        BlockSpec("/rom@etc/acpi/rsdp", 1, {}),
    ]


def _idstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return bytes([len(b)]) + b


def build_save_image(
    path: Path,
    blocks: list[BlockSpec] | None = None,
    *,
    xml: str = "<domain type='qemu'><name>ck</name><uuid>0f0e0d0c-0b0a-0908-0706-050403020100</uuid></domain>",
    cookie: str = "<qemu-migration><name>ck</name></qemu-migration>",
    data_room: int = 65536,
    magic: bytes = b"LibvirtQemudSave",
    version: int = 2,
    fmt: int = 6,
    machine: str = "pc-q35-10.0",
    caps: tuple[str, ...] = ("mapped-ram",),
    extra_subsection: bytes | None = None,
    ignored_block: str | None = None,
    tail: bytes | None = None,
    multifd_flush: bool = False,
    configuration: bool = True,
    page_bits: int | None = None,
) -> BuiltImage:
    """Write a sparse save image as libvirt + QEMU do: header, XML + cookie padded to data_len, the
    QEVM stream with configuration and the mapped-ram RAM section, bitmaps, pages at 1 MiB-aligned
    pages_offset (zero pages left as holes), then EOS, the section footer and a device-state tail."""
    blocks = default_blocks() if blocks is None else blocks
    xml_b, cookie_b = xml.encode(), cookie.encode()
    data_len = max(data_room, len(xml_b) + len(cookie_b) + 2)
    data = (xml_b + b"\0" + cookie_b + b"\0").ljust(data_len, b"\0")
    header = struct.pack("<16s5I14I", magic, version, data_len, 1, fmt, len(xml_b) + 1, *([0] * 14))
    qemu_offset = len(header) + data_len
    pieces: list[tuple[int, bytes]] = [(0, header + data)]

    stream = bytearray(b"QEVM" + struct.pack(">I", 3))
    if configuration:
        stream += bytes([0x07]) + struct.pack(">I", len(machine)) + machine.encode()
    if configuration and page_bits is not None:
        stream += bytes([0x05]) + _idstr("configuration/target-page-bits") + struct.pack(">II", 1, page_bits)
    if configuration and extra_subsection is not None:
        stream += bytes([0x05]) + _idstr("configuration/x-future") + struct.pack(">I", 1) + extra_subsection
    if configuration and caps:
        stream += bytes([0x05]) + _idstr("configuration/capabilities") + struct.pack(">I", 1)
        stream += struct.pack(">I", len(caps)) + b"".join(_idstr(c) for c in caps)
    ram_section_offset = qemu_offset + len(stream)
    section_id = 2
    total = sum(b.npages for b in blocks) * PAGE
    stream += bytes([0x01]) + struct.pack(">I", section_id) + _idstr("ram") + struct.pack(">II", 0, 4)
    stream += struct.pack(">Q", total | 0x04)
    pos = qemu_offset + len(stream)
    pieces.append((qemu_offset, bytes(stream)))
    built: list[BuiltBlock] = []
    for spec in blocks:
        hdr = bytearray(_idstr(spec.name) + struct.pack(">Q", spec.npages * PAGE))
        if "x-ignore-shared" in caps:
            hdr += struct.pack(">Q", 0xFEED0000)
        header_offset = pos
        if spec.name == ignored_block:
            hdr += struct.pack(">IQQQ", 1, PAGE, 0, 0)
            pieces.append((pos, bytes(hdr)))
            built.append(BuiltBlock(spec, header_offset, 0, 0))
            pos += len(hdr)
            continue
        bitmap_offset = pos + len(hdr) + 28
        bitmap_size = (spec.npages + 63) // 64 * 8
        pages_offset = -(-(bitmap_offset + bitmap_size) // MIB) * MIB
        hdr += struct.pack(">IQQQ", 1, PAGE, bitmap_offset, pages_offset)
        bits = np.zeros(bitmap_size * 8, dtype=np.uint8)
        bits[list(spec.pages)] = 1
        pieces.append((pos, bytes(hdr)))
        pieces.append((bitmap_offset, np.packbits(bits, bitorder="little").tobytes()))
        for n, content in spec.pages.items():
            pieces.append((pages_offset + n * PAGE, content))
        built.append(BuiltBlock(spec, header_offset, bitmap_offset, pages_offset))
        pos = pages_offset + spec.npages * PAGE
    tail_offset = pos
    end = (struct.pack(">Q", 0x200) if multifd_flush else b"") + struct.pack(">Q", 0x10)
    end += bytes([0x7E]) + struct.pack(">I", section_id)
    if tail is None:
        rnd = random.Random(5)
        tail = bytes([0x04]) + bytes(rnd.getrandbits(8) for _ in range(40_000)) + bytes([0x00])
    pieces.append((tail_offset, end + tail))
    size = tail_offset + len(end) + len(tail)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for offset, blob in pieces:
            os.pwrite(fd, blob, offset)
    finally:
        os.close(fd)
    return BuiltImage(path, xml, cookie, data_len, qemu_offset, ram_section_offset, built, tail_offset, size)


# ---------------------------------------------------------------- parsing


def test_parse_round_trip(tmp_path: Path) -> None:
    img = build_save_image(tmp_path / "a.sav")
    lay = parse_save_image(img.path)
    assert lay.file_size == img.size == os.path.getsize(img.path)
    assert (lay.header.magic, lay.header.version, lay.header.format) == (b"LibvirtQemudSave", 2, 6)
    assert lay.header.data_len == img.data_len and lay.header.was_running
    assert lay.xml == img.xml and lay.cookie == img.cookie
    assert lay.qemu_offset == img.qemu_offset and lay.stream_version == 3
    assert lay.machine_type == "pc-q35-10.0" and lay.capabilities == ("mapped-ram",)
    assert lay.ram_section_offset == img.ram_section_offset and lay.structured_walk
    assert lay.ram_total == sum(b.spec.npages for b in img.blocks) * PAGE
    assert lay.device_state_offset == img.tail_offset
    assert [b.name for b in lay.blocks] == [b.spec.name for b in img.blocks]
    for got, want in zip(lay.blocks, img.blocks, strict=True):
        assert got.used_length == want.spec.npages * PAGE and got.npages == want.spec.npages
        assert (got.header_offset, got.bitmap_offset, got.pages_offset) == (
            want.header_offset,
            want.bitmap_offset,
            want.pages_offset,
        )
        assert got.pages_offset % MIB == 0 and got.page_size == PAGE and not got.ignored
    # RAM regions and non-RAM regions tile the file exactly
    regions = sorted(lay.ram_regions() + lay.non_ram_regions())
    assert regions[0][0] == 0 and regions[-1][1] == lay.file_size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(regions))
    assert lay.non_ram_regions()[-1] == (img.tail_offset, img.size)
    assert lay.block_at(img.blocks[0].pages_offset + 5 * PAGE) == lay.blocks[0]
    assert lay.block_at(10) is None and lay.block_at(img.tail_offset) is None


def test_bitmap_and_pages(tmp_path: Path) -> None:
    img = build_save_image(tmp_path / "a.sav")
    with SaveImage.open(img.path) as si:
        for b, want in zip(si.layout.blocks, img.blocks, strict=True):
            present = si.present(b)
            assert present.shape == (b.npages,)
            assert set(np.flatnonzero(present).tolist()) == set(want.spec.pages)
            pages = list(si.iter_pages(b))
            assert [n for n, _ in pages] == list(range(b.npages))
            assert {n for n, p in pages if p} == set(want.spec.pages)
            for n in list(want.spec.pages)[:5]:
                assert si.read_page(b, n) == want.spec.pages[n]
            absent = [n for n in range(b.npages) if n not in want.spec.pages][:3]
            for n in absent:
                assert si.read_page(b, n) == bytes(PAGE)
        ram = si.block("pc.ram")
        with pytest.raises(ValueError):
            ram.page_offset(ram.npages)
        with pytest.raises(KeyError):
            si.block("nope")


def test_zero_pages_are_holes(tmp_path: Path) -> None:
    img = build_save_image(tmp_path / "a.sav")
    fd = os.open(img.path, os.O_RDONLY)
    try:
        extents = list(data_extents(fd))
    finally:
        os.close(fd)
    allocated = sum(e - s for s, e in extents)
    present = sum(len(b.spec.pages) for b in img.blocks) * PAGE
    assert allocated < present + 1 * MIB  # pages + small prologue/tail, no zero pages
    assert os.stat(img.path).st_blocks * 512 < present + 1 * MIB


def test_search_path_when_the_walk_meets_an_unknown_subsection(tmp_path: Path) -> None:
    img = build_save_image(tmp_path / "a.sav", extra_subsection=b"\x00\x01\x02\x03ram")
    lay = parse_save_image(img.path)
    assert not lay.structured_walk
    assert lay.ram_section_offset == img.ram_section_offset
    assert [b.pages_offset for b in lay.blocks] == [b.pages_offset for b in img.blocks]


def test_ignored_block_and_multifd_flush(tmp_path: Path) -> None:
    img = build_save_image(
        tmp_path / "a.sav", caps=("x-ignore-shared", "mapped-ram"), ignored_block="pc.bios", multifd_flush=True
    )
    lay = parse_save_image(img.path)
    bios = next(b for b in lay.blocks if b.name == "pc.bios")
    assert bios.ignored and bios.bitmap_size == 0
    assert all(not b.ignored for b in lay.blocks if b.name != "pc.bios")
    assert (bios.pages_offset, bios.pages_end) not in lay.ram_regions()
    with SaveImage.open(img.path) as si:
        assert not si.present(bios).any()


def test_no_configuration_section_is_accepted(tmp_path: Path) -> None:
    """Old machine types send no configuration section: the ram section follows the header."""
    img = build_save_image(tmp_path / "a.sav", configuration=False)
    lay = parse_save_image(img.path)
    assert lay.machine_type is None and lay.capabilities == () and lay.structured_walk
    assert lay.ram_section_offset == img.qemu_offset + 8
    raw = bytearray(img.path.read_bytes())
    raw[img.qemu_offset + 8] = 0x33  # neither a configuration nor a section start
    bad = tmp_path / "b.sav"
    bad.write_bytes(raw)
    _expect_image_error(bad, "SECTION_START")


# ---------------------------------------------------------------- malformed files


def _expect_image_error(path: Path, *words: str) -> str:
    with pytest.raises(ImageError) as ei:
        parse_save_image(path)
    msg = str(ei.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def _patched(src: Path, dst: Path, offset: int, data: bytes) -> Path:
    raw = bytearray(src.read_bytes())
    raw[offset : offset + len(data)] = data
    dst.write_bytes(raw)
    return dst


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"magic": b"NotLibvirtSave!!"}, ("not a libvirt save image",)),
        ({"magic": b"LibvirtQemudPart"}, ("incomplete",)),
        ({"fmt": 0}, ("format 0 (raw)", "sparse")),
        ({"fmt": 5}, ("format 5 (zstd)",)),
        ({"version": 3}, ("version 3",)),
        ({"caps": ("x-ignore-shared",)}, ("mapped-ram",)),
    ],
)
def test_wrong_header_fields(tmp_path: Path, kwargs: dict[str, Any], words: tuple[str, ...]) -> None:
    img = build_save_image(tmp_path / "x.sav", **kwargs)
    _expect_image_error(img.path, *words)


def test_garbage_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.sav"
    empty.write_bytes(b"")
    _expect_image_error(empty, "truncated")
    junk = tmp_path / "junk.sav"
    junk.write_bytes(os.urandom(200_000))
    _expect_image_error(junk, "not a libvirt save image")
    _expect_image_error(tmp_path / "missing.sav", "cannot open")
    with pytest.raises(ImageError, match="not a regular file"):
        parse_save_image(tmp_path)


def test_target_page_bits_are_checked_before_use(tmp_path: Path) -> None:
    """Issue 10 finding 7: a 32-bit page-bits field went into ``1 << bits`` unchecked (~512 MiB for
    0xFFFFFFFF, then a ValueError). Every value but 12 is an ImageError, and cheap."""
    assert parse_save_image(build_save_image(tmp_path / "ok.sav", page_bits=12).path).structured_walk
    for bits in (0, 11, 13, 63, 64, 1 << 20, 0xFFFFFFFF):
        img = build_save_image(tmp_path / f"b{bits}.sav", page_bits=bits)
        tracemalloc.start()
        try:
            _expect_image_error(img.path, "page")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 4 * MIB, (bits, peak)


def test_announced_sizes_are_bounded_by_the_file(tmp_path: Path) -> None:
    """A RAM total larger than the file (no x-ignore-shared) is refused before the block walk, and
    a machine type name longer than any QEMU uses is refused before it is read."""
    img = build_save_image(tmp_path / "a.sav")
    total_at = img.ram_section_offset + 17
    bad = _patched(img.path, tmp_path / "t.sav", total_at, struct.pack(">Q", (1 << 60) | 0x04))
    _expect_image_error(bad, "RAM total")
    bad = _patched(img.path, tmp_path / "m.sav", img.qemu_offset + 9, struct.pack(">I", 0x7FFFFFFF))
    _expect_image_error(bad, "machine type")


def test_an_ignored_block_allocates_nothing_for_its_size(tmp_path: Path) -> None:
    """x-ignore-shared blocks are not in the file, so their size is not bounded by it: their
    bitmap is a view that allocates nothing, whatever size they announce."""
    blocks = [BlockSpec("pc.ram", 64, {0: b"\x01" * PAGE}), BlockSpec("shared", 1 << 30)]
    img = build_save_image(tmp_path / "a.sav", blocks, caps=("x-ignore-shared", "mapped-ram"), ignored_block="shared")
    with SaveImage.open(img.path) as si:
        shared = si.block("shared")
        assert shared.ignored and shared.npages == 1 << 30
        tracemalloc.start()
        try:
            present = si.present(shared)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert present.shape == (1 << 30,) and not present[:10].any() and peak < MIB


def _returns_promptly(fn: Callable[[], object]) -> BaseException | None:
    """Run ``fn`` in a thread; the exception it raised (None if none). Fails if it blocks."""
    out: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            out.append(None)
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=20)
    assert out, "blocked"
    return out[0]


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "a.sav"
    os.mkfifo(fifo)
    err = _returns_promptly(lambda: parse_save_image(fifo))
    assert isinstance(err, ImageError) and "not a regular file" in str(err)


def test_bad_fields_in_the_stream(tmp_path: Path) -> None:
    img = build_save_image(tmp_path / "a.sav")
    ram, bios = img.blocks[0], img.blocks[2]
    q = img.qemu_offset
    hdr_end = ram.bitmap_offset  # the mapped-ram header is the 28 bytes before the bitmap
    mr = hdr_end - 28
    cases: list[tuple[int, bytes, str]] = [
        (q, b"QEVX", "no QEMU stream"),
        (q + 4, struct.pack(">I", 2), "stream version 2"),
        (mr, struct.pack(">I", 2), "header version 2"),
        (mr + 4, struct.pack(">Q", 65536), "page size 65536"),
        (mr + 12, struct.pack(">Q", img.size + PAGE), ""),  # bitmap past the pages / EOF
        (mr + 20, struct.pack(">Q", ram.pages_offset + 512), "not 4096-aligned"),
        (mr + 20, struct.pack(">Q", 1 << 40), "truncated"),
        (mr + 20, struct.pack(">Q", ram.bitmap_offset), "overlaps"),
        (mr - 8, struct.pack(">Q", ram.spec.npages * PAGE + 100), "multiple"),
        (mr - 8, struct.pack(">Q", 1 << 45), ""),
        (img.ram_section_offset + 17, struct.pack(">Q", 4096 | 0x04), "more than the RAM total"),
        (img.ram_section_offset + 17, struct.pack(">Q", 1 << 20 | 0x08), "MEM_SIZE"),
        (img.ram_section_offset + 9, struct.pack(">I", 5), "instance 5"),
        (img.ram_section_offset + 13, struct.pack(">I", 5), "version 5"),
        (bios.header_offset, b"\x00", ""),
        (img.tail_offset, struct.pack(">Q", 0x08), "EOS"),
        (img.tail_offset + 9, struct.pack(">I", 99), "footer"),
    ]
    for k, (offset, data, words) in enumerate(cases):
        bad = _patched(img.path, tmp_path / f"bad{k}.sav", offset, data)
        _expect_image_error(bad, *([words] if words else []))


def test_bad_libvirt_data_area(tmp_path: Path) -> None:
    img = build_save_image(tmp_path / "a.sav")
    base = img.path.read_bytes()

    def with_header(name: str, **fields: int) -> Path:
        vals = list(struct.unpack_from("<16s5I14I", base, 0))
        order = ["magic", "version", "data_len", "was_running", "format", "cookie_offset"]
        for key, value in fields.items():
            vals[order.index(key)] = value
        return _patched(img.path, tmp_path / name, 0, struct.pack("<16s5I14I", *vals))

    _expect_image_error(with_header("d0.sav", data_len=0), "data_len")
    _expect_image_error(with_header("d1.sav", data_len=1 << 30), "data_len")
    _expect_image_error(with_header("d2.sav", data_len=img.data_len + 4), "no QEMU stream")
    _expect_image_error(with_header("c1.sav", cookie_offset=img.data_len + 10), "cookieOffset")
    _expect_image_error(with_header("r1.sav", was_running=7), "was_running")
    no_nul = _patched(img.path, tmp_path / "n.sav", 92, b"x" * img.data_len)
    _expect_image_error(no_nul, "NUL")
    bad_utf8 = _patched(img.path, tmp_path / "u.sav", 92, b"\xff\xfe<domain/>")
    _expect_image_error(bad_utf8, "UTF-8")


def _cut_points(img: BuiltImage) -> list[int]:
    """Every offset through the libvirt header, the stream prologue and the first block header,
    and the interesting places after it: inside bitmaps, inside pages, around the RAM end marker."""
    first = img.blocks[0]
    points = set(range(0, 100)) | set(range(img.qemu_offset - 2, first.bitmap_offset + 10))
    for b in img.blocks:
        if b.pages_offset:
            points |= {b.header_offset + 1, b.bitmap_offset + 3, b.pages_offset + 100}
            points.add(b.pages_offset + b.spec.npages * PAGE - 1)
    points |= set(range(img.tail_offset - 1, img.tail_offset + 13))
    return sorted(p for p in points if p < img.size)


def test_truncated_everywhere(tmp_path: Path) -> None:
    img = build_save_image(tmp_path / "a.sav")
    cut = tmp_path / "cut.sav"
    src = os.open(img.path, os.O_RDONLY)
    try:
        for point in _cut_points(img):
            if cut.exists():
                cut.unlink()
            dst = os.open(cut, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                copy_range(src, dst, 0, point)
                os.ftruncate(dst, point)
            finally:
                os.close(dst)
            with pytest.raises(ImageError) as ei:
                parse_save_image(cut)
            assert str(cut) in str(ei.value)
    finally:
        os.close(src)


def test_random_corruption_raises_only_image_error(tmp_path: Path) -> None:
    img = build_save_image(tmp_path / "a.sav")
    base = img.path.read_bytes()
    rnd = random.Random(1234)
    interesting = list(range(0, 92)) + list(range(img.qemu_offset, img.blocks[0].bitmap_offset + 8))
    interesting += [b.header_offset + k for b in img.blocks for k in range(40)]
    interesting += list(range(img.tail_offset, img.tail_offset + 13))
    bad = tmp_path / "fuzz.sav"
    src, dst = os.open(img.path, os.O_RDONLY), os.open(bad, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        copy_range(src, dst, 0, img.size)
        errors = 0
        for _ in range(1000):
            spots = [rnd.choice(interesting) for _ in range(rnd.randint(1, 4))]
            for spot in spots:
                os.pwrite(dst, bytes([rnd.randrange(256)]), spot)
            try:
                parse_save_image(bad)
            except ImageError:
                errors += 1
            for spot in spots:
                os.pwrite(dst, base[spot : spot + 1], spot)
    finally:
        os.close(src)
        os.close(dst)
    assert errors > 300


# ---------------------------------------------------------------- command line


def test_main_prints_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = build_save_image(tmp_path / "a.sav")
    assert saveimage.main([str(img.path)]) == 0
    out = capsys.readouterr().out
    assert "pc.ram" in out and "machine_type: pc-q35-10.0" in out and "non-ram regions" in out
    assert saveimage.main([str(img.path), "--json"]) == 0
    assert '"present_pages"' in capsys.readouterr().out
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello")
    assert saveimage.main([str(junk)]) == ImageError.exit_code
    assert "junk" in capsys.readouterr().err


# ---------------------------------------------------------------- writer side


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_punch_hole_and_writer(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom(16 * PAGE))
    with ImageWriter(p) as w:
        assert w.punch_hole(4 * PAGE, 8 * PAGE)
        w.write(5 * PAGE, b"x" * PAGE)
        w.truncate(20 * PAGE)
        assert w.size() == 20 * PAGE
        w.fsync()
    data = p.read_bytes()
    assert data[4 * PAGE : 5 * PAGE] == bytes(PAGE) and data[5 * PAGE : 6 * PAGE] == b"x" * PAGE
    assert data[6 * PAGE : 12 * PAGE] == bytes(6 * PAGE) and data[16 * PAGE :] == bytes(4 * PAGE)
    assert _allocated(p) <= 10 * PAGE
    with pytest.raises(ImageError, match="cannot open"):
        ImageWriter(tmp_path / "missing")


def test_punch_hole_falls_back_to_zeros(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    p = tmp_path / "f.bin"
    p.write_bytes(b"\xaa" * 4 * PAGE)

    def no_punch(*args: object) -> int:
        import ctypes

        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(saveimage, "_fallocate", no_punch)
    fd = os.open(p, os.O_RDWR)
    try:
        assert punch_hole(fd, PAGE, 2 * PAGE) is False
        assert punch_hole(fd, 3 * PAGE, 10 * PAGE) is False  # never grows the file
    finally:
        os.close(fd)
    assert p.read_bytes() == b"\xaa" * PAGE + bytes(3 * PAGE)


def test_copy_range_keeps_holes(tmp_path: Path) -> None:
    img = build_save_image(tmp_path / "a.sav")
    dst_path = tmp_path / "b.sav"
    dst_path.write_bytes(os.urandom(img.size // 2))  # junk everywhere, shorter
    src = os.open(img.path, os.O_RDONLY)
    dst = os.open(dst_path, os.O_RDWR)
    try:
        copy_range(src, dst, 0, img.size)
    finally:
        os.close(src)
        os.close(dst)
    assert dst_path.read_bytes() == img.path.read_bytes()
    assert abs(_allocated(dst_path) - _allocated(img.path)) <= 8 * PAGE


# ---- on real guests ------------------------------------------------------------------------------


def _patch_page_by_page(src_path: Path, dst_path: Path) -> int:
    """Make ``dst`` byte-identical to ``src`` with the reader and writer only: differing RAM pages
    written, pages that are zero in ``src`` punched out, non-RAM regions copied, size set."""
    changed = 0
    with SaveImage.open(src_path) as a, SaveImage.open(dst_path) as b, ImageWriter(dst_path) as w:
        assert [(x.name, x.pages_offset, x.used_length) for x in a.layout.blocks] == \
               [(x.name, x.pages_offset, x.used_length) for x in b.layout.blocks]
        for blk_a, blk_b in zip(a.layout.blocks, b.layout.blocks, strict=True):
            pa, pb = a.present(blk_a), b.present(blk_b)
            for n in range(blk_a.npages):
                if not pa[n]:
                    if pb[n]:
                        w.punch_hole(blk_a.page_offset(n), blk_a.page_size)
                        changed += 1
                    continue
                off, size = blk_a.page_offset(n), blk_a.page_size
                page = os.pread(a.fd, size, off)
                if not pb[n] or os.pread(b.fd, size, off) != page:
                    w.write(off, page)
                    changed += 1
        for start, end in a.layout.non_ram_regions():
            w.copy_from(a.fd, start, end)
        w.truncate(a.layout.file_size)
        w.fsync()
    return changed


@pytest.mark.vm
def test_patched_image_resumes_as_the_other_clone(make_clone: Callable[..., Machine], hv: Hypervisor,
                                                   tmp_path: Path) -> None:
    a, b = make_clone(), make_clone()
    for m, word in ((a, "alpha"), (b, "bravo")):
        m.wait_agent()
        m.exec(f"echo {word} > /dev/shm/who")           # memory only: tmpfs
    a_run = a.run_dir
    a.pause()
    shot_a = a.screenshot()
    a.save(tmp_path / "a.sav")
    b.save(tmp_path / "b.sav")
    patched = tmp_path / "b-patched.sav"
    shutil.copyfile(tmp_path / "b.sav", patched)
    changed = _patch_page_by_page(tmp_path / "a.sav", patched)
    assert changed > 0
    assert filecmp.cmp(tmp_path / "a.sav", patched, shallow=False)
    # the patched image now carries a's identity and disk: restore it and a's guest continues
    back = hv.restore(patched, paused=True)
    assert back.name == a.name and back.run_dir == a_run
    assert back.screenshot().rgb == shot_a.rgb
    back.resume()
    back.wait_agent()
    assert back.exec("cat /dev/shm/who").stdout == "alpha\n"
    assert back.exec("echo written-after-restore > /root/after.txt && sync && cat /root/after.txt").exit_code == 0


# -- fuzz: the target `make fuzz` runs on 100,000 inputs (bench/fuzz_targets), here on a few -------------

test_fuzz_save_image, test_fuzz_save_image_raw_bytes = fuzz_tests("save-image")
