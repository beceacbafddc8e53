"""Where a side saves its VM at suspend: the state folder's disk, or a folder on tmpfs.

The save at suspend and the restore at the target are inside the downtime, and both write or read
the whole memory image (1 GiB apparent for a 1 GiB guest). On tmpfs they run at memory speed, and
the hashing, the patching and the restore that follow read the image from RAM, not the disk. A host
with the RAM to spare names a tmpfs folder (``--suspend-dir``, or ``$REPLAY_MIGRATE_SUSPEND_DIR``);
without one, or when the folder has no room for this guest's image, the image goes into the clone's
folder as before (the state folder's disk). The image only lives there during the migration: the
target restores from it and it is gone; the source deletes it at release, or restores from it when
the migration fails.

The folder may be a shared one such as ``/dev/shm`` (world-writable): the images go into a private
subfolder ``replay-migrate`` (0700, this user's), so nobody else can plant a file or a link where
libvirt, running as root, writes a guest's memory.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import stat
from pathlib import Path
from typing import Protocol

from migration.cancel import drop, in_thread, settle
from replay_migrate import savefmt
from replay_migrate.errors import UsageError
from replay_migrate.safeopen import check_output_dir, make_output_dir
from store.paths import check_name

SUSPEND_DIR_ENV = "REPLAY_MIGRATE_SUSPEND_DIR"
"""The environment's default for ``--suspend-dir`` (unset or empty: the state folder's disk)."""
SUBDIR = "replay-migrate"
"""The private folder made inside the named one (0700)."""
SUSPEND_HEADROOM_BYTES = 64 << 20
"""Room left free beyond the guest's RAM size (the saved image's header and device state, and
whatever else shares the folder) before the folder counts as having room."""
IMAGE_NAME = "suspend.sav"
"""The saved image's name in the clone's own folder (the fallback)."""
WHOLE_POLL_S = 0.005
"""How often the image's header is read while the save call runs (16 bytes; the image turned whole
0.2-0.35 s after the call started, for a 1 GiB guest under TCG)."""

log = logging.getLogger("replay_migrate.suspenddir")


WHAT = "VM images saved at suspend"


def suspend_dir_from_env() -> str | None:
    """The folder ``$REPLAY_MIGRATE_SUSPEND_DIR`` names, or None (the state folder's disk)."""
    return os.environ.get(SUSPEND_DIR_ENV) or None


def suspend_dir_arg(value: str) -> Path:
    """``--suspend-dir``: a folder this process can write into, or make (checked when the command
    starts, not at the suspend, when a refusal would cost the migration)."""
    try:
        check_output_dir(value, WHAT)
    except UsageError as e:             # argparse's usage error: exit 64 before anything starts
        raise argparse.ArgumentTypeError(str(e)) from None
    return Path(value)


def private_dir(base: Path) -> Path:
    """``base/replay-migrate``, made 0700 if missing; refused unless it is a real folder of this
    user's that nobody else can write to (it may sit in a world-writable folder like /dev/shm)."""
    d = make_output_dir(base, WHAT) / SUBDIR
    try:
        d.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise UsageError(f"cannot make the suspend folder {d}: {e.strerror}") from None
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise UsageError(f"suspend folder {d} is not a private folder of this user's (0700): not saving a VM there")
    return d


def has_room(folder: Path, need_bytes: int, headroom: int = SUSPEND_HEADROOM_BYTES) -> bool:
    """Whether ``folder``'s file system has ``need_bytes`` free plus ``headroom``."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize >= need_bytes + headroom


def suspend_image(run_dir: Path, suspend_dir: Path | None, need_bytes: int) -> Path:
    """Where the VM of the clone in ``run_dir`` is saved at suspend: in ``suspend_dir``'s private
    folder, named after the clone's folder (one image per clone), when it has room for
    ``need_bytes`` (the guest's RAM size: the sparse image never allocates more); else, and without
    ``suspend_dir``, ``run_dir/suspend.sav``."""
    if suspend_dir is None:
        return run_dir / IMAGE_NAME
    d = private_dir(suspend_dir)
    if not has_room(d, need_bytes):
        log.warning("suspend folder %s has no room for a %d MiB guest: saving into %s instead", d,
                    need_bytes >> 20, run_dir)
        return run_dir / IMAGE_NAME
    return d / f"{run_dir.name}.sav"


def saved_images(run_dir: Path, suspend_dir: Path | None) -> list[Path]:
    """The saved images a clone may have left (a migration killed after its save): its folder's,
    and the one in ``suspend_dir``'s private folder; only those that exist, the folder's first."""
    found = [run_dir / IMAGE_NAME]
    if suspend_dir is not None:
        found.append(suspend_dir / SUBDIR / f"{run_dir.name}.sav")
    return [p for p in found if p.is_file() and not p.is_symlink()]


def remove_saved_image(name: str, suspend_dir: Path | None) -> Path | None:
    """Delete the image clone ``name`` saved into ``suspend_dir``'s private folder, if there is one
    (a migration killed after its save: SIGKILL runs no cleanup, and a 1 GiB guest's image holds
    ~250 MiB of RAM on a tmpfs until someone deletes it); returns its path, or None. Only the file
    this module names (:func:`suspend_image`: ``<suspend_dir>/replay-migrate/<name>.sav``, ``name``
    a checked clone name), and only in a private folder of this user's: nothing anybody else could
    have planted or pointed elsewhere."""
    if suspend_dir is None:
        return None
    check_name(name, "clone")
    d = suspend_dir / SUBDIR
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise UsageError(f"suspend folder {d} is not a private folder of this user's (0700): not deleting there")
    image = d / f"{name}.sav"
    try:
        if not stat.S_ISREG(os.lstat(image).st_mode):
            raise UsageError(f"{image} is not a saved image (not a regular file): not deleting it")
        image.unlink()
    except FileNotFoundError:
        return None
    log.info("deleted %s (a saved image of %s a migration left)", image, name)
    return image


def saved_image_names(suspend_dir: Path) -> list[str]:
    """The clone names of the images in ``suspend_dir``'s private folder (``<name>.sav``, regular
    files with a clone name; anything else there is not this project's and is not listed)."""
    d = suspend_dir / SUBDIR
    if not d.is_dir() or d.is_symlink():
        return []
    names = []
    for p in d.iterdir():
        if p.suffix == ".sav" and p.is_file() and not p.is_symlink():
            try:
                names.append(check_name(p.stem, "clone"))
            except UsageError:
                continue
    return sorted(names)


class Saver(Protocol):
    """What :func:`save_until_whole` saves (a :class:`vm.machine.Machine`)."""

    def save(self, path: Path) -> None: ...


def image_whole(path: Path) -> bool:
    """Whether the save image at ``path`` is complete: libvirt writes the header with
    :data:`~replay_migrate.savefmt.PARTIAL_MAGIC` first and rewrites the magic to
    :data:`~replay_migrate.savefmt.MAGIC` once QEMU has written the RAM and the device state."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        return os.pread(fd, len(savefmt.MAGIC), 0) == savefmt.MAGIC
    finally:
        os.close(fd)


async def save_until_whole(m: Saver, image: Path, *, poll_s: float = WHOLE_POLL_S) -> asyncio.Task[None]:
    """Start saving ``m`` into ``image`` and return as soon as the image is whole, with the save
    call still running as the returned task: libvirt's call returns 0.2-0.6 s later, after it has
    stopped QEMU (it polls for the process's exit every 200 ms), and the hashing that reads the
    image meanwhile takes that wait off the downtime. The caller awaits the task before it relies on
    the save having ended (its error, if any, is raised there) and before it touches the domain; a
    save that fails before its image is whole raises here. ``image`` is deleted first, so an older
    image of that name is never taken for this one."""
    image.unlink(missing_ok=True)
    task = asyncio.ensure_future(in_thread(m.save, image))
    try:
        while not task.done():
            if await asyncio.to_thread(image_whole, image):
                return task
            await asyncio.wait({task}, timeout=poll_s)
    except BaseException:
        await settle([task])                # never leave the save running behind a cancellation
        drop(task)                          # ended: its error, if any, counts as seen (this one is raised)
        raise
    task.result()                           # ended before the image was seen whole: its error, if any
    return task
