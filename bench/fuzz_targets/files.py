"""Fuzz targets of the file decoders: save images and headers, tree and leaf-digest files."""

from __future__ import annotations

import functools
import io
import random
import struct
import zipfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zstandard
from numpy.lib import format as np_format

from bench.fuzz import (
    interesting_int,
    mutate_bytes,
)
from bench.fuzz_targets.common import PAGE, _scratch
from bench.fuzz_targets.protocol import _mutate_body, _unzstd
from differ.blocks import LeafDigests, MemoryImageSource
from differ.memsource import MemorySource
from differ.merkle import MerkleTree, load_or_build
from differ.saveimage import SaveImage, parse_save_image
from replay_migrate import savefmt

# -- save images (differ.saveimage, replay_migrate.savefmt, differ.blocks.MemoryImageSource) --------------


def _idstr(s: bytes) -> bytes:
    return bytes([len(s)]) + s


Field = tuple[int, int, Literal["big", "little"]]
"""(offset, width, byte order) of a field of a synthetic save image."""


def build_save_image(rng: random.Random) -> tuple[bytes, list[Field]]:
    """A small synthetic sparse save image laid out as libvirt + QEMU write one (see
    ``differ.saveimage``), and its fields as (offset, width, byte order) to mutate."""
    fields: list[Field] = []
    xml = b"<domain><name>fz</name><uuid>00000000-0000-0000-0000-000000000001</uuid></domain>"
    cookie = b"<qemu-migration/>" if rng.random() < 0.8 else b""
    data_len = len(xml) + len(cookie) + 2 + rng.randrange(64)
    area = (xml + b"\0" + (cookie + b"\0" if cookie else b"")).ljust(data_len, b"\0")
    out = bytearray(struct.pack("<16s5I14I", b"LibvirtQemudSave", 2, data_len, 1, 6,
                                len(xml) + 1 if cookie else 0, *([0] * 14)))
    fields += [(16 + 4 * j, 4, "little") for j in range(5)]
    out += area
    stream = out
    fields.append((len(out) + 4, 4, "big"))
    stream += b"QEVM" + struct.pack(">I", 3)
    caps = [b"mapped-ram"] + ([b"x-ignore-shared"] if rng.random() < 0.2 else [])
    if rng.random() < 0.9:
        machine = b"pc-q35-10.0"
        fields.append((len(stream) + 1, 4, "big"))
        stream += b"\x07" + struct.pack(">I", len(machine)) + machine
        if rng.random() < 0.5:
            stream += b"\x05" + _idstr(b"configuration/target-page-bits") + struct.pack(">I", 1)
            fields.append((len(stream), 4, "big"))
            stream += struct.pack(">I", 12)
        if rng.random() < 0.2:  # unknown subsection: the parser searches for the ram section
            stream += b"\x05" + _idstr(b"configuration/x-future") + struct.pack(">I", 1) + b"\x00\x01ram"
        fields.append((len(stream) + 1 + 27 + 4, 4, "big"))
        stream += b"\x05" + _idstr(b"configuration/capabilities") + struct.pack(">I", 1)
        stream += struct.pack(">I", len(caps)) + b"".join(_idstr(c) for c in caps)
        if rng.random() < 0.2:
            stream += b"\x05" + _idstr(b"configuration/uuid") + struct.pack(">I", 1) + bytes(16)
    blocks = [(b"pc.ram", rng.randint(1, 24)), (b"pc.bios", rng.randint(1, 4)), (b"vga.vram", rng.randint(1, 8))]
    blocks = blocks[: rng.randint(1, 3)]
    ignored = rng.randrange(len(blocks)) if b"x-ignore-shared" in caps and rng.random() < 0.5 else -1
    total = sum(n for _, n in blocks) * PAGE
    section = len(stream)
    stream += b"\x01" + struct.pack(">I", 2) + _idstr(b"ram") + struct.pack(">II", 0, 4)
    fields += [(section + 1, 4, "big"), (section + 9, 4, "big"), (section + 13, 4, "big"), (section + 17, 8, "big")]
    stream += struct.pack(">Q", total | 0x04)
    for j, (name, npages) in enumerate(blocks):
        fields.append((len(stream), 1, "big"))
        stream += _idstr(name)
        fields.append((len(stream), 8, "big"))
        stream += struct.pack(">Q", npages * PAGE)
        if b"x-ignore-shared" in caps:
            stream += struct.pack(">Q", 0xFEED0000)
        hdr_at = len(stream)
        fields += [(hdr_at, 4, "big"), (hdr_at + 4, 8, "big"), (hdr_at + 12, 8, "big"), (hdr_at + 20, 8, "big")]
        if j == ignored:
            stream += struct.pack(">IQQQ", 1, PAGE, 0, 0)
            continue
        bitmap_at = hdr_at + 28
        bitmap_size = (npages + 63) // 64 * 8
        pages_at = -(-(bitmap_at + bitmap_size) // PAGE) * PAGE
        stream += struct.pack(">IQQQ", 1, PAGE, bitmap_at, pages_at)
        present = [rng.random() < 0.5 for _ in range(npages)]
        bits = np.zeros(bitmap_size * 8, dtype=np.uint8)
        bits[:npages] = present
        stream += np.packbits(bits, bitorder="little").tobytes()
        fields.append((bitmap_at, 1, "big"))
        stream += bytes(pages_at - len(stream))
        for p in present:
            stream += rng.randbytes(PAGE) if p else bytes(PAGE)
    fields.append((len(stream), 8, "big"))
    if rng.random() < 0.2:
        stream += struct.pack(">Q", 0x200)
    stream += struct.pack(">Q", 0x10) + b"\x7e" + struct.pack(">I", 2)
    stream += b"\x04" + rng.randbytes(rng.randint(1, 300)) + b"\x00"
    return bytes(stream), fields


def generate_save_image(rng: random.Random) -> bytes:
    data, fields = build_save_image(rng)
    if rng.random() < 0.05:
        return data
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(10)
        if op <= 5:
            off, width, order = rng.choice(fields)
            value = interesting_int(rng, int.from_bytes(buf[off : off + width], order)) % (1 << (8 * width))
            buf[off : off + width] = value.to_bytes(width, order)
        elif op == 6:
            off = rng.choice(fields)[0]
            del buf[off + rng.randrange(-2, 10) :]
        else:
            buf = bytearray(mutate_bytes(rng, bytes(buf)))
    return bytes(buf)


def run_save_image(data: bytes) -> None:
    """Parse a save image as every reader does: the layout, the bitmaps and a page, the block
    source the Merkle tree is built from, and the libvirt header the clones rewrite."""
    path = _scratch("image.sav", data)
    layout = parse_save_image(path)
    assert layout.file_size == len(data)
    assert all(0 <= s <= e <= len(data) for s, e in layout.ram_regions())
    with SaveImage.open(path) as img:
        for b in layout.blocks:
            if not b.ignored:
                present = np.flatnonzero(img.present(b))
                if len(present):
                    img.read_page(b, int(present[0]))
    src = MemoryImageSource(path)
    try:
        MerkleTree.build(src, 4, workers=1)
    finally:
        src.close()
    header = savefmt.read_header(path)
    savefmt.rewrite_xml(path, header.xml)
    _check_rewrite(path, header, data)


def _check_rewrite(path: Path, before: savefmt.SaveHeader, data: bytes, was_running: bool | None = None) -> None:
    """An in-place XML rewrite keeps every header field, the XML and cookie, and every byte after
    the XML area (padding and a cookie's place inside the area may change)."""
    after = savefmt.read_header(path)
    want = (before.magic, before.version, before.data_len, before.format, before.unused, before.xml, before.cookie)
    got = (after.magic, after.version, after.data_len, after.format, after.unused, after.xml, after.cookie)
    assert got == want and after.was_running == (before.was_running if was_running is None else was_running)
    end = before.qemu_offset
    assert path.read_bytes()[end:] == data[end:], "an in-place rewrite changed the image after its header"


def generate_save_header(rng: random.Random) -> bytes:
    """Only the libvirt header and XML area (replay_migrate.savefmt), its fields mutated."""
    data, fields = build_save_image(rng)
    buf = bytearray(data[: 92 + int.from_bytes(data[20:24], "little") + 8])
    for _ in range(0 if rng.random() < 0.1 else rng.randint(1, 3)):
        if rng.random() < 0.6:
            off, width, order = rng.choice([f for f in fields if f[0] < 92])
            buf[off : off + width] = (interesting_int(rng) % (1 << (8 * width))).to_bytes(width, order)
        else:
            buf = bytearray(mutate_bytes(rng, bytes(buf)))
    return bytes(buf)


def run_save_header(data: bytes) -> None:
    path = _scratch("header.sav", data)
    header = savefmt.read_header(path)
    savefmt.rewrite_xml(path, header.xml, was_running=False)
    _check_rewrite(path, header, data, was_running=False)


# -- tree and leaf-digest files (differ.merkle, differ.blocks) ---------------------------------------------

_TREE_HEADER = struct.Struct("<8sHHIQQ32sH")


def _tree_file(rng: random.Random) -> tuple[bytes, int]:
    """A tree file as ``MerkleTree.save`` writes it, and the size of its image."""
    size = rng.choice((0, 1, PAGE, 5 * PAGE + 7, 40 * PAGE, rng.randrange(64 * PAGE)))
    data = bytearray(size)
    for _ in range(rng.randrange(8)):
        at = rng.randrange(size + 1)
        data[at : at + 64] = rng.randbytes(64)
    tree = MerkleTree.from_bytes(bytes(data[:size]), fanout=rng.choice((2, 4, 16)))
    stamp = rng.choice((b"", b"1:2:3", bytes(40)))
    head = _TREE_HEADER.pack(b"RMMERKLE", 1, tree.fanout, PAGE, tree.size, tree.leaf_count, tree.root, len(stamp))
    body = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(tree.leaves.tobytes())
    return head + stamp + body, size


def generate_tree_file(rng: random.Random) -> bytes:
    data, _ = _tree_file(rng)
    if rng.random() < 0.05:
        return data
    head, rest = bytearray(data[: _TREE_HEADER.size]), data[_TREE_HEADER.size :]
    stamp_len = int.from_bytes(head[-2:], "little")
    stamp, body = rest[:stamp_len], rest[stamp_len:]
    op = rng.randrange(10)
    if op <= 3:  # header fields (offsets of fanout, leaf size, size, leaves, stamp length)
        off, width = rng.choice(((10, 2), (12, 4), (16, 8), (24, 8), (64, 2), (8, 2)))
        head[off : off + width] = (interesting_int(rng) % (1 << (8 * width))).to_bytes(width, "little")
    elif op <= 5:  # the leaf data: re-compressed after a change, or a frame that lies
        body = _mutate_body(rng, _unzstd(body))
    elif op == 6:  # a consistent header for another size, over the same leaf data
        leaves = interesting_int(rng) % (1 << 33)
        head[16:32] = struct.pack("<QQ", leaves * PAGE, leaves)
    else:
        return mutate_bytes(rng, data)
    return bytes(head) + stamp + body


@functools.cache
def _small_image() -> bytes:
    return random.Random(9).randbytes(8 * PAGE)


def run_tree_file(data: bytes) -> None:
    """Load a tree file as the checkpoint code does (with the image's size) and without one."""
    path = _scratch("t.tree", data)
    try:
        tree, _ = MerkleTree.load(path, max_leaves=1 << 20)
        again, _ = MerkleTree.load(path, expect_size=tree.size)
        assert again.root == tree.root
    finally:
        src = MemorySource(_small_image())
        got = load_or_build(src, path, b"stamp", 4)  # rebuilds and overwrites a file that does not fit
        assert got.root == MerkleTree.from_bytes(_small_image(), 4).root


def _npy(value: Any, header: dict[str, Any] | None = None) -> bytes:
    buf = io.BytesIO()
    if header is None:
        np.save(buf, value)
    else:
        np_format.write_array_header_1_0(buf, header)
        buf.write(np.asarray(value).tobytes())
    return buf.getvalue()


def generate_leaf_digests(rng: random.Random) -> bytes:
    """A leaf-digest file as ``LeafDigests.save`` writes it (an uncompressed npz), its members
    mutated: values, .npy headers (shape, dtype, order), member names, compression, zip bytes."""
    n = rng.randrange(12)
    size = n * PAGE - (rng.randrange(PAGE) if n else 0)
    digests = np.frombuffer(rng.randbytes(32 * n), dtype=np.uint8).reshape(n, 32)
    members: dict[str, bytes] = {"digests.npy": _npy(digests), "size.npy": _npy(np.int64(size)),
                                 "format.npy": _npy(np.int64(1))}
    compression = zipfile.ZIP_STORED
    for _ in range(rng.randint(0, 3)):
        op = rng.randrange(9)
        name = rng.choice(sorted(members))
        if op <= 1:
            shape = rng.choice(((n, 32), (interesting_int(rng) % (1 << 40), 32), (n,), (n, 31), (2, n, 32)))
            members["digests.npy"] = _npy(digests, {"descr": rng.choice(("|u1", "<u8", "<f4", "|O")),
                                                   "fortran_order": rng.random() < 0.2, "shape": shape})
        elif op <= 3:
            members[rng.choice(("size.npy", "format.npy"))] = _npy(np.int64(interesting_int(rng) % (1 << 63)))
        elif op == 4:
            members[name + rng.choice(("x", ""))] = members.pop(name)
        elif op == 5:
            compression = zipfile.ZIP_DEFLATED
        elif op == 6:
            members[name] = mutate_bytes(rng, members[name])
        elif op == 7:
            members["size.npy"] = _npy(np.float64(size))
        else:
            members["extra.npy"] = _npy(np.zeros(3))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as z:
        for name, blob in members.items():
            z.writestr(name, blob)
    data = buf.getvalue()
    return mutate_bytes(rng, data) if rng.random() < 0.2 else data


def run_leaf_digests(data: bytes) -> None:
    path = _scratch("d.npz", data)
    d = LeafDigests.load(path, max_leaves=1 << 20)
    assert LeafDigests.load(path, expect_size=d.size).size == d.size
