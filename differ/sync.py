"""Glue for one-host use: build the trees of two sets of images and run the protocol in memory.

The CLI's ``replay-migrate diff`` (``dry_run=True``) and ``sync`` call :func:`sync_local`; the
networked path builds the same :class:`~differ.protocol.Source` / :class:`~differ.protocol.Target`
cores with the same I/O (:func:`differ.transfer.make_source` / ``make_target``) and moves their
messages over a websocket instead of :func:`~differ.transfer.run_local`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
import zstandard

from differ.merkle import DEFAULT_FANOUT, MerkleTree
from differ.protocol import ProtocolParams, TransferStats
from differ.source import BlockSink, BlockSource
from differ.transfer import ReferenceImage, SourceImage, TargetImage, blocking_source, blocking_target, run_local

BASELINE_ZSTD_LEVEL = 3
BASELINE_READ_LEAVES = 256
"""Leaves per read when measuring the baseline (1 MiB)."""


def build_trees(
    sources: Mapping[str, BlockSource], fanout: int = DEFAULT_FANOUT, *, workers: int | None = None
) -> dict[str, MerkleTree]:
    """A tree per named source (use :func:`differ.merkle.load_or_build` to reuse saved trees)."""
    return {name: MerkleTree.build(src, fanout, workers=workers) for name, src in sources.items()}


def sync_local(
    source_images: Mapping[str, BlockSource],
    target_images: Mapping[str, tuple[BlockSource, BlockSink | None]],
    *,
    source_trees: Mapping[str, MerkleTree] | None = None,
    target_trees: Mapping[str, MerkleTree] | None = None,
    references: Sequence[tuple[BlockSource, MerkleTree | None]] = (),
    bases: Mapping[str, tuple[BlockSource, MerkleTree | None]] | None = None,
    fanout: int = DEFAULT_FANOUT,
    params: ProtocolParams | None = None,
    dry_run: bool = False,
    measure_plain: bool = True,
    key: bytes | None = None,
) -> TransferStats:
    """Make the target images equal to the source images (or, with ``dry_run``, measure what that
    would ship and write nothing). Trees not given are built; ``references`` are other content the
    target holds (base, checkpoint); ``bases``: per image name, that image at the checkpoint both
    sides started from (for the base-relative walk). Both sides are local, so the target is told
    the source's sizes (no size rule for a remote peer applies). Raises
    ``VerificationError``/``ProtocolError`` on failure, with every sink aborted."""
    s_trees = dict(source_trees or {})
    t_trees = dict(target_trees or {})
    for name, src in source_images.items():
        if name not in s_trees:
            s_trees[name] = MerkleTree.build(src, fanout)
    for name, (src, _) in target_images.items():
        if name not in t_trees:
            t_trees[name] = MerkleTree.build(src, fanout)
    refs = [ReferenceImage(src, tree or MerkleTree.build(src, fanout)) for src, tree in references]
    base_refs = {
        name: ReferenceImage(src, tree or MerkleTree.build(src, fanout)) for name, (src, tree) in (bases or {}).items()
    }
    source = blocking_source(
        [SourceImage(name, src, s_trees[name], base=base_refs.get(name)) for name, src in source_images.items()],
        params,
        measure_plain=measure_plain,
    )
    target = blocking_target(
        [
            TargetImage(name, src, t_trees[name], sink, base=base_refs.get(name))
            for name, (src, sink) in target_images.items()
        ],
        params,
        references=refs,
        dry_run=dry_run,
        key=key,
        max_sizes={name: src.size for name, src in source_images.items() if name in target_images},
    )
    return run_local(source, target)


def baseline_bytes(
    source: BlockSource, tree: MerkleTree, checkpoint: MerkleTree, level: int = BASELINE_ZSTD_LEVEL
) -> int:
    """DESIGN.md §9 ``baseline_bytes`` for one image: zstd of every leaf that differs from the
    checkpoint's (what a plain state transfer ships), each leaf compressed on its own."""
    cctx = zstandard.ZstdCompressor(level=level)
    diff = tree.differing_leaves(checkpoint.resized(tree.size, tree.fanout))
    zero = tree.zero_mask()
    total = 0
    for start, count in _runs(diff[~zero[diff]]):
        data = source.read(start, count)
        for i in range(0, len(data), 4096):
            total += len(cctx.compress(data[i : i + 4096]))
    return total


def _runs(indices: npt.NDArray[np.int64]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in indices.tolist():
        if out and out[-1][0] + out[-1][1] == i and out[-1][1] < BASELINE_READ_LEAVES:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out
