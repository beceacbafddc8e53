"""Secrets on disk: what is refused (FIFOs, folders, files others can read, oversized or garbled
ones), what is written (0600, never over an existing file), and where each secret comes from."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from replay_migrate.errors import UsageError
from server.credentials import (
    CREDENTIAL_ENV,
    KEY_ENV,
    MAX_SECRET_FILE,
    TOKEN_ENV,
    load_credential,
    load_or_create_key,
    load_token,
    read_secret_file,
    write_secret_file,
)
from server.keyring import Keyring
from server.wire import Role

pytestmark = pytest.mark.timeout(30)

CRED = Keyring(b"c" * 32, "t").credential("sess-1", Role.TARGET)


def private(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    path.chmod(0o600)
    return path


def test_a_secret_file_must_be_small_regular_and_private(tmp_path: Path) -> None:
    assert read_secret_file(private(tmp_path / "ok", "  secret\n"), "token") == "secret"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    cases = {
        fifo: "regular file",                                   # refused at once, not read (would hang)
        tmp_path: "regular file",
        tmp_path / "missing": "no such file",
        private(tmp_path / "big", "x" * (MAX_SECRET_FILE + 1)): "larger than",
        private(tmp_path / "empty", "\n"): "no token",
        private(tmp_path / "binary", b"\xff\xfe"): "not ASCII",
    }
    shared = private(tmp_path / "shared", "secret")
    shared.chmod(0o640)
    cases[shared] = "readable by others"
    for path, message in cases.items():
        with pytest.raises(UsageError, match=message):
            read_secret_file(path, "token")


def test_written_secrets_are_0600_whatever_the_umask_and_never_overwrite(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_secret_file(tmp_path / "cred", str(CRED), "credential")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "cred").stat().st_mode) == 0o600
    assert (tmp_path / "cred").read_text() == f"{CRED}\n"
    with pytest.raises(UsageError, match="exists"):
        write_secret_file(tmp_path / "cred", "other", "credential")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UsageError, match="exists"):
        write_secret_file(tmp_path / "link", "x", "credential")     # not through a dangling symlink either
    assert not (tmp_path / "elsewhere").exists()
    with pytest.raises(UsageError, match="cannot write"):
        write_secret_file(tmp_path / "no" / "such" / "dir", "x", "credential")


def test_credentials_come_from_a_file_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CREDENTIAL_ENV, raising=False)
    with pytest.raises(UsageError, match="no session credential"):
        load_credential(None)
    path = private(tmp_path / "t.cred", f"{CRED}\n")
    assert load_credential(path, Role.TARGET) == CRED
    with pytest.raises(UsageError, match="the source's"):
        load_credential(path, Role.SOURCE)
    monkeypatch.setenv(CREDENTIAL_ENV, str(CRED))
    assert load_credential(None) == CRED
    monkeypatch.setenv(CREDENTIAL_ENV, "rm1.sess-1.target.tooshort")
    with pytest.raises(UsageError, match="not a replay-migrate session credential"):
        load_credential(None)
    monkeypatch.setenv(TOKEN_ENV, "env-token")
    assert load_token(None) == "env-token"
    assert load_token(private(tmp_path / "token", "file-token")) == "file-token"
    monkeypatch.delenv(TOKEN_ENV)
    assert load_token(None) is None


def test_the_service_key_is_created_once_and_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert load_or_create_key(None) is None
    path = tmp_path / "service.key"
    key = load_or_create_key(path)
    assert key is not None and len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path) == key
    monkeypatch.setenv(KEY_ENV, "00" * 32)
    assert load_or_create_key(None) == bytes(32)
    for bad, message in (("zz" * 32, "hex"), ("00" * 31, "at least 32 bytes")):
        monkeypatch.setenv(KEY_ENV, bad)
        with pytest.raises(UsageError, match=message):
            load_or_create_key(None)
        with pytest.raises(UsageError, match=message):
            load_or_create_key(private(tmp_path / "bad.key", bad))
        (tmp_path / "bad.key").unlink()
