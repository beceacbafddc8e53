"""store/ckstream.py: the checkpoint stream's encoder and decoder, sans-I/O. Round trips keep
holes and zero pages out of the stream and reproduce every byte; a cut anywhere, a flipped byte
anywhere, and every lie a header or manifest can tell are refused with a project error, before
anything is allocated for it. ``fuzz_stream`` / ``fuzz_generate`` are the fuzz target
(``make fuzz``: ``checkpoint-stream``)."""

from __future__ import annotations

import json
import random
import struct
from typing import Any

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from replay_migrate.errors import CheckpointError, ReplayMigrateError, VerificationError
from store.ckstream import (
    DATA_HEAD,
    HEADER,
    MAGIC,
    PAGE,
    RECORD,
    DecoderState,
    FileEntry,
    Kind,
    ManifestRead,
    Pages,
    StreamDecoder,
    StreamEncoder,
    StreamEnded,
    StreamLimits,
    StreamManifest,
    compress_bound,
    nonzero_pages,
)

ROOT = "ab" * 32
SMALL = StreamLimits(max_span=8 * PAGE, max_file_size=1 << 20, max_screen_size=1 << 16, max_data_bytes=1 << 22)
"""Limits for the small streams of these tests and of the fuzz target."""


def manifest(contents: dict[str, bytes], **over: Any) -> StreamManifest:
    fields: dict[str, Any] = dict(name="ck-1", image_recipe="0123456789abcdef", virt="qemu", memory_mib=64,
                                  created=1.5, boot_to_desktop_s=30.0, save_s=1.0,
                                  roots={"memory": ROOT, "disk": "cd" * 32}, base_blake3="ef" * 32,
                                  base_size=12345)
    fields.update(over)
    fields.setdefault("files", tuple(FileEntry(n, len(d), len(d)) for n, d in contents.items()))
    return StreamManifest(**fields)


def encode(files: dict[str, bytes], *, max_span: int = 8 * PAGE, m: StreamManifest | None = None) -> bytes:
    """A whole stream of ``files`` (name -> content), every span of ``max_span``."""
    enc = StreamEncoder(max_span=max_span)
    out = [enc.header(), enc.manifest(m or manifest(files))]
    for index, data in enumerate(files.values()):
        for off in range(0, len(data), max_span):
            out.append(enc.span(index, off, data[off:off + max_span]))
    out.append(enc.end())
    return b"".join(out)


def decode(stream: bytes, *, split: int = 0, limits: StreamLimits = SMALL) -> tuple[StreamManifest, dict[str, bytes]]:
    """The manifest and the files a stream rebuilds (holes as zeros), fed whole or in ``split``-byte pieces."""
    dec = StreamDecoder(limits)
    events = []
    step = split or len(stream) or 1
    for i in range(0, len(stream), step):
        events += dec.feed(stream[i:i + step])
    dec.close()
    assert isinstance(events[0], ManifestRead) and isinstance(events[-1], StreamEnded)
    m = events[0].manifest
    files = {f.name: bytearray(f.size) for f in m.files}
    for ev in events[1:-1]:
        assert isinstance(ev, Pages)
        for off, data in ev.runs:
            files[ev.file][off:off + len(data)] = data
    return m, {k: bytes(v) for k, v in files.items()}


def sparse(rng: random.Random, pages: int, tail: int = 0, density: float = 0.3) -> bytes:
    """A file of mostly zero pages with some random ones (and ``tail`` bytes after the last page)."""
    out = bytearray(pages * PAGE + tail)
    for p in range(pages):
        if rng.random() < density:
            out[p * PAGE:(p + 1) * PAGE] = rng.randbytes(PAGE)
    if tail:
        out[-tail:] = rng.randbytes(tail)
    return bytes(out)


FILES = {"memory.sav": sparse(random.Random(1), 40, tail=123), "disk.qcow2": sparse(random.Random(2), 20, density=0.6),
         "screen.png": b"\x89PNG" + bytes(50)}


def test_round_trip_skips_zero_pages_and_rebuilds_every_byte() -> None:
    stream = encode(FILES)
    m, files = decode(stream)
    assert files == FILES and m == manifest(FILES)
    nonzero = sum(int(nonzero_pages(d).sum()) for d in FILES.values())
    enc = StreamEncoder(max_span=8 * PAGE)
    for index, data in enumerate(FILES.values()):
        for off in range(0, len(data), 8 * PAGE):
            enc.span(index, off, data[off:off + 8 * PAGE])
    assert enc.data_in < nonzero * PAGE                  # short last pages count for what they hold
    assert enc.data_in > (nonzero - 3) * PAGE
    assert enc.span(0, 0, bytes(3 * PAGE)) == b""        # an all-zero span is no record at all


@pytest.mark.parametrize("split", [1, 7, 4096, 100_000])
def test_any_split_of_the_input_decodes_the_same(split: int) -> None:
    assert decode(encode(FILES), split=split)[1] == FILES


def test_nonzero_pages_counts_a_short_last_page() -> None:
    assert nonzero_pages(bytes(PAGE) + b"\x01" + bytes(PAGE - 1) + b"\0\0\x05").tolist() == [False, True, True]
    assert nonzero_pages(bytes(PAGE + 3)).tolist() == [False, False]


def test_a_cut_anywhere_is_refused_as_truncated() -> None:
    stream = encode({"memory.sav": sparse(random.Random(3), 10), "disk.qcow2": sparse(random.Random(4), 3)})
    for cut in range(len(stream)):
        dec = StreamDecoder(SMALL)
        with pytest.raises(CheckpointError) as e:
            dec.feed(stream[:cut])
            dec.close()
        assert "truncated" in str(e.value) or (cut < HEADER.size and not MAGIC.startswith(stream[:cut])), \
            (cut, e.value)
        assert dec.state is DecoderState.FAILED


def test_a_flipped_byte_anywhere_is_refused() -> None:
    stream = encode({"memory.sav": sparse(random.Random(5), 12, tail=9), "disk.qcow2": sparse(random.Random(6), 4)})
    for pos in range(len(stream)):
        bad = bytearray(stream)
        bad[pos] ^= 1 << (pos % 8)
        with pytest.raises((CheckpointError, VerificationError)):
            decode(bytes(bad))


def test_bytes_after_the_end_are_refused() -> None:
    stream = encode(FILES)
    with pytest.raises(CheckpointError, match="after the end"):
        decode(stream + b"\0")
    dec = StreamDecoder(SMALL)
    dec.feed(stream)
    with pytest.raises(CheckpointError, match="after the end"):
        dec.feed(b"x")


def test_a_tampered_payload_with_the_old_digest_fails_verification() -> None:
    """A page changed and re-compressed (framing all valid): only the digest can tell."""
    files = {"memory.sav": b"\x01" * PAGE, "disk.qcow2": b"\x02" * PAGE}
    good = encode(files)
    evil = encode({"memory.sav": b"\x03" * PAGE, "disk.qcow2": files["disk.qcow2"]})
    tampered = evil[:-(RECORD.size + 32)] + good[-(RECORD.size + 32):]
    with pytest.raises(VerificationError, match="digest"):
        decode(tampered)


def test_not_a_stream() -> None:
    for junk in (b"PK\x03\x04", b"RMCKPT\n\n", b"\x00" * 20):
        with pytest.raises(CheckpointError, match="not a replay-migrate checkpoint stream"):
            StreamDecoder().feed(junk)
    with pytest.raises(CheckpointError, match="version 2"):
        StreamDecoder().feed(HEADER.pack(MAGIC, 2, 0))


def _with_records(*records: tuple[int, bytes], m: StreamManifest | None = None, seal: bool = True) -> bytes:
    """A stream of the given raw records after a valid header and manifest, with a correct END."""
    import blake3

    body = HEADER.pack(MAGIC, 1, 0) + RECORD.pack(Kind.MANIFEST, len(j := (m or manifest(FILES)).to_json())) + j
    body += b"".join(RECORD.pack(k, len(b)) + b for k, b in records)
    return body + (RECORD.pack(Kind.END, 32) + blake3.blake3(body).digest() if seal else b"")


def _data(index: int, offset: int, span: int, bitmap: bytes, content: bytes, *,
          frame: bytes | None = None) -> tuple[int, bytes]:
    z = frame if frame is not None else zstandard.ZstdCompressor().compress(content)
    return Kind.DATA, DATA_HEAD.pack(index, offset, span) + bitmap + z


PAGE1 = b"\x07" * PAGE


@pytest.mark.parametrize(("record", "words"), [
    (_data(5, 0, PAGE, b"\x01", PAGE1), "does not list"),
    (_data(0, 100, PAGE, b"\x01", PAGE1), "from a page start"),
    (_data(0, 0, 0, b"", b""), "span of 0"),
    (_data(0, 0, 9 * PAGE, b"\x01\x00", PAGE1), "span of"),
    (_data(0, 39 * PAGE, 2 * PAGE, b"\x01", PAGE1), "passes the file's size"),
    (_data(0, 0, PAGE + 5, b"\x01", PAGE1), "not whole pages"),
    (_data(0, 0, PAGE, b"\x00", b""), "marks no page"),
    (_data(0, 0, PAGE, b"\x03", PAGE1), "past the span"),
    (_data(0, 0, PAGE, b"\x01", PAGE1[:-1]), "declares 4095 bytes"),
    (_data(0, 0, PAGE, b"\x01", b"", frame=zstandard.ZstdCompressor(write_content_size=False).compress(PAGE1)),
     "does not declare its size"),
    (_data(0, 0, 2 * PAGE, b"", b"", frame=b""), "inside its page bitmap"),
    ((Kind.DATA, b"\x00" * 5), "shorter than its header"),
    ((Kind.MANIFEST, manifest(FILES).to_json()), "second manifest"),
    ((9, b""), "unknown record kind"),
])
def test_every_lie_of_a_data_record_is_refused(record: tuple[int, bytes], words: str) -> None:
    with pytest.raises(CheckpointError, match=words):
        decode(_with_records(record))


def test_spans_must_ascend_within_a_file() -> None:
    a = _data(0, PAGE, PAGE, b"\x01", PAGE1)
    with pytest.raises(CheckpointError, match="overlaps"):
        decode(_with_records(a, _data(0, 0, PAGE, b"\x01", PAGE1)))
    with pytest.raises(CheckpointError, match="overlaps"):
        decode(_with_records(a, a))
    decode(_with_records(a, _data(1, 0, PAGE, b"\x01", PAGE1)))     # another file starts at 0 again


def test_a_file_gets_no_more_data_than_announced() -> None:
    m = manifest(FILES, files=(FileEntry("memory.sav", 4 * PAGE, PAGE), FileEntry("disk.qcow2", PAGE, PAGE)))
    decode(_with_records(_data(0, 0, PAGE, b"\x01", PAGE1), m=m))
    with pytest.raises(CheckpointError, match="more data"):
        decode(_with_records(_data(0, 0, PAGE, b"\x01", PAGE1), _data(0, PAGE, PAGE, b"\x01", PAGE1), m=m))


def test_a_record_longer_than_its_kind_allows_is_refused_before_its_body_arrives() -> None:
    head = HEADER.pack(MAGIC, 1, 0)
    for kind, length in ((Kind.MANIFEST, SMALL.max_manifest_bytes + 1), (Kind.END, 33),
                         (Kind.DATA, SMALL.max_record(Kind.DATA) + 1), (Kind.DATA, 0xFFFFFFFF)):
        dec = StreamDecoder(SMALL)
        with pytest.raises(CheckpointError, match="allowed"):
            dec.feed(head + RECORD.pack(kind, length))       # nothing of the body yet
    assert SMALL.max_record(Kind.DATA) == DATA_HEAD.size + 1 + compress_bound(8 * PAGE)
    assert len(zstandard.ZstdCompressor(level=19).compress(random.Random(0).randbytes(1 << 20))) \
        <= compress_bound(1 << 20)


def test_a_zstd_bomb_is_refused_before_it_inflates() -> None:
    bomb = struct.pack("<IBB", 0xFD2FB528, 0xC0, 7 << 3) + struct.pack("<Q", 1 << 40) + b"\x01\x00\x00"
    with pytest.raises(CheckpointError, match="declares"):
        decode(_with_records(_data(0, 0, PAGE, b"\x01", b"", frame=bomb)))


def _manifest_doc(**changes: Any) -> bytes:
    doc = json.loads(manifest(FILES).to_json())
    for path, value in changes.items():
        *parents, key = path.split("__")
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if value is KeyError:
            del node[key]
        else:
            node[key] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize(("changes", "words"), [
    ({"checkpoint__name": "../x"}, "bad checkpoint name"),
    ({"checkpoint__name": "x.partial"}, "reserved"),
    ({"checkpoint__virt": "xen"}, "virt"),
    ({"checkpoint__memory_mib": 0}, "memory_mib"),
    ({"checkpoint__memory_mib": True}, "memory_mib"),
    ({"checkpoint__created": -1}, "created"),
    ({"checkpoint__image_recipe": "0123456789ABCDEF"}, "image_recipe"),
    ({"roots__memory": "ab" * 31}, "roots.memory"),
    ({"roots__disk": KeyError}, "roots.disk"),
    ({"base__recipe": "fedcba9876543210"}, "recipe is not the checkpoint's"),
    ({"base__size": -1}, "base.size"),
    ({"files__0__data": 10 ** 9}, "data"),
    ({"files__1__name": "../../etc/passwd"}, "unknown file"),
    ({"files__0__size": 1 << 41}, "size"),
    ({"files__2__size": (1 << 16) + 1}, "size"),
    ({"files__0__extra": 1}, "unknown manifest field"),
    ({"surprise": {}}, "unknown manifest field"),
    ({"version": 2}, "version 1"),
    ({"format": "tar"}, "version 1"),
])
def test_every_manifest_field_is_checked(changes: dict[str, Any], words: str) -> None:
    with pytest.raises(CheckpointError, match=words):
        StreamManifest.from_json(_manifest_doc(**changes), SMALL)


@pytest.mark.parametrize(("body", "words"), [
    (b"{", "not JSON"),
    (b"[" * 50_000, "not JSON"),
    (b'{"x": NaN}', "not JSON"),
    (b"\xff", "not JSON"),
    (b"[]", "not an object"),
])
def test_a_manifest_that_is_not_json_is_refused(body: bytes, words: str) -> None:
    with pytest.raises(CheckpointError, match=words):
        StreamManifest.from_json(body, StreamLimits())


def test_files_in_order_once_with_the_two_required() -> None:
    def files(*names: str) -> bytes:
        doc = json.loads(manifest(FILES).to_json())
        doc["files"] = [{"name": n, "size": 1, "data": 1} for n in names]
        return json.dumps(doc).encode()

    StreamManifest.from_json(files("memory.sav", "disk.qcow2"), SMALL)
    for bad, words in ((("disk.qcow2", "memory.sav"), "out of order"),
                       (("memory.sav", "memory.sav", "disk.qcow2"), "out of order"),
                       (("memory.sav",), "no disk.qcow2"),
                       (("memory.sav", "disk.qcow2", "screen.png", "x"), "too many")):
        with pytest.raises(CheckpointError, match=words):
            StreamManifest.from_json(files(*bad), SMALL)


def test_the_data_announced_in_all_is_bounded() -> None:
    big = manifest(FILES, files=(FileEntry("memory.sav", 1 << 20, 1 << 20), FileEntry("disk.qcow2", 1 << 20, 1 << 20)))
    StreamManifest.from_json(big.to_json(), SMALL)
    with pytest.raises(CheckpointError, match="more than"):
        StreamManifest.from_json(big.to_json(), StreamLimits(max_span=8 * PAGE, max_data_bytes=(1 << 21) - 1))


def test_data_before_the_manifest_and_an_end_without_one() -> None:
    head = HEADER.pack(MAGIC, 1, 0)
    kind, body = _data(0, 0, PAGE, b"\x01", PAGE1)
    with pytest.raises(CheckpointError, match="before the manifest"):
        StreamDecoder(SMALL).feed(head + RECORD.pack(kind, len(body)) + body)
    with pytest.raises(CheckpointError, match="before its manifest"):
        StreamDecoder(SMALL).feed(head + RECORD.pack(Kind.END, 32) + bytes(32))


def test_limits_refuse_spans_that_are_not_pages() -> None:
    with pytest.raises(ValueError):
        StreamLimits(max_span=5000)
    with pytest.raises(ValueError):
        StreamEncoder().span(0, 3, b"x")


# ---- the fuzz target ------------------------------------------------------------------------------


def fuzz_stream(data: bytes) -> None:
    """The fuzz target (``make fuzz``): ``data`` as an import stream, fed in pieces whose sizes
    come from its own bytes. Only CheckpointError or VerificationError may escape; an accepted
    stream's pages must lie inside the files the manifest declares, ascend, and add up to no more
    than it announced."""
    dec = StreamDecoder(SMALL)
    events: list[ManifestRead | Pages | StreamEnded] = []
    step = 1 + (data[-1] if data else 0) * 37
    for i in range(0, len(data), step):
        events += dec.feed(data[i:i + step])
    dec.close()
    m = events[0].manifest if isinstance(events[0], ManifestRead) else None
    assert m is not None and isinstance(events[-1], StreamEnded)
    sizes = {f.name: f.size for f in m.files}
    end = dict.fromkeys(sizes, 0)
    total = 0
    for ev in events[1:-1]:
        assert isinstance(ev, Pages)
        for off, piece in ev.runs:
            assert off >= end[ev.file] and off + len(piece) <= sizes[ev.file] and piece
            end[ev.file] = off + len(piece)
            total += len(piece)
    assert total <= m.data_bytes


def _mutate_record(rng: random.Random, kind: int, body: bytes) -> tuple[int, bytes]:
    from bench.fuzz import interesting_int, mutate_bytes, mutate_obj

    if kind == Kind.MANIFEST and rng.random() < 0.7:
        doc = mutate_obj(rng, json.loads(body))
        return kind, json.dumps(doc, default=lambda o: o.hex() if isinstance(o, bytes) else str(o)).encode()
    if kind == Kind.DATA and len(body) >= DATA_HEAD.size:
        index, offset, span = DATA_HEAD.unpack_from(body)
        op = rng.randrange(4)
        if op == 0:
            field = rng.randrange(3)
            values = [index, offset, span]
            values[field] = interesting_int(rng, values[field]) % (256, 1 << 64, 1 << 32)[field]
            return kind, DATA_HEAD.pack(*values) + body[DATA_HEAD.size:]
        if op == 1:              # the content changed and re-compressed, the bitmap kept
            npages = -(-span // PAGE)
            nb = (npages + 7) // 8
            try:
                content = zstandard.ZstdDecompressor().decompress(body[DATA_HEAD.size + nb:], max_output_size=1 << 20)
            except zstandard.ZstdError:
                content = b""
            return kind, body[:DATA_HEAD.size + nb] + zstandard.ZstdCompressor().compress(
                mutate_bytes(rng, content))
    return rng.choice((kind, kind, kind, rng.randrange(6))), mutate_bytes(rng, body)


def fuzz_generate(rng: random.Random) -> bytes:
    """A small valid stream, then (mostly) one record mutated and the stream re-sealed with a
    correct digest (so the checks behind the digest are reached), or bytes mutated, or cut."""
    import blake3

    from bench.fuzz import mutate_bytes

    files = {"memory.sav": sparse(rng, rng.randrange(1, 24), tail=rng.choice((0, 0, rng.randrange(1, PAGE)))),
             "disk.qcow2": sparse(rng, rng.randrange(0, 8), density=0.7)}
    if rng.random() < 0.3:
        files["screen.png"] = rng.randbytes(rng.randrange(1, 300))
    stream = encode(files, max_span=rng.choice((PAGE, 2 * PAGE, 8 * PAGE)))
    op = rng.randrange(10)
    if op == 0:
        return stream
    if op == 1:
        return stream[:rng.randrange(len(stream))]
    if op == 2:
        return mutate_bytes(rng, stream, max_ops=3)
    records: list[tuple[int, bytes]] = []
    pos = HEADER.size
    while pos < len(stream):
        kind, length = RECORD.unpack_from(stream, pos)
        records.append((kind, stream[pos + RECORD.size:pos + RECORD.size + length]))
        pos += RECORD.size + length
    records.pop()                                                   # END: recomputed below
    k = rng.randrange(len(records))
    records[k] = _mutate_record(rng, *records[k])
    if rng.random() < 0.2:
        records.insert(rng.randrange(len(records) + 1), records[rng.randrange(len(records))])
    body = stream[:HEADER.size] + b"".join(RECORD.pack(kind % 256, len(b)) + b for kind, b in records)
    return body + RECORD.pack(Kind.END, 32) + blake3.blake3(body).digest()


def _accepts(data: bytes) -> bool:
    try:
        fuzz_stream(data)
    except ReplayMigrateError:
        return False
    return True


def test_the_fuzz_generator_reaches_acceptance_and_refusal() -> None:
    outcomes = [_accepts(fuzz_generate(random.Random(k))) for k in range(150)]
    assert 5 < sum(outcomes) < 140, sum(outcomes)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32))
def test_fuzz_stream(seed: int) -> None:
    _accepts(fuzz_generate(random.Random(seed)))


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_stream_raw_bytes(data: bytes) -> None:
    _accepts(HEADER.pack(MAGIC, 1, 0) + data)


def test_bounded_memory_for_a_long_stream() -> None:
    """The decoder holds at most one record: feeding 2 MiB of a stream never buffers more than a
    record plus the piece fed."""
    data = random.Random(9).randbytes(64 * PAGE)
    stream = encode({"memory.sav": data, "disk.qcow2": PAGE1}, max_span=8 * PAGE)
    dec = StreamDecoder(SMALL)
    biggest = 0
    for i in range(0, len(stream), 5000):
        dec.feed(stream[i:i + 5000])
        biggest = max(biggest, len(dec._buf))
    dec.close()
    assert biggest <= SMALL.max_record(Kind.DATA) + RECORD.size + 5000

