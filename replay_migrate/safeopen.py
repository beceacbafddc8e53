"""File arguments: what a path names is checked before anything reads or writes it.

Opening a FIFO waits for its other end, a character device reads forever (``/dev/zero``) or takes
everything (``/dev/null``), a directory is not a file, and a symbolic link that a command writes
through or renames over ends up somewhere the user did not name. So:

- a file a command **reads** is opened non-blocking (a FIFO or a device cannot make ``open`` wait)
  and checked with ``fstat`` on the descriptor itself (no window between check and use): only a
  regular file is accepted; symbolic links are followed, as every reader does;
- a file a command **writes** (a log, a screenshot) is opened with ``O_NOFOLLOW`` and without
  ``O_TRUNC``, checked the same way, and only then truncated: a link is refused, never followed
  (as root, a link planted in a shared folder would redirect the write anywhere);
- a file a command **replaces** (``sync``'s target, patched as a copy renamed over it) must be a
  regular file, not a link (the rename would turn the link into a plain file and leave the file it
  named as it was), with one name (other hard links would keep the old content), in a folder this
  process can write.

Every refusal is an error of the caller's chosen :class:`ReplayMigrateError` class naming the path
and what it is, never a traceback.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import BinaryIO

from replay_migrate.errors import ReplayMigrateError, UsageError

ErrorClass = type[ReplayMigrateError]

_OPEN_FLAGS = os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_PERMISSION = (errno.EACCES, errno.EPERM, errno.EROFS)


def kind_of(mode: int) -> str:
    """What a file of this ``st_mode`` is, for a message ("a FIFO")."""
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _why(path: str, e: OSError, doing: str) -> str:
    """One line for an ``open`` that failed: the path, what it is if that helps, the reason."""
    if e.errno == errno.ENOENT:
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                return f"{path}: cannot {doing}: a dangling symbolic link (to {os.readlink(path)})"
        except OSError:
            pass
        return f"{path}: cannot {doing}: no such file"
    if e.errno == errno.ELOOP:
        return f"{path}: is a symbolic link: give the file itself, not a link to it"
    if e.errno not in _PERMISSION:
        try:        # ENXIO (a FIFO without reader, a socket), EISDIR, ENODEV: say what it is
            mode = os.stat(path).st_mode
            if not stat.S_ISREG(mode):
                return f"{path}: is {kind_of(mode)}, not a regular file"
        except OSError:
            pass
    return f"{path}: cannot {doing}: {e.strerror or e}"


def _path(path: str | os.PathLike[str], error: ErrorClass) -> str:
    spath = os.fspath(path)
    if "\0" in spath:             # only reachable from Python, not argv; os.open raises ValueError
        raise error(f"{spath!r}: a NUL byte in a file name")
    return spath


def _link(path: str) -> str:
    """"a symbolic link (to X)", or "a dangling symbolic link (to X)" when X does not exist."""
    return f"a {'' if os.path.exists(path) else 'dangling '}symbolic link (to {os.readlink(path)})"


def _blocking(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)


def open_regular(path: str | os.PathLike[str], what: str, *, error: ErrorClass = UsageError,
                 follow: bool = True, writable: bool = False) -> tuple[int, os.stat_result]:
    """Open an existing regular file for reading: ``(fd, its stat)``; anything else raises
    ``error`` naming ``path`` as the ``what`` it should have been. ``follow=False`` refuses a link.
    ``writable`` opens it for reading and writing in place (no truncation, no creation): one
    descriptor to check, read and rewrite, so no other file can be swapped in between."""
    spath = _path(path, error)
    flags = _OPEN_FLAGS | (os.O_RDWR if writable else os.O_RDONLY)
    try:
        fd = os.open(spath, flags | (0 if follow else os.O_NOFOLLOW))
    except OSError as e:
        raise error(_why(spath, e, f"{'write' if writable else 'open'} the {what}")) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{spath}: is {kind_of(st.st_mode)}, not a regular file (the {what} must be one)")
        _blocking(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def check_regular(path: str | os.PathLike[str], what: str, *, error: ErrorClass = UsageError) -> os.stat_result:
    """:func:`open_regular` and close: for a path handed to another program (qemu-img, OpenSSL),
    which would itself block on a FIFO."""
    fd, st = open_regular(path, what, error=error)
    os.close(fd)
    return st


def read_regular(path: str | os.PathLike[str], what: str, *, max_bytes: int,
                 error: ErrorClass = UsageError) -> bytes:
    """The whole content of a regular file of at most ``max_bytes`` (larger: ``error``)."""
    fd, st = open_regular(path, what, error=error)
    with os.fdopen(fd, "rb") as f:
        if st.st_size > max_bytes:
            raise error(f"{os.fspath(path)}: larger than {max_bytes} bytes")
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise error(f"{os.fspath(path)}: cannot read the {what}: {e.strerror}") from None
    if len(data) > max_bytes:
        raise error(f"{os.fspath(path)}: larger than {max_bytes} bytes")
    return data


def _folder_writable(folder: str, path: str, what: str, error: ErrorClass) -> None:
    try:
        st = os.stat(folder)
    except OSError as e:
        raise error(f"{path}: the folder {folder} {'does not exist' if e.errno == errno.ENOENT else e.strerror}"
                    f" (for the {what})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise error(f"{path}: {folder} is {kind_of(st.st_mode)}, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        # os.access answers for root too: EROFS and immutable folders say no
        raise error(f"{path}: cannot write in the folder {folder} (for the {what}): "
                    f"{os.strerror(errno.EACCES)}")


def check_output(path: str | os.PathLike[str], what: str, *, error: ErrorClass = UsageError) -> None:
    """Check, creating nothing, that ``path`` can be written as a regular file: it is not a link, a
    directory, a FIFO or a device; an existing file is writable, a new one's folder exists and is
    writable. Run it before starting anything; :func:`open_output` checks again when it opens."""
    spath = _path(path, error)
    try:
        st = os.lstat(spath)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise error(_why(spath, e, f"write the {what}")) from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise error(f"{spath}: is {_link(spath)}: give the file itself, the {what} is not written "
                    "through a link")
    if st is None:
        _folder_writable(os.path.dirname(os.path.abspath(spath)), spath, what, error)
    elif not stat.S_ISREG(st.st_mode):
        raise error(f"{spath}: is {kind_of(st.st_mode)}, not a regular file (the {what} must be one)")
    elif not os.access(spath, os.W_OK):      # an existing file is rewritten in place
        raise error(f"{spath}: cannot write the {what}: {os.strerror(errno.EACCES)}")


def open_output(path: str | os.PathLike[str], what: str, *, error: ErrorClass = UsageError,
                mode: int = 0o644) -> BinaryIO:
    """Create or truncate the regular file ``path`` for writing (see :func:`check_output`)."""
    spath = _path(path, error)
    try:
        fd = os.open(spath, _WRITE_FLAGS, mode)
    except OSError as e:             # a FIFO nobody reads: ENXIO at once (O_NONBLOCK), not a wait
        raise error(_why(spath, e, f"write the {what}")) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{spath}: is {kind_of(st.st_mode)}, not a regular file (the {what} must be one)")
        os.ftruncate(fd, 0)
        _blocking(fd)
    except OSError as e:
        os.close(fd)
        raise error(f"{spath}: cannot write the {what}: {e.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "wb")


def write_output(path: str | os.PathLike[str], data: bytes, what: str, *, error: ErrorClass = UsageError) -> None:
    """Write ``data`` as the regular file ``path`` (see :func:`open_output`)."""
    with open_output(path, what, error=error) as f:
        try:
            f.write(data)
        except OSError as e:
            raise error(f"{os.fspath(path)}: cannot write the {what}: {e.strerror}") from None


def check_output_dir(path: str | os.PathLike[str], what: str, *, error: ErrorClass = UsageError) -> None:
    """Check, creating nothing, that ``path`` is a folder this process can write into, or can be
    made as one (its nearest existing ancestor is a writable folder)."""
    p = Path(os.path.abspath(_path(path, error)))
    try:
        st = p.stat()
    except FileNotFoundError:
        if p.is_symlink():
            raise error(_why(str(path), FileNotFoundError(errno.ENOENT, "dangling"),
                             f"use the folder for the {what}")) from None
        parent = p.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        _folder_writable(str(parent), str(path), what, error)
        return
    except OSError as e:
        raise error(_why(str(path), e, f"use the folder for the {what}")) from None
    if not stat.S_ISDIR(st.st_mode):
        raise error(f"{path}: is {kind_of(st.st_mode)}, not a folder for the {what}")
    _folder_writable(str(p), str(path), what, error)


def make_output_dir(path: str | os.PathLike[str], what: str, *, error: ErrorClass = UsageError) -> Path:
    """:func:`check_output_dir`, then create it (and its parents)."""
    check_output_dir(path, what, error=error)
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"{path}: cannot create the folder for the {what}: {e.strerror}") from None
    return p


def check_replaceable(path: str | os.PathLike[str], what: str, *, error: ErrorClass = UsageError,
                      single_name: bool = True) -> os.stat_result:
    """Check that the existing file ``path`` can be replaced by renaming a patched copy over it:
    a regular file (not a link: see the module's docstring) in a writable folder, and with
    ``single_name`` its only name (a caller that keeps the old content under a hard link on
    purpose, as the benchmark does, passes False)."""
    spath = _path(path, error)
    try:
        lst = os.lstat(spath)
    except OSError as e:
        raise error(_why(spath, e, f"open the {what}")) from None
    if stat.S_ISLNK(lst.st_mode):
        raise error(f"{spath}: is {_link(spath)}; the {what} is replaced by "
                    "renaming a patched copy over it, which would turn the link into a plain file and "
                    "leave the file it names as it was: give that file itself")
    fd, st = open_regular(spath, what, error=error, follow=False)
    os.close(fd)
    if single_name and st.st_nlink > 1:
        raise error(f"{spath}: has {st.st_nlink} hard links; the {what} is replaced by a rename, so the "
                    "other names would keep the old content: give a file with one name")
    _folder_writable(os.path.dirname(os.path.abspath(spath)), spath, what, error)
    return st
