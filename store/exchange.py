"""Checkpoints between sites: ``checkpoint export`` writes one as a stream (``store.ckstream``),
``checkpoint import`` makes a checkpoint of one, verified before it can be used.

Both sites must hold the same checkpoint before a migration; making it again at the other site
would not do (two boots never save the same memory). The export carries the memory image and the
overlay sparse (holes and zero pages are skipped, the rest compressed) and the manifest with both
root hashes and the identity of the guest image's base, which the overlay is on top of and which
the other site must already hold, at the same path (the saved domain names its kernel and the
overlay names its backing file). The import writes into ``<name>.partial`` and only renames it to
``<name>`` when every check passed:

1. the stream: its framing, every size against the limits, its END digest over every byte;
2. the base image: this site holds the recipe's image, and its ``base.qcow2`` has the blake3
   digest and size the manifest names (checked before anything is written);
3. the overlay: a qcow2 file whose backing file is that base, nothing else (no external data
   file, not encrypted, the base's virtual size), checked without opening the backing file it names;
4. the saved domain in the memory image's header: one replay-migrate would define
   (``vm.spec.check_saved_domain``): libvirt runs it as root;
5. both root hashes, recomputed with the store's own code (``store.vmstate.checkpoint_trees``:
   the memory image's Merkle tree and the leaf digests of the disk's guest-visible content).

Anything else is refused with a clear error and the partial folder is deleted: nothing is left
half-imported, whatever stopped it (an error, a signal, a reader that went away).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import blake3

from replay_migrate import sparse
from replay_migrate.errors import (
    CheckpointError,
    ImageError,
    ReplayMigrateError,
    UsageError,
    VerificationError,
)
from replay_migrate.files import locked
from replay_migrate.safeopen import open_regular
from replay_migrate.savefmt import read_header
from replay_migrate.tools import run_tool
from store import checkpoint as ckpt
from store.ckstream import (
    FILES,
    PAGE,
    ZSTD_LEVEL,
    FileEntry,
    ManifestRead,
    Pages,
    StreamDecoder,
    StreamEncoder,
    StreamEnded,
    StreamLimits,
    StreamManifest,
)
from store.images import images_dir
from store.paths import check_name, checkpoint_path, checkpoints_dir
from store.vmstate import checkpoint_trees
from vm.machine import file_allocated
from vm.spec import GuestImage, check_saved_domain

log = logging.getLogger("replay_migrate.exchange")
READ_CHUNK = 1 << 20
"""Bytes read from the stream per call (the decoder buffers at most one record besides)."""
IMPORT_LOCK = ".import.lock"
"""Lock file in the checkpoints folder: one import at a time (each owns its ``.partial`` folder)."""
FREE_SPACE_MARGIN = 256 << 20
"""Room left on the state folder's file system besides the data an import announces (the trees
and digests it computes next: ~15 MiB for a 1 GiB guest)."""
QEMU_IMG_TIMEOUT_S = 60.0
"""Longest ``qemu-img info`` may take on the imported overlay."""


@dataclass
class TransferSizes:
    """What a checkpoint costs as files and as a stream (the README's export table)."""

    name: str
    apparent_bytes: int = 0
    """Sum of the files' sizes (1 GiB of guest RAM is a 1 GiB memory image)."""
    allocated_bytes: int = 0
    """What the files occupy on disk (holes cost nothing)."""
    data_bytes: int = 0
    """Bytes of non-zero pages the stream carries (written by the import)."""
    stream_bytes: int = 0
    """The stream itself: what crosses the link."""
    seconds: float = 0.0
    roots: dict[str, str] = field(default_factory=dict)
    files: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per file: apparent, allocated, data bytes."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def base_digest(image: GuestImage) -> str:
    """blake3 of the image's ``base.qcow2`` (~0.5 s for 735 MiB in the page cache)."""
    fd, _ = open_regular(image.base, "base image", error=ImageError)
    os.close(fd)
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    h.update_mmap(str(image.base))
    return h.hexdigest()


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The file's data as page-aligned ``(start, end)`` ranges (the last may end at ``size``),
    overlapping ones merged: everything outside is a hole, never read."""
    out: list[tuple[int, int]] = []
    for start, end in sparse.data_extents(fd, 0, size):
        start, end = start // PAGE * PAGE, min(size, -(-end // PAGE) * PAGE)
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


# ---- export ---------------------------------------------------------------------------------------


def export_checkpoint(name: str, write: Callable[[bytes], object], *, level: int = ZSTD_LEVEL,
                      max_span: int = StreamLimits.max_span) -> TransferSizes:
    """Write checkpoint ``name`` as one stream through ``write`` (a file's or a pipe's). Computes
    the checkpoint's trees first if they were never computed (its root hashes go in the manifest)."""
    ck = ckpt.get(name)
    if ck.manifest.origin != ckpt.ORIGIN_IMAGE:    # its base and log cut have no place in the stream
        raise CheckpointError(f"checkpoint {name!r} is a {ck.manifest.origin} checkpoint: export carries "
                              "checkpoints of the guest image only (copy a user's domain's checkpoint folder "
                              "and the base image it names; a migration's is made at both sites)")
    t0 = time.monotonic()
    checkpoint_trees(ck)
    m = ck.manifest
    image = ck.image
    image.check()
    sizes = TransferSizes(ck.name, roots=dict(m.roots))
    opened: list[tuple[str, int, int, list[tuple[int, int]]]] = []
    enc = StreamEncoder(level=level, max_span=max_span)
    try:
        for fname in FILES:
            path = ck.dir / fname
            if fname == "screen.png" and not path.exists():
                continue
            fd, st = open_regular(path, f"checkpoint's {fname}", error=CheckpointError)
            opened.append((fname, fd, st.st_size, data_extents(fd, st.st_size)))
            sizes.files[fname] = {"apparent": st.st_size, "allocated": st.st_blocks * 512, "data": 0}
        manifest = StreamManifest(
            name=ck.name, image_recipe=m.image_recipe, virt=m.virt, memory_mib=m.memory_mib, created=m.created,
            boot_to_desktop_s=m.boot_to_desktop_s, save_s=m.save_s, roots=dict(m.roots),
            base_blake3=base_digest(image), base_size=image.base.stat().st_size,
            files=tuple(FileEntry(f, size, sum(e - s for s, e in ext)) for f, _, size, ext in opened))
        write(enc.header())
        write(enc.manifest(manifest))
        for index, (fname, fd, _size, extents) in enumerate(opened):
            before = enc.data_in
            for start, end in extents:
                for off in range(start, end, max_span):
                    n = min(max_span, end - off)
                    data = os.pread(fd, n, off)
                    if len(data) != n:
                        raise CheckpointError(f"checkpoint {name!r}: {fname} changed while it was exported")
                    record = enc.span(index, off, data)
                    if record:
                        write(record)
            sizes.files[fname]["data"] = enc.data_in - before
        write(enc.end())
    except OSError as e:
        raise CheckpointError(f"checkpoint {name!r}: export failed: {e.strerror or e}") from None
    finally:
        for _, fd, _, _ in opened:
            os.close(fd)
    sizes.apparent_bytes = sum(f["apparent"] for f in sizes.files.values())
    sizes.allocated_bytes = sum(f["allocated"] for f in sizes.files.values())
    sizes.data_bytes = enc.data_in
    sizes.stream_bytes = enc.bytes_out
    sizes.seconds = time.monotonic() - t0
    return sizes


# ---- import ---------------------------------------------------------------------------------------


def local_image(m: StreamManifest) -> GuestImage:
    """This site's guest image for the stream's recipe, with the very base the stream was made on."""
    image = GuestImage(images_dir() / m.image_recipe, m.image_recipe)
    try:
        image.check()
    except ImageError as e:
        raise CheckpointError(f"checkpoint {m.name!r} is for guest image {m.image_recipe}, which this site does "
                              f"not hold ({e}): copy the image folder from the other site (a new build of the "
                              "same recipe is not byte-identical)") from None
    size = image.base.stat().st_size
    if size != m.base_size or base_digest(image) != m.base_blake3:
        raise CheckpointError(f"checkpoint {m.name!r} was made on another base image: this site's "
                              f"{image.base} ({size} bytes) is not the one the stream names ({m.base_size} "
                              f"bytes, blake3 {m.base_blake3[:16]}...); copy the image folder from the other site")
    return image


def _chunks(read: Callable[[int], bytes], chunk: int) -> Iterator[bytes]:
    while True:
        data = read(chunk)
        if not data:
            return
        yield data


def import_checkpoint(read: Callable[[int], bytes], *, name: str | None = None,
                      limits: StreamLimits | None = None, chunk: int = READ_CHUNK) -> TransferSizes:
    """Make a checkpoint of the stream ``read`` returns (``read(n)``: up to n bytes, b"" at the
    end), named ``name`` or as the stream says; verified before it is renamed into place (see
    the module docstring). Refused when a checkpoint of that name exists."""
    if name is not None:
        try:
            check_name(name, "checkpoint")
        except ReplayMigrateError as e:
            raise UsageError(f"--name: {e}") from None
    t0 = time.monotonic()
    dec = StreamDecoder(limits)
    stream = _chunks(read, chunk)
    pending: list[ManifestRead | Pages | StreamEnded] = []
    for data in stream:
        pending = dec.feed(data)
        if pending:
            break
    else:
        dec.close()
    first = pending.pop(0)
    assert isinstance(first, ManifestRead)       # the decoder yields the manifest first or raises
    m = first.manifest
    name = name or m.name
    folder = checkpoint_path(name)
    if folder.exists():
        raise CheckpointError(f"checkpoint {name!r} exists already on this site (checkpoint rm {name}, or "
                              "import with --name)")
    image = local_image(m)
    checkpoints_dir().mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(checkpoints_dir()).free
    if m.data_bytes + FREE_SPACE_MARGIN > free:
        raise CheckpointError(f"checkpoint {name!r}: the stream announces {m.data_bytes} bytes of data, and "
                              f"{checkpoints_dir()} has {free} bytes free")
    with locked(checkpoints_dir() / IMPORT_LOCK):
        partial = folder.with_name(name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)          # a killed import's
        if folder.exists():
            raise CheckpointError(f"checkpoint {name!r} exists already on this site")
        partial.mkdir()
        try:
            sizes = _receive(dec, m, pending, stream, partial)
            _check_overlay(partial / "disk.qcow2", image)
            try:
                check_saved_domain(read_header(partial / "memory.sav").xml, image)
            except ImageError as e:
                raise CheckpointError(f"checkpoint stream {m.name!r}: {e}") from None
            _verify(m, name, image, partial)
            partial.rename(folder)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    ck = ckpt.Checkpoint(folder)
    sizes.name = name
    sizes.roots = dict(ck.manifest.roots)
    sizes.seconds = time.monotonic() - t0
    return sizes


def _receive(dec: StreamDecoder, m: StreamManifest, pending: list[ManifestRead | Pages | StreamEnded],
             stream: Iterator[bytes], partial: Path) -> TransferSizes:
    """Write the stream's files into ``partial``: sparse (only the pages it carries), truncated to
    their sizes, fsynced; returns once the END record verified and the input ended after it."""
    fds: dict[str, int] = {}
    sizes = TransferSizes(m.name)
    written = dict.fromkeys((f.name for f in m.files), 0)
    try:
        for f in m.files:
            fd = os.open(partial / f.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            fds[f.name] = fd
            os.ftruncate(fd, f.size)
        ended = False
        events: Iterator[ManifestRead | Pages | StreamEnded] = iter(pending)
        while True:
            for ev in events:
                if isinstance(ev, Pages):
                    for offset, data in ev.runs:
                        if os.pwrite(fds[ev.file], data, offset) != len(data):
                            raise CheckpointError(f"{partial / ev.file}: short write")
                    written[ev.file] += ev.nbytes
                elif isinstance(ev, StreamEnded):
                    ended = True
            more = next(stream, None)
            if more is None:
                break
            events = iter(dec.feed(more))       # bytes after the end: refused by the decoder
        dec.close()
        assert ended
        for f in m.files:
            os.fsync(fds[f.name])
            st = os.fstat(fds[f.name])
            sizes.files[f.name] = {"apparent": st.st_size, "allocated": st.st_blocks * 512,
                                   "data": written[f.name]}
    except OSError as e:
        raise CheckpointError(f"checkpoint {m.name!r}: cannot write the import: {e.strerror or e}") from None
    finally:
        for fd in fds.values():
            os.close(fd)
    sizes.apparent_bytes = sum(f["apparent"] for f in sizes.files.values())
    sizes.allocated_bytes = sum(f["allocated"] for f in sizes.files.values())
    sizes.data_bytes = sum(written.values())
    sizes.stream_bytes = dec.bytes_in
    return sizes


def _check_overlay(path: Path, image: GuestImage) -> None:
    """The imported overlay is a plain qcow2 file on this site's base, read with ``qemu-img info``
    *without* its backing chain (a hostile header could name any file, or a FIFO, as backing)."""
    info = _qemu_img_info(path)
    base = _qemu_img_info(image.base)
    specific = info.get("format-specific", {}).get("data", {}) if isinstance(info.get("format-specific"), dict) \
        else {}
    why = None
    if info.get("format") != "qcow2":
        why = f"is not qcow2 but {str(info.get('format'))[:20]}"
    elif info.get("backing-filename") != str(image.base):
        why = (f"has the backing file {str(info.get('backing-filename'))[:200]!r}, not this site's {image.base} "
               "(the guest image must be at the same path on both sites)")
    elif info.get("backing-filename-format") not in (None, "qcow2"):
        why = "names a backing format other than qcow2"
    elif not isinstance(specific, dict) or specific.get("data-file") or specific.get("encrypt") \
            or info.get("encrypted"):
        why = "uses an external data file or encryption"
    elif info.get("virtual-size") != base.get("virtual-size"):
        why = f"has a virtual size of {info.get('virtual-size')}, its base {base.get('virtual-size')}"
    if why is not None:
        raise CheckpointError(f"checkpoint stream: its disk overlay {why}")


def _qemu_img_info(path: Path) -> dict[str, Any]:
    r = run_tool(["qemu-img", "info", "--output=json", "-U", "-f", "qcow2", path], what=f"{path}: qemu-img info",
                 error=CheckpointError, timeout=QEMU_IMG_TIMEOUT_S, check=False)
    if r.returncode != 0:
        raise CheckpointError(f"checkpoint stream: its disk overlay is not a valid qcow2 image: "
                              f"{r.stderr.strip()[-300:]}")
    try:
        info = json.loads(r.stdout)
    except ValueError:
        raise CheckpointError(f"{path}: qemu-img info printed something that is not JSON") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: unexpected qemu-img info output")
    return info


def _verify(m: StreamManifest, name: str, image: GuestImage, partial: Path) -> None:
    """Write the local manifest, compute both trees with the store's code, compare both roots."""
    mem, disk = partial / "memory.sav", partial / "disk.qcow2"
    ckpt.Manifest(name=name, image_recipe=m.image_recipe, image_dir=str(image.dir), virt=m.virt,
                  memory_mib=m.memory_mib, created=m.created, boot_to_desktop_s=m.boot_to_desktop_s,
                  save_s=m.save_s, memory_apparent_bytes=mem.stat().st_size, memory_allocated_bytes=file_allocated(mem),
                  disk_allocated_bytes=file_allocated(disk)).save(partial / "manifest.json")
    try:
        checkpoint_trees(ckpt.Checkpoint(partial))
    except ImageError as e:
        raise CheckpointError(f"checkpoint stream {m.name!r}: {e}") from None
    roots = ckpt.Checkpoint(partial).manifest.roots
    for what in ("memory", "disk"):
        if roots.get(what) != m.roots[what]:
            raise VerificationError(f"checkpoint stream {m.name!r}: the {what} root hash of what arrived "
                                    f"({roots.get(what, '')[:16]}...) is not the one it names "
                                    f"({m.roots[what][:16]}...): nothing was imported")
