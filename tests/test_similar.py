"""differ.similar: sketches find the pool leaf most like a given one; a saved index is checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from diffpair import PAGE, rand

from differ.memsource import MemorySource
from differ.similar import INDEX_SLACK_BYTES, SUPER_FEATURES, SimilarityIndex, index_of, sketch
from replay_migrate.errors import ImageError

N = 64


def pool() -> bytes:
    return rand(N * PAGE, seed=5)


def index() -> SimilarityIndex:
    src = MemorySource(pool())
    return index_of(src.leaf_count, np.arange(N, dtype=np.int64), src.read, chunk=7)


def rows(*pages: bytes) -> np.ndarray:
    return np.frombuffer(b"".join(pages), dtype=np.uint8).reshape(len(pages), PAGE)


def edited(page: bytes, at: int, n: int) -> bytes:
    out = bytearray(page)
    out[at : at + n] = bytes(n)
    return bytes(out)


def test_a_page_changed_in_a_few_places_finds_its_original_and_an_unrelated_one_finds_nothing() -> None:
    data = pool()
    idx = index()
    like_17 = edited(data[17 * PAGE : 18 * PAGE], 1000, 64)
    like_40 = edited(edited(data[40 * PAGE : 41 * PAGE], 8, 16), 3000, 200)
    found = idx.candidates(sketch(rows(like_17, like_40, rand(PAGE, 99))))
    assert found[0][0] == 17 and found[1][0] == 40 and found[2] == []


def test_content_shifted_within_the_page_is_not_a_candidate() -> None:
    """An XOR at the same offsets cannot use content that moved: the sketch keeps offsets."""
    data = pool()
    page = data[9 * PAGE : 10 * PAGE]
    assert index().candidates(sketch(rows(page[64:] + page[:64]))) == [[]]


def test_sketches_are_the_same_however_the_rows_are_chunked() -> None:
    data = rows(*(pool()[i * PAGE : (i + 1) * PAGE] for i in range(N)))
    assert (sketch(data) == np.concatenate([sketch(data[:5]), sketch(data[5:])])).all()
    with pytest.raises(ValueError, match="uint8 rows"):
        sketch(data.reshape(-1, PAGE // 2))


def test_an_index_survives_saving_and_loading(tmp_path: Path) -> None:
    idx = index()
    idx.save(tmp_path / "s.npz")
    again = SimilarityIndex.load(tmp_path / "s.npz", expect_leaves=N)
    assert (again.keys == idx.keys).all() and (again.leaves == idx.leaves).all() and again.leaf_count == N


def test_a_saved_index_of_another_image_or_a_damaged_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    index().save(path)
    with pytest.raises(ImageError, match="another format or image"):
        SimilarityIndex.load(path, expect_leaves=N + 1)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ImageError, match="unreadable"):
        SimilarityIndex.load(path, expect_leaves=N)
    path.write_bytes(b"\0" * (SUPER_FEATURES * 16 * N + INDEX_SLACK_BYTES + 1))
    with pytest.raises(ImageError, match="larger than an index"):
        SimilarityIndex.load(path, expect_leaves=N)


@pytest.mark.parametrize(("keys", "leaves", "count", "error"), [
    ([[2, 1]] * SUPER_FEATURES, [[0, 1]] * SUPER_FEATURES, 2, "not sorted"),
    ([[1, 2]] * SUPER_FEATURES, [[0, 2]] * SUPER_FEATURES, 2, "outside its image"),
    ([[1, 2]] * SUPER_FEATURES, [[0, -1]] * SUPER_FEATURES, 2, "outside its image"),
    ([[1, 2]], [[0, 1]], 2, "malformed"),
])
def test_a_malformed_index_is_refused(keys: list[list[int]], leaves: list[list[int]], count: int,
                                      error: str) -> None:
    with pytest.raises(ValueError, match=error):
        SimilarityIndex(np.array(keys, dtype=np.uint64), np.array(leaves, dtype=np.int64), count)


def test_an_empty_pool_names_no_candidates() -> None:
    idx = SimilarityIndex.build(0, [])
    assert idx.candidates(sketch(rows(rand(PAGE, 1)))) == [[]]
