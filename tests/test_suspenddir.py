"""Where a side saves its VM at suspend (migration.suspenddir): a private folder in the named
tmpfs when it has room, the clone's folder otherwise; nothing another user planted is written."""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
from pathlib import Path

import pytest

from migration.suspenddir import (
    IMAGE_NAME,
    SUBDIR,
    SUSPEND_DIR_ENV,
    has_room,
    image_whole,
    remove_saved_image,
    save_until_whole,
    saved_image_names,
    saved_images,
    suspend_dir_arg,
    suspend_dir_from_env,
    suspend_image,
)
from replay_migrate import savefmt
from replay_migrate.errors import UsageError, VMError


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


class SlowSave:
    """A save as libvirt's goes, in steps the test releases: the header with the partial magic, then
    the final magic (QEMU done), then the call's return (libvirt stopping QEMU). Each step waits on
    its own event; ``fail_at`` makes a step raise instead."""

    def __init__(self, fail_at: str | None = None) -> None:
        self.steps = {k: threading.Event() for k in ("partial", "whole", "return")}
        self.fail_at = fail_at
        self.found_old = False

    def save(self, path: Path) -> None:
        self.found_old = path.exists()
        for step, magic in (("partial", savefmt.PARTIAL_MAGIC), ("whole", savefmt.MAGIC), ("return", None)):
            assert self.steps[step].wait(10)
            if self.fail_at == step:
                raise VMError(f"save failed at {step}")
            if magic is not None:
                with open(path, "r+b" if path.exists() else "wb") as f:
                    f.write(magic + bytes(64))

    def release(self, *steps: str) -> None:
        for step in steps:
            self.steps[step].set()


def test_the_save_returns_once_its_image_is_whole_and_runs_on(tmp_path: Path) -> None:
    """The hashing starts when the image is whole, not when libvirt's call returns (0.2-0.6 s later,
    its QEMU stopped): the returned task is the call, still running."""
    image = tmp_path / "s.sav"
    image.write_bytes(savefmt.MAGIC + bytes(64))         # an older image of that name: not this one
    saver = SlowSave()

    async def run() -> None:
        saver.release("partial")
        waiting = asyncio.ensure_future(save_until_whole(saver, image, poll_s=0.001))
        done, _ = await asyncio.wait({waiting}, timeout=0.2)
        assert not done and not image_whole(image)       # partial header: still saving
        saver.release("whole")
        task = await asyncio.wait_for(waiting, 10)
        assert image_whole(image) and not task.done()
        saver.release("return")
        await asyncio.wait_for(task, 10)

    asyncio.run(run())
    assert not saver.found_old


@pytest.mark.parametrize("fail_at", ["partial", "whole"])
def test_a_save_that_fails_before_its_image_is_whole_raises(tmp_path: Path, fail_at: str) -> None:
    saver = SlowSave(fail_at)
    saver.release("partial", "whole", "return")
    with pytest.raises(VMError, match=f"failed at {fail_at}"):
        asyncio.run(save_until_whole(saver, tmp_path / "s.sav", poll_s=0.001))


def test_a_save_that_fails_after_its_image_is_whole_raises_from_its_task(tmp_path: Path) -> None:
    """libvirt may still fail the call after the image is whole: the caller learns it from the task
    before it relies on the save."""
    saver = SlowSave("return")
    saver.release("partial", "whole")

    async def run() -> None:
        task = await save_until_whole(saver, tmp_path / "s.sav", poll_s=0.001)
        saver.release("return")
        with pytest.raises(VMError, match="failed at return"):
            await task

    asyncio.run(run())


def test_image_whole_reads_only_a_final_regular_header(tmp_path: Path) -> None:
    assert not image_whole(tmp_path / "missing.sav")
    (tmp_path / "empty.sav").write_bytes(b"")
    assert not image_whole(tmp_path / "empty.sav")
    (tmp_path / "part.sav").write_bytes(savefmt.PARTIAL_MAGIC + bytes(64))
    assert not image_whole(tmp_path / "part.sav")
    (tmp_path / "whole.sav").write_bytes(savefmt.MAGIC + bytes(64))
    assert image_whole(tmp_path / "whole.sav")
    (tmp_path / "link.sav").symlink_to(tmp_path / "whole.sav")
    with pytest.raises(OSError):
        image_whole(tmp_path / "link.sav")
