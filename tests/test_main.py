"""The command line: errors become one line and the error class's exit code.

Commands that need a hypervisor run here against libvirt's built-in test driver
(``--connect test:///default``: in this process, no daemon, no guest); the file arguments of every
command are in test_fileargs.py."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path
from typing import IO

import pytest
from test_exchange import make_checkpoint, make_image

from cli.fileargs import TEST_URI
from cli.main import main
from replay_migrate.errors import CheckpointError, ImageError, NoSuchDomainError, UsageError

REPO = Path(__file__).resolve().parent.parent


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


# ---- checkpoint export | checkpoint import, as two sites run them --------------------------------
def _cli(state: Path, cache: Path, *argv: str, stdin: int | IO[bytes] | None = None,
         stdout: int | IO[bytes] | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "REPLAY_MIGRATE_STATE": str(state), "REPLAY_MIGRATE_CACHE": str(cache),
           "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "cli.main", *argv], cwd=REPO, env=env, stdin=stdin, stdout=stdout,
                            stderr=subprocess.PIPE)


def test_export_piped_into_import_makes_the_same_checkpoint(tmp_path: Path) -> None:
    """`checkpoint export C | (ssh siteb) replay-migrate checkpoint import` between two state roots."""
    cache, a, b = tmp_path / "cache", tmp_path / "a", tmp_path / "b"
    image = make_image(cache)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPLAY_MIGRATE_STATE", str(a))
        made = make_checkpoint(image)
    export = _cli(a, cache, "checkpoint", "export", "ck", stdout=subprocess.PIPE)
    imp = _cli(b, cache, "checkpoint", "import", "--name", "ck-b", stdin=export.stdout, stdout=subprocess.PIPE)
    assert export.stdout is not None
    export.stdout.close()
    out, ierr = imp.communicate(timeout=120)
    _, eerr = export.communicate(timeout=120)
    assert export.returncode == 0, eerr.decode()
    assert imp.returncode == 0, ierr.decode()
    assert b"stream (zstd, holes and zero pages skipped)" in eerr and b"% of allocated" in eerr
    assert b"imported, verified" in out
    roots = json.loads((made.dir / "manifest.json").read_text())["roots"]
    assert json.loads((b / "checkpoints" / "ck-b" / "manifest.json").read_text())["roots"] == roots
    assert roots["memory"].encode() in out and roots["disk"].encode() in out


def test_export_to_a_file_and_import_from_it_as_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("REPLAY_MIGRATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("REPLAY_MIGRATE_STATE", str(tmp_path / "a"))
    make_checkpoint(make_image(tmp_path / "cache"))
    stream = tmp_path / "ck.rmckpt"
    assert main(["checkpoint", "export", "ck", "--out", str(stream), "--json"]) == 0
    sent = json.loads(capsys.readouterr().err)
    monkeypatch.setenv("REPLAY_MIGRATE_STATE", str(tmp_path / "b"))
    stream.with_name("cut").write_bytes(stream.read_bytes()[:-40])
    assert main(["checkpoint", "import", "--in", str(stream.with_name("cut"))]) == CheckpointError.exit_code
    assert "truncated" in capsys.readouterr().err
    assert main(["checkpoint", "import", "--in", str(stream), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["roots"] == sent["roots"] and got["stream_bytes"] == sent["stream_bytes"] == stream.stat().st_size
    assert main(["checkpoint", "export", "nope", "--out", str(tmp_path / "x")]) == CheckpointError.exit_code
    assert not (tmp_path / "x").exists()


def test_no_binary_stream_to_or_from_a_terminal(tmp_path: Path) -> None:
    primary, secondary = pty.openpty()
    try:
        p = _cli(tmp_path, tmp_path, "checkpoint", "export", "ck", stdout=secondary)
        _, err = p.communicate(timeout=60)
        assert p.returncode == UsageError.exit_code and b"pipe it" in err
        p = _cli(tmp_path, tmp_path, "checkpoint", "import", stdin=secondary)
        _, err = p.communicate(timeout=60)
        assert p.returncode == UsageError.exit_code and b"pipe one in" in err
    finally:
        os.close(primary)
        os.close(secondary)


def test_a_failed_export_leaves_no_half_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("REPLAY_MIGRATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("REPLAY_MIGRATE_STATE", str(tmp_path / "a"))
    ck = make_checkpoint(make_image(tmp_path / "cache"))
    with open(ck.memory, "r+b") as f:                        # a damaged checkpoint: not a save image any more
        f.write(b"garbage!" * 4)
    out = tmp_path / "ck.rmckpt"
    out.write_bytes(b"an older stream")
    assert main(["checkpoint", "export", "ck", "--out", str(out)]) in (ImageError.exit_code, CheckpointError.exit_code)
    assert "not a libvirt save image" in capsys.readouterr().err
    assert not out.exists()


def test_checkpoint_create_names_its_default_kernel_args_and_their_cost(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["checkpoint", "create", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "replaces the default init_on_free=1" in out and "--no-default-kernel-args" in out
    assert "per cent of CPU" in out


def test_checkpoint_create_refuses_a_bad_kernel_arg_before_libvirt(capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    monkeypatch.setenv("REPLAY_MIGRATE_STATE", str(tmp_path))
    assert main(["--connect", "qemu:///no-such-daemon", "checkpoint", "create", "c", "--no-default-kernel-args",
                 "--kernel-arg", "a b"]) == UsageError.exit_code
    assert "not a plain kernel argument" in capsys.readouterr().err
