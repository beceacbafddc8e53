"""differ.transfer: requests fulfilled against block sources and sinks, the blocking adapter, and
whole transfers in memory (property tests: the target always ends up equal to the source)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from diffpair import KEY, PAGE, InPlaceImage, one, rand
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from differ.memsource import MemoryImage, MemorySink, MemorySource
from differ.merkle import MerkleTree
from differ.protocol import (
    Abort,
    Commit,
    HashImage,
    Holding,
    LeafWrite,
    Of,
    ProtocolParams,
    ReadLeaves,
    SetSize,
    SourceState,
    TargetState,
    WriteLeaves,
)
from differ.transfer import (
    LocalIO,
    SourceImage,
    TargetImage,
    blocking_source,
    blocking_target,
    make_target,
    read_leaves,
    run_local,
)
from replay_migrate.errors import ImageError


class CountingSource(MemorySource):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.calls: list[tuple[int, int]] = []

    def read(self, index: int, count: int = 1) -> bytes:
        self.calls.append((index, count))
        return super().read(index, count)


def test_consecutive_leaves_are_read_in_one_call() -> None:
    data = rand(600 * PAGE + 100)
    src = CountingSource(data)
    leaves = [1, 2, 3, 7, *range(10, 300), 600]
    blocks = read_leaves(src, leaves)
    assert blocks == [data[i * PAGE : (i + 1) * PAGE] for i in leaves] and len(blocks[-1]) == 100
    assert src.calls == [(1, 3), (7, 1), (10, 256), (266, 34), (600, 1)]


def test_local_io_fulfils_every_request() -> None:
    image = MemoryImage(rand(8 * PAGE, 1))
    base, ref = rand(8 * PAGE, 2), rand(2 * PAGE, 3)
    sink = image.sink()
    io = LocalIO({"disk": image.source()}, bases={"disk": MemorySource(base)},
                 references={"ck": MemorySource(ref)}, sinks={"disk": sink})
    got = io.fulfil(ReadLeaves(Holding(Of.REFERENCE, "ck"), (1,), id=1))
    assert got == ReadLeaves(Holding(Of.REFERENCE, "ck"), (1,), id=1).answer([ref[PAGE:]])
    io.fulfil(SetSize("disk", 9 * PAGE, id=2))
    io.fulfil(WriteLeaves((LeafWrite("disk", 8, b"z" * PAGE), LeafWrite("disk", 0, None)), id=3))
    want = bytes(PAGE) + image.data[PAGE:] + b"z" * PAGE
    assert io.fulfil(HashImage("disk", 4, id=4)) == HashImage("disk", 4, id=4).answer(
        MerkleTree.from_bytes(want, 4).root)
    io.fulfil(Commit(("disk",), id=5))
    assert image.data == want and sink.committed
    with pytest.raises(ImageError):
        io.fulfil(ReadLeaves(Holding(Of.BASE, "disk"), (8,), id=6))


class CountingSink(MemorySink):
    """Counts the sources it opens over its patched image and how many of them are still open."""

    opened = 0
    closed = 0

    def source(self) -> MemorySource:
        CountingSink.opened += 1
        return _Tracked(bytes(self._live()))


class _Tracked(MemorySource):
    def close(self) -> None:
        CountingSink.closed += 1


def test_reading_back_the_patched_image_opens_it_once_until_the_next_write() -> None:
    image = MemoryImage(rand(8 * PAGE, 1))
    sink = CountingSink(image)
    io = LocalIO({"disk": image.source()}, sinks={"disk": sink})
    io.fulfil(WriteLeaves((LeafWrite("disk", 2, b"p" * PAGE),), id=1))
    patched = Holding(Of.PATCHED, "disk")
    assert io.fulfil(ReadLeaves(patched, (2,), id=2)) == ReadLeaves(patched, (2,), id=2).answer([b"p" * PAGE])
    assert io.fulfil(ReadLeaves(patched, (3,), id=3)) == ReadLeaves(patched, (3,), id=3).answer(
        [image.data[3 * PAGE : 4 * PAGE]])
    assert (CountingSink.opened, CountingSink.closed) == (1, 0)
    io.fulfil(WriteLeaves((LeafWrite("disk", 3, b"q" * PAGE),), id=4))     # what was read back is past
    assert CountingSink.closed == 1
    assert io.fulfil(ReadLeaves(patched, (3,), id=5)) == ReadLeaves(patched, (3,), id=5).answer([b"q" * PAGE])
    io.fulfil(Commit(("disk",), id=6))
    assert (CountingSink.opened, CountingSink.closed) == (2, 2) and image.data[3 * PAGE : 4 * PAGE] == b"q" * PAGE


class BrokenSink(MemorySink):
    """A sink whose disk is gone: writes and aborts fail."""

    def write(self, index: int, data: bytes) -> None:
        raise ImageError("disk full")

    def abort(self) -> None:
        raise OSError("gone")


def test_abort_aborts_every_sink_whatever_one_of_them_does() -> None:
    broken, fine = BrokenSink(MemoryImage(rand(PAGE))), MemoryImage(rand(PAGE)).sink()
    LocalIO({}, sinks={"a": broken, "b": fine}).fulfil(Abort(("a", "b"), id=1))
    assert fine.aborted


def test_make_target_checks_its_images() -> None:
    with pytest.raises(ValueError, match="sink"):
        make_target([TargetImage("d", MemorySource(b"x"), MerkleTree.from_bytes(b"x"))])  # no sink, not dry run
    with pytest.raises(ValueError, match="disagree"):
        make_target([TargetImage("d", MemorySource(b"xy"), MerkleTree.from_bytes(b"x"))], dry_run=True)


class FailingSource(MemorySource):
    def read(self, index: int, count: int = 1) -> bytes:
        raise OSError("disk gone")


def test_source_read_error_aborts_the_target() -> None:
    b = rand(10 * PAGE)
    a = bytearray(b)
    a[2 * PAGE : 3 * PAGE] = rand(PAGE, 1)
    image = MemoryImage(b)
    sink = image.sink()
    source = blocking_source([SourceImage("x", FailingSource(bytes(a)), MerkleTree.from_bytes(bytes(a)))])
    target = blocking_target([TargetImage("x", image.source(), MerkleTree.from_bytes(b), sink)], key=KEY)
    with pytest.raises(OSError):
        run_local(source, target)
    assert source.state is SourceState.FAILED and target.state is TargetState.FAILED
    assert sink.aborted and image.data == b


def test_a_failing_write_aborts_the_copies_before_the_error_is_raised() -> None:
    b = rand(10 * PAGE)
    a = bytearray(b)
    a[2 * PAGE : 3 * PAGE] = rand(PAGE, 1)
    pair = one(bytes(a), b, sinks={"disk": BrokenSink})
    with pytest.raises(ImageError, match="disk full"):
        pair.run()
    assert pair.target.state is TargetState.FAILED and pair.source.state is SourceState.FAILED
    assert pair.data() == b


def test_a_stalled_transfer_is_an_error() -> None:
    pair = one(rand(4 * PAGE), rand(4 * PAGE, 1))
    pair.target.start()
    pair.target.data_to_send()  # the hello is lost
    with pytest.raises(Exception, match="stalled"):
        run_local(pair.source, pair.target)
    assert pair.target.state is TargetState.FAILED and pair.sinks["disk"].aborted


# -- property ------------------------------------------------------------------------------------------


def mutate(draw: Callable[[st.SearchStrategy[Any]], Any], data: bytes) -> bytes:
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
    verify_written=st.booleans(),
    in_place=st.booleans(),
)
def test_property_target_equals_source(
    pair: tuple[bytes, bytes], fanout: int, target_fanout: int, digest_bytes: int, sub: int, delta: bool,
    verify_written: bool, in_place: bool,
) -> None:
    a, b = pair
    params = ProtocolParams(digest_bytes=digest_bytes, sub_block_size=sub, delta=delta, max_message_bytes=64 << 10)
    image = InPlaceImage(b) if in_place else MemoryImage(b)
    sink = image.sink()
    source = blocking_source([SourceImage("x", MemorySource(a), MerkleTree.from_bytes(a, fanout))], params)
    target = blocking_target(
        [TargetImage("x", image.source(), MerkleTree.from_bytes(b, target_fanout), sink)], params, key=KEY,
        verify_written=verify_written,
    )
    stats = run_local(source, target)
    assert image.data == a and stats.verified and sink.committed
    view = MerkleTree.from_bytes(b).resized(len(a))  # B as it is after set_size(len(a))
    assert stats.images["x"].divergent == len(MerkleTree.from_bytes(a).differing_leaves(view))
    # every wire byte is counted as content or as framing (envelopes): kinds both ways if any leaf differs
    assert (stats.kind_bytes > 0) == (stats.images["x"].divergent > 0) and stats.framing_bytes > 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    fanout=st.sampled_from([2, 4, 16]),
    digest_bytes=st.sampled_from([4, 8]),
    check_bytes=st.sampled_from([0, 4]),
    delta_with_base=st.booleans(),
    verify_written=st.booleans(),
    in_place=st.booleans(),
)
def test_property_three_way_target_equals_source(
    data: st.DataObject, fanout: int, digest_bytes: int, check_bytes: int, delta_with_base: bool,
    verify_written: bool, in_place: bool,
) -> None:
    """Source and target both grown from one base (the checkpoint), the base-relative walk on."""
    base = data.draw(images())
    a, b = mutate(data.draw, base), mutate(data.draw, base)
    params = ProtocolParams(digest_bytes=digest_bytes, check_bytes=check_bytes, delta_with_base=delta_with_base,
                            max_message_bytes=64 << 10, max_batch_entries=data.draw(st.sampled_from([1, 3, 4096])))
    pair = one(a, b, fanout=fanout, params=params, bases={"disk": base}, verify_written=verify_written,
               in_place=in_place)
    stats = pair.run()
    assert pair.data() == a and stats.verified
    view = MerkleTree.from_bytes(b).resized(len(a))
    assert stats.images["disk"].divergent == len(MerkleTree.from_bytes(a).differing_leaves(view))

