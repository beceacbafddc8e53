"""``replay-migrate diff A B`` and ``sync A B``: the transfer protocol between two image files on
one host, in memory. ``diff`` is a dry run (what a transfer would ship); ``sync`` makes B equal A
through exactly the code the network path uses, verification and atomic commit included.

A and B are of one kind: sparse memory save images, qcow2 overlays over the *same* backing file
(only what the overlays allocate is read; the backing chain's digests come from its checkpoint
when it is one, else they are computed once for this run), or raw files.
"""

from __future__ import annotations

import argparse
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from cli.report import emit_json, human_bytes, table
from differ.blocks import LeafDigests, compute_leaf_digests, detect_format, open_source, qemu_img_info
from differ.patch import open_sink
from differ.protocol import TransferStats
from differ.sync import sync_local
from replay_migrate.errors import ImageError, UsageError
from replay_migrate.safeopen import check_replaceable
from store import checkpoint as ckpt
from store.vmstate import FANOUT, checkpoint_trees


def _backing(path: Path) -> str | None:
    chain = qemu_img_info(str(path), fmt="qcow2")
    name = chain[0].get("full-backing-filename") or chain[0].get("backing-filename")
    return os.path.realpath(str(name)) if name else None


def backing_digests(a: Path, b: Path) -> LeafDigests | None:
    """Digests of the backing chain both qcow2 overlays share (their checkpoint's if they have one)."""
    ba, bb = _backing(a), _backing(b)
    if ba != bb:
        raise ImageError(f"{a} and {b} have different backing files ({ba} and {bb}): "
                         "only overlays on one shared chain can be compared")
    if ba is None:
        return None
    for ck in ckpt.list_all():
        if os.path.realpath(ck.disk) == ba:
            return checkpoint_trees(ck).disk
    return compute_leaf_digests(ba)


def transfer(a: Path, b: Path, *, dry_run: bool) -> tuple[str, TransferStats]:
    """Both paths are checked first (regular files, B replaceable when it is to be patched), then
    sniffed: nothing is hashed, copied or run before every argument is known to be usable."""
    if not dry_run:
        check_replaceable(b, "image to patch", error=ImageError)
    kinds = {detect_format(a), detect_format(b)}
    if len(kinds) != 1:
        raise UsageError(f"{a} and {b} are different kinds of image ({' and '.join(sorted(kinds))})")
    kind = kinds.pop()
    backing = backing_digests(a, b) if kind == "disk" else None
    with ExitStack() as stack:
        src_a = open_source(a, backing_tree=backing)
        stack.callback(src_a.close)
        src_b = open_source(b, backing_tree=backing)
        stack.callback(src_b.close)
        sink = None if dry_run else open_sink(b, backing_tree=backing)
        try:
            stats = sync_local({kind: src_a}, {kind: (src_b, sink)}, fanout=FANOUT, dry_run=dry_run)
        finally:
            if sink is not None:
                sink.abort()   # no-op once committed
    return kind, stats


def report(kind: str, stats: TransferStats) -> dict[str, Any]:
    img = stats.images[kind]
    return {
        "kind": kind,
        f"divergent_{kind}": img.divergent,
        "divergent_blocks": img.divergent,
        "leaves": img.leaves,
        "referenced_blocks": img.referenced_blocks,
        "zero_blocks": img.zero,
        "delta_blocks": img.delta_blocks,
        "full_blocks": img.full,
        "block_bytes": stats.block_bytes,
        "hash_bytes": stats.hash_bytes,
        "fingerprint_bytes": stats.fingerprint_bytes,
        "wire_bytes": stats.wire_total,
        "plain_bytes": stats.plain_bytes,
        "flat_hash_bytes": stats.flat_hash_bytes,
        "round_trips": stats.round_trips,
        "verified": stats.verified,
        "dry_run": stats.dry_run,
    }


def _print(rep: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit_json(rep)
        return
    table([
        ["kind", rep["kind"]],
        ["divergent blocks", f"{rep['divergent_blocks']} of {rep['leaves']}"],
        ["  as references / zero / delta / full",
         f"{rep['referenced_blocks']} / {rep['zero_blocks']} / {rep['delta_blocks']} / {rep['full_blocks']}"],
        ["bytes on the wire", human_bytes(rep["wire_bytes"])],
        ["  block bytes", human_bytes(rep["block_bytes"])],
        ["  hash bytes", human_bytes(rep["hash_bytes"])],
        ["zstd of every divergent block", human_bytes(rep["plain_bytes"])],
        ["round trips", rep["round_trips"]],
        ["verified", "yes" if rep["verified"] else ("dry run" if rep["dry_run"] else "no")],
    ], ["", ""])


def cmd_diff(args: argparse.Namespace) -> int:
    kind, stats = transfer(args.a, args.b, dry_run=True)
    _print(report(kind, stats), args.json)
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    kind, stats = transfer(args.a, args.b, dry_run=False)
    _print(report(kind, stats), args.json)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", type=Path, help="the image to copy from (source): a regular file")
    p.add_argument("b", type=Path, help="the image to compare with or patch (target): a regular file; sync "
                   "replaces it by renaming a patched copy over it, so it must not be a symbolic link "
                   "(give the file it names) and its folder must be writable")
    p.add_argument("--json", action="store_true")

