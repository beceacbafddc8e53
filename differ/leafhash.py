"""The Merkle tree's hashing core: blake3 of many 4 KiB leaves, and keyed interior nodes, per call.

Two backends give byte-identical digests (``tests/test_leafhash.py`` checks them against each other
and against plain ``blake3``):

* **native** (``_leafhash.c``, loaded with ctypes): one call hashes a whole read (1 MiB, 256 leaves)
  with the chunks of 16 leaves side by side in blake3's SIMD kernels, at one-call blake3 speed;
  ctypes releases the GIL during the call, so reading and hashing overlap in two threads;
* **python** (``blake3`` from PyPI): one call per leaf, ~3.5x slower than one-call blake3 over the
  same bytes (a Python call costs about what hashing 4 KiB costs). The fallback where the native
  library cannot be built or loaded; the reason is logged once, and :func:`native_reason` says it.

The native library is built at install time (``scripts/setup-host.sh`` runs ``python -m
differ.leafhash --build``, idempotent: it rebuilds only when its inputs changed) with gcc from
``_leafhash.c`` and the blake3 C sources Debian ships in ``librust-blake3-dev`` (no crates registry
is reachable, bookworm has no ``libblake3-dev``, and nothing of blake3 is copied into this
repository). A library that is missing, was built from another ``_leafhash.c`` or fails the
self-test at load is not used.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import blake3
import numpy as np
import numpy.typing as npt

from differ.source import LEAF_SIZE
from replay_migrate.errors import HostError
from replay_migrate.tools import run_tool

log = logging.getLogger("replay_migrate.leafhash")

DIGEST_SIZE = 32
ABI = 1
"""What ``rm_abi()`` of a usable library returns: the C functions' signatures."""
HERE = Path(__file__).resolve().parent
C_SOURCE = HERE / "_leafhash.c"
LIBRARY = HERE / "_leafhash.so"
BLAKE3_C_DIRS = "/usr/share/cargo/registry/blake3-*/c"
"""Where Debian's ``librust-blake3-dev`` puts blake3's C implementation (one folder per version)."""
BLAKE3_C_ENV = "REPLAY_MIGRATE_BLAKE3_C"
"""Environment variable naming another folder with blake3's C sources."""
DISABLE_ENV = "REPLAY_MIGRATE_NATIVE_HASH"
"""Set to ``0`` to hash in Python although the native library is there (benchmarks, debugging)."""
DEFAULT_CC = "gcc"
BUILD_TIMEOUT_S = 300.0
"""Seconds the compiler may take (~3 s here)."""
CFLAGS = ("-O3", "-shared", "-fPIC", "-fvisibility=hidden", "-Wl,-Bsymbolic")
"""``-fvisibility=hidden`` and ``-Bsymbolic``: the library exports only its ``rm_`` functions and
binds blake3's symbols to its own copies, whatever else the process has loaded."""

BUILD_TAG = b"rm-leafhash-build:"
"""Precedes the build digest in the library's bytes (see ``rm_source_digest`` in ``_leafhash.c``)."""
_COMMON_SOURCES = ("blake3.c", "blake3_dispatch.c", "blake3_portable.c")
_X86_64_SOURCES = (
    "blake3_sse2_x86-64_unix.S",
    "blake3_sse41_x86-64_unix.S",
    "blake3_avx2_x86-64_unix.S",
    "blake3_avx512_x86-64_unix.S",
)
_NO_SIMD = ("-DBLAKE3_NO_SSE2", "-DBLAKE3_NO_SSE41", "-DBLAKE3_NO_AVX2", "-DBLAKE3_NO_AVX512")

UInt8Array = npt.NDArray[np.uint8]
Buffer = bytes | bytearray | memoryview


class BuildError(HostError):
    """The native library could not be built; the message says why (for the log)."""


# -- the reference (python) backend -----------------------------------------------------------


def hash_leaves_python(data: Buffer) -> bytes:
    """Concatenated digests of consecutive 4 KiB leaves of ``data`` (the last may be short), one
    ``blake3`` call per leaf: the definition the native backend must match."""
    mv = memoryview(data).cast("B")
    hasher = blake3.blake3
    return b"".join([hasher(mv[i : i + LEAF_SIZE]).digest() for i in range(0, len(mv), LEAF_SIZE)])


def hash_nodes_python(children: Buffer, group: int, key: bytes) -> bytes:
    """Concatenated keyed digests of consecutive ``group``-byte pieces of ``children`` (the last may
    be short): one interior level over the level below."""
    mv = memoryview(children).cast("B")
    hasher = blake3.blake3
    return b"".join([hasher(mv[j : j + group], key=key).digest() for j in range(0, len(mv), group)])


# -- the native backend ---------------------------------------------------------------------------


def _address(data: Buffer) -> tuple[UInt8Array, int]:
    """A uint8 view of ``data`` (kept alive by the caller for the call) and its address."""
    arr = np.frombuffer(data, dtype=np.uint8)
    return arr, int(arr.ctypes.data)


def _check_out(out: UInt8Array, n: int) -> None:
    """The C code writes ``n`` digests at ``out``'s address: it must be exactly that buffer."""
    if out.dtype != np.uint8 or out.shape != (n, DIGEST_SIZE) or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writable contiguous ({n}, {DIGEST_SIZE}) uint8 array")


@dataclass(frozen=True)
class _Native:
    lib: ctypes.CDLL
    simd_degree: int

    def hash_leaves_into(self, data: Buffer, out: UInt8Array) -> None:
        arr, addr = _address(data)
        n = -(-len(arr) // LEAF_SIZE)
        _check_out(out, n)
        if n:
            self.lib.rm_hash_leaves(addr, len(arr), int(out.ctypes.data))

    def hash_nodes_into(self, children: Buffer, group: int, key: bytes, out: UInt8Array) -> None:
        arr, addr = _address(children)
        n = -(-len(arr) // group)
        if len(key) != DIGEST_SIZE:
            raise ValueError("key must be 32 bytes")
        _check_out(out, n)
        if n:
            self.lib.rm_hash_nodes(addr, len(arr), group, key, int(out.ctypes.data))


def shim_digest(source: bytes | None = None) -> str:
    """The identity of ``_leafhash.c`` a library must have been built from."""
    return hashlib.sha256(C_SOURCE.read_bytes() if source is None else source).hexdigest()[:16]


def _self_test(native: _Native) -> str | None:
    """Compare the library with the python backend on inputs that cover every path of the C code
    (batches, a partial batch, a short last leaf; node groups of one chunk or more, short last)."""
    data = np.random.default_rng(20261127).integers(0, 256, 70 * LEAF_SIZE + 777, dtype=np.uint8).tobytes()
    out = np.empty((71, DIGEST_SIZE), dtype=np.uint8)
    native.hash_leaves_into(data, out)
    if out.tobytes() != hash_leaves_python(data):
        return "its leaf digests differ from blake3's"
    key = bytes(range(DIGEST_SIZE))
    for group in (512, 2048):
        piece = data[: 37 * group + 96]
        nodes = np.empty((-(-len(piece) // group), DIGEST_SIZE), dtype=np.uint8)
        native.hash_nodes_into(piece, group, key, nodes)
        if nodes.tobytes() != hash_nodes_python(piece, group, key):
            return "its node digests differ from keyed blake3's"
    return None


def _open(path: Path) -> _Native | str:
    """The library at ``path``, checked, or why it cannot be used."""
    if not path.exists():
        return f"{path.name} is not built (run `python -m differ.leafhash --build`)"
    try:
        lib = ctypes.CDLL(str(path))
        lib.rm_abi.restype = ctypes.c_int
        lib.rm_abi.argtypes = []
        if lib.rm_abi() != ABI:
            return f"{path.name} has another ABI than {ABI} (rebuild it)"
        lib.rm_shim_digest.restype = ctypes.c_char_p
        lib.rm_shim_digest.argtypes = []
        lib.rm_source_digest.restype = ctypes.c_char_p
        lib.rm_source_digest.argtypes = []
        lib.rm_simd_degree.restype = ctypes.c_size_t
        lib.rm_simd_degree.argtypes = []
        lib.rm_hash_leaves.restype = None
        lib.rm_hash_leaves.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        lib.rm_hash_nodes.restype = None
        lib.rm_hash_nodes.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_char_p,
                                      ctypes.c_void_p]
    except (OSError, AttributeError) as e:
        return f"{path.name} cannot be loaded: {e}"
    if C_SOURCE.exists() and lib.rm_shim_digest().decode() != shim_digest():
        return f"{path.name} was built from another {C_SOURCE.name} (rebuild it)"
    native = _Native(lib, int(lib.rm_simd_degree()))
    bad = _self_test(native)
    return f"{path.name} fails its self-test: {bad}" if bad else native


@functools.lru_cache(maxsize=1)
def _backend() -> _Native | str:
    if os.environ.get(DISABLE_ENV) == "0":
        return f"${DISABLE_ENV}=0"
    got = _open(LIBRARY)
    if isinstance(got, str):
        log.warning("hashing leaves in Python, ~3x slower than native: %s", got)
    else:
        log.debug("native leaf hashing, blake3 SIMD degree %d", got.simd_degree)
    return got


def native_reason() -> str | None:
    """None when the native backend is in use, else why not."""
    got = _backend()
    return got if isinstance(got, str) else None


def backend() -> str:
    """``"native"`` or ``"python"``: what :func:`hash_leaves_into` and :func:`hash_nodes` use."""
    return "python" if isinstance(_backend(), str) else "native"


def hash_leaves_into(data: Buffer, out: UInt8Array, *, native: bool | None = None) -> None:
    """Write the digests of ``data``'s consecutive 4 KiB leaves (the last may be short) into ``out``,
    a writable contiguous ``(leaves, 32) uint8`` array. ``native``: None = the best backend there
    is, False = the python one, True = the native one or :class:`RuntimeError` (benchmarks)."""
    got = _backend() if native is not False else "not asked for"
    if isinstance(got, _Native):
        got.hash_leaves_into(data, out)
    elif native:
        raise RuntimeError(f"no native leaf hashing: {got}")
    else:
        n = -(-len(memoryview(data).cast("B")) // LEAF_SIZE)
        if out.shape != (n, DIGEST_SIZE) or out.dtype != np.uint8:
            raise ValueError(f"out must be a ({n}, {DIGEST_SIZE}) uint8 array")
        out[:] = np.frombuffer(hash_leaves_python(data), dtype=np.uint8).reshape(n, DIGEST_SIZE)


def hash_leaves(data: Buffer, *, native: bool | None = None) -> bytes:
    """Concatenated digests of ``data``'s consecutive 4 KiB leaves (see :func:`hash_leaves_into`)."""
    out = np.empty((-(-len(memoryview(data).cast("B")) // LEAF_SIZE), DIGEST_SIZE), dtype=np.uint8)
    hash_leaves_into(data, out, native=native)
    return out.tobytes()


def hash_nodes(level: UInt8Array, fanout: int, key: bytes, *, native: bool | None = None) -> UInt8Array:
    """The level above ``level`` (an ``(n, 32) uint8`` array): keyed blake3 of each ``fanout``
    consecutive digests (the last group may be short)."""
    children = np.ascontiguousarray(level)
    group = fanout * DIGEST_SIZE
    out = np.empty((-(-len(children) // fanout), DIGEST_SIZE), dtype=np.uint8)
    got = _backend() if native is not False else "not asked for"
    if isinstance(got, _Native):
        got.hash_nodes_into(children.data.cast("B"), group, key, out)
    elif native:
        raise RuntimeError(f"no native node hashing: {got}")
    else:
        out[:] = np.frombuffer(hash_nodes_python(children.data.cast("B"), group, key), dtype=np.uint8).reshape(
            -1, DIGEST_SIZE
        )
    return out


# -- building the library -------------------------------------------------------------------------


def blake3_c_dir() -> Path | None:
    """The folder of blake3's C sources: ``$REPLAY_MIGRATE_BLAKE3_C``, else the newest version
    Debian's ``librust-blake3-dev`` installed; None if there is none."""
    if env := os.environ.get(BLAKE3_C_ENV):
        return Path(env)

    def version(p: Path) -> tuple[int, ...]:
        m = re.search(r"blake3-(\d+)\.(\d+)\.(\d+)", str(p))
        return tuple(int(x) for x in m.groups()) if m else (0,)

    found = sorted((p for p in Path("/").glob(BLAKE3_C_DIRS.lstrip("/")) if (p / "blake3_impl.h").exists()),
                   key=version)
    return found[-1] if found else None


def _sources_and_flags(c_dir: Path) -> tuple[list[Path], list[str]]:
    machine = platform.machine().lower()
    sources = [c_dir / name for name in _COMMON_SOURCES]
    if machine in ("x86_64", "amd64") and sys.platform.startswith("linux"):
        return sources + [c_dir / name for name in _X86_64_SOURCES], []
    if machine in ("aarch64", "arm64"):
        return [*sources, c_dir / "blake3_neon.c"], ["-DBLAKE3_USE_NEON=1"]
    return sources, list(_NO_SIMD)


def build_digest(c_dir: Path, cc: str = DEFAULT_CC) -> str:
    """The identity of a build: this shim, blake3's sources, the flags and the compiler's name; a
    library with the same one need not be rebuilt."""
    sources, flags = _sources_and_flags(c_dir)
    h = hashlib.sha256(f"abi {ABI} cc {cc} {' '.join(CFLAGS)} {' '.join(flags)}\n".encode())
    for path in [C_SOURCE, c_dir / "blake3.h", c_dir / "blake3_impl.h", *sources]:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def build_library(
    out: Path | None = None, *, c_dir: Path | None = None, cc: str = DEFAULT_CC, force: bool = False,
    timeout: float = BUILD_TIMEOUT_S,
) -> bool:
    """Compile the native library to ``out`` (default :data:`LIBRARY`; atomically: a temporary
    file renamed over it).

    Returns False when ``out`` was already built from the same inputs (nothing done), True when it
    was (re)built; raises :class:`BuildError` saying why it cannot be built (a missing compiler
    included)."""
    out = LIBRARY if out is None else out
    c_dir = blake3_c_dir() if c_dir is None else c_dir
    if c_dir is None:
        raise BuildError("blake3's C sources are not installed (Debian: apt-get install librust-blake3-dev)")
    sources, flags = _sources_and_flags(c_dir)
    missing = [p.name for p in [*sources, c_dir / "blake3_impl.h"] if not p.exists()]
    if missing:
        raise BuildError(f"{c_dir} lacks {', '.join(missing)}")
    digest = build_digest(c_dir, cc)
    try:
        if not force and BUILD_TAG + digest.encode() in out.read_bytes():
            return False
    except OSError:
        pass  # none yet: build it
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    argv = [cc, *CFLAGS, *flags, f"-I{c_dir}", f'-DRM_SOURCE_DIGEST="{digest}"',
            f'-DRM_SHIM_DIGEST="{shim_digest()}"', "-o", tmp, str(C_SOURCE), *map(str, sources)]
    try:
        run_tool(argv, what=f"compiling {out.name}", error=BuildError, timeout=timeout)
        # checked under its own name before it replaces anything: dlopen would hand back a
        # library this process loaded before from ``out``
        got = _open(Path(tmp))
        if isinstance(got, str):
            raise BuildError(f"the built library is not usable: {got}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    except HostError as e:  # BuildError, or the compiler is not installed
        raise BuildError(str(e)) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """``--build``: build the native library if its inputs changed (exit 0 even when it cannot be
    built: hashing then falls back to Python, and the reason is printed; ``--strict`` makes that
    exit 1). ``--check``: say which backend hashing uses and why."""
    ap = argparse.ArgumentParser(prog="python -m differ.leafhash", description=__doc__.split("\n")[0])
    ap.add_argument("--build", action="store_true", help="build the native library (idempotent)")
    ap.add_argument("--force", action="store_true", help="rebuild even if it is up to date")
    ap.add_argument("--strict", action="store_true", help="exit 1 when it cannot be built")
    ap.add_argument("--check", action="store_true", help="print the backend in use and why")
    args = ap.parse_args(argv)
    status = 0
    if args.build:
        try:
            built = build_library(force=args.force)
            print(f"leafhash: {LIBRARY.name} {'built' if built else 'up to date'}", file=sys.stderr)
        except BuildError as e:
            print(f"leafhash: not built, leaves are hashed in Python: {e}", file=sys.stderr)
            status = 1 if args.strict else 0
    if args.check or not args.build:
        _backend.cache_clear()
        reason = native_reason()
        print(f"leafhash: {backend()}" + (f" ({reason})" if reason else ""))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
