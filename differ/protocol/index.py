"""The target's content index: digest prefix → where it holds a leaf with that content (its own
images, the references it was given), so a differing leaf it already holds anywhere travels as a
confirmation instead of a block. Built from trees alone: the leaf itself is read by a request.

It is built inside the downtime (the target's own trees exist only once it saved), over every
leaf it holds (~1.3 M for a 1 GiB guest with a 1.5 GiB disk and the checkpoint's two), and asked
about a few thousand differing leaves: so it keeps each holding's keys unsorted, in leaf order,
and a lookup sorts the *questions* and finds the held keys among them (a bucket table of the
questions' top bits, then ``searchsorted`` of the few held keys that pass), instead of sorting
every held key: ~0.2 s of the walk on a notes-sized migration before, ~0.02 s after
(``bench/results/downtime-cpu.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from differ.merkle import ABSENT_DIGEST, MerkleTree, rows_equal
from differ.protocol.events import Holding

Location = tuple[int, int]
"""(holding number, leaf)."""
BUCKET_BITS = 20
"""A lookup first drops the held keys whose top ``BUCKET_BITS`` bits no question has (a table of
2^20 booleans, 1 MiB): of a few thousand questions, ~0.3 % of the held keys pass to the search."""
_SHIFT = np.uint64(64 - BUCKET_BITS)


def prefix_keys(digests: npt.NDArray[np.uint8], nbytes: int) -> npt.NDArray[np.uint64]:
    """Big-endian integer of the first ``nbytes`` (≤ 8) bytes of each digest: sortable lookup keys."""
    buf = np.zeros((len(digests), 8), dtype=np.uint8)
    buf[:, :nbytes] = digests[:, :nbytes]
    return buf.view(">u8").ravel().astype(np.uint64)


def _words(digests: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """``digests`` as a C-contiguous ``(n, 32)`` array (a tree's leaves are: no copy)."""
    return digests if digests.flags.c_contiguous else np.ascontiguousarray(digests)


def row_keys(digests: npt.NDArray[np.uint8], nbytes: int) -> npt.NDArray[np.uint64]:
    """:func:`prefix_keys` of every row, read as one big-endian word per row (no copy of the rows)."""
    word = _words(digests).view(">u8")[:, 0].astype(np.uint64)
    return word if nbytes >= 8 else word & ~np.uint64((1 << (8 * (8 - nbytes))) - 1)


def indexable(tree: MerkleTree) -> npt.NDArray[np.int64]:
    """The leaves of ``tree`` an index holds (ascending): neither zero leaves (they travel as zero
    confirmations) nor leaves of unknown content (:data:`~differ.merkle.ABSENT_DIGEST`)."""
    if tree.leaf_count == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(~(tree.zero_mask() | rows_equal(tree.leaves, ABSENT_DIGEST))).astype(np.int64)


class ContentIndex:
    """Digest prefix → (holding, leaf): per holding, the ``min(t, 8)``-byte keys of the leaves it
    holds (:func:`indexable`), in leaf order: ~16 B per leaf held. Where several leaves share a
    key, the first holding's lowest leaf is the one named."""

    def __init__(self, holdings: Sequence[tuple[Holding, MerkleTree]], t: int) -> None:
        self.t = t
        self.k = min(t, 8)
        self.holdings = list(holdings)
        self._parts: list[tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]] = []
        for _, tree in self.holdings:
            idx = indexable(tree)
            self._parts.append((row_keys(tree.leaves, self.k)[idx], idx))

    def lookup(self, prefixes: npt.NDArray[np.uint8]) -> list[Location | None]:
        """For each t-byte prefix: (holding, leaf) of content with that digest prefix, or None.
        Of the leaves held with its key, the first holding's lowest leaf is the candidate; with
        ``t`` > 8 it must match all ``t`` bytes (else None)."""
        out: list[Location | None] = [None] * len(prefixes)
        if len(prefixes) == 0:
            return out
        q = prefix_keys(prefixes, self.k)
        uq, inv = np.unique(q, return_inverse=True)
        best_sid = np.full(len(uq), -1, dtype=np.int64)
        best_leaf = np.zeros(len(uq), dtype=np.int64)
        asked = np.zeros(1 << BUCKET_BITS, dtype=bool)         # a key's top bits: could it be asked?
        asked[uq >> _SHIFT] = True
        for sid, (keys, leaves) in enumerate(self._parts):
            maybe = np.flatnonzero(asked[keys >> _SHIFT])
            if len(maybe) == 0:
                continue
            mk = keys[maybe]
            pos = np.minimum(np.searchsorted(uq, mk), len(uq) - 1)
            eq = uq[pos] == mk
            hit, pos = maybe[eq], pos[eq]
            if len(hit) == 0:
                continue
            found, first = np.unique(pos, return_index=True)      # each key's lowest leaf here
            new = best_sid[found] < 0
            best_sid[found[new]] = sid
            best_leaf[found[new]] = leaves[hit[first[new]]]
            if (best_sid >= 0).all():
                break
        for i in np.flatnonzero(best_sid[inv] >= 0).tolist():
            u = int(inv[i])
            sid, leaf = int(best_sid[u]), int(best_leaf[u])
            if self.t <= 8 or bytes(self.holdings[sid][1].leaves[leaf, : self.t]) == bytes(prefixes[i]):
                out[i] = (sid, leaf)
        return out

    def digest(self, loc: Location) -> bytes:
        return self.holdings[loc[0]][1].leaf(loc[1])

    def holding(self, loc: Location) -> Holding:
        return self.holdings[loc[0]][0]
