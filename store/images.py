"""The guest image: built by ``vm-images/build-image.sh`` into a cache folder named by the hash of
its recipe, and reused while the recipe is unchanged (a build takes ~1-2 minutes; a reuse, none).

The recipe is the build script, the guest overlay files and the sources the guest runs (the
recorder agent and the shared root package): change any of them and the next use rebuilds.
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
                REPO / "recorder", REPO / "replay_migrate")
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
    """The image for the current recipe, building it if it is not in the cache."""
    rh = recipe_hash()
    out = images_dir() / rh
    image = GuestImage(out, rh)
    images_dir().mkdir(parents=True, exist_ok=True)
    with open(images_dir() / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # one build at a time; a second caller reuses it
        if out.is_dir() and not force:
            image.check()
            return ImageResult(image, False, 0.0)
        if shutil.which("mmdebstrap") is None:
            raise HostError("mmdebstrap is not installed (run scripts/setup-host.sh)")
        partial = out.with_name(rh + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        log.info("building guest image %s (recipe changed or not cached)", rh)
        t0 = time.monotonic()
        try:
            r = run_tool(["bash", BUILD_SCRIPT, partial, REPO], what=f"building the guest image {rh}",
                         error=ImageError, timeout=BUILD_TIMEOUT_S, check=False, max_output=BUILD_LOG_MAX,
                         max_stderr=BUILD_LOG_MAX)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        if r.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            raise ImageError(f"image build failed:\n{(r.stdout + r.stderr).strip()[-2000:]}")
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
        seconds = time.monotonic() - t0
        (out / "build.log").write_text(r.stdout + r.stderr + f"\nseconds={seconds:.1f}\n")
        image.check()
        return ImageResult(image, True, seconds)


def prune_images(keep: set[str]) -> list[Path]:
    """Remove finished cached images whose recipe hash is not in ``keep`` (builds in progress, named
    ``<hash>.partial``, are left alone); returns what was removed."""
    removed: list[Path] = []
    if not images_dir().exists():
        return removed
    with open(images_dir() / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for p in images_dir().iterdir():
            if p.is_dir() and re.fullmatch(r"[0-9a-f]{16}", p.name) and p.name not in keep:
                shutil.rmtree(p)
                removed.append(p)
    return removed
