"""The guest image: built by ``vm-images/build-image.sh`` into a cache folder named by the hash of
its recipe, and reused while the recipe is unchanged (a build takes ~1-2 minutes; a reuse, none).

The recipe is the build script, the guest overlay files, the domain XML template (the kernel
command line, the devices a checkpoint is booted with) and the sources the guest runs (the recorder
agent and the shared root package): change any of them and the next use rebuilds (and every
checkpoint of the old image is made anew).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from replay_migrate.errors import HostError, ImageError
from replay_migrate.tools import run_tool
from store.paths import REPO, cache_root
from vm.spec import GuestImage

log = logging.getLogger("replay_migrate.images")
BUILD_SCRIPT = REPO / "vm-images" / "build-image.sh"
RECIPE_PARTS = (REPO / "vm-images" / "build-image.sh", REPO / "vm-images" / "overlay",
                REPO / "vm-images" / "domain.xml", REPO / "recorder", REPO / "replay_migrate")
BUILD_TIMEOUT_S = 1200.0
"""Upper bound for one image build (mmdebstrap over the package mirror)."""
BUILD_LOG_MAX = 4 << 20
"""Bytes of the build's output kept for ``build.log`` (a build prints ~1 KB)."""


def recipe_hash() -> str:
    """sha256 over the recipe's files (paths, modes and contents), stable across checkouts."""
    h = hashlib.sha256()
    files: list[Path] = []
    for part in RECIPE_PARTS:
        if part.is_dir():
            files += [p for p in part.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                      and (part.name == "overlay" or p.suffix == ".py")]
        else:
            files.append(part)
    for p in sorted(files):
        h.update(str(p.relative_to(REPO)).encode() + b"\0")
        h.update(b"x" if os.access(p, os.X_OK) else b"-")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ImageResult:
    image: GuestImage
    built: bool
    seconds: float


def images_dir() -> Path:
    return cache_root() / "images"


def ensure_image(*, force: bool = False) -> ImageResult:
    """The image for the current recipe, building it if it is not in the cache.

    A build writes into folders named after its recipe (:data:`BUILD_FOLDER`: ``<hash>.partial``,
    and the script's ``<hash>.partial.build.XXXXXX``) and holds the cache's lock all along, in every
    process it starts: the lock's descriptor is passed down, so a build whose Python caller was
    killed (its processes go on) still holds it. Whoever holds the lock therefore knows no build is
    writing, and removes what builds that died left (:func:`remove_stale_builds`; a morning of
    interrupted builds left 8 GB). A failed build removes its own at once when its processes are
    all gone, else the next build does."""
    rh = recipe_hash()
    out = images_dir() / rh
    image = GuestImage(out, rh)
    images_dir().mkdir(parents=True, exist_ok=True)
    with open(images_dir() / LOCK_NAME, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # one build at a time; a second caller reuses it
        remove_stale_builds()
        if out.is_dir() and not force:
            image.check()
            return ImageResult(image, False, 0.0)
        if shutil.which("mmdebstrap") is None:
            raise HostError("mmdebstrap is not installed (run scripts/setup-host.sh)")
        partial = out.with_name(rh + ".partial")
        if partial.exists():            # a dead build's that remove_stale_builds had to leave
            raise ImageError(f"{partial}, a dead build's folder, could not be removed (something is mounted under "
                             "it): unmount it and remove the folder, then build again")
        log.info("building guest image %s (recipe changed or not cached)", rh)
        t0 = time.monotonic()
        try:
            r = run_tool(["bash", BUILD_SCRIPT, partial, REPO], what=f"building the guest image {rh}",
                         error=ImageError, timeout=BUILD_TIMEOUT_S, check=False, max_output=BUILD_LOG_MAX,
                         max_stderr=BUILD_LOG_MAX, pass_fds=(lock.fileno(),))
        except BaseException:
            lock.close()
            _remove_if_all_gone()
            raise
        if r.returncode != 0:
            lock.close()
            _remove_if_all_gone()
            raise ImageError(f"image build failed:\n{(r.stdout + r.stderr).strip()[-2000:]}")
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
        seconds = time.monotonic() - t0
        (out / "build.log").write_text(r.stdout + r.stderr + f"\nseconds={seconds:.1f}\n")
        remove_stale_builds()       # the script's own work folder, if its clean-up did not run
        image.check()
        return ImageResult(image, True, seconds)


LOCK_NAME = ".lock"
"""The image cache's lock file: held by a build (all of its processes) and by a prune."""
BUILD_FOLDER = re.compile(r"[0-9a-f]{16}\.partial(\.build\.[A-Za-z0-9]{6})?")
"""The folders a build writes before its image is whole (``build-image.sh`` makes the second)."""


def remove_stale_builds() -> list[Path]:
    """Remove the folders of builds that are gone (:data:`BUILD_FOLDER` names only, never through a
    link, never a folder something is mounted under: a build killed inside mmdebstrap may leave its
    chroot's /proc or /dev mounted there). Call it holding the cache's lock: then no build is
    writing. Returns what was removed."""
    removed = []
    for p in sorted(images_dir().iterdir()):
        if not BUILD_FOLDER.fullmatch(p.name) or p.is_symlink() or not p.is_dir():
            continue
        mounts = _mounts_under(p)
        if mounts:
            log.error("not removing the dead image build %s: %s mounted under it (umount them first)", p,
                      ", ".join(mounts))
            continue
        log.info("removing %s, left by an image build that is gone", p)
        shutil.rmtree(p)
        removed.append(p)
    return removed


def _remove_if_all_gone() -> None:
    """After a failed build: remove its folders now if none of its processes holds the lock any
    more (else they are still writing; the next build removes them)."""
    with open(images_dir() / LOCK_NAME, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("the failed image build's processes still run: the next build removes its folders")
            return
        remove_stale_builds()


def _mounts_under(folder: Path) -> list[str]:
    """Mount points at or below ``folder`` (``/proc/self/mountinfo``; its paths escape blanks as \\040)."""
    top = os.path.realpath(folder)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if point == top or point.startswith(top + "/"):
                found.append(point)
    return found


def prune_images(keep: set[str]) -> list[Path]:
    """Remove finished cached images whose recipe hash is not in ``keep`` (builds in progress, named
    ``<hash>.partial``, are left alone); returns what was removed."""
    removed: list[Path] = []
    if not images_dir().exists():
        return removed
    with open(images_dir() / LOCK_NAME, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for p in images_dir().iterdir():
            if p.is_dir() and re.fullmatch(r"[0-9a-f]{16}", p.name) and p.name not in keep:
                shutil.rmtree(p)
                removed.append(p)
    return removed
