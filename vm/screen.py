"""Screenshots as data: libvirt hands us a PPM; tests, sync marks and reports want pixels,
region hashes and PNG files. Pure Python + zlib, no imaging library."""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

from replay_migrate.errors import VMError


@dataclass(frozen=True)
class Screenshot:
    width: int
    height: int
    rgb: bytes
    """Row-major, 3 bytes per pixel."""

    @classmethod
    def from_ppm(cls, data: bytes) -> Screenshot:
        """Parse a binary PPM (P6, maxval 255), as QEMU's screendump writes it."""
        fields: list[bytes] = []
        i = 0
        while len(fields) < 4:
            while i < len(data) and data[i : i + 1].isspace():
                i += 1
            if i < len(data) and data[i : i + 1] == b"#":
                while i < len(data) and data[i : i + 1] != b"\n":
                    i += 1
                continue
            j = i
            while j < len(data) and not data[j : j + 1].isspace():
                j += 1
            if j == i:
                raise VMError("screenshot: truncated PPM header")
            fields.append(data[i:j])
            i = j
        if fields[0] != b"P6" or fields[3] != b"255":
            raise VMError(f"screenshot: unsupported image format {fields[0]!r}")
        w, h = int(fields[1]), int(fields[2])
        px = data[i + 1 : i + 1 + w * h * 3]
        if len(px) != w * h * 3:
            raise VMError("screenshot: truncated pixel data")
        return cls(w, h, px)

    def pixel(self, x: int, y: int) -> tuple[int, int, int]:
        o = (y * self.width + x) * 3
        return self.rgb[o], self.rgb[o + 1], self.rgb[o + 2]

    def region(self, x: int, y: int, w: int, h: int) -> bytes:
        """The RGB bytes of a rectangle, clipped to the screen."""
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(self.width, x + w), min(self.height, y + h)
        rows = [self.rgb[(r * self.width + x0) * 3 : (r * self.width + x1) * 3] for r in range(y0, y1)]
        return b"".join(rows)

    def region_hash(self, x: int, y: int, w: int, h: int) -> bytes:
        """A short hash of a rectangle (what sync marks compare)."""
        return hashlib.blake2b(self.region(x, y, w, h), digest_size=8).digest()

    def distinct_colours(self, limit: int = 1024) -> int:
        """How many colours the screen shows (a blank or text-console screen shows few)."""
        seen: set[bytes] = set()
        for o in range(0, len(self.rgb), 3 * 97):
            seen.add(self.rgb[o : o + 3])
            if len(seen) >= limit:
                break
        return len(seen)

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + self.rgb[y * self.width * 3 : (y + 1) * self.width * 3]
                       for y in range(self.height))

        def chunk(kind: bytes, body: bytes) -> bytes:
            return (struct.pack(">I", len(body)) + kind + body
                    + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

        return (b"\x89PNG\r\n\x1a\n"
                + chunk(b"IHDR", struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
