"""Block sinks: patch a *copy* of an image with verified leaves, then swap it in atomically.

Every sink copies the image sparsely next to the original (same directory: the rename is atomic and
a qcow2 overlay's relative backing path still resolves), applies writes to the copy, offers a source
over the copy to recompute the root, and on ``commit`` fsyncs and renames it over the original;
``abort`` deletes it. Memory and raw images are patched with pwrite and hole punching; a qcow2
overlay through ``qemu-io`` (guest-visible writes, batched), since its clusters are QEMU's to place.

**In place** (``in_place=True``) is for an image nobody needs as it was: a migration target's clone,
which is resumed only once every root verified and is discarded on any failure. The writes go to
the image itself: no copy (for a 1 GiB guest, ~250 MiB of its memory image copied inside the
downtime), ``commit`` only makes them durable (when asked), and ``abort`` *deletes* the image, which
may be half-patched: nothing can restore it by mistake. The image must have one name (another hard
link would see it half-patched). A user's file (``replay-migrate sync``) is always patched through
a copy: it must never be seen half-patched, and an abort must leave it as it was. The diff protocol's
target never reads a leaf of its own image after it asked for that leaf to be written
(``differ.protocol.target``), so in-place writes do not change what it reads for references and
deltas.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import Self

from differ.blocks import (
    DEFAULT_QEMU_TIMEOUT,
    QCOW2_MAGIC,
    LeafDigests,
    MemoryImageSource,
    Qcow2OverlaySource,
    RawImageSource,
    detect_format,
    qemu_img_info,
)
from differ.saveimage import ImageWriter
from differ.source import LEAF_SIZE, BlockSink, BlockSource
from replay_migrate.errors import ImageError
from replay_migrate.safeopen import check_replaceable
from replay_migrate.sparse import sparse_copy
from replay_migrate.tools import run_tool

DEFAULT_MAX_BATCH_BYTES = 64 << 20
"""Pending qcow2 leaf data held in memory before it is written with one qemu-io run."""
DEFAULT_MAX_COMMANDS = 1024
"""Most ``-c`` commands per qemu-io invocation."""
DEFAULT_MAX_ARGV_BYTES = 256 << 10
"""Most argument bytes per qemu-io invocation (far below Linux's ARG_MAX)."""


def _sibling_path(path: str, tag: str) -> str:
    """A fresh name next to ``path`` for its working copy (hidden, unique)."""
    directory, name = os.path.split(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.{tag}-", dir=directory)
    except OSError as e:
        raise ImageError(f"{path}: cannot make its working copy in {directory}: {e.strerror}") from None
    os.close(fd)
    os.unlink(tmp)
    return tmp


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _CopySink:
    """The copy / commit / abort life cycle shared by every sink (in place: no copy, see above)."""

    def __init__(self, path: str | os.PathLike[str], what: str, *, durable: bool = True,
                 in_place: bool = False) -> None:
        self.path = os.fspath(path)
        self.durable = durable
        self.in_place = in_place
        # a regular file, not a link (the rename would replace the link, not the file it names),
        # in a folder we can write: refused here, before any work, rather than at the rename; in
        # place, its only name (another one would see the image half-patched)
        check_replaceable(self.path, what, error=ImageError, single_name=in_place)
        if in_place:
            self.copy_path, self.copy_method = self.path, "in place"
        else:
            self.copy_path = _sibling_path(self.path, "rm-patch")
            self.copy_method = sparse_copy(self.path, self.copy_path, page=LEAF_SIZE)
        self._state = "open"

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"sink for {self.path} is already {self._state}")

    def _finish_writes(self) -> None:
        """Make every pending write reach the copy (overridden by batching sinks)."""

    def _close_copy(self) -> None:
        """Release handles on the copy (overridden)."""

    def commit(self) -> None:
        """fsync the copy and rename it over the original: all or nothing. Without ``durable`` the
        rename is still atomic but nothing waits for the disk: for a file read once right away (a
        migration target's memory image, restored at once), where the fsync of its few hundred
        MiB of fresh page cache cost 0.3 s of downtime and a host crash loses the VM anyway. In
        place: the writes are flushed (and fsynced when ``durable``); there is nothing to rename."""
        self._check_open()
        self._finish_writes()
        self._close_copy()
        try:
            if self.durable:
                fd = os.open(self.copy_path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            if not self.in_place:
                os.replace(self.copy_path, self.path)
                if self.durable:
                    _fsync_dir(self.path)
        except OSError as e:
            raise ImageError(f"{self.path}: committing the patched copy failed: {e.strerror}") from None
        self._state = "committed"

    def abort(self) -> None:
        """Delete the copy; the original was never touched. In place, delete the image itself: it
        may be half-patched (its owner discards it anyway). Safe to call twice."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._close_copy()
        try:
            os.unlink(self.copy_path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


class _FileSink(_CopySink):
    """Leaves written with pwrite into the copy; zero leaves become holes."""

    def __init__(self, path: str | os.PathLike[str], what: str, *, durable: bool = True,
                 in_place: bool = False) -> None:
        super().__init__(path, what, durable=durable, in_place=in_place)
        self._shrink_to: int | None = None
        try:
            self._writer = ImageWriter(self.copy_path)
        except ImageError:
            if not in_place:
                os.unlink(self.copy_path)
            raise

    def write(self, index: int, data: bytes) -> None:
        """Write a leaf; an all-zero one becomes a hole (a short last leaf of zeros arrives as data)."""
        self._check_open()
        _check_leaf(index, data)
        offset = index * LEAF_SIZE
        if is_zero(data):
            end = offset + len(data)
            if self._writer.size() < end:
                self._writer.truncate(end)
            self._writer.punch_hole(offset, len(data))
        else:
            self._writer.write(offset, data)

    def zero(self, index: int) -> None:
        """Zero a leaf as a hole. Past the end of the copy nothing is needed: ``set_size`` extends
        it with zeros."""
        self._check_open()
        _check_leaf(index, b"\0")
        self._writer.punch_hole(index * LEAF_SIZE, LEAF_SIZE)

    def set_size(self, size: int) -> None:
        """Truncate or extend. In place, a shrink waits until the writes are done (``source``,
        ``commit``): what lies past the new end is still the image's until then."""
        self._check_open()
        if size < 0:
            raise ValueError(f"negative size {size}")
        self._shrink_to = None
        if self.in_place and size < self._writer.size():
            self._shrink_to = size
        else:
            self._writer.truncate(size)

    def _finish_writes(self) -> None:
        if self._shrink_to is not None:
            self._writer.truncate(self._shrink_to)
            self._shrink_to = None

    def _close_copy(self) -> None:
        self._writer.close()


class MemoryImageSink(_FileSink):
    """Patches a copy of a sparse save image (or the image itself: ``in_place``); ``source()``
    reparses what was patched."""

    def __init__(self, path: str | os.PathLike[str], *, durable: bool = True, in_place: bool = False) -> None:
        super().__init__(path, "memory image", durable=durable, in_place=in_place)

    def source(self) -> BlockSource:
        self._check_open()
        self._finish_writes()
        return MemoryImageSource(self.copy_path)


class RawImageSink(_FileSink):
    """Patches a copy of a raw image file (or the file itself: ``in_place``)."""

    def __init__(self, path: str | os.PathLike[str], *, durable: bool = True, in_place: bool = False) -> None:
        super().__init__(path, "raw image", durable=durable, in_place=in_place)

    def source(self) -> BlockSource:
        self._check_open()
        self._finish_writes()
        return RawImageSource(self.copy_path)


_ZEROS = bytes(LEAF_SIZE)


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """Whether a leaf's bytes (at most ``LEAF_SIZE``) are all zeros: a compare that stops at the
    first other byte (~0.1 µs for a page of data) where ``count(0)`` scanned every byte (~6 µs), per
    leaf written inside the downtime."""
    return data == _ZEROS[: len(data)]


def _check_leaf(index: int, data: bytes) -> None:
    if index < 0:
        raise ValueError(f"negative leaf index {index}")
    if not 0 < len(data) <= LEAF_SIZE:
        raise ValueError(f"leaf {index}: {len(data)} bytes, expected 1..{LEAF_SIZE}")


class Qcow2OverlaySink(_CopySink):
    """Patches a sparse copy of a qcow2 overlay (or the overlay itself: ``in_place``) through
    ``qemu-io`` so the guest-visible content changes exactly as asked whatever the cluster layout;
    the backing chain is left alone.

    Writes are collected (the last one per leaf wins) and applied in batches: runs of consecutive
    leaves become one ``write -s FILE`` or ``write -z`` command, many commands per qemu-io run."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        backing_tree: LeafDigests | None = None,
        qemu_img: str = "qemu-img",
        qemu_io: str = "qemu-io",
        timeout: float = DEFAULT_QEMU_TIMEOUT,
        tmp_dir: str | None = None,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        max_commands: int = DEFAULT_MAX_COMMANDS,
        max_argv_bytes: int = DEFAULT_MAX_ARGV_BYTES,
        durable: bool = True,
        in_place: bool = False,
    ) -> None:
        spath = os.fspath(path)
        if detect_format(spath) != "disk":
            raise ImageError(f"{spath}: not a qcow2 image (no {QCOW2_MAGIC!r} magic)")
        self._qemu_img, self._qemu_io, self._timeout = qemu_img, qemu_io, timeout
        self._tmp_dir, self._max_batch = tmp_dir, max_batch_bytes
        self._max_commands, self._max_argv = max_commands, max_argv_bytes
        self._backing_tree = backing_tree
        self._shrink_to: int | None = None
        self._pending: dict[int, bytes | None] = {}
        self._pending_bytes = 0
        self._flush_at = max_batch_bytes
        super().__init__(spath, "qcow2 overlay", durable=durable, in_place=in_place)
        try:
            self._virtual_size = self._query_size()
        except BaseException:
            if not in_place:
                os.unlink(self.copy_path)
            raise

    def _query_size(self) -> int:
        info = qemu_img_info(self.copy_path, fmt="qcow2", qemu_img=self._qemu_img, timeout=self._timeout)
        size = info[0].get("virtual-size")
        if not isinstance(size, int):
            raise ImageError(f"{self.path}: qemu-img info gave no virtual size")
        return size

    def write(self, index: int, data: bytes) -> None:
        """Queue a leaf; an all-zero one becomes ``write -z`` (no data file, no allocation)."""
        self._check_open()
        _check_leaf(index, data)
        if is_zero(data):
            self.zero(index)
            return
        old = self._pending.get(index)
        self._pending_bytes += len(data) - (len(old) if old else 0)
        self._pending[index] = bytes(data)
        if self._pending_bytes >= self._flush_at:
            self.flush()

    def zero(self, index: int) -> None:
        self._check_open()
        _check_leaf(index, b"\0")
        old = self._pending.get(index)
        self._pending_bytes -= len(old) if old else 0
        self._pending[index] = None

    def set_size(self, size: int) -> None:
        """``qemu-img resize`` the copy when the virtual size differs (pending writes first when
        shrinking, so nothing is written past the new end). In place, a shrink waits for the last
        flush: what lies past the new end is still the disk's until then."""
        self._check_open()
        if size < 0 or size % 512:
            raise ValueError(f"qcow2 virtual size {size} is not a non-negative multiple of 512")
        self._shrink_to = None
        if size == self._virtual_size:
            return
        if size < self._virtual_size and self.in_place:
            self._shrink_to = size
            return
        self._resize(size)

    def _resize(self, size: int) -> None:
        argv = [self._qemu_img, "resize", "-q", "-f", "qcow2"]
        if size < self._virtual_size:
            self.flush()
            argv.append("--shrink")
        run_tool([*argv, self.copy_path, str(size)], timeout=self._timeout, what=f"{self.path}: qemu-img resize",
                 error=ImageError)
        self._virtual_size = size

    def flush(self, *, final: bool = False) -> None:
        """Apply the pending writes that lie inside the disk now. Writes past its end wait for a
        growing ``set_size``; at ``final`` (source, commit) any still waiting is an error."""
        self._check_open()
        size = self._virtual_size
        ready: dict[int, bytes | None] = {}
        waiting: dict[int, bytes | None] = {}
        for index, data in self._pending.items():
            offset = index * LEAF_SIZE
            inside = offset < size if data is None else offset + len(data) <= size
            (ready if inside else waiting)[index] = data
        if final:
            beyond = sorted(i for i, d in waiting.items() if d is not None)
            if beyond:
                raise ImageError(
                    f"{self.path}: leaf {beyond[0]} ends past the disk's end ({size} bytes); call set_size first"
                )
            waiting = {}  # zero leaves past the end are zeros already
        if ready:
            with tempfile.TemporaryDirectory(prefix="rm-qemu-io-", dir=self._tmp_dir) as tmp:
                batch: list[str] = []
                argv_bytes = 0
                for cmd in self._commands(ready, tmp):
                    if batch and (len(batch) >= self._max_commands or argv_bytes + len(cmd) > self._max_argv):
                        self._run_qemu_io(batch, tmp)
                        batch, argv_bytes = [], 0
                    batch.append(cmd)
                    argv_bytes += len(cmd) + 4
                if batch:
                    self._run_qemu_io(batch, tmp)
        self._pending = waiting
        self._pending_bytes = sum(len(d) for d in waiting.values() if d is not None)
        self._flush_at = self._pending_bytes + self._max_batch
        if final and self._shrink_to is not None:
            shrink, self._shrink_to = self._shrink_to, None
            self._resize(shrink)

    def _commands(self, pending: dict[int, bytes | None], tmp: str) -> Iterator[str]:
        """qemu-io commands for ``pending``: one per run of consecutive data or zero leaves. Data
        files are named relative to ``tmp``, the working directory (qemu-io splits its commands on
        blanks, so no path of ours goes into them)."""
        size = self._virtual_size
        items = sorted(pending.items())
        k = 0
        while k < len(items):
            first, data = items[k]
            is_zero = data is None
            j = k + 1
            while (
                j < len(items)
                and items[j][0] == items[j - 1][0] + 1
                and (items[j][1] is None) == is_zero
                and (is_zero or len(items[j - 1][1] or b"") == LEAF_SIZE)
            ):
                j += 1
            offset, last = first * LEAF_SIZE, items[j - 1][0]
            run = items[k:j]
            k = j
            if is_zero:
                yield f"write -q -z {offset} {min((last + 1) * LEAF_SIZE, size) - offset}"
                continue
            name = f"d{first}"
            length = 0
            with open(os.path.join(tmp, name), "wb") as f:
                for _, piece in run:
                    length += f.write(piece or b"")
            yield f"write -q -s {name} {offset} {length}"

    def _run_qemu_io(self, commands: list[str], cwd: str) -> None:
        # not durable: QEMU's flushes to the disk are skipped (its metadata still reaches the file
        # when qemu-io closes it); durable: it flushes, and commit fsyncs besides
        argv = [self._qemu_io, "-f", "qcow2", *(() if self.durable else ("-t", "unsafe"))]
        for cmd in commands:
            argv += ["-c", cmd]
        argv.append(os.path.abspath(self.copy_path))
        proc = run_tool(argv, timeout=self._timeout, what=f"{self.path}: qemu-io", error=ImageError, cwd=cwd)
        out = proc.stdout + proc.stderr
        if "fail" in out.lower() or "error" in out.lower():
            raise ImageError(f"{self.path}: qemu-io reported: {out.strip().splitlines()[-1][:300]}")

    def source(self) -> BlockSource:
        self._check_open()
        self.flush(final=True)
        return Qcow2OverlaySource(
            self.copy_path,
            backing_tree=self._backing_tree,
            qemu_img=self._qemu_img,
            timeout=self._timeout,
            tmp_dir=self._tmp_dir,
        )

    def _finish_writes(self) -> None:
        self.flush(final=True)

    def abort(self) -> None:
        self._pending.clear()
        super().abort()


def open_sink(
    path: str | os.PathLike[str],
    *,
    backing_tree: LeafDigests | None = None,
    qemu_img: str = "qemu-img",
    qemu_io: str = "qemu-io",
) -> BlockSink:
    """The right sink for ``path``'s format (sniffed from the magic, as ``open_source`` does)."""
    kind = detect_format(path)
    if kind == "memory":
        return MemoryImageSink(path)
    if kind == "disk":
        return Qcow2OverlaySink(path, backing_tree=backing_tree, qemu_img=qemu_img, qemu_io=qemu_io)
    return RawImageSink(path)
