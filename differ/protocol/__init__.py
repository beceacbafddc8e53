"""The tree-walk and block-transfer protocol, sans-I/O: bytes and results in; events, bytes and
requests out.

A :class:`Source` holds the trees of images A; a :class:`Target` holds those of images B and of the
content it can reference (the shared base or checkpoint). Neither reads, writes or hashes an image:
each asks its adapter to (:mod:`differ.protocol.events`: read these leaves, set this size, write
these verified leaves, hash this patched image, commit, abort) and goes on when the result comes
back, one request at a time. The adapters (``differ.transfer`` blocking, ``migration.diffio``
asyncio, whose requests run in worker threads) hold the block sources and sinks. Both sides
exchange msgpack messages ``{"t": type, "v": version, ...}``; each side's state machine is a table
(:mod:`differ.protocol._state`) that refuses a message in the wrong state (:class:`ProtocolError`,
state FAILED, the target's patched copies aborted).

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
* **truncated walk digests** (``digest_bytes``, 5 by default): a node collision only makes the walk
  miss a difference, which the final root check (full 32-byte digests) turns into FAILED (~2^-40
  per differing node compared; a reference the target finds by the prefix is confirmed with
  ``ref_check_bytes`` more).
* **base-relative walk**: both sides started from the same checkpoint, so when both hold its trees
  (the *base*, same root) a node whose digest equals the base's travels as one bit. Replay makes
  both sides change mostly the same pages, so the walk still descends into them, but each level's
  untouched siblings cost a bit instead of ``digest_bytes``; a leaf the source holds at the base's
  content while the target changed it is taken from the target's copy of the base.
* **requests decided by the target**: for a differing leaf whose source digest prefix the target
  already holds (own images, references, base, or another leaf earlier in this transfer) it asks
  for a *confirmation* (a reference with ``ref_check_bytes`` more of its candidate's digest) and
  the source answers with one byte; zero leaves need no bytes at all. Otherwise it asks for the
  block, with keyed fingerprints of its own block's sub-blocks so the source can send only the
  sub-blocks that differ (a *delta*: DESIGN.md §5 found half of divergent pages differ in ≤ 8
  bytes).
* **verification**: the target hashes every block it rebuilds and checks it against the source's
  walk prefix (plus ``check_bytes``) before it asks for it to be written, then asks for each
  patched image's root and compares it with the source's 32-byte root before it asks for anything
  to be committed: a wrong block can never be committed.

Sizes a peer announces are bounded by what this side expects before anything is allocated: the
target accepts an image size up to ``max_size_factor`` * its own image's (or base's) size +
``max_size_margin`` (never above ``max_leaves``), a fragmented message up to the largest message of
its kind this side's images allow, and a batch body only as a zstd frame that declares exactly the
bytes its entries need (:func:`differ.bounded.decompress_exact`). The source allocates only by its
own images. See :class:`ProtocolParams`.

Only the block phase is resumable (:meth:`Target.resume` → the source re-emits batches from the
target's next expected one; duplicates are ignored): the walk is a few small messages, restart it.

Modules: ``params`` (limits), ``messages`` (schema, field validators), ``framing`` (fragments,
bounded decoding), ``walk``, ``index`` (the target's content index), ``leaves`` (fingerprints,
XOR), ``stats``, ``events`` (events, requests, results), ``_state`` (the tables), ``endpoint``
(what both sides share), ``source``, ``target`` with ``want`` (its requests) and ``batch`` (its
verification of a batch).
"""

from differ.protocol._state import SourceState, TargetState
from differ.protocol.endpoint import ImageSpec
from differ.protocol.events import (
    Abort,
    BatchAcked,
    BatchApplied,
    Commit,
    Done,
    Event,
    Hashed,
    HashImage,
    Holding,
    LeafWrite,
    LeavesRead,
    Of,
    PeerFailed,
    ReadLeaves,
    Request,
    Result,
    SetSize,
    Verified,
    WalkDone,
    WriteLeaves,
)
from differ.protocol.messages import FailCode, MsgType, fail_code
from differ.protocol.params import PROTOCOL_VERSION, ProtocolParams
from differ.protocol.source import Source
from differ.protocol.stats import ImageStats, TransferStats, TransferSummary
from differ.protocol.target import Target

__all__ = [
    "PROTOCOL_VERSION",
    "Abort",
    "BatchAcked",
    "BatchApplied",
    "Commit",
    "Done",
    "Event",
    "FailCode",
    "HashImage",
    "Hashed",
    "Holding",
    "ImageSpec",
    "ImageStats",
    "LeafWrite",
    "LeavesRead",
    "MsgType",
    "Of",
    "PeerFailed",
    "ProtocolParams",
    "ReadLeaves",
    "Request",
    "Result",
    "SetSize",
    "Source",
    "SourceState",
    "Target",
    "TargetState",
    "TransferStats",
    "TransferSummary",
    "Verified",
    "WalkDone",
    "WriteLeaves",
    "fail_code",
]
