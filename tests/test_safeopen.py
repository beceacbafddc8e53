"""replay_migrate.safeopen: every kind of path a user can pass, for reading, writing and replacing.

Real FIFOs, devices, links and an immutable folder (root cannot write into it either: it stands in
for the read-only folder of a user without the right). No test here may hang: a FIFO is never
opened blocking (pytest-timeout turns a regression into a failure instead of a stuck run)."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replay_migrate.errors import ImageError, UsageError
from replay_migrate.safeopen import (
    check_output,
    check_output_dir,
    check_regular,
    check_replaceable,
    kind_of,
    make_output_dir,
    open_output,
    open_regular,
    read_regular,
    write_output,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody can create files in, root included (chattr +i), holding one file."""
    d = tmp_path / "ro"
    d.mkdir()
    (d / "f").write_bytes(b"inside")
    subprocess.run(["chattr", "+i", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["chattr", "-i", str(d)], check=True)


def things(tmp_path: Path) -> dict[str, Path]:
    """One path of each kind (a device made with mknod, so a bug can harm no real one)."""
    f = tmp_path / "file"
    f.write_bytes(b"content")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(f)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    os.mknod(tmp_path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return {"file": f, "fifo": fifo, "dir": tmp_path / "dir", "link": tmp_path / "link",
            "dangling": tmp_path / "dangling", "null": tmp_path / "null", "missing": tmp_path / "missing",
            "dev-zero": Path("/dev/zero"), "dev-null": Path("/dev/null")}


READ_REFUSED = {
    "fifo": "a FIFO", "dir": "a directory", "dangling": "dangling symbolic link", "null": "character device",
    "missing": "no such file", "dev-zero": "character device", "dev-null": "character device",
}


@pytest.mark.parametrize("kind", sorted(READ_REFUSED))
def test_reading_anything_but_a_regular_file_is_refused_without_waiting(tmp_path: Path, kind: str) -> None:
    p = things(tmp_path)[kind]
    with pytest.raises(ImageError, match=READ_REFUSED[kind]):
        open_regular(p, "image", error=ImageError)
    with pytest.raises(UsageError, match=READ_REFUSED[kind]):
        read_regular(p, "workload", max_bytes=100)
    with pytest.raises(UsageError, match=READ_REFUSED[kind]):
        check_regular(p, "certificate")


@pytest.mark.parametrize("kind", sorted(READ_REFUSED))
def test_opening_for_a_rewrite_in_place_refuses_the_same_without_waiting(tmp_path: Path, kind: str) -> None:
    """``writable``: read and rewrite through one descriptor (a save header); a FIFO opened for
    writing would wait for a reader, so it must be refused just as fast."""
    with pytest.raises(ImageError, match=READ_REFUSED[kind]):
        open_regular(things(tmp_path)[kind], "save image", error=ImageError, writable=True)


def test_opening_for_a_rewrite_in_place(tmp_path: Path) -> None:
    f = things(tmp_path)["file"]
    fd, st = open_regular(f, "save image", writable=True)
    try:
        assert st.st_size == 7 and os.get_blocking(fd)
        os.pwrite(fd, b"C", 0)
    finally:
        os.close(fd)
    assert f.read_bytes() == b"Content"      # in place: neither truncated nor replaced


def test_reading_a_regular_file_or_a_link_to_one(tmp_path: Path) -> None:
    t = things(tmp_path)
    for p in (t["file"], t["link"]):
        fd, st = open_regular(p, "image")
        try:
            assert stat.S_ISREG(st.st_mode) and os.read(fd, 100) == b"content"
            assert os.get_blocking(fd)      # O_NONBLOCK cleared for the caller
        finally:
            os.close(fd)
        assert read_regular(p, "workload", max_bytes=7) == b"content"
    with pytest.raises(UsageError, match="larger than 6 bytes"):
        read_regular(t["file"], "workload", max_bytes=6)
    with pytest.raises(UsageError, match="symbolic link"):
        open_regular(t["link"], "image", follow=False)


def test_a_fifo_with_a_writer_is_still_refused(tmp_path: Path) -> None:
    fifo = things(tmp_path)["fifo"]
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    writer = os.open(fifo, os.O_WRONLY)
    try:
        with pytest.raises(UsageError, match="a FIFO"):
            read_regular(fifo, "log", max_bytes=10)
        with pytest.raises(UsageError, match="a FIFO"):
            open_output(fifo, "log")               # a reader is there: open succeeds, fstat refuses
    finally:
        os.close(writer)
        os.close(reader)


WRITE_REFUSED = {
    "fifo": "a FIFO", "dir": "a directory", "link": "symbolic link", "dangling": "symbolic link",
    "null": "character device", "dev-null": "character device", "dev-zero": "character device",
}


@pytest.mark.parametrize("kind", sorted(WRITE_REFUSED))
def test_writing_refuses_links_fifos_folders_and_devices(tmp_path: Path, kind: str) -> None:
    t = things(tmp_path)
    p = t[kind]
    with pytest.raises(UsageError, match=WRITE_REFUSED[kind]):
        check_output(p, "screenshot")
    with pytest.raises(UsageError, match=WRITE_REFUSED[kind]):
        write_output(p, b"new", "screenshot")
    assert t["file"].read_bytes() == b"content"            # a link's target is left alone
    assert not (tmp_path / "nowhere").exists()             # a dangling link's target is not created


def test_writing_a_new_or_existing_regular_file(tmp_path: Path) -> None:
    t = things(tmp_path)
    check_output(t["missing"], "log")
    assert not t["missing"].exists()                       # checking creates nothing
    write_output(t["missing"], b"abc", "log")
    write_output(t["file"], b"x", "log")                   # truncated, then written
    assert t["missing"].read_bytes() == b"abc" and t["file"].read_bytes() == b"x"
    with pytest.raises(UsageError, match="does not exist"):
        check_output(tmp_path / "no" / "such" / "f", "log")


def test_writing_into_a_read_only_folder(readonly_dir: Path) -> None:
    new = readonly_dir / "new"
    with pytest.raises(UsageError, match="cannot write in the folder"):
        check_output(new, "screenshot")
    with pytest.raises(UsageError, match="cannot write the screenshot: Operation not permitted"):
        write_output(new, b"x", "screenshot")
    assert not new.exists()
    with pytest.raises(UsageError, match="cannot write in the folder"):
        check_output_dir(readonly_dir, "screenshots")
    with pytest.raises(UsageError, match="cannot write in the folder"):
        make_output_dir(readonly_dir / "sub", "screenshots")
    # a file that exists is written in place (like a shell redirection): its folder is not changed
    check_output(readonly_dir / "f", "log")
    write_output(readonly_dir / "f", b"rewritten", "log")
    assert (readonly_dir / "f").read_bytes() == b"rewritten"


def test_output_folders(tmp_path: Path) -> None:
    t = things(tmp_path)
    assert make_output_dir(tmp_path / "a" / "b", "screenshots").is_dir()
    check_output_dir(t["dir"], "screenshots")
    for kind in ("file", "fifo", "null"):
        with pytest.raises(UsageError, match="not a folder"):
            check_output_dir(t[kind], "screenshots")
    with pytest.raises(UsageError, match="dangling symbolic link"):
        make_output_dir(t["dangling"], "screenshots")
    (tmp_path / "dirlink").symlink_to(t["dir"])
    check_output_dir(tmp_path / "dirlink", "screenshots")     # a folder's link is followed: files
    assert not (tmp_path / "nowhere").exists()                # in it are created by name


REPLACE_REFUSED = {
    "fifo": "a FIFO", "dir": "a directory", "link": "symbolic link", "dangling": "symbolic link",
    "null": "character device", "missing": "no such file",
}


@pytest.mark.parametrize("kind", sorted(REPLACE_REFUSED))
def test_replacing_needs_a_plain_regular_file(tmp_path: Path, kind: str) -> None:
    with pytest.raises(ImageError, match=REPLACE_REFUSED[kind]):
        check_replaceable(things(tmp_path)[kind], "image", error=ImageError)


def test_replacing_refuses_hard_links_and_read_only_folders(tmp_path: Path, readonly_dir: Path) -> None:
    f = things(tmp_path)["file"]
    assert check_replaceable(f, "image").st_size == 7
    os.link(f, tmp_path / "other-name")
    with pytest.raises(UsageError, match="2 hard links"):
        check_replaceable(f, "image")
    with pytest.raises(UsageError, match="cannot write in the folder"):
        check_replaceable(readonly_dir / "f", "image")


def test_kind_of_names_every_type() -> None:
    assert kind_of(stat.S_IFSOCK) == "a socket" and kind_of(stat.S_IFBLK) == "a block device"


def test_a_socket_is_refused(tmp_path: Path) -> None:
    import socket

    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(tmp_path / "sock"))
        with pytest.raises(UsageError, match="a socket"):
            open_regular(tmp_path / "sock", "log")
        with pytest.raises(UsageError, match="a socket"):
            write_output(tmp_path / "sock", b"", "log")
    finally:
        s.close()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_in_a_name_give_a_refusal_or_a_file(name: bytes) -> None:
    """Whatever the path (NUL bytes, '..', very long, undecodable), an error of ours or success."""
    path = os.fsdecode(name) or "."
    try:
        fd, _ = open_regular(path, "file")
        os.close(fd)
    except UsageError:
        pass
