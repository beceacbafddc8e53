"""Fuzz targets of the diff protocol: recorded real transfers, mutated where it matters, fed to
a source and to a target (differ.protocol, driven by differ.transfer)."""

from __future__ import annotations

import functools
import random
import struct
from typing import Any

import msgpack
import zstandard

from bench.fuzz import (
    interesting_int,
    mutate_bytes,
    mutate_obj,
)
from bench.fuzz_targets.common import PAGE, _packb
from differ.memsource import MemoryImage, MemorySource
from differ.merkle import MerkleTree
from differ.protocol import ProtocolParams, SourceState, TargetState
from differ.transfer import (
    BlockingSource,
    BlockingTarget,
    ReferenceImage,
    SourceImage,
    TargetImage,
    blocking_source,
    blocking_target,
)

# -- the diff protocol (differ.protocol, driven by differ.transfer) ------------------------------

KEY = bytes(range(32))
PROTOCOL_PARAMS = ProtocolParams(max_message_bytes=64 << 10, max_batch_entries=64, window=2)
"""Small batches and windows, so a short transfer has several of each message."""


def _page(rng: random.Random, kind: str) -> bytes:
    if kind == "zero":
        return bytes(PAGE)
    if kind == "text":
        return (rng.choice((b"abcd", b"hello world ", b"\x00\x01")) * PAGE)[:PAGE]
    return rng.randbytes(PAGE)


def _scenario_images(k: int) -> tuple[dict[str, bytes], dict[str, bytes], dict[str, bytes], list[bytes]]:
    """Scenario ``k``: (source images A, target images B, common bases, target references)."""
    rng = random.Random(f"scenario-{k}")
    names = ("disk",) if k % 2 == 0 else ("memory", "disk")
    a: dict[str, bytes] = {}
    b: dict[str, bytes] = {}
    bases: dict[str, bytes] = {}
    for name in names:
        n = rng.randint(12, 40)
        base = [_page(rng, rng.choice(("zero", "text", "rand"))) for _ in range(n)]
        src, tgt = list(base), list(base)
        for i in rng.sample(range(n), n // 3):  # both sides changed (replay), differently or alike
            src[i] = _page(rng, rng.choice(("text", "rand", "zero")))
            tgt[i] = src[i] if rng.random() < 0.4 else _page(rng, "rand")
        for i in rng.sample(range(n), n // 6):  # a few bytes of a page
            p = bytearray(src[i])
            p[rng.randrange(PAGE)] ^= 0xFF
            src[i] = bytes(p)
        if n > 4:
            src[-1] = src[1]  # a duplicate
        tail = rng.choice((0, 0, 100))
        a[name] = b"".join(src) + rng.randbytes(tail) + (b"".join(_page(rng, "text") for _ in range(k % 3)))
        b[name] = b"".join(tgt)
        if k % 3 != 2:
            bases[name] = b"".join(base)
    refs = [b"".join(_page(rng, "rand") for _ in range(4)) + a[names[0]][:PAGE * 2]] if k % 4 == 1 else []
    return a, b, bases, refs


N_SCENARIOS = 6


@functools.cache
def _scenario_trees(k: int) -> dict[str, Any]:
    a, b, bases, refs = _scenario_images(k)
    tree = functools.partial(MerkleTree.from_bytes, fanout=4)
    return {"a": a, "b": b, "bases": bases, "refs": refs,
            "ta": {n: tree(d) for n, d in a.items()}, "tb": {n: tree(d) for n, d in b.items()},
            "tbase": {n: MerkleTree.from_bytes(d) for n, d in bases.items()},
            "tref": [MerkleTree.from_bytes(r) for r in refs]}


def _base(s: dict[str, Any], name: str) -> ReferenceImage | None:
    return ReferenceImage(MemorySource(s["bases"][name]), s["tbase"][name]) if name in s["bases"] else None


def _source(k: int) -> BlockingSource:
    s = _scenario_trees(k)
    return blocking_source([SourceImage(n, MemorySource(d), s["ta"][n], base=_base(s, n)) for n, d in s["a"].items()],
                  PROTOCOL_PARAMS)


def _target(k: int) -> tuple[BlockingTarget, dict[str, MemoryImage]]:
    s = _scenario_trees(k)
    images = {n: MemoryImage(d) for n, d in s["b"].items()}
    target = blocking_target(
        [TargetImage(n, im.source(), s["tb"][n], im.sink(), base=_base(s, n)) for n, im in images.items()],
        PROTOCOL_PARAMS,
        references=[ReferenceImage(MemorySource(r), t) for r, t in zip(s["refs"], s["tref"], strict=True)],
        key=KEY,
    )
    return target, images


@functools.cache
def recorded_transfer(k: int) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """A real transfer of scenario ``k``: (source→target messages, target→source messages)."""
    source, (target, _) = _source(k), _target(k)
    target.start()
    to_target: list[bytes] = []
    to_source: list[bytes] = []
    for _ in range(10_000):
        moved = False
        for m in target.data_to_send():
            moved = True
            to_source.append(m)
            source.receive_data(m)
        for m in source.data_to_send():
            moved = True
            to_target.append(m)
            target.receive_data(m)
        if not moved:
            break
    assert target.state is TargetState.VERIFIED and source.state is SourceState.VERIFIED
    return tuple(to_target), tuple(to_source)


def zstd_frame_declaring(size: int, rle_blocks: int = 0, fill: int = 0) -> bytes:
    """A zstd frame that declares ``size`` bytes and holds ``rle_blocks`` RLE blocks of 128 KiB."""
    head = struct.pack("<IBB", 0xFD2FB528, 0xC0, 7 << 3) + struct.pack("<Q", size)
    if not rle_blocks:
        return head + (1).to_bytes(3, "little")
    return head + b"".join(((128 << 10) << 3 | 1 << 1 | (j == rle_blocks - 1)).to_bytes(3, "little") + bytes([fill])
                           for j in range(rle_blocks))


def _unzstd(z: object, limit: int = 1 << 22) -> bytes:
    """What a (possibly already mutated) zstd frame holds, for a generator: b"" unless it is an
    honest frame of at most ``limit`` bytes (the generator must not fall for a bomb either)."""
    if not isinstance(z, bytes):
        return b""
    try:
        if not 0 <= zstandard.get_frame_parameters(z).content_size <= limit:
            return b""
        return bytes(zstandard.ZstdDecompressor().decompress(z, max_output_size=limit))
    except zstandard.ZstdError:
        return b""


def _mutate_body(rng: random.Random, body: bytes) -> bytes:
    """A compressed batch body: its content mutated and re-compressed (so it reaches the checks
    after decompression), or a frame that lies about its size, or damaged compressed bytes."""
    op = rng.randrange(9)
    if op <= 2:
        return bytes(zstandard.ZstdCompressor().compress(mutate_bytes(rng, body)))
    if op == 3:  # a bomb: few bytes declaring (and some inflating to) far more than the batch holds
        return zstd_frame_declaring(rng.choice((1 << 44, 1 << 36, 1 << 30)), rle_blocks=rng.choice((0, 1, 8, 8192)))
    if op == 8:
        return zstd_frame_declaring(rng.choice((len(body) + 1, len(body), max(0, len(body) - 1))),
                                    rle_blocks=rng.choice((0, 1, 8)), fill=rng.randrange(256))
    if op == 4:
        return bytes(zstandard.ZstdCompressor(write_content_size=False).compress(body))
    if op == 5:
        z = bytes(zstandard.ZstdCompressor().compress(body))
        return z + rng.choice((z, b"\x00", bytes(zstandard.ZstdCompressor().compress(b"x"))))
    return mutate_bytes(rng, bytes(zstandard.ZstdCompressor().compress(body)))


def _raw_kinds(part: dict[str, Any]) -> dict[str, Any]:
    """``part`` with its kinds as ``k`` rather than a zstd frame ``kz`` (and its count ``kn``)."""
    if "kz" not in part:
        return part
    out = {k: v for k, v in part.items() if k not in ("kz", "kn")}
    out["k"] = _unzstd(part["kz"])
    return out


def _mutate_bits(rng: random.Random, bits: bytes) -> bytes:
    if bits and rng.random() < 0.7:
        b = bytearray(bits)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    return mutate_bytes(rng, bits)


def mutate_protocol_message(rng: random.Random, data: bytes) -> bytes:
    """One protocol message, decoded and mutated where it matters: a batch's compressed body, its
    answer kinds, digest rests and delta bitmaps; walk and want bitmaps, digests and levels; image
    shapes; any field at all (generic); or split into fragments that may lie."""
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:
        return mutate_bytes(rng, data)
    if not isinstance(msg, dict):
        return _packb(mutate_obj(rng, msg))
    op = rng.randrange(10)
    t = msg.get("t")
    if op <= 5:     # compressed kinds as they are (both forms are accepted), so that they mutate too
        msg = _raw_kinds(msg)
        if isinstance(msg.get("p"), list):
            msg["p"] = [_raw_kinds(p) if isinstance(p, dict) else p for p in msg["p"]]
    if op <= 1 and t == "blocks" and isinstance(msg.get("k"), bytes):
        return _packb(_rewrite_blocks(rng, msg))
    if op <= 1 and t == "want" and isinstance(msg.get("p"), list):
        return _packb(_rewrite_want(rng, msg))
    if op <= 2 and t in ("tree", "hello") and isinstance(msg.get("img"), list) and msg["img"]:
        return _packb(_reshape(rng, msg))
    if op <= 3 and t == "blocks":
        field = rng.choice(("z", "z", "z", "k", "h", "dm", "o", "n", "r"))
        if field == "z" and "z" in msg:
            msg["z"] = _mutate_body(rng, _unzstd(msg["z"]))
        elif field == "r" and "z" in msg:
            msg["r"] = _unzstd(msg.pop("z"))
        elif field in msg and isinstance(msg[field], bytes):
            msg[field] = bytes(rng.randrange(6) for _ in msg[field]) if field == "k" and rng.random() < 0.5 \
                else _mutate_bits(rng, msg[field])
        else:
            msg = mutate_obj(rng, msg)
    elif op <= 5 and t in ("tree", "walk", "want", "hello") and isinstance(msg.get(_PARTS.get(t, "")), list):
        key = _PARTS[t]
        parts = msg[key]
        live = [i for i, p in enumerate(parts) if isinstance(p, dict)]
        if live:
            i = rng.choice(live)
            part = dict(parts[i])
            if not part:
                return _packb(mutate_obj(rng, msg))
            f = rng.choice(list(part))
            v = part[f]
            part[f] = _mutate_bits(rng, v) if isinstance(v, bytes) else interesting_int(rng, v) \
                if isinstance(v, int) and not isinstance(v, bool) else mutate_obj(rng, v)
            parts = list(parts)
            parts[i] = part
            msg[key] = parts
        else:
            msg = mutate_obj(rng, msg)
    elif op == 6 and t != "frag":
        return rng.choice(_fragments(rng, msg))
    else:
        fields = [f for f in msg if f not in ("t", "v")]
        if fields and rng.random() < 0.85:  # mostly a field of the message, not its type or version
            f = rng.choice(fields)
            msg[f] = mutate_obj(rng, msg[f])
        else:
            msg = mutate_obj(rng, msg)
    return _packb(msg)


_PARTS = {"tree": "p", "walk": "p", "want": "p", "hello": "img"}
_SUB = PROTOCOL_PARAMS.sub_block_size
_FP = PROTOCOL_PARAMS.fingerprint_bytes
_N_SUB = PAGE // _SUB


def _rewrite_blocks(rng: random.Random, msg: dict[str, Any]) -> dict[str, Any]:
    """A batch re-encoded consistently after one of its answers changed kind or content, so the
    change gets past the layout checks to the per-kind and digest checks: a leaf sent whole
    instead of confirmed, a delta with other sub-blocks, an XOR where no base is, a flipped byte,
    two answers swapped. (Leaves are taken as whole pages; an image's short last leaf is not.)"""
    kinds = list(msg["k"])
    raw, dm = msg.get("r"), msg.get("dm")
    body: bytes = raw if isinstance(raw, bytes) else _unzstd(msg.get("z"))
    masks: bytes = dm if isinstance(dm, bytes) else b""
    entries: list[list[Any]] = []  # [kind, delta mask, payload]
    b_off = m_off = 0
    for kind in kinds:
        mask, payload = b"", b""
        if kind in (2, 4):  # FULL, XBASE
            payload, b_off = body[b_off : b_off + PAGE], b_off + PAGE
        elif kind == 3:  # DELTA
            mask, m_off = masks[m_off : m_off + _N_SUB // 8], m_off + _N_SUB // 8
            n = sum(bin(x).count("1") for x in mask)
            payload, b_off = body[b_off : b_off + n * _SUB], b_off + n * _SUB
        entries.append([kind, mask, payload])
    if entries:
        j = rng.randrange(len(entries))
        op = rng.randrange(5)
        if op == 0:  # another kind, with a payload of its shape
            kind = rng.randrange(6)
            mask = bytes(rng.choice((0, 1, 0x80, 0xFF, rng.randrange(256))) for _ in range(_N_SUB // 8))
            n = sum(bin(x).count("1") for x in mask)
            payload = {2: rng.randbytes(PAGE), 4: rng.randbytes(PAGE), 3: rng.randbytes(n * _SUB)}.get(kind, b"")
            entries[j] = [kind, mask if kind == 3 else b"", payload]
        elif op <= 2 and entries[j][2]:  # a flipped byte in what the leaf is built from
            p = bytearray(entries[j][2])
            p[rng.randrange(len(p))] ^= 1 << rng.randrange(8)
            entries[j][2] = bytes(p)
        elif op == 3 and len(entries) > 1:
            i = rng.randrange(len(entries))
            entries[i], entries[j] = entries[j], entries[i]
        else:
            entries[j][2] = entries[j][2][: rng.randrange(len(entries[j][2]) + 1)]
    body = b"".join(e[2] for e in entries)
    out = {**msg, "k": bytes(e[0] for e in entries), "dm": b"".join(e[1] for e in entries)}
    out.pop("r", None)
    out.pop("z", None)
    if rng.random() < 0.8 and body:
        out["z"] = bytes(zstandard.ZstdCompressor().compress(body))
    else:
        out["r"] = body
    return out


def _reshape(rng: random.Random, msg: dict[str, Any]) -> dict[str, Any]:
    """A tree or hello whose image entry announces another size, consistently (the leaf count that
    goes with it), so the size gets past the shape check to what the side does with it: grown a
    little, doubled, huge, at and past the limits."""
    img = list(msg["img"])
    i = rng.randrange(len(img))
    entry = dict(img[i]) if isinstance(img[i], dict) else {}
    raw = entry.get("s")
    old: int = raw if isinstance(raw, int) else 0
    size = rng.choice((0, 1, PAGE, old + 1, old + PAGE, 2 * old, 3 * old + (64 << 20), 1 << 36, (1 << 24) * PAGE,
                       (1 << 28) * PAGE, (1 << 28) * PAGE + 1, (1 << 32) * PAGE, rng.randrange(1 << 40)))
    entry["s"], entry["l"] = size, -(-size // PAGE)
    if rng.random() < 0.3:
        entry["f"] = rng.choice((2, 3, 4, 16, 256))
    img[i] = entry
    return {**msg, "img": img}


def _rewrite_want(rng: random.Random, msg: dict[str, Any]) -> dict[str, Any]:
    """A want re-encoded consistently after one request changed kind: the candidates, duplicate
    positions and fingerprints resized to what the new kinds need, with duplicate positions that
    may point anywhere (forward, at themselves, far away)."""
    parts = list(msg["p"])
    live = [i for i, p in enumerate(parts) if isinstance(p, dict) and isinstance(p.get("k"), bytes) and p["k"]]
    if not live:
        return msg
    i = rng.choice(live)
    part = dict(parts[i])
    kinds = bytearray(part["k"])
    kinds[rng.randrange(len(kinds))] = rng.randrange(7)
    part["k"] = bytes(kinds)
    n_dup = kinds.count(4)
    part["u"] = b"".join(rng.choice((0, 1, len(kinds), (1 << 32) - 1, rng.randrange(64))).to_bytes(4, "little")
                         for _ in range(n_dup))
    need = kinds.count(1) * _N_SUB * _FP
    raw = part.get("f")
    f: bytes = raw if isinstance(raw, bytes) else b""
    part["f"] = (f + rng.randbytes(max(0, need - len(f))))[:need]
    part["c"] = rng.randbytes(kinds.count(2) * PROTOCOL_PARAMS.ref_rest)  # a reference's check bytes
    parts[i] = part
    return {**msg, "p": parts}


def _fragments(rng: random.Random, msg: dict[str, Any]) -> list[bytes]:
    """``msg`` as fragment frames (the protocol's framing), one of which may lie about its place."""
    whole = _packb(msg)
    n = rng.randint(2, 4)
    step = -(-len(whole) // n)
    frames: list[Any] = [
        {"t": "frag", "v": msg.get("v", 2), "lt": msg.get("t"), "i": i, "n": n, "d": whole[i * step : (i + 1) * step]}
        for i in range(n)
    ]
    if rng.random() < 0.5:
        j = rng.randrange(n)
        frames[j] = mutate_obj(rng, frames[j])
    return [_packb(f) for f in frames]


def _protocol_input(rng: random.Random, direction: int) -> bytes:
    k = rng.randrange(N_SCENARIOS)
    msgs = list(recorded_transfer(k)[direction])
    if rng.random() > 0.03:
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(12)
            i = _pick(rng, [_kind(m) for m in msgs])
            if op <= 7:
                msgs[i] = mutate_protocol_message(rng, msgs[i])
            elif op == 8:
                del msgs[i]
            elif op == 9:
                msgs.insert(i, msgs[rng.randrange(len(msgs))])
            elif op == 10:
                try:
                    msg = msgpack.unpackb(msgs[i], raw=False, strict_map_key=False)
                except Exception:
                    msg = None
                msgs[i : i + 1] = _fragments(rng, msg) if isinstance(msg, dict) else [mutate_bytes(rng, msgs[i])]
            elif direction == 1 and rng.random() < 0.5:  # a reconnected target resumes from some batch
                n = rng.choice((0, 1, 2, 3, -1, 1 << 32, (1 << 32) + 1))
                msgs.insert(i, _packb({"t": "resume", "v": 2, "n": n}))
            else:
                other = recorded_transfer(rng.randrange(N_SCENARIOS))[direction]
                msgs.insert(i, rng.choice(other))
    return _packb([k, msgs])


def _kind(data: bytes) -> str:
    try:
        t = msgpack.unpackb(data, raw=False, strict_map_key=False).get("t", "")
    except Exception:
        return ""
    return t if isinstance(t, str) else ""


def _pick(rng: random.Random, kinds: list[str]) -> int:
    """A message to mutate: mostly a block batch, else a walk, want, tree or hello, else any."""
    r = rng.random()
    for want, p in (({"blocks"}, 0.5), ({"walk", "want", "tree", "hello"}, 0.8)):
        pool = [i for i, k in enumerate(kinds) if k in want]
        if pool and r < p:
            return rng.choice(pool)
    return rng.randrange(len(kinds))


def _unpack_input(data: bytes, direction: int) -> tuple[int, list[bytes]]:
    """The (scenario, messages) of a protocol target's input. Bytes that are not in that format
    (raw fuzz bytes) are one message, delivered after a prefix of a recorded transfer that both
    depend on the bytes: so raw bytes too reach a side in every state."""
    try:
        k, msgs = msgpack.unpackb(data, raw=False)
        if type(k) is int and 0 <= k < N_SCENARIOS and isinstance(msgs, list):
            return k, [m for m in msgs if isinstance(m, bytes)]
    except Exception:
        pass
    k = len(data) % N_SCENARIOS
    recorded = recorded_transfer(k)[direction]
    return k, [*recorded[: (data[0] if data else 0) % (len(recorded) + 1)], data]


def generate_protocol_target(rng: random.Random) -> bytes:
    return _protocol_input(rng, 0)


def run_protocol_target(data: bytes) -> None:
    """A target receives a (mutated) source's messages. If it ever verifies, every image it
    committed must be the source's, byte for byte: the root check is the guarantee."""
    k, msgs = _unpack_input(data, 0)
    target, images = _target(k)
    target.start()
    target.data_to_send()
    try:
        for m in msgs:
            if target.state in (TargetState.VERIFIED, TargetState.FAILED):
                break
            target.receive_data(m)
            target.data_to_send()
    finally:
        if target.state is TargetState.VERIFIED:
            a = _scenario_trees(k)["a"]
            assert all(images[n].data == a[n] for n in a), "the target verified images that are not the source's"
        else:
            assert all(images[n].data == _scenario_trees(k)["b"][n] for n in images), "unverified data committed"


def generate_protocol_source(rng: random.Random) -> bytes:
    return _protocol_input(rng, 1)


def run_protocol_source(data: bytes) -> None:
    """A source receives a (mutated) target's messages, and makes its batches as they ask."""
    k, msgs = _unpack_input(data, 1)
    source = _source(k)
    for m in msgs:
        if source.state in (SourceState.VERIFIED, SourceState.FAILED):
            break
        source.receive_data(m)
        source.data_to_send()
