"""The ping-pong tree walk of one image on one side (both sides run the same code).

Each walk part carries a bitmap of which of the *peer's* last digests differ and the sender's
truncated digests of the children of those nodes, so every one-way message descends a level. In
the base-relative walk a node equal to the base's (the checkpoint both sides started from) travels
as one bit instead of its digest.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from differ.merkle import MerkleTree
from differ.protocol.messages import MESSAGE_SLACK, binary, pack_bits, unpack_bits
from differ.protocol.stats import TransferStats
from replay_migrate.errors import ProtocolError


def walk_bytes(leaves: int, digest_bytes: int, images: int) -> int:
    """Largest walk part set over trees of ``leaves`` leaves in all: one level per image, at most
    the leaf level, each node with its digest and a bit in each of two bitmaps."""
    return MESSAGE_SLACK * (1 + images) + leaves * (digest_bytes + 1)


def first_level(depth: int) -> int:
    """The level the source's first part carries: the source sends even levels, the target odd
    ones, so the source sends the leaf level and the target answers it with its requests."""
    return depth if depth % 2 == 0 else depth - 1


def children(parents: npt.NDArray[np.int64], fanout: int, child_level_size: int) -> npt.NDArray[np.int64]:
    kids = (parents[:, None] * fanout + np.arange(fanout, dtype=np.int64)).ravel()
    return kids[kids < child_level_size]


class Walk:
    """One image's walk state on one side: the tree compared, the digests last sent and, in the
    base-relative walk, the base's tree in the same shape (both sides derive it identically)."""

    def __init__(self, tree: MerkleTree, t: int, base: MerkleTree | None = None) -> None:
        if base is not None and [len(lv) for lv in base.levels] != [len(lv) for lv in tree.levels]:
            raise ValueError("the base tree must have the walked tree's shape")
        self.tree = tree
        self.t = t
        self.base = base
        self.sizes = [len(lv) for lv in tree.levels]
        self.active = True
        self.sent_level = -1
        self.sent_nodes: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)

    def encode(self, level: int, nodes: npt.NDArray[np.int64], stats: TransferStats) -> dict[str, Any]:
        """My digests of ``nodes`` at ``level`` (``d``, truncated). In the base-relative walk, ``b``
        marks the nodes whose whole 32-byte digest equals the base's; theirs are left out of ``d``:
        where both sides kept the checkpoint's content a node costs one bit, not ``t`` bytes."""
        mine = self.tree.levels[level][nodes]
        part: dict[str, Any] = {"l": level}
        if self.base is not None:
            same = (mine == self.base.levels[level][nodes]).all(axis=1)
            part["b"] = pack_bits(same)
            stats.bitmap_bytes += len(part["b"])
            mine = mine[~same]
        part["d"] = mine[:, : self.t].tobytes()
        stats.walk_digest_bytes += len(part["d"])
        return part

    def start(self, stats: TransferStats) -> dict[str, Any]:
        """(Source) the first part: every node of the top even level."""
        level = first_level(self.tree.depth)
        nodes = np.arange(self.sizes[level], dtype=np.int64)
        self.sent_level, self.sent_nodes = level, nodes
        return self.encode(level, nodes, stats)

    def compare(
        self, level: int, nodes: npt.NDArray[np.int64], part: dict[str, Any], what: str
    ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
        """Which of ``nodes`` differ from the peer's part; also the peer's digest prefixes (the
        base's where it said "as the base") and which nodes it said are as the base. A node the
        peer holds at the base's content is compared on all 32 bytes."""
        n = len(nodes)
        if self.base is None:
            if "b" in part:
                raise ProtocolError(f"{what}: base bitmap in a walk without base")
            same = np.zeros(n, dtype=bool)
        else:
            same = unpack_bits(binary(part, "b"), n, what)
        peer = binary(part, "d")
        k = n - int(same.sum())
        if len(peer) != k * self.t:
            raise ProtocolError(f"{what}: {len(peer)} digest bytes for {k} nodes")
        mine = self.tree.levels[level][nodes]
        theirs = np.empty((n, self.t), dtype=np.uint8)
        theirs[~same] = np.frombuffer(peer, dtype=np.uint8).reshape(k, self.t)
        diff = np.empty(n, dtype=bool)
        diff[~same] = (mine[~same, : self.t] != theirs[~same]).any(axis=1)
        if same.any():
            assert self.base is not None
            base = self.base.levels[level][nodes[same]]
            theirs[same] = base[:, : self.t]
            diff[same] = (mine[same] != base).any(axis=1)
        return diff, theirs, same

    def nodes_for(self, part: dict[str, Any], level: int, what: str) -> npt.NDArray[np.int64]:
        """The nodes (at ``level``) the peer's part carries digests for: the children of the
        nodes I sent that its bitmap marks as differing."""
        if self.sent_level != level + 1:
            raise ProtocolError(f"{what}: walk part for level {level}, expected {self.sent_level - 1}")
        mask = unpack_bits(binary(part, "m"), len(self.sent_nodes), what)
        parents = self.sent_nodes[mask]
        if len(parents) == 0:
            raise ProtocolError(f"{what}: walk part with no differing node")
        return children(parents, self.tree.fanout, self.sizes[level])

    def reply(
        self, level: int, nodes: npt.NDArray[np.int64], diff: npt.NDArray[np.bool_], stats: TransferStats
    ) -> dict[str, Any] | None:
        """My answer to the peer's digests at ``level``: the bitmap and my next level, or None when
        nothing differs (the walk of this image is over)."""
        if not diff.any():
            self.active = False
            return None
        kids = children(nodes[diff], self.tree.fanout, self.sizes[level - 1])
        part = self.encode(level - 1, kids, stats)
        part["m"] = pack_bits(diff)
        stats.bitmap_bytes += len(part["m"])
        self.sent_level, self.sent_nodes = level - 1, kids
        return part
