"""Helpers for the diff-protocol tests (not a test module): in-memory images on both sides, driven
through the blocking adapter, and the raw messages the hostile-input tests build."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import msgpack
import numpy as np

from differ.memsource import MemoryImage, MemorySink, MemorySource
from differ.merkle import MerkleTree
from differ.protocol import PROTOCOL_VERSION, ProtocolParams, TransferStats
from differ.similar import index_of
from differ.source import LEAF_SIZE
from differ.transfer import (
    BlockingSource,
    BlockingTarget,
    ReferenceImage,
    SourceImage,
    TargetImage,
    blocking_source,
    blocking_target,
    run_local,
)
from replay_migrate.errors import ReplayMigrateError

KEY = bytes(range(32))
PAGE = LEAF_SIZE
V = PROTOCOL_VERSION


def rand(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


def base_of(data: bytes | None, *, similar: bool = False) -> ReferenceImage | None:
    """``data`` as a base both sides hold; ``similar``: with its similarity index (a source's)."""
    if data is None:
        return None
    src = MemorySource(data)
    index = index_of(src.leaf_count, np.arange(len(data) // PAGE, dtype=np.int64), src.read) if similar else None
    return ReferenceImage(src, MerkleTree.from_bytes(data), index)


class InPlaceImage(MemoryImage):
    """An image its sink patches where its source reads (``differ.patch``'s in-place sinks), which
    notes every leaf written: the target's own source refuses to read one of them afterwards."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.buf = bytearray(data)
        self.written: set[int] = set()
        self.deleted = False

    def source(self) -> MemorySource:
        return LiveSource(self)

    def sink(self) -> MemorySink:
        return InPlaceSink(self)


class LiveSource(MemorySource):
    """The image as it is when read (a file source of a file patched in place), of its size when
    opened; reading a leaf after it was written is the protocol's bug, not the image's."""

    def __init__(self, image: InPlaceImage) -> None:
        self._image = image
        self._opened_size = len(image.buf)
        super().__init__(b"")

    @property
    def size(self) -> int:
        return self._opened_size

    @property
    def leaf_count(self) -> int:
        return -(-self._opened_size // PAGE)

    def read(self, index: int, count: int = 1) -> bytes:
        late = self._image.written & set(range(index, index + count))
        assert not late, f"the target read leaves {sorted(late)} of its own image after it wrote them"
        end = min(self._opened_size, (index + count) * PAGE)
        data = bytes(self._image.buf[index * PAGE : end])
        if len(data) != end - index * PAGE:
            raise ReplayMigrateError("short read: the image shrank")
        return data


class InPlaceSink(MemorySink):
    """Writes straight into the image; a shrink waits for the last write; abort deletes it."""

    def __init__(self, image: MemoryImage) -> None:
        assert isinstance(image, InPlaceImage)
        super().__init__(image)
        self._in_place = image
        self._copy = image.buf
        self._shrink_to: int | None = None

    def _length(self, index: int) -> int:
        size = self._shrink_to if self._shrink_to is not None else len(self._live())
        return max(0, min(PAGE, size - index * PAGE))

    def _check(self, index: int, length: int) -> None:
        assert index >= 0 and self._length(index) and length == self._length(index), \
            f"write of {length} bytes to leaf {index}"

    def write(self, index: int, data: bytes) -> None:
        super().write(index, data)
        self._in_place.written.add(index)

    def zero(self, index: int) -> None:
        self.write(index, bytes(self._length(index)))

    def set_size(self, size: int) -> None:
        buf = self._live()
        self._shrink_to = size if size < len(buf) else None
        if size > len(buf):
            buf.extend(bytes(size - len(buf)))

    def _finish(self) -> bytearray:
        buf = self._live()
        if self._shrink_to is not None:
            del buf[self._shrink_to :]
            self._shrink_to = None
        return buf

    def source(self) -> MemorySource:
        return MemorySource(bytes(self._finish()))

    def commit(self) -> None:
        self._in_place.data = bytes(self._finish())
        self._copy = None
        self.committed = True

    def abort(self) -> None:
        if self._copy is not None:
            self._in_place.deleted = True
        self._copy = None
        self.aborted = True


class Pair:
    """Source images A and target images B (name → bytes), with memory sinks."""

    def __init__(
        self,
        a: dict[str, bytes],
        b: dict[str, bytes],
        *,
        fanout: int = 4,
        params: ProtocolParams | None = None,
        references: tuple[bytes, ...] = (),
        bases: dict[str, bytes] | None = None,
        target_bases: dict[str, tuple[bytes, MerkleTree]] | None = None,
        dry_run: bool = False,
        measure_plain: bool = False,
        sinks: dict[str, type[MemorySink]] | None = None,
        similar: bool = False,
        verify_written: bool = False,
        in_place: bool = False,
    ) -> None:
        """``bases``: the common checkpoint's version of each image, held by both sides;
        ``target_bases``: the target's (content, tree) instead, to make it disagree; ``sinks``:
        a sink class per image instead of MemorySink; ``similar``: the source has similarity
        indexes of the bases (XSIM answers); ``verify_written``: the target verifies by
        reading back what it wrote; ``in_place``: its images are patched in place
        (:class:`InPlaceImage`)."""
        self.a = a
        bases = bases or {}
        t_bases = target_bases or {name: (data, MerkleTree.from_bytes(data)) for name, data in bases.items()}
        self.images = {name: InPlaceImage(data) if in_place else MemoryImage(data) for name, data in b.items()}
        self.sinks: dict[str, MemorySink] = {name: (sinks or {}).get(name, InPlaceSink if in_place else MemorySink)(im)
                                             for name, im in self.images.items()}
        self.source: BlockingSource = blocking_source(
            [
                SourceImage(name, MemorySource(data), MerkleTree.from_bytes(data, fanout),
                            base=base_of(bases.get(name), similar=similar))
                for name, data in a.items()
            ],
            params,
            measure_plain=measure_plain,
        )
        self.target: BlockingTarget = blocking_target(
            [
                TargetImage(
                    name,
                    im.source(),
                    MerkleTree.from_bytes(im.data, fanout),
                    self.sinks[name],
                    base=ReferenceImage(MemorySource(t_bases[name][0]), t_bases[name][1]) if name in t_bases else None,
                )
                for name, im in self.images.items()
            ],
            params,
            references=[ReferenceImage(MemorySource(r), MerkleTree.from_bytes(r)) for r in references],
            dry_run=dry_run,
            key=KEY,
            verify_written=verify_written,
        )

    def run(self) -> TransferStats:
        return run_local(self.source, self.target)

    def data(self, name: str = "disk") -> bytes:
        return self.images[name].data


def one(a: bytes, b: bytes, **kw: object) -> Pair:
    return Pair({"disk": a}, {"disk": b}, **kw)  # type: ignore[arg-type]


def mtype(data: bytes) -> str:
    msg = msgpack.unpackb(data, raw=False)
    return str(msg["t"] if msg["t"] != "frag" else msg["lt"])


def pump(
    pair: Pair,
    tamper: Callable[[str, int, bytes], bytes | None] | None = None,
    *,
    max_rounds: int = 10_000,
) -> list[tuple[str, bytes]]:
    """Like run_local, but each source→target message goes through ``tamper(type, index, data)``
    (return the bytes to deliver, or None to drop). Returns the log of delivered messages."""
    src, tgt = pair.source, pair.target
    tgt.start()
    log: list[tuple[str, bytes]] = []
    k = 0
    for _ in range(max_rounds):
        moved = False
        for data in tgt.data_to_send():
            moved = True
            log.append(("T", data))
            src.receive_data(data)
        for data in src.data_to_send():
            moved = True
            out = tamper(mtype(data), k, data) if tamper else data
            k += 1
            if out is None:
                continue
            log.append(("S", out))
            try:
                tgt.receive_data(out)
            except ReplayMigrateError:
                for back in tgt.data_to_send():
                    src.receive_data(back)
                raise
        if not moved:
            break
    return log


def walk_to_want(pair: Pair) -> bytes:
    """Run the walk; the target's want message, not delivered."""
    pair.target.start()
    while True:
        (out,) = pair.target.data_to_send()
        if mtype(out) == "want":
            return out
        pair.source.receive_data(out)
        for m in pair.source.data_to_send():
            pair.target.receive_data(m)


def replayed(base: bytes, *, same: tuple[int, ...], differ: tuple[int, ...], target_only: tuple[int, ...],
             source_only: tuple[int, ...] = ()) -> tuple[bytes, bytes]:
    """(source, target) grown from ``base``: pages changed alike, changed differently, changed by
    the target alone (the source kept the base's), changed by the source alone."""
    a, b = bytearray(base), bytearray(base)
    for i in same:
        a[i * PAGE : (i + 1) * PAGE] = b[i * PAGE : (i + 1) * PAGE] = rand(PAGE, 100 + i)
    for i in differ:
        a[i * PAGE : (i + 1) * PAGE], b[i * PAGE : (i + 1) * PAGE] = rand(PAGE, 200 + i), rand(PAGE, 300 + i)
    for i in target_only:
        b[i * PAGE : (i + 1) * PAGE] = rand(PAGE, 400 + i)
    for i in source_only:
        a[i * PAGE : (i + 1) * PAGE] = rand(PAGE, 500 + i)
    return bytes(a), bytes(b)


def hello_bytes(**override: object) -> bytes:
    msg: dict[str, object] = {
        "t": "hello",
        "v": V,
        "db": 8,
        "sb": 256,
        "fb": 4,
        "cb": 0,
        "rb": 3,
        "key": KEY,
        "img": [{"n": "disk", "s": 4 * PAGE, "l": 4, "f": 4, "r": bytes(32)}],
        "br": [None],
    }
    msg.update(override)
    return bytes(msgpack.packb(msg))


def tree_bytes(size: int, *, fanout: int = 4, name: str = "disk") -> bytes:
    """A tree message announcing one image of ``size`` bytes whose roots differ but, with no walk
    part, nothing to walk: all the target does with it is prepare for that size."""
    leaves = -(-size // PAGE)
    img = {"n": name, "s": size, "l": leaves, "f": fanout, "r": bytes(32)}
    return bytes(msgpack.packb({"t": "tree", "v": V, "img": [img], "bm": [False], "p": [None]}))


def frag_bytes(lt: str, i: int, n: int, chunk: bytes) -> bytes:
    return bytes(msgpack.packb({"t": "frag", "v": V, "lt": lt, "i": i, "n": n, "d": chunk}))


def peak_of(fn: Callable[[], object]) -> int:
    """The peak of Python allocations while ``fn`` runs."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
