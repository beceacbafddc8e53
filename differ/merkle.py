"""Merkle trees of blake3 digests over a :class:`~differ.source.BlockSource`.

Definition (version 1), fixed so that both sites compute the same root:

* **leaf** ``i`` = ``blake3(bytes of leaf i)``, 32 bytes, plain unkeyed blake3 of the leaf's real
  bytes (a short last leaf is not padded). Plain so that a leaf digest is a *content* digest: the
  transfer protocol's content index and ``b3sum`` of a 4 KiB block agree with it.
* **interior node** = ``blake3(concatenation of its children's digests, key=NODE_KEY)``: level
  ``k+1`` groups level ``k`` by ``fanout`` (the last group may be short). The key separates nodes
  from leaves, so a 512-byte leaf can never pass for a node (second-preimage hygiene).
* the **top** is the single node of the last level (the leaf itself for a one-leaf image, 32 zero
  bytes for an empty image);
* the **root** = ``blake3(top || le64 size || le64 leaf_count || le32 leaf_size || le32 fanout,
  key=ROOT_KEY)``: images of different sizes or tree shapes never share a root.

Levels are numpy ``(n, 32) uint8`` arrays, ``levels[0]`` the leaves and ``levels[-1]`` the top.
A tree file stores only the leaves (zstd, so runs of zero-page digests cost nothing) behind a header
with the shape and the root; loading rebuilds the interior levels (~1/fanout of the leaf count) and
checks the root, which doubles as the file's integrity check.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import blake3
import numpy as np
import numpy.typing as npt
import zstandard

from differ import leafhash
from differ.bounded import decompress_exact
from differ.source import LEAF_SIZE, BlockSource, KnownArrays, KnownLeafArrays
from replay_migrate.errors import ImageError
from replay_migrate.files import atomic_write, locked
from replay_migrate.safeopen import open_regular

log = logging.getLogger("replay_migrate.merkle")

DIGEST_SIZE = 32
DEFAULT_FANOUT = 16
"""16 children per node: 5 levels over a 1 GiB image. Lower fan-outs send fewer walk bytes per
differing leaf (d·fanout·depth) but need more levels; see ``bench/bench_differ.py``."""
MIN_FANOUT = 2
MAX_FANOUT = 256
MAX_LEAVES = 1 << 32
"""Largest leaf count a tree accepts (16 TiB at 4 KiB): leaf indices travel as 32-bit integers."""

NODE_KEY = blake3.blake3(b"node", derive_key_context="replay-migrate merkle v1").digest()
ROOT_KEY = blake3.blake3(b"root", derive_key_context="replay-migrate merkle v1").digest()
ABSENT_DIGEST = blake3.blake3(b"absent", derive_key_context="replay-migrate merkle v1").digest()
"""Stand-in for a leaf whose digest is unknown (see :meth:`MerkleTree.resized`). It is a keyed
output, so no content is known to hash to it: a comparison against it always says "differs"."""
EMPTY_TOP = bytes(DIGEST_SIZE)

READ_LEAVES = 256
"""Leaves per ``BlockSource.read`` call when building (1 MiB): few calls, bounded memory."""
MAX_WORKERS = 64
"""Most hashing threads :meth:`MerkleTree.build` accepts."""
IN_FLIGHT_PER_THREAD = 2
"""Reads queued per hashing thread: one being hashed, one waiting, while the caller reads on."""

FILE_MAGIC = b"RMMERKLE"
FILE_VERSION = 1
_FILE_HEADER = struct.Struct("<8sHHIQQ32sH")
MAX_STAMP = 1024
"""Largest caller stamp (see :func:`load_or_build`) a tree file may carry."""
MAX_LOAD_LEAVES = 1 << 28
"""Most leaves :meth:`MerkleTree.load` accepts unless told otherwise (1 TiB at 4 KiB; 8 GiB of
digests): a file cannot make a reader allocate more than it allows."""

_ROOT_META = struct.Struct("<QQII")

UInt8Array = npt.NDArray[np.uint8]


@functools.lru_cache(maxsize=64)
def zero_digest(length: int = LEAF_SIZE) -> bytes:
    """The digest of a zero leaf of ``length`` bytes (holes and zero pages)."""
    return blake3.blake3(bytes(length)).digest()


def leaf_digest(data: bytes | memoryview) -> bytes:
    """The digest of one leaf's bytes."""
    return blake3.blake3(data).digest()


def leaf_count_for(size: int, leaf_size: int = LEAF_SIZE) -> int:
    """Number of leaves of an image of ``size`` bytes (the last one may be short)."""
    return -(-size // leaf_size)


def leaf_length(size: int, index: int, leaf_size: int = LEAF_SIZE) -> int:
    """Length in bytes of leaf ``index`` of an image of ``size`` bytes."""
    return max(0, min(leaf_size, size - index * leaf_size))


def rows_equal(digests: npt.NDArray[np.uint8], digest: bytes) -> npt.NDArray[np.bool_]:
    """Which rows of ``digests`` (``(n, 32) uint8``) are ``digest``, compared as four 64-bit words:
    a byte-wise compare and an ``all`` over 32 columns costs several times more (~35 ms for the
    1.5 GiB disk's 383 k leaves, once per opened overlay, against ~3 ms)."""
    d = digests if digests.flags.c_contiguous else np.ascontiguousarray(digests)
    w = d.view("<u8")
    want = np.frombuffer(digest, dtype="<u8")
    out: npt.NDArray[np.bool_] = w[:, 0] == want[0]
    for k in range(1, len(want)):
        out &= w[:, k] == want[k]
    return out


def node_digest(children: bytes | memoryview) -> bytes:
    """An interior node over the concatenated digests of its children."""
    return blake3.blake3(children, key=NODE_KEY).digest()


def root_digest(top: bytes, size: int, leaf_count: int, fanout: int, leaf_size: int = LEAF_SIZE) -> bytes:
    """The root: the top node bound to the image's size and the tree's shape."""
    return blake3.blake3(top + _ROOT_META.pack(size, leaf_count, leaf_size, fanout), key=ROOT_KEY).digest()


def known_arrays(source: BlockSource) -> KnownArrays:
    """What ``source`` knows without reading, as arrays (see :class:`differ.source.KnownLeafArrays`),
    checked: indices increasing, inside the image, zero and given leaves disjoint."""
    n = source.leaf_count
    if isinstance(source, KnownLeafArrays):
        zi, gi, digests = source.known_leaf_arrays()
        zi, gi = np.asarray(zi, dtype=np.int64), np.asarray(gi, dtype=np.int64)
        if digests.shape != (len(gi), DIGEST_SIZE) or digests.dtype != np.uint8:
            raise ImageError("source gave known digests that are not 32 bytes each")
    else:
        zeros: list[int] = []
        given: list[int] = []
        given_digests: list[bytes] = []
        for index, digest in source.known_leaves():
            if digest is None:
                zeros.append(index)
            elif len(digest) != DIGEST_SIZE:
                raise ImageError("source gave a known digest that is not 32 bytes")
            else:
                given.append(index)
                given_digests.append(digest)
        zi, gi = np.asarray(zeros, dtype=np.int64), np.asarray(given, dtype=np.int64)
        digests = np.frombuffer(b"".join(given_digests), dtype=np.uint8).reshape(-1, DIGEST_SIZE)
    bad = any((np.diff(a) <= 0).any() or (len(a) and (a[0] < 0 or a[-1] >= n)) for a in (zi, gi))
    if not bad and len(zi) and len(gi):
        zero = np.zeros(n, dtype=bool)
        zero[zi] = True
        bad = bool(zero[gi].any())
    if bad:
        raise ImageError(f"source's known leaves are not increasing within 0..{n - 1}")
    return zi, gi, digests


class MerkleTree:
    """An immutable Merkle tree: the leaf digests plus every interior level and the root."""

    __slots__ = ("_levels", "_root", "fanout", "leaf_count", "leaf_size", "size")

    def __init__(
        self, leaves: UInt8Array, size: int, fanout: int = DEFAULT_FANOUT, leaf_size: int = LEAF_SIZE, *,
        native: bool | None = None,
    ) -> None:
        """Build the interior levels over ``leaves`` (an ``(n, 32) uint8`` array, not copied);
        ``native``: the hashing backend (see :func:`differ.leafhash.hash_nodes`)."""
        if not MIN_FANOUT <= fanout <= MAX_FANOUT:
            raise ValueError(f"fanout {fanout} outside {MIN_FANOUT}..{MAX_FANOUT}")
        if leaf_size != LEAF_SIZE:
            raise ValueError(f"leaf size {leaf_size} is not {LEAF_SIZE}")
        if size < 0:
            raise ValueError("negative size")
        n = leaf_count_for(size, leaf_size)
        if leaves.dtype != np.uint8 or leaves.shape != (n, DIGEST_SIZE):
            raise ValueError(f"leaves must be a ({n}, {DIGEST_SIZE}) uint8 array, got {leaves.shape}")
        if n > MAX_LEAVES:
            raise ValueError(f"{n} leaves exceed {MAX_LEAVES}")
        self.size = size
        self.leaf_count = n
        self.fanout = fanout
        self.leaf_size = leaf_size
        levels = [leaves]
        while len(levels[-1]) > 1:
            levels.append(leafhash.hash_nodes(levels[-1], fanout, NODE_KEY, native=native))
        self._levels: tuple[UInt8Array, ...] = tuple(levels)
        self._root = root_digest(self.top, size, n, fanout, leaf_size)

    # -- shape and digests ---------------------------------------------------------------------

    @property
    def levels(self) -> tuple[UInt8Array, ...]:
        """``levels[0]`` = leaves, ``levels[-1]`` = the top (one node; no node for an empty image)."""
        return self._levels

    @property
    def leaves(self) -> UInt8Array:
        return self._levels[0]

    @property
    def depth(self) -> int:
        """Index of the top level: 0 for images of at most one leaf."""
        return len(self._levels) - 1

    @property
    def top(self) -> bytes:
        return self._levels[-1].tobytes() if self.leaf_count else EMPTY_TOP

    @property
    def root(self) -> bytes:
        return self._root

    def leaf(self, index: int) -> bytes:
        return self._levels[0][index : index + 1].tobytes()

    def leaf_length(self, index: int) -> int:
        return leaf_length(self.size, index, self.leaf_size)

    def zero_mask(self) -> npt.NDArray[np.bool_]:
        """Which leaves are zero leaves (by digest)."""
        n = self.leaf_count
        mask = np.zeros(n, dtype=bool)
        if n:
            mask[:] = rows_equal(self.leaves, zero_digest(self.leaf_size))
            last = np.frombuffer(zero_digest(self.leaf_length(n - 1)), dtype=np.uint8)
            mask[n - 1] = bool((self.leaves[n - 1] == last).all())
        return mask

    def __repr__(self) -> str:
        return (
            f"MerkleTree(size={self.size}, leaves={self.leaf_count}, fanout={self.fanout}, "
            f"root={self.root.hex()[:16]}…)"
        )

    # -- derived trees -----------------------------------------------------------------------

    def replace_leaves(self, indices: npt.NDArray[np.int64], digests: UInt8Array) -> MerkleTree:
        """A tree with leaves ``indices`` set to ``digests``: only their ancestors are hashed again
        (the target's verify of a few thousand written leaves, not the whole interior)."""
        leaves = self.leaves.copy()
        leaves[indices] = digests
        return self._rehashed(leaves, np.asarray(indices, dtype=np.int64), self.size)

    def _rehashed(self, leaves: UInt8Array, changed: npt.NDArray[np.int64], size: int) -> MerkleTree:
        """A tree of this one's leaf count and fanout over ``leaves``, which differ from this tree's
        at most at ``changed``: the interior nodes above no changed leaf are this tree's, the others
        hashed again, one native call per level (the same digests a full build gives)."""
        n, f = self.leaf_count, self.fanout
        if leaves.shape != (n, DIGEST_SIZE) or leaf_count_for(size, self.leaf_size) != n:
            raise ValueError("a rehashed tree keeps its leaf count")
        levels = [leaves]
        idx = np.unique(changed)
        if len(idx) and (idx[0] < 0 or idx[-1] >= n):
            raise IndexError("changed leaf outside the tree")
        for old in self._levels[1:]:
            below = levels[-1]
            idx = np.unique(idx // f)
            level = old.copy()
            full = idx[(idx + 1) * f <= len(below)]           # parents with a whole group of children
            if len(full):
                groups = below[: len(below) // f * f].reshape(-1, f * DIGEST_SIZE)[full]
                level[full] = leafhash.hash_nodes(groups.reshape(-1, DIGEST_SIZE), f, NODE_KEY)
            if len(full) < len(idx):                          # the last parent, of a short group
                last = int(idx[-1])
                level[last] = leafhash.hash_nodes(below[last * f :], f, NODE_KEY)[0]
            levels.append(level)
        return MerkleTree._of_levels(tuple(levels), size, f, self.leaf_size)

    def root_with(self, indices: npt.NDArray[np.int64], digests: UInt8Array) -> bytes:
        """The root this tree would have with leaves ``indices`` set to ``digests`` (as
        :meth:`replace_leaves`, whose tree has this root), without building that tree: only the
        changed nodes' groups are gathered and hashed, no level is copied. The target checks a
        patched image's root with it inside the downtime; the tree itself is built when asked for."""
        n, f = self.leaf_count, self.fanout
        idx = np.asarray(indices, dtype=np.int64)
        vals = np.asarray(digests, dtype=np.uint8).reshape(-1, DIGEST_SIZE)
        if len(idx) != len(vals):
            raise ValueError("as many digests as indices")
        if len(idx) == 0:
            return self.root
        if idx.min() < 0 or idx.max() >= n:
            raise IndexError("changed leaf outside the tree")
        order = np.argsort(idx, kind="stable")
        idx, vals = idx[order], vals[order]
        last = np.ones(len(idx), dtype=bool)                  # the last digest given for a leaf wins
        last[:-1] = idx[1:] != idx[:-1]
        idx, vals = idx[last], vals[last]
        for below in self._levels[:-1]:
            parents = np.unique(idx // f)
            groups = np.zeros((len(parents), f, DIGEST_SIZE), dtype=np.uint8)
            for k in range(f):                                # each parent's old children, column k
                child = parents * f + k
                ok = child < len(below)
                groups[ok, k] = below[child[ok]]
            groups[np.searchsorted(parents, idx // f), idx % f] = vals
            new = np.empty((len(parents), DIGEST_SIZE), dtype=np.uint8)
            short = (parents + 1) * f > len(below)            # the last parent's group may be short
            whole = np.flatnonzero(~short)
            if len(whole):
                new[whole] = leafhash.hash_nodes(groups[whole].reshape(-1, DIGEST_SIZE), f, NODE_KEY)
            for j in np.flatnonzero(short).tolist():
                width = len(below) - int(parents[j]) * f
                new[j] = leafhash.hash_nodes(groups[j, :width], f, NODE_KEY)[0]
            idx, vals = parents, new
        top = vals[0].tobytes() if len(idx) else self.top
        return root_digest(top, self.size, n, f, self.leaf_size)

    @classmethod
    def _of_levels(cls, levels: tuple[UInt8Array, ...], size: int, fanout: int, leaf_size: int) -> MerkleTree:
        """A tree over levels already hashed (:meth:`_rehashed`)."""
        tree = cls.__new__(cls)
        tree.size, tree.leaf_count, tree.fanout, tree.leaf_size = size, len(levels[0]), fanout, leaf_size
        tree._levels = levels
        tree._root = root_digest(tree.top, size, tree.leaf_count, fanout, leaf_size)
        return tree

    def resized(self, size: int, fanout: int | None = None) -> MerkleTree:
        """This image's tree as it will be after ``set_size(size)``, in a tree of ``fanout``.

        Leaves past the old end become zero leaves (a sink extends with zeros). A leaf whose length
        changes (the old or the new last leaf) gets :data:`ABSENT_DIGEST`: its new digest is not known
        without reading, and the transfer protocol must treat it as different anyway.
        """
        fanout = self.fanout if fanout is None else fanout
        if size == self.size and fanout == self.fanout:
            return self
        n_old, n_new = self.leaf_count, leaf_count_for(size, self.leaf_size)
        leaves = np.empty((n_new, DIGEST_SIZE), dtype=np.uint8)
        keep = min(n_old, n_new)
        leaves[:keep] = self.leaves[:keep]
        for i in {n_old - 1, n_new - 1}:
            if 0 <= i < keep and leaf_length(self.size, i) != leaf_length(size, i):
                leaves[i] = np.frombuffer(ABSENT_DIGEST, dtype=np.uint8)
        if n_new > n_old:
            leaves[n_old:] = np.frombuffer(zero_digest(self.leaf_size), dtype=np.uint8)
            leaves[n_new - 1] = np.frombuffer(zero_digest(leaf_length(size, n_new - 1)), dtype=np.uint8)
        if n_new == n_old and fanout == self.fanout:
            # the common case of a saved memory image a few bytes longer or shorter: only the last
            # leaf changed, and only its ancestors are hashed again (both sides do this in the walk)
            return self._rehashed(leaves, np.arange(max(0, n_new - 1), n_new, dtype=np.int64), size)
        return MerkleTree(leaves, size, fanout, self.leaf_size)

    def differing_leaves(self, other: MerkleTree) -> npt.NDArray[np.int64]:
        """Indices of leaves that differ from ``other`` (local comparison; leaves past the shorter
        tree's end count as differing). For reports and tests: the network uses the protocol."""
        n = min(self.leaf_count, other.leaf_count)
        diff = np.flatnonzero((self.leaves[:n] != other.leaves[:n]).any(axis=1))
        extra = np.arange(n, max(self.leaf_count, other.leaf_count), dtype=np.int64)
        return np.concatenate([diff.astype(np.int64), extra])

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        source: BlockSource,
        fanout: int = DEFAULT_FANOUT,
        *,
        workers: int | None = None,
        read_leaves: int = READ_LEAVES,
        native: bool | None = None,
    ) -> MerkleTree:
        """Hash ``source``: known leaves (holes, zero pages, backing digests) are taken without
        reading; the rest is read ``read_leaves`` at a time and hashed a read per call
        (:mod:`differ.leafhash`).

        ``workers``: threads that hash while the calling thread reads; 0 (the default): read and
        hash in turn in the calling thread. The native hashing call releases the GIL, so threads
        do run in parallel, but reading is ~5x faster than hashing here and the hash keeps pace
        with one-call blake3 on one core, so on this 2-CPU host threads won nothing and lost to
        their hand-offs when the other core was busy (``bench/bench_differ.py`` measures both).
        The python backend's per-leaf calls fight over the GIL, so it always hashes in turn.
        All reads stay in the calling thread: a source need not be thread-safe.
        ``native``: the backend, for the leaves and the interior levels (None: the best there is;
        see :func:`differ.leafhash.hash_leaves_into`).
        """
        size, n = source.size, source.leaf_count
        if n != leaf_count_for(size):
            raise ImageError(f"source reports {n} leaves for {size} bytes")
        if not 1 <= read_leaves <= 1 << 16:
            raise ValueError("read_leaves outside 1..65536")
        leaves = np.empty((n, DIGEST_SIZE), dtype=np.uint8)
        zi, gi, digests = known_arrays(source)
        known = np.zeros(n, dtype=bool)
        if len(gi):
            leaves[gi] = digests
            known[gi] = True
        if len(zi):
            leaves[zi] = np.frombuffer(zero_digest(), dtype=np.uint8)
            if zi[-1] == n - 1:
                leaves[n - 1] = np.frombuffer(zero_digest(leaf_length(size, n - 1)), dtype=np.uint8)
            known[zi] = True
        runs = list(_runs(np.flatnonzero(~known), read_leaves))
        is_native = native is not False and leafhash.backend() == "native"
        workers = 0 if workers is None else workers
        if not 0 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers outside 0..{MAX_WORKERS}")
        if not is_native or workers == 0:
            for start, count in runs:
                leafhash.hash_leaves_into(_read_checked(source, start, count), leaves[start : start + count],
                                          native=native)
        else:
            _hash_overlapped(source, runs, leaves, workers, native)
        return cls(leaves, size, fanout, native=native)

    @classmethod
    def from_bytes(cls, data: bytes, fanout: int = DEFAULT_FANOUT) -> MerkleTree:
        """The tree of an in-memory image (tests, small images)."""
        leaves = np.empty((leaf_count_for(len(data)), DIGEST_SIZE), dtype=np.uint8)
        leafhash.hash_leaves_into(data, leaves)
        return cls(leaves, len(data), fanout)

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], stamp: bytes = b"") -> None:
        """Write the tree to ``path`` atomically, through a temporary file of its own (see
        ``replay_migrate.files``); ImageError if it cannot be written."""
        if len(stamp) > MAX_STAMP:
            raise ValueError(f"stamp longer than {MAX_STAMP} bytes")
        header = _FILE_HEADER.pack(
            FILE_MAGIC, FILE_VERSION, self.fanout, self.leaf_size, self.size, self.leaf_count, self.root, len(stamp)
        )
        body = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(self.leaves.tobytes())
        target = Path(path)
        try:
            atomic_write(target, header + stamp + body)
        except OSError as e:
            raise ImageError(f"tree file {target}: cannot write: {e.strerror}") from e

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, expect_size: int | None = None, max_leaves: int = MAX_LOAD_LEAVES
    ) -> tuple[MerkleTree, bytes]:
        """Read a tree file; returns the tree and the caller's stamp. Raises :class:`ImageError`
        when the file is malformed, of another version, describes another image than
        ``expect_size`` bytes (checked on its header, before the leaf data is read), has more than
        ``max_leaves`` leaves, or its leaves do not give its root. The leaf data is decompressed
        into exactly the header's leaf count (see :func:`differ.bounded.decompress_exact`)."""
        fd, _ = open_regular(path, "tree file", error=ImageError)
        try:
            with os.fdopen(fd, "rb", closefd=False) as f:
                head = f.read(_FILE_HEADER.size)
                if len(head) != _FILE_HEADER.size:
                    raise ImageError(f"tree file {path}: truncated header")
                magic, version, fanout, leaf_size, size, n, root, stamp_len = _FILE_HEADER.unpack(head)
                if magic != FILE_MAGIC:
                    raise ImageError(f"tree file {path}: not a Merkle tree file")
                if version != FILE_VERSION:
                    raise ImageError(f"tree file {path}: version {version}, this code reads {FILE_VERSION}")
                if (
                    not MIN_FANOUT <= fanout <= MAX_FANOUT
                    or leaf_size != LEAF_SIZE
                    or n != leaf_count_for(size, leaf_size)
                    or n > MAX_LEAVES
                    or stamp_len > MAX_STAMP
                ):
                    raise ImageError(f"tree file {path}: inconsistent header")
                if expect_size is not None and size != expect_size:
                    raise ImageError(f"tree file {path}: describes {size} bytes, the image has {expect_size}")
                if n > max_leaves:
                    raise ImageError(f"tree file {path}: {n} leaves exceed the limit of {max_leaves}")
                stamp = f.read(stamp_len)
                body = f.read(_compress_bound(n * DIGEST_SIZE) + 1)
        except OSError as e:
            raise ImageError(f"tree file {path}: {e.strerror}") from e
        finally:
            os.close(fd)
        if len(stamp) != stamp_len:
            raise ImageError(f"tree file {path}: truncated")
        raw = decompress_exact(body, n * DIGEST_SIZE, ImageError, f"tree file {path}: leaf data")
        leaves = np.frombuffer(raw, dtype=np.uint8).reshape(n, DIGEST_SIZE).copy()
        tree = cls(leaves, size, fanout, leaf_size)
        if tree.root != root:
            raise ImageError(f"tree file {path}: leaves do not match the stored root")
        return tree, stamp


def _compress_bound(n: int) -> int:
    """An upper bound of zstd's output for ``n`` bytes of input (``ZSTD_COMPRESSBOUND`` plus room
    for the frame header and checksum): a longer leaf-data section is not one this code wrote."""
    return n + (n >> 8) + (128 << 10 >> 11) + 64


def load_or_build(
    source: BlockSource,
    path: str | os.PathLike[str],
    stamp: bytes,
    fanout: int = DEFAULT_FANOUT,
    *,
    workers: int | None = None,
) -> MerkleTree:
    """The saved tree at ``path`` if its stamp, size and fan-out match, else build and save it.

    ``stamp`` is the caller's identity of the image's content (e.g. inode, size, mtime_ns of a file
    nobody writes in place), so an unchanged image is never rehashed. Callers racing for one path
    (both sides of a one-host migration, two processes) build it once: the check and the build
    happen under a file lock beside it (``.NAME.lock``), and a later caller loads what the first saved.
    """
    target = Path(path)
    lock = ExitStack()
    try:
        lock.enter_context(locked(target.with_name(f".{target.name}.lock")))
    except OSError as e:        # the folder is missing or not writable
        raise ImageError(f"tree file {target}: cannot lock: {e.strerror}") from e
    with lock:
        try:
            tree, saved = MerkleTree.load(target, expect_size=source.size,
                                          max_leaves=max(MAX_LOAD_LEAVES, source.leaf_count))
            if saved == stamp and tree.size == source.size and tree.fanout == fanout:
                return tree
        except ImageError:
            pass
        log.info("building the tree file %s (missing or stale)", target)
        tree = MerkleTree.build(source, fanout, workers=workers)
        tree.save(target, stamp)
        return tree


# -- building helpers ------------------------------------------------------------------------


def _runs(indices: npt.NDArray[np.intp], max_count: int) -> Iterator[tuple[int, int]]:
    """Split sorted leaf indices into ``(start, count)`` runs of consecutive leaves, each at most
    ``max_count`` long."""
    if len(indices) == 0:
        return
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(indices)]])
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        first, total = int(indices[s]), e - s
        for off in range(0, total, max_count):
            yield first + off, min(max_count, total - off)


def _read_checked(source: BlockSource, start: int, count: int) -> bytes:
    data = source.read(start, count)
    want = min((start + count) * LEAF_SIZE, source.size) - start * LEAF_SIZE
    if len(data) != want:
        raise ImageError(f"source returned {len(data)} bytes for leaves {start}..{start + count - 1}, expected {want}")
    return data


def _hash_overlapped(
    source: BlockSource, runs: list[tuple[int, int]], leaves: UInt8Array, threads: int, native: bool | None
) -> None:
    """The calling thread reads each run; ``threads`` threads hash what it read into ``leaves``
    (the native call releases the GIL, so hashing one read overlaps reading the next). At most
    ``IN_FLIGHT_PER_THREAD * threads`` reads are held at once."""
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="merkle-hash") as pool:
        pending: deque[Future[None]] = deque()
        try:
            for start, count in runs:
                data = _read_checked(source, start, count)
                while len(pending) >= IN_FLIGHT_PER_THREAD * threads:
                    pending.popleft().result()
                pending.append(pool.submit(leafhash.hash_leaves_into, data, leaves[start : start + count],
                                           native=native))
            while pending:
                pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


class ReplacedTree:
    """A tree with some leaves replaced, not built yet: its root (:meth:`MerkleTree.root_with`,
    from the changed paths) at once, the tree itself (:meth:`MerkleTree.replace_leaves`, a copy of
    every level) when :meth:`tree` is first called."""

    def __init__(self, tree: MerkleTree, leaves: npt.NDArray[np.int64], digests: UInt8Array) -> None:
        self._base, self._leaves, self._digests = tree, leaves, digests
        self.root = tree.root_with(leaves, digests)
        self._tree: MerkleTree | None = None if len(leaves) else tree

    def tree(self) -> MerkleTree:
        if self._tree is None:
            self._tree = self._base.replace_leaves(self._leaves, self._digests)
            if self._tree.root != self.root:
                raise AssertionError("the replaced tree's root is not the root computed from its paths")
        return self._tree
