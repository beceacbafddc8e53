"""differ.protocol.messages: the field validators (each names the field a peer got wrong), image
entries, and the code a failure is reported with."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import zstandard

from differ.merkle import MerkleTree
from differ.protocol import FailCode, ProtocolParams, fail_code
from differ.protocol.messages import (
    Shape,
    array,
    binary,
    get_kinds,
    integer,
    mapping,
    pack_bits,
    put_kinds,
    string,
    unpack_bits,
)
from replay_migrate.errors import ImageError, ProtocolError, VerificationError


@pytest.mark.parametrize(("check", "value"), [
    (lambda m: integer(m, "x", 0, 9), 10),
    (lambda m: integer(m, "x", 0, 9), True),
    (lambda m: integer(m, "x", 0, 9), 1.0),
    (lambda m: binary(m, "x", length=2), b"abc"),
    (lambda m: binary(m, "x", max_len=2), b"abc"),
    (lambda m: binary(m, "x"), "abc"),
    (lambda m: string(m, "x", 3), ""),
    (lambda m: string(m, "x", 3), "abcd"),
    (lambda m: array(m, "x", length=1), [1, 2]),
    (lambda m: array(m, "x"), (1,)),
])
def test_a_field_of_the_wrong_type_or_size_is_named(check: object, value: object) -> None:
    with pytest.raises(ProtocolError, match="'x'"):
        check({"x": value})  # type: ignore[operator]
    with pytest.raises(ProtocolError, match="'x' missing"):
        check({})  # type: ignore[operator]
    with pytest.raises(ProtocolError, match="not a map"):
        mapping([], "part")


def test_bitmaps() -> None:
    mask = np.array([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=bool)
    packed = pack_bits(mask)
    assert len(packed) == 2 and unpack_bits(packed, 9, "m").tolist() == mask.tolist()
    with pytest.raises(ProtocolError, match="padding"):
        unpack_bits(b"\x00\xff", 9, "m")
    with pytest.raises(ProtocolError, match="bytes for"):
        unpack_bits(packed, 20, "m")


def test_an_image_entry_must_be_consistent() -> None:
    tree = MerkleTree.from_bytes(bytes(5000), 4)
    shape = Shape.of("disk", tree)
    assert Shape.decode(shape.encode(), ProtocolParams()) == shape
    for bad in ({"l": 3}, {"f": 1}, {"r": b"x"}, {"n": "d" * 65}, {"s": -1}):
        with pytest.raises(ProtocolError):
            Shape.decode({**shape.encode(), **bad}, ProtocolParams())


def test_fail_codes() -> None:
    assert fail_code(VerificationError("x")) is FailCode.VERIFICATION
    assert fail_code(ProtocolError("x")) is FailCode.PROTOCOL
    assert fail_code(asyncio.CancelledError()) is fail_code(KeyboardInterrupt()) is FailCode.ABORTED
    assert fail_code(ImageError("x")) is fail_code(OSError()) is FailCode.INTERNAL


def test_kinds_travel_compressed_within_their_announced_count() -> None:
    """Runs of one kind (a want's thousands of references or blocks) travel as a zstd frame, which
    is decompressed only to the count the receiver expects or the message announces within its
    bound: another count, a bomb, or both forms at once are refused."""
    cctx = zstandard.ZstdCompressor()
    kinds = bytes([2] * 700 + [0] * 300)
    msg: dict[str, Any] = {}
    assert put_kinds(msg, kinds, cctx, count=True) < 100 and "k" not in msg and msg["kn"] == 1000
    assert get_kinds(msg, None, 1000, "blocks") == kinds
    with pytest.raises(ProtocolError):
        get_kinds(msg, None, 999, "blocks")                       # more than this batch may hold
    with pytest.raises(ProtocolError):
        get_kinds({**msg, "kn": 999}, None, 1000, "blocks")      # a frame of another size
    with pytest.raises(ProtocolError):
        get_kinds({**msg, "k": kinds}, None, 1000, "blocks")
    bomb = {"kz": cctx.compress(bytes(1 << 20)), "kn": 1 << 20}
    with pytest.raises(ProtocolError):
        get_kinds(bomb, None, 4096, "blocks")
    part: dict[str, Any] = {}
    assert put_kinds(part, bytes([1, 2, 3]), cctx, count=False) == 3 and part == {"k": bytes([1, 2, 3])}
    assert get_kinds(part, 3, 3, "want") == bytes([1, 2, 3])
