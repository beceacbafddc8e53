"""differ.patch: sinks make an image equal to another through a copy, atomically.

Memory images must come out byte-identical (``cmp``) and as sparse as the model; qcow2 overlays
guest-visibly identical (``qemu-img compare``) with real qemu-img/qemu-io, which the host set-up
installs: without them these tests fail, they never skip."""

from __future__ import annotations

import filecmp
import hashlib
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_blocks import OVERLAY_A, digests_of, known, make_base, make_overlay, qemu_tools, run
from test_saveimage import PAGE, BlockSpec, build_save_image, default_blocks

from differ.blocks import LeafDigests, MemoryImageSource, Qcow2OverlaySource, RawImageSource, compute_leaf_digests
from differ.patch import (
    MemoryImageSink,
    Qcow2OverlaySink,
    RawImageSink,
    open_sink,
)
from differ.source import LEAF_SIZE, BlockSink, BlockSource
from replay_migrate.errors import ImageError

__all__ = ["qemu_tools"]  # the fixture, imported for its use below
MIB = 1 << 20


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def make_equal(model: BlockSource, target: BlockSource, sink: BlockSink) -> int:
    """What the transfer does: send every leaf of ``model`` whose digest differs from ``target``'s,
    as a zero where the model knows it is a zero leaf. Returns the number of leaves sent."""
    want, have = digests_of(model), digests_of(target)
    zero = {i for i, d in known(model).items() if d is None}
    sent = 0
    for i, digest in enumerate(want):
        if i < len(have) and have[i] == digest:
            continue
        if i in zero:
            sink.zero(i)
        else:
            sink.write(i, model.read(i))
        sent += 1
    sink.set_size(model.size)
    return sent


def changed(blocks: list[BlockSpec], seed: int, n: int) -> list[BlockSpec]:
    """A clone's RAM after some work: pages rewritten, pages zeroed, zero pages filled."""
    rnd = random.Random(seed)
    out = [BlockSpec(b.name, b.npages, dict(b.pages)) for b in blocks]
    ram = out[0]
    for _ in range(n):
        page = rnd.randrange(ram.npages)
        action = rnd.random()
        if action < 0.2:
            ram.pages.pop(page, None)
        elif page in ram.pages and action < 0.6:
            content = bytearray(ram.pages[page])
            content[rnd.randrange(PAGE)] ^= 0xFF  # a few bytes differ, as measured
            ram.pages[page] = bytes(content) if any(content) else b"\1" + bytes(content[1:])
        else:
            ram.pages[page] = bytes([rnd.randrange(1, 256)]) + os.urandom(PAGE - 1)
    return out


# ---------------------------------------------------------------- memory images


@pytest.mark.parametrize(("a_pages", "b_pages"), [(2048, 2048), (2560, 2048), (2048, 2560)])
def test_memory_sink_makes_b_byte_identical_to_a(tmp_path: Path, a_pages: int, b_pages: int) -> None:
    a = build_save_image(
        tmp_path / "a.sav",
        changed(default_blocks(ram_pages=a_pages), seed=1, n=300),
        xml="<domain><name>clone-a</name></domain>",
        tail=os.urandom(41_000),
    )
    b = build_save_image(
        tmp_path / "b.sav",
        changed(default_blocks(ram_pages=b_pages), seed=2, n=300),
        xml="<domain><name>clone-b</name></domain>",
        tail=os.urandom(39_000 if a_pages == b_pages else 45_000),
    )
    assert not filecmp.cmp(a.path, b.path, shallow=False)
    with MemoryImageSource(a.path) as model, MemoryImageSource(b.path) as target:
        sink = MemoryImageSink(b.path)
        sent = make_equal(model, target, sink)
        if a_pages == b_pages:
            assert sent < model.leaf_count // 4  # only what differs travels
        patched = sink.source()
        try:
            assert digests_of(patched) == digests_of(model)
        finally:
            patched.close()
        assert filecmp.cmp(b.path, tmp_path / "b.sav", shallow=False)  # original untouched so far
        sink.commit()
    assert filecmp.cmp(a.path, b.path, shallow=False)
    assert abs(allocated(b.path) - allocated(a.path)) <= 16 * LEAF_SIZE  # as sparse as A
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.sav", "b.sav"]


def test_memory_sink_abort_leaves_the_original_untouched(tmp_path: Path) -> None:
    a = build_save_image(tmp_path / "a.sav", changed(default_blocks(), seed=1, n=50))
    b = build_save_image(tmp_path / "b.sav", changed(default_blocks(), seed=2, n=50))
    before, mtime = sha(b.path), os.stat(b.path).st_mtime_ns
    with MemoryImageSource(a.path) as model, MemoryImageSource(b.path) as target:
        sink = MemoryImageSink(b.path)
        make_equal(model, target, sink)
        assert os.path.exists(sink.copy_path)
        sink.abort()
        sink.abort()  # idempotent
        assert not os.path.exists(sink.copy_path)
        with pytest.raises(RuntimeError):
            sink.write(0, b"x")
        with MemoryImageSink(b.path) as sink2:  # leaving the block without commit aborts
            sink2.zero(5)
            sink2.set_size(100)
    assert sha(b.path) == before and os.stat(b.path).st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.sav", "b.sav"]


def test_sink_checks_its_arguments(tmp_path: Path) -> None:
    b = build_save_image(tmp_path / "b.sav")
    with MemoryImageSink(b.path) as sink:
        for bad in ((0, b""), (0, b"x" * (LEAF_SIZE + 1)), (-1, b"x")):
            with pytest.raises(ValueError):
                sink.write(*bad)
        with pytest.raises(ValueError):
            sink.set_size(-1)
    with pytest.raises(ImageError, match="no such"):
        MemoryImageSink(tmp_path / "missing.sav")


def test_broken_patch_is_caught_by_the_source(tmp_path: Path) -> None:
    """Patching garbage into the header makes the copy unparsable: source() says so."""
    b = build_save_image(tmp_path / "b.sav")
    with MemoryImageSink(b.path) as sink:
        sink.write(0, b"garbage!" * 512)
        with pytest.raises(ImageError, match="not a libvirt save image"):
            sink.source()


# ---------------------------------------------------------------- raw images and the copy


def test_raw_sink(tmp_path: Path) -> None:
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    rng = np.random.default_rng(4)
    for path, seed_pages in ((a, (1, 5, 9, 200)), (b, (1, 6, 9, 300, 301))):
        with open(path, "wb") as f:
            f.truncate(256 * LEAF_SIZE + 123 if path == a else 310 * LEAF_SIZE)
            for p in seed_pages:
                f.seek(p * LEAF_SIZE)
                f.write(rng.integers(1, 256, LEAF_SIZE, dtype=np.uint8).tobytes())
    with RawImageSource(a) as model, RawImageSource(b) as target:
        sink = open_sink(b)
        assert isinstance(sink, RawImageSink)
        make_equal(model, target, sink)
        sink.commit()
    assert filecmp.cmp(a, b, shallow=False)
    assert allocated(b) <= allocated(a)


# ---------------------------------------------------------------- qcow2 overlays

OVERLAY_B = (
    "write -P 0x11 0 4096",  # same as A
    "write -P 0x98 65536 4096",  # A has a zero cluster here
    "write -P 0x23 200704 512",  # differs from A in a few bytes
    "write -z 2101248 8192",  # A has data here
    "write -P 0x77 5242880 65536",  # only B
)


def qemu_img_compare(a: Path, b: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(a), str(b)],
        capture_output=True,
        text=True,
        check=False,
    )


def virtual_size(path: Path) -> int:
    import json

    return int(json.loads(run("qemu-img", "info", "--output=json", str(path)))["virtual-size"])


def patch_overlay(a: Path, b: Path, tree: LeafDigests, **sink_args: Any) -> int:
    with Qcow2OverlaySource(a, backing_tree=tree) as model, Qcow2OverlaySource(b, backing_tree=tree) as target:
        sink = Qcow2OverlaySink(b, backing_tree=tree, **sink_args)
        try:
            sent = make_equal(model, target, sink)
            patched = sink.source()
            try:
                assert digests_of(patched) == digests_of(model)
            finally:
                patched.close()
            sink.commit()
        except BaseException:
            sink.abort()
            raise
    return sent


@pytest.mark.parametrize("b_size", [10 * MIB, 9 * MIB, 12 * MIB])
def test_qcow2_sink_makes_overlays_guest_identical(tmp_path: Path, qemu_tools: None, b_size: int) -> None:
    base = make_base(tmp_path)
    a = make_overlay(tmp_path, base, "a.qcow2", 10 * MIB, *OVERLAY_A)
    b = make_overlay(tmp_path, base, "b.qcow2", b_size, *OVERLAY_B)
    tree = compute_leaf_digests(base)
    assert qemu_img_compare(a, b).returncode == 1
    sent = patch_overlay(a, b, tree)
    assert 0 < sent < 200 + max(0, 10 * MIB - b_size) // LEAF_SIZE  # leaves B lacks are sent
    result = qemu_img_compare(a, b)
    assert result.returncode == 0 and "identical" in result.stdout, result.stdout + result.stderr
    assert virtual_size(b) == virtual_size(a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.qcow2", "b.qcow2", "base.raw"]


def test_qcow2_sink_in_many_small_batches(tmp_path: Path, qemu_tools: None) -> None:
    base = make_base(tmp_path, "qcow2")
    a = make_overlay(tmp_path, base, "a.qcow2", 10 * MIB, *OVERLAY_A)
    b = make_overlay(tmp_path, base, "b.qcow2", 9 * MIB, *OVERLAY_B)  # writes past its end wait
    tree = compute_leaf_digests(base)
    patch_overlay(a, b, tree, max_commands=2, max_batch_bytes=3 * LEAF_SIZE, max_argv_bytes=200)
    assert qemu_img_compare(a, b).returncode == 0


def test_qcow2_sink_abort_and_bounds(tmp_path: Path, qemu_tools: None) -> None:
    base = make_base(tmp_path)
    b = make_overlay(tmp_path, base, "b.qcow2", 4 * MIB, *OVERLAY_B[:3])
    tree = compute_leaf_digests(base)
    before = sha(b)
    sink = open_sink(b, backing_tree=tree)
    assert isinstance(sink, Qcow2OverlaySink)
    sink.write(3, b"\x42" * LEAF_SIZE)
    sink.zero(4)
    sink.write(4 * MIB // LEAF_SIZE, b"\x43" * LEAF_SIZE)  # past the end: set_size was not called
    with pytest.raises(ImageError, match="set_size"):
        sink.source()
    sink.abort()
    assert sha(b) == before and not os.path.exists(sink.copy_path)
    with Qcow2OverlaySink(b, backing_tree=tree) as sink2, pytest.raises(ValueError):
        sink2.set_size(1000)
    raw = tmp_path / "x.raw"
    raw.write_bytes(b"x" * 4096)
    with pytest.raises(ImageError, match="not a qcow2"):
        Qcow2OverlaySink(raw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.qcow2", "base.raw", "x.raw"]


def test_sinks_and_sources_agree_on_every_kind(tmp_path: Path, qemu_tools: None) -> None:
    """open_sink picks the sink that matches open_source's reading of the file."""
    img = build_save_image(tmp_path / "m.sav")
    raw = tmp_path / "r.raw"
    raw.write_bytes(b"r" * 8192)
    qcow = tmp_path / "q.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "1M")
    kinds: dict[Path, tuple[type[BlockSink], type[BlockSource]]] = {
        img.path: (MemoryImageSink, MemoryImageSource),
        raw: (RawImageSink, RawImageSource),
        qcow: (Qcow2OverlaySink, Qcow2OverlaySource),
    }
    for path, (sink_cls, source_cls) in kinds.items():
        sink = open_sink(path)
        try:
            assert isinstance(sink, sink_cls)
            src = sink.source()
            assert isinstance(src, source_cls)
            src.close()
        finally:
            sink.abort()


def test_a_sink_that_need_not_be_durable_commits_without_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.raw"
    path.write_bytes(bytes(range(256)) * 64)
    synced: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    for durable, expect in ((False, 0), (True, 2)):          # the copy, then its directory
        synced.clear()
        sink = RawImageSink(path, durable=durable)
        sink.write(0, b"\x01" * LEAF_SIZE)
        sink.commit()
        assert len(synced) == expect and path.read_bytes()[:LEAF_SIZE] == b"\x01" * LEAF_SIZE


# ---------------------------------------------------------------- in place (a migration target's clone)


def test_memory_sink_in_place_patches_the_image_itself(tmp_path: Path) -> None:
    """No copy, the same inode, byte-identical to the model after commit; the target's own source
    (opened before) still reads what was not written."""
    a = build_save_image(tmp_path / "a.sav", changed(default_blocks(), seed=1, n=200), tail=os.urandom(41_000))
    b = build_save_image(tmp_path / "b.sav", changed(default_blocks(), seed=2, n=200), tail=os.urandom(41_000))
    inode = os.stat(b.path).st_ino
    with MemoryImageSource(a.path) as model, MemoryImageSource(b.path) as target:
        untouched = next(i for i, (x, y) in enumerate(zip(digests_of(model), digests_of(target), strict=True))
                         if x == y and i > 0)
        before = target.read(untouched)
        sink = MemoryImageSink(b.path, durable=False, in_place=True)
        assert sink.copy_method == "in place" and sink.copy_path == str(b.path)
        make_equal(model, target, sink)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.sav", "b.sav"]       # no copy, ever
        assert target.read(untouched) == before
        patched = sink.source()
        try:
            assert digests_of(patched) == digests_of(model)
        finally:
            patched.close()
        sink.commit()
        sink.abort()                                     # a no-op once committed
    assert filecmp.cmp(a.path, b.path, shallow=False) and os.stat(b.path).st_ino == inode


def test_an_aborted_in_place_sink_deletes_the_half_patched_image(tmp_path: Path) -> None:
    a = build_save_image(tmp_path / "a.sav", changed(default_blocks(), seed=1, n=50))
    b = build_save_image(tmp_path / "b.sav", changed(default_blocks(), seed=2, n=50))
    with MemoryImageSource(a.path) as model, MemoryImageSource(b.path) as target:
        sink = MemoryImageSink(b.path, in_place=True)
        make_equal(model, target, sink)
        sink.abort()
        sink.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.sav"]
    with pytest.raises(RuntimeError):
        sink.write(0, b"x")


def test_in_place_refuses_an_image_with_another_name(tmp_path: Path) -> None:
    """Another hard link would see the image half-patched (the benchmark keeps a copy instead)."""
    b = build_save_image(tmp_path / "b.sav")
    os.link(b.path, tmp_path / "kept.sav")
    with pytest.raises(ImageError, match="hard links"):
        MemoryImageSink(b.path, in_place=True)
    with MemoryImageSink(b.path) as sink:                 # through a copy it is fine
        sink.write(1, b"\x07" * LEAF_SIZE)
        sink.commit()
    assert filecmp.cmp(b.path, tmp_path / "kept.sav", shallow=False) is False


def test_an_in_place_shrink_waits_until_the_writes_are_done(tmp_path: Path) -> None:
    """What lies past the new end is still the image's until the last write: a reference to it
    may be read meanwhile."""
    path = tmp_path / "b.raw"
    data = os.urandom(40 * LEAF_SIZE)
    path.write_bytes(data)
    with RawImageSource(path) as own:
        sink = RawImageSink(path, in_place=True, durable=False)
        sink.set_size(10 * LEAF_SIZE + 100)
        sink.write(3, b"\x05" * LEAF_SIZE)
        assert own.read(30) == data[30 * LEAF_SIZE : 31 * LEAF_SIZE]
        patched = sink.source()                          # the writes are done: now it shrinks
        assert patched.size == 10 * LEAF_SIZE + 100
        patched.close()
        sink.set_size(12 * LEAF_SIZE)                    # growing is at once
        assert os.path.getsize(path) == 12 * LEAF_SIZE
        sink.commit()
    kept = data[: 3 * LEAF_SIZE] + b"\x05" * LEAF_SIZE + data[4 * LEAF_SIZE : 10 * LEAF_SIZE + 100]
    assert path.read_bytes() == kept + bytes(2 * LEAF_SIZE - 100)


@pytest.mark.parametrize("b_size", [10 * MIB, 9 * MIB, 12 * MIB])
def test_qcow2_sink_in_place_makes_the_overlay_guest_identical(tmp_path: Path, qemu_tools: None, b_size: int) -> None:
    base = make_base(tmp_path)
    a = make_overlay(tmp_path, base, "a.qcow2", 10 * MIB, *OVERLAY_A)
    b = make_overlay(tmp_path, base, "b.qcow2", b_size, *OVERLAY_B)
    tree = compute_leaf_digests(base)
    inode = os.stat(b).st_ino
    patch_overlay(a, b, tree, in_place=True, durable=False)
    result = qemu_img_compare(a, b)
    assert result.returncode == 0 and "identical" in result.stdout, result.stdout + result.stderr
    assert virtual_size(b) == virtual_size(a) and os.stat(b).st_ino == inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.qcow2", "b.qcow2", "base.raw"]


def test_an_aborted_in_place_qcow2_sink_deletes_the_overlay(tmp_path: Path, qemu_tools: None) -> None:
    base = make_base(tmp_path)
    b = make_overlay(tmp_path, base, "b.qcow2", 4 * MIB, *OVERLAY_B[:3])
    sink = Qcow2OverlaySink(b, backing_tree=compute_leaf_digests(base), in_place=True)
    sink.write(3, b"\x42" * LEAF_SIZE)
    sink.flush()
    sink.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.raw"]


def test_is_zero_tells_a_leaf_of_zeros_at_any_length() -> None:
    from differ.patch import is_zero

    page = bytearray(LEAF_SIZE)
    assert is_zero(bytes(page)) and is_zero(bytes(100)) and is_zero(bytes(1))
    for at in (0, 1, 2047, LEAF_SIZE - 1):
        page[at] = 1
        assert not is_zero(bytes(page)) and not is_zero(bytes(page[: at + 1]))
        assert is_zero(bytes(page[:at]))                  # (an empty leaf never reaches a sink)
        page[at] = 0
    assert is_zero(bytearray(64)) and is_zero(memoryview(bytes(64))) and not is_zero(memoryview(b"\0\1"))
