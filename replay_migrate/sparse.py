"""Sparse files, one implementation for every layer: their data extents, a copy that keeps them
sparse, and putting a file in its place by a hard link or a rename, with a sparse copy where the
two paths are on different file systems (EXDEV: a tmpfs suspend folder, a site's bind mount).

A 1 GiB guest's memory image holds ~250 MiB of data; a plain copy would write the rest as zeros
(disk space, and minutes of I/O inside a migration's downtime). Copies read only the source's data
extents (SEEK_DATA/SEEK_HOLE) and write only the pages that are not all zeros, so the copy is at
most as allocated as the source (``cp --sparse=always``, in-process: no tool, no error text to parse).

Standard library only: the guest image carries this package too.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from replay_migrate.errors import ImageError
from replay_migrate.safeopen import open_regular

PAGE = 4096
"""Unit a copy checks for zeros (and leaves out): the guest's page, which is also the Merkle leaf
size (``differ.source.LEAF_SIZE``), so a patched image's all-zero leaves become holes."""
DEFAULT_COPY_CHUNK = 8 << 20
"""Bytes moved per system call when copying (large: copies run at disk speed)."""
FICLONE = 0x40049409
"""ioctl that makes the copy share the original's extents (btrfs, XFS): instant and exact."""
_NO_REFLINK = (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS, errno.EBADF)


def data_extents(fd: int, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
    """Yield ``(start, end)`` of the data (non-hole) extents of ``fd`` within ``[start, end)``.

    Uses SEEK_DATA/SEEK_HOLE so holes are never read; a file system without them yields one extent."""
    if end is None:
        end = os.fstat(fd).st_size
    pos = start
    while pos < end:
        try:
            pos = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, end
                return
            raise
        if pos >= end:
            return
        hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        yield pos, hole
        pos = hole


def sparse_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, replace: bool = False,
                chunk: int = DEFAULT_COPY_CHUNK, page: int = PAGE) -> str:
    """Copy the regular file ``src`` to ``dst`` keeping it sparse: a reflink where the file system
    can, else the source's data extents without their all-zero ``page``-sized pages. Returns
    ``"reflink"`` or ``"sparse"``. The source's mode is kept.

    ``dst`` must not exist, unless ``replace`` (it is deleted first: for files this project names
    itself, never a user's). On any failure, interruptions included, ``dst`` is deleted: no
    partial copy is left to be taken for a whole one. Raises ImageError naming both files."""
    spath, dpath = os.fspath(src), os.fspath(dst)
    sfd, st = open_regular(spath, "file to copy", error=ImageError)
    try:
        if replace:
            Path(dpath).unlink(missing_ok=True)
        try:
            dfd = os.open(dpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise ImageError(f"{dpath}: cannot create the copy of {spath}: {e.strerror}") from None
        try:
            os.fchmod(dfd, stat.S_IMODE(st.st_mode))
            try:
                fcntl.ioctl(dfd, FICLONE, sfd)
                return "reflink"
            except OSError as e:
                if e.errno not in _NO_REFLINK:
                    raise
            size = os.fstat(sfd).st_size
            os.ftruncate(dfd, size)
            for start, end in data_extents(sfd, 0, size):
                _copy_nonzero(sfd, dfd, start, end, chunk, page)
            return "sparse"
        except BaseException as e:
            os.close(dfd)
            dfd = -1
            os.unlink(dpath)
            if isinstance(e, OSError):
                raise ImageError(f"{spath}: copying it to {dpath} failed: {e.strerror or e}") from None
            raise
        finally:
            if dfd >= 0:
                os.close(dfd)
    finally:
        os.close(sfd)


def _copy_nonzero(sfd: int, dfd: int, start: int, end: int, chunk: int, page: int) -> None:
    """Copy ``[start, end)`` writing only the ``page``-sized pages that are not all zeros (the
    destination is a fresh sparse file: what is not written reads as zeros)."""
    chunk = max(page, chunk - chunk % page)
    zero = bytes(page)
    pos = start - start % page
    while pos < end:
        data = os.pread(sfd, min(chunk, end - pos), pos)
        if not data:
            raise OSError(errno.EIO, f"source ended at {pos}")
        n, k = len(data), 0
        while k < n:
            while k < n and data[k:k + page] == zero[:n - k]:
                k += page
            first = k
            while k < n and data[k:k + page] != zero[:n - k]:
                k += page
            if first < n:
                pwrite_all(dfd, memoryview(data)[first:min(k, n)], pos + first)
        pos += n


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``pwrite`` may write less than asked)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def link_or_copy(src: Path, dst: Path) -> str:
    """Give ``src`` the second name ``dst`` (a hard link: for files nobody writes any more), or
    where ``dst`` is on another file system a sparse copy. Returns ``"link"``, ``"reflink"`` or
    ``"sparse"``. ``dst`` must not exist."""
    try:
        os.link(src, dst)
        return "link"
    except OSError as e:        # another file system, or another mount of it (a bind mount)
        if e.errno != errno.EXDEV:
            raise ImageError(f"{src}: cannot link it as {dst}: {e.strerror}") from None
    return sparse_copy(src, dst)


def move(src: Path, dst: Path) -> str:
    """Rename ``src`` to ``dst`` (replacing it); across file systems, a sparse copy beside ``dst``
    (``dst.partial``, this function's own name: a stale one is replaced) renamed over it, then
    ``src`` deleted. Returns ``"rename"``, ``"reflink"`` or ``"sparse"``. ``dst`` never holds a
    partial copy, and ``src`` is kept until ``dst`` is whole."""
    try:
        os.replace(src, dst)
        return "rename"
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise ImageError(f"{src}: cannot move it to {dst}: {e.strerror}") from None
    partial = dst.with_name(dst.name + ".partial")
    try:
        how = sparse_copy(src, partial, replace=True)
        os.replace(partial, dst)
    finally:
        partial.unlink(missing_ok=True)
    src.unlink()
    return how
