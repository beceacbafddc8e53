"""differ.protocol.batch: the target's checks of a blocks message. Every leaf is rebuilt and
verified before anything is written; a body is decompressed only within what its entries need."""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import blake3
import msgpack
import pytest
import zstandard
from diffpair import PAGE, Pair, one, pump, rand, replayed

from differ.merkle import MerkleTree
from differ.protocol import SourceState, TargetState, batch
from replay_migrate.errors import ProtocolError, VerificationError


def corrupt_blocks(offset_from_end: int) -> Callable[[str, int, bytes], bytes | None]:
    def tamper(kind: str, _: int, data: bytes) -> bytes | None:
        if kind != "blocks":
            return data
        raw = bytearray(data)
        raw[len(raw) - offset_from_end] ^= 0x01
        return bytes(raw)

    return tamper


def test_corrupted_block_in_transit_is_rejected_and_nothing_written() -> None:
    b = rand(40 * PAGE)
    a = bytearray(b)
    a[10 * PAGE : 12 * PAGE] = rand(2 * PAGE, 4)  # incompressible: the body travels raw
    pair = Pair({"disk": bytes(a), "memory": rand(8 * PAGE, 1)}, {"disk": b, "memory": rand(8 * PAGE, 2)})
    with pytest.raises(VerificationError):
        pump(pair, corrupt_blocks(100))
    assert pair.data() == b and pair.data("memory") == rand(8 * PAGE, 2)
    assert all(s.aborted and not s.committed and s.writes == 0 for s in pair.sinks.values())
    assert pair.target.state is TargetState.FAILED and pair.source.state is SourceState.FAILED


def test_corrupted_compressed_batch_is_rejected() -> None:
    b = bytes(40 * PAGE)
    a = bytearray(b)
    a[10 * PAGE : 12 * PAGE] = b"abcd" * (PAGE // 2)  # compressible: the body is zstd
    pair = one(bytes(a), rand(40 * PAGE))
    with pytest.raises((ProtocolError, VerificationError)):
        pump(pair, corrupt_blocks(8))
    assert pair.sinks["disk"].aborted and pair.target.state is TargetState.FAILED


def zstd_declaring(size: int, *, rle_blocks: int = 0) -> bytes:
    """A zstd frame whose header declares ``size`` bytes of content (8-byte content-size field,
    128 KiB window), holding ``rle_blocks`` RLE blocks of 128 KiB each (4 bytes apiece), or one
    empty raw block: what a hostile source can send in a few bytes."""
    head = struct.pack("<IBB", 0xFD2FB528, 0xC0, 7 << 3) + struct.pack("<Q", size)
    if not rle_blocks:
        return head + (1).to_bytes(3, "little")  # last, raw, 0 bytes
    body = b"".join(((128 << 10) << 3 | 1 << 1 | (k == rle_blocks - 1)).to_bytes(3, "little") + b"\x00"
                    for k in range(rle_blocks))
    return head + body


def compressible_pair() -> Pair:
    """A transfer whose first blocks message carries a zstd body ("z")."""
    b = bytes(40 * PAGE)
    a = bytearray(b)
    a[10 * PAGE : 14 * PAGE] = b"abcd" * PAGE
    return one(bytes(a), rand(40 * PAGE))


def with_body(make: Callable[[bytes], bytes]) -> Callable[[str, int, bytes], bytes | None]:
    """Replace the compressed body of every blocks message by ``make(its real body)``."""

    def tamper(kind: str, _: int, data: bytes) -> bytes | None:
        if kind != "blocks":
            return data
        msg = msgpack.unpackb(data, raw=False)
        msg["z"] = make(zstandard.ZstdDecompressor().decompress(msg["z"]))
        return bytes(msgpack.packb(msg, use_bin_type=True))

    return tamper


def _zstd(data: bytes, write_content_size: bool = True) -> bytes:
    return bytes(zstandard.ZstdCompressor(write_content_size=write_content_size).compress(data))


@pytest.mark.parametrize(
    "make",
    [
        lambda body: zstd_declaring(1 << 44),  # 17 bytes: python-zstandard allocated 16 TiB → MemoryError
        lambda body: zstd_declaring(1 << 30, rle_blocks=8192),  # 32 KiB that really inflate to 1 GiB
        lambda body: zstd_declaring(len(body), rle_blocks=8),  # declares the right size, inflates to 1 MiB
        lambda body: zstd_declaring(len(body) + 1, rle_blocks=1),
        lambda body: _zstd(body[:-1]),  # one byte short
        lambda body: _zstd(body, write_content_size=False),  # no size declared
        lambda body: _zstd(body) + _zstd(b"x"),  # a second frame after the first
        lambda body: _zstd(body)[:-3],  # cut
    ],
    ids=["16TiB", "1GiB", "inflates-past-its-size", "wrong-size", "short", "no-size", "two-frames", "cut"],
)
def test_decompression_is_bounded_by_the_batch(make: Callable[[bytes], bytes]) -> None:
    """Issue 10 finding 3: python-zstandard ignores ``max_output_size`` when the frame declares a
    content size. A blocks body must declare exactly the size its entries need, in one frame, and
    anything else is a ProtocolError before anything of the declared size is allocated."""
    pair = compressible_pair()
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            pump(pair, with_body(make))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20
    assert pair.target.state is TargetState.FAILED and pair.sinks["disk"].aborted
    assert pair.data() != pair.a["disk"]


def test_an_honest_compressed_body_still_passes() -> None:
    pair = compressible_pair()
    pump(pair, with_body(_zstd))
    assert pair.target.state is TargetState.VERIFIED and pair.data() == pair.a["disk"]


def test_a_stale_base_at_the_target_is_caught_before_writing() -> None:
    """The target's base tree says one thing, its base image holds another: the leaf it would take
    from the base fails its digest check and nothing is written."""
    base = rand(32 * PAGE, seed=11)
    a, b = replayed(base, same=(), differ=(), target_only=(5,))
    stale = bytearray(base)
    stale[5 * PAGE] ^= 1
    pair = one(a, b, bases={"disk": base}, target_bases={"disk": (bytes(stale), MerkleTree.from_bytes(base))})
    with pytest.raises(VerificationError):
        pair.run()
    assert pair.data() == b and pair.sinks["disk"].aborted and not pair.sinks["disk"].committed
    assert pair.sinks["disk"].writes == 0


@pytest.mark.parametrize(("field", "value", "error"), [
    ("o", 1, "does not start where"),
    ("k", b"", "empty blocks message"),
    ("k", b"\x09", "unknown answer kind"),
    ("k", b"\x00", "confirmation of a leaf that was not proposed"),
    ("k", b"\x03", "delta for a leaf without fingerprints"),
    ("k", b"\x04", "XOR against a base"),
    ("h", b"x", "digest, bitmap or similar-leaf bytes"),
    ("xl", b"\x01\x00\x00\x00", "digest, bitmap or similar-leaf bytes"),
    ("xl", b"\x01\x00", "not 4 bytes each"),
    ("xl", b"\x01\x00\x00\x00" * 2, "longer than 4 bytes"),
    ("k", b"\x05", "without its number"),
])
def test_a_batch_that_does_not_fit_the_plan_is_refused_before_its_body(field: str, value: object,
                                                                        error: str) -> None:
    """One leaf, asked for whole (no fingerprints: a new page where the target has zeros)."""
    b = bytes(8 * PAGE)
    a = bytearray(b)
    a[2 * PAGE : 3 * PAGE] = rand(PAGE, 3)
    pair = one(bytes(a), b)

    def tamper(kind: str, _: int, data: bytes) -> bytes | None:
        if kind != "blocks":
            return data
        msg = msgpack.unpackb(data, raw=False)
        msg[field] = value
        return bytes(msgpack.packb(msg, use_bin_type=True))

    with pytest.raises(ProtocolError, match=error):
        pump(pair, tamper)
    assert pair.sinks["disk"].writes == 0 and pair.sinks["disk"].aborted


def moved_pair() -> Pair:
    """Base-relative: the source holds base page 20, changed in 40 bytes, at page 3 (the target
    holds something else there); with the source's similarity index of the base (XSIM)."""
    base = rand(32 * PAGE, seed=21)
    a, b = bytearray(base), bytearray(base)
    page = bytearray(base[20 * PAGE : 21 * PAGE])
    page[100:140] = bytes(40)
    a[3 * PAGE : 4 * PAGE] = page
    b[3 * PAGE : 4 * PAGE] = rand(PAGE, 22)
    return one(bytes(a), bytes(b), bases={"disk": base}, similar=True)


def test_a_leaf_like_another_base_leaf_travels_xor_it() -> None:
    pair = moved_pair()
    stats = pair.run()
    assert stats.images["disk"].xsim == 1 and stats.block_bytes < 200
    assert pair.data() == pair.a["disk"]


@pytest.mark.parametrize(("other", "error"), [
    (32, "a base leaf the target does not have"),           # past the base's end
    (1 << 31, "a base leaf the target does not have"),
])
def test_an_xor_against_a_base_leaf_the_target_lacks_is_refused(other: int, error: str) -> None:
    pair = moved_pair()

    def tamper(kind: str, _: int, data: bytes) -> bytes | None:
        if kind != "blocks":
            return data
        msg = msgpack.unpackb(data, raw=False)
        assert msg["k"] == b"\x05"
        msg["xl"] = struct.pack("<I", other)
        return bytes(msgpack.packb(msg, use_bin_type=True))

    with pytest.raises(ProtocolError, match=error):
        pump(pair, tamper)
    assert pair.sinks["disk"].writes == 0 and pair.sinks["disk"].aborted


def test_an_xor_against_the_wrong_base_leaf_fails_its_digest_check() -> None:
    """A base leaf the target has, but not the one the source XORed with: the rebuilt leaf does
    not match the walk's digest and nothing is written."""
    pair = moved_pair()

    def tamper(kind: str, _: int, data: bytes) -> bytes | None:
        if kind != "blocks":
            return data
        msg = msgpack.unpackb(data, raw=False)
        msg["xl"] = struct.pack("<I", 19)
        return bytes(msgpack.packb(msg, use_bin_type=True))

    with pytest.raises(VerificationError):
        pump(pair, tamper)
    assert pair.sinks["disk"].writes == 0 and pair.sinks["disk"].aborted


def test_an_xor_against_a_similar_leaf_needs_the_base_relative_walk() -> None:
    """Without a base the target has nothing to XOR against."""
    b = bytes(8 * PAGE)
    a = bytearray(b)
    a[2 * PAGE : 3 * PAGE] = rand(PAGE, 3)
    pair = one(bytes(a), b)

    def tamper(kind: str, _: int, data: bytes) -> bytes | None:
        if kind != "blocks":
            return data
        msg = msgpack.unpackb(data, raw=False)
        msg["k"], msg["xl"] = b"\x05", struct.pack("<I", 0)
        return bytes(msgpack.packb(msg, use_bin_type=True))

    with pytest.raises(ProtocolError, match="a base leaf the target does not have"):
        pump(pair, tamper)


def test_a_leaf_held_or_received_once_is_hashed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Four leaves refer to one leaf the target holds, three carry one new content (one sent, two
    duplicates): the batch hashes each content once, not once per position."""
    hashed: list[bytes] = []

    def counting(data: bytes = b"", **kw: Any) -> Any:
        hashed.append(bytes(data))
        return blake3.blake3(data, **kw)

    monkeypatch.setattr(batch, "blake3", SimpleNamespace(blake3=counting))
    b = rand(64 * PAGE)
    a = bytearray(b)
    held, new = b[3 * PAGE : 4 * PAGE], rand(PAGE, 9)
    for k in (10, 20, 30, 40):
        a[k * PAGE : (k + 1) * PAGE] = held
    for k in (12, 22, 32):
        a[k * PAGE : (k + 1) * PAGE] = new
    pair = one(bytes(a), b)
    img = pair.run().images["disk"]
    assert (img.referenced, img.duplicate, img.full, pair.target.stats.batches) == (4, 2, 1, 1)
    assert pair.data() == bytes(a)
    assert sorted(hashed) == sorted([held, new])
