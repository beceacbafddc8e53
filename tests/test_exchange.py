"""store/exchange.py: a checkpoint exported at one site and imported at another, without a VM (a
synthetic checkpoint: a save image and a qcow2 overlay on a qcow2 base, made with qemu-img). The
round trip is byte-identical and verified; a stream that is cut, has a byte flipped anywhere, was
made on another base image, names another emulator or backing file, or whose content does not
hash to its roots is refused with a clear error, and nothing is left half-imported."""

from __future__ import annotations

import io
import json
import os
import random
import re
import subprocess
import time
from collections import namedtuple
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_saveimage import build_save_image, default_blocks

from replay_migrate.errors import CheckpointError, ReplayMigrateError, UsageError, VerificationError
from store import checkpoint as ckpt
from store import exchange
from store.ckstream import HEADER, RECORD, Kind, ManifestRead, Pages, StreamDecoder, StreamEncoder, StreamEnded
from store.exchange import data_extents, export_checkpoint, import_checkpoint
from store.paths import checkpoints_dir
from vm.spec import DomainSpec, GuestImage

MIB = 1 << 20
RECIPE = "0123456789abcdef"


def run(*argv: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert r.returncode == 0, f"{argv}: {r.stderr}"


@dataclass
class Sites:
    """Two state roots (site A's, site B's) over one image cache, and the switch between them."""

    a: Path
    b: Path
    image: GuestImage
    monkeypatch: pytest.MonkeyPatch

    def at(self, site: Path) -> None:
        self.monkeypatch.setenv("REPLAY_MIGRATE_STATE", str(site))


def make_image(cache: Path) -> GuestImage:
    image = GuestImage(cache / "images" / RECIPE, RECIPE)
    image.dir.mkdir(parents=True)
    run("qemu-img", "create", "-q", "-f", "qcow2", str(image.base), str(96 * MIB))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 8M", "-c", "write -P 0x11 40M 4M", str(image.base))
    image.kernel.write_bytes(b"kernel")
    image.initrd.write_bytes(b"initrd")
    return image


def make_checkpoint(image: GuestImage, name: str = "ck", *, emulator: str | None = None,
                    backing: Path | None = None) -> ckpt.Checkpoint:
    """A checkpoint folder as ``checkpoint create`` leaves it, in the current state root."""
    d = checkpoints_dir() / name
    d.mkdir(parents=True)
    xml = DomainSpec(name=f"rm-ckpt-{name}", image=image, disk=d / "disk.qcow2", run_dir=d / "boot").xml()
    xml = xml.replace("</name>", "</name><uuid>0761aacb-5b2d-4e8f-bf94-2e3365633b0b</uuid>", 1)   # as libvirt saves it
    if emulator is not None:
        xml = re.sub(r"<emulator>[^<]*</emulator>", f"<emulator>{emulator}</emulator>", xml)
    build_save_image(d / "memory.sav", default_blocks(seed=2, ram_pages=4096), xml=xml)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing or image.base), "-F", "qcow2",
        str(d / "disk.qcow2"))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 1M 2M", "-c", "write -z 44M 1M", "-c",
        "write -P 0x33 60M 64k", str(d / "disk.qcow2"))
    (d / "screen.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    mem = d / "memory.sav"
    ckpt.Manifest(name=name, image_recipe=RECIPE, image_dir=str(image.dir), virt="qemu", memory_mib=16,
                  created=time.time(), boot_to_desktop_s=1.0, save_s=1.0, memory_apparent_bytes=mem.stat().st_size,
                  memory_allocated_bytes=mem.stat().st_blocks * 512, disk_allocated_bytes=0).save(d / "manifest.json")
    return ckpt.Checkpoint(d)


@pytest.fixture
def sites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sites]:
    monkeypatch.setenv("REPLAY_MIGRATE_CACHE", str(tmp_path / "cache"))
    s = Sites(tmp_path / "site-a", tmp_path / "site-b", make_image(tmp_path / "cache"), monkeypatch)
    s.at(s.a)
    make_checkpoint(s.image)
    yield s


def export(sites: Sites, name: str = "ck") -> tuple[bytes, exchange.TransferSizes]:
    sites.at(sites.a)
    out: list[bytes] = []
    sizes = export_checkpoint(name, out.append)
    sites.at(sites.b)
    return b"".join(out), sizes


def import_bytes(data: bytes, **kw: object) -> exchange.TransferSizes:
    return import_checkpoint(io.BytesIO(data).read, **kw)  # type: ignore[arg-type]


def nothing_left(site: Path) -> None:
    """No checkpoint and no partial folder: a refused import leaves the site as it was."""
    folder = site / "checkpoints"
    assert not folder.exists() or sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == []


def test_round_trip_is_byte_identical_and_verified(sites: Sites) -> None:
    stream, out = export(sites)
    got = import_bytes(stream)
    a, b = ckpt.Checkpoint(sites.a / "checkpoints" / "ck"), ckpt.get("ck")
    for f in ("memory.sav", "disk.qcow2", "screen.png"):
        assert (a.dir / f).read_bytes() == (b.dir / f).read_bytes(), f
    assert b.manifest.roots == a.manifest.roots == out.roots == got.roots
    assert set(b.manifest.roots) == {"memory", "disk"}
    assert b.manifest.image_dir == str(sites.image.dir) and b.manifest.image_recipe == RECIPE
    # the bytes: holes and zero pages never travel, and the import is as sparse as the export
    assert out.stream_bytes == len(stream) == got.stream_bytes
    assert out.data_bytes == got.data_bytes < out.allocated_bytes < out.apparent_bytes
    assert out.stream_bytes < out.data_bytes * 1.01 + 4096           # random pages: incompressible
    mem_a, mem_b = out.files["memory.sav"], got.files["memory.sav"]
    assert mem_b["apparent"] == mem_a["apparent"] and mem_b["allocated"] <= mem_a["allocated"]
    assert (b.dir / "memory.tree").is_file() and (b.dir / "disk.leaves.npz").is_file()   # computed, kept
    assert not (checkpoints_dir() / "ck.partial").exists()


def test_the_export_carries_only_data_extents(tmp_path: Path) -> None:
    f = tmp_path / "sparse"
    with open(f, "wb") as fh:
        fh.truncate(10 * MIB)
        fh.seek(3 * MIB + 100)
        fh.write(b"x")
        fh.seek(10 * MIB - 5)
        fh.write(b"tail!")
    fd = os.open(f, os.O_RDONLY)
    try:
        ext = data_extents(fd, 10 * MIB)
    finally:
        os.close(fd)
    assert ext[0][0] <= 3 * MIB + 100 < ext[0][1] and ext[-1][1] == 10 * MIB
    assert all(s % 4096 == 0 for s, _ in ext) and sum(e - s for s, e in ext) <= 2 * MIB


def test_import_under_another_name_and_never_over_an_existing_one(sites: Sites) -> None:
    stream, _ = export(sites)
    import_bytes(stream)
    with pytest.raises(CheckpointError, match="exists already"):
        import_bytes(stream)
    import_bytes(stream, name="ck-2")
    assert ckpt.get("ck-2").manifest.roots == ckpt.get("ck").manifest.roots
    with pytest.raises(UsageError, match="--name"):
        import_bytes(stream, name="../etc")
    assert sorted(c.name for c in ckpt.list_all()) == ["ck", "ck-2"]


def _cut_points(stream: bytes) -> dict[str, int]:
    manifest_len = RECORD.unpack_from(stream, HEADER.size)[1]
    first_data = HEADER.size + RECORD.size + manifest_len
    return {"in the header": 5, "in the manifest": HEADER.size + 20, "after the manifest": first_data,
            "in the data": len(stream) // 2, "before the end": len(stream) - RECORD.size - 32,
            "in the end": len(stream) - 3}


def test_a_truncated_stream_is_refused_and_nothing_is_left(sites: Sites) -> None:
    stream, _ = export(sites)
    for where, cut in _cut_points(stream).items():
        with pytest.raises(CheckpointError, match=r"truncated|not a replay-migrate") as e:
            import_bytes(stream[:cut])
        assert "truncated" in str(e.value) or where == "in the header"
        nothing_left(sites.b)


def test_a_flipped_byte_anywhere_is_refused_and_nothing_is_left(sites: Sites) -> None:
    stream, _ = export(sites)
    cuts = _cut_points(stream)
    rng = random.Random(4)
    places = {"magic": 2, "version": 8, "a record length": HEADER.size + 2,
              "the manifest's name": stream.index(b'"ck"') + 2,
              "a root in the manifest": stream.index(b'"memory":"') + 20,
              "a data record's offset": cuts["after the manifest"] + 7,
              "the payload": rng.randrange(cuts["after the manifest"] + 100, cuts["before the end"]),
              "the digest": len(stream) - 1}
    for where, pos in places.items():
        bad = bytearray(stream)
        bad[pos] ^= 0x10
        with pytest.raises((CheckpointError, VerificationError)) as e:
            import_bytes(bytes(bad))
        assert str(e.value).startswith("checkpoint stream"), (where, e.value)
        nothing_left(sites.b)
    for pos in rng.sample(range(len(stream)), 40):
        bad = bytearray(stream)
        bad[pos] ^= 1 << rng.randrange(8)
        with pytest.raises(ReplayMigrateError):
            import_bytes(bytes(bad))
        nothing_left(sites.b)


def test_a_stream_for_another_base_image_is_refused_before_anything_is_written(sites: Sites) -> None:
    stream, _ = export(sites)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x12 80M 4k", str(sites.image.base))   # a rebuilt base
    with pytest.raises(CheckpointError, match="another base image"):
        import_bytes(stream)
    nothing_left(sites.b)


def test_a_site_without_the_image_says_what_to_copy(sites: Sites, tmp_path: Path) -> None:
    stream, _ = export(sites)
    sites.monkeypatch.setenv("REPLAY_MIGRATE_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError, match=f"guest image {RECIPE}, which this site does not hold"):
        import_bytes(stream)
    nothing_left(sites.b)


def test_a_domain_with_another_emulator_is_refused(sites: Sites) -> None:
    make_checkpoint(sites.image, "evil", emulator="/tmp/evil-qemu")
    stream, _ = export(sites, "evil")
    with pytest.raises(CheckpointError, match="emulator is '/tmp/evil-qemu'"):
        import_bytes(stream)
    nothing_left(sites.b)


def test_an_overlay_on_another_backing_file_is_refused(sites: Sites, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.qcow2"
    run("cp", str(sites.image.base), str(elsewhere))
    make_checkpoint(sites.image, "moved", backing=elsewhere)
    stream, _ = export(sites, "moved")
    with pytest.raises(CheckpointError, match="backing file"):
        import_bytes(stream)
    nothing_left(sites.b)


def _reseal(stream: bytes, change: Callable[[str, int, bytes], bytes]) -> bytes:
    """The stream decoded and encoded again with ``change(file, offset, page)`` applied to every
    page: valid framing and digest, other content."""
    dec = StreamDecoder()
    events = dec.feed(stream)
    dec.close()
    first = events[0]
    assert isinstance(first, ManifestRead) and isinstance(events[-1], StreamEnded)
    m = first.manifest
    enc = StreamEncoder()
    out = [enc.header(), enc.manifest(m)]
    files = [f.name for f in m.files]
    for ev in events[1:-1]:
        assert isinstance(ev, Pages)
        for off, data in ev.runs:
            for p in range(0, len(data), 4096):
                out.append(enc.span(files.index(ev.file), off + p, change(ev.file, off + p, data[p:p + 4096])))
    out.append(enc.end())
    return b"".join(out)


def test_content_that_does_not_hash_to_its_roots_is_refused(sites: Sites) -> None:
    """A page changed and the stream re-sealed (framing and digest valid): only the recomputed root
    hashes can tell, and they do, for the memory image (a RAM page) and for the disk (guest data)."""
    stream, _ = export(sites)
    import_bytes(_reseal(stream, lambda f, off, page: page), name="resealed")
    assert ckpt.get("resealed").manifest.roots == ckpt.Checkpoint(sites.a / "checkpoints" / "ck").manifest.roots
    pages: dict[str, Callable[[str, int, bytes], bool]] = {
        "memory": lambda f, off, page: f == "memory.sav" and off >= MIB,            # RAM starts at 1 MiB
        "disk": lambda f, off, page: f == "disk.qcow2" and page == b"\x77" * 4096,  # the guest's data
    }
    for what, chosen in pages.items():
        hit: list[int] = []

        def change(f: str, off: int, page: bytes, chosen: Callable[[str, int, bytes], bool] = chosen,
                   hit: list[int] = hit) -> bytes:
            if hit or not chosen(f, off, page):
                return page
            hit.append(off)
            return bytes([page[0] ^ 1]) + page[1:]

        evil = _reseal(stream, change)
        assert hit, what
        with pytest.raises(VerificationError, match=f"the {what} root hash"):
            import_bytes(evil, name=f"evil-{what}")
        nothing_left_but(sites.b, {"resealed"})


def nothing_left_but(site: Path, names: set[str]) -> None:
    assert {p.name for p in (site / "checkpoints").iterdir() if not p.name.startswith(".")} == names


def test_an_interrupted_import_leaves_nothing(sites: Sites) -> None:
    stream, _ = export(sites)
    src = io.BytesIO(stream)

    def read(n: int) -> bytes:
        if src.tell() > len(stream) // 2:
            raise KeyboardInterrupt
        return src.read(min(n, 4096))

    with pytest.raises(KeyboardInterrupt):
        import_checkpoint(read)
    nothing_left(sites.b)


def test_a_stale_partial_folder_is_replaced(sites: Sites) -> None:
    stream, _ = export(sites)
    stale = checkpoints_dir() / "ck.partial"
    stale.mkdir(parents=True)
    (stale / "memory.sav").write_bytes(b"half")
    import_bytes(stream)
    assert not stale.exists() and ckpt.get("ck").manifest.roots


def test_not_enough_free_space_is_refused_before_writing(sites: Sites, monkeypatch: pytest.MonkeyPatch) -> None:
    stream, _ = export(sites)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("store.exchange.shutil.disk_usage", lambda path: usage(1 << 30, (1 << 30) - (1 << 20), 1 << 20))
    with pytest.raises(CheckpointError, match="bytes free"):
        import_bytes(stream)
    nothing_left(sites.b)


def test_export_of_a_missing_checkpoint(sites: Sites) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint named"):
        export_checkpoint("nope", lambda b: None)


def test_the_manifest_in_the_stream_names_both_roots_and_the_base(sites: Sites) -> None:
    stream, out = export(sites)
    kind, length = RECORD.unpack_from(stream, HEADER.size)
    assert kind == Kind.MANIFEST
    doc = json.loads(stream[HEADER.size + RECORD.size:HEADER.size + RECORD.size + length])
    assert doc["roots"] == out.roots
    assert doc["base"] == {"recipe": RECIPE, "blake3": exchange.base_digest(sites.image),
                           "size": sites.image.base.stat().st_size}
    assert [f["name"] for f in doc["files"]] == ["memory.sav", "disk.qcow2", "screen.png"]


@pytest.mark.parametrize("origin", [ckpt.ORIGIN_DOMAIN, ckpt.ORIGIN_MIGRATION])
def test_only_a_checkpoint_of_the_guest_image_is_exported(sites: Sites, origin: str) -> None:
    """The stream carries an image checkpoint (its base found by recipe at the other site); a user's
    domain's or a migration's would arrive as one, its base and its log cut lost."""
    ck = ckpt.get("ck")
    m = ck.manifest
    m.origin, m.base, m.chain, m.backing, m.log_resume = origin, {"path": str(sites.image.base)}, "ck", "ck", 7
    m.save(ck.manifest_path)
    out: list[bytes] = []
    with pytest.raises(CheckpointError, match=f"a {origin} checkpoint"):
        export_checkpoint("ck", out.append)
    assert out == []
