"""The sending side (holds images A): answers the target's hello with its trees' shapes and first
walk parts, walks, then answers the target's requests in numbered batches, up to ``window`` ahead
of the acks. The leaves it sends it asks its adapter for (:class:`~differ.protocol.events.ReadLeaves`,
``READ_RUN`` leaves ahead), so it holds trees only; a batch is the same bytes however the reads
were cut.

Each leaf it sends travels as whatever compresses smallest: whole, XOR the base's leaf at the same
place (``XBASE``), the sub-blocks the target's fingerprints say differ (``DELTA``), or XOR the
base leaf most like it elsewhere (``XSIM``: candidates from the base's similarity index, read with
the leaves, tried only for leaves that cost more than ``similar_min_bytes`` otherwise)."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

import numpy as np
import zstandard

from differ.merkle import DIGEST_SIZE, zero_digest
from differ.protocol._state import SOURCE, Call, SourceState
from differ.protocol.endpoint import Endpoint, Handler, HandlerFn, ImageSpec, check_images, read_leaves
from differ.protocol.events import BatchAcked, Event, Holding, Of, Request, Result, Verified, WalkDone
from differ.protocol.framing import Message
from differ.protocol.leaves import fingerprints, n_sub, xor
from differ.protocol.messages import (
    ENTRY_BYTES,
    MESSAGE_SLACK,
    Ans,
    MsgType,
    Req,
    Shape,
    array,
    binary,
    get_kinds,
    integer,
    mapping,
    pack_bits,
    put_kinds,
    unpack_bits,
)
from differ.protocol.params import (
    BATCH_SLACK,
    KEY_SIZE,
    MAX_DIGEST_BYTES,
    MAX_FINGERPRINT_BYTES,
    MAX_SUB_BLOCK,
    MIN_DIGEST_BYTES,
    MIN_FINGERPRINT_BYTES,
    MIN_SUB_BLOCK,
    READ_RUN,
    ProtocolParams,
)
from differ.protocol.stats import ImageStats
from differ.protocol.walk import Walk, walk_bytes
from differ.similar import sketch
from differ.source import LEAF_SIZE
from replay_migrate.errors import LocalProtocolError, ProtocolError

Answer = tuple[Ans, bytes, bytes, bytes, bytes]
"""(kind, rest of digest, delta bitmap, XSIM base leaf as 4 bytes, payload) of one requested leaf."""


class _SrcImg:
    def __init__(self, gi: int, spec: ImageSpec) -> None:
        self.gi = gi
        self.name = spec.name
        self.tree = spec.tree
        self.base = spec.base
        self.similar = spec.similar
        self.walk: Walk | None = None


class Source(Endpoint[SourceState]):
    """The sending side. ``measure_plain``: also zstd every divergent leaf alone, for reports."""

    side = "source"

    def __init__(
        self,
        images: Sequence[ImageSpec],
        params: ProtocolParams | None = None,
        *,
        measure_plain: bool = False,
    ) -> None:
        super().__init__(params, SOURCE, SourceState.IDLE, SourceState.FAILED)
        check_images(images, self.params)
        self._images = [_SrcImg(i, spec) for i, spec in enumerate(images)]
        self._measure_plain = measure_plain
        self._cctx = zstandard.ZstdCompressor(
            level=self.params.zstd_level, write_checksum=False, write_content_size=True, write_dict_id=False
        )
        self._bctx = zstandard.ZstdCompressor(
            level=self.params.batch_zstd_level, write_checksum=False, write_content_size=True, write_dict_id=False
        )
        for im in self._images:
            self.stats.images[im.name] = ImageStats(leaves=im.tree.leaf_count)
            self.stats.flat_hash_bytes += DIGEST_SIZE * im.tree.leaf_count
        # negotiated in hello
        self._t = self.params.digest_bytes
        self._sub = self.params.sub_block_size
        self._fb = self.params.fingerprint_bytes
        self._cb = self.params.check_bytes
        self._rb = self.params.ref_check_bytes
        self._key = b""
        # the plan (one entry per requested leaf, images in order, leaves ascending)
        self._p_img = np.zeros(0, dtype=np.int64)
        self._p_leaf = np.zeros(0, dtype=np.int64)
        self._p_req = np.zeros(0, dtype=np.uint8)
        self._p_aux = np.zeros(0, dtype=np.int64)
        self._p_decided = np.zeros(0, dtype=np.int8)
        self._p_xor = np.zeros(0, dtype=bool)
        self._cands = b""
        self._fps = b""
        self._starts: list[int] = [0]
        self._next_batch = 0
        self._acked = -1
        self._carry: tuple[int, Answer] | None = None
        self._plain_done = 0
        self._data: dict[int, bytes] = {}
        """Leaves read ahead for the next batches, by plan position (at most ``READ_RUN``)."""
        self._base_data: dict[int, bytes] = {}
        self._sim_data: dict[int, list[tuple[int, bytes]]] = {}
        """Per plan position read ahead: (base leaf, its bytes) of the similar leaves to try."""
        self._pre: dict[int, tuple[Ans, bytes, int]] = {}
        """Per plan position read ahead: the best of whole and XBASE so far (kind, payload, zstd
        length), computed once where similar leaves were looked for."""

    def resume(self, next_batch: int) -> None:
        """Re-emit batches from ``next_batch`` (the target's next expected batch), e.g. after the
        transport reconnected; same as receiving the target's resume message."""
        to = self._call(Call.RESUME)
        if not 0 <= next_batch <= self._next_batch:
            raise LocalProtocolError(f"source: resume() from batch {next_batch}, only {self._next_batch} were sent")
        self._run(str(Call.RESUME.value), self._resume(next_batch), to)

    def _handlers(self) -> dict[MsgType, HandlerFn]:
        return {MsgType.HELLO: self._on_hello, MsgType.WALK: self._on_walk, MsgType.WANT: self._on_want,
                MsgType.ACK: self._on_ack, MsgType.RESUME: self._on_resume, MsgType.VERIFIED: self._on_verified}

    def _expected_bytes(self, mtype: MsgType) -> int:
        """Largest hello (its image entries), walk (one level of my trees' nodes, digests and
        bitmaps) or want (per leaf of my images: kind, check bytes, duplicate position, fingerprints)."""
        p = self.params
        if mtype is MsgType.HELLO:
            return MESSAGE_SLACK + p.max_images * (ENTRY_BYTES + 4 * p.max_name_len)
        leaves = sum(im.tree.leaf_count for im in self._images)
        if mtype is MsgType.WALK:
            return walk_bytes(leaves, self._t, len(self._images))
        if mtype is MsgType.WANT:
            per_leaf = 2 + self._rb + 4 + -(-LEAF_SIZE // self._sub) * self._fb
            return MESSAGE_SLACK * (1 + len(self._images)) + leaves * per_leaf
        return 0

    # -- the walk ------------------------------------------------------------------------------

    def _on_hello(self, msg: Message) -> list[Event]:
        p = self.params
        self._t = integer(msg, "db", MIN_DIGEST_BYTES, MAX_DIGEST_BYTES)
        self._sub = integer(msg, "sb", MIN_SUB_BLOCK, MAX_SUB_BLOCK)
        if self._sub & (self._sub - 1):
            raise ProtocolError("sub-block size is not a power of two")
        self._fb = integer(msg, "fb", MIN_FINGERPRINT_BYTES, MAX_FINGERPRINT_BYTES)
        self._cb = integer(msg, "cb", 0, DIGEST_SIZE - self._t)
        self._rb = integer(msg, "rb", 0, DIGEST_SIZE - self._t)
        self._key = binary(msg, "key", KEY_SIZE)
        theirs = [Shape.decode(v, p) for v in array(msg, "img", max_len=p.max_images)]
        base_roots = array(msg, "br", len(theirs))
        by_name = {s.name: s for s in theirs}
        if len(by_name) != len(theirs) or set(by_name) != {im.name for im in self._images}:
            raise ProtocolError("the target's images are not the source's images")
        their_base: dict[str, bytes | None] = {}
        for shape, root in zip(theirs, base_roots, strict=True):
            if root is not None and not (isinstance(root, bytes) and len(root) == DIGEST_SIZE):
                raise ProtocolError(f"image {shape.name!r}: malformed base root")
            their_base[shape.name] = root
        shapes: list[dict[str, Any]] = []
        parts: list[dict[str, Any] | None] = []
        base_mode: list[bool] = []
        for im in self._images:
            shapes.append(Shape.of(im.name, im.tree).encode())
            self.stats.root_bytes += DIGEST_SIZE
            base = im.base if im.base is not None and im.base.root == their_base[im.name] else None
            view = base.resized(im.tree.size, im.tree.fanout) if base is not None else None
            base_mode.append(view is not None)
            walk = im.walk = Walk(im.tree, self._t, view)
            if by_name[im.name].root == im.tree.root or im.tree.leaf_count == 0:
                walk.active = False
                parts.append(None)
                continue
            parts.append(walk.start(self.stats))
        self.state = SourceState.WALKING
        self._send(MsgType.TREE, {"img": shapes, "bm": base_mode, "p": parts})
        return []

    def _on_walk(self, msg: Message) -> list[Event]:
        parts = array(msg, "p", len(self._images))
        replies: list[dict[str, Any] | None] = []
        for im, part in zip(self._images, parts, strict=True):
            walk = im.walk
            assert walk is not None
            if part is None:
                # nothing more from the target: no differences below what I sent, or (after I
                # sent the leaf level) its requests will come in the want message
                walk.active = walk.active and walk.sent_level == 0
                replies.append(None)
                continue
            what = f"walk of {im.name!r}"
            part = mapping(part, what)
            if not walk.active:
                raise ProtocolError(f"{what}: part for a finished walk")
            level = integer(part, "l", 1, len(walk.sizes) - 1)
            if level % 2 == 0:
                raise ProtocolError(f"{what}: the target sent an even level")
            nodes = walk.nodes_for(part, level, what)
            diff, _, _ = walk.compare(level, nodes, part, what)
            replies.append(walk.reply(level, nodes, diff, self.stats))
        self._send(MsgType.WALK, {"p": replies})
        return []

    def _on_want(self, msg: Message) -> Handler:
        parts = array(msg, "p", len(self._images))
        imgs, leaves, reqs, auxs = [], [], [], []
        cands, fps = [], []
        rest = self._rb
        pos = 0
        fp_off = 0
        cand_row = 0
        divergent: dict[str, int] = {}
        for im, part in zip(self._images, parts, strict=True):
            walk = im.walk
            assert walk is not None
            divergent[im.name] = 0
            if part is None:
                continue
            what = f"want of {im.name!r}"
            part = mapping(part, what)
            if not walk.active or walk.sent_level != 0:
                raise ProtocolError(f"{what}: the source did not send this image's leaf level")
            mask = unpack_bits(binary(part, "m"), len(walk.sent_nodes), what)
            lv = walk.sent_nodes[mask]
            if len(lv) == 0:
                raise ProtocolError(f"{what}: no differing leaf")
            kinds = np.frombuffer(get_kinds(part, len(lv), len(lv), what), dtype=np.uint8)
            if (kinds > max(Req)).any():
                raise ProtocolError(f"{what}: unknown request kind")
            if walk.base is None and (kinds == Req.BASE).any():
                raise ProtocolError(f"{what}: base request in a walk without base")
            n_ref = int((kinds == Req.REF).sum())
            n_dup = int((kinds == Req.DUP).sum())
            c = binary(part, "c", n_ref * rest)
            u = np.frombuffer(binary(part, "u", n_dup * 4), dtype="<u4").astype(np.int64)
            lengths = np.minimum(LEAF_SIZE, im.tree.size - lv * LEAF_SIZE)
            nsub = -(-lengths // self._sub)
            fp_need = int(nsub[kinds == Req.DELTA].sum()) * self._fb
            f = binary(part, "f", fp_need)
            aux = np.zeros(len(lv), dtype=np.int64)
            ref_i = np.flatnonzero(kinds == Req.REF)
            aux[ref_i] = cand_row + np.arange(len(ref_i))
            cand_row += len(ref_i)
            dup_i = np.flatnonzero(kinds == Req.DUP)
            aux[dup_i] = u
            delta_i = np.flatnonzero(kinds == Req.DELTA)
            fp_sizes = nsub[delta_i] * self._fb
            aux[delta_i] = fp_off + np.cumsum(fp_sizes) - fp_sizes  # where each leaf's fingerprints start
            fp_off += fp_need
            imgs.append(np.full(len(lv), im.gi, dtype=np.int64))
            leaves.append(lv)
            reqs.append(kinds)
            auxs.append(aux)
            cands.append(c)
            fps.append(f)
            divergent[im.name] = len(lv)
            self.stats.images[im.name].divergent = len(lv)
            pos += len(lv)
        if pos > self.params.max_leaves:
            raise ProtocolError("want for more leaves than the limit")
        for im in self._images:
            assert im.walk is not None
            im.walk.active = False
        self._p_img = np.concatenate(imgs) if imgs else np.zeros(0, dtype=np.int64)
        self._p_leaf = np.concatenate(leaves) if leaves else np.zeros(0, dtype=np.int64)
        self._p_req = np.concatenate(reqs) if reqs else np.zeros(0, dtype=np.uint8)
        self._p_aux = np.concatenate(auxs) if auxs else np.zeros(0, dtype=np.int64)
        self._cands = b"".join(cands)
        self._fps = b"".join(fps)
        # a duplicate must point back at an earlier leaf that is sent as a block
        dup = np.flatnonzero(self._p_req == Req.DUP)
        if len(dup):
            refd = self._p_aux[dup]
            if (refd >= dup).any() or not np.isin(self._p_req[refd], (Req.BLOCK, Req.DELTA)).all():
                raise ProtocolError("want: a duplicate does not refer to an earlier block request")
        self._decide_all()
        self.state = SourceState.SENDING
        events: list[Event] = [WalkDone(divergent)]
        yield from self._advance()
        return events

    # -- batches -------------------------------------------------------------------------------

    def _on_ack(self, msg: Message) -> Handler:
        n = integer(msg, "n", 0, max(0, self._next_batch - 1))
        if n >= self._next_batch:
            raise ProtocolError("ack of a batch not sent")
        self._acked = max(self._acked, n)
        events: list[Event] = [BatchAcked(n)]
        yield from self._advance()
        return events

    def _on_resume(self, msg: Message) -> Handler:
        return (yield from self._resume(integer(msg, "n", 0, 1 << 32)))

    def _on_verified(self, msg: Message) -> list[Event]:
        self.state = SourceState.VERIFIED
        self.stats.verified = True
        return [Verified()]

    def _resume(self, n: int) -> Handler:
        if not 0 <= n <= self._next_batch:
            raise ProtocolError("resume from a batch not sent")
        self._acked = n - 1
        self._next_batch = n
        self._carry = None
        self._data.clear()
        self._base_data.clear()
        self._sim_data.clear()
        self._pre.clear()
        self._out.clear()
        self.state = SourceState.SENDING
        yield from self._advance()
        return []

    def _advance(self) -> Generator[Request, Result, None]:
        """Emit batches up to ``window`` ahead of the acks, then the end message."""
        total = len(self._p_leaf)
        while self.state is SourceState.SENDING and self._next_batch <= self._acked + self.params.window:
            n = self._next_batch
            if n == len(self._starts) - 1 and self._starts[-1] >= total:
                self._send(MsgType.END, {"n": n})
                self.state = SourceState.SENT
                return
            body = yield from self._encode_batch(n)
            self._send(MsgType.BLOCKS, body)
            self._next_batch += 1

    def _encode_batch(self, n: int) -> Generator[Request, Result, dict[str, Any]]:
        start = self._starts[n]
        fixed_end = self._starts[n + 1] if n + 1 < len(self._starts) else None
        end_limit = fixed_end if fixed_end is not None else len(self._p_leaf)
        budget = self.params.max_message_bytes - BATCH_SLACK
        kinds = bytearray()
        rests: list[bytes] = []
        masks: list[bytes] = []
        xrefs: list[bytes] = []
        payload: list[bytes] = []
        used = 0
        pos = start
        while pos < end_limit:
            if fixed_end is None and pos - start >= self.params.max_batch_entries:
                break
            ans = yield from self._answer(pos)
            kind, rest, mask, xref, data = ans
            cost = 1 + len(rest) + len(mask) + len(xref) + len(data)
            if fixed_end is None and pos > start and used + cost > budget:
                self._carry = (pos, ans)
                break
            used += cost
            kinds.append(kind)
            rests.append(rest)
            masks.append(mask)
            xrefs.append(xref)
            payload.append(data)
            pos += 1
        if fixed_end is None:
            self._starts.append(pos)
        body = b"".join(payload)
        z = self._bctx.compress(body) if body else b""
        msg: dict[str, Any] = {"n": n, "o": start, "h": b"".join(rests), "dm": b"".join(masks)}
        kind_bytes = put_kinds(msg, bytes(kinds), self._cctx, count=True)
        xl = b"".join(xrefs)
        if xl:
            msg["xl"] = xl
        if len(z) < len(body):
            msg["z"] = z
        else:
            msg["r"] = body
        st = self.stats
        st.leaf_digest_bytes += len(msg["h"])
        st.block_bytes += len(msg.get("z", msg.get("r", b""))) + len(msg["dm"]) + len(xl)
        st.kind_bytes += kind_bytes
        st.batches += 1
        return msg

    def _answer(self, pos: int) -> Generator[Request, Result, Answer]:
        if self._carry is not None and self._carry[0] == pos:
            return self._carry[1]
        if pos not in self._data and self._needs_data(pos):
            yield from self._read_ahead(pos)
        return self._make_answer(pos)

    def _decide_all(self) -> None:
        """Per plan entry, once, from the digests alone: OK when the target's proposal holds (its
        reference's check bytes, the base's leaf, zeros, an earlier leaf), else ZERO for a zero
        leaf, else -1 (its bytes are needed); and whether an XOR against the base is worth trying."""
        n = len(self._p_leaf)
        t, cb = self._t, self._rb
        digests = np.empty((n, DIGEST_SIZE), dtype=np.uint8)
        lengths = np.empty(n, dtype=np.int64)
        ok = np.zeros(n, dtype=bool)
        self._p_xor = np.zeros(n, dtype=bool)
        for im in self._images:
            sel = np.flatnonzero(self._p_img == im.gi)
            lv = self._p_leaf[sel]
            digests[sel] = im.tree.leaves[lv]
            lengths[sel] = np.minimum(LEAF_SIZE, im.tree.size - lv * LEAF_SIZE)
            walk_base = im.walk.base if im.walk is not None else None
            if walk_base is not None:
                b = sel[self._p_req[sel] == Req.BASE]
                ok[b] = (digests[b] == walk_base.leaves[self._p_leaf[b]]).all(axis=1)
                if im.base is not None:
                    base_len = np.minimum(LEAF_SIZE, im.base.size - lv * LEAF_SIZE)
                    self._p_xor[sel] = (lv < im.base.leaf_count) & (base_len == lengths[sel])
        zero = (digests == np.frombuffer(zero_digest(), dtype=np.uint8)).all(axis=1)
        for i in np.flatnonzero(lengths != LEAF_SIZE).tolist():
            zero[i] = digests[i].tobytes() == zero_digest(int(lengths[i]))
        ref = np.flatnonzero(self._p_req == Req.REF)
        if len(ref):
            cands = np.frombuffer(self._cands, dtype=np.uint8).reshape(-1, cb) if cb else np.zeros((1, 0), np.uint8)
            ok[ref] = (digests[ref, t : t + cb] == cands[self._p_aux[ref] if cb else 0]).all(axis=1)
        z = self._p_req == Req.ZERO
        ok[z] = zero[z]
        dup = np.flatnonzero(self._p_req == Req.DUP)
        ok[dup] = (digests[dup] == digests[self._p_aux[dup]]).all(axis=1)
        self._p_decided = np.where(ok, int(Ans.OK), np.where(zero, int(Ans.ZERO), -1)).astype(np.int8)

    def _decide(self, pos: int) -> Ans | None:
        """The answer for plan entry ``pos`` when its digest decides it (OK, ZERO); else None: the
        leaf's bytes are needed."""
        v = int(self._p_decided[pos])
        return None if v < 0 else Ans(v)

    def _needs_data(self, pos: int) -> bool:
        return (self._measure_plain and pos >= self._plain_done) or self._decide(pos) is None

    def _read_ahead(self, pos: int) -> Generator[Request, Result, None]:
        """Read the leaves of the next plan entries of ``pos``'s image that need their bytes (and
        their base leaves, to try an XOR against): up to ``READ_RUN`` at once."""
        gi = int(self._p_img[pos])
        name = self._images[gi].name
        need: list[int] = []
        xbase: list[int] = []
        q, end = pos, min(len(self._p_leaf), pos + self.params.max_batch_entries)
        while q < end and int(self._p_img[q]) == gi and len(need) < READ_RUN:
            if q not in self._data and self._needs_data(q):
                need.append(q)
                if self._p_decided[q] < 0 and self._p_xor[q]:
                    xbase.append(q)
            q += 1
        blocks = yield from read_leaves(Holding(Of.IMAGE, name), [int(self._p_leaf[k]) for k in need])
        self._data.update(zip(need, blocks, strict=True))
        if xbase:
            blocks = yield from read_leaves(Holding(Of.BASE, name), [int(self._p_leaf[k]) for k in xbase])
            self._base_data.update(zip(xbase, blocks, strict=True))
        yield from self._read_similar(gi, need)

    def _similar_usable(self, im: _SrcImg) -> bool:
        walk = im.walk
        return (self.params.similar and self.params.max_similar > 0 and im.similar is not None
                and im.base is not None and walk is not None and walk.base is not None)

    def _read_similar(self, gi: int, need: list[int]) -> Generator[Request, Result, None]:
        """For the leaves just read that still cost more than ``similar_min_bytes`` whole or XOR
        their own base leaf: the base leaves their sketches point at, read in one request."""
        im = self._images[gi]
        if not self._similar_usable(im):
            return
        assert im.similar is not None and im.base is not None
        tried: list[int] = []
        for pos in need:
            req = Req(int(self._p_req[pos]))
            data = self._data[pos]
            if self._p_decided[pos] >= 0 or req is Req.DELTA or len(data) != LEAF_SIZE:
                continue
            kind, payload = Ans.FULL, data
            size = len(self._cctx.compress(data))
            base_data = self._base_data.get(pos)
            if base_data is not None:
                x = xor(data, base_data)
                xs = len(self._cctx.compress(x))
                if xs < size:
                    kind, payload, size = Ans.XBASE, x, xs
            self._pre[pos] = (kind, payload, size)
            if size > self.params.similar_min_bytes:
                tried.append(pos)
        if not tried:
            return
        rows = np.frombuffer(b"".join(self._data[p] for p in tried), dtype=np.uint8).reshape(len(tried), LEAF_SIZE)
        found = im.similar.candidates(sketch(rows))
        wanted: dict[int, list[int]] = {}
        for pos, cands in zip(tried, found, strict=True):
            own = int(self._p_leaf[pos])
            ok = [c for c in cands if c != own and c < im.base.leaf_count and im.base.leaf_length(c) == LEAF_SIZE]
            if ok:
                wanted[pos] = ok[: self.params.max_similar]
        leaves = sorted({c for cs in wanted.values() for c in cs})
        if not leaves:
            return
        blocks = yield from read_leaves(Holding(Of.BASE, im.name), leaves)
        by_leaf = dict(zip(leaves, blocks, strict=True))
        for pos, cs in wanted.items():
            self._sim_data[pos] = [(c, by_leaf[c]) for c in cs]

    def _make_answer(self, pos: int) -> Answer:
        """(kind, rest of digest, delta bitmap, payload) for plan entry ``pos``, from its bytes."""
        im = self._images[int(self._p_img[pos])]
        leaf, req, aux = int(self._p_leaf[pos]), Req(int(self._p_req[pos])), int(self._p_aux[pos])
        data = self._data.pop(pos, None)
        base_data = self._base_data.pop(pos, None)
        pre = self._pre.pop(pos, None)
        similar = self._sim_data.pop(pos, [])
        if self._measure_plain and pos >= self._plain_done:
            assert data is not None
            self.stats.images[im.name].plain_bytes += len(self._cctx.compress(data))
            self._plain_done = pos + 1
        decided = self._decide(pos)
        if decided is not None:
            return decided, b"", b"", b"", b""
        digest = im.tree.leaf(leaf)
        length = im.tree.leaf_length(leaf)
        assert data is not None
        if len(data) != length:
            raise ProtocolError(f"image {im.name!r}: source gave {len(data)} bytes for leaf {leaf}")
        rest = digest[self._t : self._t + self._cb]
        if pre is not None:
            kind, payload, size = pre
            xref = b""
            for other, cand in similar:
                x = xor(data, cand)
                xs = len(self._cctx.compress(x)) + 4
                if xs < size:
                    kind, payload, size, xref = Ans.XSIM, x, xs, int(other).to_bytes(4, "little")
            return kind, rest, b"", xref, payload
        kind, mask, payload = Ans.FULL, b"", data
        if req is Req.DELTA:
            nsub = n_sub(length, self._sub)
            theirs = np.frombuffer(self._fps, dtype=np.uint8, count=nsub * self._fb, offset=aux)
            mine = np.frombuffer(fingerprints(data, self._sub, self._fb, self._key), dtype=np.uint8)
            diff = (mine.reshape(nsub, self._fb) != theirs.reshape(nsub, self._fb)).any(axis=1)
            k = int(diff.sum())
            if 0 < k < nsub:
                mv = memoryview(data)
                kind, mask = Ans.DELTA, pack_bits(diff)
                payload = b"".join(mv[j * self._sub : (j + 1) * self._sub] for j in np.flatnonzero(diff).tolist())
        if base_data is not None:
            x = xor(data, base_data)
            if len(self._cctx.compress(x)) < len(self._cctx.compress(payload)) + len(mask):
                kind, mask, payload = Ans.XBASE, b"", x
        return kind, rest, mask, b"", payload
