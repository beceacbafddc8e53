"""The command line: errors become one line and the error class's exit code.

Commands that need a hypervisor run here against libvirt's built-in test driver
(``--connect test:///default``: in this process, no daemon, no guest); the file arguments of every
command are in test_fileargs.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.fileargs import TEST_URI
from cli.main import main
from replay_migrate.errors import CheckpointError, NoSuchDomainError, UsageError


def test_missing_domain_exit_code(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--connect", TEST_URI, "vm", "screenshot", "rm-no-such-domain", str(tmp_path / "x.png")]) \
        == NoSuchDomainError.exit_code
    assert "no domain named 'rm-no-such-domain'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_missing_checkpoint(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                            tmp_path: Path) -> None:
    monkeypatch.setenv("REPLAY_MIGRATE_STATE", str(tmp_path))
    assert main(["--connect", TEST_URI, "vm", "start", "--from", "nope", "rm-x"]) == CheckpointError.exit_code
    assert "no checkpoint named 'nope'" in capsys.readouterr().err
    assert main(["--connect", TEST_URI, "checkpoint", "rm", "nope"]) == CheckpointError.exit_code


def test_bad_checkpoint_name(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                             tmp_path: Path) -> None:
    monkeypatch.setenv("REPLAY_MIGRATE_STATE", str(tmp_path))
    assert main(["--connect", TEST_URI, "checkpoint", "create", "../etc"]) == UsageError.exit_code
    assert "bad checkpoint name" in capsys.readouterr().err


def test_checkpoint_list_empty(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                               tmp_path: Path) -> None:
    monkeypatch.setenv("REPLAY_MIGRATE_STATE", str(tmp_path))
    assert main(["checkpoint", "list", "--json"]) == 0
    assert capsys.readouterr().out.strip() == "[]"


def test_usage_error_exit_code() -> None:
    with pytest.raises(SystemExit) as e:
        main(["vm"])
    assert e.value.code == UsageError.exit_code
