"""cli/cleanup.py (``make clean-vms``): every domain of ours goes, at the daemon ``--connect`` names."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.cleanup import main
from migration.suspenddir import SUBDIR, SUSPEND_DIR_ENV


def test_cleanup_removes_our_domains_at_the_daemon_it_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("REPLAY_MIGRATE_STATE", str(tmp_path / "state"))
    node = tmp_path / "node.xml"
    node.write_text("<node>" + "".join(f"<domain type='test'><name>{n}</name><memory>1024</memory><os><type>hvm"
                                       "</type></os></domain>" for n in ("rm-zz", "someone-elses")) + "</node>")
    assert main(["--connect", f"test://{node}"]) == 0
    assert capsys.readouterr().out.split() == ["removed", "rm-zz"]


def test_cleanup_deletes_the_images_killed_migrations_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """In the suspend folder: the image of a clone it removes, and an ``rm-*`` image whose clone folder
    is gone already; a user's domain's image (``vm resume`` needs it) and files not named by the
    project's rule stay."""
    monkeypatch.setenv("REPLAY_MIGRATE_STATE", str(tmp_path / "state"))
    (tmp_path / "state" / "clones" / "rm-a").mkdir(parents=True)
    private = tmp_path / "shm" / SUBDIR
    private.mkdir(parents=True, mode=0o700)
    for name in ("rm-a.sav", "rm-orphan.sav", "users-vm.sav", "rm-b.sav.partial", "notes.txt"):
        (private / name).write_bytes(b"x")
    node = tmp_path / "node.xml"
    node.write_text("<node><domain type='test'><name>users-vm</name><memory>1024</memory><os><type>hvm</type></os>"
                    "</domain></node>")
    monkeypatch.setenv(SUSPEND_DIR_ENV, str(tmp_path / "shm"))
    assert main(["--connect", f"test://{node}"]) == 0
    assert capsys.readouterr().out.split() == ["removed", "rm-a", "removed", "rm-orphan"]
    assert sorted(p.name for p in private.iterdir()) == ["notes.txt", "rm-b.sav.partial", "users-vm.sav"]
