"""Block sources: memory save images, qcow2 overlays and raw files as rows of 4 KiB leaves.

Each source says which leaves it knows without reading (holes, zero pages, clusters a qcow2 overlay
does not allocate, whose digest comes from the shared backing chain's saved tree) and reads the rest
with large ``pread`` calls, so the Merkle code touches only what may differ. See ``differ.source``.
"""

from __future__ import annotations

import bisect
import io
import json
import os
import struct
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Self

import blake3
import numpy as np
import numpy.typing as npt
from numpy.lib import format as np_format

from differ.merkle import MAX_LOAD_LEAVES, known_arrays, rows_equal
from differ.saveimage import DEFAULT_MAX_RAM_BLOCKS, DEFAULT_MAX_SCAN, SaveImage, SaveLayout
from differ.source import LEAF_SIZE, ZERO_LEAF_DIGEST, BlockSource, ImageKind, KnownArrays
from replay_migrate.errors import ImageError
from replay_migrate.files import atomic_write
from replay_migrate.safeopen import check_regular, open_regular
from replay_migrate.savefmt import DEFAULT_MAX_DATA_LEN, MAGICS
from replay_migrate.sparse import data_extents
from replay_migrate.tools import run_tool

QCOW2_MAGIC = b"QFI\xfb"
DIGEST_SIZE = 32
DEFAULT_READ_LEAVES = 256
"""Leaves read per call when hashing a whole source (1 MiB: large reads, bounded memory)."""
DEFAULT_QEMU_TIMEOUT = 600.0
"""Seconds a qemu-img call may take (a full ``convert`` of a multi-GiB backing image included)."""
DEFAULT_MAX_FALLBACK_BYTES = 64 << 20
"""Largest range read through ``qemu-img convert`` in one call (compressed clusters, backing data
inside a partly allocated leaf), bounding the temporary file."""
LEAF_DIGESTS_FORMAT = 1


def _leaf_count(size: int) -> int:
    return -(-size // LEAF_SIZE)


def _check_range(source: BlockSource, index: int, count: int) -> None:
    if count < 1 or index < 0 or index + count > source.leaf_count:
        raise ValueError(f"leaves {index}..{index + count - 1} outside 0..{source.leaf_count - 1}")


def _short_zero_digest(size: int) -> bytes | None:
    """Digest of the last leaf when it is short and all zeros; None when the last leaf is whole.

    A short leaf is hashed as its real bytes, so it must never be reported as a (full) zero leaf."""
    tail = size % LEAF_SIZE
    return blake3.blake3(bytes(tail)).digest() if tail else None


def _hole_mask(fd: int, size: int) -> npt.NDArray[np.bool_]:
    """One bool per leaf: True where the whole leaf lies in a file hole (reads as zeros)."""
    mask = np.ones(_leaf_count(size), dtype=np.bool_)
    for start, end in data_extents(fd, 0, size):
        mask[start // LEAF_SIZE : _leaf_count(end)] = False
    return mask


def _zero_arrays(mask: npt.NDArray[np.bool_], size: int) -> KnownArrays:
    """Known-leaf arrays of the zero leaves in ``mask``; a short zero last leaf is given with its
    own digest (a zero leaf means LEAF_SIZE zeros)."""
    zi = np.flatnonzero(mask).astype(np.int64)
    short = _short_zero_digest(size)
    if short is not None and len(zi) and zi[-1] == len(mask) - 1:
        return zi[:-1], zi[-1:], np.frombuffer(short, dtype=np.uint8).reshape(1, DIGEST_SIZE).copy()
    return zi, np.zeros(0, dtype=np.int64), np.zeros((0, DIGEST_SIZE), dtype=np.uint8)


def _iter_known(arrays: KnownArrays) -> Iterator[tuple[int, bytes | None]]:
    """``known_leaves`` from the arrays, in increasing order."""
    zi, gi, digests = arrays
    given = {int(i): bytes(d) for i, d in zip(gi.tolist(), digests, strict=True)}
    for i in sorted([*zi.tolist(), *given]):
        yield i, given.get(i)


def _open_readonly(path: str, what: str) -> tuple[int, os.stat_result]:
    """Open an image for reading: a regular file only, checked on the descriptor and opened
    non-blocking, so that a FIFO or a device given as an image is refused instead of waited on."""
    return open_regular(path, what, error=ImageError)


class _FileSource:
    """Shared plumbing of the sources that read a file directly: size, pread, close."""

    _kind: ImageKind = "raw"
    _label = "raw"

    def __init__(self, path: str | os.PathLike[str], what: str) -> None:
        self.path = os.fspath(path)
        self._fd, st = _open_readonly(self.path, what)
        self._size = st.st_size

    @property
    def kind(self) -> ImageKind:
        return self._kind

    @property
    def size(self) -> int:
        return self._size

    @property
    def leaf_count(self) -> int:
        return _leaf_count(self._size)

    def zero_mask(self) -> npt.NDArray[np.bool_]:
        """One bool per leaf: a leaf known to be zeros without reading."""
        raise NotImplementedError

    def known_leaf_arrays(self) -> KnownArrays:
        return _zero_arrays(self.zero_mask(), self._size)

    def known_leaves(self) -> Iterator[tuple[int, bytes | None]]:
        return _iter_known(self.known_leaf_arrays())

    def read(self, index: int, count: int = 1) -> bytes:
        _check_range(self, index, count)
        offset = index * LEAF_SIZE
        length = min(count * LEAF_SIZE, self._size - offset)
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as e:
            raise ImageError(f"{self.path}: read of {length} bytes at {offset} failed: {e.strerror}") from None
        if len(data) != length:
            raise ImageError(f"{self.path}: short read at {offset} (the file shrank while open?)")
        return data

    def label(self, index: int) -> str:
        return self._label

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RawImageSource(_FileSource):
    """A plain file or block device; holes are zero leaves (SEEK_DATA/SEEK_HOLE)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path, "raw image")

    def zero_mask(self) -> npt.NDArray[np.bool_]:
        return _hole_mask(self._fd, self._size)


class MemoryImageSource(_FileSource):
    """A sparse save image as 4 KiB pieces of the *file* at ``i * 4096``.

    Non-RAM regions (header, XML, stream prologue with the bitmaps, device state) are just their own
    leaves, so two saves of clones of one checkpoint line up leaf for leaf. A RAM page whose bitmap
    bit is clear is a zero leaf without reading: QEMU never reads it on restore (it is a hole in every
    file QEMU writes); holes anywhere else are zero leaves too."""

    _kind: ImageKind = "memory"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_data_len: int = DEFAULT_MAX_DATA_LEN,
        max_ram_blocks: int = DEFAULT_MAX_RAM_BLOCKS,
        max_scan: int = DEFAULT_MAX_SCAN,
    ) -> None:
        self.image = SaveImage.open(path, max_data_len=max_data_len, max_ram_blocks=max_ram_blocks, max_scan=max_scan)
        try:
            super().__init__(path, "memory image")
        except BaseException:
            self.image.close()
            raise
        if self._size != self.image.layout.file_size:
            self.close()
            raise ImageError(f"{self.path}: changed size while being opened")
        blocks = [b for b in self.image.layout.blocks if not b.ignored]
        self._starts = [b.pages_offset // LEAF_SIZE for b in blocks]
        self._ends = [b.pages_end // LEAF_SIZE for b in blocks]
        self._names = [b.name for b in blocks]

    @property
    def layout(self) -> SaveLayout:
        return self.image.layout

    def zero_mask(self) -> npt.NDArray[np.bool_]:
        """One bool per leaf: a hole, or a RAM page whose bitmap bit is clear."""
        mask = _hole_mask(self._fd, self._size)
        for b in self.image.layout.blocks:
            if not b.ignored:
                first = b.pages_offset // LEAF_SIZE
                mask[first : first + b.npages] |= ~self.image.present(b)
        return mask

    def label(self, index: int) -> str:
        k = bisect.bisect_right(self._starts, index) - 1
        if k >= 0 and index < self._ends[k]:
            return self._names[k]
        return "non-ram"

    def close(self) -> None:
        self.image.close()
        super().close()


# ---------------------------------------------------------------- qemu-img plumbing


def _json_tool(argv: Sequence[str], *, timeout: float, what: str, path: str) -> Any:
    out = run_tool(argv, timeout=timeout, what=f"{path}: {what}", error=ImageError).stdout
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        raise ImageError(f"{path}: {what} printed something that is not JSON") from None


def qemu_img_info(
    path: str,
    *,
    fmt: str | None = None,
    qemu_img: str = "qemu-img",
    timeout: float = DEFAULT_QEMU_TIMEOUT,
    force_share: bool = False,
) -> list[dict[str, Any]]:
    """``qemu-img info --backing-chain``: one dict per image of the chain, the top first."""
    argv = [qemu_img, "info", "--output=json", "--backing-chain"]
    argv += (["-f", fmt] if fmt else []) + (["-U"] if force_share else []) + [path]
    info = _json_tool(argv, timeout=timeout, what="qemu-img info", path=path)
    if isinstance(info, dict):
        info = [info]
    if not isinstance(info, list) or not info or not all(isinstance(i, dict) for i in info):
        raise ImageError(f"{path}: unexpected qemu-img info output")
    return info


def _image_opts_range(path: str, fmt: str, offset: int, length: int, force_share: bool) -> str:
    """``--image-opts`` for the guest-visible bytes ``[offset, offset+length)`` of an image: a raw
    window (offset/size) over the format driver, so qemu-img reads only that range."""
    opts = [
        "driver=raw",
        f"offset={offset}",
        f"size={length}",
        f"file.driver={fmt}",
        "file.file.driver=file",
        "file.file.filename=" + path.replace(",", ",,"),
    ]
    if force_share:
        opts += ["file.force-share=on", "file.read-only=on"]
    return ",".join(opts)


def read_guest_range(
    path: str,
    offset: int,
    length: int,
    *,
    fmt: str = "qcow2",
    qemu_img: str = "qemu-img",
    timeout: float = DEFAULT_QEMU_TIMEOUT,
    tmp_dir: str | None = None,
    force_share: bool = False,
) -> bytes:
    """Guest-visible bytes of an image read by QEMU itself (compressed clusters, external data
    files, backing data): the slow but always-correct path."""
    with tempfile.TemporaryDirectory(prefix="rm-range-", dir=tmp_dir) as tmp:
        out = os.path.join(tmp, "range.raw")
        argv = [
            qemu_img,
            "convert",
            "-O",
            "raw",
            "--image-opts",
            _image_opts_range(path, fmt, offset, length, force_share),
            out,
        ]
        run_tool(argv, timeout=timeout, what=f"{path}: qemu-img convert of bytes {offset}+{length}", error=ImageError)
        with open(out, "rb") as f:
            data = f.read()
    if len(data) != length:
        raise ImageError(f"{path}: qemu-img returned {len(data)} bytes for a range of {length}")
    return data


# ---------------------------------------------------------------- leaf digests of a backing chain


@dataclass(frozen=True)
class LeafDigests:
    """The 32-byte digest of every leaf of an image's guest-visible content: the saved tree of a
    checkpoint's backing chain, computed once and loaded for every later diff."""

    digests: npt.NDArray[np.uint8]
    """Shape ``(leaf_count, 32)``."""
    size: int
    """The image's size in bytes (the last leaf is short when it is not a multiple of 4 KiB)."""

    def __post_init__(self) -> None:
        d = self.digests
        if d.dtype != np.uint8 or d.ndim != 2 or d.shape != (_leaf_count(self.size), DIGEST_SIZE):
            raise ImageError(f"leaf digests of shape {d.shape} ({d.dtype}) do not fit an image of {self.size} bytes")

    def __len__(self) -> int:
        return int(self.digests.shape[0])

    def digest(self, index: int) -> bytes:
        return bytes(self.digests[index].tobytes())

    def zero_mask(self) -> npt.NDArray[np.bool_]:
        """True for leaves whose digest is the zero-leaf digest."""
        return rows_equal(self.digests, ZERO_LEAF_DIGEST)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write an uncompressed ``.npz`` (digests, size, format) atomically, through a temporary
        file of its own (two writers at once each replace the file whole; see replay_migrate.files)."""
        target = Path(path)

        def write(f: BinaryIO) -> None:
            np.savez(f, digests=self.digests, size=np.int64(self.size), format=np.int64(LEAF_DIGESTS_FORMAT))

        try:
            atomic_write(target, write)
        except OSError as e:
            raise ImageError(f"{target}: cannot write leaf digests: {e.strerror}") from None

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, expect_size: int | None = None, max_leaves: int = MAX_LOAD_LEAVES
    ) -> LeafDigests:
        """Read a file :meth:`save` wrote. Every member is checked before its data is read: stored
        (not deflated: no zip bomb), a ``.npy`` header of the expected dtype and shape, the size
        within ``max_leaves`` leaves and equal to ``expect_size`` when given, and no member larger
        than the file itself, so nothing is allocated beyond the file's real size."""
        target = os.fspath(path)
        fd, st = open_regular(target, "leaf-digest file", error=ImageError)
        try:
            with os.fdopen(fd, "rb", closefd=False) as f, zipfile.ZipFile(f) as z:
                infos = {i.filename: i for i in z.infolist()}
                if set(infos) != {"digests.npy", "size.npy", "format.npy"} or len(infos) != 3:
                    raise ImageError(f"{target}: not a leaf-digest file (members {sorted(infos)})")
                for info in infos.values():
                    if info.compress_type != zipfile.ZIP_STORED or info.file_size > st.st_size:
                        raise ImageError(f"{target}: member {info.filename} is compressed or larger than the file")
                fmt = int(_npy_member(z, infos["format.npy"], np.dtype("<i8"), ()))
                if fmt != LEAF_DIGESTS_FORMAT:
                    raise ImageError(f"{target}: leaf-digest format {fmt} not supported")
                size = int(_npy_member(z, infos["size.npy"], np.dtype("<i8"), ()))
                if size < 0 or _leaf_count(size) > max_leaves:
                    raise ImageError(f"{target}: image size {size} outside 0..{max_leaves} leaves")
                if expect_size is not None and size != expect_size:
                    raise ImageError(f"{target}: digests of an image of {size} bytes, expected {expect_size}")
                shape = (_leaf_count(size), DIGEST_SIZE)
                digests = _npy_member(z, infos["digests.npy"], np.dtype("|u1"), shape)
        except _ZIP_ERRORS as e:
            raise ImageError(f"{target}: unreadable leaf-digest file ({e})") from None
        finally:
            os.close(fd)
        try:
            return cls(digests, size)
        except ImageError as e:
            raise ImageError(f"{target}: {e}") from None

    @classmethod
    def of_source(cls, source: BlockSource, *, chunk_leaves: int = DEFAULT_READ_LEAVES) -> LeafDigests:
        """Hash every leaf of ``source``: known leaves without reading, the rest in large reads."""
        n = source.leaf_count
        out = np.empty((n, DIGEST_SIZE), dtype=np.uint8)
        todo = np.ones(n, dtype=np.bool_)
        zi, gi, digests = known_arrays(source)
        out[zi] = np.frombuffer(ZERO_LEAF_DIGEST, dtype=np.uint8)
        out[gi] = digests
        todo[zi] = todo[gi] = False
        for start, stop in _runs(todo):
            for first in range(start, stop, chunk_leaves):
                count = min(chunk_leaves, stop - first)
                data = memoryview(source.read(first, count))
                for k in range(count):
                    piece = data[k * LEAF_SIZE : (k + 1) * LEAF_SIZE]
                    out[first + k] = np.frombuffer(blake3.blake3(piece).digest(), dtype=np.uint8)
        return cls(out, source.size)


_ZIP_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, struct.error, RuntimeError, NotImplementedError)
"""What zipfile raises for a damaged or foreign archive (RuntimeError: encrypted; NotImplementedError:
a compression or feature it lacks), besides our own checks' ValueError."""
_ZIP_FLAGS_OK = 0x0808
"""Zip member flag bits ``LeafDigests.save`` (zipfile) may set: a data descriptor, UTF-8 names.
Anything else (encryption, patched data, ...) is not a file this code wrote."""


def _npy_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Any:
    """The array in ``.npy`` member ``info``, which must hold exactly ``dtype`` and ``shape``: its
    header must be byte for byte the one ``np.save`` writes for them (so no header a file chose is
    ever parsed), and the data must fill the member exactly."""
    if info.flag_bits & ~_ZIP_FLAGS_OK:
        raise ValueError(f"{info.filename}: zip flags {info.flag_bits:#x}")
    head = io.BytesIO()
    np_format.write_array_header_1_0(
        head, {"descr": np_format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )
    expected = head.getvalue()
    count = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if info.file_size != len(expected) + count:
        raise ValueError(f"{info.filename}: {info.file_size} bytes, expected {len(expected) + count}")
    with z.open(info) as f:
        if f.read(len(expected)) != expected:
            raise ValueError(f"{info.filename}: not an array of {dtype} {shape}")
        data = f.read(count)
    if len(data) != count:
        raise ValueError(f"{info.filename}: truncated")
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def _runs(mask: npt.NDArray[np.bool_]) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of every run of True in ``mask``."""
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    for k in range(0, len(edges), 2):
        yield int(edges[k]), int(edges[k + 1])


def compute_leaf_digests(
    path: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    qemu_img: str = "qemu-img",
    timeout: float = DEFAULT_QEMU_TIMEOUT,
    tmp_dir: str | None = None,
    chunk_leaves: int = DEFAULT_READ_LEAVES,
) -> LeafDigests:
    """The leaf digests of an image's guest-visible content (a checkpoint's backing chain).

    A raw image is hashed in place; any other format is first expanded by ``qemu-img convert -O
    raw`` into a sparse temporary file (zeros become holes, never hashed one by one). Run once per
    checkpoint and keep the result with :meth:`LeafDigests.save`."""
    spath = os.fspath(path)
    check_regular(spath, "image", error=ImageError)      # qemu-img would wait on a FIFO
    info = qemu_img_info(spath, fmt=fmt, qemu_img=qemu_img, timeout=timeout)
    fmt = fmt or str(info[0].get("format", ""))
    if fmt == "raw":
        with RawImageSource(spath) as src:
            return LeafDigests.of_source(src, chunk_leaves=chunk_leaves)
    with tempfile.TemporaryDirectory(prefix="rm-digests-", dir=tmp_dir) as tmp:
        out = os.path.join(tmp, "guest.raw")
        run_tool(
            [qemu_img, "convert", "-f", fmt, "-O", "raw", spath, out],
            timeout=timeout,
            what=f"{spath}: qemu-img convert -O raw",
            error=ImageError,
        )
        with RawImageSource(out) as src:
            return LeafDigests.of_source(src, chunk_leaves=chunk_leaves)


# ---------------------------------------------------------------- qcow2 overlays

_ZERO, _HOST, _QEMU = 0, 1, 2
"""How a mapped extent is read: zeros, straight from the overlay file, or through qemu-img."""


@dataclass(frozen=True)
class _Extent:
    start: int
    end: int
    mode: int
    host_offset: int
    layer: int = 0
    """Depth in the backing chain of the file that holds a ``_HOST`` extent (0: the overlay)."""


DIRECT_FORMATS = frozenset({"qcow2", "raw"})
"""Layer formats whose mapped offsets are offsets in the layer's own file (read with pread)."""


class Qcow2OverlaySource:
    """The guest-visible content of a qcow2 overlay whose backing chain both sides share.

    ``qemu-img map`` (one run, at open) tells for every extent of the guest disk which layer of the
    chain holds it (its depth) and, for uncompressed data, at which offset of that layer's file.
    Those extents are read with ``pread`` from the layer's file (each opened once); only compressed
    clusters and layers that cannot be read directly (an external data file, encryption, a format
    other than qcow2 and raw, a file name that is not a plain path) go through ``qemu-img convert``,
    one process per range. For hashing, only the clusters the overlay allocates (depth 0) are read:
    every other leaf takes its digest from ``backing_tree`` (the backing chain's saved leaf
    digests) or is a zero leaf. References and deltas read backing leaves too, through the same
    map. The chain's lower layers must not change while the source is open (a checkpoint's never
    do); the overlay itself may be patched in place, leaf by leaf, by a caller that does not read
    a leaf after writing it (``differ.patch``). ``read_backing_directly=False`` reads every backing
    range through qemu-img (as before the map was used for them: ``bench/bench_chain.py``)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        backing_tree: LeafDigests | None = None,
        qemu_img: str = "qemu-img",
        timeout: float = DEFAULT_QEMU_TIMEOUT,
        force_share: bool = False,
        tmp_dir: str | None = None,
        max_fallback_bytes: int = DEFAULT_MAX_FALLBACK_BYTES,
        read_backing_directly: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        self._qemu_img, self._timeout, self._force_share = qemu_img, timeout, force_share
        self._read_backing_directly = read_backing_directly
        self._tmp_dir, self._max_fallback = tmp_dir, max_fallback_bytes
        self._fd, _ = _open_readonly(self.path, "qcow2 overlay")
        self._layer_fds: dict[int, int] = {0: self._fd}
        try:
            self._setup(backing_tree)
        except BaseException:
            self.close()
            raise

    def _setup(self, tree: LeafDigests | None) -> None:
        if os.pread(self._fd, 4, 0) != QCOW2_MAGIC:
            raise ImageError(f"{self.path}: not a qcow2 image (no QFI\\xfb magic)")
        chain = qemu_img_info(
            os.path.abspath(self.path), fmt="qcow2", qemu_img=self._qemu_img, timeout=self._timeout,
            force_share=self._force_share,
        )
        top = chain[0]
        if top.get("encrypted"):
            raise ImageError(f"{self.path}: encrypted qcow2 overlays are not supported")
        specific = top.get("format-specific", {}).get("data", {})
        if specific.get("corrupt"):
            raise ImageError(f"{self.path}: qcow2 image is marked corrupt (run qemu-img check)")
        external = bool(specific.get("data-file"))
        size = top.get("virtual-size")
        if not isinstance(size, int) or size < 0:
            raise ImageError(f"{self.path}: qemu-img info gave no virtual size")
        self._size = size
        has_backing = len(chain) > 1
        if tree is not None:
            if not has_backing:
                raise ImageError(f"{self.path}: a backing tree was given but the overlay has no backing file")
            bsize = chain[1].get("virtual-size")
            if bsize != tree.size:
                raise ImageError(
                    f"{self.path}: backing tree is for an image of {tree.size} bytes, the backing file has {bsize}"
                )
        self._tree = tree
        self._direct = [self._readable_directly(layer) and (d == 0 or self._read_backing_directly)
                        for d, layer in enumerate(chain)]
        self._direct[0] = not external
        self._chain_files = [str(layer.get("filename", "")) for layer in chain]
        self._extents = self._load_map()
        self._starts = [e.start for e in self._extents]
        self._classify(tree)

    @staticmethod
    def _readable_directly(layer: dict[str, Any]) -> bool:
        """Whether a layer's mapped offsets can be read from its file with pread."""
        name = layer.get("filename")
        specific = layer.get("format-specific", {}).get("data", {})
        return (
            isinstance(name, str) and os.path.isabs(name) and not name.startswith("json:")
            and layer.get("format") in DIRECT_FORMATS and not layer.get("encrypted")
            and not (isinstance(specific, dict) and specific.get("data-file"))
        )

    def _layer_fd(self, depth: int) -> int | None:
        """The open file of the chain's layer at ``depth`` (opened on first use), or None when it
        is not to be read directly (or is no longer a regular file)."""
        if not (0 <= depth < len(self._direct)) or not self._direct[depth]:
            return None
        if depth in self._layer_fds:
            return self._layer_fds[depth]
        try:
            fd, _ = _open_readonly(self._chain_files[depth], "backing image")
        except ImageError:
            self._direct[depth] = False
            return None
        self._layer_fds[depth] = fd
        return fd

    def _load_map(self) -> list[_Extent]:
        argv = [self._qemu_img, "map", "--output=json", "-f", "qcow2"]
        argv += (["-U"] if self._force_share else []) + [self.path]
        entries = _json_tool(argv, timeout=self._timeout, what="qemu-img map", path=self.path)
        if not isinstance(entries, list):
            raise ImageError(f"{self.path}: unexpected qemu-img map output")
        extents: list[_Extent] = []
        self._ov_data = np.zeros(self.leaf_count, dtype=np.bool_)
        self._ov_zero = np.zeros(self.leaf_count, dtype=np.bool_)
        self._bk_data = np.zeros(self.leaf_count, dtype=np.bool_)
        pos = 0
        for e in entries:
            try:
                start, length, depth = int(e["start"]), int(e["length"]), int(e["depth"])
                zero, data = bool(e["zero"]), bool(e["data"])
                compressed = bool(e.get("compressed", False))
                host = e.get("offset")
            except (KeyError, TypeError, ValueError):
                raise ImageError(f"{self.path}: unexpected qemu-img map entry {str(e)[:200]}") from None
            if start != pos or length <= 0:
                raise ImageError(f"{self.path}: qemu-img map has a gap or overlap at {pos}")
            pos = start + length
            lo, hi = start // LEAF_SIZE, _leaf_count(pos)
            if zero:
                mode = _ZERO
                if depth == 0:
                    self._ov_zero[lo:hi] = True
            else:
                direct = data and isinstance(host, int) and host >= 0 and not compressed
                mode = _HOST if direct and self._layer_fd(depth) is not None else _QEMU
                (self._bk_data if depth > 0 else self._ov_data)[lo:hi] = True
            extents.append(_Extent(start, pos, mode, host if mode == _HOST else -1, depth if mode == _HOST else 0))
        if pos != self._size:
            raise ImageError(f"{self.path}: qemu-img map covers {pos} bytes, the disk has {self._size}")
        return extents

    def _classify(self, tree: LeafDigests | None) -> None:
        n = self.leaf_count
        self._zero = ~self._ov_data & ~self._bk_data
        from_backing = ~self._ov_data & ~self._ov_zero & self._bk_data
        self._from_tree = np.zeros(n, dtype=np.bool_)
        if tree is not None:
            # a tree leaf stands for an overlay leaf only if both have the same length
            same = min(len(tree), n)
            if tree.size != self._size and same and min(tree.size, self._size) % LEAF_SIZE:
                same -= 1
            self._from_tree[:same] = from_backing[:same]
            tree_zero = np.zeros(n, dtype=np.bool_)
            tree_zero[:same] = tree.zero_mask()[:same]
            self._zero |= self._from_tree & tree_zero
            self._from_tree &= ~tree_zero

    @property
    def kind(self) -> ImageKind:
        return "disk"

    @property
    def size(self) -> int:
        return self._size

    @property
    def leaf_count(self) -> int:
        return _leaf_count(self._size)

    def overlay_leaves(self) -> npt.NDArray[np.intp]:
        """Indices of leaves with data allocated in the overlay itself: the ones that get read."""
        return np.flatnonzero(self._ov_data)

    def known_leaf_arrays(self) -> KnownArrays:
        zi, gi, digests = _zero_arrays(self._zero, self._size)
        ti = np.flatnonzero(self._from_tree).astype(np.int64)
        if len(ti):
            assert self._tree is not None
            order = np.argsort(np.concatenate([gi, ti]), kind="stable")
            gi = np.concatenate([gi, ti])[order]
            digests = np.concatenate([digests, self._tree.digests[ti]])[order]
        return zi, gi, digests

    def known_leaves(self) -> Iterator[tuple[int, bytes | None]]:
        return _iter_known(self.known_leaf_arrays())

    def read(self, index: int, count: int = 1) -> bytes:
        _check_range(self, index, count)
        start = index * LEAF_SIZE
        end = min(self._size, start + count * LEAF_SIZE)
        buf = bytearray(end - start)
        view = memoryview(buf)
        slow: list[tuple[int, int]] = []
        k = bisect.bisect_right(self._starts, start) - 1
        while k < len(self._extents) and self._extents[k].start < end:
            ext = self._extents[k]
            lo, hi = max(ext.start, start), min(ext.end, end)
            if ext.mode == _HOST:
                want = hi - lo
                fd = self._layer_fds[ext.layer]
                try:
                    got = os.preadv(fd, [view[lo - start : hi - start]], ext.host_offset + lo - ext.start)
                except OSError as e:
                    raise ImageError(
                        f"{self._chain_files[ext.layer]}: read at host offset {ext.host_offset} failed: {e.strerror}"
                    ) from None
                if got != want:
                    raise ImageError(f"{self._chain_files[ext.layer]}: short read of a cluster at host offset "
                                     f"{ext.host_offset}")
            elif ext.mode == _QEMU:
                if slow and slow[-1][1] == lo:
                    slow[-1] = (slow[-1][0], hi)
                else:
                    slow.append((lo, hi))
            k += 1
        for lo, hi in slow:
            for piece in range(lo, hi, self._max_fallback):
                piece_end = min(hi, piece + self._max_fallback)
                view[piece - start : piece_end - start] = read_guest_range(
                    self.path,
                    piece,
                    piece_end - piece,
                    qemu_img=self._qemu_img,
                    timeout=self._timeout,
                    tmp_dir=self._tmp_dir,
                    force_share=self._force_share,
                )
        return bytes(buf)

    def label(self, index: int) -> str:
        return "disk"

    def close(self) -> None:
        for depth, fd in self._layer_fds.items():
            if depth and fd >= 0:
                os.close(fd)
        self._layer_fds = {}
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Qcow2OverlaySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- factory


def detect_format(path: str | os.PathLike[str]) -> ImageKind:
    """``memory`` for a libvirt save image, ``disk`` for qcow2, else ``raw`` (by magic)."""
    spath = os.fspath(path)
    fd, _ = _open_readonly(spath, "image")
    try:
        head = os.pread(fd, 16, 0)
    except OSError as e:
        raise ImageError(f"{spath}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    if head in MAGICS:
        return "memory"
    if head[:4] == QCOW2_MAGIC:
        return "disk"
    return "raw"


def open_source(
    path: str | os.PathLike[str],
    *,
    backing_tree: LeafDigests | None = None,
    qemu_img: str = "qemu-img",
    force_share: bool = False,
) -> BlockSource:
    """Open ``path`` as the right block source for its format (sniffed from the magic)."""
    kind = detect_format(path)
    if kind == "memory":
        return MemoryImageSource(path)
    if kind == "disk":
        return Qcow2OverlaySource(path, backing_tree=backing_tree, qemu_img=qemu_img, force_share=force_share)
    return RawImageSource(path)
