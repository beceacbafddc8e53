"""Remove every domain this project defined (names ``rm-*``), the folders of all clones and the
images killed migrations left in the suspend folders (``--suspend-dir``, repeatable, and
``$REPLAY_MIGRATE_SUSPEND_DIR``): for a host left dirty by an interrupted run. Checkpoints and guest
images are kept."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from migration.suspenddir import remove_saved_image, saved_image_names, suspend_dir_arg, suspend_dir_from_env
from store import checkpoint as ckpt
from vm.machine import Hypervisor


def cleanup(hv: Hypervisor, prefix: str = ckpt.DOMAIN_PREFIX, suspend_dirs: Sequence[Path] = ()) -> list[str]:
    """Remove our domains and clone folders, and in ``suspend_dirs`` the images of the clones removed
    and of every other ``prefix`` name (a clone whose folder is gone already); a saved image of a
    domain that is not ours is kept (``vm resume`` puts that VM back from it)."""
    removed = []
    for name in sorted(set(hv.names(prefix)) | set(ckpt.clone_names())):
        if name.startswith(prefix) or not hv.exists(name):
            ckpt.remove_clone(hv, name)
            removed.append(name)
    for d in suspend_dirs:
        for name in saved_image_names(d):
            if name in removed or (name.startswith(prefix) and not hv.exists(name)):
                remove_saved_image(name, d)
                if name not in removed:
                    removed.append(name)
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prefix", default=ckpt.DOMAIN_PREFIX)
    ap.add_argument("--connect", default="qemu:///system", help="libvirt URI (default: %(default)s)")
    ap.add_argument("--suspend-dir", type=suspend_dir_arg, action="append", default=[], metavar="DIR",
                    help="a suspend folder to clean too (repeatable; $REPLAY_MIGRATE_SUSPEND_DIR always is)")
    args = ap.parse_args(argv)
    env = suspend_dir_from_env()
    dirs = list(dict.fromkeys([*args.suspend_dir, *([Path(env)] if env else [])]))
    with Hypervisor(args.connect) as hv:
        for name in cleanup(hv, args.prefix, dirs):
            print("removed", name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
