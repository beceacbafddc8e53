"""Reader and writer of libvirt's *sparse* save image (QEMU ``mapped-ram``), the memory image format.

Layout (DESIGN.md §5), every field validated, no offset hard-coded:

* the libvirt header and its XML area (``data_len`` bytes: the domain XML, NUL, the migration
  cookie, NUL, zero padding), read and checked by ``replay_migrate.savefmt``, the codec the VM layer
  rewrites clones' headers with; only the format is checked here (6 = sparse);
* the big-endian QEMU migration stream: ``QEVM``, version 3, the *configuration* section (machine
  type, migration capabilities), then the ``ram`` SECTION_START whose setup lists every RAM block as
  ``u8 len, idstr, be64 used_length, MappedRamHeader{be32 version, be64 page_size, be64
  bitmap_offset, be64 pages_offset}``. Offsets are absolute file offsets. Page N of a block lives at
  ``pages_offset + N * page_size``; bitmap bit N (little-endian bit order) says it is present; zero
  pages are never written (file holes, bit clear). The stream resumes at ``pages_offset +
  used_length`` with the next block header, and after the last block with the end of the RAM setup
  (``RAM_SAVE_FLAG_EOS``) followed by the device state up to the end of the file.

The writer side is plain sparse-file I/O (write, punch hole, copy a range keeping holes, truncate):
enough to make one image byte-identical to another, page by page.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import json
import os
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from replay_migrate import savefmt
from replay_migrate.errors import ImageError, ReplayMigrateError
from replay_migrate.safeopen import open_regular
from replay_migrate.savefmt import DEFAULT_MAX_DATA_LEN, FORMAT_SPARSE, SaveHeader
from replay_migrate.sparse import DEFAULT_COPY_CHUNK, data_extents, pwrite_all

QEMU_VM_FILE_MAGIC = b"QEVM"
QEMU_VM_FILE_VERSION = 3
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SUBSECTION = 0x05
QEMU_VM_CONFIGURATION = 0x07
QEMU_VM_SECTION_FOOTER = 0x7E
RAM_SECTION_IDSTR = b"ram"
RAM_SECTION_VERSION = 4
RAM_SAVE_FLAG_MEM_SIZE = 0x04
RAM_SAVE_FLAG_EOS = 0x10
RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x200
MAPPED_RAM_HEADER = struct.Struct(">IQQQ")
MAPPED_RAM_HDR_VERSION = 1
PAGE_SIZE = 4096
"""The only target page size accepted: leaves are 4 KiB pages, so pages must line up with them."""
PAGE_BITS = 12
"""log2 of PAGE_SIZE: the only value the ``configuration/target-page-bits`` field may hold."""

DEFAULT_MAX_RAM_BLOCKS = 4096
"""Most RAM blocks accepted (a PC guest has ~10; the bound stops a garbage walk early)."""
MAX_CAPABILITIES = 256
"""Most migration capabilities a configuration section may list (QEMU knows ~25)."""
MAX_MACHINE_TYPE_LEN = 256
"""Longest machine type name accepted (QEMU's are ~12 characters, e.g. ``pc-q35-10.0``)."""
MAX_RAM_TOTAL = 1 << 44
"""Largest RAM total a stream may announce (16 TiB). Blocks that are in the file are bounded by the
file's size; only ``x-ignore-shared`` blocks (not in the file) can add more, up to this."""
MAX_RAM_CANDIDATES = 16
"""Most ``ram`` section candidates the bounded search tries (a real stream has one): each failed
candidate costs a walk over its blocks, so a file full of the pattern cannot make the search slow."""
DEFAULT_MAX_SCAN = 4 << 20
"""Bytes after the stream header searched for the ``ram`` section when the structured walk meets a
section it cannot skip (an unknown configuration subsection, an early device section)."""

_U8 = struct.Struct(">B")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_RAM_PATTERN = bytes([len(RAM_SECTION_IDSTR)]) + RAM_SECTION_IDSTR + _BE32.pack(0) + _BE32.pack(RAM_SECTION_VERSION)
"""``u8 len, "ram", be32 instance_id 0, be32 version_id 4`` as it follows a SECTION_START byte and id."""


@dataclass(frozen=True)
class RamBlock:
    """One QEMU RAM block of a mapped-ram stream (``pc.ram``, ``pc.bios``, ``vga.vram``, ...)."""

    name: str
    used_length: int
    header_offset: int
    """File offset of the block's header in the stream (its idstr length byte)."""
    page_size: int
    bitmap_offset: int
    pages_offset: int
    ignored: bool = False
    """x-ignore-shared left the block out of the file (offsets 0, no bitmap, no pages)."""

    @property
    def npages(self) -> int:
        return self.used_length // self.page_size

    @property
    def bitmap_size(self) -> int:
        """Bytes of bitmap QEMU writes: whole 64-bit words, one bit per page."""
        return 0 if self.ignored else (self.npages + 63) // 64 * 8

    @property
    def pages_end(self) -> int:
        return self.pages_offset + (0 if self.ignored else self.used_length)

    def page_offset(self, n: int) -> int:
        """File offset of page ``n``."""
        if not 0 <= n < self.npages or self.ignored:
            raise ValueError(f"page {n} outside RAM block {self.name} ({self.npages} pages)")
        return self.pages_offset + n * self.page_size


@dataclass(frozen=True)
class SaveLayout:
    """Everything the parser learnt about one save image; offsets are absolute file offsets."""

    path: str
    file_size: int
    header: SaveHeader
    """The libvirt header, with the domain XML and the migration cookie."""
    qemu_offset: int
    stream_version: int
    machine_type: str | None
    capabilities: tuple[str, ...]
    ram_section_offset: int
    ram_section_id: int
    ram_total: int
    blocks: tuple[RamBlock, ...]
    device_state_offset: int
    """Where the stream resumes after the last block's pages: the RAM setup's end, then device state."""
    structured_walk: bool = field(default=True)
    """False when the ``ram`` section was found by the bounded search rather than by walking to it."""

    @property
    def xml(self) -> str:
        return self.header.xml

    @property
    def cookie(self) -> str | None:
        return self.header.cookie

    def ram_regions(self) -> list[tuple[int, int]]:
        """``(start, end)`` of every block's page area, in file order."""
        return [(b.pages_offset, b.pages_end) for b in self.blocks if not b.ignored]

    def non_ram_regions(self) -> list[tuple[int, int]]:
        """``(start, end)`` of everything that is not guest RAM pages: header, XML, stream prologue
        with the bitmaps, block headers, device-state tail. Small; copied whole when patching."""
        out: list[tuple[int, int]] = []
        pos = 0
        for start, end in self.ram_regions():
            if start > pos:
                out.append((pos, start))
            pos = end
        if pos < self.file_size:
            out.append((pos, self.file_size))
        return out

    def block_at(self, offset: int) -> RamBlock | None:
        """The RAM block whose page area holds file ``offset``, or None."""
        for b in self.blocks:
            if not b.ignored and b.pages_offset <= offset < b.pages_end:
                return b
        return None


class _Cursor:
    """Bounds-checked big-endian reads at a file position; every overrun is an ImageError."""

    def __init__(self, fd: int, path: str, size: int, pos: int) -> None:
        self.fd, self.path, self.size, self.pos = fd, path, size, pos

    def fail(self, what: str) -> ImageError:
        return ImageError(f"{self.path}: {what}")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated: {what} at offset {self.pos} needs {n} bytes, the file has {self.size}")
        data = os.pread(self.fd, n, self.pos)
        if len(data) != n:
            raise self.fail(f"short read of {what} at offset {self.pos} (file changed while reading?)")
        self.pos += n
        return data

    def u8(self, what: str) -> int:
        return int(self.take(1, what)[0])

    def peek_u8(self, what: str) -> int:
        value = self.u8(what)
        self.pos -= 1
        return value

    def be32(self, what: str) -> int:
        value: int = _BE32.unpack(self.take(4, what))[0]
        return value

    def be64(self, what: str) -> int:
        value: int = _BE64.unpack(self.take(8, what))[0]
        return value

    def idstr(self, what: str) -> bytes:
        return self.take(self.u8(f"{what} length"), what)


def _parse_configuration(cur: _Cursor) -> tuple[str | None, tuple[str, ...], bool]:
    """Walk the optional configuration section; return (machine type, capabilities, walked fully).

    Its fields are fixed (be32 len, name) but its subsections are only skippable when known."""
    if cur.peek_u8("stream section type") != QEMU_VM_CONFIGURATION:
        return None, (), True
    cur.pos += 1
    name_len = cur.be32("machine type length")
    if name_len > MAX_MACHINE_TYPE_LEN:
        raise cur.fail(f"machine type of {name_len} bytes (at most {MAX_MACHINE_TYPE_LEN} expected)")
    name = cur.take(name_len, "machine type").decode("ascii", "replace")
    caps: list[str] = []
    while cur.peek_u8("stream section type") == QEMU_VM_SUBSECTION:
        cur.pos += 1
        sub = cur.idstr("configuration subsection name")
        cur.be32("configuration subsection version")
        if sub == b"configuration/target-page-bits":
            bits = cur.be32("target page bits")
            if bits != PAGE_BITS:  # compare the exponent: 1 << bits of a 32-bit field is 512 MiB
                raise cur.fail(f"target page bits {bits}, expected {PAGE_BITS} ({PAGE_SIZE}-byte pages)")
        elif sub == b"configuration/capabilities":
            count = cur.be32("capability count")
            if count > MAX_CAPABILITIES:
                raise cur.fail(f"{count} migration capabilities listed (at most {MAX_CAPABILITIES} expected)")
            for _ in range(count):
                cap = cur.idstr("capability")
                if not cap:
                    raise cur.fail("empty migration capability name")
                caps.append(cap.decode("ascii", "replace"))
        elif sub == b"configuration/uuid":
            cur.take(16, "configuration uuid")
        else:
            return name, tuple(caps), False
    return name, tuple(caps), True


def _parse_ram_section(cur: _Cursor, caps: Sequence[str], max_blocks: int) -> tuple[int, int, int, list[RamBlock], int]:
    """Parse from a SECTION_START of ``ram``; return (section offset, id, total, blocks, tail)."""
    section_offset = cur.pos
    if cur.u8("section type") != QEMU_VM_SECTION_START:
        raise cur.fail(f"expected the ram SECTION_START at offset {section_offset}")
    section_id = cur.be32("section id")
    idstr = cur.idstr("section idstr")
    if idstr != RAM_SECTION_IDSTR:
        raise cur.fail(f"first live section at offset {section_offset} is {idstr!r}, not 'ram'")
    instance_id, version_id = cur.be32("instance id"), cur.be32("section version")
    if instance_id != 0 or version_id != RAM_SECTION_VERSION:
        raise cur.fail(f"ram section instance {instance_id} version {version_id}, expected 0 and 4")
    flags = cur.be64("RAM total size")
    if flags & (PAGE_SIZE - 1) != RAM_SAVE_FLAG_MEM_SIZE:
        raise cur.fail(f"ram section does not start with RAM_SAVE_FLAG_MEM_SIZE (got {flags:#x})")
    total = flags & ~(PAGE_SIZE - 1)
    ignore_shared = "x-ignore-shared" in caps
    # every block's pages lie inside the file unless x-ignore-shared leaves some out
    limit = MAX_RAM_TOTAL if ignore_shared else min(cur.size, MAX_RAM_TOTAL)
    if not 0 < total <= limit:
        raise cur.fail(f"RAM total {total} outside 1..{limit} (the file has {cur.size} bytes)")
    blocks: list[RamBlock] = []
    acc = 0
    while acc < total:
        if len(blocks) >= max_blocks:
            raise cur.fail(f"more than {max_blocks} RAM blocks")
        header_offset = cur.pos
        raw_name = cur.idstr("RAM block name")
        try:
            name = raw_name.decode("ascii")
        except UnicodeDecodeError:
            raise cur.fail(f"RAM block name at offset {header_offset} is not ASCII") from None
        if not name or not name.isprintable():
            raise cur.fail(f"RAM block name {raw_name!r} at offset {header_offset} is empty or unprintable")
        used = cur.be64(f"used_length of RAM block {name}")
        if ignore_shared:
            cur.be64(f"guest address of RAM block {name}")
        hver, psize, bmoff, pgoff = MAPPED_RAM_HEADER.unpack(cur.take(MAPPED_RAM_HEADER.size, "mapped-ram header"))
        where = f"RAM block {name} (header at offset {header_offset})"
        if hver == 0 or hver > MAPPED_RAM_HDR_VERSION:
            raise cur.fail(f"{where}: mapped-ram header version {hver} not supported")
        if psize != PAGE_SIZE:
            raise cur.fail(f"{where}: page size {psize}, expected {PAGE_SIZE}")
        if used == 0 or used % PAGE_SIZE:
            raise cur.fail(f"{where}: used_length {used} is not a positive multiple of {PAGE_SIZE}")
        acc += used
        if acc > total:
            raise cur.fail(f"{where}: blocks add up to {acc} bytes, more than the RAM total {total}")
        if ignore_shared and bmoff == 0 and pgoff == 0:
            blocks.append(RamBlock(name, used, header_offset, psize, 0, 0, ignored=True))
            continue
        block = RamBlock(name, used, header_offset, psize, bmoff, pgoff)
        if bmoff < cur.pos:
            raise cur.fail(f"{where}: bitmap offset {bmoff} lies before the end of its header ({cur.pos})")
        if bmoff + block.bitmap_size > pgoff:
            raise cur.fail(f"{where}: bitmap at {bmoff} ({block.bitmap_size} bytes) overlaps pages at {pgoff}")
        if pgoff % PAGE_SIZE:
            raise cur.fail(f"{where}: pages offset {pgoff} is not {PAGE_SIZE}-aligned")
        if block.pages_end > cur.size:
            raise cur.fail(f"truncated: {where} pages end at {block.pages_end}, the file has {cur.size}")
        blocks.append(block)
        cur.pos = block.pages_end
    tail = cur.pos
    flags = cur.be64("end of the RAM setup")
    if flags == RAM_SAVE_FLAG_MULTIFD_FLUSH:
        flags = cur.be64("end of the RAM setup")
    if flags != RAM_SAVE_FLAG_EOS:
        raise cur.fail(f"RAM setup does not end with RAM_SAVE_FLAG_EOS at offset {tail} (got {flags:#x})")
    if cur.pos < cur.size and cur.peek_u8("section footer") == QEMU_VM_SECTION_FOOTER:
        cur.pos += 1
        if cur.be32("section footer id") != section_id:
            raise cur.fail(f"ram section footer at offset {cur.pos - 5} names another section")
    if cur.pos >= cur.size:
        raise cur.fail(f"truncated: no device state after the RAM section (file ends at {cur.size})")
    return section_offset, section_id, total, blocks, tail


def parse_save_image(
    path: str | os.PathLike[str],
    *,
    max_data_len: int = DEFAULT_MAX_DATA_LEN,
    max_ram_blocks: int = DEFAULT_MAX_RAM_BLOCKS,
    max_scan: int = DEFAULT_MAX_SCAN,
) -> SaveLayout:
    """Parse and validate the layout of a sparse save image; ImageError says what is wrong."""
    spath = os.fspath(path)
    fd, _ = open_regular(spath, "save image", error=ImageError)   # a FIFO or device: refused, not waited on
    try:
        return _parse_fd(fd, spath, max_data_len, max_ram_blocks, max_scan)
    except OSError as e:
        raise ImageError(f"{spath}: cannot read save image: {e.strerror}") from None
    finally:
        os.close(fd)



def _parse_fd(fd: int, path: str, max_data_len: int, max_blocks: int, max_scan: int) -> SaveLayout:
    st = os.fstat(fd)
    cur = _Cursor(fd, path, st.st_size, 0)
    header = savefmt.read_fd(fd, path, max_data_len=max_data_len)
    if header.format != FORMAT_SPARSE:
        raise cur.fail(f"save image format {header.format} ({header.format_name}), not the sparse mapped-ram "
                       f"format {FORMAT_SPARSE}: save with image_format='sparse'")
    qemu_offset = cur.pos = header.qemu_offset
    magic = cur.take(4, "QEMU stream magic")
    if magic != QEMU_VM_FILE_MAGIC:
        raise cur.fail(f"no QEMU stream after the libvirt header (offset {qemu_offset}: {magic!r})")
    stream_version = cur.be32("QEMU stream version")
    if stream_version != QEMU_VM_FILE_VERSION:
        raise cur.fail(f"QEMU stream version {stream_version} not supported (expected {QEMU_VM_FILE_VERSION})")
    machine, caps, walked = _parse_configuration(cur)
    if machine is not None and walked and "mapped-ram" not in caps:
        raise cur.fail("the QEMU stream was not written with the mapped-ram capability")
    if walked:
        parsed = _parse_ram_section(cur, caps, max_blocks)
    else:
        parsed = _search_ram_section(cur, caps, max_blocks, max_scan)
    section_offset, section_id, total, blocks, tail = parsed
    return SaveLayout(
        path=path,
        file_size=st.st_size,
        header=header,
        qemu_offset=qemu_offset,
        stream_version=stream_version,
        machine_type=machine,
        capabilities=caps,
        ram_section_offset=section_offset,
        ram_section_id=section_id,
        ram_total=total,
        blocks=tuple(blocks),
        device_state_offset=tail,
        structured_walk=walked,
    )


def _search_ram_section(
    cur: _Cursor, caps: Sequence[str], max_blocks: int, max_scan: int
) -> tuple[int, int, int, list[RamBlock], int]:
    """Find the ``ram`` SECTION_START by its exact header within ``max_scan`` bytes; every candidate
    must then parse and validate as a whole RAM section (the prototype's proven approach)."""
    start = cur.pos
    window = os.pread(cur.fd, max(0, min(max_scan, cur.size - start)), start)
    first_error: ImageError | None = None
    tried = 0
    pos = window.find(_RAM_PATTERN)
    while pos >= 0 and tried < MAX_RAM_CANDIDATES:
        if pos >= 5 and window[pos - 5] == QEMU_VM_SECTION_START:
            tried += 1
            cur.pos = start + pos - 5
            try:
                return _parse_ram_section(cur, caps, max_blocks)
            except ImageError as e:
                first_error = first_error or e
        pos = window.find(_RAM_PATTERN, pos + 1)
    if first_error is not None:
        raise first_error
    raise cur.fail(f"no ram section within {max_scan} bytes of the QEMU stream header")


class SaveImage:
    """An open sparse save image: its layout and its per-block page bitmaps."""

    def __init__(self, layout: SaveLayout, fd: int) -> None:
        self.layout = layout
        self._fd = fd

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        max_data_len: int = DEFAULT_MAX_DATA_LEN,
        max_ram_blocks: int = DEFAULT_MAX_RAM_BLOCKS,
        max_scan: int = DEFAULT_MAX_SCAN,
    ) -> SaveImage:
        layout = parse_save_image(path, max_data_len=max_data_len, max_ram_blocks=max_ram_blocks, max_scan=max_scan)
        fd, st = open_regular(layout.path, "save image", error=ImageError)
        if st.st_size != layout.file_size:
            os.close(fd)
            raise ImageError(f"{layout.path}: changed size while being opened")
        return cls(layout, fd)

    @property
    def fd(self) -> int:
        return self._fd

    def block(self, name: str) -> RamBlock:
        for b in self.layout.blocks:
            if b.name == name:
                return b
        raise KeyError(name)

    def present(self, block: RamBlock) -> npt.NDArray[np.bool_]:
        """One bool per page: True where the bitmap says the page is in the file."""
        if block.ignored:  # not in the file: a read-only view, no allocation of its (unbounded) size
            return np.broadcast_to(np.False_, (block.npages,))
        raw = os.pread(self._fd, block.bitmap_size, block.bitmap_offset)
        if len(raw) != block.bitmap_size:
            raise ImageError(f"{self.layout.path}: short read of the bitmap of RAM block {block.name}")
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
        return bits[: block.npages].astype(np.bool_)

    def iter_pages(self, block: RamBlock) -> Iterator[tuple[int, bool]]:
        """Yield ``(page number, present)`` for every page of ``block``; absent pages are zero."""
        for n, bit in enumerate(self.present(block).tolist()):
            yield n, bool(bit)

    def read_page(self, block: RamBlock, n: int) -> bytes:
        """The page's bytes as the guest sees them (zeros for an absent page, without reading)."""
        if not self.present(block)[n]:
            return bytes(block.page_size)
        data = os.pread(self._fd, block.page_size, block.page_offset(n))
        if len(data) != block.page_size:
            raise ImageError(f"{self.layout.path}: short read of page {n} of RAM block {block.name}")
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SaveImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- writer side: sparse-file I/O

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
_fallocate.restype = ctypes.c_int


def _write_zeros(fd: int, offset: int, length: int, chunk: int = DEFAULT_COPY_CHUNK) -> None:
    zeros = bytes(min(chunk, length))
    while length > 0:
        n = min(len(zeros), length)
        pwrite_all(fd, zeros[:n] if n < len(zeros) else zeros, offset)
        offset += n
        length -= n


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Make ``[offset, offset+length)`` read as zeros, as a hole when the file system can
    (fallocate PUNCH_HOLE|KEEP_SIZE); else write zeros. Returns True when a hole was punched.

    Writes zeros only inside the file: punching never changes its size."""
    if length <= 0:
        return True
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise OSError(err, os.strerror(err))
    size = os.fstat(fd).st_size
    if offset < size:
        _write_zeros(fd, offset, min(length, size - offset))
    return False


def copy_range(src_fd: int, dst_fd: int, start: int, end: int, *, chunk: int = DEFAULT_COPY_CHUNK) -> None:
    """Make ``dst[start:end]`` equal ``src[start:end]``: data extents copied (in-kernel where
    possible), the source's holes punched in the destination so it stays as sparse as the source."""
    pos = start
    for dstart, dend in data_extents(src_fd, start, end):
        if dstart > pos:
            punch_hole(dst_fd, pos, dstart - pos)
        _copy_data(src_fd, dst_fd, dstart, dend, chunk)
        pos = dend
    if pos < end:
        punch_hole(dst_fd, pos, end - pos)


def _copy_data(src_fd: int, dst_fd: int, start: int, end: int, chunk: int) -> None:
    pos = start
    while pos < end:
        n = min(chunk, end - pos)
        try:
            done = os.copy_file_range(src_fd, dst_fd, n, pos, pos)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
                raise
            done = 0
        if done <= 0:
            data = os.pread(src_fd, n, pos)
            if not data:
                raise OSError(errno.EIO, f"source ended at {pos} while copying up to {end}")
            pwrite_all(dst_fd, data, pos)
            done = len(data)
        pos += done


class ImageWriter:
    """Write access to one image file for patching: pages, holes, copied ranges, the size.

    Errors name the file (ImageError). It writes in place: callers give it a copy (see
    ``differ.patch``) so the original changes only on commit."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self._fd = os.open(self.path, os.O_RDWR)
        except OSError as e:
            raise ImageError(f"{self.path}: cannot open for writing: {e.strerror}") from None

    @property
    def fd(self) -> int:
        return self._fd

    def _fail(self, what: str, e: OSError) -> ImageError:
        return ImageError(f"{self.path}: {what} failed: {e.strerror or e}")

    def write(self, offset: int, data: bytes | memoryview) -> None:
        try:
            pwrite_all(self._fd, data, offset)
        except OSError as e:
            raise self._fail(f"writing {len(data)} bytes at {offset}", e) from None

    def punch_hole(self, offset: int, length: int) -> bool:
        """Zero a range as a hole where possible (see :func:`punch_hole`)."""
        try:
            return punch_hole(self._fd, offset, length)
        except OSError as e:
            raise self._fail(f"punching a hole at {offset}+{length}", e) from None

    def copy_from(self, src_fd: int, start: int, end: int, *, chunk: int = DEFAULT_COPY_CHUNK) -> None:
        """Copy ``[start, end)`` of another open file here, holes included."""
        try:
            copy_range(src_fd, self._fd, start, end, chunk=chunk)
        except OSError as e:
            raise self._fail(f"copying bytes {start}..{end}", e) from None

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
        except OSError as e:
            raise self._fail(f"setting the size to {size}", e) from None

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def fsync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise self._fail("fsync", e) from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- command line


def _layout_json(img: SaveImage) -> dict[str, Any]:
    lay = img.layout
    blocks = []
    for b in lay.blocks:
        present = 0 if b.ignored else int(img.present(b).sum())
        blocks.append(
            {
                "name": b.name,
                "used_length": b.used_length,
                "npages": b.npages,
                "present_pages": present,
                "bitmap_offset": b.bitmap_offset,
                "pages_offset": b.pages_offset,
                "ignored": b.ignored,
            }
        )
    return {
        "path": lay.path,
        "file_size": lay.file_size,
        "libvirt": {
            "version": lay.header.version,
            "data_len": lay.header.data_len,
            "was_running": lay.header.was_running,
            "format": lay.header.format,
            "cookie_offset": lay.header.cookie_offset,
        },
        "xml_chars": len(lay.xml),
        "cookie_chars": len(lay.cookie or ""),
        "qemu_offset": lay.qemu_offset,
        "stream_version": lay.stream_version,
        "machine_type": lay.machine_type,
        "capabilities": list(lay.capabilities),
        "ram_section_offset": lay.ram_section_offset,
        "ram_total": lay.ram_total,
        "device_state_offset": lay.device_state_offset,
        "structured_walk": lay.structured_walk,
        "blocks": blocks,
        "non_ram_regions": lay.non_ram_regions(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m differ.saveimage FILE [--json]``: print the parsed layout of a save image."""
    ap = argparse.ArgumentParser(prog="python -m differ.saveimage", description=main.__doc__)
    ap.add_argument("file")
    ap.add_argument("--json", action="store_true", help="print the layout as JSON")
    args = ap.parse_args(argv)
    try:
        with SaveImage.open(args.file) as img:
            info = _layout_json(img)
    except ReplayMigrateError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    for key, value in info.items():
        if key not in ("blocks", "non_ram_regions"):
            print(f"{key}: {value}")
    for b in info["blocks"]:
        print(
            f"  block {b['name']:<28} used={b['used_length']:>11} pages={b['npages']:>8} "
            f"present={b['present_pages']:>8} bitmap@{b['bitmap_offset']:#x} pages@{b['pages_offset']:#x}"
            + (" (ignored)" if b["ignored"] else "")
        )
    total = sum(e - s for s, e in info["non_ram_regions"])
    print(f"non-ram regions: {len(info['non_ram_regions'])}, {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
