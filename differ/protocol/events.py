"""What a protocol core tells its caller: events (what happened), requests (I/O it needs done) and
the results an adapter answers requests with.

A core has at most one request outstanding (:meth:`~differ.protocol.endpoint.Endpoint.next_request`);
the adapter fulfils it and hands the result back (``receive_result``), built with the request's own
``answer``/``done`` so that its id matches. Meanwhile wire messages are queued by the core, not by
the adapter. Requests name what they touch (an image, its base, a reference, by name), never an
object: the core holds trees only, the adapter holds the block sources and sinks.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from differ.merkle import MerkleTree
from differ.protocol.messages import FailCode

# -- events --------------------------------------------------------------------------------------


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


# -- requests ------------------------------------------------------------------------------------


class Of(enum.Enum):
    """What a read request reads."""

    IMAGE = "image"
    """One of the side's images as it was before the transfer: a target never reads a leaf it
    asked to be written (what a later reference needs of it is read before the write), so its
    adapter may patch the image in place."""
    BASE = "base"
    """An image's base: the same image at the checkpoint both sides started from."""
    REFERENCE = "reference"
    """Other content the target holds (the checkpoint's memory image), by the name it was given."""
    PATCHED = "patched"
    """(Target) one of its images as patched so far: the leaves it wrote, read back to verify them
    (a write that did not land shows there)."""


@dataclass(frozen=True)
class Holding:
    of: Of
    name: str


@dataclass(frozen=True)
class ReadLeaves:
    """Read ``leaves`` (ascending) of ``holding``: each as the block source returns it (a short last
    leaf short). The core fits, checks and hashes them itself."""

    holding: Holding
    leaves: tuple[int, ...]
    id: int = 0

    def answer(self, blocks: Sequence[bytes]) -> LeavesRead:
        return LeavesRead(self.id, tuple(blocks))


@dataclass(frozen=True)
class SetSize:
    """(Target) make the patched copy of image ``name`` ``size`` bytes long."""

    name: str
    size: int
    id: int = 0

    def done(self) -> Done:
        return Done(self.id)


@dataclass(frozen=True)
class LeafWrite:
    name: str
    leaf: int
    data: bytes | None
    """The leaf's bytes (its full length), or None for zeros (a hole where the format allows)."""


@dataclass(frozen=True)
class WriteLeaves:
    """(Target) write verified leaves into the patched copies: every one was checked against the
    source's digest before this request was made."""

    writes: tuple[LeafWrite, ...]
    id: int = 0

    def done(self) -> Done:
        return Done(self.id)


@dataclass(frozen=True)
class HashImage:
    """(Target) the root of the patched copy of image ``name`` in a tree of ``fanout``: compared
    with the source's 32-byte root before anything is committed. The adapter may answer with the
    whole tree too: once verified it describes the committed image (``Target.verified_trees``, which
    the next common checkpoint keeps instead of hashing the image again)."""

    name: str
    fanout: int
    id: int = 0

    def answer(self, root: bytes, tree: MerkleTree | None = None) -> Hashed:
        return Hashed(self.id, root, tree)


@dataclass(frozen=True)
class Commit:
    """(Target) replace each image named by its patched copy: every root has been verified."""

    names: tuple[str, ...]
    id: int = 0

    def done(self) -> Done:
        return Done(self.id)


@dataclass(frozen=True)
class Abort:
    """(Target) drop the patched copies; the images stay as they were. The only request of a
    FAILED side; an adapter fulfils it even while it is unwinding from an error."""

    names: tuple[str, ...]
    id: int = 0

    def done(self) -> Done:
        return Done(self.id)


Request = ReadLeaves | SetSize | WriteLeaves | HashImage | Commit | Abort


# -- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeavesRead:
    id: int
    blocks: tuple[bytes, ...] = field(repr=False)


@dataclass(frozen=True)
class Hashed:
    id: int
    root: bytes
    tree: MerkleTree | None = field(default=None, repr=False, compare=False)
    """The patched image's tree (optional; its root must be ``root``)."""


@dataclass(frozen=True)
class Done:
    id: int


Result = LeavesRead | Hashed | Done

RESULT_OF: dict[type, type] = {
    ReadLeaves: LeavesRead,
    SetSize: Done,
    WriteLeaves: Done,
    HashImage: Hashed,
    Commit: Done,
    Abort: Done,
}
"""The result type that answers each request type."""
