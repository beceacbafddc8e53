"""The receiving side (holds images B): says hello, walks, decides per differing leaf how to get
it (:mod:`differ.protocol.want`), rebuilds and verifies every block of every batch before it asks
for it to be written (:mod:`differ.protocol.batch`), and at the end asks for each patched image's
root and commits only when all equal the source's.

It holds trees only. What it reads (its own blocks for fingerprints and deltas, its base's, the
content it references), writes, hashes and commits it asks its adapter for, one request at a time.

Verifying a patched image either rehashes all of it (a :class:`HashImage` request) or, with
``verify_written``, reads back each batch's leaves right after asking for them to be written
(:attr:`Of.PATCHED`) and compares them byte for byte with what it wrote, then recomputes the root
from its tree with the written leaves' digests replaced (the digests it computed when it verified
each block on arrival; the leaves it did not write are the ones whose digests it already holds):
the same 32-byte root check, at the cost of reading the written leaves instead of hashing the whole
image, and no page hashed twice (issue 13: hash once inside the downtime). A write that did not
land, or landed elsewhere, reads back as other bytes and fails the check.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from differ.merkle import DIGEST_SIZE, MerkleTree, ReplacedTree, leaf_count_for, leaf_length
from differ.protocol._state import TARGET, Call, TargetState
from differ.protocol.batch import Ready, apply_batch, read_layout
from differ.protocol.endpoint import Endpoint, Handler, HandlerFn, ImageSpec, check_images, read_leaves
from differ.protocol.events import (
    Abort,
    BatchApplied,
    Commit,
    Hashed,
    HashImage,
    Holding,
    LeafWrite,
    Of,
    Request,
    Result,
    Verified,
    WalkDone,
    WriteLeaves,
)
from differ.protocol.framing import Message
from differ.protocol.messages import ENTRY_BYTES, MsgType, Shape, array, integer, mapping
from differ.protocol.params import KEY_SIZE, READ_RUN, ProtocolParams
from differ.protocol.stats import ImageStats
from differ.protocol.walk import Walk, first_level, walk_bytes
from differ.protocol.want import ImageState, Plan, decide
from differ.source import LEAF_SIZE
from replay_migrate.errors import ProtocolError, VerificationError


class VerifiedTrees(Mapping[str, MerkleTree]):
    """The verified trees by image name, each built on first access (see :class:`~differ.merkle.ReplacedTree`)."""

    def __init__(self, trees: Mapping[str, MerkleTree | ReplacedTree]) -> None:
        self._trees = dict(trees)

    def __getitem__(self, name: str) -> MerkleTree:
        t = self._trees[name]
        return t.tree() if isinstance(t, ReplacedTree) else t

    def __iter__(self) -> Iterator[str]:
        return iter(self._trees)

    def __len__(self) -> int:
        return len(self._trees)


class Target(Endpoint[TargetState]):
    """The receiving side. Call :meth:`start`, then drive it (see :mod:`differ.protocol.endpoint`).

    ``references``: other content the target holds (the checkpoint's memory image), by name, used
    for references. ``dry_run``: walk, receive and verify every block, but ask for nothing to be
    written; the final check then recomputes the roots from the target's trees with the verified
    leaf digests substituted. ``key``: the fingerprint key (random by default; tests pass one to be
    deterministic). ``verify_untouched``: also rehash images the transfer did not change before
    committing, which catches a stale target tree (one that no longer describes the image) at the
    cost of reading the image; False trusts the tree for those. ``verify_written``: verify a
    patched image by reading back the leaves written and recomputing its root from the tree (see
    the module's docstring) instead of rehashing all of it; an image the source's size grew also
    has the leaves past its old end that were not written read back as zeros. ``max_sizes``: per
    image name, the largest size to accept from the source, for a caller that knows it (a local
    sync holds both sides); the others follow ``ProtocolParams.size_limit``.
    """

    side = "target"

    def __init__(
        self,
        images: Sequence[ImageSpec],
        params: ProtocolParams | None = None,
        *,
        references: Mapping[str, MerkleTree] | None = None,
        dry_run: bool = False,
        key: bytes | None = None,
        verify_untouched: bool = True,
        verify_written: bool = False,
        max_sizes: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(params, TARGET, TargetState.IDLE, TargetState.FAILED)
        check_images(images, self.params)
        given = dict(max_sizes or {})
        if not set(given) <= {im.name for im in images} or any(
            not 0 <= v <= self.params.max_leaves * LEAF_SIZE for v in given.values()
        ):
            raise ValueError("max_sizes must name target images, each within max_leaves")
        self._limits = {
            im.name: given.get(im.name, self.params.size_limit(max(im.tree.size, im.base.size if im.base else 0)))
            for im in images
        }
        self._images = [ImageState(im) for im in images]
        self._by_gi: list[ImageState] = []
        self._references = dict(references or {})
        self.dry_run = dry_run
        self.verify_untouched = verify_untouched
        self.verify_written = verify_written
        self._key = key if key is not None else os.urandom(KEY_SIZE)
        if len(self._key) != KEY_SIZE:
            raise ValueError("key must be 32 bytes")
        self._t = self.params.digest_bytes
        self.stats.dry_run = dry_run
        self._plan = Plan.empty(self._t)
        self._next_batch = 0
        self._applied = 0
        self._own_refs: dict[tuple[str, int], list[int]] = {}
        self._kept: dict[int, bytes] = {}
        """Referenced content of own leaves that an earlier batch overwrote, by position."""

    @property
    def roots(self) -> dict[str, bytes]:
        """The source's roots by image name (once VERIFIED: the roots of the committed images)."""
        return {im.name: im.shape.root for im in self._by_gi if im.shape is not None}

    @property
    def verified_trees(self) -> Mapping[str, MerkleTree]:
        """The committed images' trees by name, once VERIFIED (those the adapter answered with, or
        this side's view of an untouched image): the source's trees, leaf for leaf. A tree the
        target verified from its written leaves is built on first access (~10-40 ms per image:
        its leaves copied), so a caller that needs it only after the VM resumed pays it then."""
        if self.state is not TargetState.VERIFIED:
            return {}
        return VerifiedTrees({im.name: im.verified_tree for im in self._by_gi if im.verified_tree is not None})

    @property
    def progress(self) -> tuple[int, int]:
        """(leaves applied, leaves requested)."""
        return self._applied, self._plan.total

    def start(self) -> None:
        """Queue the hello message."""
        to = self._call(Call.START)
        p = self.params
        shapes = [Shape.of(im.name, im.tree).encode() for im in self._images]
        base_roots = [im.base.root if im.base is not None and p.base else None for im in self._images]
        self.stats.root_bytes += DIGEST_SIZE * (len(shapes) + sum(r is not None for r in base_roots))
        self.stats.round_trips += 1
        self.state = TargetState.HELLO_SENT
        self._send(
            MsgType.HELLO,
            {"db": p.digest_bytes, "sb": p.sub_block_size, "fb": p.fingerprint_bytes, "cb": p.check_bytes,
             "rb": p.ref_rest, "key": self._key, "img": shapes, "br": base_roots},
        )
        self._check_to(Call.START.value, to)

    def resume(self) -> None:
        """After a reconnect: ask the source to re-emit from the next batch not yet applied."""
        to = self._call(Call.RESUME)
        self._out.clear()
        self._send(MsgType.RESUME, {"n": self._next_batch})
        self._check_to(Call.RESUME.value, to)

    def _handlers(self) -> dict[MsgType, HandlerFn]:
        return {MsgType.TREE: self._on_tree, MsgType.WALK: self._on_walk, MsgType.BLOCKS: self._on_blocks,
                MsgType.END: self._on_end}

    def _abort_request(self) -> Abort | None:
        return None if self.dry_run else Abort(tuple(im.name for im in self._images))

    def _expected_bytes(self, mtype: MsgType) -> int:
        """Largest tree or walk: one level of the source's trees, of the sizes accepted (before the
        tree message, the largest this target accepts)."""
        if mtype not in (MsgType.TREE, MsgType.WALK):
            return 0
        leaves = sum(
            im.shape.leaves if im.shape is not None else leaf_count_for(self._limits[im.name]) for im in self._images
        )
        entries = len(self._images) * (ENTRY_BYTES + 4 * self.params.max_name_len)
        return entries + walk_bytes(leaves, self._t, len(self._images))

    # -- the walk --------------------------------------------------------------------------------

    def _on_tree(self, msg: Message) -> Handler:
        p = self.params
        shapes = [Shape.decode(v, p) for v in array(msg, "img", len(self._images))]
        mine = {im.name: im for im in self._images}
        if {s.name for s in shapes} != set(mine) or len({s.name for s in shapes}) != len(shapes):
            raise ProtocolError("the source's images are not the target's images")
        for shape in shapes:  # before anything is allocated for any of them
            if shape.size > self._limits[shape.name]:
                raise ProtocolError(
                    f"image {shape.name!r}: the source announces {shape.size} bytes, larger than the "
                    f"{self._limits[shape.name]} this target accepts"
                )
        base_mode = array(msg, "bm", len(shapes))
        for gi, shape in enumerate(shapes):
            im = mine[shape.name]
            im.gi, im.shape = gi, shape
            im.view = im.tree.resized(shape.size, shape.fanout)
            if base_mode[gi] is True:
                if im.base is None or not self.params.base:
                    raise ProtocolError(f"image {im.name!r}: base-relative walk without a base offered")
                im.base_view = im.base.resized(shape.size, shape.fanout)
            elif base_mode[gi] is not False:
                raise ProtocolError("message field 'bm' is not a list of booleans")
            im.walk = Walk(im.view, self._t, im.base_view)
            im.walk.active = False  # until the first part arrives
            self.stats.images[im.name] = ImageStats(leaves=shape.leaves, resized=shape.size != im.tree.size)
            self.stats.flat_hash_bytes += DIGEST_SIZE * shape.leaves
        self._by_gi = sorted(self._images, key=lambda im: im.gi)
        parts = array(msg, "p", len(shapes))
        for im, part in zip(self._by_gi, parts, strict=True):
            assert im.walk is not None and im.shape is not None
            if part is not None:
                if im.shape.leaves == 0:
                    raise ProtocolError(f"walk of {im.name!r}: walk part for an empty image")
                im.walk.active = True
        self.state = TargetState.WALKING
        return (yield from self._walk(parts, first=True))

    def _on_walk(self, msg: Message) -> Handler:
        return (yield from self._walk(array(msg, "p", len(self._by_gi))))

    def _walk(self, parts: list[Any], first: bool = False) -> Handler:
        replies: list[dict[str, Any] | None] = []
        for im, part in zip(self._by_gi, parts, strict=True):
            walk = im.walk
            assert walk is not None
            if part is None:
                walk.active = False
                replies.append(None)
                continue
            what = f"walk of {im.name!r}"
            part = mapping(part, what)
            if not walk.active:
                raise ProtocolError(f"{what}: part for a finished walk")
            level = integer(part, "l", 0, len(walk.sizes) - 1)
            if level % 2:
                raise ProtocolError(f"{what}: the source sent an odd level")
            if first:
                if level != first_level(len(walk.sizes) - 1):
                    raise ProtocolError(f"{what}: first part at level {level}")
                nodes = np.arange(walk.sizes[level], dtype=np.int64)
            else:
                nodes = walk.nodes_for(part, level, what)
            diff, theirs, same = walk.compare(level, nodes, part, what)
            if level == 0:
                walk.active = False
                im.want_mask = diff
                im.diff_leaves = nodes[diff]
                im.prefixes = theirs[diff]
                im.from_base = same[diff]
                replies.append(None)
            else:
                replies.append(walk.reply(level, nodes, diff, self.stats))
        if any(r is not None for r in replies):
            self.stats.round_trips += 1
            self._send(MsgType.WALK, {"p": replies})
            return []
        want, self._plan = yield from decide(self._by_gi, self._images, self._references, self.params, self._key,
                                             self.dry_run, self.stats)
        self._own_refs = self._references_to_own_leaves()
        self.stats.round_trips += 1
        self.state = TargetState.RECEIVING
        self._send(MsgType.WANT, {"p": want})
        divergent = {im.name: len(im.diff_leaves) for im in self._by_gi}
        return [WalkDone(divergent)]

    # -- blocks ----------------------------------------------------------------------------------

    def _on_blocks(self, msg: Message) -> Handler:
        n = integer(msg, "n", 0, 1 << 32)
        if n < self._next_batch:
            self.stats.duplicate_batches += 1
            self._send(MsgType.ACK, {"n": n})
            return []
        if n > self._next_batch:
            raise ProtocolError(f"blocks message {n} while expecting {self._next_batch}")
        layout = read_layout(msg, self._plan, self._applied, self._by_gi, self.params)
        ready = yield from apply_batch(layout, self._plan, self._by_gi, self.params, self._kept)
        if ready and not self.dry_run:  # every leaf of the batch verified: only now written
            yield from self._keep_overwritten(ready, layout.start + len(layout.entries))
            yield WriteLeaves(tuple(LeafWrite(im.name, leaf, data) for im, leaf, data, _ in ready))
            if self.verify_written:
                yield from self._check_written(ready)
        for im, _, _, how in ready:
            counts = self.stats.images[im.name]
            setattr(counts, how.value, getattr(counts, how.value) + 1)
        self._applied += len(layout.entries)
        self._next_batch += 1
        self.stats.batches += 1
        self._send(MsgType.ACK, {"n": n})
        return [BatchApplied(n, self._applied, self._plan.total)]

    def _references_to_own_leaves(self) -> dict[tuple[str, int], list[int]]:
        """(image, leaf) of this side's own images that references of the plan point at → the
        positions that refer to it."""
        out: dict[tuple[str, int], list[int]] = {}
        index = self._plan.index
        if index is not None:
            for pos, loc in sorted(self._plan.ref.items()):
                holding = index.holding(loc)
                if holding.of is Of.IMAGE:
                    out.setdefault((holding.name, loc[1]), []).append(pos)
        return out

    def _keep_overwritten(self, ready: Sequence[Ready], end: int) -> Generator[Request, Result, None]:
        """Before a batch is written: read the leaves it overwrites that a reference of a later
        batch (position ``end`` on) points at, and keep them for it. So the core never reads a
        leaf of its own image after asking for it to be written, and an adapter may patch the
        image in place (``differ.patch``)."""
        wanted: dict[str, list[int]] = {}
        for im, leaf, _, _ in ready:
            if any(pos >= end for pos in self._own_refs.get((im.name, leaf), ())):
                wanted.setdefault(im.name, []).append(leaf)
        for name, leaves in wanted.items():
            leaves.sort()
            blocks = yield from read_leaves(Holding(Of.IMAGE, name), leaves)
            for leaf, block in zip(leaves, blocks, strict=True):
                for pos in self._own_refs[(name, leaf)]:
                    if pos >= end:
                        self._kept[pos] = block

    def _on_end(self, msg: Message) -> Handler:
        n = integer(msg, "n", 0, 1 << 32)
        if n != self._next_batch or self._applied != self._plan.total:
            raise ProtocolError("end before every requested leaf arrived")
        self._kept.clear()  # kept for references the source answered with blocks instead
        for im in self._by_gi:
            assert im.shape is not None and im.view is not None
            sel = self._plan.img == im.gi
            tree: MerkleTree | ReplacedTree | None
            if self.dry_run or (self.verify_written and (sel.any() or im.shape.size != im.tree.size)):
                # verify_written: every written leaf read back as written (_check_written): its
                # digest is the one verified on arrival, and hashing it again would hash the page
                # twice. The root is computed from the changed paths only; the tree is built when
                # asked for (verified_trees), not inside the downtime
                if not self.dry_run and im.shape.size > im.tree.size:
                    yield from self._check_zero_tail(im, self._plan.leaf[sel])
                tree = ReplacedTree(im.view, self._plan.leaf[sel], self._plan.full[sel])
                root = tree.root
            elif im.touched or self.verify_untouched:
                hashed = yield HashImage(im.name, im.shape.fanout)
                assert isinstance(hashed, Hashed)
                root, tree = hashed.root, hashed.tree
            else:
                root, tree = im.view.root, im.view
            im.verified_tree = tree
            if root != im.shape.root:
                raise VerificationError(f"image {im.name!r}: the patched image's root differs from the source's")
        if not self.dry_run:
            yield Commit(tuple(im.name for im in self._by_gi))
        self.state = TargetState.VERIFIED
        self.stats.verified = True
        self._send(MsgType.VERIFIED, {})
        return [Verified()]

    def _check_written(self, ready: Sequence[Ready]) -> Generator[Request, Result, None]:
        """Read back the leaves of a batch just written, ``READ_RUN`` at a time, and compare them
        byte for byte with what was written (zeros for a zeroed leaf)."""
        by_image: dict[str, tuple[ImageState, dict[int, bytes | None]]] = {}
        for im, leaf, data, _ in ready:
            by_image.setdefault(im.name, (im, {}))[1][leaf] = data
        for name, (im, wrote) in by_image.items():
            assert im.shape is not None
            order = sorted(wrote)
            for k in range(0, len(order), READ_RUN):
                part = order[k : k + READ_RUN]
                blocks = yield from read_leaves(Holding(Of.PATCHED, name), part)
                for leaf, block in zip(part, blocks, strict=True):
                    data = wrote[leaf]
                    if block != (data if data is not None else bytes(leaf_length(im.shape.size, leaf))):
                        raise VerificationError(f"image {name!r}: leaf {leaf} reads back other bytes than were "
                                                "written")

    def _check_zero_tail(self, im: ImageState, written: npt.NDArray[np.int64]) -> Generator[Request, Result, None]:
        """An image the source's size grew: its tree holds zero digests for the leaves past its old
        end (``MerkleTree.resized``); read back those no batch wrote and check they are zeros (the
        sink extended the image with zeros), so the recomputed root describes the image. A leaf
        whose length changed has no digest in the tree: the walk asked for it, and it was written."""
        assert im.shape is not None
        old_end = leaf_count_for(im.tree.size)
        tail = np.setdiff1d(np.arange(old_end, im.shape.leaves, dtype=np.int64), written).tolist()
        for k in range(0, len(tail), READ_RUN):
            part = tail[k : k + READ_RUN]
            blocks = yield from read_leaves(Holding(Of.PATCHED, im.name), part)
            for leaf, block in zip(part, blocks, strict=True):
                if block != bytes(leaf_length(im.shape.size, leaf)):
                    raise VerificationError(f"image {im.name!r}: leaf {leaf} past the old end is not zeros")
