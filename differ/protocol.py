"""The tree-walk and block-transfer protocol, sans-I/O: bytes in, events and bytes out.

A :class:`Source` holds the trees and block sources of images A; a :class:`Target` holds those of
images B, the sinks that patch B, and a content index (every leaf of its own images and of the
reference trees it is given: the shared base or checkpoint). Both exchange msgpack messages
``{"t": type, "v": version, ...}``; each side has a state enum and refuses a message in the wrong
state (:class:`ProtocolError`, state FAILED, sinks aborted). The transport moves opaque messages
(:meth:`data_to_send` / :meth:`receive_data`); :func:`run_local` pumps them in memory.

Flow (T = target, S = source)::

    T→S hello   params (walk digest length, check bytes, delta sub-block, fingerprint length and
                key), and per image: name, size, leaves, fanout, root, and the root of its base
    S→T tree    per image the source's shape and root, whether the walk is base-relative; for
                images whose roots differ, the first walk part
    T⇄S walk    ping-pong: each part carries a bitmap of which of the *peer's* last digests differ
                and the sender's truncated digests of the children of those nodes
    T→S want    per image: which leaves differ and, per differing leaf, a request
    S→T blocks  numbered batches of answers, each at most ``max_message_bytes``
    T→S ack     per applied batch (flow control, resume point)
    S→T end     batch count;  T→S verified | failed

Improvements over "one level per round trip, digests one way, bitmaps back":

* **ping-pong walk**: the side that receives digests answers with the bitmap *and* the next level
  of its own digests, so every one-way message descends a level; round trips are halved (a 1 GiB
  image at fan-out 16: 4 round trips to the first block instead of 6). Parity is chosen per image
  so that the source sends the leaf level (the source always sends even levels, the target odd
  ones) and the target can answer it with its requests at once.
* **truncated walk digests** (``digest_bytes``, 8 by default): a node collision only makes the walk
  miss a difference, which the final root check (full 32-byte digests) turns into FAILED.
* **base-relative walk**: both sides started from the same checkpoint, so when both hold its trees
  (the *base*, same root) a node whose digest equals the base's travels as one bit. Replay makes
  both sides change mostly the same pages, so the walk still descends into them, but each level's
  untouched siblings cost a bit instead of ``digest_bytes``; a leaf the source holds at the base's
  content while the target changed it is taken from the target's copy of the base.
* **requests decided by the target**: for a differing leaf whose source digest prefix the target
  already holds (own images, references, base, or another leaf earlier in this transfer) it asks
  for a *confirmation* (with ``check_bytes`` more of its candidate's digest, none by default) and
  the source answers with one byte; zero leaves need no bytes at all. Otherwise it asks for the
  block, with keyed fingerprints of its own block's sub-blocks so the source can send only the
  sub-blocks that differ (a *delta*: DESIGN.md §5 found half of divergent pages differ in ≤ 8
  bytes).
* **verification**: the target hashes every block it rebuilds and checks it against the source's
  walk prefix (plus ``check_bytes``) before the sink sees it, then rebuilds each patched image's
  tree and compares the 32-byte root with the source's before anything is committed: a wrong block
  can never be committed, and full 32-byte digests per block (24 more bytes each) buy only an
  earlier error.

Sizes a peer announces are bounded by what this side expects before anything is allocated: the
target accepts an image size up to ``max_size_factor`` * its own image's (or base's) size +
``max_size_margin`` (never above ``max_leaves``), a fragmented message up to the largest message of
its kind this side's images allow, and a batch body only as a zstd frame that declares exactly the
bytes its entries need (:func:`differ.bounded.decompress_exact`). The source allocates only by its
own images. See :class:`ProtocolParams`.

Only the block phase is resumable (:meth:`Target.resume` → the source re-emits batches from the
target's next expected one; duplicates are ignored): the walk is a few small messages, restart it.
"""

from __future__ import annotations

import enum
import os
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import blake3
import msgpack
import numpy as np
import numpy.typing as npt
import zstandard

from differ.bounded import decompress_exact
from differ.merkle import (
    ABSENT_DIGEST,
    DIGEST_SIZE,
    MAX_FANOUT,
    MAX_LEAVES,
    MIN_FANOUT,
    MerkleTree,
    leaf_count_for,
    leaf_length,
    zero_digest,
)
from differ.source import LEAF_SIZE, BlockSink, BlockSource
from replay_migrate.errors import ProtocolError, ReplayMigrateError, VerificationError

PROTOCOL_VERSION = 2
"""2: base-relative walk, per-block check bytes (``cb``) instead of whole digests."""

# -- parameters ----------------------------------------------------------------------------------

MIN_DIGEST_BYTES, MAX_DIGEST_BYTES = 4, DIGEST_SIZE
MIN_SUB_BLOCK, MAX_SUB_BLOCK = 64, LEAF_SIZE
MIN_FINGERPRINT_BYTES, MAX_FINGERPRINT_BYTES = 2, 16
MIN_MESSAGE_BYTES = 64 << 10
"""A batch must hold at least one full block with its metadata."""
BATCH_SLACK = 1024
"""Bytes of a blocks message kept for its msgpack envelope."""
FRAGMENT_OVERHEAD = 128
"""Bytes of a fragment frame kept for its msgpack envelope."""
KEY_SIZE = 32
READ_RUN = 256
"""Most leaves the target reads from its own image in one call (for fingerprints and deltas)."""


@dataclass(frozen=True)
class ProtocolParams:
    """Every limit and tunable of the protocol, with its default.

    The target proposes ``digest_bytes``, ``sub_block_size``, ``fingerprint_bytes`` in its hello;
    the source accepts any value inside the hard bounds above. The limits bound what a side
    *accepts*, so a peer cannot make it allocate more than they allow.
    """

    digest_bytes: int = 8
    """Bytes of each node digest in the walk. 8: a false "equal" has probability 2^-64 per
    comparison, and the final 32-byte root check catches it (FAILED, never a wrong image)."""
    sub_block_size: int = 256
    """Delta granularity: the target fingerprints its block in pieces of this size (16 per leaf);
    the source sends the pieces whose fingerprints differ. Measured in ``bench/bench_differ.py``."""
    fingerprint_bytes: int = 4
    """Bytes of each keyed sub-block fingerprint. A false match rebuilds a wrong block, which fails
    its digest check and fails the transfer (nothing written): ~2^-32 per differing sub-block with
    4 bytes and the per-transfer random key; 2 bytes failed within 4000 pages in the bench."""
    delta: bool = True
    """Target: send fingerprints (ask for deltas) for leaves where it has a non-zero block."""
    delta_with_base: bool = False
    """Target: send fingerprints in a base-relative walk too. Off: there the source sends each
    block whole or XOR its base leaf, whichever compresses smaller; on kept states of a real
    migration fingerprints (64 bytes per leaf) cost more than the deltas saved over that."""
    check_bytes: int = 0
    """Bytes of a leaf's digest, beyond the walk's ``digest_bytes``, that travel with every block
    and reference candidate for an earlier, stronger per-block check. 0: each block is checked
    against its walk prefix (2^-64 per block to pass wrongly) and every image against its 32-byte
    root before anything is committed, which is what makes a transfer correct; the 24 bytes per
    block that full digests would add were 14 % of a real migration's wire bytes."""
    base: bool = True
    """Target: offer the base-relative walk for images that have a base (the common checkpoint):
    a node equal to the base's travels as one bit instead of ``digest_bytes``, and a leaf the
    source still holds at the base's content is taken from the target's copy of the base."""
    zstd_level: int = 3
    max_message_bytes: int = 1 << 20
    """Largest wire message; walk and want messages larger than this travel as fragments."""
    max_batch_entries: int = 4096
    """Most answers in one blocks message (answers for references are 1 byte each)."""
    window: int = 8
    """Blocks messages the source emits ahead of the target's acks."""
    max_logical_bytes: int = 256 << 20
    """Largest reassembled (fragmented) message."""
    max_images: int = 16
    max_name_len: int = 64
    max_leaves: int = 1 << 28
    """Most leaves per image (1 TiB), the hard limit above every size rule: positions travel as
    32-bit integers, so at most 2^32."""
    max_size_factor: int = 2
    """With ``max_size_margin``, the sizes the target accepts (DESIGN.md §6): an image size the
    source announces may be at most ``max_size_factor`` * the larger of the target's own image's
    size and its base's (the checkpoint), plus ``max_size_margin``, and never more than
    ``max_leaves`` leaves. The target allocates ~70 bytes per leaf of the announced size (its tree
    and its base's resized to it), so a peer can make it spend at most ~factor * what its own trees
    cost. Two sides of one migration hold images of one checkpoint (sizes within KiB: device state,
    XML); a sync onto a smaller or empty image names the sizes it expects (``Target(max_sizes=)``)."""
    max_size_margin: int = 64 << 20
    """Bytes an announced image size may exceed ``max_size_factor`` * the target's own by (an empty
    or tiny target image still accepts a 64 MiB one: 16384 leaves, ~1 MiB of tree)."""

    def __post_init__(self) -> None:
        checks = [
            (MIN_DIGEST_BYTES <= self.digest_bytes <= MAX_DIGEST_BYTES, "digest_bytes"),
            (
                MIN_SUB_BLOCK <= self.sub_block_size <= MAX_SUB_BLOCK
                and self.sub_block_size & (self.sub_block_size - 1) == 0,
                "sub_block_size",
            ),
            (MIN_FINGERPRINT_BYTES <= self.fingerprint_bytes <= MAX_FINGERPRINT_BYTES, "fingerprint_bytes"),
            (0 <= self.check_bytes <= DIGEST_SIZE - self.digest_bytes, "check_bytes"),
            (1 <= self.zstd_level <= 22, "zstd_level"),
            (MIN_MESSAGE_BYTES <= self.max_message_bytes <= 1 << 30, "max_message_bytes"),
            (1 <= self.max_batch_entries <= 1 << 20, "max_batch_entries"),
            (1 <= self.window <= 1 << 16, "window"),
            (self.max_message_bytes <= self.max_logical_bytes <= 1 << 34, "max_logical_bytes"),
            (1 <= self.max_images <= 256, "max_images"),
            (1 <= self.max_name_len <= 1024, "max_name_len"),
            (1 <= self.max_leaves <= MAX_LEAVES, "max_leaves"),
            (1 <= self.max_size_factor <= 1024, "max_size_factor"),
            (0 <= self.max_size_margin <= self.max_leaves * LEAF_SIZE, "max_size_margin"),
        ]
        for ok, name in checks:
            if not ok:
                raise ValueError(f"ProtocolParams.{name} out of range")

    def size_limit(self, own: int) -> int:
        """The largest image size accepted from the peer for an image whose own size (the larger of
        the image's and its base's) is ``own``: see ``max_size_factor``."""
        return min(self.max_leaves * LEAF_SIZE, own * self.max_size_factor + self.max_size_margin)


# -- messages --------------------------------------------------------------------------------


class MsgType(enum.StrEnum):
    HELLO = "hello"
    TREE = "tree"
    WALK = "walk"
    WANT = "want"
    BLOCKS = "blocks"
    END = "end"
    ACK = "ack"
    RESUME = "resume"
    VERIFIED = "verified"
    FAILED = "failed"
    FRAG = "frag"


_TYPES = frozenset(m.value for m in MsgType)
FRAGMENTABLE = frozenset({MsgType.HELLO, MsgType.TREE, MsgType.WALK, MsgType.WANT})


class FailCode(enum.IntEnum):
    """Why a side gave up; the only failure detail sent to the peer (never exception text)."""

    PROTOCOL = 1
    VERIFICATION = 2
    ABORTED = 3
    INTERNAL = 4


class Req(enum.IntEnum):
    """Target's request for one differing leaf."""

    BLOCK = 0
    """Send the block (the target has nothing similar at that place)."""
    DELTA = 1
    """Send the block; fingerprints of the target's block at that place are attached."""
    REF = 2
    """The target holds content with the source's digest prefix; confirm the rest (attached)."""
    ZERO = 3
    """The source's digest prefix is the zero leaf's; confirm."""
    DUP = 4
    """Same digest prefix as an earlier requested leaf of this transfer (position attached)."""
    BASE = 5
    """The source said its leaf equals the base's (base-relative walk): confirm."""


class Ans(enum.IntEnum):
    """Source's answer for one requested leaf."""

    OK = 0
    """Confirmed (REF, ZERO, DUP, BASE): the target applies what it proposed."""
    ZERO = 1
    """The leaf is all zeros."""
    FULL = 2
    """The whole leaf follows (rest of digest, bytes in the batch body)."""
    DELTA = 3
    """The sub-blocks whose fingerprints differ follow (rest of digest, bitmap, bytes)."""
    XBASE = 4
    """The leaf XOR the base's leaf follows (rest of digest, bytes): a page changed in a few places
    since the checkpoint compresses to almost nothing."""


class _How(enum.Enum):
    REFERENCED = "referenced"
    DUPLICATE = "duplicate"
    BASE = "base"
    ZERO = "zero"
    FULL = "full"
    DELTA = "delta"
    XBASE = "xbase"


_HOW = {Ans.ZERO: _How.ZERO, Ans.FULL: _How.FULL, Ans.DELTA: _How.DELTA, Ans.XBASE: _How.XBASE}
_SENT = (Ans.FULL, Ans.DELTA, Ans.XBASE)
"""Answers that carry block bytes (and the check bytes of the digest)."""
_CONFIRMED = {Req.REF: _How.REFERENCED, Req.DUP: _How.DUPLICATE, Req.ZERO: _How.ZERO, Req.BASE: _How.BASE}


class SourceState(enum.Enum):
    IDLE = "idle"
    """Waiting for the target's hello."""
    WALKING = "walking"
    SENDING = "sending"
    SENT = "sent"
    """All batches and the end message are out; waiting for acks, verified or resume."""
    VERIFIED = "verified"
    FAILED = "failed"


class TargetState(enum.Enum):
    IDLE = "idle"
    """Before :meth:`Target.start`."""
    HELLO_SENT = "hello_sent"
    WALKING = "walking"
    RECEIVING = "receiving"
    VERIFIED = "verified"
    FAILED = "failed"


# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WalkDone:
    """The walk is over: divergent leaves per image (target: found; source: requested)."""

    divergent: dict[str, int]


@dataclass(frozen=True)
class BatchApplied:
    batch: int
    done: int
    total: int


@dataclass(frozen=True)
class BatchAcked:
    batch: int


@dataclass(frozen=True)
class Verified:
    pass


@dataclass(frozen=True)
class PeerFailed:
    code: FailCode


Event = WalkDone | BatchApplied | BatchAcked | Verified | PeerFailed


# -- images and stats ----------------------------------------------------------------------------


@dataclass
class ReferenceImage:
    """Content a side holds besides its images (base image, checkpoint): a reference or a base."""

    source: BlockSource
    tree: MerkleTree


@dataclass
class SourceImage:
    """Image A. ``base``: the same image at the checkpoint both sides started from, for the
    base-relative walk (used when the target holds a base with the same root) and XOR answers."""

    name: str
    source: BlockSource
    tree: MerkleTree
    base: ReferenceImage | None = None


@dataclass
class TargetImage:
    """Image B: its original content (``source``, read for references and deltas, never written),
    its tree, and the sink that patches a copy (None only for a dry run). ``base``: the same image
    at the common checkpoint (read for leaves the source still holds at the base's content)."""

    name: str
    source: BlockSource
    tree: MerkleTree
    sink: BlockSink | None = None
    base: ReferenceImage | None = None


@dataclass
class ImageStats:
    leaves: int = 0
    divergent: int = 0
    referenced: int = 0
    duplicate: int = 0
    zero: int = 0
    base: int = 0
    """Leaves the source still held at the base's content, taken from the target's base."""
    full: int = 0
    delta: int = 0
    xbase: int = 0
    """Leaves sent as XOR against the base's leaf."""
    plain_bytes: int = 0
    """zstd of every divergent leaf on its own (what shipping the divergent blocks would cost);
    measured by the source when asked (``measure_plain``)."""
    resized: bool = False


@dataclass
class TransferStats:
    """What a transfer cost (DESIGN.md §9). A side counts what it *sends*; :meth:`merged` adds the
    two sides' counts (what :func:`run_local` returns)."""

    images: dict[str, ImageStats] = field(default_factory=dict)
    root_bytes: int = 0
    walk_digest_bytes: int = 0
    bitmap_bytes: int = 0
    leaf_digest_bytes: int = 0
    """Rests of leaf digests: with every block (source) and with every confirmation (target)."""
    fingerprint_bytes: int = 0
    block_bytes: int = 0
    """Block payload on the wire: compressed batch bodies plus delta sub-block bitmaps."""
    wire_bytes: dict[str, int] = field(default_factory=dict)
    messages: dict[str, int] = field(default_factory=dict)
    received_bytes: int = 0
    round_trips: int = 0
    """Messages the target sent and had to wait for an answer to (hello, walks, want)."""
    batches: int = 0
    duplicate_batches: int = 0
    flat_hash_bytes: int = 0
    """32 bytes per source leaf: the cost of sending every leaf digest instead of walking."""
    dry_run: bool = False
    verified: bool = False

    @property
    def hash_bytes(self) -> int:
        """Roots, walk digests, bitmaps and leaf digests (fingerprints are counted apart)."""
        return self.root_bytes + self.walk_digest_bytes + self.bitmap_bytes + self.leaf_digest_bytes

    @property
    def wire_total(self) -> int:
        return sum(self.wire_bytes.values())

    @property
    def plain_bytes(self) -> int:
        return sum(s.plain_bytes for s in self.images.values())

    def merged(self, other: TransferStats) -> TransferStats:
        out = TransferStats()
        for name in {*self.images, *other.images}:
            a, b = self.images.get(name, ImageStats()), other.images.get(name, ImageStats())
            out.images[name] = ImageStats(
                leaves=max(a.leaves, b.leaves),
                divergent=max(a.divergent, b.divergent),
                referenced=a.referenced + b.referenced,
                duplicate=a.duplicate + b.duplicate,
                zero=a.zero + b.zero,
                base=a.base + b.base,
                full=a.full + b.full,
                delta=a.delta + b.delta,
                xbase=a.xbase + b.xbase,
                plain_bytes=a.plain_bytes + b.plain_bytes,
                resized=a.resized or b.resized,
            )
        for name in (
            "root_bytes",
            "walk_digest_bytes",
            "bitmap_bytes",
            "leaf_digest_bytes",
            "fingerprint_bytes",
            "block_bytes",
            "received_bytes",
            "round_trips",
            "batches",
            "duplicate_batches",
        ):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        for key in {*self.wire_bytes, *other.wire_bytes}:
            out.wire_bytes[key] = self.wire_bytes.get(key, 0) + other.wire_bytes.get(key, 0)
        for key in {*self.messages, *other.messages}:
            out.messages[key] = self.messages.get(key, 0) + other.messages.get(key, 0)
        out.flat_hash_bytes = max(self.flat_hash_bytes, other.flat_hash_bytes)
        out.dry_run = self.dry_run or other.dry_run
        out.verified = self.verified or other.verified
        return out

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hash_bytes"] = self.hash_bytes
        d["wire_total"] = self.wire_total
        d["plain_bytes"] = self.plain_bytes
        return d


# -- helpers -------------------------------------------------------------------------------------


_MESSAGE_SLACK = 1024
"""Bytes of a message's envelope and per-image msgpack overhead, in the expected-size bounds."""
_ENTRY_BYTES = 128
"""Bytes of one image entry of a hello or tree besides its name (size, leaves, fanout, root)."""


def _walk_bytes(leaves: int, digest_bytes: int, images: int) -> int:
    """Largest walk part set over trees of ``leaves`` leaves in all: one level per image, at most
    the leaf level, each node with its digest and a bit in each of two bitmaps."""
    return _MESSAGE_SLACK * (1 + images) + leaves * (digest_bytes + 1)


def _children(parents: npt.NDArray[np.int64], fanout: int, child_level_size: int) -> npt.NDArray[np.int64]:
    kids = (parents[:, None] * fanout + np.arange(fanout, dtype=np.int64)).ravel()
    return kids[kids < child_level_size]


def _pack_bits(mask: npt.NDArray[np.bool_]) -> bytes:
    return np.packbits(mask, bitorder="little").tobytes()


def _unpack_bits(data: bytes, n: int, what: str) -> npt.NDArray[np.bool_]:
    if len(data) != (n + 7) // 8:
        raise ProtocolError(f"{what}: bitmap of {len(data)} bytes for {n} entries")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if bits[n:].any():
        raise ProtocolError(f"{what}: bitmap padding bits set")
    return bits[:n].astype(bool)


def _fingerprints(block: bytes | bytearray, sub: int, nbytes: int, key: bytes) -> bytes:
    mv = memoryview(block)
    hasher = blake3.blake3
    return b"".join([hasher(mv[j : j + sub], key=key).digest(nbytes) for j in range(0, len(mv), sub)])


def _xor(a: bytes, b: bytes) -> bytes:
    """``a`` XOR ``b`` (same length; ``b`` may be a longer read, cut to ``a``'s length)."""
    n = len(a)
    return (np.frombuffer(a, dtype=np.uint8) ^ np.frombuffer(b, dtype=np.uint8, count=n)).tobytes()


def _has_base_leaf(base: ReferenceImage | None, leaf: int, length: int) -> bool:
    """Whether ``base`` has a leaf at ``leaf`` of exactly ``length`` bytes (to XOR against)."""
    return base is not None and leaf < base.tree.leaf_count and base.tree.leaf_length(leaf) == length


def _read_leaves(source: BlockSource, leaves: list[int], size: int) -> dict[int, bytes]:
    """``source``'s blocks at ``leaves`` (sorted, inside it), each fitted to its length in an image
    of ``size`` bytes; consecutive leaves are read in one call (a qcow2 source may spawn qemu-img
    per call for backing data)."""
    out: dict[int, bytes] = {}
    k = 0
    while k < len(leaves):
        run = 1
        while k + run < len(leaves) and leaves[k + run] == leaves[k] + run and run < READ_RUN:
            run += 1
        data = source.read(leaves[k], run)
        for j in range(run):
            leaf = leaves[k + j]
            out[leaf] = _fit(data[j * LEAF_SIZE : (j + 1) * LEAF_SIZE], leaf_length(size, leaf))
        k += run
    return out


def _n_sub(length: int, sub: int) -> int:
    return -(-length // sub)


def _fit(data: bytes, length: int) -> bytes:
    """``data`` truncated or zero-padded to ``length`` (a leaf seen after ``set_size``)."""
    return data[:length] if len(data) >= length else data + bytes(length - len(data))


def _prefix_keys(digests: npt.NDArray[np.uint8], nbytes: int) -> npt.NDArray[np.uint64]:
    """Big-endian integer of the first ``nbytes`` (≤ 8) bytes of each digest: sortable lookup keys."""
    buf = np.zeros((len(digests), 8), dtype=np.uint8)
    buf[:, :nbytes] = digests[:, :nbytes]
    return buf.view(">u8").ravel().astype(np.uint64)


def _get(msg: dict[str, Any], key: str) -> Any:
    try:
        return msg[key]
    except KeyError:
        raise ProtocolError(f"message field {key!r} missing") from None


def _int(msg: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = _get(msg, key)
    if type(v) is not int or not lo <= v <= hi:
        raise ProtocolError(f"message field {key!r} is not an integer in {lo}..{hi}")
    return v


def _bin(msg: dict[str, Any], key: str, length: int | None = None, max_len: int | None = None) -> bytes:
    v = _get(msg, key)
    if not isinstance(v, bytes):
        raise ProtocolError(f"message field {key!r} is not bytes")
    if length is not None and len(v) != length:
        raise ProtocolError(f"message field {key!r} has {len(v)} bytes, expected {length}")
    if max_len is not None and len(v) > max_len:
        raise ProtocolError(f"message field {key!r} longer than {max_len} bytes")
    return v


def _str(msg: dict[str, Any], key: str, max_len: int) -> str:
    v = _get(msg, key)
    if not isinstance(v, str) or not 1 <= len(v) <= max_len:
        raise ProtocolError(f"message field {key!r} is not a string of 1..{max_len} characters")
    return v


def _list(msg: dict[str, Any], key: str, length: int | None = None, max_len: int | None = None) -> list[Any]:
    v = _get(msg, key)
    if not isinstance(v, list):
        raise ProtocolError(f"message field {key!r} is not a list")
    if (length is not None and len(v) != length) or (max_len is not None and len(v) > max_len):
        raise ProtocolError(f"message field {key!r} has {len(v)} entries")
    return v


def _map(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ProtocolError(f"{what} is not a map")
    return v


def _check_images(images: Sequence[SourceImage | TargetImage], params: ProtocolParams) -> None:
    names = [spec.name for spec in images]
    if not 1 <= len(images) <= params.max_images or len(set(names)) != len(names):
        raise ValueError("images must be 1..max_images with distinct names")
    for spec in images:
        if (spec.tree.size, spec.tree.leaf_count) != (spec.source.size, spec.source.leaf_count):
            raise ValueError(f"image {spec.name!r}: tree and source disagree on the size")
        if not 1 <= len(spec.name) <= params.max_name_len or spec.tree.leaf_count > params.max_leaves:
            raise ValueError(f"image {spec.name!r}: name or size outside the limits")


@dataclass
class _Shape:
    name: str
    size: int
    leaves: int
    fanout: int
    root: bytes

    def encode(self) -> dict[str, Any]:
        return {"n": self.name, "s": self.size, "l": self.leaves, "f": self.fanout, "r": self.root}

    @staticmethod
    def decode(v: Any, params: ProtocolParams) -> _Shape:
        m = _map(v, "image entry")
        name = _str(m, "n", params.max_name_len)
        size = _int(m, "s", 0, params.max_leaves * LEAF_SIZE)
        leaves = _int(m, "l", 0, params.max_leaves)
        fanout = _int(m, "f", MIN_FANOUT, MAX_FANOUT)
        root = _bin(m, "r", DIGEST_SIZE)
        if leaves != leaf_count_for(size):
            raise ProtocolError(f"image {name!r}: {leaves} leaves do not fit {size} bytes")
        return _Shape(name, size, leaves, fanout, root)

    @staticmethod
    def of(name: str, tree: MerkleTree) -> _Shape:
        return _Shape(name, tree.size, tree.leaf_count, tree.fanout, tree.root)


class _Walk:
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
            part["b"] = _pack_bits(same)
            stats.bitmap_bytes += len(part["b"])
            mine = mine[~same]
        part["d"] = mine[:, : self.t].tobytes()
        stats.walk_digest_bytes += len(part["d"])
        return part

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
            same = _unpack_bits(_bin(part, "b"), n, what)
        peer = _bin(part, "d")
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
        mask = _unpack_bits(_bin(part, "m"), len(self.sent_nodes), what)
        parents = self.sent_nodes[mask]
        if len(parents) == 0:
            raise ProtocolError(f"{what}: walk part with no differing node")
        return _children(parents, self.tree.fanout, self.sizes[level])

    def reply(
        self, level: int, nodes: npt.NDArray[np.int64], diff: npt.NDArray[np.bool_], stats: TransferStats
    ) -> dict[str, Any] | None:
        """My answer to the peer's digests at ``level``: the bitmap and my next level, or None when
        nothing differs (the walk of this image is over)."""
        if not diff.any():
            self.active = False
            return None
        kids = _children(nodes[diff], self.tree.fanout, self.sizes[level - 1])
        part = self.encode(level - 1, kids, stats)
        part["m"] = _pack_bits(diff)
        stats.bitmap_bytes += len(part["m"])
        self.sent_level, self.sent_nodes = level - 1, kids
        return part


class _ContentIndex:
    """Digest prefix → where the target holds that content (numpy sorted keys: ~16 B per leaf)."""

    def __init__(self, holdings: Sequence[tuple[BlockSource, MerkleTree]], t: int) -> None:
        self.t = t
        self.k = min(t, 8)
        self.holdings = list(holdings)
        keys, sids, leaves = [], [], []
        absent = np.frombuffer(ABSENT_DIGEST, dtype=np.uint8)
        for sid, (_, tree) in enumerate(self.holdings):
            ok = ~tree.zero_mask() & ~(tree.leaves == absent).all(axis=1)
            idx = np.flatnonzero(ok).astype(np.int64)
            keys.append(_prefix_keys(tree.leaves[idx], self.k))
            sids.append(np.full(len(idx), sid, dtype=np.int64))
            leaves.append(idx)
        all_keys = np.concatenate(keys) if keys else np.zeros(0, dtype=np.uint64)
        order = np.argsort(all_keys, kind="stable")
        self.keys = all_keys[order]
        self.sids = (np.concatenate(sids) if sids else np.zeros(0, dtype=np.int64))[order]
        self.leaves = (np.concatenate(leaves) if leaves else np.zeros(0, dtype=np.int64))[order]

    def lookup(self, prefixes: npt.NDArray[np.uint8]) -> list[tuple[int, int] | None]:
        """For each t-byte prefix: (holding, leaf) of content with that digest prefix, or None."""
        out: list[tuple[int, int] | None] = [None] * len(prefixes)
        if len(self.keys) == 0 or len(prefixes) == 0:
            return out
        q = _prefix_keys(prefixes, self.k)
        pos = np.minimum(np.searchsorted(self.keys, q), len(self.keys) - 1)
        for i in np.flatnonzero(self.keys[pos] == q).tolist():
            sid, leaf = int(self.sids[pos[i]]), int(self.leaves[pos[i]])
            if self.t <= 8 or bytes(self.holdings[sid][1].leaves[leaf, : self.t]) == bytes(prefixes[i]):
                out[i] = (sid, leaf)
        return out

    def digest(self, loc: tuple[int, int]) -> bytes:
        return self.holdings[loc[0]][1].leaf(loc[1])

    def read(self, loc: tuple[int, int]) -> bytes:
        return self.holdings[loc[0]][0].read(loc[1], 1)


# -- the shared endpoint ---------------------------------------------------------------------------


class _Endpoint:
    """Framing, decoding with limits, fragments, failure handling: what both sides share."""

    _TERMINAL: tuple[enum.Enum, ...]
    _FAILED: enum.Enum

    def __init__(self, params: ProtocolParams | None) -> None:
        self.params = params or ProtocolParams()
        self.stats = TransferStats()
        self._out: deque[bytes] = deque()
        self._frag_parts: list[bytes] = []
        self._frag_type: str | None = None
        self._frag_count = 0
        self._frag_size = 0
        self.state: Any

    # sending

    def _send(self, mtype: MsgType, body: dict[str, Any]) -> None:
        data = msgpack.packb({"t": str(mtype), "v": PROTOCOL_VERSION, **body}, use_bin_type=True)
        limit = self.params.max_message_bytes
        frames = [data]
        if len(data) > limit:
            if mtype not in FRAGMENTABLE:
                raise AssertionError(f"{mtype} message of {len(data)} bytes exceeds the limit")
            step = limit - FRAGMENT_OVERHEAD
            chunks = [data[i : i + step] for i in range(0, len(data), step)]
            frames = [
                msgpack.packb(
                    {"t": "frag", "v": PROTOCOL_VERSION, "lt": str(mtype), "i": i, "n": len(chunks), "d": c},
                    use_bin_type=True,
                )
                for i, c in enumerate(chunks)
            ]
        for frame in frames:
            self._out.append(frame)
            self.stats.wire_bytes[str(mtype)] = self.stats.wire_bytes.get(str(mtype), 0) + len(frame)
        self.stats.messages[str(mtype)] = self.stats.messages.get(str(mtype), 0) + 1

    def data_to_send(self) -> list[bytes]:
        """Messages to deliver to the peer, in order (each one wire message / websocket frame)."""
        out = list(self._out)
        self._out.clear()
        return out

    # receiving

    def _unpack(self, data: bytes, limit: int) -> dict[str, Any]:
        """Decode one message within byte limits and a container count: a tree message has the
        most (its map, 4 lists, an entry and a part per image), and without the count a message of
        nested empty arrays decodes to ~60x its size in Python objects."""
        if len(data) > limit:
            raise ProtocolError(f"message of {len(data)} bytes exceeds the limit of {limit}")
        p = self.params
        budget = [2 * p.max_images + 8]  # the most containers any message has: a tree (see below)

        def count(container: Any) -> Any:
            budget[0] -= 1
            if budget[0] < 0:
                raise ValueError("more containers than any message has")
            return container

        try:
            obj = msgpack.unpackb(
                data,
                raw=False,
                strict_map_key=True,
                use_list=True,
                max_str_len=max(p.max_name_len * 4, 64),
                max_bin_len=limit,
                max_array_len=p.max_images,
                max_map_len=16,
                max_ext_len=0,
                list_hook=count,
                object_hook=count,
            )
        except Exception:
            raise ProtocolError("malformed message (not decodable msgpack within the limits)") from None
        msg = _map(obj, "message")
        if _get(msg, "v") != PROTOCOL_VERSION:
            raise ProtocolError("unsupported protocol version")
        t = _get(msg, "t")
        if not isinstance(t, str) or t not in _TYPES:
            raise ProtocolError("unknown message type")
        return msg

    def _decode(self, data: bytes) -> dict[str, Any] | None:
        """The next whole message, or None while a fragmented one is incomplete."""
        self.stats.received_bytes += len(data)
        msg = self._unpack(data, self.params.max_message_bytes)
        if msg["t"] != MsgType.FRAG:
            if self._frag_type is not None:
                raise ProtocolError("message interleaved with a fragmented one")
            return msg
        lt = _get(msg, "lt")
        if not isinstance(lt, str) or lt not in FRAGMENTABLE:
            raise ProtocolError("fragment of a message type that is never fragmented")
        step = self.params.max_message_bytes - FRAGMENT_OVERHEAD
        limit = min(self.params.max_logical_bytes, self._expected_bytes(MsgType(lt)))
        n = _int(msg, "n", 2, self.params.max_logical_bytes // step + 1)
        i = _int(msg, "i", 0, n - 1)
        chunk = _bin(msg, "d", max_len=step)
        if i == 0 and self._frag_type is None:
            if (n - 1) * step >= limit:  # n - 1 full chunks already exceed it
                raise ProtocolError(f"fragmented {lt} of {n} parts: this side expects at most {limit} bytes")
            self._frag_type, self._frag_count, self._frag_parts, self._frag_size = lt, n, [], 0
        elif self._frag_type != lt or self._frag_count != n or i != len(self._frag_parts):
            raise ProtocolError("fragment out of sequence")
        self._frag_parts.append(chunk)
        self._frag_size += len(chunk)
        if self._frag_size > limit:
            raise ProtocolError(f"fragmented {lt} exceeds the {limit} bytes this side expects")
        if i < n - 1:
            return None
        whole = b"".join(self._frag_parts)
        self._frag_type, self._frag_parts = None, []
        inner = self._unpack(whole, limit)
        if inner["t"] != lt:
            raise ProtocolError("fragmented message of another type than announced")
        return inner

    def _expected_bytes(self, mtype: MsgType) -> int:
        """The largest ``mtype`` message (reassembled) this side can legitimately receive now:
        derived from its own images and the sizes it accepted, so the fragments a peer announces
        are checked against it before they are buffered (the side's owner knows it)."""
        return self.params.max_logical_bytes

    def _check_live(self) -> None:
        if self.state in self._TERMINAL:
            # A finished transfer stays finished: a VERIFIED side has committed, and a late or
            # bogus message must not turn that into FAILED.
            raise ProtocolError(f"message after the transfer ended ({self.state.value})")

    def _fail(self, code: FailCode, tell_peer: bool = True) -> None:
        if self.state in self._TERMINAL:
            return
        self.state = self._FAILED
        self._out.clear()
        self._cleanup()
        if tell_peer:
            self._send(MsgType.FAILED, {"c": int(code)})

    def _cleanup(self) -> None:
        pass

    def abort(self) -> None:
        """Give up locally (user cancel): FAILED, sinks aborted, the peer told."""
        self._fail(FailCode.ABORTED)

    def receive_data(self, data: bytes) -> list[Event]:
        """Process one wire message from the peer; returns what happened. Raises
        :class:`ProtocolError` / :class:`VerificationError` (the side is then FAILED, sinks
        aborted, and a failed message is queued for the peer)."""
        self._check_live()
        try:
            msg = self._decode(data)
            if msg is None:
                return []
            if msg["t"] == MsgType.FAILED:
                code = _int(msg, "c", min(FailCode), max(FailCode))
                self._fail(FailCode(code), tell_peer=False)
                return [PeerFailed(FailCode(code))]
            return self._dispatch(msg)
        except VerificationError:
            self._fail(FailCode.VERIFICATION)
            raise
        except ReplayMigrateError:
            self._fail(FailCode.PROTOCOL)
            raise
        except BaseException:
            self._fail(FailCode.INTERNAL)
            raise

    def _dispatch(self, msg: dict[str, Any]) -> list[Event]:
        raise NotImplementedError

    def _wrong_state(self, msg: dict[str, Any]) -> ProtocolError:
        return ProtocolError(f"{msg['t']} message not allowed in state {self.state.value}")


# -- the source ------------------------------------------------------------------------------------


class _SrcImg:
    def __init__(self, gi: int, spec: SourceImage) -> None:
        self.gi = gi
        self.name = spec.name
        self.source = spec.source
        self.tree = spec.tree
        self.base = spec.base
        if self.base is not None and self.base.tree.leaf_size != self.tree.leaf_size:
            raise ValueError(f"image {spec.name!r}: base tree with another leaf size")
        self.walk: _Walk | None = None


class Source:
    """The sending side (holds images A). Sans-I/O: feed :meth:`receive_data`, drain
    :meth:`data_to_send`. ``measure_plain``: also zstd every divergent leaf alone, for reports."""

    def __init__(
        self,
        images: Sequence[SourceImage],
        params: ProtocolParams | None = None,
        *,
        measure_plain: bool = False,
    ) -> None:
        self._ep = _SourceEndpoint(self, params)
        self.params = self._ep.params
        _check_images(images, self.params)
        self._images = [_SrcImg(i, spec) for i, spec in enumerate(images)]
        self._measure_plain = measure_plain
        self._cctx = zstandard.ZstdCompressor(
            level=self.params.zstd_level, write_checksum=False, write_content_size=True, write_dict_id=False
        )
        for im in self._images:
            self._ep.stats.images[im.name] = ImageStats(leaves=im.tree.leaf_count)
            self._ep.stats.flat_hash_bytes += DIGEST_SIZE * im.tree.leaf_count
        # negotiated in hello
        self._t = self.params.digest_bytes
        self._sub = self.params.sub_block_size
        self._fb = self.params.fingerprint_bytes
        self._cb = self.params.check_bytes
        self._key = b""
        # the plan (one entry per requested leaf, images in order, leaves ascending)
        self._p_img = np.zeros(0, dtype=np.int64)
        self._p_leaf = np.zeros(0, dtype=np.int64)
        self._p_req = np.zeros(0, dtype=np.uint8)
        self._p_aux = np.zeros(0, dtype=np.int64)
        self._cands = b""
        self._fps = b""
        self._starts: list[int] = [0]
        self._next_batch = 0
        self._acked = -1
        self._carry: tuple[int, tuple[Ans, bytes, bytes, bytes]] | None = None
        self._plain_done = 0

    @property
    def state(self) -> SourceState:
        st: SourceState = self._ep.state
        return st

    @property
    def stats(self) -> TransferStats:
        return self._ep.stats

    def receive_data(self, data: bytes) -> list[Event]:
        return self._ep.receive_data(data)

    def data_to_send(self) -> list[bytes]:
        """Queued messages, plus block batches up to ``window`` ahead of the acks (made lazily)."""
        if self._ep.state is SourceState.SENDING:
            try:
                self._emit_batches()
            except BaseException:
                self._ep._fail(FailCode.INTERNAL)
                raise
        return self._ep.data_to_send()

    def abort(self) -> None:
        self._ep.abort()

    def resume(self, next_batch: int) -> None:
        """Re-emit batches from ``next_batch`` (the target's next expected batch), e.g. after the
        transport reconnected; same as receiving the target's resume message."""
        self._ep._check_live()
        self._resume(next_batch)

    def _expected_bytes(self, mtype: MsgType) -> int:
        """Largest hello (its image entries), walk (one level of my trees' nodes, digests and
        bitmaps) or want (per leaf of my images: kind, check bytes, duplicate position, fingerprints)."""
        p = self.params
        if mtype is MsgType.HELLO:
            return _MESSAGE_SLACK + p.max_images * (_ENTRY_BYTES + 4 * p.max_name_len)
        leaves = sum(im.tree.leaf_count for im in self._images)
        if mtype is MsgType.WALK:
            return _walk_bytes(leaves, self._t, len(self._images))
        if mtype is MsgType.WANT:
            per_leaf = 2 + self._cb + 4 + -(-LEAF_SIZE // self._sub) * self._fb
            return _MESSAGE_SLACK * (1 + len(self._images)) + leaves * per_leaf
        return 0

    # handlers

    def _dispatch(self, msg: dict[str, Any]) -> list[Event]:
        t, st = msg["t"], self.state
        if t == MsgType.HELLO and st is SourceState.IDLE:
            return self._on_hello(msg)
        if t == MsgType.WALK and st is SourceState.WALKING:
            return self._on_walk(msg)
        if t == MsgType.WANT and st is SourceState.WALKING:
            return self._on_want(msg)
        if t == MsgType.ACK and st in (SourceState.SENDING, SourceState.SENT):
            n = _int(msg, "n", 0, max(0, self._next_batch - 1))
            if n >= self._next_batch:
                raise ProtocolError("ack of a batch not sent")
            self._acked = max(self._acked, n)
            return [BatchAcked(n)]
        if t == MsgType.RESUME and st in (SourceState.SENDING, SourceState.SENT):
            self._resume(_int(msg, "n", 0, 1 << 32))
            return []
        if t == MsgType.VERIFIED and st is SourceState.SENT:
            self._ep.state = SourceState.VERIFIED
            self._ep.stats.verified = True
            return [Verified()]
        raise self._ep._wrong_state(msg)

    def _on_hello(self, msg: dict[str, Any]) -> list[Event]:
        p = self.params
        self._t = _int(msg, "db", MIN_DIGEST_BYTES, MAX_DIGEST_BYTES)
        self._sub = _int(msg, "sb", MIN_SUB_BLOCK, MAX_SUB_BLOCK)
        if self._sub & (self._sub - 1):
            raise ProtocolError("sub-block size is not a power of two")
        self._fb = _int(msg, "fb", MIN_FINGERPRINT_BYTES, MAX_FINGERPRINT_BYTES)
        self._cb = _int(msg, "cb", 0, DIGEST_SIZE - self._t)
        self._key = _bin(msg, "key", KEY_SIZE)
        theirs = [_Shape.decode(v, p) for v in _list(msg, "img", max_len=p.max_images)]
        base_roots = _list(msg, "br", len(theirs))
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
            shapes.append(_Shape.of(im.name, im.tree).encode())
            self._ep.stats.root_bytes += DIGEST_SIZE
            base = im.base.tree if im.base is not None and im.base.tree.root == their_base[im.name] else None
            view = base.resized(im.tree.size, im.tree.fanout) if base is not None else None
            base_mode.append(view is not None)
            walk = im.walk = _Walk(im.tree, self._t, view)
            if by_name[im.name].root == im.tree.root or im.tree.leaf_count == 0:
                walk.active = False
                parts.append(None)
                continue
            depth = im.tree.depth
            level = depth if depth % 2 == 0 else depth - 1  # the source sends even levels
            nodes = np.arange(walk.sizes[level], dtype=np.int64)
            walk.sent_level, walk.sent_nodes = level, nodes
            parts.append(walk.encode(level, nodes, self._ep.stats))
        self._ep.state = SourceState.WALKING
        self._ep._send(MsgType.TREE, {"img": shapes, "bm": base_mode, "p": parts})
        return []

    def _on_walk(self, msg: dict[str, Any]) -> list[Event]:
        parts = _list(msg, "p", len(self._images))
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
            part = _map(part, what)
            if not walk.active:
                raise ProtocolError(f"{what}: part for a finished walk")
            level = _int(part, "l", 1, len(walk.sizes) - 1)
            if level % 2 == 0:
                raise ProtocolError(f"{what}: the target sent an even level")
            nodes = walk.nodes_for(part, level, what)
            diff, _, _ = walk.compare(level, nodes, part, what)
            replies.append(walk.reply(level, nodes, diff, self._ep.stats))
        self._ep._send(MsgType.WALK, {"p": replies})
        return []

    def _on_want(self, msg: dict[str, Any]) -> list[Event]:
        parts = _list(msg, "p", len(self._images))
        imgs, leaves, reqs, auxs = [], [], [], []
        cands, fps = [], []
        rest = self._cb
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
            part = _map(part, what)
            if not walk.active or walk.sent_level != 0:
                raise ProtocolError(f"{what}: the source did not send this image's leaf level")
            mask = _unpack_bits(_bin(part, "m"), len(walk.sent_nodes), what)
            lv = walk.sent_nodes[mask]
            if len(lv) == 0:
                raise ProtocolError(f"{what}: no differing leaf")
            kinds = np.frombuffer(_bin(part, "k", len(lv)), dtype=np.uint8)
            if (kinds > max(Req)).any():
                raise ProtocolError(f"{what}: unknown request kind")
            if walk.base is None and (kinds == Req.BASE).any():
                raise ProtocolError(f"{what}: base request in a walk without base")
            n_ref = int((kinds == Req.REF).sum())
            n_dup = int((kinds == Req.DUP).sum())
            c = _bin(part, "c", n_ref * rest)
            u = np.frombuffer(_bin(part, "u", n_dup * 4), dtype="<u4").astype(np.int64)
            lengths = np.minimum(LEAF_SIZE, im.tree.size - lv * LEAF_SIZE)
            nsub = -(-lengths // self._sub)
            fp_need = int(nsub[kinds == Req.DELTA].sum()) * self._fb
            f = _bin(part, "f", fp_need)
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
            self._ep.stats.images[im.name].divergent = len(lv)
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
        self._ep.state = SourceState.SENDING
        return [WalkDone(divergent)]

    # batches

    def _resume(self, n: int) -> None:
        if self.state not in (SourceState.SENDING, SourceState.SENT) or not 0 <= n <= self._next_batch:
            raise ProtocolError("resume from a batch not sent")
        self._acked = n - 1
        self._next_batch = n
        self._carry = None
        self._ep._out.clear()
        self._ep.state = SourceState.SENDING

    def _emit_batches(self) -> None:
        total = len(self._p_leaf)
        while self._next_batch <= self._acked + self.params.window:
            n = self._next_batch
            if n == len(self._starts) - 1 and self._starts[-1] >= total:
                self._ep._send(MsgType.END, {"n": n})
                self._ep.state = SourceState.SENT
                return
            self._ep._send(MsgType.BLOCKS, self._encode_batch(n))
            self._next_batch += 1

    def _answer(self, pos: int) -> tuple[Ans, bytes, bytes, bytes]:
        """(kind, rest of digest, delta bitmap, payload) for plan entry ``pos``."""
        if self._carry is not None and self._carry[0] == pos:
            return self._carry[1]
        im = self._images[int(self._p_img[pos])]
        leaf, req, aux = int(self._p_leaf[pos]), Req(int(self._p_req[pos])), int(self._p_aux[pos])
        digest = im.tree.leaf(leaf)
        length = im.tree.leaf_length(leaf)
        t = self._t
        data: bytes | None = None
        if self._measure_plain and pos >= self._plain_done:
            data = im.source.read(leaf, 1)
            self._ep.stats.images[im.name].plain_bytes += len(self._cctx.compress(data))
            self._plain_done = pos + 1
        cb = self._cb
        if req is Req.REF:
            if digest[t : t + cb] == self._cands[aux * cb : (aux + 1) * cb]:
                return Ans.OK, b"", b"", b""
        elif req is Req.BASE:
            assert im.walk is not None and im.walk.base is not None
            if digest == im.walk.base.leaf(leaf):
                return Ans.OK, b"", b"", b""
        elif req is Req.ZERO:
            if digest == zero_digest(length):
                return Ans.OK, b"", b"", b""
        elif req is Req.DUP:
            other = self._images[int(self._p_img[aux])].tree.leaf(int(self._p_leaf[aux]))
            if digest == other:
                return Ans.OK, b"", b"", b""
        if digest == zero_digest(length):
            return Ans.ZERO, b"", b"", b""
        if data is None:
            data = im.source.read(leaf, 1)
        if len(data) != length:
            raise ProtocolError(f"image {im.name!r}: source gave {len(data)} bytes for leaf {leaf}")
        kind, mask, payload = Ans.FULL, b"", data
        if req is Req.DELTA:
            nsub = _n_sub(length, self._sub)
            theirs = np.frombuffer(self._fps, dtype=np.uint8, count=nsub * self._fb, offset=aux)
            mine = np.frombuffer(_fingerprints(data, self._sub, self._fb, self._key), dtype=np.uint8)
            diff = (mine.reshape(nsub, self._fb) != theirs.reshape(nsub, self._fb)).any(axis=1)
            k = int(diff.sum())
            if 0 < k < nsub:
                mv = memoryview(data)
                kind, mask = Ans.DELTA, _pack_bits(diff)
                payload = b"".join(mv[j * self._sub : (j + 1) * self._sub] for j in np.flatnonzero(diff).tolist())
        if _has_base_leaf(im.base, leaf, length) and (im.walk is not None and im.walk.base is not None):
            assert im.base is not None
            xor = _xor(data, im.base.source.read(leaf, 1))
            if len(self._cctx.compress(xor)) < len(self._cctx.compress(payload)) + len(mask):
                kind, mask, payload = Ans.XBASE, b"", xor
        return kind, digest[t : t + cb], mask, payload

    def _encode_batch(self, n: int) -> dict[str, Any]:
        start = self._starts[n]
        fixed_end = self._starts[n + 1] if n + 1 < len(self._starts) else None
        end_limit = fixed_end if fixed_end is not None else len(self._p_leaf)
        budget = self.params.max_message_bytes - BATCH_SLACK
        kinds = bytearray()
        rests: list[bytes] = []
        masks: list[bytes] = []
        payload: list[bytes] = []
        used = 0
        pos = start
        while pos < end_limit:
            if fixed_end is None and pos - start >= self.params.max_batch_entries:
                break
            ans = self._answer(pos)
            kind, rest, mask, data = ans
            cost = 1 + len(rest) + len(mask) + len(data)
            if fixed_end is None and pos > start and used + cost > budget:
                self._carry = (pos, ans)
                break
            used += cost
            kinds.append(kind)
            rests.append(rest)
            masks.append(mask)
            payload.append(data)
            pos += 1
        if fixed_end is None:
            self._starts.append(pos)
        body = b"".join(payload)
        z = self._cctx.compress(body) if body else b""
        msg: dict[str, Any] = {"n": n, "o": start, "k": bytes(kinds), "h": b"".join(rests), "dm": b"".join(masks)}
        if len(z) < len(body):
            msg["z"] = z
        else:
            msg["r"] = body
        st = self._ep.stats
        st.leaf_digest_bytes += len(msg["h"])
        st.block_bytes += len(msg.get("z", msg.get("r", b""))) + len(msg["dm"])
        st.batches += 1
        return msg


class _SourceEndpoint(_Endpoint):
    _TERMINAL = (SourceState.VERIFIED, SourceState.FAILED)
    _FAILED = SourceState.FAILED

    def __init__(self, owner: Source, params: ProtocolParams | None) -> None:
        super().__init__(params)
        self.owner = owner
        self.state = SourceState.IDLE

    def _dispatch(self, msg: dict[str, Any]) -> list[Event]:
        return self.owner._dispatch(msg)

    def _expected_bytes(self, mtype: MsgType) -> int:
        return self.owner._expected_bytes(mtype)


# -- the target ------------------------------------------------------------------------------------


class _TgtImg:
    def __init__(self, spec: TargetImage) -> None:
        self.name = spec.name
        self.source = spec.source
        self.tree = spec.tree
        self.sink = spec.sink
        self.base = spec.base
        self.base_view: MerkleTree | None = None
        """The base's tree in the source's shape, in the base-relative walk."""
        self.gi = -1
        self.shape: _Shape | None = None
        self.view: MerkleTree | None = None
        self.walk: _Walk | None = None
        self.want_mask: npt.NDArray[np.bool_] = np.zeros(0, dtype=bool)
        self.diff_leaves: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)
        self.prefixes: npt.NDArray[np.uint8] = np.zeros((0, 0), dtype=np.uint8)
        self.from_base: npt.NDArray[np.bool_] = np.zeros(0, dtype=bool)
        """Per differing leaf: the source said it holds the base's content there."""
        self.touched = False
        self.verified_tree: MerkleTree | None = None
        """The committed image's tree, once VERIFIED (the next common checkpoint reuses it)."""


class Target:
    """The receiving side (holds images B and their sinks). Call :meth:`start`, then pump.

    ``references``: other content the target holds (base image, checkpoint), used for references.
    ``dry_run``: walk, receive and verify every block, but write nothing; the final check then
    recomputes the roots from the target's trees with the verified leaf digests substituted.
    ``key``: the fingerprint key (random by default; tests pass one to be deterministic).
    ``verify_untouched``: also rehash images the transfer did not change before committing, which
    catches a stale target tree (one that no longer describes the image) at the cost of reading the
    image; False trusts the tree for those.
    ``max_sizes``: per image name, the largest size to accept from the source, for a caller that
    knows it (a local sync holds both sides); the others follow ``ProtocolParams.size_limit``.
    """

    def __init__(
        self,
        images: Sequence[TargetImage],
        params: ProtocolParams | None = None,
        *,
        references: Sequence[ReferenceImage] = (),
        dry_run: bool = False,
        key: bytes | None = None,
        verify_untouched: bool = True,
        max_sizes: Mapping[str, int] | None = None,
    ) -> None:
        self._ep = _TargetEndpoint(self, params)
        self.params = self._ep.params
        _check_images(images, self.params)
        given = dict(max_sizes or {})
        if not set(given) <= {im.name for im in images} or any(
            not 0 <= v <= self.params.max_leaves * LEAF_SIZE for v in given.values()
        ):
            raise ValueError("max_sizes must name target images, each within max_leaves")
        self._limits = {
            im.name: given.get(im.name, self.params.size_limit(max(im.tree.size, im.base.tree.size if im.base else 0)))
            for im in images
        }
        if not dry_run and any(spec.sink is None for spec in images):
            raise ValueError("every image needs a sink unless dry_run")
        self._images = [_TgtImg(im) for im in images]
        self._by_gi: list[_TgtImg] = []
        self._references = list(references)
        self.dry_run = dry_run
        self.verify_untouched = verify_untouched
        self._key = key if key is not None else _random_key()
        if len(self._key) != KEY_SIZE:
            raise ValueError("key must be 32 bytes")
        self._t = self.params.digest_bytes
        self._cb = self.params.check_bytes
        self._index: _ContentIndex | None = None
        self._ep.stats.dry_run = dry_run
        # the plan, by global position
        self._p_img = np.zeros(0, dtype=np.int64)
        self._p_leaf = np.zeros(0, dtype=np.int64)
        self._p_req = np.zeros(0, dtype=np.uint8)
        self._p_prefix = np.zeros((0, self._t), dtype=np.uint8)
        self._p_ref: dict[int, tuple[int, int]] = {}
        self._p_dup: dict[int, int] = {}
        self._dup_targets: set[int] = set()
        self._dup_cache: dict[int, bytes] = {}
        self._full = np.zeros((0, DIGEST_SIZE), dtype=np.uint8)
        self._next_batch = 0
        self._applied = 0

    @property
    def state(self) -> TargetState:
        st: TargetState = self._ep.state
        return st

    @property
    def stats(self) -> TransferStats:
        return self._ep.stats

    @property
    def roots(self) -> dict[str, bytes]:
        """The source's roots by image name (once VERIFIED: the roots of the committed images)."""
        return {im.name: im.shape.root for im in self._by_gi if im.shape is not None}

    @property
    def verified_trees(self) -> dict[str, MerkleTree]:
        """The committed images' trees by name, once VERIFIED (the source's trees, leaf for leaf)."""
        return {im.name: im.verified_tree for im in self._by_gi if im.verified_tree is not None}

    @property
    def progress(self) -> tuple[int, int]:
        """(leaves applied, leaves requested)."""
        return self._applied, len(self._p_leaf)

    def start(self) -> None:
        """Queue the hello message."""
        if self.state is not TargetState.IDLE:
            raise RuntimeError("Target.start called twice")
        p = self.params
        shapes = [_Shape.of(im.name, im.tree).encode() for im in self._images]
        base_roots = [im.base.tree.root if im.base is not None and p.base else None for im in self._images]
        self._ep.stats.root_bytes += DIGEST_SIZE * (len(shapes) + sum(r is not None for r in base_roots))
        self._ep.stats.round_trips += 1
        self._ep.state = TargetState.HELLO_SENT
        self._ep._send(
            MsgType.HELLO,
            {"db": p.digest_bytes, "sb": p.sub_block_size, "fb": p.fingerprint_bytes, "cb": p.check_bytes,
             "key": self._key, "img": shapes, "br": base_roots},
        )

    def receive_data(self, data: bytes) -> list[Event]:
        return self._ep.receive_data(data)

    def data_to_send(self) -> list[bytes]:
        return self._ep.data_to_send()

    def abort(self) -> None:
        self._ep.abort()

    def resume(self) -> None:
        """After a reconnect: ask the source to re-emit from the next batch not yet applied."""
        self._ep._check_live()
        if self.state is not TargetState.RECEIVING:
            raise ProtocolError("resume outside the block phase: restart the transfer")
        self._ep._out.clear()
        self._ep._send(MsgType.RESUME, {"n": self._next_batch})

    def _expected_bytes(self, mtype: MsgType) -> int:
        """Largest tree or walk: one level of the source's trees, of the sizes accepted (before the
        tree message, the largest this target accepts)."""
        if mtype not in (MsgType.TREE, MsgType.WALK):
            return 0
        leaves = sum(
            im.shape.leaves if im.shape is not None else leaf_count_for(self._limits[im.name]) for im in self._images
        )
        entries = len(self._images) * (_ENTRY_BYTES + 4 * self.params.max_name_len)
        return entries + _walk_bytes(leaves, self._t, len(self._images))

    # handlers

    def _dispatch(self, msg: dict[str, Any]) -> list[Event]:
        t, st = msg["t"], self.state
        if t == MsgType.TREE and st is TargetState.HELLO_SENT:
            return self._on_tree(msg)
        if t == MsgType.WALK and st is TargetState.WALKING:
            return self._on_walk(_list(msg, "p", len(self._by_gi)))
        if t == MsgType.BLOCKS and st is TargetState.RECEIVING:
            return self._on_blocks(msg)
        if t == MsgType.END and st is TargetState.RECEIVING:
            return self._on_end(msg)
        raise self._ep._wrong_state(msg)

    def _on_tree(self, msg: dict[str, Any]) -> list[Event]:
        p = self.params
        shapes = [_Shape.decode(v, p) for v in _list(msg, "img", len(self._images))]
        mine = {im.name: im for im in self._images}
        if {s.name for s in shapes} != set(mine) or len({s.name for s in shapes}) != len(shapes):
            raise ProtocolError("the source's images are not the target's images")
        for shape in shapes:  # before anything is allocated for any of them
            if shape.size > self._limits[shape.name]:
                raise ProtocolError(
                    f"image {shape.name!r}: the source announces {shape.size} bytes, larger than the "
                    f"{self._limits[shape.name]} this target accepts"
                )
        base_mode = _list(msg, "bm", len(shapes))
        for gi, shape in enumerate(shapes):
            im = mine[shape.name]
            im.gi, im.shape = gi, shape
            im.view = im.tree.resized(shape.size, shape.fanout)
            if base_mode[gi] is True:
                if im.base is None or not self.params.base:
                    raise ProtocolError(f"image {im.name!r}: base-relative walk without a base offered")
                im.base_view = im.base.tree.resized(shape.size, shape.fanout)
            elif base_mode[gi] is not False:
                raise ProtocolError("message field 'bm' is not a list of booleans")
            im.walk = _Walk(im.view, self._t, im.base_view)
            im.walk.active = False  # until the first part arrives
            self._ep.stats.images[im.name] = ImageStats(leaves=shape.leaves, resized=shape.size != im.tree.size)
            self._ep.stats.flat_hash_bytes += DIGEST_SIZE * shape.leaves
        self._by_gi = sorted(self._images, key=lambda im: im.gi)
        parts = _list(msg, "p", len(shapes))
        for im, part in zip(self._by_gi, parts, strict=True):
            assert im.walk is not None and im.shape is not None
            if part is not None:
                if im.shape.leaves == 0:
                    raise ProtocolError(f"walk of {im.name!r}: walk part for an empty image")
                im.walk.active = True
        self._ep.state = TargetState.WALKING
        return self._on_walk(parts, first=True)

    def _on_walk(self, parts: list[Any], first: bool = False) -> list[Event]:
        replies: list[dict[str, Any] | None] = []
        for im, part in zip(self._by_gi, parts, strict=True):
            walk = im.walk
            assert walk is not None
            if part is None:
                walk.active = False
                replies.append(None)
                continue
            what = f"walk of {im.name!r}"
            part = _map(part, what)
            if not walk.active:
                raise ProtocolError(f"{what}: part for a finished walk")
            level = _int(part, "l", 0, len(walk.sizes) - 1)
            if level % 2:
                raise ProtocolError(f"{what}: the source sent an odd level")
            if first:
                depth = len(walk.sizes) - 1
                if level != (depth if depth % 2 == 0 else depth - 1):
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
                replies.append(walk.reply(level, nodes, diff, self._ep.stats))
        if any(r is not None for r in replies):
            self._ep.stats.round_trips += 1
            self._ep._send(MsgType.WALK, {"p": replies})
            return []
        return self._send_want()

    def _send_want(self) -> list[Event]:
        """All walks are over: decide per differing leaf how to get it, and ask."""
        t = self._t
        st = self._ep.stats
        holdings: list[tuple[BlockSource, MerkleTree]] = []
        if any(len(im.diff_leaves) for im in self._by_gi):  # ~50 ms per GiB held: only when needed
            holdings = [(im.source, im.tree) for im in self._images] + [(r.source, r.tree) for r in self._references]
        index = self._index = _ContentIndex(holdings, t)
        parts: list[dict[str, Any] | None] = []
        first_of: dict[bytes, int] = {}
        p_img, p_leaf, p_req, p_pref = [], [], [], []
        pos0 = 0
        divergent: dict[str, int] = {}
        for im in self._by_gi:
            assert im.shape is not None and im.view is not None
            lv, pref = im.diff_leaves, im.prefixes
            divergent[im.name] = len(lv)
            st.images[im.name].divergent = len(lv)
            if not self.dry_run and im.shape.size != im.tree.size:
                assert im.sink is not None
                im.sink.set_size(im.shape.size)
                im.touched = True
            if len(lv) == 0:
                parts.append(None)
                continue
            im.touched = True
            size = im.shape.size
            kinds = np.empty(len(lv), dtype=np.uint8)
            cands: list[bytes] = []
            dups: list[int] = []
            fp_leaves: list[int] = []
            locs = index.lookup(pref)
            zero_full = zero_digest()[:t]
            cb = self._cb
            for j, leaf in enumerate(lv.tolist()):
                pos = pos0 + j
                length = leaf_length(size, leaf)
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
                    self._p_ref[pos] = loc
                elif pb in first_of:
                    kinds[j] = Req.DUP
                    dups.append(first_of[pb])
                    self._p_dup[pos] = first_of[pb]
                    self._dup_targets.add(first_of[pb])
                else:
                    first_of[pb] = pos
                    fingerprints = self.params.delta and (im.base_view is None or self.params.delta_with_base)
                    if fingerprints and self._has_base(im, leaf):
                        kinds[j] = Req.DELTA
                        fp_leaves.append(leaf)
                    else:
                        kinds[j] = Req.BLOCK
            fps = self._fingerprint_leaves(im, fp_leaves)
            part = {
                "m": _pack_bits(im.want_mask),
                "k": kinds.tobytes(),
                "c": b"".join(cands),
                "u": np.asarray(dups, dtype="<u4").tobytes(),
                "f": fps,
            }
            st.bitmap_bytes += len(part["m"])
            st.leaf_digest_bytes += len(part["c"])
            st.fingerprint_bytes += len(fps)
            parts.append(part)
            p_img.append(np.full(len(lv), im.gi, dtype=np.int64))
            p_leaf.append(lv)
            p_req.append(kinds)
            p_pref.append(pref)
            pos0 += len(lv)
        if p_leaf:
            self._p_img = np.concatenate(p_img)
            self._p_leaf = np.concatenate(p_leaf)
            self._p_req = np.concatenate(p_req)
            self._p_prefix = np.concatenate(p_pref)
        self._full = np.zeros((len(self._p_leaf), DIGEST_SIZE), dtype=np.uint8)
        st.round_trips += 1
        self._ep.state = TargetState.RECEIVING
        self._ep._send(MsgType.WANT, {"p": parts})
        return [WalkDone(divergent)]

    def _has_base(self, im: _TgtImg, leaf: int) -> bool:
        """Whether the target has a non-zero block at ``leaf`` (after the resize) to delta against."""
        assert im.view is not None
        if leaf >= im.tree.leaf_count:
            return False
        return im.view.leaf(leaf) != zero_digest(im.view.leaf_length(leaf))

    def _base_blocks(self, im: _TgtImg, leaves: list[int]) -> dict[int, bytes]:
        """The target's own blocks at ``leaves`` (sorted, all inside its original image), as they
        are after the resize."""
        assert im.shape is not None
        return _read_leaves(im.source, leaves, im.shape.size)

    def _fingerprint_leaves(self, im: _TgtImg, leaves: list[int]) -> bytes:
        sub, fb = self.params.sub_block_size, self.params.fingerprint_bytes
        blocks = self._base_blocks(im, leaves)
        return b"".join(_fingerprints(blocks[leaf], sub, fb, self._key) for leaf in leaves)

    def _on_blocks(self, msg: dict[str, Any]) -> list[Event]:
        n = _int(msg, "n", 0, 1 << 32)
        if n < self._next_batch:
            self._ep.stats.duplicate_batches += 1
            self._ep._send(MsgType.ACK, {"n": n})
            return []
        if n > self._next_batch:
            raise ProtocolError(f"blocks message {n} while expecting {self._next_batch}")
        total = len(self._p_leaf)
        o = _int(msg, "o", 0, total)
        if o != self._applied:
            raise ProtocolError("blocks message does not start where the previous one ended")
        kinds = _bin(msg, "k", max_len=min(self.params.max_batch_entries, total - o))
        if not kinds:
            raise ProtocolError("empty blocks message")
        rests = _bin(msg, "h")
        masks = _bin(msg, "dm")
        t, sub = self._t, self.params.sub_block_size
        rest_len = self._cb
        # pass 1: layout (what the body must hold), kinds allowed for each request
        layout: list[tuple[Ans, int, int, npt.NDArray[np.bool_] | None]] = []
        raw_len = r_off = m_off = 0
        for j, kb in enumerate(kinds):
            pos = o + j
            if kb > max(Ans):
                raise ProtocolError("unknown answer kind")
            kind, req = Ans(kb), Req(int(self._p_req[pos]))
            im = self._by_gi[int(self._p_img[pos])]
            assert im.shape is not None
            length = leaf_length(im.shape.size, int(self._p_leaf[pos]))
            if kind is Ans.OK and req not in (Req.REF, Req.ZERO, Req.DUP, Req.BASE):
                raise ProtocolError("confirmation of a leaf that was not proposed")
            if kind is Ans.DELTA and req is not Req.DELTA:
                raise ProtocolError("delta for a leaf without fingerprints")
            if kind is Ans.XBASE and not (
                im.base_view is not None and _has_base_leaf(im.base, int(self._p_leaf[pos]), length)
            ):
                raise ProtocolError("XOR against a base the target does not have")
            bits = None
            if kind in _SENT:
                r_off += rest_len
            if kind in (Ans.FULL, Ans.XBASE):
                raw_len += length
            elif kind is Ans.DELTA:
                nsub = _n_sub(length, sub)
                nb = (nsub + 7) // 8
                bits = _unpack_bits(masks[m_off : m_off + nb], nsub, "delta") if m_off + nb <= len(masks) else None
                if bits is None or not bits.any():
                    raise ProtocolError("malformed delta bitmap")
                m_off += nb
                for s in np.flatnonzero(bits).tolist():
                    raw_len += min(sub, length - s * sub)
            layout.append((kind, length, raw_len, bits))
        if r_off != len(rests) or m_off != len(masks):
            raise ProtocolError("blocks message: digest or bitmap bytes do not match its entries")
        if raw_len > self.params.max_message_bytes:
            # the source cuts a batch at max_message_bytes of payload (one leaf always fits)
            raise ProtocolError("blocks message: its entries need more bytes than a batch may hold")
        if "z" in msg:
            if not raw_len:
                raise ProtocolError("blocks message: compressed body for entries without bytes")
            body = decompress_exact(_bin(msg, "z"), raw_len, ProtocolError, "blocks message body")
        else:
            body = _bin(msg, "r")
        if len(body) != raw_len:
            raise ProtocolError("blocks message: body length does not match its entries")
        # pass 2: reconstruct and verify every leaf before any write
        wanted: dict[int, list[int]] = {}  # image → leaves whose delta needs the target's block
        from_base: dict[int, list[int]] = {}  # image → leaves taken from or XORed against its base
        for j, entry in enumerate(layout):
            gi, leaf = int(self._p_img[o + j]), int(self._p_leaf[o + j])
            if entry[0] is Ans.DELTA:
                wanted.setdefault(gi, []).append(leaf)
            elif entry[0] is Ans.XBASE or (entry[0] is Ans.OK and self._p_req[o + j] == Req.BASE):
                from_base.setdefault(gi, []).append(leaf)
        bases = {gi: self._base_blocks(self._by_gi[gi], leaves) for gi, leaves in wanted.items()}
        base_data: dict[int, dict[int, bytes]] = {}
        for gi, leaves in from_base.items():
            im = self._by_gi[gi]
            assert im.base is not None and im.shape is not None
            base_data[gi] = _read_leaves(im.base.source, leaves, min(im.shape.size, im.base.tree.size))
        ready: list[tuple[_TgtImg, int, bytes | None, _How]] = []
        b_off = r_off = 0
        for j, (kind, length, _, bits) in enumerate(layout):
            pos = o + j
            im = self._by_gi[int(self._p_img[pos])]
            leaf = int(self._p_leaf[pos])
            req = Req(int(self._p_req[pos]))
            prefix = self._p_prefix[pos].tobytes()
            data: bytes | None
            if kind is Ans.OK and req is Req.REF:
                loc = self._p_ref[pos]
                digest = self._index.digest(loc) if self._index else b""
                data = self._index.read(loc) if self._index else b""
            elif kind is Ans.OK and req is Req.DUP:
                ref = self._p_dup[pos]
                digest = self._full[ref].tobytes()
                data = self._dup_cache.get(ref)
                if data is None:
                    raise ProtocolError("duplicate of a leaf not received")
            elif kind is Ans.OK and req is Req.BASE:
                assert im.base is not None and im.base_view is not None
                digest = im.base_view.leaf(leaf)
                data = _fit(base_data[im.gi][leaf], length)
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
                    data = _xor(body[b_off : b_off + length], base_data[im.gi][leaf])
                    b_off += length
                else:
                    assert bits is not None
                    block = bytearray(bases[im.gi][leaf])
                    for s in np.flatnonzero(bits).tolist():
                        piece = min(sub, length - s * sub)
                        block[s * sub : s * sub + piece] = body[b_off : b_off + piece]
                        b_off += piece
                    data = bytes(block)
                digest = blake3.blake3(data).digest()
                if digest[: len(check)] != check:
                    raise VerificationError(f"image {im.name!r}: leaf {leaf} does not match the source's digest")
            if kind not in _SENT and data is not None and blake3.blake3(data).digest() != digest:
                # content the target proposed from what it holds: a stale tree would show here
                raise VerificationError(f"image {im.name!r}: leaf {leaf} does not match the source's digest")
            self._full[pos] = np.frombuffer(digest, dtype=np.uint8)
            if pos in self._dup_targets:
                self._dup_cache[pos] = data if data is not None else bytes(length)
            ready.append((im, leaf, data, _CONFIRMED[req] if kind is Ans.OK else _HOW[kind]))
        # pass 3: write
        for im, leaf, data, how in ready:
            if im.sink is not None and not self.dry_run:
                if data is None:
                    im.sink.zero(leaf)
                else:
                    im.sink.write(leaf, data)
            counts = self._ep.stats.images[im.name]
            setattr(counts, how.value, getattr(counts, how.value) + 1)
        self._applied += len(kinds)
        self._next_batch += 1
        self._ep.stats.batches += 1
        self._ep._send(MsgType.ACK, {"n": n})
        return [BatchApplied(n, self._applied, total)]

    def _on_end(self, msg: dict[str, Any]) -> list[Event]:
        n = _int(msg, "n", 0, 1 << 32)
        if n != self._next_batch or self._applied != len(self._p_leaf):
            raise ProtocolError("end before every requested leaf arrived")
        for im in self._by_gi:
            assert im.shape is not None and im.view is not None
            sel = self._p_img == im.gi
            if self.dry_run:
                tree = im.view.replace_leaves(self._p_leaf[sel], self._full[sel]) if sel.any() else im.view
            elif im.touched or self.verify_untouched:
                assert im.sink is not None
                patched = im.sink.source()
                try:
                    tree = MerkleTree.build(patched, im.shape.fanout)
                finally:
                    patched.close()
            else:
                tree = im.view
            im.verified_tree = tree
            root = tree.root
            if root != im.shape.root:
                raise VerificationError(f"image {im.name!r}: the patched image's root differs from the source's")
        if not self.dry_run:
            for im in self._by_gi:
                assert im.sink is not None
                im.sink.commit()
        self._ep.state = TargetState.VERIFIED
        self._ep.stats.verified = True
        self._ep._send(MsgType.VERIFIED, {})
        return [Verified()]

    def _cleanup(self) -> None:
        for im in self._images:
            if im.sink is not None and not self.dry_run:
                try:
                    im.sink.abort()
                except Exception:  # abort the others whatever one of them does
                    pass


class _TargetEndpoint(_Endpoint):
    _TERMINAL = (TargetState.VERIFIED, TargetState.FAILED)
    _FAILED = TargetState.FAILED

    def __init__(self, owner: Target, params: ProtocolParams | None) -> None:
        super().__init__(params)
        self.owner = owner
        self.state = TargetState.IDLE

    def _dispatch(self, msg: dict[str, Any]) -> list[Event]:
        return self.owner._dispatch(msg)

    def _expected_bytes(self, mtype: MsgType) -> int:
        return self.owner._expected_bytes(mtype)

    def _cleanup(self) -> None:
        self.owner._cleanup()


def _random_key() -> bytes:
    return os.urandom(KEY_SIZE)


# -- the in-memory driver ----------------------------------------------------------------------------


def run_local(source: Source, target: Target, *, max_steps: int = 1 << 24) -> TransferStats:
    """Run a whole transfer in memory (CLI ``diff``/``sync``, tests); returns both sides' stats
    merged. Raises what either side raised, after delivering its failed message to the other (so
    the target's sinks are aborted whichever side failed)."""
    sides: tuple[tuple[Target | Source, Target | Source], ...] = ((target, source), (source, target))
    if target.state is TargetState.IDLE:
        target.start()
    try:
        for _ in range(max_steps):
            moved = False
            for sender, receiver in sides:
                for data in sender.data_to_send():
                    moved = True
                    receiver.receive_data(data)
            if not moved:
                break
    except BaseException:
        for sender, receiver in sides:  # tell the other side, whichever failed
            for data in sender.data_to_send():
                if receiver.state.value not in ("verified", "failed"):
                    try:
                        receiver.receive_data(data)
                    except ReplayMigrateError:
                        pass
        if target.state.value not in ("verified", "failed"):
            target.abort()
        raise
    if target.state is not TargetState.VERIFIED or source.state is not SourceState.VERIFIED:
        target.abort()
        raise ProtocolError(f"transfer stalled (source {source.state.value}, target {target.state.value})")
    return source.stats.merged(target.stats)
