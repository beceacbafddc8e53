"""In-memory :class:`~differ.source.BlockSource` and :class:`~differ.source.BlockSink`.

For tests, dry runs and benchmarks: the protocol and the Merkle code see exactly the interface the
file-backed implementations in ``differ.blocks``/``differ.patch`` provide, without touching disk.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from differ.source import LEAF_SIZE, BlockSource, ImageKind
from replay_migrate.errors import ImageError


class MemorySource:
    """An image held in a bytes-like object (not copied; keep it unchanged while in use).

    ``report_zeros``: announce zero leaves through ``known_leaves`` (like holes in a sparse file) so
    the tree builder skips them. ``known``: digests of leaves to announce as known from elsewhere
    (like a qcow2 leaf that lives in the backing chain); the caller vouches for them.
    """

    def __init__(
        self,
        data: bytes | bytearray | memoryview,
        *,
        kind: ImageKind = "raw",
        report_zeros: bool = True,
        known: Mapping[int, bytes] | None = None,
        label: str = "mem",
    ) -> None:
        self._data = memoryview(data).cast("B")
        self._kind: ImageKind = kind
        self._report_zeros = report_zeros
        self._known = dict(known or {})
        self._label = label
        n = self.leaf_count
        if any(not 0 <= i < n for i in self._known):
            raise ValueError("known leaf index out of range")

    @property
    def kind(self) -> ImageKind:
        return self._kind

    @property
    def size(self) -> int:
        return len(self._data)

    @property
    def leaf_count(self) -> int:
        return -(-len(self._data) // LEAF_SIZE)

    def known_leaves(self) -> Iterator[tuple[int, bytes | None]]:
        zero: set[int] = set()
        if self._report_zeros and len(self._data):
            full = len(self._data) // LEAF_SIZE
            pages = np.frombuffer(self._data, dtype=np.uint8, count=full * LEAF_SIZE).reshape(full, LEAF_SIZE)
            zero = set(np.flatnonzero(~pages.any(axis=1)).tolist())
            if full < self.leaf_count and not any(self._data[full * LEAF_SIZE :]):
                zero.add(full)
        for i in sorted(zero | self._known.keys()):
            yield (i, self._known[i]) if i in self._known else (i, None)

    def read(self, index: int, count: int = 1) -> bytes:
        if index < 0 or count < 1 or index + count > self.leaf_count:
            raise ImageError(f"read of leaves {index}..{index + count - 1} outside 0..{self.leaf_count - 1}")
        return bytes(self._data[index * LEAF_SIZE : (index + count) * LEAF_SIZE])

    def label(self, index: int) -> str:
        return self._label

    def close(self) -> None:
        pass


class MemoryImage:
    """A mutable image "on disk" for tests: ``data`` changes only when a sink commits."""

    def __init__(self, data: bytes, *, kind: ImageKind = "raw") -> None:
        self.data = bytes(data)
        self.kind: ImageKind = kind

    def source(self) -> MemorySource:
        return MemorySource(self.data, kind=self.kind)

    def sink(self) -> MemorySink:
        return MemorySink(self)


class MemorySink:
    """Writes go to a private copy; ``commit`` replaces the image's data, ``abort`` drops the copy."""

    def __init__(self, image: MemoryImage) -> None:
        self._image = image
        self._copy: bytearray | None = bytearray(image.data)
        self.committed = False
        self.aborted = False
        self.writes = 0

    def _live(self) -> bytearray:
        if self._copy is None:
            raise ImageError("sink already committed or aborted")
        return self._copy

    def _check(self, index: int, length: int) -> None:
        size = len(self._live())
        want = max(0, min(LEAF_SIZE, size - index * LEAF_SIZE))
        if index < 0 or want == 0 or length != want:
            raise ImageError(f"write of {length} bytes to leaf {index} of a {size}-byte image")

    def write(self, index: int, data: bytes) -> None:
        self._check(index, len(data))
        self._live()[index * LEAF_SIZE : index * LEAF_SIZE + len(data)] = data
        self.writes += 1

    def zero(self, index: int) -> None:
        buf = self._live()
        length = min(LEAF_SIZE, len(buf) - index * LEAF_SIZE)
        self._check(index, length)
        buf[index * LEAF_SIZE : index * LEAF_SIZE + length] = bytes(length)
        self.writes += 1

    def set_size(self, size: int) -> None:
        buf = self._live()
        if size < len(buf):
            del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))

    def source(self) -> BlockSource:
        return MemorySource(bytes(self._live()), kind=self._image.kind)

    def commit(self) -> None:
        self._image.data = bytes(self._live())
        self._copy = None
        self.committed = True

    def abort(self) -> None:
        self._copy = None
        self.aborted = True
