"""The libvirt part of a save image: read its header and rewrite the domain XML *in place*.

libvirt refuses to restore a save image under another name or UUID through ``dxml`` (its ABI
stability check), yet every clone of a checkpoint needs its own name, UUID, disk and socket paths.
What works (DESIGN.md §5) is rewriting the XML inside the header while keeping ``data_len``: the
QEMU stream that follows starts at ``92 + data_len`` and its mapped-ram offsets are absolute, so
the header must not grow or shrink. The XML area has tens of KB of padding for this.

Only the libvirt header is handled here; the QEMU stream is ``differ.saveimage``'s business.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from replay_migrate.errors import ImageError
from replay_migrate.safeopen import open_regular

HEADER = struct.Struct("<16s5I14I")
"""magic, version, data_len, was_running, format, cookieOffset, 14 unused words."""
MAGIC = b"LibvirtQemudSave"
PARTIAL_MAGIC = b"LibvirtQemudPart"
"""libvirt writes this magic first and :data:`MAGIC` only once QEMU has finished the save."""
MAGICS = (MAGIC, PARTIAL_MAGIC)
VERSION = 2
"""The only header version read: version 2 added the cookie, and libvirt refuses newer ones."""
MAX_DATA_LEN = 64 << 20
"""Sanity bound on the XML + cookie area, so a corrupt header cannot make us read gigabytes
(it is also bounded by the file's size before anything is read)."""


@dataclass(frozen=True)
class SaveHeader:
    magic: bytes
    version: int
    data_len: int
    was_running: int
    format: int
    cookie_offset: int
    unused: tuple[int, ...]
    xml: str
    cookie: str



def _decode(data: bytes, path: Path, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ImageError(f"{path}: {what} is not UTF-8 ({e.reason} at byte {e.start})") from None


def read_header(path: Path) -> SaveHeader:
    """Parse the libvirt header and the domain XML of the save image at ``path``.

    Every field is checked before use: the XML area against the file's size before it is read,
    and the XML and cookie decoded strictly, since :func:`rewrite_xml` writes them back."""
    fd, _ = open_regular(path, "save image", error=ImageError)   # a FIFO or device: refused, not waited on
    try:
        size = os.fstat(fd).st_size
        raw = os.pread(fd, HEADER.size, 0)
        if len(raw) < HEADER.size:
            raise ImageError(f"{path}: too short for a libvirt save image ({len(raw)} bytes)")
        magic, version, data_len, running, fmt, cookie_off, *unused = HEADER.unpack(raw)
        if magic == PARTIAL_MAGIC:
            raise ImageError(f"{path}: incomplete save image (libvirt never finished writing it)")
        if magic != MAGIC:
            raise ImageError(f"{path}: not a libvirt save image (magic {magic!r})")
        if version != VERSION:
            raise ImageError(f"{path}: libvirt save header version {version}, this code reads {VERSION}")
        if running not in (0, 1):
            raise ImageError(f"{path}: libvirt header was_running={running} is not a boolean")
        if not 0 < data_len <= MAX_DATA_LEN:
            raise ImageError(f"{path}: implausible XML area of {data_len} bytes")
        if HEADER.size + data_len > size:
            raise ImageError(f"{path}: truncated inside the domain XML area ({size} bytes, the header "
                             f"announces {HEADER.size + data_len})")
        data = os.pread(fd, data_len, HEADER.size)
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror}") from e
    finally:
        os.close(fd)
    if len(data) < data_len:
        raise ImageError(f"{path}: truncated inside the domain XML area")
    end = data.find(b"\0")
    if end < 0:
        raise ImageError(f"{path}: domain XML is not terminated")
    cookie = ""
    if cookie_off:
        if not end < cookie_off < data_len:
            raise ImageError(f"{path}: cookie offset {cookie_off} outside the XML area")
        cend = data.find(b"\0", cookie_off)
        if cend < 0:
            raise ImageError(f"{path}: migration cookie is not NUL-terminated inside the XML area")
        cookie = _decode(data[cookie_off:cend], path, "migration cookie")
    return SaveHeader(magic, version, data_len, running, fmt, cookie_off, tuple(unused),
                      _decode(data[:end], path, "domain XML"), cookie)


def rewrite_xml(path: Path, xml: str, *, was_running: int | None = None) -> None:
    """Replace the domain XML in the header of ``path`` without moving anything after it."""
    h = read_header(path)
    if "\0" in xml:
        raise ImageError(f"{path}: new domain XML contains a NUL byte")
    xb = xml.encode() + b"\0"
    cb = h.cookie.encode() + b"\0" if h.cookie_offset else b""
    if len(xb) + len(cb) > h.data_len:
        raise ImageError(f"{path}: new domain XML ({len(xb)} bytes) does not fit the header's "
                         f"{h.data_len - len(cb)} bytes")
    data = (xb + cb).ljust(h.data_len, b"\0")
    head = HEADER.pack(h.magic, h.version, h.data_len,
                       h.was_running if was_running is None else was_running, h.format,
                       len(xb) if h.cookie_offset else 0, *h.unused)
    blob = head + data
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            if os.pwrite(fd, blob, 0) != len(blob):
                raise ImageError(f"{path}: short write of the libvirt header")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise ImageError(f"{path}: cannot rewrite the libvirt header: {e.strerror}") from None
