"""What the fuzz targets share: scratch files for targets that parse files, msgpack packing."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import msgpack

from differ.source import LEAF_SIZE

PAGE = LEAF_SIZE

# -- scratch files -------------------------------------------------------------------------------------


@functools.cache
def _scratch_dir() -> Path:
    """A private directory for the file targets (tmpfs when there is one: inputs are KiB)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="rm-fuzz-", dir=base))
    atexit.register(shutil.rmtree, path, True)
    return path


def _scratch(name: str, data: bytes) -> Path:
    path = _scratch_dir() / name
    path.write_bytes(data)
    return path


def _packb(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))
