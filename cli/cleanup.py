"""Remove every domain this project defined (names ``rm-*``) and the folders of all clones:
for a host left dirty by an interrupted run. Checkpoints and images are kept."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from store import checkpoint as ckpt
from vm.machine import Hypervisor


def cleanup(hv: Hypervisor, prefix: str = ckpt.DOMAIN_PREFIX) -> list[str]:
    removed = []
    for name in sorted(set(hv.names(prefix)) | set(ckpt.clone_names())):
        if name.startswith(prefix) or not hv.exists(name):
            ckpt.remove_clone(hv, name)
            removed.append(name)
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prefix", default=ckpt.DOMAIN_PREFIX)
    ap.add_argument("--connect", default="qemu:///system", help="libvirt URI (default: %(default)s)")
    args = ap.parse_args(argv)
    with Hypervisor(args.connect) as hv:
        for name in cleanup(hv, args.prefix):
            print("removed", name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
