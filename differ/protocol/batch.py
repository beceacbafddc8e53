"""The target's side of a blocks message: its layout checked against the plan (what each answer
may be, how many bytes the body must hold) before the body is decompressed, then every leaf
rebuilt and checked against the source's digest before anything is written.

Nothing here is allowed to trust the batch: a body is decompressed only as a zstd frame that
declares exactly the bytes its entries need (:func:`differ.bounded.decompress_exact`), a batch
may not need more than ``max_message_bytes``, and content the target proposed itself (a
reference, its base's leaf) is hashed too: a stale tree would show here. Each content is hashed
once: a leaf several positions refer to once a batch, a duplicate not again (its original was
verified on arrival, with the digest the duplicate takes).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass

import blake3
import numpy as np
import numpy.typing as npt

from differ.bounded import decompress_exact
from differ.merkle import leaf_length, zero_digest
from differ.protocol.endpoint import read_leaves
from differ.protocol.events import Holding, Of, Request, Result
from differ.protocol.framing import Message
from differ.protocol.index import Location
from differ.protocol.leaves import fit, has_base_leaf, n_sub, xor
from differ.protocol.messages import CONFIRMED, HOW, SENT, Ans, How, Req, binary, get_kinds, integer, unpack_bits
from differ.protocol.params import ProtocolParams
from differ.protocol.want import ImageState, Plan, own_blocks
from replay_migrate.errors import ProtocolError, VerificationError


@dataclass(frozen=True)
class Entry:
    kind: Ans
    length: int
    bits: npt.NDArray[np.bool_] | None
    """The delta's sub-block bitmap."""
    other: int = -1
    """XSIM: the base leaf the payload is XORed with."""


@dataclass(frozen=True)
class Layout:
    """A blocks message whose entries fit the plan and whose body holds exactly their bytes."""

    start: int
    entries: list[Entry]
    rests: bytes
    body: bytes


Ready = tuple[ImageState, int, bytes | None, How]
"""A verified leaf: (image, leaf, bytes or None for zeros, how it came)."""


def read_layout(msg: Message, plan: Plan, applied: int, images: Sequence[ImageState],
                params: ProtocolParams) -> Layout:
    """Pass 1: what the body must hold, the kinds allowed for each request; then the body."""
    total = plan.total
    o = integer(msg, "o", 0, total)
    if o != applied:
        raise ProtocolError("blocks message does not start where the previous one ended")
    kinds = get_kinds(msg, None, min(params.max_batch_entries, total - o), "blocks message")
    if not kinds:
        raise ProtocolError("empty blocks message")
    rests = binary(msg, "h")
    masks = binary(msg, "dm")
    xl = binary(msg, "xl", max_len=4 * len(kinds)) if "xl" in msg else b""
    if len(xl) % 4:
        raise ProtocolError("blocks message: similar-leaf numbers are not 4 bytes each")
    others = np.frombuffer(xl, dtype="<u4").astype(np.int64)
    x_off = 0
    sub = params.sub_block_size
    rest_len = params.check_bytes
    entries: list[Entry] = []
    raw_len = r_off = m_off = 0
    for j, kb in enumerate(kinds):
        pos = o + j
        if kb > max(Ans):
            raise ProtocolError("unknown answer kind")
        kind, req = Ans(kb), Req(int(plan.req[pos]))
        im = images[int(plan.img[pos])]
        leaf = int(plan.leaf[pos])
        length = im.own_length(leaf)
        if kind is Ans.OK and req not in (Req.REF, Req.ZERO, Req.DUP, Req.BASE):
            raise ProtocolError("confirmation of a leaf that was not proposed")
        if kind is Ans.DELTA and req is not Req.DELTA:
            raise ProtocolError("delta for a leaf without fingerprints")
        if kind is Ans.XBASE and not (im.base_view is not None and has_base_leaf(im.base, leaf, length)):
            raise ProtocolError("XOR against a base the target does not have")
        other = -1
        if kind is Ans.XSIM:
            if x_off >= len(others):
                raise ProtocolError("blocks message: an XOR against a similar leaf without its number")
            other = int(others[x_off])
            x_off += 1
            if not (im.base_view is not None and has_base_leaf(im.base, other, length)):
                raise ProtocolError("XOR against a base leaf the target does not have")
        bits = None
        if kind in SENT:
            r_off += rest_len
        if kind in (Ans.FULL, Ans.XBASE, Ans.XSIM):
            raw_len += length
        elif kind is Ans.DELTA:
            nsub = n_sub(length, sub)
            nb = (nsub + 7) // 8
            bits = unpack_bits(masks[m_off : m_off + nb], nsub, "delta") if m_off + nb <= len(masks) else None
            if bits is None or not bits.any():
                raise ProtocolError("malformed delta bitmap")
            m_off += nb
            for s in np.flatnonzero(bits).tolist():
                raw_len += min(sub, length - s * sub)
        entries.append(Entry(kind, length, bits, other))
    if r_off != len(rests) or m_off != len(masks) or x_off != len(others):
        raise ProtocolError("blocks message: digest, bitmap or similar-leaf bytes do not match its entries")
    if raw_len > params.max_message_bytes:
        # the source cuts a batch at max_message_bytes of payload (one leaf always fits)
        raise ProtocolError("blocks message: its entries need more bytes than a batch may hold")
    if "z" in msg:
        if not raw_len:
            raise ProtocolError("blocks message: compressed body for entries without bytes")
        body = decompress_exact(binary(msg, "z"), raw_len, ProtocolError, "blocks message body")
    else:
        body = binary(msg, "r")
    if len(body) != raw_len:
        raise ProtocolError("blocks message: body length does not match its entries")
    return Layout(o, entries, rests, body)


def _held(layout: Layout, plan: Plan, images: Sequence[ImageState], kept: dict[int, bytes]) -> Generator[
        Request, Result, tuple[dict[int, dict[int, bytes]], dict[int, dict[int, bytes]], dict[int, dict[int, bytes]],
                               dict[int, bytes]]]:
    """The target's own bytes the batch needs: its blocks under deltas, its base's leaves at the
    same places and the other base leaves XSIM answers name (each by image), and the referenced
    content (by position; taken from ``kept`` where it was read before an earlier batch overwrote
    it)."""
    wanted: dict[int, list[int]] = {}  # image → leaves whose delta needs the target's block
    from_base: dict[int, list[int]] = {}  # image → leaves taken from or XORed against its base
    similar: dict[int, set[int]] = {}  # image → other base leaves XORed against (XSIM)
    refs: dict[Holding, dict[int, list[int]]] = {}  # holding → leaf → positions referring to it
    for j, entry in enumerate(layout.entries):
        pos = layout.start + j
        gi, leaf = int(plan.img[pos]), int(plan.leaf[pos])
        if entry.kind is Ans.DELTA:
            wanted.setdefault(gi, []).append(leaf)
        elif entry.kind is Ans.XBASE or (entry.kind is Ans.OK and plan.req[pos] == Req.BASE):
            from_base.setdefault(gi, []).append(leaf)
        elif entry.kind is Ans.XSIM:
            similar.setdefault(gi, set()).add(entry.other)
        elif entry.kind is Ans.OK and plan.req[pos] == Req.REF and pos not in kept:
            assert plan.index is not None
            loc = plan.ref[pos]
            refs.setdefault(plan.index.holding(loc), {}).setdefault(loc[1], []).append(pos)
    own = {}
    for gi, leaves in wanted.items():
        own[gi] = yield from own_blocks(images[gi], leaves)
    base = {}
    for gi, leaves in from_base.items():
        im = images[gi]
        assert im.base is not None and im.shape is not None
        size = min(im.shape.size, im.base.size)
        blocks = yield from read_leaves(Holding(Of.BASE, im.name), leaves)
        base[gi] = {leaf: fit(b, leaf_length(size, leaf)) for leaf, b in zip(leaves, blocks, strict=True)}
    others: dict[int, dict[int, bytes]] = {}
    for gi, wanted_others in similar.items():
        im = images[gi]
        assert im.base is not None
        leaves = sorted(wanted_others)
        blocks = yield from read_leaves(Holding(Of.BASE, im.name), leaves)
        # full base leaves (read_layout checked each one's length): fit only guards the adapter
        others[gi] = {leaf: fit(b, im.base.leaf_length(leaf)) for leaf, b in zip(leaves, blocks, strict=True)}
    referenced: dict[int, bytes] = {}
    for j in range(len(layout.entries)):
        if layout.start + j in kept:
            referenced[layout.start + j] = kept.pop(layout.start + j)
    for holding, by_leaf in refs.items():
        leaves = sorted(by_leaf)
        blocks = yield from read_leaves(holding, leaves)
        for leaf, b in zip(leaves, blocks, strict=True):
            for pos in by_leaf[leaf]:
                referenced[pos] = b
    return own, base, others, referenced


def apply_batch(layout: Layout, plan: Plan, images: Sequence[ImageState], params: ProtocolParams,
                kept: dict[int, bytes] | None = None) -> Generator[Request, Result, list[Ready]]:
    """Pass 2: rebuild every leaf of the batch and verify it against the source's digest (the
    walk's prefix plus its check bytes); nothing is returned for writing unless all verified.
    ``kept``: referenced content by position, read before an earlier batch overwrote it (taken
    out of it as it is used)."""
    own, base, others, referenced = yield from _held(layout, plan, images, kept if kept is not None else {})
    t, sub, rest_len = params.digest_bytes, params.sub_block_size, params.check_bytes
    rests, body = layout.rests, layout.body
    ready: list[Ready] = []
    b_off = r_off = 0
    hashed: dict[Location, bytes] = {}  # a held leaf checked here → its bytes (several may refer to one)
    for j, entry in enumerate(layout.entries):
        kind, length = entry.kind, entry.length
        pos = layout.start + j
        im = images[int(plan.img[pos])]
        leaf = int(plan.leaf[pos])
        req = Req(int(plan.req[pos]))
        prefix = plan.prefix[pos].tobytes()
        data: bytes | None
        check_held = kind is Ans.OK
        if kind is Ans.OK and req is Req.REF:
            assert plan.index is not None
            loc = plan.ref[pos]
            digest = plan.index.digest(loc)
            data = referenced[pos]
            # several positions may refer to one leaf the target holds: its bytes are hashed once
            check_held = hashed.get(loc) != data
            hashed[loc] = data
        elif kind is Ans.OK and req is Req.DUP:
            ref = plan.dup[pos]
            digest = plan.full[ref].tobytes()
            data = plan.dup_cache.get(ref)
            if data is None:
                raise ProtocolError("duplicate of a leaf not received")
            if len(data) != length:
                raise ProtocolError("duplicate of a leaf of another length")
            check_held = False  # what the cache holds was verified against this digest on arrival
        elif kind is Ans.OK and req is Req.BASE:
            assert im.base_view is not None
            digest = im.base_view.leaf(leaf)
            data = fit(base[im.gi][leaf], length)
        elif kind in (Ans.OK, Ans.ZERO):
            digest, data = zero_digest(length), None
            if prefix != digest[:t]:
                raise VerificationError(f"image {im.name!r}: leaf {leaf} announced as zero does not match the walk")
        else:
            check = prefix + rests[r_off : r_off + rest_len]
            r_off += rest_len
            if kind is Ans.FULL:
                data = body[b_off : b_off + length]
                b_off += length
            elif kind is Ans.XBASE:
                data = xor(body[b_off : b_off + length], base[im.gi][leaf])
                b_off += length
            elif kind is Ans.XSIM:
                data = xor(body[b_off : b_off + length], others[im.gi][entry.other])
                b_off += length
            else:
                assert entry.bits is not None
                block = bytearray(own[im.gi][leaf])
                for s in np.flatnonzero(entry.bits).tolist():
                    piece = min(sub, length - s * sub)
                    block[s * sub : s * sub + piece] = body[b_off : b_off + piece]
                    b_off += piece
                data = bytes(block)
            digest = blake3.blake3(data).digest()
            if digest[: len(check)] != check:
                raise VerificationError(f"image {im.name!r}: leaf {leaf} does not match the source's digest")
        if check_held and data is not None and blake3.blake3(data).digest() != digest:
            # content the target proposed from what it holds: a stale tree would show here
            raise VerificationError(f"image {im.name!r}: leaf {leaf} does not match the source's digest")
        plan.full[pos] = np.frombuffer(digest, dtype=np.uint8)
        if pos in plan.dup_targets:
            plan.dup_cache[pos] = data if data is not None else bytes(length)
        ready.append((im, leaf, data, CONFIRMED[req] if kind is Ans.OK else HOW[kind]))
    return ready
