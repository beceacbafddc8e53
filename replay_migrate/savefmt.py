"""The libvirt header of a save image: one codec for everything that reads or rewrites it.

Layout (libvirt ``qemu_saveimage.h``, DESIGN.md §5): a 92-byte little-endian header ``<16s5I14I``
(magic, version, data_len, was_running, format, cookieOffset, 14 unused words), then ``data_len``
bytes holding the domain XML, a NUL, the migration cookie (at ``cookieOffset``, when there is one),
a NUL and zero padding; the QEMU migration stream starts right after, at ``92 + data_len``.

Two readers need it: ``differ.saveimage`` (to find the QEMU stream of a memory image it hashes and
patches) and ``vm.machine`` (which rewrites the XML of every clone's copy *in place*: libvirt
refuses a renamed restore through ``dxml``, and the stream's mapped-ram offsets are absolute, so
the area must keep its size). Both go through :func:`read_header`, so both accept and refuse the
same files with the same words: every field is checked before use, the XML area is bounded by the
file's size before it is read, and the XML and cookie are decoded strictly, since
:func:`rewrite_xml` writes them back.

Standard library only (the shared root: the guest carries it too); the file I/O is in
:func:`read_fd`, :func:`read_header` and :func:`rewrite_xml`, the rest works on bytes.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import NamedTuple

from replay_migrate.errors import ImageError
from replay_migrate.safeopen import open_regular

HEADER = struct.Struct("<16s5I14I")
"""magic, version, data_len, was_running, format, cookieOffset, 14 unused words."""
MAGIC = b"LibvirtQemudSave"
PARTIAL_MAGIC = b"LibvirtQemudPart"
"""libvirt writes this magic first and :data:`MAGIC` only once QEMU has finished the save."""
MAGICS = (MAGIC, PARTIAL_MAGIC)
"""What the first 16 bytes of a libvirt save image hold, finished or not (format sniffing)."""
VERSION = 2
"""The only header version read: version 2 added the cookie, and libvirt refuses newer ones."""
FORMAT_SPARSE = 6
"""``image_format='sparse'``: QEMU's mapped-ram stream, the one format ``differ`` reads."""
FORMAT_NAMES = {0: "raw", 1: "gzip", 2: "bzip2", 3: "xz", 4: "lzop", 5: "zstd", 6: "sparse"}
DEFAULT_MAX_DATA_LEN = 16 << 20
"""Largest XML + cookie area accepted (libvirt leaves ~65 KB of room; anything huge is garbage). The
area is also bounded by the file's size before anything is read."""


@dataclass(frozen=True)
class SaveHeader:
    """A validated libvirt header with its domain XML and migration cookie."""

    magic: bytes
    version: int
    data_len: int
    was_running: bool
    format: int
    cookie_offset: int
    unused: tuple[int, ...]
    """The 14 reserved words, kept so that a rewrite writes back what libvirt wrote."""
    xml: str
    cookie: str | None
    """None when the header has no cookie (``cookieOffset`` 0)."""

    @property
    def qemu_offset(self) -> int:
        """File offset of the QEMU migration stream (the end of the XML area)."""
        return HEADER.size + self.data_len

    @property
    def format_name(self) -> str:
        return FORMAT_NAMES.get(self.format, "unknown")


class FixedHeader(NamedTuple):
    """The fixed 92 bytes, checked (what :func:`unpack_fixed` returns)."""

    magic: bytes
    version: int
    data_len: int
    was_running: bool
    format: int
    cookie_offset: int
    unused: tuple[int, ...]


def unpack_fixed(raw: bytes, where: str, *, file_size: int, max_data_len: int = DEFAULT_MAX_DATA_LEN) -> FixedHeader:
    """Check the fixed 92 bytes of a file of ``file_size`` bytes, ``where`` naming it in errors."""
    if len(raw) < HEADER.size:
        raise ImageError(f"{where}: truncated: too short for a libvirt save image ({len(raw)} bytes, "
                         f"its header alone has {HEADER.size})")
    magic, version, data_len, running, fmt, cookie_offset, *unused = HEADER.unpack(raw[: HEADER.size])
    if magic == PARTIAL_MAGIC:
        raise ImageError(f"{where}: incomplete save image: libvirt never finished writing it "
                         "(magic LibvirtQemudPart)")
    if magic != MAGIC:
        raise ImageError(f"{where}: not a libvirt save image (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise ImageError(f"{where}: libvirt save header version {version} not supported (this code reads "
                         f"version {VERSION})")
    if running not in (0, 1):
        raise ImageError(f"{where}: libvirt header was_running={running} is not a boolean")
    if not 0 < data_len <= max_data_len:
        raise ImageError(f"{where}: implausible XML area: libvirt header data_len {data_len} outside "
                         f"1..{max_data_len}")
    if HEADER.size + data_len > file_size:
        raise ImageError(f"{where}: truncated inside the domain XML area ({file_size} bytes, the header "
                         f"announces {HEADER.size + data_len})")
    return FixedHeader(magic, version, data_len, bool(running), fmt, cookie_offset, tuple(unused))


def _text(data: bytes, where: str, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ImageError(f"{where}: {what} is not UTF-8 ({e.reason} at byte {e.start})") from None


def unpack_area(fixed: FixedHeader, area: bytes, where: str) -> SaveHeader:
    """The header with the XML and cookie of its ``data_len``-byte ``area``."""
    if len(area) != fixed.data_len:
        raise ImageError(f"{where}: truncated inside the domain XML area ({len(area)} of {fixed.data_len} bytes)")
    end = area.find(b"\0")
    if end < 0:
        raise ImageError(f"{where}: domain XML is not terminated (no NUL inside the {fixed.data_len}-byte area)")
    if end == 0:
        raise ImageError(f"{where}: domain XML is empty")
    cookie: str | None = None
    if fixed.cookie_offset:
        if not end < fixed.cookie_offset < fixed.data_len:
            raise ImageError(f"{where}: cookie offset (cookieOffset) {fixed.cookie_offset} outside the XML "
                             f"area ({end + 1}..{fixed.data_len - 1})")
        cend = area.find(b"\0", fixed.cookie_offset)
        if cend < 0:
            raise ImageError(f"{where}: migration cookie is not NUL-terminated inside the XML area")
        cookie = _text(area[fixed.cookie_offset : cend], where, "migration cookie")
    return SaveHeader(fixed.magic, fixed.version, fixed.data_len, fixed.was_running, fixed.format,
                      fixed.cookie_offset, fixed.unused, _text(area[:end], where, "domain XML"), cookie)


def encode(header: SaveHeader, xml: str | None = None, *, was_running: bool | None = None) -> bytes:
    """The header and XML area of ``header`` (``header.qemu_offset`` bytes) with ``xml`` and
    ``was_running`` in place of its own; the cookie and every other field as they were."""
    xml = header.xml if xml is None else xml
    if "\0" in xml:
        raise ImageError("the new domain XML contains a NUL byte")
    xb = xml.encode() + b"\0"
    cb = b"" if header.cookie is None else header.cookie.encode() + b"\0"
    if len(xb) + len(cb) > header.data_len:
        raise ImageError(f"the new domain XML ({len(xb)} bytes) does not fit the header's "
                         f"{header.data_len - len(cb)} bytes")
    running = header.was_running if was_running is None else was_running
    fixed = HEADER.pack(header.magic, header.version, header.data_len, int(running), header.format,
                        len(xb) if header.cookie is not None else 0, *header.unused)
    return fixed + (xb + cb).ljust(header.data_len, b"\0")


def read_fd(fd: int, where: str, *, max_data_len: int = DEFAULT_MAX_DATA_LEN) -> SaveHeader:
    """Read and check the header of the open regular file ``fd`` (positioned reads only)."""
    try:
        size = os.fstat(fd).st_size
        fixed = unpack_fixed(os.pread(fd, HEADER.size, 0), where, file_size=size, max_data_len=max_data_len)
        area = os.pread(fd, fixed.data_len, HEADER.size)
    except OSError as e:
        raise ImageError(f"{where}: cannot read: {e.strerror}") from None
    return unpack_area(fixed, area, where)


def read_header(path: str | os.PathLike[str], *, max_data_len: int = DEFAULT_MAX_DATA_LEN) -> SaveHeader:
    """The checked header of the save image at ``path`` (a FIFO or device: refused, not waited on)."""
    where = os.fspath(path)
    fd, _ = open_regular(where, "save image", error=ImageError)
    try:
        return read_fd(fd, where, max_data_len=max_data_len)
    finally:
        os.close(fd)


def rewrite_xml(path: str | os.PathLike[str], xml: str, *, was_running: bool | None = None) -> None:
    """Replace the domain XML in the header of ``path`` without moving anything after it: read,
    checked and rewritten through one descriptor, then fsynced."""
    where = os.fspath(path)
    fd, _ = open_regular(where, "save image", error=ImageError, writable=True)
    try:
        header = read_fd(fd, where)
        try:
            blob = encode(header, xml, was_running=was_running)
        except ImageError as e:
            raise ImageError(f"{where}: {e}") from None
        try:
            if os.pwrite(fd, blob, 0) != len(blob):
                raise ImageError(f"{where}: short write of the libvirt header")
            os.fsync(fd)
        except OSError as e:
            raise ImageError(f"{where}: cannot rewrite the libvirt header: {e.strerror}") from None
    finally:
        os.close(fd)
