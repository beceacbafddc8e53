"""The message schema: message types, request and answer kinds, and the field validators every
handler reads a peer's message through (each raises :class:`ProtocolError` naming the field).

A message is a msgpack map ``{"t": type, "v": PROTOCOL_VERSION, ...}``; which types a side accepts
in which state is in :mod:`differ.protocol._state`, how a message is framed in
:mod:`differ.protocol.framing`.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard

from differ.bounded import decompress_exact
from differ.merkle import DIGEST_SIZE, MAX_FANOUT, MIN_FANOUT, MerkleTree, leaf_count_for
from differ.protocol.params import ProtocolParams
from differ.source import LEAF_SIZE
from replay_migrate.errors import ProtocolError, VerificationError


class MsgType(enum.StrEnum):
    HELLO = "hello"
    TREE = "tree"
    WALK = "walk"
    WANT = "want"
    BLOCKS = "blocks"
    END = "end"
    ACK = "ack"
    RESUME = "resume"
    VERIFIED = "verified"
    FAILED = "failed"
    FRAG = "frag"


TYPES = frozenset(m.value for m in MsgType)
FRAGMENTABLE = frozenset({MsgType.HELLO, MsgType.TREE, MsgType.WALK, MsgType.WANT})


class FailCode(enum.IntEnum):
    """Why a side gave up; the only failure detail sent to the peer (never exception text)."""

    PROTOCOL = 1
    VERIFICATION = 2
    ABORTED = 3
    INTERNAL = 4


def fail_code(exc: BaseException) -> FailCode:
    """What a side tells its peer when it gives up because of ``exc``."""
    if isinstance(exc, VerificationError):
        return FailCode.VERIFICATION
    if isinstance(exc, ProtocolError):
        return FailCode.PROTOCOL
    if isinstance(exc, KeyboardInterrupt | asyncio.CancelledError):
        return FailCode.ABORTED
    return FailCode.INTERNAL


class Req(enum.IntEnum):
    """Target's request for one differing leaf."""

    BLOCK = 0
    """Send the block (the target has nothing similar at that place)."""
    DELTA = 1
    """Send the block; fingerprints of the target's block at that place are attached."""
    REF = 2
    """The target holds content with the source's digest prefix; confirm the rest (attached)."""
    ZERO = 3
    """The source's digest prefix is the zero leaf's; confirm."""
    DUP = 4
    """Same digest prefix as an earlier requested leaf of this transfer (position attached)."""
    BASE = 5
    """The source said its leaf equals the base's (base-relative walk): confirm."""


class Ans(enum.IntEnum):
    """Source's answer for one requested leaf."""

    OK = 0
    """Confirmed (REF, ZERO, DUP, BASE): the target applies what it proposed."""
    ZERO = 1
    """The leaf is all zeros."""
    FULL = 2
    """The whole leaf follows (rest of digest, bytes in the batch body)."""
    DELTA = 3
    """The sub-blocks whose fingerprints differ follow (rest of digest, bitmap, bytes)."""
    XBASE = 4
    """The leaf XOR the base's leaf follows (rest of digest, bytes): a page changed in a few places
    since the checkpoint compresses to almost nothing."""
    XSIM = 5
    """The leaf XOR *another* leaf of the base follows (rest of digest, the base leaf's number in
    the message's ``xl``, bytes): the checkpoint's page most like it, found by a similarity sketch
    (content the allocator placed elsewhere, a file page after a small edit)."""


class How(enum.Enum):
    """How a leaf reached the target: the name of its counter in :class:`~differ.protocol.stats.ImageStats`."""

    REFERENCED = "referenced"
    DUPLICATE = "duplicate"
    BASE = "base"
    ZERO = "zero"
    FULL = "full"
    DELTA = "delta"
    XBASE = "xbase"
    XSIM = "xsim"


HOW = {Ans.ZERO: How.ZERO, Ans.FULL: How.FULL, Ans.DELTA: How.DELTA, Ans.XBASE: How.XBASE, Ans.XSIM: How.XSIM}
SENT = (Ans.FULL, Ans.DELTA, Ans.XBASE, Ans.XSIM)
"""Answers that carry block bytes (and the check bytes of the digest)."""
CONFIRMED = {Req.REF: How.REFERENCED, Req.DUP: How.DUPLICATE, Req.ZERO: How.ZERO, Req.BASE: How.BASE}

MESSAGE_SLACK = 1024
"""Bytes of a message's envelope and per-image msgpack overhead, in the expected-size bounds."""
ENTRY_BYTES = 128
"""Bytes of one image entry of a hello or tree besides its name (size, leaves, fanout, root)."""


# -- fields --------------------------------------------------------------------------------------


def get(msg: dict[str, Any], key: str) -> Any:
    try:
        return msg[key]
    except KeyError:
        raise ProtocolError(f"message field {key!r} missing") from None


def integer(msg: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = get(msg, key)
    if type(v) is not int or not lo <= v <= hi:
        raise ProtocolError(f"message field {key!r} is not an integer in {lo}..{hi}")
    return v


def binary(msg: dict[str, Any], key: str, length: int | None = None, max_len: int | None = None) -> bytes:
    v = get(msg, key)
    if not isinstance(v, bytes):
        raise ProtocolError(f"message field {key!r} is not bytes")
    if length is not None and len(v) != length:
        raise ProtocolError(f"message field {key!r} has {len(v)} bytes, expected {length}")
    if max_len is not None and len(v) > max_len:
        raise ProtocolError(f"message field {key!r} longer than {max_len} bytes")
    return v


def string(msg: dict[str, Any], key: str, max_len: int) -> str:
    v = get(msg, key)
    if not isinstance(v, str) or not 1 <= len(v) <= max_len:
        raise ProtocolError(f"message field {key!r} is not a string of 1..{max_len} characters")
    return v


def array(msg: dict[str, Any], key: str, length: int | None = None, max_len: int | None = None) -> list[Any]:
    v = get(msg, key)
    if not isinstance(v, list):
        raise ProtocolError(f"message field {key!r} is not a list")
    if (length is not None and len(v) != length) or (max_len is not None and len(v) > max_len):
        raise ProtocolError(f"message field {key!r} has {len(v)} entries")
    return v


def mapping(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ProtocolError(f"{what} is not a map")
    return v


def put_kinds(msg: dict[str, Any], kinds: bytes, cctx: zstandard.ZstdCompressor, *, count: bool) -> int:
    """Put per-leaf kinds into ``msg``: ``k`` as they are, or ``kz``, a zstd frame of them, when
    that is smaller (runs of one kind: 2,974 kinds of a real migration's want took 322 bytes);
    ``count``: with ``kn``, their number, for a receiver that cannot know it beforehand. The
    bytes it put."""
    z = cctx.compress(kinds)
    if len(z) + (6 if count else 0) >= len(kinds):
        msg["k"] = kinds
        return len(kinds)
    msg["kz"] = z
    if count:
        msg["kn"] = len(kinds)
    return len(z) + (6 if count else 0)


def get_kinds(msg: dict[str, Any], length: int | None, max_len: int, what: str) -> bytes:
    """The kinds :func:`put_kinds` put: ``length`` of them when the receiver knows how many (else
    ``kn``, at most ``max_len``); a compressed frame is decompressed only to that size."""
    if "kz" not in msg:
        return binary(msg, "k", length, max_len)
    if "k" in msg:
        raise ProtocolError(f"{what}: both raw and compressed kinds")
    n = length if length is not None else integer(msg, "kn", 1, max_len)
    if n > max_len:
        raise ProtocolError(f"{what}: more kinds than allowed")
    return decompress_exact(binary(msg, "kz", max_len=n + 64), n, ProtocolError, f"{what} kinds")


def pack_bits(mask: npt.NDArray[np.bool_]) -> bytes:
    return np.packbits(mask, bitorder="little").tobytes()


def unpack_bits(data: bytes, n: int, what: str) -> npt.NDArray[np.bool_]:
    if len(data) != (n + 7) // 8:
        raise ProtocolError(f"{what}: bitmap of {len(data)} bytes for {n} entries")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if bits[n:].any():
        raise ProtocolError(f"{what}: bitmap padding bits set")
    return bits[:n].astype(bool)


@dataclass(frozen=True)
class Shape:
    """One image entry of a hello or tree: what a side says about its image."""

    name: str
    size: int
    leaves: int
    fanout: int
    root: bytes

    def encode(self) -> dict[str, Any]:
        return {"n": self.name, "s": self.size, "l": self.leaves, "f": self.fanout, "r": self.root}

    @staticmethod
    def decode(v: Any, params: ProtocolParams) -> Shape:
        m = mapping(v, "image entry")
        name = string(m, "n", params.max_name_len)
        size = integer(m, "s", 0, params.max_leaves * LEAF_SIZE)
        leaves = integer(m, "l", 0, params.max_leaves)
        fanout = integer(m, "f", MIN_FANOUT, MAX_FANOUT)
        root = binary(m, "r", DIGEST_SIZE)
        if leaves != leaf_count_for(size):
            raise ProtocolError(f"image {name!r}: {leaves} leaves do not fit {size} bytes")
        return Shape(name, size, leaves, fanout, root)

    @staticmethod
    def of(name: str, tree: MerkleTree) -> Shape:
        return Shape(name, tree.size, tree.leaf_count, tree.fanout, tree.root)
