"""Where replay-migrate keeps things on a host, and the one check every name passes before it
becomes a path there.

Both roots can be moved with environment variables (tests and CI use the defaults so the image and
the checkpoint are built once per machine). Checkpoints and clones are folders named after what
the user (or a file, or a peer) calls them: :func:`named_path` is how such a name becomes a path,
so ``checkpoint rm ""``, ``.``, ``../x`` or ``/etc`` never reach ``rmtree``.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

from replay_migrate.errors import BadNameError

REPO = Path(__file__).resolve().parent.parent

NAME_CHARS = frozenset(string.ascii_letters + string.digits + "-_.")
"""What a checkpoint or clone name may contain (ASCII only: no look-alike or unnormalised names)."""
MAX_NAME_LEN = 60
"""Longest checkpoint or clone name. (A clone's recorder socket, ``<state>/clones/NAME/recorder.sock``,
must also fit a unix socket address: 107 bytes; under the default state root 60 characters do.)"""
RESERVED_SUFFIX = ".partial"
"""Names ending so are what a checkpoint or image being made is called until it is complete."""


def cache_root() -> Path:
    """Rebuildable things keyed by content: guest images (``$REPLAY_MIGRATE_CACHE``)."""
    return Path(os.environ.get("REPLAY_MIGRATE_CACHE", Path.home() / ".cache" / "replay-migrate"))


def state_root() -> Path:
    """Checkpoints and clones (``$REPLAY_MIGRATE_STATE``)."""
    return Path(os.environ.get("REPLAY_MIGRATE_STATE", "/var/lib/replay-migrate"))


def checkpoints_dir() -> Path:
    return state_root() / "checkpoints"


def clones_dir() -> Path:
    return state_root() / "clones"


def check_name(name: str, what: str) -> str:
    """``name`` if it is a plain name for a ``what`` (letters, digits, '-', '_', '.'; not starting
    with '.', so never '', '.' or '..'; no '/'; at most MAX_NAME_LEN), else BadNameError."""
    if not isinstance(name, str) or not name:
        raise BadNameError(f"a {what} name cannot be empty")
    shown = repr(name[:MAX_NAME_LEN + 1])
    if len(name) > MAX_NAME_LEN:
        raise BadNameError(f"bad {what} name {shown}...: longer than {MAX_NAME_LEN} characters")
    if not set(name) <= NAME_CHARS or name.startswith("."):
        raise BadNameError(f"bad {what} name {shown}: use letters, digits, '-', '_' and '.', "
                           "not starting with '.'")
    if name.endswith(RESERVED_SUFFIX):
        raise BadNameError(f"bad {what} name {shown}: names ending in {RESERVED_SUFFIX!r} are reserved")
    return name


def named_path(parent: Path, name: str, what: str) -> Path:
    """``parent / name`` for a checked ``name`` (see :func:`check_name`), refused when that entry
    is a symbolic link (it could lead anywhere: nothing here follows one to delete or write)."""
    check_name(name, what)
    path = parent / name
    if path.resolve() != parent.resolve() / name:
        raise BadNameError(f"{what} {name!r}: {path} is a symbolic link to {path.resolve()}")
    return path


def checkpoint_path(name: str) -> Path:
    """The folder of checkpoint ``name`` (checked; it need not exist)."""
    return named_path(checkpoints_dir(), name, "checkpoint")


def clone_path(name: str) -> Path:
    """The folder of clone ``name`` (checked; it need not exist)."""
    return named_path(clones_dir(), name, "clone")
