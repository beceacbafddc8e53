"""Names that become paths: one check, and what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from replay_migrate.errors import BadNameError, UsageError
from store import paths

BAD = ["", ".", "..", "../x", "a/../b", "a/b", "/etc", ".hidden", "x\0y", "a b", "é", "x" * 61, "demo.partial"]


@pytest.mark.parametrize("name", ["demo", "test-desktop", "rm-test-1_2.b", "x" * 60])
def test_plain_names_pass(name: str, tmp_path: Path) -> None:
    assert paths.check_name(name, "clone") == name
    assert paths.named_path(tmp_path, name, "clone") == tmp_path / name


@pytest.mark.parametrize("name", BAD)
def test_names_that_are_not_plain_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(BadNameError, match="clone") as e:
        paths.named_path(tmp_path, name, "clone")
    assert isinstance(e.value, UsageError) and e.value.exit_code == UsageError.exit_code


def test_a_symlink_out_of_the_store_is_refused(tmp_path: Path) -> None:
    store, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    store.mkdir()
    elsewhere.mkdir()
    (store / "link").symlink_to(elsewhere)
    (store / "inside").symlink_to(store / "real")
    for name in ("link", "inside"):
        with pytest.raises(BadNameError, match="symbolic link"):
            paths.named_path(store, name, "checkpoint")


def test_roots_follow_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLAY_MIGRATE_STATE", str(tmp_path))
    assert paths.checkpoint_path("c") == tmp_path / "checkpoints" / "c"
    assert paths.clone_path("v") == tmp_path / "clones" / "v"
    with pytest.raises(BadNameError):
        paths.clone_path("..")
