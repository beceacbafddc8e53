"""Where replay's residue goes: for every leaf the replayed target still holds differently from the
source, whether the target holds the source's content *anywhere* (its own memory at another page,
its own disk as the guest sees it, the checkpoint's memory or disk), how the transfer sent it, what
it costs on the wire, and what kind of guest page it is.

Everything here reads the states both sides saved at suspend, on the host. The page kinds come
from the guest's own page flags (``/proc/kpageflags`` read in a restored *copy* of each state:
:mod:`bench.pageflags`); without them a content heuristic (:func:`bench.divergence.owner_hint`)
names the pages instead. A leaf that exists at the target travels as a reference (a few bytes);
the residue's bytes are the leaves that exist nowhere there, and this module says what they are.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import zstandard

from bench.divergence import MAIN_RAM_BLOCK, owner_hint
from differ.blocks import MemoryImageSource, Qcow2OverlaySource
from differ.merkle import MerkleTree
from differ.protocol import TransferStats
from differ.protocol.index import prefix_keys
from differ.source import LEAF_SIZE
from store.vmstate import FANOUT, CheckpointTrees, VmState

ZSTD_LEVEL = 3
"""The protocol's default level: the per-leaf cost estimate compresses each leaf alone at it."""
HELD_ZERO = "zero page"
HELD_TARGET_MEMORY = "the target's memory (another page)"
HELD_TARGET_DISK = "the target's disk (guest-visible)"
HELD_CHECKPOINT_MEMORY = "the checkpoint's memory"
HELD_CHECKPOINT_DISK = "the checkpoint's disk"
HELD_NOWHERE = "nowhere at the target"
HELD_ORDER = (HELD_ZERO, HELD_TARGET_MEMORY, HELD_TARGET_DISK, HELD_CHECKPOINT_MEMORY, HELD_CHECKPOINT_DISK,
              HELD_NOWHERE)
"""Where a divergent source leaf's content is found, in the order looked up (the first wins)."""
NON_RAM = "device state / save header (non-RAM)"


@dataclass
class ImageResidue:
    divergent: int = 0
    held: dict[str, int] = field(default_factory=dict)
    """Divergent source leaves by where the target holds their content (:data:`HELD_ORDER`)."""
    nowhere_bytes: int = 0
    """zstd of each leaf held nowhere, alone, whole or XOR the checkpoint's leaf (the smaller):
    what the transfer has to ship for them, per leaf (one frame per batch does somewhat better)."""
    nowhere_kinds: dict[str, int] = field(default_factory=dict)
    """Leaves held nowhere by the kind of page at the source (page flags, else the heuristic)."""
    nowhere_kind_bytes: dict[str, int] = field(default_factory=dict)
    pairs: dict[str, int] = field(default_factory=dict)
    """Leaves held nowhere by ``source kind -> target kind`` at the same page (what the target
    keeps where the source has that content): e.g. file data at the source, a free page there."""
    nowhere_like_target: dict[str, int] = field(default_factory=dict)
    """Leaves held nowhere by how many bytes differ from the target's page at the same place."""


@dataclass
class Residue:
    images: dict[str, ImageResidue] = field(default_factory=dict)
    sent: dict[str, dict[str, int]] = field(default_factory=dict)
    """How the protocol (a dry run on the same two states) got each divergent leaf: referenced,
    duplicate, base, zero, full, delta, xbase, xsim."""
    block_bytes: int = 0
    kinds_from: str = "content heuristic"
    """Where the page kinds come from: ``page flags`` or the content heuristic."""

    @property
    def held_anywhere(self) -> int:
        return sum(n for im in self.images.values() for k, n in im.held.items() if k != HELD_NOWHERE)

    @property
    def sent_as_held(self) -> int:
        """Leaves the transfer took from what the target holds (no block bytes)."""
        return sum(s.get(k, 0) for s in self.sent.values() for k in ("referenced", "duplicate", "base", "zero"))


def digest_keys(digests: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
    """Sorted 8-byte keys of a set of leaf digests (a collision is 2^-64 per pair: fine for a
    report; the protocol itself compares what it proposes against full digests)."""
    return np.unique(prefix_keys(digests, 8))


def held_where(source: MerkleTree, leaves: npt.NDArray[np.int64],
               holdings: Sequence[tuple[str, npt.NDArray[np.uint64]]]) -> list[str]:
    """For each of ``source``'s ``leaves``: the first holding (name, sorted keys) whose keys hold
    its digest, :data:`HELD_ZERO` for a zero leaf, else :data:`HELD_NOWHERE`."""
    out = [HELD_NOWHERE] * len(leaves)
    if not len(leaves):
        return out
    zero = source.zero_mask()[leaves]
    keys = prefix_keys(source.leaves[leaves], 8)
    found = np.zeros(len(leaves), dtype=bool)
    for i in np.flatnonzero(zero).tolist():
        out[i] = HELD_ZERO
    found |= zero
    for name, held in holdings:
        if not len(held):
            continue
        pos = np.minimum(np.searchsorted(held, keys), len(held) - 1)
        hit = (held[pos] == keys) & ~found
        for i in np.flatnonzero(hit).tolist():
            out[i] = name
        found |= hit
    return out


def leaf_cost(page: bytes, base: bytes | None, cctx: zstandard.ZstdCompressor) -> int:
    """Bytes the protocol ships for a leaf held nowhere: zstd of it, or of it XOR the checkpoint's
    leaf at the same place, whichever is smaller."""
    whole = len(cctx.compress(page))
    if base is None or len(base) != len(page):
        return whole
    x = (np.frombuffer(page, np.uint8) ^ np.frombuffer(base, np.uint8)).tobytes()
    return min(whole, len(cctx.compress(x)))


def bytes_bucket(n: int) -> str:
    """How many bytes of a leaf differ from another, in the buckets the report uses."""
    if n <= 8:
        return "<= 8 B"
    if n <= 64:
        return "9-64 B"
    if n <= 1024:
        return "65 B-1 KiB"
    return "> 1 KiB"


def _differing(a: bytes, b: bytes) -> int:
    if len(a) != len(b):
        return max(len(a), len(b))
    return int(np.count_nonzero(np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8)))


PageKinds = Mapping[int, str]
"""Guest page frame number → kind (:func:`bench.pageflags.page_kind`)."""


def _kind(pfn: int | None, page: bytes, kinds: PageKinds | None) -> str:
    if pfn is None:
        return NON_RAM
    if kinds is not None:
        return kinds.get(pfn, "unknown")
    return owner_hint(page) if any(page) else "zero"


def residue(source: VmState, target: VmState, trees: CheckpointTrees, *,
            source_kinds: PageKinds | None = None, target_kinds: PageKinds | None = None,
            sent: TransferStats | None = None) -> Residue:
    """Sort the leaves where ``target`` (replayed, before patching) differs from ``source`` by where
    the target holds the source's content; the ones held nowhere by kind and cost. ``sent``: the
    stats of a transfer between the two (e.g. :func:`store.vmstate.sync_states` dry run)."""
    out = Residue(kinds_from="page flags" if source_kinds is not None else "content heuristic")
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    with ExitStack() as stack:
        s_mem = stack.enter_context(MemoryImageSource(source.memory))
        t_mem = stack.enter_context(MemoryImageSource(target.memory))
        c_mem = stack.enter_context(MemoryImageSource(source.checkpoint.memory))
        s_disk = stack.enter_context(Qcow2OverlaySource(source.disk, backing_tree=trees.disk))
        t_disk = stack.enter_context(Qcow2OverlaySource(target.disk, backing_tree=trees.disk))
        ts_mem, tt_mem = MerkleTree.build(s_mem, FANOUT), MerkleTree.build(t_mem, FANOUT)
        ts_disk, tt_disk = MerkleTree.build(s_disk, FANOUT), MerkleTree.build(t_disk, FANOUT)
        holdings = [
            (HELD_TARGET_MEMORY, digest_keys(tt_mem.leaves)),
            (HELD_TARGET_DISK, digest_keys(tt_disk.leaves)),
            (HELD_CHECKPOINT_MEMORY, digest_keys(trees.memory.leaves)),
            (HELD_CHECKPOINT_DISK, digest_keys(trees.disk.digests)),
        ]
        main = next((b for b in s_mem.layout.blocks if b.name == MAIN_RAM_BLOCK and not b.ignored), None)
        first_pfn_leaf = main.pages_offset // LEAF_SIZE if main is not None else None
        for name, ts, tt, src, tgt, base, base_tree in (
                ("memory", ts_mem, tt_mem, s_mem, t_mem, c_mem, trees.memory),
                ("disk", ts_disk, tt_disk, s_disk, t_disk, None, trees.disk_tree)):
            leaves = ts.differing_leaves(tt)
            leaves = leaves[leaves < ts.leaf_count]
            where = held_where(ts, leaves, holdings)
            im = ImageResidue(divergent=len(leaves), held=dict(Counter(where).most_common()))
            kinds: Counter[str] = Counter()
            kind_bytes: Counter[str] = Counter()
            pairs: Counter[str] = Counter()
            like: Counter[str] = Counter()
            for leaf, w in zip(leaves.tolist(), where, strict=True):
                if w != HELD_NOWHERE:
                    continue
                page = src.read(leaf, 1)
                theirs = tgt.read(leaf, 1) if leaf < tgt.leaf_count else bytes(len(page))
                ck = (base.read(leaf, 1) if base is not None and leaf < base_tree.leaf_count
                      and base_tree.leaf_length(leaf) == len(page) else None)
                cost = leaf_cost(page, ck, cctx)
                im.nowhere_bytes += cost
                if name == "memory":
                    pfn = (leaf - first_pfn_leaf if first_pfn_leaf is not None and main is not None
                           and first_pfn_leaf <= leaf < main.pages_end // LEAF_SIZE else None)
                    kind = _kind(pfn, page, source_kinds)
                    pairs[f"{kind} -> {_kind(pfn, theirs, target_kinds)}"] += 1
                else:
                    kind = "disk block"
                kinds[kind] += 1
                kind_bytes[kind] += cost
                like[bytes_bucket(_differing(page, theirs))] += 1
            im.nowhere_kinds = dict(kinds.most_common())
            im.nowhere_kind_bytes = dict(kind_bytes.most_common())
            im.pairs = dict(pairs.most_common())
            im.nowhere_like_target = dict(like.most_common())
            out.images[name] = im
    if sent is not None:
        for name, st in sent.images.items():
            out.sent[name] = {k: getattr(st, k) for k in ("referenced", "duplicate", "base", "zero", "full",
                                                            "delta", "xbase", "xsim")}
        out.block_bytes = sent.block_bytes
    return out
