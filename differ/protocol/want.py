"""The target's requests: once every walk is over, how to get each differing leaf (a confirmation
of content it holds anywhere, of a zero leaf, of the base's leaf, of an earlier leaf of this
transfer; else the block, with fingerprints of its own block for a delta), and the plan it checks
the source's batches against."""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard

from differ.merkle import DIGEST_SIZE, MerkleTree, ReplacedTree, leaf_length, zero_digest
from differ.protocol.endpoint import ImageSpec, read_leaves
from differ.protocol.events import Holding, Of, Request, Result, SetSize
from differ.protocol.index import ContentIndex, Location
from differ.protocol.leaves import fingerprints, fit
from differ.protocol.messages import Req, Shape, pack_bits, put_kinds
from differ.protocol.params import ProtocolParams
from differ.protocol.stats import TransferStats
from differ.protocol.walk import Walk
from differ.source import LEAF_SIZE


class ImageState:
    """One of the target's images during a transfer: its trees, its walk, what differs."""

    def __init__(self, spec: ImageSpec) -> None:
        self.name = spec.name
        self.tree = spec.tree
        self.base = spec.base
        self.base_view: MerkleTree | None = None
        """The base's tree in the source's shape, in the base-relative walk."""
        self.gi = -1
        self.shape: Shape | None = None
        self.view: MerkleTree | None = None
        """My tree as it is after the resize to the source's size, in the source's fanout."""
        self.walk: Walk | None = None
        self.want_mask: npt.NDArray[np.bool_] = np.zeros(0, dtype=bool)
        self.diff_leaves: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)
        self.prefixes: npt.NDArray[np.uint8] = np.zeros((0, 0), dtype=np.uint8)
        self.from_base: npt.NDArray[np.bool_] = np.zeros(0, dtype=bool)
        """Per differing leaf: the source said it holds the base's content there."""
        self.touched = False
        self.verified_tree: MerkleTree | ReplacedTree | None = None
        """The committed image's tree, once VERIFIED (the next common checkpoint reuses it), or
        what builds it when asked (``Target.verified_trees``)."""

    def own_length(self, leaf: int) -> int:
        """Length of ``leaf`` in my image after the resize."""
        assert self.shape is not None
        return leaf_length(self.shape.size, leaf)


@dataclass
class Plan:
    """Every requested leaf by its position in the transfer (images in order, leaves ascending)."""

    img: npt.NDArray[np.int64]
    leaf: npt.NDArray[np.int64]
    req: npt.NDArray[np.uint8]
    prefix: npt.NDArray[np.uint8]
    index: ContentIndex | None = None
    ref: dict[int, Location] = field(default_factory=dict)
    """Position → where the target holds the content it proposed (REF)."""
    dup: dict[int, int] = field(default_factory=dict)
    """Position → the earlier position whose block it duplicates (DUP)."""
    dup_targets: set[int] = field(default_factory=set)
    dup_cache: dict[int, bytes] = field(default_factory=dict)
    """The verified blocks of positions that later ones duplicate."""
    full: npt.NDArray[np.uint8] = field(default_factory=lambda: np.zeros((0, DIGEST_SIZE), dtype=np.uint8))
    """Per position, the verified 32-byte digest (for a dry run's roots and duplicates)."""

    @staticmethod
    def empty(t: int) -> Plan:
        z = np.zeros(0, dtype=np.int64)
        return Plan(z, z, np.zeros(0, dtype=np.uint8), np.zeros((0, t), dtype=np.uint8))

    @property
    def total(self) -> int:
        return len(self.leaf)


def _has_own_block(im: ImageState, leaf: int) -> bool:
    """Whether the target has a non-zero block at ``leaf`` (after the resize) to delta against."""
    assert im.view is not None
    if leaf >= im.tree.leaf_count:
        return False
    return im.view.leaf(leaf) != zero_digest(im.view.leaf_length(leaf))


def own_blocks(im: ImageState, leaves: Sequence[int]) -> Generator[Request, Result, dict[int, bytes]]:
    """The target's own blocks at ``leaves`` (ascending, all inside its original image), as they
    are after the resize."""
    blocks = yield from read_leaves(Holding(Of.IMAGE, im.name), leaves)
    return {leaf: fit(b, im.own_length(leaf)) for leaf, b in zip(leaves, blocks, strict=True)}


def decide(
    by_gi: Sequence[ImageState],
    images: Sequence[ImageState],
    references: Mapping[str, MerkleTree],
    params: ProtocolParams,
    key: bytes,
    dry_run: bool,
    stats: TransferStats,
) -> Generator[Request, Result, tuple[list[dict[str, Any] | None], Plan]]:
    """All walks are over: decide per differing leaf how to get it; the want's parts and the plan.
    Asks for the resized images' sizes to be set (they are then *touched*) and for the own blocks
    that fingerprints are made of."""
    t, cb = params.digest_bytes, params.ref_rest
    cctx = zstandard.ZstdCompressor(level=params.zstd_level, write_checksum=False, write_content_size=True,
                                    write_dict_id=False)
    holdings: list[tuple[Holding, MerkleTree]] = []
    if any(len(im.diff_leaves) for im in by_gi):  # ~50 ms per GiB held: only when needed
        holdings = [(Holding(Of.IMAGE, im.name), im.tree) for im in images]
        holdings += [(Holding(Of.REFERENCE, name), tree) for name, tree in references.items()]
    index = ContentIndex(holdings, t)
    plan = Plan.empty(t)
    plan.index = index
    parts: list[dict[str, Any] | None] = []
    first_of: dict[bytes, int] = {}
    p_img, p_leaf, p_req, p_pref = [], [], [], []
    pos0 = 0
    zero_full = zero_digest()[:t]
    for im in by_gi:
        assert im.shape is not None and im.view is not None
        lv, pref = im.diff_leaves, im.prefixes
        stats.images[im.name].divergent = len(lv)
        if not dry_run and im.shape.size != im.tree.size:
            yield SetSize(im.name, im.shape.size)
            im.touched = True
        if len(lv) == 0:
            parts.append(None)
            continue
        im.touched = True
        kinds = np.empty(len(lv), dtype=np.uint8)
        cands: list[bytes] = []
        dups: list[int] = []
        fp_leaves: list[int] = []
        locs = index.lookup(pref)
        for j, leaf in enumerate(lv.tolist()):
            pos = pos0 + j
            length = im.own_length(leaf)
            pb = pref[j].tobytes()
            zd = zero_full if length == LEAF_SIZE else zero_digest(length)[:t]
            loc = locs[j]
            if pb == zd:
                kinds[j] = Req.ZERO
            elif im.from_base[j]:
                kinds[j] = Req.BASE
            elif loc is not None:
                kinds[j] = Req.REF
                cands.append(index.digest(loc)[t : t + cb])
                plan.ref[pos] = loc
            elif pb in first_of:
                kinds[j] = Req.DUP
                dups.append(first_of[pb])
                plan.dup[pos] = first_of[pb]
                plan.dup_targets.add(first_of[pb])
            else:
                first_of[pb] = pos
                with_fp = params.delta and (im.base_view is None or params.delta_with_base)
                if with_fp and _has_own_block(im, leaf):
                    kinds[j] = Req.DELTA
                    fp_leaves.append(leaf)
                else:
                    kinds[j] = Req.BLOCK
        fps = b""
        if fp_leaves:
            blocks = yield from own_blocks(im, fp_leaves)
            sub, fb = params.sub_block_size, params.fingerprint_bytes
            fps = b"".join(fingerprints(blocks[leaf], sub, fb, key) for leaf in fp_leaves)
        part = {
            "m": pack_bits(im.want_mask),
            "c": b"".join(cands),
            "u": np.asarray(dups, dtype="<u4").tobytes(),
            "f": fps,
        }
        stats.bitmap_bytes += len(part["m"])
        stats.leaf_digest_bytes += len(part["c"])
        stats.fingerprint_bytes += len(fps)
        stats.kind_bytes += put_kinds(part, kinds.tobytes(), cctx, count=False) + len(part["u"])
        parts.append(part)
        p_img.append(np.full(len(lv), im.gi, dtype=np.int64))
        p_leaf.append(lv)
        p_req.append(kinds)
        p_pref.append(pref)
        pos0 += len(lv)
    if p_leaf:
        plan.img = np.concatenate(p_img)
        plan.leaf = np.concatenate(p_leaf)
        plan.req = np.concatenate(p_req)
        plan.prefix = np.concatenate(p_pref)
    plan.full = np.zeros((plan.total, DIGEST_SIZE), dtype=np.uint8)
    return parts, plan
