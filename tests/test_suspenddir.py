"""Where a side saves its VM at suspend (migration.suspenddir): a private folder in the named
tmpfs when it has room, the clone's folder otherwise; nothing another user planted is written."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from migration.suspenddir import (
    IMAGE_NAME,
    SUBDIR,
    SUSPEND_DIR_ENV,
    has_room,
    remove_saved_image,
    saved_image_names,
    saved_images,
    suspend_dir_arg,
    suspend_dir_from_env,
    suspend_image,
)
from replay_migrate.errors import UsageError


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "clones" / "rm-a"
    d.mkdir(parents=True)
    return d


def test_without_a_folder_the_image_goes_into_the_clone_folder(run_dir: Path) -> None:
    assert suspend_image(run_dir, None, 1 << 30) == run_dir / IMAGE_NAME


def test_a_folder_with_room_gets_a_private_subfolder(tmp_path: Path, run_dir: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir(mode=0o1777)
    image = suspend_image(run_dir, shm, 1 << 20)
    assert image == shm / SUBDIR / "rm-a.sav"
    st = os.lstat(shm / SUBDIR)
    assert st.st_mode & 0o777 == 0o700 and st.st_uid == os.geteuid()
    assert suspend_image(run_dir, shm, 1 << 20) == image      # made once, then reused


def test_a_missing_folder_is_made(tmp_path: Path, run_dir: Path) -> None:
    assert suspend_image(run_dir, tmp_path / "new" / "shm", 1 << 20).parent == tmp_path / "new" / "shm" / SUBDIR


def test_a_folder_without_room_falls_back_to_the_state_disk(tmp_path: Path, run_dir: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    assert not has_room(tmp_path, free)
    assert suspend_image(run_dir, tmp_path, free) == run_dir / IMAGE_NAME
    assert "no room" in caplog.text


def test_a_planted_subfolder_is_refused(tmp_path: Path, run_dir: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / SUBDIR).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UsageError, match="private"):
        suspend_image(run_dir, tmp_path, 1 << 20)


def test_a_subfolder_others_can_write_is_refused(tmp_path: Path, run_dir: Path) -> None:
    (tmp_path / SUBDIR).mkdir()
    (tmp_path / SUBDIR).chmod(0o777)
    with pytest.raises(UsageError, match="private"):
        suspend_image(run_dir, tmp_path, 1 << 20)


def test_a_file_is_no_suspend_folder(tmp_path: Path, run_dir: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(UsageError, match="not a folder"):
        suspend_image(run_dir, tmp_path / "f", 1 << 20)
    with pytest.raises(argparse.ArgumentTypeError, match="not a folder"):
        suspend_dir_arg(str(tmp_path / "f"))
    assert suspend_dir_arg(str(tmp_path)) == tmp_path


def test_saved_images_finds_both_places_and_no_links(tmp_path: Path, run_dir: Path) -> None:
    shm = tmp_path / "shm"
    assert saved_images(run_dir, shm) == []
    image = suspend_image(run_dir, shm, 1 << 20)
    image.write_bytes(b"x")
    assert saved_images(run_dir, shm) == [image]
    assert saved_images(run_dir, None) == []
    (run_dir / IMAGE_NAME).write_bytes(b"y")
    assert saved_images(run_dir, shm) == [run_dir / IMAGE_NAME, image]
    image.unlink()
    image.symlink_to(run_dir / IMAGE_NAME)
    assert saved_images(run_dir, shm) == [run_dir / IMAGE_NAME]


def test_the_environment_names_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SUSPEND_DIR_ENV, raising=False)
    assert suspend_dir_from_env() is None
    monkeypatch.setenv(SUSPEND_DIR_ENV, "")
    assert suspend_dir_from_env() is None
    monkeypatch.setenv(SUSPEND_DIR_ENV, "/dev/shm")
    assert suspend_dir_from_env() == "/dev/shm"


def test_removing_a_saved_image_deletes_only_that_clones(tmp_path: Path, run_dir: Path) -> None:
    shm = tmp_path / "shm"
    image = suspend_image(run_dir, shm, 1 << 20)
    image.write_bytes(b"ram")
    (image.parent / "rm-b.sav").write_bytes(b"ram")
    assert saved_image_names(shm) == ["rm-a", "rm-b"]
    assert remove_saved_image("rm-a", shm) == image and not image.exists()
    assert remove_saved_image("rm-a", shm) is None and remove_saved_image("rm-a", None) is None
    assert remove_saved_image("rm-a", tmp_path / "no-such-folder") is None
    assert saved_image_names(shm) == ["rm-b"]
    with pytest.raises(UsageError):
        remove_saved_image("../rm-b", shm)
    assert (image.parent / "rm-b.sav").exists()


def test_nothing_is_deleted_through_a_folder_or_a_link_not_ours(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "rm-a.sav").write_bytes(b"precious")
    shm = tmp_path / "shm"
    shm.mkdir()
    (shm / SUBDIR).symlink_to(victim)
    with pytest.raises(UsageError, match="not a private folder"):
        remove_saved_image("rm-a", shm)
    assert saved_image_names(shm) == []
    (shm / SUBDIR).unlink()
    (shm / SUBDIR).mkdir(mode=0o700)
    (shm / SUBDIR / "rm-a.sav").symlink_to(victim / "rm-a.sav")
    with pytest.raises(UsageError, match="not a regular file"):
        remove_saved_image("rm-a", shm)
    os.chmod(shm / SUBDIR, 0o777)
    with pytest.raises(UsageError, match="not a private folder"):
        remove_saved_image("rm-a", shm)
    assert (victim / "rm-a.sav").read_bytes() == b"precious"
