"""differ.protocol.stats: both sides' counts merge by the fields' own rules, none listed by hand."""

from __future__ import annotations

import dataclasses
from typing import TypeVar

from differ.protocol import ImageStats, TransferStats

T = TypeVar("T", ImageStats, TransferStats)


def int_fields(obj: object) -> list[str]:
    return [f.name for f in dataclasses.fields(obj) if f.type in ("int", int)]  # type: ignore[arg-type]


def numbered(obj: T, start: int) -> T:
    """``obj`` with every int field set to a number of its own."""
    for k, name in enumerate(int_fields(obj)):
        setattr(obj, name, start + k)
    return obj


def test_every_counter_merges_without_being_listed() -> None:
    """Every int field adds, but for the ones both sides know alike (the larger); flags or; maps
    merge per key; an image only one side counted is copied, not shared."""
    a = numbered(TransferStats(wire_bytes={"walk": 5}, messages={"walk": 1}, dry_run=True), 1)
    b = numbered(TransferStats(wire_bytes={"walk": 7, "want": 2}, verified=True), 100)
    a.images["disk"] = numbered(ImageStats(), 1)
    b.images["disk"] = numbered(ImageStats(resized=True), 100)
    b.images["memory"] = ImageStats(leaves=9)
    m = a.merged(b)
    assert len(int_fields(m)) == 12 and len(int_fields(ImageStats())) == 11  # the test sees them all
    for name in int_fields(m):
        va, vb = getattr(a, name), getattr(b, name)
        assert getattr(m, name) == (max(va, vb) if name == "flat_hash_bytes" else va + vb), name
    for name in int_fields(ImageStats()):
        va, vb = getattr(a.images["disk"], name), getattr(b.images["disk"], name)
        assert getattr(m.images["disk"], name) == (max(va, vb) if name in ("leaves", "divergent") else va + vb), name
    assert m.images["disk"].resized and m.dry_run and m.verified
    assert m.wire_bytes == {"walk": 12, "want": 2} and m.messages == {"walk": 1}
    assert m.images["memory"] == b.images["memory"] and m.images["memory"] is not b.images["memory"]
    assert m.wire_total == 14 and m.hash_bytes == sum(
        getattr(m, f) for f in ("root_bytes", "walk_digest_bytes", "bitmap_bytes", "leaf_digest_bytes"))
    assert m.framing_bytes == m.wire_total - m.hash_bytes - m.fingerprint_bytes - m.block_bytes - m.kind_bytes


def test_summary_and_dict() -> None:
    s = TransferStats(images={"a": ImageStats(divergent=4, referenced=1, duplicate=1, base=1, delta=1, xbase=2,
                                              full=3, plain_bytes=10)}, block_bytes=7)
    summary = s.summary()
    assert (summary.referenced_blocks, summary.delta_blocks, summary.full_blocks) == (3, 3, 3)
    assert summary.divergent_blocks == {"a": 4} and summary.block_bytes == 7
    d = s.as_dict()
    assert d["plain_bytes"] == 10 and d["images"]["a"]["full"] == 3 and "wire_total" in d
