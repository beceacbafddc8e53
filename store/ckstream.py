"""The checkpoint stream: one checkpoint as a single byte stream, to move it to another site
(``replay-migrate checkpoint export C | ssh siteb replay-migrate checkpoint import``). Sans-I/O:
:class:`StreamEncoder` turns a manifest and file contents into bytes, :class:`StreamDecoder` turns
bytes into events; ``store.exchange`` does the reading and writing of files around them.

Layout (little-endian)::

    header    "RMCKPT\\r\\n", u16 version (1), u16 flags (0)
    record*   u8 kind, u32 body length, body
      MANIFEST  (first, once) canonical JSON: the checkpoint's identity, both root hashes, the
                base image's identity, and each file's apparent size and the most bytes it carries
      DATA      u8 file, u64 offset, u32 span, a bitmap of the span's 4 KiB pages, one zstd frame
                holding the pages whose bit is set, concatenated. Holes and all-zero pages have no
                bit: they are never sent and never written (the imported file is sparse again).
                Within a file the spans ascend and do not overlap.
      END       (last, once) blake3 of every byte before this record; nothing may follow it

Every number read is hostile until checked: a record's length is bounded by its kind before the
decoder waits for (and buffers) its body; a span by :attr:`StreamLimits.max_span`; a file's size and
the data it may carry by the manifest, whose figures are bounded by :class:`StreamLimits`; a zstd
frame must declare exactly the bytes its bitmap says (``differ.bounded``), so nothing inflates past
what was checked. The END digest catches a flipped byte anywhere (header, manifest, payload) and a
cut after a record boundary; it does not authenticate: whoever can write the stream can recompute
it, so the importer also checks the checkpoint itself (its root hashes, the base image, the domain
it would start) before it becomes usable.
"""

from __future__ import annotations

import enum
import json
import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import blake3
import numpy as np
import numpy.typing as npt
import zstandard

from differ.bounded import decompress_exact
from replay_migrate.errors import BadNameError, CheckpointError, VerificationError
from store.paths import check_name

MAGIC = b"RMCKPT\r\n"
"""The stream's first bytes (the CR LF catches a stream that went through a text-mode conversion)."""
VERSION = 1
HEADER = struct.Struct("<8sHH")
RECORD = struct.Struct("<BI")
DATA_HEAD = struct.Struct("<BQI")
DIGEST_SIZE = 32
PAGE = 4096
FORMAT = "replay-migrate checkpoint"
FILES = ("memory.sav", "disk.qcow2", "screen.png")
"""The files a stream may carry, in the order (and with the index) it carries them."""
REQUIRED_FILES = ("memory.sav", "disk.qcow2")
ZSTD_LEVEL = 3
"""Export compression: ~3x on a desktop's memory at ~300 MB/s on one core here."""
MAX_MEMORY_MIB = 1 << 20
"""Largest guest RAM a manifest may name (1 TiB): a sanity bound on a field nothing allocates by."""

_HEX16 = re.compile(r"[0-9a-f]{16}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class Kind(enum.IntEnum):
    MANIFEST = 1
    DATA = 2
    END = 3


@dataclass(frozen=True)
class StreamLimits:
    """What an importer accepts. Apparent sizes cost nothing (the files are sparse); data is what
    gets written, and the importer also checks it against the free space before writing."""

    max_manifest_bytes: int = 64 << 10
    """Longest manifest (a real one is ~1 KiB)."""
    max_span: int = 1 << 20
    """Most bytes one DATA record covers (256 pages): bounds the record and its decompression."""
    max_file_size: int = 1 << 40
    """Largest apparent size of the memory image or the overlay (1 TiB)."""
    max_screen_size: int = 16 << 20
    """Largest screenshot (a 1280x800 PNG is ~20 KiB)."""
    max_data_bytes: int = 1 << 38
    """Most bytes a whole stream may write (256 GiB; a 1 GiB desktop writes ~320 MiB)."""

    def __post_init__(self) -> None:
        if self.max_span < PAGE or self.max_span % PAGE or self.max_span >= 1 << 32:
            raise ValueError("max_span must be a multiple of 4096 below 4 GiB")

    def max_size(self, name: str) -> int:
        return self.max_screen_size if name == "screen.png" else self.max_file_size

    def max_record(self, kind: Kind) -> int:
        """The longest body a record of ``kind`` may have (checked before the body is buffered)."""
        if kind is Kind.MANIFEST:
            return self.max_manifest_bytes
        if kind is Kind.END:
            return DIGEST_SIZE
        pages = self.max_span // PAGE
        return DATA_HEAD.size + (pages + 7) // 8 + compress_bound(self.max_span)


def compress_bound(size: int) -> int:
    """An upper bound of a zstd frame's size for ``size`` bytes of content (``ZSTD_compressBound``
    plus the frame header: 18 bytes at most)."""
    margin = ((128 << 10) - size) >> 11 if size < 128 << 10 else 0
    return size + (size >> 8) + margin + 18


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    """Apparent size: the imported file is truncated to it."""
    data: int
    """The most bytes its DATA records may carry (the exporter's allocated extents)."""


@dataclass(frozen=True)
class StreamManifest:
    """What a stream says it holds, checked field by field (:meth:`from_json`)."""

    name: str
    image_recipe: str
    virt: str
    memory_mib: int
    created: float
    boot_to_desktop_s: float
    save_s: float
    roots: dict[str, str]
    """The checkpoint's root hashes, ``memory`` and ``disk`` (hex): the importer recomputes both."""
    base_blake3: str
    """blake3 of the guest image's ``base.qcow2``, which the overlay is on top of (both sites must
    hold that very file, built from the same recipe: two builds are not byte-identical)."""
    base_size: int
    files: tuple[FileEntry, ...] = field(default_factory=tuple)

    @property
    def data_bytes(self) -> int:
        return sum(f.data for f in self.files)

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT, "version": VERSION,
            "checkpoint": {"name": self.name, "image_recipe": self.image_recipe, "virt": self.virt,
                           "memory_mib": self.memory_mib, "created": self.created,
                           "boot_to_desktop_s": self.boot_to_desktop_s, "save_s": self.save_s},
            "roots": dict(self.roots),
            "base": {"recipe": self.image_recipe, "blake3": self.base_blake3, "size": self.base_size},
            "files": [{"name": f.name, "size": f.size, "data": f.data} for f in self.files],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, body: bytes, limits: StreamLimits) -> StreamManifest:
        """The manifest in ``body``, or CheckpointError saying which field is wrong."""
        try:
            doc = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CheckpointError(f"checkpoint stream: the manifest is not JSON ({type(e).__name__})") from None
        d = _Fields(doc, "manifest")
        if d.text("format") != FORMAT or d.integer("version", 0, 1 << 16) != VERSION:
            raise CheckpointError("checkpoint stream: the manifest is not a version 1 replay-migrate checkpoint")
        ck = d.sub("checkpoint")
        name = ck.text("name")
        try:
            check_name(name, "checkpoint")
        except BadNameError as e:
            raise CheckpointError(f"checkpoint stream: {e}") from None
        recipe = ck.digest("image_recipe", _HEX16)
        virt = ck.text("virt")
        if virt not in ("qemu", "kvm"):
            raise CheckpointError("checkpoint stream: manifest field checkpoint.virt is neither 'qemu' nor 'kvm'")
        roots = d.sub("roots")
        base = d.sub("base")
        if base.digest("recipe", _HEX16) != recipe:
            raise CheckpointError("checkpoint stream: the base image's recipe is not the checkpoint's")
        files: list[FileEntry] = []
        raw_files = d.get("files", list)
        if len(raw_files) > len(FILES):
            raise CheckpointError("checkpoint stream: the manifest lists too many files")
        for i, raw in enumerate(raw_files):
            f = _Fields(raw, f"files[{i}]")
            fname = f.text("name")
            if fname not in FILES:
                raise CheckpointError(f"checkpoint stream: unknown file {fname[:40]!r} in the manifest")
            size = f.integer("size", 0, limits.max_size(fname))
            files.append(FileEntry(fname, size, f.integer("data", 0, size)))
            f.done()
        names = [f.name for f in files]
        if names != sorted(names, key=FILES.index) or len(set(names)) != len(names):
            raise CheckpointError("checkpoint stream: the manifest lists its files out of order or twice")
        missing = [n for n in REQUIRED_FILES if n not in names]
        if missing:
            raise CheckpointError(f"checkpoint stream: the manifest lists no {missing[0]}")
        m = cls(name=name, image_recipe=recipe, virt=virt, memory_mib=ck.integer("memory_mib", 1, MAX_MEMORY_MIB),
                created=ck.number("created"), boot_to_desktop_s=ck.number("boot_to_desktop_s"),
                save_s=ck.number("save_s"),
                roots={"memory": roots.digest("memory", _HEX64), "disk": roots.digest("disk", _HEX64)},
                base_blake3=base.digest("blake3", _HEX64), base_size=base.integer("size", 0, limits.max_file_size),
                files=tuple(files))
        for part in (ck, roots, base, d):
            part.done()
        if m.data_bytes > limits.max_data_bytes:
            raise CheckpointError(f"checkpoint stream: {m.data_bytes} bytes of data announced, more than the "
                                  f"{limits.max_data_bytes} accepted")
        return m


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


class _Fields:
    """A JSON object read field by field; :meth:`done` refuses fields nobody read."""

    def __init__(self, obj: object, where: str) -> None:
        if not isinstance(obj, dict):
            raise CheckpointError(f"checkpoint stream: manifest {where} is not an object")
        self.obj: dict[str, Any] = obj
        self.where = where
        self.seen: set[str] = set()

    def get(self, key: str, kind: type) -> Any:
        self.seen.add(key)
        value = self.obj.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"checkpoint stream: manifest field {self.where}.{key} is missing or not "
                                  f"a{'n' if kind.__name__[0] in 'aeiou' else ''} {kind.__name__}")
        return value

    def text(self, key: str) -> str:
        value: str = self.get(key, str)
        if len(value) > 256:
            raise CheckpointError(f"checkpoint stream: manifest field {self.where}.{key} is too long")
        return value

    def digest(self, key: str, pattern: re.Pattern[str]) -> str:
        value = self.text(key)
        if not pattern.fullmatch(value):
            raise CheckpointError(f"checkpoint stream: manifest field {self.where}.{key} is not a lowercase hex "
                                  "digest of the right length")
        return value

    def integer(self, key: str, low: int, high: int) -> int:
        value: int = self.get(key, int)
        if not low <= value <= high:
            raise CheckpointError(f"checkpoint stream: manifest field {self.where}.{key} = {value} is outside "
                                  f"[{low}, {high}]")
        return value

    def number(self, key: str) -> float:
        self.seen.add(key)
        value = self.obj.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise CheckpointError(f"checkpoint stream: manifest field {self.where}.{key} is not a finite number >= 0")
        return float(value)

    def sub(self, key: str) -> _Fields:
        self.seen.add(key)
        return _Fields(self.obj.get(key), f"{self.where}.{key}" if self.where != "manifest" else key)

    def done(self) -> None:
        extra = sorted(set(self.obj) - self.seen)
        if extra:
            raise CheckpointError(f"checkpoint stream: unknown manifest field {self.where}.{extra[0][:40]}")


# ---- events -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestRead:
    manifest: StreamManifest


@dataclass(frozen=True)
class Pages:
    """Runs of present pages of one file: ``(offset, bytes)``, ascending, not overlapping."""

    file: str
    runs: tuple[tuple[int, bytes], ...]

    @property
    def nbytes(self) -> int:
        return sum(len(b) for _, b in self.runs)


@dataclass(frozen=True)
class StreamEnded:
    """The END record came and its digest matched every byte before it."""

    digest: bytes


Event = ManifestRead | Pages | StreamEnded


# ---- encoder ----------------------------------------------------------------------------------------


def _record(kind: Kind, body: bytes) -> bytes:
    return RECORD.pack(kind, len(body)) + body


class StreamEncoder:
    """Bytes of a stream, in order: :meth:`header`, :meth:`manifest`, :meth:`span` for each
    stretch of each file (ascending), :meth:`end`. Counts and hashes what it returned."""

    def __init__(self, *, level: int = ZSTD_LEVEL, max_span: int = StreamLimits.max_span) -> None:
        self._hash = blake3.blake3()
        self._cctx = zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=True,
                                              write_dict_id=False)
        self.max_span = max_span
        self.bytes_out = 0
        self.data_in = 0
        """Bytes of present pages encoded (what the importer will write)."""

    def _out(self, data: bytes) -> bytes:
        self._hash.update(data)
        self.bytes_out += len(data)
        return data

    def header(self) -> bytes:
        return self._out(HEADER.pack(MAGIC, VERSION, 0))

    def manifest(self, m: StreamManifest) -> bytes:
        return self._out(_record(Kind.MANIFEST, m.to_json()))

    def span(self, file_index: int, offset: int, data: bytes) -> bytes:
        """The DATA record for ``data`` read at ``offset`` (page-aligned, at most ``max_span``
        bytes; shorter than a whole page only at the end of the file), or b"" when every page of
        it is zero."""
        if offset % PAGE or not 0 < len(data) <= self.max_span:
            raise ValueError("a span starts on a page and covers 1 to max_span bytes")
        present = nonzero_pages(data)
        if not present.any():
            return b""
        bitmap = np.packbits(present, bitorder="little").tobytes()
        pages = b"".join(data[i * PAGE:(i + 1) * PAGE] for i in np.flatnonzero(present).tolist())
        self.data_in += len(pages)
        body = DATA_HEAD.pack(file_index, offset, len(data)) + bitmap + self._cctx.compress(pages)
        return self._out(_record(Kind.DATA, body))

    def end(self) -> bytes:
        digest = self._hash.digest()
        return self._out(_record(Kind.END, digest))


def nonzero_pages(data: bytes) -> npt.NDArray[np.bool_]:
    """One bool per 4 KiB page of ``data`` (the last may be short): whether any byte is non-zero."""
    n = len(data)
    whole = n // PAGE
    flags = np.asarray(np.frombuffer(data, dtype=np.uint8, count=whole * PAGE).reshape(whole, PAGE).any(axis=1),
                       dtype=np.bool_)
    if n % PAGE:
        flags = np.append(flags, any(data[whole * PAGE:]))
    return flags


# ---- decoder ----------------------------------------------------------------------------------------


class DecoderState(enum.Enum):
    HEADER = "header"
    MANIFEST = "manifest"
    DATA = "data"
    DONE = "done"
    FAILED = "failed"


class StreamDecoder:
    """Bytes in (:meth:`feed`, any split), events out; :meth:`close` at the end of the input.

    Buffers at most one record (bounded by :meth:`StreamLimits.max_record`) plus what one
    :meth:`feed` handed over. After any error the decoder is FAILED and refuses more input."""

    def __init__(self, limits: StreamLimits | None = None) -> None:
        self.limits = limits or StreamLimits()
        self.state = DecoderState.HEADER
        self.manifest: StreamManifest | None = None
        self.bytes_in = 0
        self._buf = bytearray()
        self._hash = blake3.blake3()
        self._next: list[int] = []
        self._written: list[int] = []

    def feed(self, data: bytes) -> list[Event]:
        if self.state is DecoderState.FAILED:
            raise CheckpointError("checkpoint stream: the decoder failed earlier")
        if self.state is DecoderState.DONE:
            if data:
                self.state = DecoderState.FAILED
                raise CheckpointError("checkpoint stream: bytes after the end of the stream")
            return []
        self.bytes_in += len(data)
        self._buf += data
        try:
            return list(self._records())
        except BaseException:
            self.state = DecoderState.FAILED
            raise

    def close(self) -> None:
        """The input ended: anything but a complete stream is truncated."""
        if self.state is not DecoderState.DONE:
            state, self.state = self.state, DecoderState.FAILED
            raise CheckpointError(f"checkpoint stream: truncated after {self.bytes_in} bytes (in the "
                                  f"{state.value}{' records' if state is DecoderState.DATA else ''}; "
                                  "no end record)")

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _records(self) -> Iterator[Event]:
        while True:
            if self.state is DecoderState.HEADER:
                if len(self._buf) < HEADER.size:
                    if self._buf and not MAGIC.startswith(bytes(self._buf[:len(MAGIC)])):
                        raise CheckpointError("checkpoint stream: not a replay-migrate checkpoint stream")
                    return
                head = self._take(HEADER.size)
                magic, version, flags = HEADER.unpack(head)
                if magic != MAGIC:
                    raise CheckpointError("checkpoint stream: not a replay-migrate checkpoint stream")
                if version != VERSION or flags:
                    raise CheckpointError(f"checkpoint stream: version {version} (flags {flags:#x}); this "
                                          f"replay-migrate reads version {VERSION}")
                self._hash.update(head)
                self.state = DecoderState.MANIFEST
            if len(self._buf) < RECORD.size:
                return
            kind_no, length = RECORD.unpack_from(self._buf)
            try:
                kind = Kind(kind_no)
            except ValueError:
                raise CheckpointError(f"checkpoint stream: unknown record kind {kind_no}") from None
            if length > self.limits.max_record(kind):
                raise CheckpointError(f"checkpoint stream: a {kind.name} record of {length} bytes, more than "
                                      f"the {self.limits.max_record(kind)} allowed")
            if len(self._buf) < RECORD.size + length:
                return
            raw = self._take(RECORD.size + length)
            body = raw[RECORD.size:]
            if kind is Kind.END:
                yield self._end(body)
                if self._buf:
                    raise CheckpointError("checkpoint stream: bytes after the end of the stream")
                return
            self._hash.update(raw)
            if kind is Kind.MANIFEST:
                if self.state is not DecoderState.MANIFEST:
                    raise CheckpointError("checkpoint stream: a second manifest")
                self.manifest = StreamManifest.from_json(body, self.limits)
                self._next = [0] * len(self.manifest.files)
                self._written = [0] * len(self.manifest.files)
                self.state = DecoderState.DATA
                yield ManifestRead(self.manifest)
            else:
                yield self._data(body)

    def _data(self, body: bytes) -> Pages:
        m = self.manifest
        if self.state is not DecoderState.DATA or m is None:
            raise CheckpointError("checkpoint stream: data before the manifest")
        if len(body) < DATA_HEAD.size:
            raise CheckpointError("checkpoint stream: a data record shorter than its header")
        index, offset, span = DATA_HEAD.unpack_from(body)
        if index >= len(m.files):
            raise CheckpointError(f"checkpoint stream: data for file {index}, which the manifest does not list")
        f = m.files[index]
        what = f"checkpoint stream: {f.name} at {offset}"
        if not 0 < span <= self.limits.max_span or offset % PAGE:
            raise CheckpointError(f"{what}: a span of {span} bytes (1 to {self.limits.max_span}, from a page start)")
        if offset < self._next[index] or offset + span > f.size:
            raise CheckpointError(f"{what}: +{span} overlaps the previous span or passes the file's size {f.size}")
        if span % PAGE and offset + span != f.size:
            raise CheckpointError(f"{what}: a span of {span} bytes that is not whole pages ends before the file does")
        npages = -(-span // PAGE)
        nbitmap = (npages + 7) // 8
        if len(body) < DATA_HEAD.size + nbitmap:
            raise CheckpointError(f"{what}: the record ends inside its page bitmap")
        bits = np.unpackbits(np.frombuffer(body, dtype=np.uint8, count=nbitmap, offset=DATA_HEAD.size),
                             bitorder="little")
        if bits[npages:].any() or not bits[:npages].any():
            raise CheckpointError(f"{what}: the page bitmap marks no page, or pages past the span")
        present = np.flatnonzero(bits[:npages]).tolist()
        last_len = span - (npages - 1) * PAGE
        expect = len(present) * PAGE - (PAGE - last_len if present[-1] == npages - 1 else 0)
        if self._written[index] + expect > f.data:
            raise CheckpointError(f"{what}: more data for {f.name} than the {f.data} bytes the manifest announced")
        content = decompress_exact(body[DATA_HEAD.size + nbitmap:], expect, CheckpointError, what)
        self._written[index] += expect
        self._next[index] = offset + span
        runs: list[tuple[int, bytes]] = []
        pos = 0
        for start, stop in _runs(present):
            n = min((stop - start) * PAGE, expect - pos)
            runs.append((offset + start * PAGE, content[pos:pos + n]))
            pos += n
        return Pages(f.name, tuple(runs))

    def _end(self, body: bytes) -> StreamEnded:
        if self.state is not DecoderState.DATA:
            raise CheckpointError("checkpoint stream: it ends before its manifest")
        if len(body) != DIGEST_SIZE:
            raise CheckpointError("checkpoint stream: an end record without a digest")
        digest = self._hash.digest()
        if body != digest:
            raise VerificationError("checkpoint stream: its digest does not match its content: the stream was "
                                    "altered or damaged on the way (nothing was imported)")
        self.state = DecoderState.DONE
        return StreamEnded(digest)


def _runs(indices: list[int]) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of each run of consecutive numbers in ascending ``indices``."""
    start = prev = -2
    for i in indices:
        if i != prev + 1:
            if start >= 0:
                yield start, prev + 1
            start = i
        prev = i
    if start >= 0:
        yield start, prev + 1
