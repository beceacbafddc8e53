"""differ.protocol.want: how the target asks for each differing leaf (a confirmation where it
holds the content, the block otherwise) and the requests it makes while deciding."""

from __future__ import annotations

import msgpack
from diffpair import KEY, PAGE, one, rand, walk_to_want

from differ.merkle import MerkleTree
from differ.protocol import Holding, ImageSpec, Of, ReadLeaves, SetSize, Target
from differ.protocol.messages import Req
from differ.protocol.source import Source


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


def test_the_kinds_asked_for() -> None:
    b = rand(16 * PAGE)
    a = bytearray(b)
    a[1 * PAGE : 2 * PAGE] = bytes(PAGE)                   # zero
    a[3 * PAGE : 4 * PAGE] = b[10 * PAGE : 11 * PAGE]       # held elsewhere: reference
    a[5 * PAGE + 9] ^= 1                                    # a few bytes: delta
    a[7 * PAGE : 8 * PAGE] = a[12 * PAGE : 13 * PAGE] = rand(PAGE, 4)  # new, twice: block then duplicate
    want = msgpack.unpackb(walk_to_want(one(bytes(a), b)))
    assert list(want["p"][0]["k"]) == [Req.ZERO, Req.REF, Req.DELTA, Req.DELTA, Req.DUP]
    assert want["p"][0]["u"] == (3).to_bytes(4, "little")


def test_the_target_sets_the_size_and_reads_its_own_blocks_for_fingerprints() -> None:
    """Before the want: the patched copy resized to the source's size (the image is then
    touched: rehashed at the end), and only the blocks that fingerprints are made of read."""
    b = rand(20 * PAGE)
    a = bytearray(b)
    a[2 * PAGE + 5] ^= 1
    a[6 * PAGE + 5] ^= 1
    a += rand(3 * PAGE, 9)
    source = Source([ImageSpec("disk", MerkleTree.from_bytes(bytes(a), 4))])
    target = Target([ImageSpec("disk", MerkleTree.from_bytes(b, 4))], key=KEY)
    target.start()
    requests = []
    for _ in range(10):
        for m in target.data_to_send():
            source.receive_data(m)
        for m in source.data_to_send():
            target.receive_data(m)
        while (req := target.next_request()) is not None:
            requests.append(req)
            if isinstance(req, SetSize):
                target.receive_result(req.done())
            else:
                assert isinstance(req, ReadLeaves)
                target.receive_result(req.answer([b[i * PAGE : (i + 1) * PAGE] for i in req.leaves]))
        if target.state.value == "receiving":
            break
    assert requests == [SetSize("disk", len(a), id=1), ReadLeaves(Holding(Of.IMAGE, "disk"), (2, 6), id=2)]
