"""Files that more than one writer may make at once: caches (trees, digests, probe verdicts) and
manifests. Two rules, one place:

- a writer takes :func:`locked` on a lock file beside what it makes, checks again whether the
  work is done, and only then does it: the work is done once. ``flock`` locks belong to an open
  file description, so they exclude other threads of one process (each opens the lock file
  itself) as well as other processes; an in-process lock alone would not do the second, and
  ``fcntl``/``lockf`` record locks would not do the first.
- a file is replaced whole, through a temporary file with a name of its own in the same folder
  (:func:`atomic_write`): two writers never share a temporary file, and a reader sees the old
  file or the new one, never half of one.

Standard library only: the guest image carries this package too.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

FILE_MODE = 0o644
"""Mode of a file written by :func:`atomic_write` (``mkstemp`` would leave it 0600)."""


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing; never deleted, since deleting
    a lock file lets a late opener lock a file nobody else sees). Blocks until it is free."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)          # releases the lock


def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], None], *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` (bytes, or a function that writes to the open file) through
    a uniquely named temporary file in the same folder. ``durable``: fsync the file and the folder
    before returning. Raises ``OSError``; the temporary file never outlives a failure."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes | bytearray | memoryview):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fchmod(f.fileno(), FILE_MODE)
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
