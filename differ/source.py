"""The one interface the Merkle code and the transfer protocol see: an image as a row of leaves.

A *block source* presents an image (a sparse memory save image, the guest-visible content of a
qcow2 overlay, a raw file) as ``leaf_count`` leaves of ``LEAF_SIZE`` bytes at offsets
``i * LEAF_SIZE`` of the image's *logical* content (the file for memory and raw images, the guest's
disk for qcow2). The last leaf may be short when ``size`` is not a multiple of ``LEAF_SIZE``; a
short leaf is hashed as its real bytes, never padded.

Sources tell what they know without reading: leaves that are holes or zero pages (hash is the
constant zero-leaf hash) and leaves whose hash is known from elsewhere (a qcow2 leaf that is not
allocated in the overlay has the hash of the shared backing chain, taken from the checkpoint's
saved tree). The Merkle code reads only the remaining leaves.

A *block sink* takes verified leaves for one image and makes them permanent atomically: nothing is
visible in the real image until ``commit`` and ``abort`` leaves the original untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

LEAF_SIZE = 4096
"""Leaf size in bytes: one memory page, one 4 KiB block inside a 64 KiB qcow2 cluster."""

ZERO_LEAF_DIGEST = bytes.fromhex("b6fb73fc46938c981e2b0b4b1ef282adcfc89854d01bfe3972fdc4785b41b2c7")
"""blake3 of ``LEAF_SIZE`` zero bytes: the digest of every hole and zero page (checked in the tests),
a literal so that this interface module needs no hashing import."""

ImageKind = Literal["memory", "disk", "raw"]


class BlockSource(Protocol):
    """Read access to one image as leaves. Implementations: ``differ.blocks``."""

    @property
    def kind(self) -> ImageKind: ...

    @property
    def size(self) -> int:
        """Logical size in bytes (the memory file's size, the guest disk's virtual size)."""
        ...

    @property
    def leaf_count(self) -> int: ...

    def known_leaves(self) -> Iterator[tuple[int, bytes | None]]:
        """Yield ``(index, digest)`` for leaves whose hash needs no read, in increasing order:
        ``digest`` is None for a zero leaf (hole, zero page), else the 32-byte digest taken from
        elsewhere (the backing chain's saved tree). Sources that know millions of leaves also
        offer :meth:`KnownLeafArrays.known_leaf_arrays`."""
        ...

    def read(self, index: int, count: int = 1) -> bytes:
        """The bytes of ``count`` consecutive leaves starting at ``index`` (short at the end)."""
        ...

    def label(self, index: int) -> str:
        """What a leaf belongs to, for reports: e.g. ``"pc.ram"``, ``"non-ram"``, ``"disk"``."""
        ...

    def close(self) -> None: ...


KnownArrays = tuple["npt.NDArray[np.int64]", "npt.NDArray[np.int64]", "npt.NDArray[np.uint8]"]
"""(zero leaves, leaves with a given digest, those digests as an ``(n, 32)`` array); indices ascending."""


@runtime_checkable
class KnownLeafArrays(Protocol):
    """Optional for a block source: what ``known_leaves`` yields, as arrays, so the tree code takes
    a qcow2 disk's million backing leaves without a Python step per leaf (that loop cost ~0.7 s per
    tree of a 4 GiB disk, three times inside a migration's downtime)."""

    def known_leaf_arrays(self) -> KnownArrays: ...


class BlockSink(Protocol):
    """Write access to a *copy* of one image; the original changes only at ``commit``."""

    def write(self, index: int, data: bytes) -> None:
        """Set leaf ``index`` to ``data`` (LEAF_SIZE bytes, or fewer for the last leaf)."""
        ...

    def zero(self, index: int) -> None:
        """Set leaf ``index`` to zeros, as a hole where the format allows."""
        ...

    def set_size(self, size: int) -> None:
        """Make the logical size ``size`` bytes (truncate or extend with zeros)."""
        ...

    def source(self) -> BlockSource:
        """A source over the patched copy, to recompute the root before ``commit``."""
        ...

    def commit(self) -> None:
        """Atomically replace the original image with the patched copy."""
        ...

    def abort(self) -> None:
        """Drop the copy; the original image is untouched."""
        ...
