"""differ.protocol.endpoint: a side driven by its four calls, with nothing but dicts behind it.

A whole transfer between a Source core and a Target core runs here with in-memory images and no
threads, sockets or files: a tiny loop fulfils their requests from dicts. Then the request rules:
one at a time, wire messages queued meanwhile (bounded), a result that does not answer the
outstanding request refused as local misuse, a failure that drops it and asks for an abort."""

from __future__ import annotations

import threading

import msgpack
import pytest
from diffpair import KEY, PAGE, Pair, mtype, one, rand

from differ.merkle import MerkleTree
from differ.protocol import (
    Abort,
    BatchApplied,
    Commit,
    Done,
    Event,
    FailCode,
    Hashed,
    HashImage,
    Holding,
    ImageSpec,
    LeavesRead,
    Of,
    PeerFailed,
    ProtocolParams,
    ReadLeaves,
    Request,
    Result,
    SetSize,
    Source,
    SourceState,
    Target,
    TargetState,
    Verified,
    WriteLeaves,
)
from replay_migrate.errors import LocalProtocolError, ProtocolError, VerificationError


class Dicts:
    """What one side holds, as bytes by holding; a target's patched copies and what it committed."""

    def __init__(self, held: dict[Holding, bytes], *, lie_about_roots: bool = False) -> None:
        self.held = held
        self.patched: dict[str, bytearray] = {}
        self.committed: dict[str, bytes] = {}
        self.requests: list[Request] = []
        self.lie = lie_about_roots

    def copy(self, name: str) -> bytearray:
        return self.patched.setdefault(name, bytearray(self.held[Holding(Of.IMAGE, name)]))

    def fulfil(self, req: Request) -> Result:
        self.requests.append(req)
        if isinstance(req, ReadLeaves):
            data = self.held[req.holding]
            return req.answer([data[i * PAGE : (i + 1) * PAGE] for i in req.leaves])
        if isinstance(req, SetSize):
            copy = self.copy(req.name)
            del copy[req.size :]
            copy.extend(bytes(req.size - len(copy)))
            return req.done()
        if isinstance(req, WriteLeaves):
            for w in req.writes:
                copy = self.copy(w.name)
                length = min(PAGE, len(copy) - w.leaf * PAGE)
                copy[w.leaf * PAGE : w.leaf * PAGE + length] = w.data if w.data is not None else bytes(length)
            return req.done()
        if isinstance(req, HashImage):
            root = MerkleTree.from_bytes(bytes(self.copy(req.name)), req.fanout).root
            return req.answer(bytes(32) if self.lie else root)
        if isinstance(req, Commit):
            self.committed.update({name: bytes(self.copy(name)) for name in req.names})
            return req.done()
        self.patched.clear()
        return req.done()


def deliver(side: Source | Target, data: bytes, io: Dicts) -> list[Event]:
    """One wire message into ``side``, and every request it makes fulfilled from ``io``."""
    events = side.receive_data(data)
    while (req := side.next_request()) is not None:
        events += side.receive_result(io.fulfil(req))
    return events


def transfer(source: Source, target: Target, src_io: Dicts, tgt_io: Dicts) -> list[bytes]:
    """The whole transfer in this thread; the wire messages, in order."""
    wire: list[bytes] = []
    target.start()
    moved = True
    while moved:
        moved = False
        for data in target.data_to_send():
            wire.append(data)
            deliver(source, data, src_io)
            moved = True
        for data in source.data_to_send():
            wire.append(data)
            deliver(target, data, tgt_io)
            moved = True
    return wire


def images() -> tuple[dict[str, bytes], dict[str, bytes], bytes, bytes]:
    """(A, B, the memory image's base, a reference): every kind of answer, a resized disk."""
    base = rand(96 * PAGE, 1)
    mem_a, mem_b = bytearray(base), bytearray(base)
    mem_a[3 * PAGE + 7] ^= 1                                   # a few bytes since the base: XOR
    mem_b[3 * PAGE : 4 * PAGE] = rand(PAGE, 2)
    mem_b[9 * PAGE : 10 * PAGE] = rand(PAGE, 3)                # only the target changed it: base
    mem_a[20 * PAGE : 22 * PAGE] = bytes(2 * PAGE)             # zero
    mem_a[30 * PAGE : 31 * PAGE] = mem_a[31 * PAGE : 32 * PAGE] = rand(PAGE, 4)  # new, twice: duplicate
    ref = rand(4 * PAGE, 5)
    mem_a[40 * PAGE : 41 * PAGE] = ref[2 * PAGE : 3 * PAGE]     # held in the reference
    disk_b = rand(50 * PAGE, 6)
    disk_a = bytearray(disk_b)
    disk_a[10 * PAGE + 100] ^= 0xFF                            # delta
    disk_a[12 * PAGE : 13 * PAGE] = disk_b[40 * PAGE : 41 * PAGE]  # held in its own image
    disk_a += rand(3 * PAGE + 5, 7)                            # grown: set_size
    return {"memory": bytes(mem_a), "disk": bytes(disk_a)}, {"memory": bytes(mem_b), "disk": disk_b}, base, ref


def cores(a: dict[str, bytes], b: dict[str, bytes], base: bytes, ref: bytes, *, lie: bool = False,
          params: ProtocolParams | None = None) -> tuple[Source, Target, Dicts, Dicts]:
    def spec(name: str, data: bytes) -> ImageSpec:
        base_tree = MerkleTree.from_bytes(base) if name == "memory" else None
        return ImageSpec(name, MerkleTree.from_bytes(data, 4), base_tree)

    source = Source([spec(n, d) for n, d in a.items()], params, measure_plain=True)
    target = Target([spec(n, d) for n, d in b.items()], params, references={"ck": MerkleTree.from_bytes(ref)},
                    key=KEY)
    src_io = Dicts({**{Holding(Of.IMAGE, n): d for n, d in a.items()}, Holding(Of.BASE, "memory"): base})
    tgt_io = Dicts({**{Holding(Of.IMAGE, n): d for n, d in b.items()}, Holding(Of.BASE, "memory"): base,
                    Holding(Of.REFERENCE, "ck"): ref}, lie_about_roots=lie)
    return source, target, src_io, tgt_io


def test_a_whole_transfer_between_two_cores_with_dicts_alone() -> None:
    threads = threading.active_count()
    a, b, base, ref = images()
    source, target, src_io, tgt_io = cores(a, b, base, ref)
    wire = transfer(source, target, src_io, tgt_io)
    assert threading.active_count() == threads
    assert source.state is SourceState.VERIFIED and target.state is TargetState.VERIFIED
    assert tgt_io.committed == a
    img = source.stats.merged(target.stats).images
    assert (img["memory"].xbase, img["memory"].base, img["memory"].zero, img["memory"].duplicate,
            img["memory"].referenced) == (1, 1, 2, 1, 1)
    assert (img["disk"].delta, img["disk"].referenced, img["disk"].resized) == (1, 1, True)
    kinds = [type(r) for r in tgt_io.requests]
    assert kinds[0] is SetSize and kinds[-3:] == [HashImage, HashImage, Commit]
    assert max(i for i, k in enumerate(kinds) if k is WriteLeaves) < kinds.index(HashImage)
    assert {type(r) for r in src_io.requests} == {ReadLeaves}
    # byte for byte what the blocking adapter sends with block sources and sinks over the same images
    assert wire == wire_of(Pair(a, b, bases={"memory": base}, references=(ref,), measure_plain=True))


def wire_of(pair: Pair) -> list[bytes]:
    wire: list[bytes] = []
    pair.target.start()
    moved = True
    while moved:
        moved = False
        for data in pair.target.data_to_send():
            wire.append(data)
            pair.source.receive_data(data)
            moved = True
        for data in pair.source.data_to_send():
            wire.append(data)
            pair.target.receive_data(data)
            moved = True
    return wire


def test_a_root_that_differs_brings_an_abort_and_no_commit() -> None:
    a, b, base, ref = images()
    source, target, src_io, tgt_io = cores(a, b, base, ref, lie=True)
    with pytest.raises(VerificationError, match="root differs"):
        transfer(source, target, src_io, tgt_io)
    assert target.state is TargetState.FAILED and tgt_io.committed == {}
    assert isinstance(target.next_request(), Abort)
    assert not any(isinstance(r, Commit) for r in tgt_io.requests)
    (failed,) = target.data_to_send()
    assert msgpack.unpackb(failed)["c"] == FailCode.VERIFICATION


def walked(window: int = 8, max_pending_bytes: int = 64 << 20) -> tuple[Source, Target, Dicts, Dicts, list[bytes]]:
    """Two cores past the walk; the source's batches and end, not delivered."""
    b = rand(64 * PAGE)
    a = bytearray(b)
    for i in range(0, 64, 2):
        a[i * PAGE : (i + 1) * PAGE] = rand(PAGE, 100 + i)
    params = ProtocolParams(max_message_bytes=64 << 10, window=window, max_pending_bytes=max_pending_bytes)
    source = Source([ImageSpec("disk", MerkleTree.from_bytes(bytes(a), 4))], params)
    target = Target([ImageSpec("disk", MerkleTree.from_bytes(b, 4))], params, key=KEY)
    src_io, tgt_io = Dicts({Holding(Of.IMAGE, "disk"): bytes(a)}), Dicts({Holding(Of.IMAGE, "disk"): b})
    target.start()
    while target.state is not TargetState.RECEIVING:
        for m in target.data_to_send():
            deliver(source, m, src_io)
        for m in source.data_to_send():
            deliver(target, m, tgt_io)
    for m in target.data_to_send():  # the want
        deliver(source, m, src_io)
    return source, target, src_io, tgt_io, source.data_to_send()


def test_messages_that_arrive_while_a_request_is_outstanding_are_queued_by_the_core() -> None:
    _, target, _, tgt_io, batches = walked(window=100)
    assert [mtype(m) for m in batches] == ["blocks"] * 3 + ["end"]
    assert target.receive_data(batches[0]) == [] and isinstance(target.next_request(), WriteLeaves)
    for m in batches[1:]:
        assert target.receive_data(m) == []             # queued: handled once the write is done
    assert target.data_to_send() == []
    events: list[Event] = []
    while (req := target.next_request()) is not None:
        events += target.receive_result(tgt_io.fulfil(req))
    assert events == [BatchApplied(0, 15, 32), BatchApplied(1, 30, 32), BatchApplied(2, 32, 32), Verified()]
    assert [msgpack.unpackb(m)["n"] for m in target.data_to_send()[:3]] == [0, 1, 2]  # acks, in order
    assert target.state is TargetState.VERIFIED


def test_the_queue_is_bounded() -> None:
    """A peer that ignores flow control: more than ``max_pending_bytes`` while the side is busy."""
    _, target, _, _, batches = walked(window=100, max_pending_bytes=64 << 10)
    target.receive_data(batches[0])
    with pytest.raises(ProtocolError, match="flow control"):
        for m in batches[1:]:
            target.receive_data(m)
    assert target.state is TargetState.FAILED and isinstance(target.next_request(), Abort)
    assert [mtype(m) for m in target.data_to_send()] == ["failed"]


def test_a_result_that_does_not_answer_the_request_is_refused_and_changes_nothing() -> None:
    _, target, _, tgt_io, batches = walked()
    with pytest.raises(LocalProtocolError, match="no request is outstanding"):
        target.receive_result(Done(1))
    target.receive_data(batches[0])
    req = target.next_request()
    assert isinstance(req, WriteLeaves)
    for wrong in (Done(req.id + 1), LeavesRead(req.id, ()), Hashed(req.id, bytes(32))):
        with pytest.raises(LocalProtocolError, match="outstanding request is WriteLeaves"):
            target.receive_result(wrong)
        assert target.next_request() is req and target.state is TargetState.RECEIVING
    with pytest.raises(LocalProtocolError, match="while a request is outstanding"):
        target.resume()
    assert target.data_to_send() == []                  # refused calls send nothing
    assert target.receive_result(tgt_io.fulfil(req)) == [BatchApplied(0, 15, 32)]


def test_reads_must_come_back_whole() -> None:
    """A source about to read the one leaf it sends (its first request after the want)."""
    b = rand(16 * PAGE)
    a = bytearray(b)
    a[3 * PAGE] ^= 1
    core = Source([ImageSpec("disk", MerkleTree.from_bytes(bytes(a), 4))])
    pair = one(bytes(a), b, params=ProtocolParams(delta=False))
    pair.target.start()
    while core.next_request() is None:
        for m in pair.target.data_to_send():
            core.receive_data(m)
        for m in core.data_to_send():
            pair.target.receive_data(m)
    req = core.next_request()
    assert isinstance(req, ReadLeaves) and req.leaves == (3,)
    for blocks in ([], [b"x", b"y"], [b"x" * (PAGE + 1)]):
        with pytest.raises(LocalProtocolError, match="blocks read"):
            core.receive_result(req.answer(blocks))
        assert core.next_request() is req
    core.receive_result(req.answer([bytes(a[3 * PAGE : 4 * PAGE])]))
    assert [mtype(m) for m in core.data_to_send()] == ["blocks", "end"]


def test_a_hash_must_be_a_root() -> None:
    _, target, _, tgt_io, batches = walked()
    for m in batches:
        target.receive_data(m)
        while (req := target.next_request()) is not None and not isinstance(req, HashImage):
            target.receive_result(tgt_io.fulfil(req))
    req = target.next_request()
    assert isinstance(req, HashImage)
    with pytest.raises(LocalProtocolError, match="32 bytes"):
        target.receive_result(req.answer(b"short"))
    assert target.next_request() is req


def test_abort_drops_the_request_and_asks_for_the_copies_to_be_aborted() -> None:
    source, target, _, tgt_io, batches = walked()
    target.receive_data(batches[0])
    dropped = target.next_request()
    assert isinstance(dropped, WriteLeaves)
    target.abort()
    abort = target.next_request()
    assert isinstance(abort, Abort) and abort.names == ("disk",) and target.state is TargetState.FAILED
    with pytest.raises(LocalProtocolError):
        target.receive_result(dropped.done())            # the late result of the dropped write
    assert target.receive_result(tgt_io.fulfil(abort)) == [] and target.next_request() is None
    (failed,) = target.data_to_send()
    assert source.receive_data(failed) == [PeerFailed(FailCode.ABORTED)] and source.state is SourceState.FAILED
    target.abort()                                       # once ended, nothing more
    assert target.next_request() is None and target.data_to_send() == []


def test_peer_abort() -> None:
    pair = one(rand(8 * PAGE), rand(8 * PAGE))
    pair.target.start()
    pair.source.receive_data(pair.target.data_to_send()[0])
    pair.target.abort()
    assert pair.sinks["disk"].aborted
    (msg,) = pair.target.data_to_send()
    assert pair.source.receive_data(msg) == [PeerFailed(FailCode.ABORTED)]


def test_a_dry_run_target_asks_for_no_write_hash_commit_or_abort() -> None:
    a, b, base, ref = images()
    source, _, src_io, _ = cores(a, b, base, ref)
    spec = [ImageSpec(n, MerkleTree.from_bytes(d, 4), MerkleTree.from_bytes(base) if n == "memory" else None)
            for n, d in b.items()]
    target = Target(spec, references={"ck": MerkleTree.from_bytes(ref)}, key=KEY, dry_run=True)
    tgt_io = Dicts({**{Holding(Of.IMAGE, n): d for n, d in b.items()}, Holding(Of.BASE, "memory"): base,
                    Holding(Of.REFERENCE, "ck"): ref})
    transfer(source, target, src_io, tgt_io)
    assert target.state is TargetState.VERIFIED and {type(r) for r in tgt_io.requests} == {ReadLeaves}
    target2 = Target(spec, key=KEY, dry_run=True)
    target2.abort()
    assert target2.next_request() is None
