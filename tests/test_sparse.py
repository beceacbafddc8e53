"""replay_migrate.sparse: the one sparse copy, hard link or copy, rename or copy.

Across file systems is tested for real: /dev/shm (a tmpfs, like a suspend folder) and pytest's
tmp_path on the disk give a real EXDEV. A failing copy is made to fail for real too: a child
process whose file-size limit (RLIMIT_FSIZE) is below the copy's size.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from differ.source import LEAF_SIZE
from replay_migrate.errors import ImageError
from replay_migrate.sparse import PAGE, data_extents, link_or_copy, move, sparse_copy

MIB = 1 << 20


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def make_sparse(path: Path) -> bytes:
    """4 MiB apparent: data, a hole, 20 pages of written zeros, data, a hole, an odd tail."""
    with open(path, "wb") as f:
        f.write(os.urandom(PAGE))
        f.seek(MIB)
        f.write(bytes(20 * PAGE) + os.urandom(100))
        f.truncate(4 * MIB + 7)
    return path.read_bytes()


@pytest.fixture
def shm() -> Iterator[Path]:
    """A folder on a tmpfs: another file system than tmp_path."""
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="rm-test-sparse-") as d:
        yield Path(d)


def test_the_page_is_the_leaf_size() -> None:
    assert PAGE == LEAF_SIZE


def test_data_extents_skip_holes(tmp_path: Path) -> None:
    make_sparse(tmp_path / "s")
    fd = os.open(tmp_path / "s", os.O_RDONLY)
    try:
        extents = list(data_extents(fd))
        assert extents[0][0] == 0 and extents[-1][1] <= 4 * MIB + 7
        assert all(not (MIB > s >= 2 * PAGE) for s, _ in extents)     # nothing in the first hole
        assert list(data_extents(fd, 3 * MIB)) == []
    finally:
        os.close(fd)


def test_a_copy_keeps_holes_and_leaves_zero_pages_out(tmp_path: Path) -> None:
    src, dst = tmp_path / "s", tmp_path / "d"
    want = make_sparse(src)
    os.chmod(src, 0o640)
    assert sparse_copy(src, dst) in ("reflink", "sparse")
    assert dst.read_bytes() == want
    assert os.stat(dst).st_mode & 0o777 == 0o640
    assert allocated(dst) <= allocated(src) - 16 * PAGE     # the written zeros became a hole


def test_a_copy_never_overwrites_unless_asked(tmp_path: Path) -> None:
    src, dst = tmp_path / "s", tmp_path / "d"
    want = make_sparse(src)
    dst.write_bytes(b"keep me")
    with pytest.raises(ImageError, match="cannot create the copy"):
        sparse_copy(src, dst)
    assert dst.read_bytes() == b"keep me"
    sparse_copy(src, dst, replace=True)
    assert dst.read_bytes() == want
    with pytest.raises(ImageError, match="cannot open"):
        sparse_copy(tmp_path / "missing", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _limited(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # EFBIG instead of a killed child
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def run_limited(code: str, *args: Path) -> subprocess.CompletedProcess[str]:
    """``code`` in a child that may not write files beyond 1 MiB (the copies here are 4 MiB)."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          preexec_fn=lambda: _limited(MIB), check=False, timeout=60)


def test_a_failed_copy_leaves_no_partial_file(tmp_path: Path) -> None:
    src, dst = tmp_path / "s", tmp_path / "d"
    make_sparse(src)
    r = run_limited("import sys\nfrom replay_migrate.sparse import sparse_copy\n"
                    "try:\n    sparse_copy(sys.argv[1], sys.argv[2])\n"
                    "except Exception as e:\n    print(type(e).__name__, e)\n", src, dst)
    assert r.stdout.startswith("ImageError") and "copying it to" in r.stdout, r.stderr
    assert not dst.exists()


def test_a_link_on_one_file_system(tmp_path: Path) -> None:
    src, dst = tmp_path / "s", tmp_path / "d"
    make_sparse(src)
    assert link_or_copy(src, dst) == "link"
    assert os.stat(dst).st_ino == os.stat(src).st_ino
    with pytest.raises(ImageError, match="cannot link"):
        link_or_copy(src, dst)


def test_a_sparse_copy_across_file_systems(tmp_path: Path, shm: Path) -> None:
    src, dst = shm / "s", tmp_path / "d"
    want = make_sparse(src)
    assert link_or_copy(src, dst) == "sparse"
    assert dst.read_bytes() == want and src.exists()
    assert os.stat(dst).st_ino != os.stat(src).st_ino
    assert allocated(dst) < 2 * MIB


def test_a_move_renames_on_one_file_system(tmp_path: Path) -> None:
    src, dst = tmp_path / "s", tmp_path / "d"
    want = make_sparse(src)
    dst.write_bytes(b"old")
    assert move(src, dst) == "rename"
    assert not src.exists() and dst.read_bytes() == want


def test_a_move_from_a_tmpfs_copies_then_deletes(tmp_path: Path, shm: Path) -> None:
    """A state saved into a tmpfs suspend folder (``--suspend-dir``) moving into the checkpoint
    store: the image arrives whole, holes kept, a stale partial copy replaced, and leaves the tmpfs."""
    src, dst = shm / "x.sav", tmp_path / "memory.sav"
    want = make_sparse(src)
    (tmp_path / "memory.sav.partial").write_bytes(b"from a killed move")
    assert move(src, dst) == "sparse"
    assert not src.exists() and dst.read_bytes() == want and allocated(dst) < 2 * MIB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.sav"]


def test_a_failed_move_keeps_the_source_and_leaves_no_partial(tmp_path: Path, shm: Path) -> None:
    src, dst = shm / "x.sav", tmp_path / "memory.sav"
    want = make_sparse(src)
    dst.write_bytes(b"old")
    r = run_limited("import sys\nfrom pathlib import Path\nfrom replay_migrate.sparse import move\n"
                    "try:\n    move(Path(sys.argv[1]), Path(sys.argv[2]))\n"
                    "except Exception as e:\n    print(type(e).__name__, e)\n", src, dst)
    assert r.stdout.startswith("ImageError"), r.stderr
    assert src.read_bytes() == want and dst.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.sav"]
