"""Similarity sketches of 4 KiB leaves: which leaf of a pool is probably the most like a given one.

A leaf that is nowhere at the target byte for byte is often *almost* a leaf the target holds: a
heap page written at another physical page than the checkpoint's copy, a file's page cache after a
small edit, an object moved by the allocator. XOR against that leaf compresses to a fraction of
the leaf (XOR against the checkpoint's leaf *at the same place* finds only the first kind).

A sketch is :data:`SUPER_FEATURES` 64-bit super-features per leaf (Broder's resemblance sketches,
as delta-compressing deduplicators use them): each of :data:`FEATURES` features is the largest
value of a different linear transform of a hash over every 8-byte-aligned window of
:data:`WINDOW_WORDS` words *and its offset* (the offset keeps XOR in mind: content that moved
within the page is not what an XOR can use), and :data:`FEATURES_PER_SUPER` features make one
super-feature. Two leaves that share most windows at the same offsets share a super-feature with
high probability; two unrelated ones almost never do. An :class:`SimilarityIndex` maps every
super-feature of a pool (e.g. the checkpoint's memory image) to a leaf that has it; the sender looks
its leaf up and tries an XOR against each candidate, keeping whatever compresses smallest.

Pure numpy over rows of leaves: ~0.3 s per 10,000 leaves on one core here.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from differ.source import LEAF_SIZE
from replay_migrate.errors import ImageError
from replay_migrate.files import atomic_write

WINDOW_WORDS = 1
"""64-bit words per hashed window (32 bytes)."""
FEATURES = 12
FEATURES_PER_SUPER = 3
SUPER_FEATURES = FEATURES // FEATURES_PER_SUPER
SKETCH_ROWS = 4096
"""Leaves sketched per numpy call (bounds the temporary arrays: ~25 MiB)."""
SKETCH_FORMAT = 1
MAX_INDEX_LEAVES = 1 << 28
"""Most leaves of an indexed image (1 TiB of 4 KiB pages)."""
INDEX_SLACK_BYTES = 1 << 16
"""What a saved index may hold besides its two arrays (zip and ``.npy`` headers, two scalars)."""

_WORDS = LEAF_SIZE // 8
_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5],
                dtype=np.uint64)
_OFFSET_MIX = np.uint64(0xFF51AFD7ED558CCD)
_TRANSFORMS = np.array([0xD6E8FEB86659FD93, 0xA0761D6478BD642F, 0xE7037ED1A0B428DB, 0x8EBC6AF09C88C6E3,
                        0x589965CC75374CC3, 0x1D8E4E27C47D124F, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9,
                        0xC4CEB9FE1A85EC53, 0x2127599BF4325C37, 0x880355F21E6D1965, 0x9FB21C651E98DF25],
                       dtype=np.uint64)
_OFFSETS = (np.arange(_WORDS - WINDOW_WORDS + 1, dtype=np.uint64) + np.uint64(1)) * _OFFSET_MIX


def sketch(leaves: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
    """Super-features of each row of ``leaves`` (shape ``(n, 4096)``): shape ``(n, SUPER_FEATURES)``.
    A leaf of zeros gets the same sketch as every other leaf of zeros (callers leave those out)."""
    if leaves.ndim != 2 or leaves.shape[1] != LEAF_SIZE or leaves.dtype != np.uint8:
        raise ValueError(f"sketch takes (n, {LEAF_SIZE}) uint8 rows, got {leaves.shape} {leaves.dtype}")
    out = np.empty((len(leaves), SUPER_FEATURES), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for start in range(0, len(leaves), SKETCH_ROWS):
            rows = np.ascontiguousarray(leaves[start : start + SKETCH_ROWS])
            w = rows.view("<u8").reshape(len(rows), _WORDS).astype(np.uint64)
            n = _WORDS - WINDOW_WORDS + 1
            h = np.broadcast_to(_OFFSETS, (len(rows), n)).copy()
            for k in range(WINDOW_WORDS):
                h ^= w[:, k : k + n] * _MIX[k]
            h ^= h >> np.uint64(29)
            feats = np.stack([(h * a + np.uint64(i)).max(axis=1) for i, a in enumerate(_TRANSFORMS)], axis=1)
            f = feats.reshape(len(rows), SUPER_FEATURES, FEATURES_PER_SUPER)
            sup = f[:, :, 0].copy()
            for k in range(1, FEATURES_PER_SUPER):
                sup = sup * np.uint64(0x100000001B3) ^ f[:, :, k]
            out[start : start + len(rows)] = sup
    return out


@dataclass(frozen=True)
class SimilarityIndex:
    """Super-feature → a pool leaf that has it, per super-feature position (sorted, for lookups)."""

    keys: npt.NDArray[np.uint64]
    """Shape ``(SUPER_FEATURES, m)``, each row sorted."""
    leaves: npt.NDArray[np.int64]
    """Shape ``(SUPER_FEATURES, m)``: the pool leaf of each key."""
    leaf_count: int
    """Leaves of the pool's image: every leaf named here is below it."""

    def __post_init__(self) -> None:
        k, v = self.keys, self.leaves
        if (k.dtype != np.uint64 or v.dtype != np.int64 or k.ndim != 2 or k.shape != v.shape
                or k.shape[0] != SUPER_FEATURES or not 0 <= self.leaf_count <= MAX_INDEX_LEAVES):
            raise ValueError("malformed similarity index")
        if v.size and (v.min() < 0 or v.max() >= self.leaf_count):
            raise ValueError("similarity index names leaves outside its image")
        if k.shape[1] > 1 and (k[:, 1:] < k[:, :-1]).any():      # (np.diff of uint64 wraps)
            raise ValueError("similarity index keys are not sorted")

    @staticmethod
    def build(leaf_count: int, rows: Iterable[tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]]) -> SimilarityIndex:
        """The index of a pool given as (leaf numbers, their full 4 KiB rows) chunks; where two
        leaves share a super-feature the first one given is kept."""
        idx_parts: list[npt.NDArray[np.int64]] = []
        sk_parts: list[npt.NDArray[np.uint64]] = []
        for leaves, data in rows:
            if len(leaves):
                idx_parts.append(np.asarray(leaves, dtype=np.int64))
                sk_parts.append(sketch(data))
        idx = np.concatenate(idx_parts) if idx_parts else np.zeros(0, dtype=np.int64)
        sk = np.concatenate(sk_parts) if sk_parts else np.zeros((0, SUPER_FEATURES), dtype=np.uint64)
        keys = np.empty((SUPER_FEATURES, 0), dtype=np.uint64)
        out_leaves = np.empty((SUPER_FEATURES, 0), dtype=np.int64)
        kr, lr = [], []
        for s in range(SUPER_FEATURES):
            col = sk[:, s]
            uniq, first = np.unique(col, return_index=True)     # sorted; the first leaf given per key
            kr.append(uniq)
            lr.append(idx[first])
        width = max((len(r) for r in kr), default=0)
        if kr:
            keys = np.full((SUPER_FEATURES, width), np.iinfo(np.uint64).max, dtype=np.uint64)
            out_leaves = np.zeros((SUPER_FEATURES, width), dtype=np.int64)
            for s in range(SUPER_FEATURES):
                # pad each row to one width with the largest key, pointing at its last real leaf
                keys[s, : len(kr[s])] = kr[s]
                out_leaves[s, : len(lr[s])] = lr[s]
                if len(lr[s]):
                    out_leaves[s, len(lr[s]) :] = lr[s][-1]
        return SimilarityIndex(keys, out_leaves, leaf_count)

    def candidates(self, sketches: npt.NDArray[np.uint64]) -> list[list[int]]:
        """For each sketch row: the pool leaves that share one of its super-features (at most
        ``SUPER_FEATURES``, distinct, in super-feature order)."""
        out: list[list[int]] = [[] for _ in range(len(sketches))]
        if not self.keys.size or not len(sketches):
            return out
        for s in range(SUPER_FEATURES):
            row = self.keys[s]
            pos = np.minimum(np.searchsorted(row, sketches[:, s]), row.shape[0] - 1)
            for i in np.flatnonzero(row[pos] == sketches[:, s]).tolist():
                leaf = int(self.leaves[s, pos[i]])
                if leaf not in out[i]:
                    out[i].append(leaf)
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        """An uncompressed ``.npz``, replaced whole (see :func:`replay_migrate.files.atomic_write`)."""
        import io

        buf = io.BytesIO()
        np.savez(buf, keys=self.keys, leaves=self.leaves, leaf_count=np.int64(self.leaf_count),
                 format=np.int64(SKETCH_FORMAT))
        atomic_write(Path(path), buf.getvalue())

    @staticmethod
    def load(path: str | os.PathLike[str], *, expect_leaves: int) -> SimilarityIndex:
        """A saved index of an image of ``expect_leaves`` leaves; ImageError for anything else (a
        file of another format, shape or image, or one that does not parse)."""
        if not 0 <= expect_leaves <= MAX_INDEX_LEAVES:
            raise ImageError(f"{path}: an index of {expect_leaves} leaves is past MAX_INDEX_LEAVES")
        try:
            # uncompressed: the file's size bounds what loading it allocates (two arrays of at
            # most SUPER_FEATURES x expect_leaves 8-byte entries, plus the zip's headers)
            if os.stat(path).st_size > SUPER_FEATURES * 16 * expect_leaves + INDEX_SLACK_BYTES:
                raise ImageError(f"{path}: larger than an index of {expect_leaves} leaves can be")
            with np.load(path, allow_pickle=False) as z:
                if int(z["format"]) != SKETCH_FORMAT or int(z["leaf_count"]) != expect_leaves:
                    raise ImageError(f"{path}: a similarity index of another format or image")
                keys, leaves = z["keys"], z["leaves"]
                return SimilarityIndex(np.asarray(keys), np.asarray(leaves), expect_leaves)
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
            raise ImageError(f"{path}: unreadable similarity index: {e}") from e


def index_of(leaf_count: int, present: npt.NDArray[np.int64], read: Callable[[int, int], bytes],
             chunk: int = SKETCH_ROWS) -> SimilarityIndex:
    """The index of an image's leaves ``present`` (ascending, full-length, not zero), read in
    chunks through ``read(first_leaf, count)``: runs of consecutive leaves in one call."""

    def rows() -> Iterable[tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]]:
        for start in range(0, len(present), chunk):
            part = present[start : start + chunk]
            data = bytearray()
            k = 0
            while k < len(part):
                run = 1
                while k + run < len(part) and part[k + run] == part[k] + run:
                    run += 1
                data += read(int(part[k]), run)
                k += run
            yield part, np.frombuffer(bytes(data), dtype=np.uint8).reshape(len(part), LEAF_SIZE)

    return SimilarityIndex.build(leaf_count, rows())
