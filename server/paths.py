"""Where replay-migrate keeps things on a host. Both roots can be moved with environment variables
(tests and CI use the defaults so the image and the checkpoint are built once per machine)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


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
