"""The image cache key: stable for an unchanged recipe, different after any change."""

from __future__ import annotations

from pathlib import Path

import pytest

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
