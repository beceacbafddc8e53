"""Decompression bounded by the size the caller expects, for bytes from a peer or a file.

python-zstandard's one-shot ``decompress`` allocates the content size a frame *declares* and
ignores ``max_output_size`` when there is one (issue 10: 17 bytes declaring 2^44 raised a bare
MemoryError, 32 KiB of RLE blocks declaring 1 GiB took the RSS to 1 GiB). Every caller here knows
exactly how many bytes it expects, so :func:`decompress_exact` reads the frame header first and
refuses, before any allocation, a frame that does not declare exactly that size, uses a window
larger than that size needs, or needs a dictionary; then it decompresses into a buffer of that
size, one frame, no bytes after it. Failures are the caller's project error, never ``ZstdError``.
"""

from __future__ import annotations

import zstandard

from replay_migrate.errors import ReplayMigrateError

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MIN_WINDOW = 1 << 10
"""zstd's smallest window (``ZSTD_WINDOWLOG_ABSOLUTEMIN``)."""
MAX_WINDOW = 1 << 31
"""zstd's largest window a decoder can be told to accept (``ZSTD_WINDOWLOG_MAX_32``)."""


def window_bound(size: int) -> int:
    """The largest window a frame of ``size`` bytes of content needs: zstd never picks one larger
    than the content rounded up to a power of two (``ZSTD_adjustCParams``)."""
    return min(MAX_WINDOW, max(MIN_WINDOW, 1 << max(0, size - 1).bit_length()))


def decompress_exact(data: bytes, size: int, error: type[ReplayMigrateError], what: str) -> bytes:
    """The content of the single zstd frame ``data``, which must declare ``size`` bytes.

    Raises ``error`` (naming ``what``) for anything else: not a zstd frame, no or another declared
    size, a window larger than :func:`window_bound` of ``size``, a dictionary, corrupt data, data
    that inflates past its declared size, bytes after the frame. Allocates at most ``size`` bytes
    of output and a window of at most ``window_bound(size)``."""
    if size < 0:
        raise ValueError("negative size")
    if data[:4] != ZSTD_MAGIC:
        raise error(f"{what}: not a zstd frame")
    try:
        params = zstandard.get_frame_parameters(data)
    except zstandard.ZstdError:
        raise error(f"{what}: malformed zstd frame header") from None
    if params.content_size == zstandard.CONTENTSIZE_UNKNOWN:
        raise error(f"{what}: the zstd frame does not declare its size")
    if params.content_size != size:
        raise error(f"{what}: the zstd frame declares {params.content_size} bytes, expected {size}")
    if params.dict_id:
        raise error(f"{what}: the zstd frame needs a dictionary")
    window = window_bound(size)
    if params.window_size > window:
        raise error(f"{what}: the zstd frame's window of {params.window_size} bytes exceeds {window}")
    if size == 0:
        return b""
    try:
        dctx = zstandard.ZstdDecompressor(max_window_size=window)
        out: bytes = dctx.decompress(data, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError:
        raise error(f"{what}: corrupt zstd data") from None
    if len(out) != size:
        raise error(f"{what}: zstd data of {len(out)} bytes, expected {size}")
    return out
