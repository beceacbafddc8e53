"""Every limit and tunable of the diff protocol, with its default and its hard bounds."""

from __future__ import annotations

from dataclasses import dataclass

from differ.merkle import DIGEST_SIZE, MAX_LEAVES
from differ.source import LEAF_SIZE

PROTOCOL_VERSION = 4
"""2: base-relative walk, per-block check bytes (``cb``) instead of whole digests. 3: a block may
travel XOR another leaf of the base than its own (the most similar one: ``Ans.XSIM``, ``xl``).
4: a reference candidate carries ``ref_check_bytes`` (``rb``) of its digest, apart from the
blocks' ``check_bytes``: the walk's digests shrank from 8 to 5 bytes; per-leaf kinds may travel
as a zstd frame (``kz``, in a blocks message with their count ``kn``)."""

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
"""Most leaves one read request asks for (1 MiB): the target's own blocks for fingerprints and
deltas, the source's blocks for the next batch. An adapter reads consecutive ones in one call (a
qcow2 source spawns qemu-img per call for compressed clusters)."""


@dataclass(frozen=True)
class ProtocolParams:
    """Every limit and tunable of the protocol, with its default.

    The target proposes ``digest_bytes``, ``sub_block_size``, ``fingerprint_bytes`` in its hello;
    the source accepts any value inside the hard bounds above. The limits bound what a side
    *accepts*, so a peer cannot make it allocate more than they allow.
    """

    digest_bytes: int = 5
    """Bytes of each node digest in the walk (75 % of the walk's digests are of the leaf level).
    A differing node whose prefixes agree by chance (2^-40 per comparison with 5 bytes) is taken
    as equal: the subtree is not sent, and the 32-byte root check before anything is committed
    fails the transfer (FAILED, the source keeps its VM: never a wrong image). A migration of the
    bench's ``notes`` compares ~5,200 differing nodes: ~5e-9 per migration (50,000 divergent leaves:
    ~6e-8). 8 bytes made that 2^-64 per comparison and cost 15.5 KB more on ``notes`` (~4 % of its
    wire bytes); 4 bytes would save 5 KB more at ~1e-6 per migration. A leaf's prefix is also what
    the target looks up the content it holds by (~1.3 M leaves): a candidate found by a shorter
    prefix is confirmed with ``ref_check_bytes`` more, so references stay as strong as before."""
    sub_block_size: int = 256
    """Delta granularity: the target fingerprints its block in pieces of this size (16 per leaf);
    the source sends the pieces whose fingerprints differ. Measured in ``bench/bench_differ.py``."""
    fingerprint_bytes: int = 4
    """Bytes of each keyed sub-block fingerprint. A false match rebuilds a wrong block, which fails
    its digest check and fails the transfer (nothing written): ~2^-32 per differing sub-block with
    4 bytes and the per-transfer random key; 2 bytes failed within 4000 pages in the bench."""
    delta: bool = True
    """Target: send fingerprints (ask for deltas) for leaves where it has a non-zero block."""
    similar: bool = True
    """Source: for a leaf it sends, also try XOR against the base leaves that a similarity index of
    the base names (:mod:`differ.similar`: the checkpoint's pages most like it, wherever they are)
    and keep whichever compresses smallest. Used for images whose base the source was given an
    index of, in the base-relative walk; the target accepts it whenever it has that base."""
    max_similar: int = 4
    """Most candidates tried per leaf (one zstd of the leaf's XOR each)."""
    similar_min_bytes: int = 256
    """Try candidates only for a leaf whose best answer so far compresses to more than this: the
    leaves already sent in a few dozen bytes (a counter, a pointer) cannot gain what the trial
    compressions cost inside the downtime."""
    delta_with_base: bool = False
    """Target: send fingerprints in a base-relative walk too. Off: there the source sends each
    block whole or XOR its base leaf, whichever compresses smaller; on kept states of a real
    migration fingerprints (64 bytes per leaf) cost more than the deltas saved over that."""
    ref_check_bytes: int = 3
    """Bytes of a reference candidate's digest, beyond the walk's ``digest_bytes``, that the target
    sends with a REF request and the source compares before it confirms (no bytes are sent for a
    confirmed reference, so this is the only check of that leaf before the root): ``digest_bytes``
    + 3 = 8, a false reference among ~1.3 M held leaves for ~3,000 requests ~2^-64 * 4e9 per
    migration, as it was with 8-byte walk digests and none. 749 references on ``notes``: 2.2 KB."""
    check_bytes: int = 0
    """Bytes of a leaf's digest, beyond the walk's ``digest_bytes``, that travel with every block
    for an earlier, stronger per-block check. 0: each block is checked
    against its walk prefix (2^-40 per block to pass wrongly with 5 bytes) and every image against its 32-byte
    root before anything is committed, which is what makes a transfer correct; the 24 bytes per
    block that full digests would add were 14 % of a real migration's wire bytes."""
    base: bool = True
    """Target: offer the base-relative walk for images that have a base (the common checkpoint):
    a node equal to the base's travels as one bit instead of ``digest_bytes``, and a leaf the
    source still holds at the base's content is taken from the target's copy of the base."""
    zstd_level: int = 3
    """Level of the per-leaf trial compressions that pick each leaf's answer (whole, XOR its base
    leaf, XOR a similar one): several per leaf, so kept fast."""
    batch_zstd_level: int = 6
    """Level of each blocks message's body, compressed once per batch. On the kept ``notes`` pair
    (8.5 MB of bodies in 9 batches): level 3 274,840 bytes in 4.7 ms, 6 257,798 in 15.6 ms, 9
    253,015 in 23.4 ms. 6 saves 17 KB (14 ms at 10 Mbit/s) for 11 ms of CPU spread over the
    batches; the receiver is bound by the size the entries declare whatever the level."""
    max_message_bytes: int = 1 << 20
    """Largest wire message; walk and want messages larger than this travel as fragments."""
    max_batch_entries: int = 4096
    """Most answers in one blocks message (answers for references are 1 byte each)."""
    window: int = 8
    """Blocks messages the source emits ahead of the target's acks."""
    max_logical_bytes: int = 256 << 20
    """Largest reassembled (fragmented) message."""
    max_pending_bytes: int = 64 << 20
    """Wire bytes a side holds unprocessed while one of its requests is outstanding (an adapter
    may go on reading while a write or a rehash runs): 8 windows of the default batches. More is a
    :class:`~replay_migrate.errors.ProtocolError`: the peer ignores flow control."""
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
            (0 <= self.ref_check_bytes <= DIGEST_SIZE - MIN_DIGEST_BYTES, "ref_check_bytes"),
            (0 <= self.max_similar <= 16, "max_similar"),
            (0 <= self.similar_min_bytes <= LEAF_SIZE, "similar_min_bytes"),
            (1 <= self.zstd_level <= 22, "zstd_level"),
            (1 <= self.batch_zstd_level <= 22, "batch_zstd_level"),
            (MIN_MESSAGE_BYTES <= self.max_message_bytes <= 1 << 30, "max_message_bytes"),
            (1 <= self.max_batch_entries <= 1 << 20, "max_batch_entries"),
            (1 <= self.window <= 1 << 16, "window"),
            (self.max_message_bytes <= self.max_logical_bytes <= 1 << 34, "max_logical_bytes"),
            (self.max_message_bytes <= self.max_pending_bytes <= 1 << 34, "max_pending_bytes"),
            (1 <= self.max_images <= 256, "max_images"),
            (1 <= self.max_name_len <= 1024, "max_name_len"),
            (1 <= self.max_leaves <= MAX_LEAVES, "max_leaves"),
            (1 <= self.max_size_factor <= 1024, "max_size_factor"),
            (0 <= self.max_size_margin <= self.max_leaves * LEAF_SIZE, "max_size_margin"),
        ]
        for ok, name in checks:
            if not ok:
                raise ValueError(f"ProtocolParams.{name} out of range")

    @property
    def ref_rest(self) -> int:
        """The reference check bytes the target asks for: ``ref_check_bytes``, as many as the
        digest has beyond the walk's prefix."""
        return min(self.ref_check_bytes, DIGEST_SIZE - self.digest_bytes)

    def size_limit(self, own: int) -> int:
        """The largest image size accepted from the peer for an image whose own size (the larger of
        the image's and its base's) is ``own``: see ``max_size_factor``."""
        return min(self.max_leaves * LEAF_SIZE, own * self.max_size_factor + self.max_size_margin)
