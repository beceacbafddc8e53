"""What a transfer cost and how each leaf got across (DESIGN.md §9), per side and merged.

A side counts what it *sends*; :meth:`TransferStats.merged` adds the two sides' counts. How each
field merges is declared with the field (``merge=`` metadata, else by its type: numbers add,
flags or, maps merge per key), so a new counter cannot be forgotten by the merge.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


def _larger(a: int, b: int) -> int:
    """For counts both sides know alike (an image's leaves, the divergent leaves): not added."""
    return max(a, b)


def _most(default: int = 0) -> Any:
    return field(default=default, metadata={"merge": _larger})


def merge(a: T, b: T) -> T:
    """A dataclass instance whose every field is ``a``'s and ``b``'s merged (see the module)."""
    assert dataclasses.is_dataclass(a) and not isinstance(a, type)
    out = type(a)()
    for f in dataclasses.fields(a):
        setattr(out, f.name, _merge_value(getattr(a, f.name), getattr(b, f.name), f.metadata.get("merge")))
    return out


def _merge_value(x: Any, y: Any, how: Callable[[Any, Any], Any] | None) -> Any:
    if how is not None:
        return how(x, y)
    if isinstance(x, bool):
        return x or y
    if isinstance(x, int):
        return x + y
    if isinstance(x, dict):
        out = {}
        for key in {*x, *y}:
            if key in x and key in y:
                out[key] = _merge_value(x[key], y[key], None)
            else:  # a copy: the merged stats must not share a counter with either side's
                out[key] = copy.deepcopy(x[key] if key in x else y[key])
        return out
    if dataclasses.is_dataclass(x):
        return merge(x, y)
    raise TypeError(f"no merge rule for {type(x).__name__}")


@dataclass
class ImageStats:
    leaves: int = _most()
    divergent: int = _most()
    referenced: int = 0
    duplicate: int = 0
    zero: int = 0
    base: int = 0
    """Leaves the source still held at the base's content, taken from the target's base."""
    full: int = 0
    delta: int = 0
    xbase: int = 0
    """Leaves sent as XOR against the base's leaf."""
    xsim: int = 0
    """Leaves sent as XOR against another leaf of the base, the most similar one by sketch."""
    plain_bytes: int = 0
    """zstd of every divergent leaf on its own (what shipping the divergent blocks would cost);
    measured by the source when asked (``measure_plain``)."""
    resized: bool = False

    @property
    def referenced_blocks(self) -> int:
        """Leaves the target already held: references, duplicates, and its base's copy."""
        return self.referenced + self.duplicate + self.base

    @property
    def delta_blocks(self) -> int:
        """Leaves sent as changes: against the target's block (delta) or a base leaf (XOR)."""
        return self.delta + self.xbase + self.xsim


@dataclass(frozen=True)
class TransferSummary:
    """The few numbers of a transfer a report shows (the migration's report takes every one)."""

    hash_bytes: int
    block_bytes: int
    fingerprint_bytes: int
    kind_bytes: int
    framing_bytes: int
    round_trips: int
    divergent_blocks: dict[str, int]
    referenced_blocks: int
    delta_blocks: int
    full_blocks: int


@dataclass
class TransferStats:
    """What a transfer cost (DESIGN.md §9). A side counts what it *sends*; :meth:`merged` adds the
    two sides' counts (what ``differ.transfer.run_local`` returns)."""

    images: dict[str, ImageStats] = field(default_factory=dict)
    root_bytes: int = 0
    walk_digest_bytes: int = 0
    bitmap_bytes: int = 0
    leaf_digest_bytes: int = 0
    """Rests of leaf digests: with every block (source) and with every confirmation (target)."""
    fingerprint_bytes: int = 0
    block_bytes: int = 0
    """Block payload on the wire: compressed batch bodies plus delta sub-block bitmaps."""
    kind_bytes: int = 0
    """Per-leaf request and answer kinds (the want's ``k``, its duplicate positions ``u``, every
    blocks message's ``k``): one byte per divergent leaf each way."""
    wire_bytes: dict[str, int] = field(default_factory=dict)
    messages: dict[str, int] = field(default_factory=dict)
    received_bytes: int = 0
    round_trips: int = 0
    """Messages the target sent and had to wait for an answer to (hello, walks, want)."""
    batches: int = 0
    duplicate_batches: int = 0
    flat_hash_bytes: int = _most()
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
    def framing_bytes(self) -> int:
        """What the messages cost beyond the counted content: msgpack envelopes and field names,
        the walk's level numbers, sizes and names in hello and tree, acks, fragments."""
        return self.wire_total - self.hash_bytes - self.fingerprint_bytes - self.block_bytes - self.kind_bytes

    @property
    def plain_bytes(self) -> int:
        return sum(s.plain_bytes for s in self.images.values())

    def merged(self, other: TransferStats) -> TransferStats:
        return merge(self, other)

    def summary(self) -> TransferSummary:
        imgs = self.images.values()
        return TransferSummary(
            hash_bytes=self.hash_bytes,
            block_bytes=self.block_bytes,
            fingerprint_bytes=self.fingerprint_bytes,
            kind_bytes=self.kind_bytes,
            framing_bytes=self.framing_bytes,
            round_trips=self.round_trips,
            divergent_blocks={name: s.divergent for name, s in self.images.items()},
            referenced_blocks=sum(s.referenced_blocks for s in imgs),
            delta_blocks=sum(s.delta_blocks for s in imgs),
            full_blocks=sum(s.full for s in imgs),
        )

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hash_bytes"] = self.hash_bytes
        d["wire_total"] = self.wire_total
        d["framing_bytes"] = self.framing_bytes
        d["plain_bytes"] = self.plain_bytes
        return d
