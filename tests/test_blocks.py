"""differ.blocks: memory, qcow2 overlay and raw images as leaves; leaf digests of backing chains.

The qcow2 tests use real qemu-img/qemu-io (installed by scripts/setup-host.sh); without them they
fail, they never skip."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import threading
import tracemalloc
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest
from fuzzkit import fuzz_tests
from numpy.lib import format as np_format
from test_saveimage import PAGE, build_save_image

from differ import blocks
from differ.blocks import (
    LeafDigests,
    MemoryImageSource,
    Qcow2OverlaySource,
    RawImageSource,
    compute_leaf_digests,
    detect_format,
    open_source,
)
from differ.source import LEAF_SIZE, ZERO_LEAF_DIGEST, BlockSource
from replay_migrate.errors import ImageError

MIB = 1 << 20


def test_zero_leaf_digest_constant() -> None:
    assert blake3.blake3(bytes(LEAF_SIZE)).digest() == ZERO_LEAF_DIGEST
    assert LEAF_SIZE == PAGE


def file_leaf_digests(data: bytes) -> list[bytes]:
    """blake3 of every 4 KiB piece (the last one short), computed the obvious way."""
    return [blake3.blake3(data[i : i + LEAF_SIZE]).digest() for i in range(0, len(data), LEAF_SIZE)]


def known(source: BlockSource) -> dict[int, bytes | None]:
    items = list(source.known_leaves())
    indices = [i for i, _ in items]
    assert indices == sorted(set(indices)), "known_leaves must be strictly increasing"
    return dict(items)


def digests_of(source: BlockSource) -> list[bytes]:
    tree = LeafDigests.of_source(source, chunk_leaves=37)  # odd chunk: exercises run boundaries
    return [tree.digest(i) for i in range(len(tree))]


# ---------------------------------------------------------------- memory images


def test_memory_source_leaves(tmp_path: Path) -> None:
    img = build_save_image(tmp_path / "a.sav")
    data = img.path.read_bytes()
    with MemoryImageSource(img.path) as src:
        assert src.kind == "memory" and src.size == img.size
        assert src.leaf_count == -(-img.size // LEAF_SIZE) and img.size % LEAF_SIZE  # a short last leaf
        k = known(src)
        # every absent RAM page is a known zero leaf; no present page is
        for b in img.blocks:
            first = b.pages_offset // LEAF_SIZE
            for n in range(b.spec.npages):
                assert (first + n in k) == (n not in b.spec.pages), (b.spec.name, n)
        # every known leaf really is zeros, and known zero leaves say None
        for i, digest in k.items():
            assert digest is None
            assert data[i * LEAF_SIZE : (i + 1) * LEAF_SIZE] == bytes(LEAF_SIZE)
        # the alignment gaps (holes outside RAM) are known too
        gap = (img.blocks[0].bitmap_offset + LEAF_SIZE) // LEAF_SIZE + 1
        assert gap in k
        assert digests_of(src) == file_leaf_digests(data)
        assert src.read(3, 5) == data[3 * LEAF_SIZE : 8 * LEAF_SIZE]
        last = src.leaf_count - 1
        assert src.read(last) == data[last * LEAF_SIZE :] and len(src.read(last)) == img.size % LEAF_SIZE
        assert src.read(last - 2, 3) == data[(last - 2) * LEAF_SIZE :]
        for bad in ((last, 2), (-1, 1), (0, 0), (last + 1, 1)):
            with pytest.raises(ValueError):
                src.read(*bad)
        ram = img.blocks[0]
        assert src.label(ram.pages_offset // LEAF_SIZE) == "pc.ram"
        assert src.label(ram.pages_offset // LEAF_SIZE + ram.spec.npages - 1) == "pc.ram"
        assert src.label(ram.pages_offset // LEAF_SIZE + ram.spec.npages) == "non-ram"
        assert src.label(img.blocks[2].pages_offset // LEAF_SIZE + 3) == "pc.bios"
        assert src.label(0) == "non-ram" and src.label(last) == "non-ram"
        assert src.layout.blocks[0].name == "pc.ram"


def test_memory_source_bitmap_wins_over_stale_data(tmp_path: Path) -> None:
    """A page whose bitmap bit is clear is a zero page for QEMU even if the file holds bytes there."""
    img = build_save_image(tmp_path / "a.sav")
    ram = img.blocks[0]
    absent = next(n for n in range(ram.spec.npages) if n not in ram.spec.pages)
    fd = os.open(img.path, os.O_WRONLY)
    os.pwrite(fd, b"stale" * 100, ram.pages_offset + absent * PAGE)
    os.close(fd)
    with MemoryImageSource(img.path) as src:
        assert known(src)[ram.pages_offset // PAGE + absent] is None


def test_memory_source_rejects_non_save_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"x" * 10000)
    with pytest.raises(ImageError, match="not a libvirt save image"):
        MemoryImageSource(junk)


def test_short_zero_last_leaf_is_not_reported_as_a_full_zero_leaf(tmp_path: Path) -> None:
    p = tmp_path / "r.raw"
    with open(p, "wb") as f:
        f.truncate(3 * LEAF_SIZE + 100)
    with RawImageSource(p) as src:
        k = known(src)
        assert k == {0: None, 1: None, 2: None, 3: blake3.blake3(bytes(100)).digest()}
        assert digests_of(src) == file_leaf_digests(p.read_bytes())


# ---------------------------------------------------------------- raw images


def test_raw_source(tmp_path: Path) -> None:
    p = tmp_path / "disk.raw"
    with open(p, "wb") as f:
        f.truncate(4 * MIB)
        f.seek(LEAF_SIZE * 10)
        f.write(os.urandom(3 * LEAF_SIZE))
        f.seek(MIB + 100)  # unaligned data: leaves 256 and 257 are data
        f.write(os.urandom(LEAF_SIZE))
    data = p.read_bytes()
    with RawImageSource(p) as src:
        assert (src.kind, src.size, src.leaf_count, src.label(5)) == ("raw", 4 * MIB, 1024, "raw")
        k = known(src)
        assert 10 not in k and 12 not in k and 256 not in k and 257 not in k
        assert 9 in k and 13 in k and 1023 in k
        assert all(data[i * LEAF_SIZE : (i + 1) * LEAF_SIZE] == bytes(LEAF_SIZE) for i in k)
        assert digests_of(src) == file_leaf_digests(data)


def test_open_source_detects_formats(tmp_path: Path, qemu_tools: None) -> None:
    img = build_save_image(tmp_path / "a.sav")
    raw = tmp_path / "d.raw"
    raw.write_bytes(b"\1" * 5000)
    qcow = tmp_path / "d.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "1M")
    assert (detect_format(img.path), detect_format(raw), detect_format(qcow)) == ("memory", "raw", "disk")
    for path, cls in ((img.path, MemoryImageSource), (raw, RawImageSource), (qcow, Qcow2OverlaySource)):
        src = open_source(path)
        try:
            assert isinstance(src, cls)
        finally:
            src.close()
    with pytest.raises(ImageError, match="no such"):
        open_source(tmp_path / "missing")
    with pytest.raises(ImageError, match="directory"):
        open_source(tmp_path)
    fake = tmp_path / "fake.sav"
    fake.write_bytes(b"LibvirtQemudSave" + b"\0" * 100)
    with pytest.raises(ImageError, match=str(fake)):
        open_source(fake)
    part = tmp_path / "part.sav"
    part.write_bytes(b"LibvirtQemudPart" + b"\0" * 100)
    with pytest.raises(ImageError, match="incomplete"):
        open_source(part)


# ---------------------------------------------------------------- leaf digests files


def evil_npz(path: Path, shape: tuple[int, ...], data: bytes = b"", *, size: int = 4 * LEAF_SIZE,
             deflate: bool = False) -> Path:
    """A leaf-digest file whose digests member announces ``shape`` but holds only ``data``."""
    head = io.BytesIO()
    np_format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False, "shape": shape})
    mode = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=mode) as z:
        z.writestr("digests.npy", head.getvalue() + data)
        for name, value in (("size", size), ("format", 1)):
            buf = io.BytesIO()
            np.save(buf, np.int64(value))
            z.writestr(f"{name}.npy", buf.getvalue())
    return path


@pytest.mark.parametrize(
    ("shape", "data", "deflate"),
    [
        ((1 << 26, 32), b"x" * 100, False),  # a 2 GiB array allocated for 100 bytes
        ((1 << 40, 32), b"", False),  # a bare MemoryError
        ((1 << 20, 32), bytes(32 << 20), True),  # 32 MiB of zeros in a 32 KiB zip member
    ],
    ids=["2GiB", "32TiB", "deflated"],
)
def test_leaf_digests_load_allocates_nothing_beyond_the_file(
    tmp_path: Path, shape: tuple[int, ...], data: bytes, deflate: bool
) -> None:
    """Issue 10 (#3/#5 pattern in a local file): np.load allocated the shape a member's header
    announces before reading it, and inflated deflated members whole. Now every header is checked
    against the size member and the file before any data is read."""
    path = evil_npz(tmp_path / "evil.npz", shape, data, deflate=deflate)
    tracemalloc.start()
    try:
        with pytest.raises(ImageError):
            LeafDigests.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def test_leaf_digests_load_checks_the_expected_size(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    LeafDigests(np.zeros((4, 32), dtype=np.uint8), 4 * LEAF_SIZE).save(path)
    assert LeafDigests.load(path, expect_size=4 * LEAF_SIZE).size == 4 * LEAF_SIZE
    with pytest.raises(ImageError, match="expected"):
        LeafDigests.load(path, expect_size=5 * LEAF_SIZE)
    with pytest.raises(ImageError, match="leaves"):
        LeafDigests.load(path, max_leaves=3)


def test_leaf_digests_save_load(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    tree = LeafDigests(rng.integers(0, 256, (5, 32), dtype=np.uint8), 4 * LEAF_SIZE + 1)
    path = tmp_path / "tree.npz"
    tree.save(path)
    back = LeafDigests.load(path)
    assert back.size == tree.size and np.array_equal(back.digests, tree.digests)
    assert [p.name for p in tmp_path.iterdir()] == ["tree.npz"]
    with pytest.raises(ImageError, match="do not fit"):
        LeafDigests(np.zeros((4, 32), dtype=np.uint8), 4 * LEAF_SIZE + 1)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ImageError, match="unreadable"):
        LeafDigests.load(bad)
    with pytest.raises(ImageError, match="no such"):
        LeafDigests.load(tmp_path / "missing.npz")
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(ImageError, match="not a leaf-digest file"):
        LeafDigests.load(other)
    zeros = LeafDigests(np.tile(np.frombuffer(ZERO_LEAF_DIGEST, dtype=np.uint8), (3, 1)), 3 * LEAF_SIZE)
    assert zeros.zero_mask().all()


def test_leaf_digests_saved_by_many_threads_at_once(tmp_path: Path) -> None:
    """The first ``make demo`` failed with 'cannot write leaf digests': the source and target
    threads of one-host migrate saved the same file through one pid-named temporary file."""
    rng = np.random.default_rng(5)
    tree = LeafDigests(rng.integers(0, 256, (20000, 32), dtype=np.uint8), 20000 * LEAF_SIZE)
    path = tmp_path / "disk.leaves.npz"
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def save() -> None:
        barrier.wait()
        try:
            for _ in range(10):
                tree.save(path)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=save) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert np.array_equal(LeafDigests.load(path).digests, tree.digests)
    assert [p.name for p in tmp_path.iterdir()] == ["disk.leaves.npz"]      # no temporary file left
    with pytest.raises(ImageError, match="cannot write leaf digests"):
        tree.save(tmp_path / "missing" / "x.npz")


# ---------------------------------------------------------------- qcow2 overlays


@pytest.fixture
def qemu_tools() -> None:
    """qemu-img and qemu-io are part of the host set-up: their absence is a failure, not a skip."""
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: run scripts/setup-host.sh (it installs qemu-utils)")


def run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{argv}: {proc.stderr or proc.stdout}"
    return proc.stdout


def qemu_io(image: Path, *commands: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        argv += ["-c", c]
    run(*argv, str(image))


def guest_bytes(image: Path, tmp_path: Path) -> bytes:
    out = tmp_path / f"{image.name}.guest.raw"
    if out.exists():
        out.unlink()
    run("qemu-img", "convert", "-O", "raw", str(image), str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def depth0_data_leaves(image: Path) -> set[int]:
    """Leaves overlapping clusters the overlay itself allocates with data, from qemu-img map."""
    leaves: set[int] = set()
    for e in json.loads(run("qemu-img", "map", "--output=json", "-f", "qcow2", str(image))):
        if e["depth"] == 0 and e["data"] and not e["zero"]:
            leaves.update(range(e["start"] // LEAF_SIZE, -(-(e["start"] + e["length"]) // LEAF_SIZE)))
    return leaves


def make_base(tmp_path: Path, fmt: str = "raw", size: int = 8 * MIB) -> Path:
    """A backing image with data, holes, and a region of explicit zeros written as data."""
    raw = tmp_path / "base.raw"
    rng = np.random.default_rng(11)
    regions = [
        (64 * 1024, rng.integers(0, 256, 128 * 1024, dtype=np.uint8).tobytes()),
        (2 * MIB, rng.integers(0, 256, 12 * 1024, dtype=np.uint8).tobytes()),
        (3 * MIB, bytes(64 * 1024)),
        (size - LEAF_SIZE, b"\x99" * LEAF_SIZE),
    ]
    with open(raw, "wb") as f:
        f.truncate(size)
        for offset, blob in regions:
            if offset < size - LEAF_SIZE or blob.startswith(b"\x99"):
                f.seek(offset)
                f.write(blob[: size - offset])
    assert raw.stat().st_size == size
    if fmt == "raw":
        return raw
    base = tmp_path / "base.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(base))
    raw.unlink()
    return base


def make_overlay(tmp_path: Path, base: Path, name: str, size: int, *commands: str) -> Path:
    fmt = "raw" if base.suffix == ".raw" else "qcow2"
    ov = tmp_path / name
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", fmt, str(ov), str(size))
    if commands:
        qemu_io(ov, *commands)
    return ov


OVERLAY_A = (
    "write -P 0x11 0 4096",  # partial cluster over backing data: COW of the rest
    "write -z 65536 65536",  # zero cluster masking backing data
    "write -P 0x22 200704 512",  # 512 bytes inside a leaf
    "write -c -P 0x44 1048576 65536",  # a compressed cluster: read through qemu-img
    "write -P 0x55 2101248 8192",  # over the backing's second data region
    "write -P 0x33 9437184 8192",  # past the backing's end
)


@pytest.fixture
def chain(tmp_path: Path, qemu_tools: None) -> Iterator[tuple[Path, Path, LeafDigests]]:
    base = make_base(tmp_path)
    ov = make_overlay(tmp_path, base, "a.qcow2", 10 * MIB, *OVERLAY_A)
    yield base, ov, compute_leaf_digests(base)


def test_compute_leaf_digests_of_raw_and_qcow2(tmp_path: Path, qemu_tools: None) -> None:
    raw = make_base(tmp_path)
    data = raw.read_bytes()
    tree = compute_leaf_digests(raw)
    assert tree.size == len(data) and [tree.digest(i) for i in range(len(tree))] == file_leaf_digests(data)
    qcow = tmp_path / "b.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow))
    tree2 = compute_leaf_digests(qcow, tmp_dir=str(tmp_path))
    assert np.array_equal(tree.digests, tree2.digests)
    assert list(tmp_path.glob("rm-digests-*")) == []
    assert tree.zero_mask()[3 * MIB // LEAF_SIZE] and not tree.zero_mask()[16]
    with pytest.raises(ImageError, match="no such"):
        compute_leaf_digests(tmp_path / "missing.qcow2")


def test_overlay_digests_equal_guest_visible_content(
    tmp_path: Path, chain: tuple[Path, Path, LeafDigests], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, ov, tree = chain
    slow_reads: list[tuple[int, int]] = []
    real = blocks.read_guest_range

    def counting(path: str, offset: int, length: int, **kw: Any) -> bytes:
        slow_reads.append((offset, length))
        return real(path, offset, length, **kw)

    monkeypatch.setattr(blocks, "read_guest_range", counting)
    expected = file_leaf_digests(guest_bytes(ov, tmp_path))
    with Qcow2OverlaySource(ov, backing_tree=tree) as src:
        assert (src.kind, src.size, src.leaf_count, src.label(0)) == ("disk", 10 * MIB, 2560, "disk")
        k = known(src)
        unknown = set(range(src.leaf_count)) - set(k)
        # only leaves the overlay allocates with data are read; everything else is known
        assert unknown == depth0_data_leaves(ov) == set(src.overlay_leaves().tolist())
        assert len(unknown) == 16 * 4 + 2  # four 64 KiB data clusters, 8 KiB past the backing
        for i, digest in k.items():
            assert (digest or ZERO_LEAF_DIGEST) == expected[i], i
        assert k[65536 // LEAF_SIZE] is None  # zero cluster over backing data
        assert k[3 * MIB // LEAF_SIZE] is None  # backing zeros written as data
        assert k[64 * 1024 // LEAF_SIZE + 20] == expected[36]  # backing data, digest from the tree
        assert k[(8 * MIB + 40960) // LEAF_SIZE] is None  # past the backing's end
        assert digests_of(src) == expected
    # the compressed cluster is the only range read through qemu-img
    assert slow_reads and all(1048576 <= o and o + n <= 1048576 + 65536 for o, n in slow_reads)


def test_overlay_without_backing_tree_is_slow_but_right(tmp_path: Path, chain: tuple[Path, Path, LeafDigests]) -> None:
    _, ov, _ = chain
    with Qcow2OverlaySource(ov) as src:
        assert digests_of(src) == file_leaf_digests(guest_bytes(ov, tmp_path))


def test_overlay_over_a_qcow2_chain_with_odd_size(tmp_path: Path, qemu_tools: None) -> None:
    base = make_base(tmp_path, "qcow2", size=6 * MIB + 512)
    mid = make_overlay(tmp_path, base, "mid.qcow2", 6 * MIB + 512, "write -P 0x66 4096 4096")
    top = make_overlay(tmp_path, mid, "top.qcow2", 6 * MIB + 512, "write -P 0x77 6291456 512", "write -z 0 8192")
    tree = compute_leaf_digests(mid)
    assert tree.size == 6 * MIB + 512
    expected = file_leaf_digests(guest_bytes(top, tmp_path))
    with Qcow2OverlaySource(top, backing_tree=tree) as src:
        assert src.leaf_count == len(expected) and len(src.read(src.leaf_count - 1)) == 512
        assert digests_of(src) == expected
        assert set(range(src.leaf_count)) - set(known(src)) == depth0_data_leaves(top)


def test_grown_overlay_boundary_leaf(tmp_path: Path, qemu_tools: None) -> None:
    """Backing of 2 MiB + 512: the leaf it ends in is longer in a bigger overlay, so it is read."""
    base = make_base(tmp_path, size=2 * MIB + 512)
    ov = make_overlay(tmp_path, base, "ov.qcow2", 3 * MIB)
    tree = compute_leaf_digests(base)
    expected = file_leaf_digests(guest_bytes(ov, tmp_path))
    with Qcow2OverlaySource(ov, backing_tree=tree) as src:
        assert 2 * MIB // LEAF_SIZE not in known(src)
        assert digests_of(src) == expected


def test_backing_tree_must_fit(tmp_path: Path, chain: tuple[Path, Path, LeafDigests]) -> None:
    _, ov, tree = chain
    small = LeafDigests(tree.digests[:-1], tree.size - LEAF_SIZE)
    with pytest.raises(ImageError, match="backing tree"):
        Qcow2OverlaySource(ov, backing_tree=small)
    alone = tmp_path / "alone.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(alone), "8M")
    with pytest.raises(ImageError, match="no backing file"):
        Qcow2OverlaySource(alone, backing_tree=tree)


def test_external_data_file_is_read_through_qemu(tmp_path: Path, qemu_tools: None) -> None:
    ov = tmp_path / "ext.qcow2"
    data_file = tmp_path / "ext.data"  # absolute: qemu-img create resolves it against its cwd
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={data_file}", str(ov), "1M")
    qemu_io(ov, "write -P 0x55 4096 4096", "write -P 0x56 131072 65536")
    with Qcow2OverlaySource(ov) as src:
        assert digests_of(src) == file_leaf_digests(guest_bytes(ov, tmp_path))


def test_refused_overlays(tmp_path: Path, qemu_tools: None) -> None:
    enc = tmp_path / "enc.qcow2"
    run(
        "qemu-img", "create", "-q", "--object", "secret,id=s0,data=pw", "-f", "qcow2",
        "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", str(enc), "1M",
    )  # fmt: skip
    with pytest.raises(ImageError, match="encrypted"):
        Qcow2OverlaySource(enc)
    fake = tmp_path / "fake.qcow2"
    fake.write_bytes(b"QFI\xfb" + os.urandom(1000))
    with pytest.raises(ImageError, match="qemu-img info failed"):
        Qcow2OverlaySource(fake)
    raw = tmp_path / "r.raw"
    raw.write_bytes(b"x" * 4096)
    with pytest.raises(ImageError, match="not a qcow2"):
        Qcow2OverlaySource(raw)


# ---------------------------------------------------------------- the backing chain, read directly


def three_layers(tmp_path: Path, base_fmt: str) -> tuple[Path, set[int]]:
    """base (compressed qcow2, or raw) <- mid <- top, 6 MiB: data in every layer, zero clusters
    over data, compressed clusters in the base and the middle, partial writes. Returns the top and
    the leaves whose data lies in a compressed cluster."""
    raw = make_base(tmp_path, "raw", size=6 * MIB)
    qemu_io_raw = ["qemu-io", "-f", "raw", "-c", "write -P 0x21 1048576 196608", "-c", "write -P 0x22 4194304 65536",
                   str(raw)]
    run(*qemu_io_raw)
    if base_fmt == "raw":
        base = raw
    else:
        base = tmp_path / "base.qcow2"
        run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(base))
        raw.unlink()
    mid = make_overlay(tmp_path, base, "mid.qcow2", 6 * MIB,
                       "write -P 0x31 131072 65536",        # over base data
                       "write -z 1114112 65536",            # a zero cluster over base data
                       "write -c -P 0x32 2097152 65536",    # a compressed cluster of its own
                       "write -P 0x33 3149824 4096")        # a partial cluster: COW of base zeros
    top = make_overlay(tmp_path, mid, "top.qcow2", 6 * MIB,
                       "write -P 0x41 135168 8192",         # inside mid's cluster
                       "write -z 2097152 65536",            # zeroes mid's compressed cluster
                       "write -P 0x42 1179648 4096",        # next to mid's zero cluster
                       "write -P 0x43 6287360 4096")        # the last leaf
    compressed: set[int] = set()
    for e in json.loads(run("qemu-img", "map", "--output=json", "-f", "qcow2", str(top))):
        if e.get("compressed") and not e["zero"]:
            compressed.update(range(e["start"] // LEAF_SIZE, -(-(e["start"] + e["length"]) // LEAF_SIZE)))
    return top, compressed


@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
def test_the_chain_is_read_like_qemu_reads_it(tmp_path: Path, qemu_tools: None, base_fmt: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Random ranges of a 3-layer chain read through the map (pread of each layer's file) equal
    what qemu-img itself reads; only compressed clusters spawn a qemu-img."""
    top, compressed = three_layers(tmp_path, base_fmt)
    assert bool(compressed) == (base_fmt == "qcow2")
    expected = guest_bytes(top, tmp_path)
    spawned: list[tuple[int, int]] = []
    real = blocks.read_guest_range

    def counting(path: str, offset: int, length: int, **kw: Any) -> bytes:
        spawned.append((offset, length))
        return real(path, offset, length, **kw)

    monkeypatch.setattr(blocks, "read_guest_range", counting)
    rng = random.Random(5)
    with Qcow2OverlaySource(top) as src:
        n = src.leaf_count
        ranges = [(0, n), (n - 1, 1), *((i, rng.randrange(1, 64)) for i in (rng.randrange(n) for _ in range(60)))]
        for index, count in ranges:
            count = min(count, n - index)
            assert src.read(index, count) == expected[index * LEAF_SIZE : (index + count) * LEAF_SIZE], (index, count)
            # the qemu-img path gives the same bytes: the map is read as QEMU reads the chain
            assert real(str(top), index * LEAF_SIZE, count * LEAF_SIZE) == src.read(index, count)
    slow = {i for o, length in spawned for i in range(o // LEAF_SIZE, -(-(o + length) // LEAF_SIZE))}
    assert slow <= compressed, sorted(slow - compressed)[:5]


def test_a_layer_that_cannot_be_read_directly_goes_through_qemu(tmp_path: Path, qemu_tools: None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A backing layer with an external data file: its offsets are not in its own file."""
    mid = tmp_path / "mid.qcow2"
    data_file = tmp_path / "mid.data"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={data_file}", str(mid), "1M")
    qemu_io(mid, "write -P 0x55 4096 4096", "write -P 0x56 131072 65536")
    top = make_overlay(tmp_path, mid, "top.qcow2", MIB, "write -P 0x57 0 4096")
    spawned: list[int] = []
    real = blocks.read_guest_range

    def counting(path: str, offset: int, length: int, **kw: Any) -> bytes:
        spawned.append(offset)
        return real(path, offset, length, **kw)

    monkeypatch.setattr(blocks, "read_guest_range", counting)
    with Qcow2OverlaySource(top) as src:
        assert digests_of(src) == file_leaf_digests(guest_bytes(top, tmp_path))
    assert spawned and all(o >= 4096 for o in spawned)        # the top's own cluster was read directly


def test_missing_qemu_img_is_a_host_error(tmp_path: Path, chain: tuple[Path, Path, LeafDigests]) -> None:
    from replay_migrate.errors import HostError

    _, ov, tree = chain
    with pytest.raises(HostError, match="no-qemu-img is not installed"):
        Qcow2OverlaySource(ov, backing_tree=tree, qemu_img=str(tmp_path / "no-qemu-img"))


# -- fuzz: the target `make fuzz` runs on 100,000 inputs (bench/fuzz_targets), here on a few -------------

test_fuzz_leaf_digests, test_fuzz_leaf_digests_raw_bytes = fuzz_tests("leaf-digests")
