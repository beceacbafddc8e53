"""differ.protocol.source: the sending side. Hostile hellos, walks and wants are refused without
allocating by what the target announces; the leaves it sends are read ahead through requests."""

from __future__ import annotations

import random

import msgpack
import pytest
import zstandard
from diffpair import PAGE, V, hello_bytes, one, peak_of, pump, rand, replayed, walk_to_want
from fuzzkit import fuzz_tests

from differ.merkle import MerkleTree
from differ.protocol import Holding, ImageSpec, Of, ProtocolParams, ReadLeaves, Source, SourceState
from differ.protocol.params import READ_RUN
from replay_migrate.errors import LocalProtocolError, ProtocolError


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


def test_the_source_allocates_nothing_by_the_targets_announced_sizes() -> None:
    """The target's hello may announce any size up to ``max_leaves`` (B may be larger than A: it
    shrinks); the source only compares roots with it and walks its own tree."""
    src = one(rand(8 * PAGE), rand(8 * PAGE)).source
    big = {"n": "disk", "s": (1 << 28) * PAGE, "l": 1 << 28, "f": 4, "r": bytes(32)}
    assert peak_of(lambda: src.receive_data(hello_bytes(img=[big]))) < 4 << 20
    assert src.state is SourceState.WALKING


def test_base_requests_in_a_walk_without_base_are_refused() -> None:
    base = rand(16 * PAGE, seed=13)
    a, b = replayed(base, same=(), differ=(4,), target_only=())
    pair = one(a, b)                                    # no base on either side
    want = msgpack.unpackb(walk_to_want(pair))
    want["p"][0]["k"] = bytes([5])                      # Req.BASE
    with pytest.raises(ProtocolError):
        pair.source.receive_data(msgpack.packb(want))


def test_a_duplicate_must_refer_to_an_earlier_block_request() -> None:
    b = rand(30 * PAGE)
    a = bytearray(b)
    new = rand(PAGE, seed=3)
    for i in (4, 9):
        a[i * PAGE : (i + 1) * PAGE] = new
    pair = one(bytes(a), b)
    want = msgpack.unpackb(walk_to_want(pair))
    part = want["p"][0]
    assert part["k"][1] == 4                            # Req.DUP of the first
    part["u"] = (1).to_bytes(4, "little")               # ... of itself
    with pytest.raises(ProtocolError, match="duplicate"):
        pair.source.receive_data(msgpack.packb(want))


def drive_source(src: Source, image: bytes) -> list[ReadLeaves]:
    """Fulfil ``src``'s reads from ``image``; the requests it made."""
    reads = []
    while (req := src.next_request()) is not None:
        assert isinstance(req, ReadLeaves) and req.holding == Holding(Of.IMAGE, "disk")
        reads.append(req)
        src.receive_result(req.answer([image[i * PAGE : (i + 1) * PAGE] for i in req.leaves]))
    return reads


def test_the_source_reads_only_what_it_sends_ahead_in_runs() -> None:
    """The source asks for the leaves it must send (not those it only confirms), ascending, at
    most READ_RUN at once, each once; fulfilled from a dict it sends what the blocking adapter's
    sends, byte for byte."""
    b = rand(2000 * PAGE)
    a = bytearray(b)
    sent = set(range(0, 2000, 3))
    for i in sent:
        a[i * PAGE : (i + 1) * PAGE] = rand(PAGE, 10 + i)
    for i in range(1, 2000, 30):
        a[i * PAGE : (i + 1) * PAGE] = bytes(PAGE)      # zero leaves: confirmed, never read
    params = ProtocolParams(window=2)
    pair = one(bytes(a), b, params=params)
    core = Source([ImageSpec("disk", MerkleTree.from_bytes(bytes(a), 4))], params)
    reads: list[ReadLeaves] = []
    pair.target.start()
    while to_source := pair.target.data_to_send():
        for m in to_source:
            pair.source.receive_data(m)
            core.receive_data(m)
            reads += drive_source(core, bytes(a))
            out = core.data_to_send()
            assert out == pair.source.data_to_send()
            for o in out:
                pair.target.receive_data(o)
    assert core.state is SourceState.VERIFIED and pair.data() == bytes(a)
    leaves = [leaf for r in reads for leaf in r.leaves]
    assert all(len(r.leaves) <= READ_RUN and list(r.leaves) == sorted(r.leaves) for r in reads)
    assert len(leaves) == len(set(leaves)) and set(leaves) == sent


def test_resume_is_refused_outside_the_block_phase_and_beyond_what_was_sent() -> None:
    src = one(rand(4 * PAGE), rand(4 * PAGE)).source
    with pytest.raises(LocalProtocolError, match="idle"):
        src.resume(0)
    assert src.state is SourceState.IDLE


# -- fuzz: the target `make fuzz` runs on 100,000 inputs (bench/fuzz_targets), here on a few -------------

test_fuzz_protocol_source, test_fuzz_protocol_source_raw_bytes = fuzz_tests("protocol-source")


def test_a_reference_found_by_the_short_walk_prefix_is_confirmed_with_its_check_bytes() -> None:
    """The walk's digests are 5 bytes: a reference the target found by that prefix carries
    ``ref_check_bytes`` more of its candidate's digest, and the source confirms it only when they
    are its leaf's too (else it sends the block, and the transfer still verifies)."""
    b = rand(16 * PAGE, seed=21)
    a = bytearray(b)
    a[4 * PAGE : 5 * PAGE] = b[9 * PAGE : 10 * PAGE]        # the target holds page 4's content at 9
    pair = one(bytes(a), b)
    want = msgpack.unpackb(walk_to_want(pair))
    part = want["p"][0]
    assert list(part["k"]) == [2]                           # Req.REF
    params = ProtocolParams()
    assert params.digest_bytes + params.ref_rest >= 8 and len(part["c"]) == params.ref_rest
    part["c"] = bytes(x ^ 0xFF for x in part["c"])          # a candidate that agrees on the prefix only
    pair.source.receive_data(msgpack.packb(want))
    stats = pair.run()
    assert stats.verified and pair.data() == bytes(a)
    assert (stats.images["disk"].full, stats.images["disk"].referenced) == (1, 0)  # sent, not confirmed


def test_a_batch_body_is_compressed_at_the_batch_level() -> None:
    """Each blocks message's body is compressed once at ``batch_zstd_level`` (6), not at the fast
    level of the per-leaf trials: 17 KB less on a real migration's 275 KB of blocks."""
    rng = random.Random(5)
    words = [bytes(rng.choice(b"abcdefghijklmnop") for _ in range(rng.randint(2, 9))) for _ in range(400)]
    text = b" ".join(rng.choice(words) for _ in range(40 * PAGE // 5))[: 40 * PAGE]
    b = bytes(40 * PAGE)
    pair = one(text, b)
    bodies = [msgpack.unpackb(d)["z"] for who, d in pump(pair) if who == "S" and msgpack.unpackb(d)["t"] == "blocks"]
    assert bodies and pair.data() == text
    params = ProtocolParams()

    def size(level: int, raw: bytes) -> int:
        return len(zstandard.ZstdCompressor(level=level, write_checksum=False, write_dict_id=False).compress(raw))

    raws = [zstandard.ZstdDecompressor().decompress(z) for z in bodies]
    assert [len(z) for z in bodies] == [size(params.batch_zstd_level, r) for r in raws]
    assert sum(len(z) for z in bodies) < sum(size(params.zstd_level, r) for r in raws)
