"""differ.protocol: the sans-I/O tree walk and block transfer, driven in memory."""

from __future__ import annotations

import random
import struct
import tracemalloc
from collections.abc import Callable

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz_targets import fuzz_one
from differ.memsource import MemoryImage, MemorySink, MemorySource
from differ.merkle import MerkleTree
from differ.protocol import (
    PROTOCOL_VERSION,
    BatchApplied,
    FailCode,
    PeerFailed,
    ProtocolParams,
    SourceState,
    TargetState,
    TransferStats,
)
from differ.source import LEAF_SIZE
from differ.sync import sync_local
from differ.transfer import ReferenceImage, SourceImage, TargetImage, run_local
from differ.transfer import blocking_source as Source
from differ.transfer import blocking_target as Target
from replay_migrate.errors import LocalProtocolError, ProtocolError, ReplayMigrateError, VerificationError

KEY = bytes(range(32))
PAGE = LEAF_SIZE
V = PROTOCOL_VERSION


def rand(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


def pages(*chunks: bytes) -> bytes:
    return b"".join(chunks)


class Pair:
    """Source images A and target images B (name → bytes), with memory sinks."""

    def __init__(
        self,
        a: dict[str, bytes],
        b: dict[str, bytes],
        *,
        fanout: int = 4,
        params: ProtocolParams | None = None,
        references: tuple[bytes, ...] = (),
        bases: dict[str, bytes] | None = None,
        target_bases: dict[str, tuple[bytes, MerkleTree]] | None = None,
        dry_run: bool = False,
        measure_plain: bool = False,
        sinks: dict[str, type[MemorySink]] | None = None,
    ) -> None:
        """``bases``: the common checkpoint's version of each image, held by both sides;
        ``target_bases``: the target's (content, tree) instead, to make it disagree."""
        self.a = a
        bases = bases or {}
        t_bases = target_bases or {name: (data, MerkleTree.from_bytes(data)) for name, data in bases.items()}
        self.images = {name: MemoryImage(data) for name, data in b.items()}
        self.sinks: dict[str, MemorySink] = {name: (sinks or {}).get(name, MemorySink)(im)
                                             for name, im in self.images.items()}
        self.source = Source(
            [
                SourceImage(name, MemorySource(data), MerkleTree.from_bytes(data, fanout), base=_base(bases.get(name)))
                for name, data in a.items()
            ],
            params,
            measure_plain=measure_plain,
        )
        self.target = Target(
            [
                TargetImage(
                    name,
                    im.source(),
                    MerkleTree.from_bytes(im.data, fanout),
                    self.sinks[name],
                    base=ReferenceImage(MemorySource(t_bases[name][0]), t_bases[name][1]) if name in t_bases else None,
                )
                for name, im in self.images.items()
            ],
            params,
            references=[ReferenceImage(MemorySource(r), MerkleTree.from_bytes(r)) for r in references],
            dry_run=dry_run,
            key=KEY,
        )

    def run(self) -> TransferStats:
        return run_local(self.source, self.target)

    def data(self, name: str = "disk") -> bytes:
        return self.images[name].data


def _base(data: bytes | None) -> ReferenceImage | None:
    return None if data is None else ReferenceImage(MemorySource(data), MerkleTree.from_bytes(data))


def one(a: bytes, b: bytes, **kw: object) -> Pair:
    return Pair({"disk": a}, {"disk": b}, **kw)  # type: ignore[arg-type]


def mtype(data: bytes) -> str:
    msg = msgpack.unpackb(data, raw=False)
    return str(msg["t"] if msg["t"] != "frag" else msg["lt"])


def pump(
    pair: Pair,
    tamper: Callable[[str, int, bytes], bytes | None] | None = None,
    *,
    max_rounds: int = 10_000,
) -> list[tuple[str, bytes]]:
    """Like run_local, but each source→target message goes through ``tamper(type, index, data)``
    (return the bytes to deliver, or None to drop). Returns the log of delivered messages."""
    src, tgt = pair.source, pair.target
    tgt.start()
    log: list[tuple[str, bytes]] = []
    k = 0
    for _ in range(max_rounds):
        moved = False
        for data in tgt.data_to_send():
            moved = True
            log.append(("T", data))
            src.receive_data(data)
        for data in src.data_to_send():
            moved = True
            out = tamper(mtype(data), k, data) if tamper else data
            k += 1
            if out is None:
                continue
            log.append(("S", out))
            try:
                tgt.receive_data(out)
            except ReplayMigrateError:
                for back in tgt.data_to_send():
                    src.receive_data(back)
                raise
        if not moved:
            break
    return log


# -- what travels ------------------------------------------------------------------------------------


def test_identical_images_ship_nothing_but_roots() -> None:
    a = rand(100 * PAGE + 5)
    pair = one(a, a)
    stats = pair.run()
    assert pair.data() == a and pair.sinks["disk"].committed
    assert stats.verified and stats.block_bytes == 0 and stats.walk_digest_bytes == 0
    assert stats.leaf_digest_bytes == 0 and stats.fingerprint_bytes == 0
    assert set(stats.messages) == {"hello", "tree", "want", "end", "verified"}
    assert stats.wire_total < 300
    assert stats.images["disk"].divergent == 0 and stats.round_trips == 2
    assert pair.sinks["disk"].writes == 0


def test_one_changed_page_ships_one_block() -> None:
    b = rand(257 * PAGE)
    a = bytearray(b)
    a[77 * PAGE : 78 * PAGE] = rand(PAGE, seed=9)
    pair = one(bytes(a), b, fanout=16)
    stats = pair.run()
    assert pair.data() == bytes(a)
    img = stats.images["disk"]
    assert (img.divergent, img.full, img.delta, img.referenced) == (1, 1, 0, 0)
    assert PAGE <= stats.block_bytes < PAGE + 64
    assert pair.sinks["disk"].writes == 1


def test_small_change_travels_as_delta() -> None:
    b = rand(64 * PAGE)
    a = bytearray(b)
    a[5 * PAGE + 1000 : 5 * PAGE + 1008] = b"\xff" * 8
    pair = one(bytes(a), b)
    stats = pair.run()
    assert pair.data() == bytes(a)
    assert stats.images["disk"].delta == 1
    assert stats.block_bytes < 300  # one 256-byte sub-block (zstd), not 4 KiB
    assert stats.fingerprint_bytes == 16 * 4


def test_moved_pages_become_references() -> None:
    b = rand(50 * PAGE)
    a = bytearray(b)
    a[3 * PAGE : 4 * PAGE], a[10 * PAGE : 11 * PAGE] = b[10 * PAGE : 11 * PAGE], b[3 * PAGE : 4 * PAGE]
    a[40 * PAGE : 41 * PAGE] = b[20 * PAGE : 21 * PAGE]
    pair = one(bytes(a), b)
    stats = pair.run()
    assert pair.data() == bytes(a)
    img = stats.images["disk"]
    assert img.divergent == 3 and img.referenced == 3 and stats.block_bytes == 0


def test_references_from_a_base_image() -> None:
    base = rand(8 * PAGE, seed=5)
    b = rand(20 * PAGE)
    a = bytearray(b)
    a[2 * PAGE : 4 * PAGE] = base[6 * PAGE : 8 * PAGE]
    pair = one(bytes(a), b, references=(base,))
    stats = pair.run()
    assert pair.data() == bytes(a) and stats.images["disk"].referenced == 2 and stats.block_bytes == 0


# -- the base-relative walk (both sides started from one checkpoint) --------------------------------


def replayed(base: bytes, *, same: tuple[int, ...], differ: tuple[int, ...], target_only: tuple[int, ...],
             source_only: tuple[int, ...] = ()) -> tuple[bytes, bytes]:
    """(source, target) grown from ``base``: pages changed alike, changed differently, changed by
    the target alone (the source kept the base's), changed by the source alone."""
    a, b = bytearray(base), bytearray(base)
    for i in same:
        a[i * PAGE : (i + 1) * PAGE] = b[i * PAGE : (i + 1) * PAGE] = rand(PAGE, 100 + i)
    for i in differ:
        a[i * PAGE : (i + 1) * PAGE], b[i * PAGE : (i + 1) * PAGE] = rand(PAGE, 200 + i), rand(PAGE, 300 + i)
    for i in target_only:
        b[i * PAGE : (i + 1) * PAGE] = rand(PAGE, 400 + i)
    for i in source_only:
        a[i * PAGE : (i + 1) * PAGE] = rand(PAGE, 500 + i)
    return bytes(a), bytes(b)


def test_base_relative_walk_costs_bits_where_both_kept_the_base() -> None:
    base = rand(1024 * PAGE, seed=7)
    a, b = replayed(base, same=(1, 100, 500), differ=(3, 300, 900), target_only=(40, 640), source_only=(70,))
    plain = one(a, b, fanout=16)
    plain_stats = plain.run()
    pair = one(a, b, fanout=16, bases={"disk": base})
    stats = pair.run()
    assert pair.data() == a and pair.sinks["disk"].committed and plain.data() == a
    img = stats.images["disk"]
    assert img.divergent == plain_stats.images["disk"].divergent == 6
    assert img.base == 2   # the target's own changes are undone from its copy of the base: no bytes
    assert stats.walk_digest_bytes < plain_stats.walk_digest_bytes / 4
    assert stats.wire_total < plain_stats.wire_total


def test_a_page_changed_a_little_since_the_base_travels_as_xor() -> None:
    base = rand(64 * PAGE, seed=8)
    a, b = bytearray(base), bytearray(base)
    a[9 * PAGE + 100 : 9 * PAGE + 110] = b"\x01" * 10        # the source edited a few bytes
    b[9 * PAGE : 10 * PAGE] = rand(PAGE, 99)                # the target wrote something else there
    pair = one(bytes(a), bytes(b), bases={"disk": base})
    stats = pair.run()
    assert pair.data() == bytes(a)
    assert stats.images["disk"].xbase == 1 and stats.block_bytes < 100
    assert stats.fingerprint_bytes == 0         # no fingerprints in a base-relative walk by default
    with_fp = one(bytes(a), bytes(b), bases={"disk": base}, params=ProtocolParams(delta_with_base=True))
    assert with_fp.run().fingerprint_bytes == 16 * 4 and with_fp.data() == bytes(a)


def test_a_base_the_sides_do_not_share_is_not_used() -> None:
    base = rand(32 * PAGE, seed=9)
    a, b = replayed(base, same=(), differ=(2,), target_only=(5,))
    other = rand(32 * PAGE, seed=10)
    pair = one(a, b, bases={"disk": base}, target_bases={"disk": (other, MerkleTree.from_bytes(other))})
    stats = pair.run()
    assert pair.data() == a and stats.images["disk"].base == 0 and stats.images["disk"].divergent == 2


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


def test_check_bytes_add_digest_bytes_per_block() -> None:
    base = rand(32 * PAGE, seed=12)
    a, b = replayed(base, same=(), differ=(1, 2, 3), target_only=())
    pair = one(a, b, params=ProtocolParams(check_bytes=24))
    stats = pair.run()
    assert pair.data() == a and stats.leaf_digest_bytes == 3 * 24
    default = one(a, b)
    assert default.run().leaf_digest_bytes == 0 and default.data() == a


def test_base_requests_in_a_walk_without_base_are_refused() -> None:
    base = rand(16 * PAGE, seed=13)
    a, b = replayed(base, same=(), differ=(4,), target_only=())

    pair = one(a, b)                                    # no base on either side
    pair.target.start()
    while True:
        (out,) = pair.target.data_to_send()
        if mtype(out) == "want":
            break
        pair.source.receive_data(out)
        for m in pair.source.data_to_send():
            pair.target.receive_data(m)
    want = msgpack.unpackb(out)
    want["p"][0]["k"] = bytes([5])                      # Req.BASE
    with pytest.raises(ProtocolError):
        pair.source.receive_data(msgpack.packb(want))


def test_duplicate_new_pages_travel_once() -> None:
    b = rand(30 * PAGE)
    a = bytearray(b)
    new = rand(PAGE, seed=3)
    for i in (4, 9, 17, 25):
        a[i * PAGE : (i + 1) * PAGE] = new
    pair = one(bytes(a), b)
    stats = pair.run()
    assert pair.data() == bytes(a)
    img = stats.images["disk"]
    assert img.full == 1 and img.duplicate == 3
    assert stats.block_bytes < PAGE + 64


def test_zero_pages_and_holes() -> None:
    b = rand(32 * PAGE)
    a = bytearray(b)
    a[5 * PAGE : 9 * PAGE] = bytes(4 * PAGE)  # source zeroed pages: flags only
    b2 = bytearray(b)
    b2[20 * PAGE : 22 * PAGE] = bytes(2 * PAGE)  # target holes the source has data for
    pair = one(bytes(a), bytes(b2))
    stats = pair.run()
    assert pair.data() == bytes(a)
    img = stats.images["disk"]
    assert img.zero == 4 and img.full == 2 and img.delta == 0  # no fingerprints against a hole
    assert stats.block_bytes < 2 * PAGE + 64


@pytest.mark.parametrize(
    ("a_size", "b_size"),
    [
        (10 * PAGE, 14 * PAGE),
        (14 * PAGE, 10 * PAGE),
        (10 * PAGE + 123, 10 * PAGE),
        (10 * PAGE, 10 * PAGE + 123),
        (10 * PAGE + 7, 10 * PAGE + 3000),
        (0, 5 * PAGE),
        (5 * PAGE, 0),
        (1, 0),
        (1, 1),
    ],
)
def test_images_of_different_sizes(a_size: int, b_size: int) -> None:
    common = rand(max(a_size, b_size), seed=1)
    a, b = common[:a_size], common[:b_size]
    pair = one(a, b, fanout=3)
    stats = pair.run()
    assert pair.data() == a and stats.verified
    assert stats.images["disk"].resized == (a_size != b_size)


def test_grown_memory_image_ships_no_zero_tail() -> None:
    b = rand(16 * PAGE)
    a = b + bytes(1000 * PAGE)
    stats = one(a, b).run()
    assert stats.images["disk"].divergent == 0 and stats.block_bytes == 0 and stats.wire_total < 400


def test_several_images_in_one_transfer() -> None:
    mem_b, disk_b = rand(64 * PAGE, 1), rand(40 * PAGE, 2)
    mem_a = bytearray(mem_b)
    mem_a[PAGE : 2 * PAGE] = disk_b[7 * PAGE : 8 * PAGE]  # a disk block shows up in memory (page cache)
    disk_a = bytearray(disk_b)
    disk_a[39 * PAGE + 17] ^= 0x10
    pair = Pair({"memory": bytes(mem_a), "disk": bytes(disk_a)}, {"disk": disk_b, "memory": mem_b}, fanout=16)
    stats = pair.run()
    assert pair.data("memory") == bytes(mem_a) and pair.data("disk") == bytes(disk_a)
    assert stats.images["memory"].referenced == 1 and stats.images["disk"].delta == 1


def test_ping_pong_walk_round_trips() -> None:
    """One changed leaf at depth 5 (fan-out 4, 1024 leaves): hello, 2 walks, want = 4 round trips
    (a walk answering with bitmaps only would need 7)."""
    b = rand(1024 * PAGE)
    a = bytearray(b)
    a[500 * PAGE] ^= 1
    stats = one(bytes(a), b).run()
    assert stats.round_trips == 4 and stats.images["disk"].divergent == 1
    assert stats.walk_digest_bytes == 5 * 4 * 8  # four children per level, 8-byte digests


def test_dry_run_writes_nothing_and_counts_the_same() -> None:
    b = rand(80 * PAGE)
    a = bytearray(b)
    for i in range(0, 80, 7):
        a[i * PAGE + 9] ^= 1
    a[3 * PAGE : 4 * PAGE] = rand(PAGE, 8)
    dry = one(bytes(a), b, dry_run=True, measure_plain=True)
    d = dry.run()
    assert dry.data() == b and dry.sinks["disk"].writes == 0 and not dry.sinks["disk"].committed
    assert d.verified and d.dry_run
    real = one(bytes(a), b, measure_plain=True)
    r = real.run()
    assert real.data() == bytes(a)
    assert (d.images, d.block_bytes, d.hash_bytes) == (r.images, r.block_bytes, r.hash_bytes)
    assert d.plain_bytes > d.block_bytes


def test_large_walks_are_fragmented_within_the_limit() -> None:
    b = rand(4000 * PAGE)
    a = bytearray(b)
    for i in range(0, 4000, 10):
        a[i * PAGE] ^= 1
    params = ProtocolParams(max_message_bytes=64 << 10, digest_bytes=32)
    pair = one(bytes(a), b, fanout=64, params=params)
    log = pump(pair)
    assert pair.data() == bytes(a) and pair.target.state is TargetState.VERIFIED
    assert max(len(d) for _, d in log) <= 64 << 10
    assert any(msgpack.unpackb(d)["t"] == "frag" for _, d in log)


# -- failures ------------------------------------------------------------------------------------------


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
    assert all(s.aborted and not s.committed for s in pair.sinks.values())
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


def _zstd(data: bytes, **kw: bool) -> bytes:
    return bytes(zstandard.ZstdCompressor(**kw).compress(data))


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


class LyingSink(MemorySink):
    """Writes something else than it is given: only the final root check can see it."""

    def write(self, index: int, data: bytes) -> None:
        super().write(index, bytes([data[0] ^ 1]) + data[1:])


def test_root_mismatch_after_patching_aborts_every_image() -> None:
    b = rand(20 * PAGE)
    a = bytearray(b)
    a[3 * PAGE : 4 * PAGE] = rand(PAGE, 3)
    pair = Pair({"disk": bytes(a), "memory": rand(4 * PAGE, 1)}, {"disk": b, "memory": rand(4 * PAGE, 2)},
                sinks={"disk": LyingSink})
    with pytest.raises(VerificationError):
        pair.run()
    assert pair.data() == b and all(s.aborted and not s.committed for s in pair.sinks.values())


def test_message_in_wrong_state() -> None:
    pair = one(rand(4 * PAGE), rand(4 * PAGE))
    pair.target.start()
    blocks = msgpack.packb({"t": "blocks", "v": V, "n": 0, "o": 0, "k": b"\x02", "h": b"", "dm": b"", "r": b""})
    with pytest.raises(ProtocolError):
        pair.target.receive_data(blocks)
    assert pair.target.state is TargetState.FAILED and pair.sinks["disk"].aborted
    failed = pair.target.data_to_send()
    assert [msgpack.unpackb(m)["t"] for m in failed] == ["failed"]
    # the source hears about it
    events = pair.source.receive_data(failed[0])
    assert events == [PeerFailed(FailCode.PROTOCOL)] and pair.source.state is SourceState.FAILED

    src = one(rand(4 * PAGE), rand(4 * PAGE)).source
    with pytest.raises(ProtocolError):
        src.receive_data(msgpack.packb({"t": "want", "v": V, "p": [None]}))
    assert src.state is SourceState.FAILED


def test_finished_transfer_stays_verified() -> None:
    a = rand(4 * PAGE)
    pair = one(a, rand(4 * PAGE))
    pair.run()
    with pytest.raises(ProtocolError):
        pair.target.receive_data(msgpack.packb({"t": "end", "v": V, "n": 0}))
    assert pair.target.state is TargetState.VERIFIED and pair.data() == a


def hello_bytes(**override: object) -> bytes:
    msg: dict[str, object] = {
        "t": "hello",
        "v": V,
        "db": 8,
        "sb": 256,
        "fb": 4,
        "cb": 0,
        "key": KEY,
        "img": [{"n": "disk", "s": 4 * PAGE, "l": 4, "f": 4, "r": bytes(32)}],
        "br": [None],
    }
    msg.update(override)
    return bytes(msgpack.packb(msg))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        hello_bytes()[:-5],
        hello_bytes() + b"\x00",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"t": "hello"}),
        hello_bytes(v=V + 1),
        hello_bytes(v=1),
        hello_bytes(t="launch"),
        hello_bytes(t=7),
        hello_bytes(db="8"),
        hello_bytes(db=True),
        hello_bytes(db=3),
        hello_bytes(sb=100),
        hello_bytes(key=b"short"),
        hello_bytes(cb=-1),
        hello_bytes(cb=25),
        hello_bytes(br=[]),
        hello_bytes(br=[b"short root"]),
        hello_bytes(br="x"),
        hello_bytes(img=[{"n": "disk", "s": 4 * PAGE, "l": 5, "f": 4, "r": bytes(32)}]),
        hello_bytes(img=[{"n": "disk", "s": 4 * PAGE, "l": 4, "f": 4, "r": bytes(31)}]),
        hello_bytes(img=[{"n": "other", "s": 4 * PAGE, "l": 4, "f": 4, "r": bytes(32)}]),
        hello_bytes(img=[{"n": "disk", "s": -1, "l": 4, "f": 4, "r": bytes(32)}]),
        hello_bytes(img="disk"),
        hello_bytes(img=[None]),
        msgpack.packb({"t": "hello", "v": V, "pad": b"x" * (2 << 20)}),
        msgpack.packb({"t": "frag", "v": V, "lt": "blocks", "i": 0, "n": 2, "d": b"x"}),
        msgpack.packb({"t": "frag", "v": V, "lt": "hello", "i": 1, "n": 2, "d": b"x"}),
    ],
)
def test_malformed_messages_raise_protocol_error(data: bytes) -> None:
    src = one(rand(4 * PAGE), rand(4 * PAGE)).source
    with pytest.raises(ProtocolError):
        src.receive_data(data)
    assert src.state is SourceState.FAILED


def test_tampering_anywhere_never_leaks_other_errors() -> None:
    """Flip one byte of one message, in either direction, many times: the transfer either still
    succeeds with the right bytes (a harmless flip) or fails with ProtocolError/VerificationError,
    the target image untouched."""
    rng = random.Random(7)
    b = rand(60 * PAGE)
    edit = bytearray(b)
    edit[2 * PAGE : 3 * PAGE] = b[40 * PAGE : 41 * PAGE]
    edit[5 * PAGE + 3] ^= 1
    edit[20 * PAGE : 21 * PAGE] = bytes(PAGE)
    edit[33 * PAGE : 34 * PAGE] = rand(PAGE, 5)
    a = bytes(edit) + rand(3000, 6)
    outcomes = {"ok": 0, "failed": 0}
    for trial in range(200):
        pair = one(a, b)
        src, tgt = pair.source, pair.target
        tgt.start()
        target_msg = rng.randrange(12)
        count = 0
        try:
            for _ in range(100):
                moved = False
                for sender, receiver in ((tgt, src), (src, tgt)):
                    for data in sender.data_to_send():
                        moved = True
                        if count == target_msg and data:
                            raw = bytearray(data)
                            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
                            data = bytes(raw)
                        count += 1
                        try:
                            receiver.receive_data(data)
                        except ReplayMigrateError:
                            for back in receiver.data_to_send():
                                if sender.state.value not in ("verified", "failed"):
                                    sender.receive_data(back)
                            raise
                if not moved:
                    break
            assert tgt.state is TargetState.VERIFIED, trial
            assert pair.data() == a
            outcomes["ok"] += 1
        except (ProtocolError, VerificationError):
            if tgt.state is TargetState.VERIFIED:  # only the final "verified" to the source was hit
                assert pair.data() == a
            else:
                assert pair.data() == b and tgt.state is TargetState.FAILED
            outcomes["failed"] += 1
    assert outcomes["failed"] > 100


# -- announced sizes (issue 10 finding 5) ----------------------------------------------------------


def tree_bytes(size: int, *, fanout: int = 4, name: str = "disk") -> bytes:
    """A tree message announcing one image of ``size`` bytes whose roots differ but, with no walk
    part, nothing to walk: all the target does with it is prepare for that size."""
    leaves = -(-size // PAGE)
    img = {"n": name, "s": size, "l": leaves, "f": fanout, "r": bytes(32)}
    return bytes(msgpack.packb({"t": "tree", "v": V, "img": [img], "bm": [False], "p": [None]}))


def _peak_of(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("leaves", [1 << 22, 1 << 24])
def test_an_announced_image_size_is_bounded_before_anything_is_allocated(leaves: int) -> None:
    """Issue 10 finding 5: a 160-byte tree message announcing 2^24 leaves cost 757 MiB (the target
    resized its tree to the source's size before checking anything). The target accepts at most
    ``max_size_factor`` * its own image (or base) + ``max_size_margin``; beyond, a ProtocolError
    before any allocation of that size."""
    pair = one(rand(8 * PAGE), rand(8 * PAGE), dry_run=True)
    pair.target.start()
    pair.target.data_to_send()

    def receive() -> None:
        with pytest.raises(ProtocolError, match="larger than"):
            pair.target.receive_data(tree_bytes(leaves * PAGE))

    assert _peak_of(receive) < 4 << 20
    assert pair.target.state is TargetState.FAILED


def test_the_size_bound_rule() -> None:
    """The rule, at its edges: own size * factor + margin, from the larger of the image and its base."""
    params = ProtocolParams(max_size_factor=2, max_size_margin=16 * PAGE)
    for own, base, announced, ok in [
        (8 * PAGE, None, 32 * PAGE, True),  # 2 * 8 + 16 pages
        (8 * PAGE, None, 32 * PAGE + 1, False),
        (0, None, 16 * PAGE, True),  # an empty target still takes the margin
        (8 * PAGE, 100 * PAGE, 216 * PAGE, True),  # the base (checkpoint) counts as the target's own
        (8 * PAGE, 100 * PAGE, 216 * PAGE + 1, False),
    ]:
        bases = {"disk": rand(base)} if base is not None else None
        pair = one(rand(own), rand(own), params=params, bases=bases, dry_run=True)
        pair.target.start()
        pair.target.data_to_send()
        if ok:
            pair.target.receive_data(tree_bytes(announced))
            assert pair.target.state is TargetState.RECEIVING
        else:
            with pytest.raises(ProtocolError):
                pair.target.receive_data(tree_bytes(announced))


def test_a_grown_image_within_the_rule_transfers() -> None:
    a, b = rand(120 * PAGE + 7), rand(50 * PAGE)
    pair = one(a, b, params=ProtocolParams(max_size_factor=2, max_size_margin=30 * PAGE))
    pair.run()
    assert pair.data() == a


def test_a_local_sync_names_the_sizes_it_expects() -> None:
    """sync_local holds both sides: it tells the target the source's sizes, so a large image syncs
    onto a small one whatever the rule for a remote peer says."""
    a, b = rand(300 * PAGE), rand(PAGE)
    image = MemoryImage(b)
    stats = sync_local({"disk": MemorySource(a)}, {"disk": (image.source(), image.sink())},
                       params=ProtocolParams(max_size_factor=1, max_size_margin=0))
    assert stats.verified and image.data == a


def test_the_source_allocates_nothing_by_the_targets_announced_sizes() -> None:
    """The target's hello may announce any size up to ``max_leaves`` (B may be larger than A: it
    shrinks); the source only compares roots with it and walks its own tree."""
    src = one(rand(8 * PAGE), rand(8 * PAGE)).source
    big = {"n": "disk", "s": (1 << 28) * PAGE, "l": 1 << 28, "f": 4, "r": bytes(32)}
    assert _peak_of(lambda: src.receive_data(hello_bytes(img=[big]))) < 4 << 20
    assert src.state is SourceState.WALKING


def _nested_arrays(depth: int) -> bytes:
    """16-way nested msgpack arrays, ``16**depth`` empty ones at the bottom: ~1 byte each on the
    wire, ~60 bytes each as Python lists."""
    return b"\x90" if depth == 0 else b"\x9f" + _nested_arrays(depth - 1) * 15


def test_a_message_cannot_make_the_decoder_build_many_objects() -> None:
    """A message within every byte limit can still be a million empty arrays (0.8 MiB: ~55 MiB of
    lists; a fragmented walk of a few tens of MiB: GiBs). No message of the protocol has more than
    a few containers per image, so decoding stops past that many."""
    params = ProtocolParams()
    msg = b"\x83" + b"".join(bytes(msgpack.packb(x)) for x in ("t", "walk", "v", V, "p")) + _nested_arrays(5)
    assert len(msg) < params.max_message_bytes
    pair = one(rand(8 * PAGE), rand(8 * PAGE), params=params)
    pair.target.start()
    pair.target.data_to_send()

    def receive() -> None:
        with pytest.raises(ProtocolError, match="malformed"):
            pair.target.receive_data(msg)

    assert _peak_of(receive) < 8 << 20


def frag_bytes(lt: str, i: int, n: int, chunk: bytes) -> bytes:
    return bytes(msgpack.packb({"t": "frag", "v": V, "lt": lt, "i": i, "n": n, "d": chunk}))


def test_fragment_counts_are_bounded_by_what_this_side_expects() -> None:
    """A fragmented message may not announce (or add up to) more than the largest message this side
    can legitimately receive in its state: a hello of a few images, a walk or want of its images'
    leaves. Before: any count up to ``max_logical_bytes`` (256 MiB) was buffered."""
    params = ProtocolParams(max_message_bytes=64 << 10)
    step = params.max_message_bytes - 128
    pair = one(rand(8 * PAGE), rand(8 * PAGE), params=params)
    with pytest.raises(ProtocolError, match="expects"):
        pair.source.receive_data(frag_bytes("hello", 0, 100, b"x" * step))
    pair = one(rand(8 * PAGE), rand(8 * PAGE), params=params)
    pair.target.start()
    pair.target.data_to_send()
    with pytest.raises(ProtocolError, match="expects"):
        pair.target.receive_data(frag_bytes("tree", 0, 1000, b"x" * step))


def test_peer_abort() -> None:
    pair = one(rand(8 * PAGE), rand(8 * PAGE))
    pair.target.start()
    pair.source.receive_data(pair.target.data_to_send()[0])
    pair.target.abort()
    assert pair.sinks["disk"].aborted
    (msg,) = pair.target.data_to_send()
    assert pair.source.receive_data(msg) == [PeerFailed(FailCode.ABORTED)]


def test_params_validation() -> None:
    for bad in (
        {"digest_bytes": 3},
        {"sub_block_size": 100},
        {"fingerprint_bytes": 1},
        {"max_message_bytes": 1000},
        {"window": 0},
        {"max_leaves": 0},
    ):
        with pytest.raises(ValueError):
            ProtocolParams(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Target([TargetImage("d", MemorySource(b"x"), MerkleTree.from_bytes(b"x"))])  # no sink, not dry run


# -- resume --------------------------------------------------------------------------------------------


def test_resume_after_a_dropped_batch_applies_each_leaf_once() -> None:
    b = rand(200 * PAGE)
    a = bytearray(b)
    changed = list(range(0, 200, 4))
    for i in changed:
        a[i * PAGE : (i + 1) * PAGE] = rand(PAGE, 100 + i)
    params = ProtocolParams(max_message_bytes=64 << 10, window=2)
    pair = one(bytes(a), b, params=params)
    src, tgt = pair.source, pair.target
    tgt.start()
    while tgt.state is not TargetState.RECEIVING:
        for m in tgt.data_to_send():
            src.receive_data(m)
        for m in src.data_to_send():
            tgt.receive_data(m)
    for m in tgt.data_to_send():  # the want reaches the source
        src.receive_data(m)
    first = src.data_to_send()
    assert [mtype(m) for m in first] == ["blocks", "blocks"]
    assert tgt.receive_data(first[0])[0] == BatchApplied(0, 15, 50)
    # the connection drops: batch 1 and the ack of batch 0 are lost; batch 0 arrives again late
    tgt.data_to_send()
    tgt.receive_data(first[0])
    assert tgt.stats.duplicate_batches == 1
    tgt.resume()
    (resume,) = tgt.data_to_send()
    assert mtype(resume) == "resume"
    src.receive_data(resume)
    stats = run_local(src, tgt)
    assert pair.data() == bytes(a)
    assert pair.sinks["disk"].writes == len(changed)
    assert stats.images["disk"].full == len(changed)


def test_resume_outside_the_block_phase_is_refused() -> None:
    """Our own call in the wrong state: refused as local misuse, nothing changes or is sent."""
    pair = one(rand(4 * PAGE), rand(4 * PAGE))
    pair.target.start()
    pair.target.data_to_send()
    with pytest.raises(LocalProtocolError, match="hello_sent"):
        pair.target.resume()
    assert pair.target.state is TargetState.HELLO_SENT and pair.target.data_to_send() == []


# -- property ------------------------------------------------------------------------------------------


def mutate(draw: st.DrawFn, data: bytes) -> bytes:
    a = bytearray(data)
    ops = draw(
        st.lists(
            st.tuples(st.sampled_from(["byte", "move", "zero", "rand", "resize"]), st.integers(0, 2**31)), max_size=12
        )
    )
    for op, x in ops:
        leaves = -(-len(a) // PAGE)
        if op == "resize":
            new = x % (50 * PAGE + 1)
            a = a[:new] if new < len(a) else a + bytes(new - len(a))
        elif leaves == 0:
            continue
        elif op == "byte":
            a[x % len(a)] ^= 1 + x % 255
        elif op == "move":
            i, j = x % leaves, (x // 64) % leaves
            src = bytes(a[i * PAGE : (i + 1) * PAGE])
            end = min(len(a), j * PAGE + len(src))
            a[j * PAGE : end] = src[: end - j * PAGE]
        elif op == "zero":
            i = x % leaves
            a[i * PAGE : (i + 1) * PAGE] = bytes(len(a[i * PAGE : (i + 1) * PAGE]))
        else:
            i = x % leaves
            a[i * PAGE : (i + 1) * PAGE] = rand(len(a[i * PAGE : (i + 1) * PAGE]), x)
    return bytes(a)


@st.composite
def images(draw: st.DrawFn) -> bytes:
    n = draw(st.integers(0, 40))
    tail = draw(st.sampled_from([0, 0, 1, 100, PAGE - 1]))
    seed = draw(st.integers(0, 2**16))
    b = bytearray(rand(n * PAGE + tail, seed))
    for i in draw(st.lists(st.integers(0, max(0, n - 1)), max_size=5)) if n else []:
        b[i * PAGE : (i + 1) * PAGE] = bytes(PAGE)
    return bytes(b)


@st.composite
def image_pairs(draw: st.DrawFn) -> tuple[bytes, bytes]:
    b = draw(images())
    return mutate(draw, b), b


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pair=image_pairs(),
    fanout=st.sampled_from([2, 3, 4, 16]),
    target_fanout=st.sampled_from([2, 4, 16]),
    digest_bytes=st.sampled_from([4, 8, 32]),
    sub=st.sampled_from([64, 256, 4096]),
    delta=st.booleans(),
)
def test_property_target_equals_source(
    pair: tuple[bytes, bytes], fanout: int, target_fanout: int, digest_bytes: int, sub: int, delta: bool
) -> None:
    a, b = pair
    params = ProtocolParams(digest_bytes=digest_bytes, sub_block_size=sub, delta=delta, max_message_bytes=64 << 10)
    image = MemoryImage(b)
    sink = image.sink()
    source = Source([SourceImage("x", MemorySource(a), MerkleTree.from_bytes(a, fanout))], params)
    target = Target(
        [TargetImage("x", image.source(), MerkleTree.from_bytes(b, target_fanout), sink)], params, key=KEY
    )
    stats = run_local(source, target)
    assert image.data == a and stats.verified and sink.committed
    view = MerkleTree.from_bytes(b).resized(len(a))  # B as it is after set_size(len(a))
    assert stats.images["x"].divergent == len(MerkleTree.from_bytes(a).differing_leaves(view))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    fanout=st.sampled_from([2, 4, 16]),
    digest_bytes=st.sampled_from([4, 8]),
    check_bytes=st.sampled_from([0, 4]),
    delta_with_base=st.booleans(),
)
def test_property_three_way_target_equals_source(
    data: st.DataObject, fanout: int, digest_bytes: int, check_bytes: int, delta_with_base: bool
) -> None:
    """Source and target both grown from one base (the checkpoint), the base-relative walk on."""
    base = data.draw(images())
    a, b = mutate(data.draw, base), mutate(data.draw, base)
    params = ProtocolParams(digest_bytes=digest_bytes, check_bytes=check_bytes, delta_with_base=delta_with_base,
                            max_message_bytes=64 << 10)
    pair = one(a, b, fanout=fanout, params=params, bases={"disk": base})
    stats = pair.run()
    assert pair.data() == a and stats.verified
    view = MerkleTree.from_bytes(b).resized(len(a))
    assert stats.images["disk"].divergent == len(MerkleTree.from_bytes(a).differing_leaves(view))


class FailingSource(MemorySource):
    def read(self, index: int, count: int = 1) -> bytes:
        raise OSError("disk gone")


def test_source_read_error_aborts_the_target() -> None:
    b = rand(10 * PAGE)
    a = bytearray(b)
    a[2 * PAGE : 3 * PAGE] = rand(PAGE, 1)
    image = MemoryImage(b)
    sink = image.sink()
    source = Source([SourceImage("x", FailingSource(bytes(a)), MerkleTree.from_bytes(bytes(a)))])
    target = Target([TargetImage("x", image.source(), MerkleTree.from_bytes(b), sink)], key=KEY)
    with pytest.raises(OSError):
        run_local(source, target)
    assert source.state is SourceState.FAILED and target.state is TargetState.FAILED
    assert sink.aborted and image.data == b


# -- fuzz: the target `make fuzz` runs on 100,000 inputs (bench/fuzz_targets.py), here on a few ----------

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(st.randoms(use_true_random=False))
def test_fuzz_protocol_target(rng: random.Random) -> None:
    """Recorded transfers, a message mutated: the target lets out only project errors, and if it
    verifies, it committed the source's bytes."""
    fuzz_one("protocol-target", rng)


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_protocol_target_raw_bytes(data: bytes) -> None:
    fuzz_one("protocol-target", data)


@FUZZ
@given(st.randoms(use_true_random=False))
def test_fuzz_protocol_source(rng: random.Random) -> None:
    """Structurally valid inputs, mutated: the decoder lets out ProtocolError."""
    fuzz_one("protocol-source", rng)


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_protocol_source_raw_bytes(data: bytes) -> None:
    fuzz_one("protocol-source", data)
