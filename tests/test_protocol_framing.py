"""differ.protocol.framing: messages over the size limit travel as fragments, and nothing a peer
sends can make a side buffer or decode more than it expects of that message in its state."""

from __future__ import annotations

import msgpack
import pytest
from diffpair import PAGE, V, frag_bytes, one, peak_of, pump, rand

from differ.protocol import MsgType, ProtocolParams, TargetState, TransferStats
from differ.protocol.framing import Framer
from differ.protocol.params import FRAGMENT_OVERHEAD
from replay_migrate.errors import ProtocolError

PARAMS = ProtocolParams(max_message_bytes=64 << 10)


def framer(expected: int = 1 << 30) -> Framer:
    return Framer(PARAMS, TransferStats(), lambda t: expected)


def test_a_large_message_travels_as_fragments_and_comes_back_whole() -> None:
    out, back = framer(), framer()
    body = {"p": [{"d": rand(300 << 10)}]}
    frames = out.encode(MsgType.WALK, body)
    assert len(frames) == 5 and all(len(f) <= PARAMS.max_message_bytes for f in frames)
    assert [back.decode(f) for f in frames[:-1]] == [None] * 4
    assert back.decode(frames[-1]) == {"t": "walk", "v": V, **body}
    assert out.stats.messages == {"walk": 1} and out.stats.wire_bytes["walk"] == sum(map(len, frames))
    with pytest.raises(AssertionError):
        out.encode(MsgType.BLOCKS, body)  # never fragmented: a batch is cut to fit


@pytest.mark.parametrize("frames", [
    lambda f: [f[0], f[2]],                                                  # a part missing
    lambda f: [f[0], f[0]],                                                  # a part twice
    lambda f: [f[0], bytes(msgpack.packb({"t": "ack", "v": V, "n": 0}))],    # another message in between
    lambda f: [frag_bytes("walk", 0, 2, b"x" * 10), frag_bytes("want", 1, 2, b"y")],  # another type
    lambda f: [frag_bytes("walk", 0, 2, bytes(msgpack.packb({"t": "want", "v": V}))[:3]),
               frag_bytes("walk", 1, 2, bytes(msgpack.packb({"t": "want", "v": V}))[3:])],  # lies about its type
])
def test_fragments_out_of_sequence_are_refused(frames: object) -> None:
    whole = framer().encode(MsgType.WALK, {"p": [{"d": rand(200 << 10)}]})
    back = framer()
    with pytest.raises(ProtocolError):
        for f in frames(whole):  # type: ignore[operator]
            back.decode(f)


def test_a_fragmented_message_is_bounded_by_what_the_side_expects() -> None:
    step = PARAMS.max_message_bytes - FRAGMENT_OVERHEAD
    with pytest.raises(ProtocolError, match="expects at most"):
        framer(expected=3 * step).decode(frag_bytes("walk", 0, 5, b"x" * step))
    back = framer(expected=2 * step + 100)
    back.decode(frag_bytes("walk", 0, 3, b"x" * step))   # 3 parts could fit...
    back.decode(frag_bytes("walk", 1, 3, b"x" * step))
    with pytest.raises(ProtocolError, match="exceeds"):  # ... these do not
        back.decode(frag_bytes("walk", 2, 3, b"x" * 200))


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

    assert peak_of(receive) < 8 << 20


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
