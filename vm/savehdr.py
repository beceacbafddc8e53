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

HEADER = struct.Struct("<16s5I14I")
"""magic, version, data_len, was_running, format, cookieOffset, 14 unused words."""
MAGICS = (b"LibvirtQemudSave", b"LibvirtQemudPart")
MAX_DATA_LEN = 64 << 20
"""Sanity bound on the XML + cookie area, so a corrupt header cannot make us read gigabytes."""


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


def read_header(path: Path) -> SaveHeader:
    """Parse the libvirt header and the domain XML of the save image at ``path``."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER.size)
            if len(raw) < HEADER.size:
                raise ImageError(f"{path}: too short for a libvirt save image ({len(raw)} bytes)")
            magic, version, data_len, running, fmt, cookie_off, *unused = HEADER.unpack(raw)
            if magic not in MAGICS:
                raise ImageError(f"{path}: not a libvirt save image (magic {magic!r})")
            if not 0 < data_len <= MAX_DATA_LEN:
                raise ImageError(f"{path}: implausible XML area of {data_len} bytes")
            data = f.read(data_len)
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror}") from e
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
        cookie = data[cookie_off : cend if cend >= 0 else data_len].decode("utf-8", "replace")
    return SaveHeader(magic, version, data_len, running, fmt, cookie_off, tuple(unused),
                      data[:end].decode("utf-8", "replace"), cookie)


def rewrite_xml(path: Path, xml: str, *, was_running: int | None = None) -> None:
    """Replace the domain XML in the header of ``path`` without moving anything after it."""
    h = read_header(path)
    xb = xml.encode() + b"\0"
    cb = h.cookie.encode() + b"\0" if h.cookie_offset else b""
    if len(xb) + len(cb) > h.data_len:
        raise ImageError(f"{path}: new domain XML ({len(xb)} bytes) does not fit the header's "
                         f"{h.data_len - len(cb)} bytes")
    data = (xb + cb).ljust(h.data_len, b"\0")
    head = HEADER.pack(h.magic, h.version, h.data_len,
                       h.was_running if was_running is None else was_running, h.format,
                       len(xb) if h.cookie_offset else 0, *h.unused)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, head + data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
