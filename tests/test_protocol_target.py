"""differ.protocol.target: the receiving side, whole transfers seen from it (driven in memory by
the blocking adapter): what it commits, what it refuses, the sizes it accepts, resuming."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import blake3
import msgpack
import pytest
from diffpair import PAGE, InPlaceImage, InPlaceSink, Pair, mtype, one, peak_of, rand, replayed, tree_bytes
from fuzzkit import fuzz_tests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from differ import merkle
from differ.memsource import MemoryImage, MemorySink, MemorySource
from differ.merkle import MerkleTree
from differ.protocol import (
    BatchApplied,
    HashImage,
    ImageSpec,
    Of,
    ProtocolParams,
    ReadLeaves,
    Request,
    Result,
    SourceState,
    Target,
    TargetState,
)
from differ.protocol import batch as batch_module
from differ.protocol import target as target_module
from differ.sync import sync_local
from differ.transfer import run_local
from replay_migrate.errors import LocalProtocolError, ProtocolError, ReplayMigrateError, VerificationError

# -- what is committed -----------------------------------------------------------------------------


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


def test_check_bytes_add_digest_bytes_per_block() -> None:
    base = rand(32 * PAGE, seed=12)
    a, b = replayed(base, same=(), differ=(1, 2, 3), target_only=())
    pair = one(a, b, params=ProtocolParams(check_bytes=24))
    stats = pair.run()
    assert pair.data() == a and stats.leaf_digest_bytes == 3 * 24
    default = one(a, b)
    assert default.run().leaf_digest_bytes == 0 and default.data() == a


class LyingSink(MemorySink):
    """Writes something else than it is given: only the final root check can see it."""

    def write(self, index: int, data: bytes) -> None:
        super().write(index, bytes([data[0] ^ 1]) + data[1:])


class LyingInPlaceSink(InPlaceSink):
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


# -- verifying by reading back what was written (issue 13 item 3) --------------------------------


def _requests(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> list[Request]:
    """The requests the pair's target makes, in order, as its adapter fulfils them."""
    seen: list[Request] = []
    fulfil = pair.target.io.fulfil

    def recording(req: Request) -> Result:
        seen.append(req)
        return fulfil(req)

    monkeypatch.setattr(pair.target.io, "fulfil", recording)
    return seen


def _changed(b: bytes, pages: dict[int, bytes]) -> bytes:
    a = bytearray(b)
    for i, page in pages.items():
        a[i * PAGE : (i + 1) * PAGE] = page
    return bytes(a)


def test_verify_written_reads_back_only_the_leaves_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """No rehash of the whole image: the target reads back the leaves it wrote (a zeroed one
    too), hashes them and takes every other digest from its tree; the images are the source's."""
    b = rand(300 * PAGE, 1)
    a = _changed(b, {7: rand(PAGE, 2), 8: bytes(PAGE), 250: rand(PAGE, 3)})
    memory_b = rand(40 * PAGE, 4)
    pair = Pair({"disk": a, "memory": _changed(memory_b, {39: rand(PAGE, 5)})}, {"disk": b, "memory": memory_b},
                verify_written=True)
    seen = _requests(pair, monkeypatch)
    stats = pair.run()
    assert stats.verified and pair.data() == a and pair.data("memory") == _changed(memory_b, {39: rand(PAGE, 5)})
    assert not any(isinstance(r, HashImage) for r in seen)
    backs = {r.holding.name: r.leaves for r in seen if isinstance(r, ReadLeaves) and r.holding.of is Of.PATCHED}
    assert backs == {"disk": (7, 8, 250), "memory": (39,)}


@pytest.mark.parametrize("grow", [PAGE // 2, 5 * PAGE + 100, -(3 * PAGE + 7)], ids=["grown", "grown-more", "shrunk"])
def test_verify_written_reads_back_an_image_whose_size_changed(monkeypatch: pytest.MonkeyPatch, grow: int) -> None:
    """Issue 13 item 3: a saved memory image's size differs between the two sides (its device state
    has another length), and the target rehashed all of it (0.27 s of a 4.9 s downtime). Now it
    reads back what it wrote, and the grown tail it did not write as zeros; no rehash."""
    b = rand(30 * PAGE, 1)
    a = _changed(b, {3: rand(PAGE, 2)})
    a = a + bytes(grow) if grow > 0 else a[:grow]
    a = _changed(a, {len(a) // PAGE - 2: rand(PAGE, 4)})
    pair = one(a, b, verify_written=True)
    seen = _requests(pair, monkeypatch)
    assert pair.run().verified and pair.data() == a
    assert not any(isinstance(r, HashImage) for r in seen)
    assert any(isinstance(r, ReadLeaves) and r.holding.of is Of.PATCHED for r in seen)


class DirtyExtendingSink(MemorySink):
    """Extends an image with other bytes than zeros (a sink that breaks its contract)."""

    def set_size(self, size: int) -> None:
        buf = self._live()
        old = len(buf)
        super().set_size(size)
        if size > old:
            buf[old:] = b"\x01" * (size - old)


def test_verify_written_catches_a_grown_tail_that_is_not_zeros() -> None:
    b = rand(30 * PAGE, 1)
    a = _changed(b, {3: rand(PAGE, 2)}) + bytes(4 * PAGE)
    pair = Pair({"disk": a, "memory": rand(4 * PAGE, 1)}, {"disk": b, "memory": rand(4 * PAGE, 2)},
                sinks={"disk": DirtyExtendingSink}, verify_written=True)
    with pytest.raises(VerificationError, match="past the old end is not zeros"):
        pair.run()
    assert all(s.aborted and not s.committed for s in pair.sinks.values())


class DroppingSink(MemorySink):
    """Reports every write done but silently loses the one to leaf 8 (a write that did not land)."""

    def write(self, index: int, data: bytes) -> None:
        if index != 8:
            super().write(index, data)

    def zero(self, index: int) -> None:
        if index != 8:
            super().zero(index)


@pytest.mark.parametrize("sink, page8", [(DroppingSink, rand(PAGE, 2)), (DroppingSink, bytes(PAGE)),
                                         (LyingSink, rand(PAGE, 2))], ids=["lost write", "lost zero", "wrong bytes"])
def test_verify_written_catches_a_write_that_did_not_land(sink: type[MemorySink], page8: bytes) -> None:
    """The read-back shows the leaf's old content, not what was written: VerificationError, every
    image aborted, nothing committed."""
    b = rand(20 * PAGE)
    a = _changed(b, {3: rand(PAGE, 3), 8: page8})
    pair = Pair({"disk": a, "memory": rand(4 * PAGE, 1)}, {"disk": b, "memory": rand(4 * PAGE, 2)},
                sinks={"disk": sink}, verify_written=True)
    with pytest.raises(VerificationError, match="reads back other bytes than were written"):
        pair.run()
    assert pair.data() == b and all(s.aborted and not s.committed for s in pair.sinks.values())


@pytest.mark.parametrize("in_place", [False, True])
def test_verify_written_hashes_no_written_page_twice(monkeypatch: pytest.MonkeyPatch, in_place: bool) -> None:
    """Issue 13 item 3, hash once: the target hashed each block when it arrived and again when it
    read it back to verify. Now the read-back is compared byte for byte with what was written, and
    the root is recomputed from the digests of the arrival check: one hash per written page."""
    b = rand(64 * PAGE, 1)
    pages = {i: rand(PAGE, 10 + i) for i in (3, 9, 40, 63)}
    a = _changed(b, pages)
    pair = one(a, b, verify_written=True, in_place=in_place)
    hashed: Counter[bytes] = Counter()
    real_blake3, real_leaf_digest = blake3.blake3, merkle.leaf_digest

    class CountingBlake3:
        @staticmethod
        def blake3(data: bytes = b"", **kw: Any) -> Any:
            hashed[bytes(data)] += 1
            return real_blake3(data, **kw)

    def leaf_digest(block: bytes) -> bytes:
        hashed[bytes(block)] += 1
        return real_leaf_digest(block)

    monkeypatch.setattr(batch_module, "blake3", CountingBlake3)
    monkeypatch.setattr(target_module, "leaf_digest", leaf_digest, raising=False)
    assert pair.run().verified and pair.data() == a
    assert {i: hashed[p] for i, p in pages.items()} == dict.fromkeys(pages, 1)


# -- patching in place (issue 13 item 3) -----------------------------------------------------------


@pytest.mark.parametrize("verify_written", [False, True])
def test_a_reference_to_a_leaf_an_earlier_batch_overwrote_is_read_before_the_write(verify_written: bool) -> None:
    """In place, the target's own image changes as batches are written. A leaf that moved (the
    source holds at leaf 9 what the target holds at leaf 5, and leaf 5 gets new content in an
    earlier batch) is read before that batch is written and kept for the later one: the target
    never reads a leaf of its own image after it asked for it to be written."""
    b = rand(12 * PAGE, 1)
    a = _changed(b, {5: rand(PAGE, 2), 9: b[5 * PAGE : 6 * PAGE], 10: b[5 * PAGE : 6 * PAGE]})
    params = ProtocolParams(max_batch_entries=1, delta=False)
    pair = one(a, b, params=params, in_place=True, verify_written=verify_written)
    stats = pair.run()
    assert stats.verified and pair.data() == a
    assert stats.images["disk"].referenced == 2 and pair.target.stats.batches == 3      # one batch per leaf


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), leaves=st.integers(2, 40), batch=st.sampled_from([1, 2, 5, 4096]),
       verify_written=st.booleans())
def test_property_shuffled_pages_patch_in_place(seed: int, leaves: int, batch: int, verify_written: bool) -> None:
    """The source holds the target's pages shuffled, some new, some zeroed: most leaves travel as
    references to leaves of the target's own image that other batches overwrite. Patched in
    place, the image comes out as the source's, and no leaf of it is read after it was written
    (``InPlaceImage`` refuses that)."""
    rng = random.Random(seed)
    pages = [rand(PAGE, rng.randrange(1 << 30)) for _ in range(leaves)]
    order = list(range(leaves))
    rng.shuffle(order)
    a_pages = [pages[i] if rng.random() < 0.7 else rand(PAGE, rng.randrange(1 << 30)) if rng.random() < 0.7
               else bytes(PAGE) for i in order]
    a, b = b"".join(a_pages), b"".join(pages)
    pair = one(a, b, params=ProtocolParams(max_batch_entries=batch, delta=rng.random() < 0.5), in_place=True,
               verify_written=verify_written)
    assert pair.run().verified and pair.data() == a


def test_an_in_place_transfer_that_fails_discards_the_image() -> None:
    b = rand(20 * PAGE)
    pair = one(_changed(b, {3: rand(PAGE, 3)}), b, in_place=True, sinks={"disk": LyingInPlaceSink},
               verify_written=True)
    with pytest.raises(VerificationError):
        pair.run()
    image = pair.images["disk"]
    assert isinstance(image, InPlaceImage) and image.deleted and not pair.sinks["disk"].committed


# -- announced sizes (issue 10 finding 5) ----------------------------------------------------------


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

    assert peak_of(receive) < 4 << 20
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


def test_constructor_checks() -> None:
    tree = MerkleTree.from_bytes(b"x")
    with pytest.raises(ValueError, match="max_sizes"):
        Target([ImageSpec("d", tree)], max_sizes={"other": 1})
    with pytest.raises(ValueError, match="key"):
        Target([ImageSpec("d", tree)], key=b"short")
    with pytest.raises(ValueError, match="distinct"):
        Target([ImageSpec("d", tree), ImageSpec("d", tree)])


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


# -- hostile peers ----------------------------------------------------------------------------------


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


def test_a_failed_target_tells_the_source() -> None:
    pair = one(rand(8 * PAGE), rand(8 * PAGE))
    pair.target.start()
    pair.source.receive_data(pair.target.data_to_send()[0])
    (tree,) = pair.source.data_to_send()
    msg = msgpack.unpackb(tree)
    msg["img"][0]["r"] = b"\0" * 31
    with pytest.raises(ProtocolError):
        pair.target.receive_data(msgpack.packb(msg))
    (failed,) = pair.target.data_to_send()
    pair.source.receive_data(failed)
    assert pair.source.state is SourceState.FAILED and pair.sinks["disk"].aborted


# -- fuzz: the target `make fuzz` runs on 100,000 inputs (bench/fuzz_targets), here on a few -------------

test_fuzz_protocol_target, test_fuzz_protocol_target_raw_bytes = fuzz_tests("protocol-target")


@pytest.mark.parametrize("mode", ["verify_written", "dry_run", "rehash"])
def test_verified_trees_are_the_sources_trees(mode: str) -> None:
    """Target.verified_trees (the next common checkpoint's trees) equal the source's, level for
    level, however the target verified: from its written leaves (the tree built on first access),
    a dry run's digests, or a rehash of the patched image; grown and shrunk images too."""
    from differ.merkle import ReplacedTree

    b = rand(40 * PAGE + 100)
    for a in (bytes(b[: 5 * PAGE]) + rand(PAGE, 3) + bytes(b[6 * PAGE :]), b + rand(3 * PAGE, 4), b[: 20 * PAGE + 9]):
        pair = one(a, b, verify_written=mode == "verify_written", dry_run=mode == "dry_run")
        pair.run()
        trees = pair.target.core.verified_trees
        assert set(trees) == {"disk"} and len(trees) == 1
        if mode != "rehash":
            assert isinstance(pair.target.core._by_gi[0].verified_tree, ReplacedTree)
        want = MerkleTree.from_bytes(a, 4)
        assert [lv.tobytes() for lv in trees["disk"].levels] == [lv.tobytes() for lv in want.levels]
        assert trees["disk"].root == want.root == pair.target.roots["disk"]
