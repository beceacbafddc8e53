"""Secrets on disk: the service key, the creation token and role credentials (DESIGN.md §8).

Secrets travel by file or environment, never only on a command line (``ps`` shows it to every
user).  A file we write is created 0600 and never overwritten; a file we read must be a regular
file of a few KiB that only its owner can read (like ssh's private keys), so a secret left readable
by others is refused rather than used.  The file is opened without blocking, so a FIFO named by
mistake is refused instead of hanging.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Final

from replay_migrate.errors import UsageError
from replay_migrate.safeopen import open_regular
from server.keyring import MIN_KEY_BYTES, Credential
from server.wire import Role

#: where the service looks for its key (hex) when no key file is given
KEY_ENV: Final = "REPLAY_MIGRATE_SERVICE_KEY"
#: where the service and the session's creator look for the creation token (keeps it out of ``ps``)
TOKEN_ENV: Final = "REPLAY_MIGRATE_TOKEN"
#: where the peers look for their role credential when no file is given
CREDENTIAL_ENV: Final = "REPLAY_MIGRATE_CREDENTIAL"
MAX_SECRET_FILE: Final = 4096
"""Largest secret file read: a key, a token or a credential is far below it."""


def read_secret_file(path: Path, what: str) -> str:
    """The stripped text of a secret file, refused unless it is a small regular file private to its owner."""
    fd, st = open_regular(path, what)
    try:
        if st.st_mode & 0o077:
            raise UsageError(f"{path}: the {what} is readable by others (mode {stat.S_IMODE(st.st_mode):o}): "
                             f"chmod 600 it")
        if st.st_size > MAX_SECRET_FILE:
            raise UsageError(f"{path}: the {what} file is larger than {MAX_SECRET_FILE} bytes")
        data = os.read(fd, MAX_SECRET_FILE + 1)
    finally:
        os.close(fd)
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise UsageError(f"{path}: the {what} is not ASCII text") from None
    if not text or len(data) > MAX_SECRET_FILE:
        raise UsageError(f"{path}: no {what} in it")
    return text


def write_secret_file(path: Path, text: str, what: str) -> None:
    """Create ``path`` (0600) holding ``text``; an existing file is never overwritten."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise UsageError(f"{path}: exists; the {what} is written to a new file only") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot write the {what}: {e.strerror}") from None
    try:
        os.fchmod(fd, 0o600)            # whatever the umask
        os.write(fd, f"{text}\n".encode("ascii"))
    except OSError as e:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise UsageError(f"{path}: cannot write the {what}: {e.strerror}") from None
    os.close(fd)


def load_token(path: Path | None) -> str | None:
    """The creation token from ``path``, else ``$REPLAY_MIGRATE_TOKEN``, else None."""
    if path is not None:
        return read_secret_file(path, "token")
    return os.environ.get(TOKEN_ENV) or None


def load_credential(path: Path | None, role: Role | None = None) -> Credential:
    """A role credential from ``path``, else from ``$REPLAY_MIGRATE_CREDENTIAL``; with ``role``,
    one for that role only."""
    if path is not None:
        text, where = read_secret_file(path, "credential"), str(path)
    else:
        text, where = os.environ.get(CREDENTIAL_ENV, ""), f"${CREDENTIAL_ENV}"
        if not text:
            raise UsageError(f"no session credential: pass --credential FILE or set ${CREDENTIAL_ENV}")
    cred = Credential.parse(text)
    if cred is None:
        raise UsageError(f"{where}: not a replay-migrate session credential (rm1.SESSION.ROLE.SECRET)")
    if role is not None and cred.role is not role:
        raise UsageError(f"{where}: a {cred.role.value} credential, this side needs the {role.value}'s")
    return cred


def load_or_create_key(path: Path | None) -> bytes | None:
    """The service key: from ``path`` (created with a new random key, 0600, if missing), else from
    ``$REPLAY_MIGRATE_SERVICE_KEY`` (hex), else None (the caller makes an ephemeral one)."""
    if path is None:
        text, where = os.environ.get(KEY_ENV, ""), f"${KEY_ENV}"
        if not text:
            return None
    else:
        if not os.path.lexists(path):
            try:
                write_secret_file(path, secrets.token_hex(MIN_KEY_BYTES), "service key")
            except UsageError:
                if not os.path.lexists(path):     # another process may have just made it: use theirs
                    raise
        text, where = read_secret_file(path, "service key"), str(path)
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise UsageError(f"{where}: the service key must be hex") from None
    if len(key) < MIN_KEY_BYTES:
        raise UsageError(f"{where}: the service key must have at least {MIN_KEY_BYTES} bytes "
                         f"({2 * MIN_KEY_BYTES} hex digits)")
    return key
