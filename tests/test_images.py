"""The image cache key: stable for an unchanged recipe, different after any change; what dead builds
leave is removed, never while a build writes."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from replay_migrate.errors import ImageError
from store import images
from store.paths import REPO


def test_recipe_hash_tracks_the_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "vm-images" / "build-image.sh"
    overlay = tmp_path / "vm-images" / "overlay"
    agent = tmp_path / "recorder"
    (overlay / "etc").mkdir(parents=True)
    agent.mkdir()
    script.write_text("echo build\n")
    (overlay / "etc" / "hostname").write_text("guest\n")
    (agent / "agent.py").write_text("print()\n")
    (agent / "notes.txt").write_text("not part of the recipe\n")
    monkeypatch.setattr(images, "REPO", tmp_path)
    monkeypatch.setattr(images, "RECIPE_PARTS", (script, overlay, agent))
    h0 = images.recipe_hash()
    assert images.recipe_hash() == h0
    (agent / "notes.txt").write_text("changed, still not part of it\n")
    assert images.recipe_hash() == h0
    (overlay / "etc" / "hostname").write_text("other\n")
    h1 = images.recipe_hash()
    assert h1 != h0
    (agent / "agent.py").chmod(0o755)
    assert images.recipe_hash() != h1


def test_the_domain_template_is_part_of_the_recipe() -> None:
    """The kernel command line and the devices a checkpoint boots with live in domain.xml: a change
    there must make new images and checkpoints, as a change to the build script does."""
    assert REPO / "vm-images" / "domain.xml" in images.RECIPE_PARTS


def test_real_recipe_hash_is_stable() -> None:
    assert images.recipe_hash() == images.recipe_hash()
    assert len(images.recipe_hash()) == 16


def test_prune_keeps_what_is_used_and_builds_in_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLAY_MIGRATE_CACHE", str(tmp_path))
    d = images.images_dir()
    for name in ("0123456789abcdef", "fedcba9876543210", "0123456789abcdef.partial", "test1"):
        (d / name).mkdir(parents=True)
    removed = images.prune_images({"0123456789abcdef"})
    assert [p.name for p in removed] == ["fedcba9876543210"]
    assert sorted(p.name for p in d.iterdir() if p.is_dir()) == ["0123456789abcdef", "0123456789abcdef.partial",
                                                                 "test1"]


# ---- builds that die ------------------------------------------------------------------------------
# A stand-in for build-image.sh (the real one takes minutes over a package mirror): it makes the same
# folders by the same rule, then either dies by SIGKILL (its EXIT trap does not run, as when
# run_tool kills it) or tells the test its pid through a fifo and waits to be killed.
STUB_BUILD = """OUT=$1
WORK=$(mktemp -d "${OUT%/}.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT" "$WORK/rootfs" && echo data > "$WORK/rootfs/file"
if [ "$STUB_MODE" = die ]; then kill -9 $$; fi
echo $$ > "$STUB_FIFO"
exec sleep 1000
"""


@pytest.fixture
def stub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("REPLAY_MIGRATE_CACHE", str(tmp_path / "cache"))
    stub = tmp_path / "build-image.sh"
    stub.write_text(STUB_BUILD)
    monkeypatch.setattr(images, "BUILD_SCRIPT", stub)
    return stub


def build_folders() -> list[str]:
    return sorted(p.name for p in images.images_dir().iterdir() if ".partial" in p.name)


def lock_is_free() -> bool:
    with open(images.images_dir() / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def test_a_build_that_dies_removes_its_folders(stub_cache: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Its own, and only folders named by the build's rule: not a link named so, nor anything else."""
    victim = tmp_path / "victim"
    victim.mkdir()
    images.images_dir().mkdir(parents=True)
    (images.images_dir() / "0123456789abcdef.partial.build.ABCdef").symlink_to(victim)
    (images.images_dir() / "mine.partial").mkdir()
    monkeypatch.setenv("STUB_MODE", "die")
    with pytest.raises(ImageError, match="image build failed"):
        images.ensure_image()
    assert build_folders() == ["0123456789abcdef.partial.build.ABCdef", "mine.partial"] and victim.is_dir()


def test_a_killed_builds_folders_stay_while_it_writes_and_go_with_the_next_build(
        stub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller is killed with SIGKILL, the script it started goes on writing: the lock stays held
    (nobody removes its folders), and once the script is gone too the next build removes them."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    caller = subprocess.Popen([sys.executable, "-c", "import sys\nfrom pathlib import Path\nfrom store import images\n"
                               "images.BUILD_SCRIPT = Path(sys.argv[1])\nimages.ensure_image()\n", str(stub_cache)],
                              env={**os.environ, "STUB_MODE": "hang", "STUB_FIFO": str(fifo)}, cwd=REPO)
    builder = int(fifo.read_text())
    caller.kill()
    assert caller.wait() == -signal.SIGKILL
    try:
        assert len(build_folders()) == 2           # <hash>.partial and <hash>.partial.build.XXXXXX
        assert not lock_is_free(), "a live build's folders must not look removable"
    finally:
        os.kill(builder, signal.SIGKILL)
    monkeypatch.setenv("STUB_MODE", "die")         # the next build waits for the lock the builder's death frees
    with pytest.raises(ImageError):
        images.ensure_image()
    assert build_folders() == []


def test_nothing_mounted_is_removed(stub_cache: Path) -> None:
    """mmdebstrap (root mode) mounts the host's /dev/shm, /proc and /sys inside its chroot: a build
    killed there leaves them mounted, and removing such a folder would empty the host's. Here a
    tmpfs mounted in a private mount namespace (gone with it) stands for them."""
    assert "/proc" in images._mounts_under(Path("/proc"))
    assert images._mounts_under(REPO / "vm-images") == []
    dead = images.images_dir() / (images.recipe_hash() + ".partial")
    (dead / "rootfs" / "dev" / "shm").mkdir(parents=True)
    code = ("import sys\nfrom store import images\nprint(images.remove_stale_builds())\n"
            "try:\n    images.ensure_image()\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                        'mount -t tmpfs rm-test "$1/rootfs/dev/shm" && touch "$1/rootfs/dev/shm/host-file" && '
                        'exec "$2" -c "$3"', "sh", str(dead), sys.executable, code],
                       capture_output=True, text=True, cwd=REPO, check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["[]", f"ImageError {dead}, a dead build's folder, could not be removed "
                                     "(something is mounted under it): unmount it and remove the folder, then "
                                     "build again"], r.stderr
    assert (dead / "rootfs" / "dev" / "shm").is_dir()
