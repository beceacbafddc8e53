"""differ.leafhash: the native and the python backends give blake3's digests, byte for byte, and
trees built through either are identical; the native library's build is idempotent and a library
that is missing, stale or from another ABI is refused with a reason."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import blake3
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from differ import leafhash
from differ.blocks import RawImageSource
from differ.memsource import MemorySource
from differ.merkle import NODE_KEY, MerkleTree
from differ.source import LEAF_SIZE


def rand(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


def reference_leaves(data: bytes) -> bytes:
    return b"".join(blake3.blake3(data[i : i + LEAF_SIZE]).digest() for i in range(0, len(data), LEAF_SIZE))


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> leafhash._Native:
    """The installed library, or one built here from the same sources when it is not installed:
    the equality tests run whenever this host can build it at all (setup-host.sh builds it)."""
    got = leafhash._open(leafhash.LIBRARY)
    if isinstance(got, leafhash._Native):
        return got
    out = tmp_path_factory.mktemp("leafhash") / "_leafhash.so"
    try:
        leafhash.build_library(out)
    except leafhash.BuildError as e:
        pytest.skip(f"the native library cannot be built on this host: {e}")
    built = leafhash._open(out)
    assert isinstance(built, leafhash._Native), built
    return built


@pytest.fixture(params=["native", "python"])
def backend(request: pytest.FixtureRequest, native: leafhash._Native,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run a test with the module's backend set to each of the two."""
    chosen: leafhash._Native | str = native if request.param == "native" else "forced by the test"
    monkeypatch.setattr(leafhash, "_backend", lambda: chosen)
    yield request.param


SIZES = [0, 1, 100, 4095, 4096, 4097, 2 * 4096, 63 * 4096 + 1, 64 * 4096, 65 * 4096 + 4095, 200 * 4096 + 7]


@pytest.mark.parametrize("size", SIZES)
def test_native_leaves_are_blake3(native: leafhash._Native, size: int) -> None:
    """Every path of the C code: whole batches of 64 leaves, a partial batch, a short last leaf."""
    data = rand(size, seed=size)
    out = np.empty((-(-size // LEAF_SIZE), 32), dtype=np.uint8)
    native.hash_leaves_into(data, out)
    assert out.tobytes() == reference_leaves(data) == leafhash.hash_leaves_python(data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=5 * LEAF_SIZE), st.integers(0, 3))
def test_native_leaves_on_any_bytes(native: leafhash._Native, data: bytes, pad_pages: int) -> None:
    data = data + bytes(pad_pages * LEAF_SIZE)  # zero pages among data
    out = np.empty((-(-len(data) // LEAF_SIZE), 32), dtype=np.uint8)
    native.hash_leaves_into(memoryview(data), out)
    assert out.tobytes() == reference_leaves(data)


@pytest.mark.parametrize("fanout", [2, 3, 16, 17, 32, 33, 64, 256])
@pytest.mark.parametrize("nodes", [1, 5, 64, 65, 1000])
def test_native_nodes_are_keyed_blake3(native: leafhash._Native, fanout: int, nodes: int) -> None:
    """Groups of one chunk or less (side by side) and longer ones (one by one), a short last group."""
    level = np.frombuffer(rand(nodes * 32, seed=nodes + fanout), dtype=np.uint8).reshape(nodes, 32)
    group = fanout * 32
    want = b"".join(blake3.blake3(level.tobytes()[j : j + group], key=NODE_KEY).digest()
                    for j in range(0, nodes * 32, group))
    out = np.empty((-(-nodes // fanout), 32), dtype=np.uint8)
    native.hash_nodes_into(level.tobytes(), group, NODE_KEY, out)
    assert out.tobytes() == want == leafhash.hash_nodes_python(level.tobytes(), group, NODE_KEY)


def test_native_refuses_a_wrong_output_array(native: leafhash._Native) -> None:
    with pytest.raises(ValueError):
        native.hash_leaves_into(rand(3 * LEAF_SIZE), np.empty((2, 32), dtype=np.uint8))
    with pytest.raises(ValueError):
        native.hash_leaves_into(rand(3 * LEAF_SIZE), np.empty((3, 32), dtype=np.uint8)[::-1])
    with pytest.raises(ValueError):
        native.hash_nodes_into(rand(64), 64, b"short key", np.empty((1, 32), dtype=np.uint8))


def _image(seed: int, size: int) -> bytes:
    """Random pages, zero pages and short zero runs, of a size that is rarely a multiple of 4 KiB."""
    rng = np.random.default_rng(seed)
    data = bytearray(rng.integers(0, 256, size=size, dtype=np.uint8).tobytes())
    n = -(-size // LEAF_SIZE)
    for i in rng.choice(n, size=n // 3, replace=False).tolist():
        data[i * LEAF_SIZE : (i + 1) * LEAF_SIZE] = bytes(len(data[i * LEAF_SIZE : (i + 1) * LEAF_SIZE]))
    return bytes(data)


@pytest.mark.parametrize("seed", range(6))
def test_trees_identical_through_both_backends(backend: str, seed: int) -> None:
    """The fast path builds byte-identical trees: zero pages reported (skipped) or not, known
    leaves, any read size, with hashing threads or without."""
    rng = np.random.default_rng(seed)
    size = int(rng.integers(1, 700)) * LEAF_SIZE + int(rng.integers(0, LEAF_SIZE))
    data = _image(seed, size)
    n = -(-size // LEAF_SIZE)
    known = {int(i): blake3.blake3(data[i * LEAF_SIZE : (i + 1) * LEAF_SIZE]).digest()
             for i in rng.choice(n, size=min(n, 9), replace=False).tolist()}
    reference = np.frombuffer(reference_leaves(data), dtype=np.uint8).reshape(n, 32)
    want = MerkleTree(reference.copy(), size, 16)
    for report_zeros in (True, False):
        for workers, read_leaves in ((0, 256), (1, 3), (2, 64), (3, 1000)):
            src = MemorySource(data, report_zeros=report_zeros, known=known)
            tree = MerkleTree.build(src, 16, workers=workers, read_leaves=read_leaves)
            assert tree.root == want.root
            assert all(np.array_equal(a, b) for a, b in zip(tree.levels, want.levels, strict=True))
    for fanout in (2, 5, 64):
        assert MerkleTree.from_bytes(data, fanout).root == MerkleTree(reference.copy(), size, fanout).root


def test_sparse_file_identical_through_both_backends(backend: str, tmp_path: Path) -> None:
    """A raw file with holes (skipped without reading), data and zero pages inside data extents."""
    path = tmp_path / "sparse.raw"
    size = 300 * LEAF_SIZE + 123
    with open(path, "wb") as f:
        f.truncate(size)
        for page in (0, 1, 2, 100, 101, 250, 299):
            f.seek(page * LEAF_SIZE)
            f.write(rand(LEAF_SIZE, seed=page) if page != 101 else bytes(LEAF_SIZE))
        f.seek(size - 50)
        f.write(rand(50))
    data = path.read_bytes()
    with RawImageSource(path) as src:
        for workers in (0, 2):
            assert MerkleTree.build(src, 16, workers=workers).root == MerkleTree.from_bytes(data, 16).root
    n = -(-size // LEAF_SIZE)
    assert MerkleTree.from_bytes(data).leaves.tobytes() == reference_leaves(data)
    assert n == MerkleTree.from_bytes(data).leaf_count


def test_native_true_without_a_library_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leafhash, "_backend", lambda: "not built")
    with pytest.raises(RuntimeError, match="not built"):
        leafhash.hash_leaves(b"x", native=True)
    with pytest.raises(RuntimeError, match="not built"):
        leafhash.hash_nodes(np.zeros((4, 32), dtype=np.uint8), 2, NODE_KEY, native=True)
    assert leafhash.hash_leaves(b"x") == blake3.blake3(b"x").digest()
    assert leafhash.backend() == "python" and leafhash.native_reason() == "not built"


def test_disabled_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(leafhash.DISABLE_ENV, "0")
    leafhash._backend.cache_clear()
    try:
        assert leafhash.backend() == "python"
        assert leafhash.DISABLE_ENV in (leafhash.native_reason() or "")
    finally:
        monkeypatch.delenv(leafhash.DISABLE_ENV)
        leafhash._backend.cache_clear()


def test_native_is_used_where_it_can_be_built() -> None:
    """setup-host.sh builds the library wherever blake3's C sources and gcc are installed; a host
    that has them but hashes in Python lost its build step (it is not a silent fallback)."""
    leafhash._backend.cache_clear()
    if leafhash.blake3_c_dir() is None or shutil.which(leafhash.DEFAULT_CC) is None:
        pytest.skip("no blake3 C sources or no gcc on this host: the python backend is expected")
    if os.environ.get(leafhash.DISABLE_ENV) == "0":
        pytest.skip(f"${leafhash.DISABLE_ENV}=0 in the environment")
    assert leafhash.backend() == "native", leafhash.native_reason()


# -- the build ------------------------------------------------------------------------------------


def test_build_is_idempotent_and_refuses_stale_libraries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         native: leafhash._Native) -> None:
    """Built once per set of inputs; a library built from another ``_leafhash.c`` is refused at
    load, and the edit makes the next build rebuild it."""
    c_dir = leafhash.blake3_c_dir()
    if c_dir is None:
        pytest.skip("no blake3 C sources on this host")
    shim = tmp_path / "_leafhash.c"
    shim.write_bytes(leafhash.C_SOURCE.read_bytes())
    monkeypatch.setattr(leafhash, "C_SOURCE", shim)
    out = tmp_path / "_leafhash.so"
    assert leafhash.build_library(out, c_dir=c_dir) is True
    mtime = out.stat().st_mtime_ns
    assert leafhash.build_library(out, c_dir=c_dir) is False  # same inputs: nothing done
    assert out.stat().st_mtime_ns == mtime
    shim.write_bytes(shim.read_bytes() + b"\n/* edited after the build */\n")
    # each check loads a copy: a process cannot dlopen a rebuilt file again under one name
    shutil.copy(out, tmp_path / "stale.so")
    reason = leafhash._open(tmp_path / "stale.so")
    assert isinstance(reason, str) and "another _leafhash.c" in reason
    assert leafhash.build_library(out, c_dir=c_dir) is True
    shutil.copy(out, tmp_path / "fresh.so")
    assert isinstance(leafhash._open(tmp_path / "fresh.so"), leafhash._Native)
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary files were renamed or removed


def test_build_failures_say_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c_dir = leafhash.blake3_c_dir()
    with monkeypatch.context() as m:
        m.setattr(leafhash, "blake3_c_dir", lambda: None)
        with pytest.raises(leafhash.BuildError, match="librust-blake3-dev"):
            leafhash.build_library(tmp_path / "x.so")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(leafhash.BuildError, match="lacks"):
        leafhash.build_library(tmp_path / "x.so", c_dir=empty)
    if c_dir is not None:
        with pytest.raises(leafhash.BuildError, match="no-such-cc"):
            leafhash.build_library(tmp_path / "x.so", c_dir=c_dir, cc=str(tmp_path / "no-such-cc"))
        with pytest.raises(leafhash.BuildError, match="compiling"):
            leafhash.build_library(tmp_path / "x.so", c_dir=c_dir, cc="false")
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob(".*"))


def test_missing_library_is_a_reason(tmp_path: Path) -> None:
    reason = leafhash._open(tmp_path / "_leafhash.so")
    assert isinstance(reason, str) and "--build" in reason
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not an ELF file")
    assert "cannot be loaded" in str(leafhash._open(junk))


def test_main_check_and_build(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                              tmp_path: Path) -> None:
    assert leafhash.main(["--check"]) == 0
    assert capsys.readouterr().out.startswith("leafhash: ")
    monkeypatch.setenv(leafhash.BLAKE3_C_ENV, str(tmp_path / "nowhere"))
    monkeypatch.setattr(leafhash, "LIBRARY", tmp_path / "_leafhash.so")
    assert leafhash.main(["--build"]) == 0  # cannot build: says why, hashing falls back
    assert "not built" in capsys.readouterr().err
    assert leafhash.main(["--build", "--strict"]) == 1
    leafhash._backend.cache_clear()
