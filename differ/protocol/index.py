"""The target's content index: digest prefix → where it holds a leaf with that content (its own
images, the references it was given), so a differing leaf it already holds anywhere travels as a
confirmation instead of a block. Built from trees alone: the leaf itself is read by a request."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from differ.merkle import ABSENT_DIGEST, MerkleTree
from differ.protocol.events import Holding

Location = tuple[int, int]
"""(holding number, leaf)."""


def prefix_keys(digests: npt.NDArray[np.uint8], nbytes: int) -> npt.NDArray[np.uint64]:
    """Big-endian integer of the first ``nbytes`` (≤ 8) bytes of each digest: sortable lookup keys."""
    buf = np.zeros((len(digests), 8), dtype=np.uint8)
    buf[:, :nbytes] = digests[:, :nbytes]
    return buf.view(">u8").ravel().astype(np.uint64)


class ContentIndex:
    """Digest prefix → (holding, leaf), as numpy sorted keys: ~16 B per leaf held. Zero leaves and
    leaves of unknown content (:data:`~differ.merkle.ABSENT_DIGEST`) are left out."""

    def __init__(self, holdings: Sequence[tuple[Holding, MerkleTree]], t: int) -> None:
        self.t = t
        self.k = min(t, 8)
        self.holdings = list(holdings)
        keys, sids, leaves = [], [], []
        absent = np.frombuffer(ABSENT_DIGEST, dtype=np.uint8)
        for sid, (_, tree) in enumerate(self.holdings):
            ok = ~tree.zero_mask() & ~(tree.leaves == absent).all(axis=1)
            idx = np.flatnonzero(ok).astype(np.int64)
            keys.append(prefix_keys(tree.leaves[idx], self.k))
            sids.append(np.full(len(idx), sid, dtype=np.int64))
            leaves.append(idx)
        all_keys = np.concatenate(keys) if keys else np.zeros(0, dtype=np.uint64)
        order = np.argsort(all_keys, kind="stable")
        self.keys = all_keys[order]
        self.sids = (np.concatenate(sids) if sids else np.zeros(0, dtype=np.int64))[order]
        self.leaves = (np.concatenate(leaves) if leaves else np.zeros(0, dtype=np.int64))[order]

    def lookup(self, prefixes: npt.NDArray[np.uint8]) -> list[Location | None]:
        """For each t-byte prefix: (holding, leaf) of content with that digest prefix, or None."""
        out: list[Location | None] = [None] * len(prefixes)
        if len(self.keys) == 0 or len(prefixes) == 0:
            return out
        q = prefix_keys(prefixes, self.k)
        pos = np.minimum(np.searchsorted(self.keys, q), len(self.keys) - 1)
        for i in np.flatnonzero(self.keys[pos] == q).tolist():
            sid, leaf = int(self.sids[pos[i]]), int(self.leaves[pos[i]])
            if self.t <= 8 or bytes(self.holdings[sid][1].leaves[leaf, : self.t]) == bytes(prefixes[i]):
                out[i] = (sid, leaf)
        return out

    def digest(self, loc: Location) -> bytes:
        return self.holdings[loc[0]][1].leaf(loc[1])

    def holding(self, loc: Location) -> Holding:
        return self.holdings[loc[0]][0]
