"""differ.protocol.params: every limit has a default and a hard range; the size rule."""

from __future__ import annotations

import pytest

from differ.protocol import ProtocolParams
from differ.source import LEAF_SIZE


def test_params_validation() -> None:
    for bad in (
        {"digest_bytes": 3},
        {"sub_block_size": 100},
        {"fingerprint_bytes": 1},
        {"max_message_bytes": 1000},
        {"window": 0},
        {"max_leaves": 0},
        {"check_bytes": 28},
        {"ref_check_bytes": 29},
        {"max_pending_bytes": 1000},
        {"max_logical_bytes": 1000},
    ):
        with pytest.raises(ValueError):
            ProtocolParams(**bad)  # type: ignore[arg-type]
    ProtocolParams(digest_bytes=32, check_bytes=0)


def test_the_size_limit() -> None:
    p = ProtocolParams(max_size_factor=3, max_size_margin=5 * LEAF_SIZE, max_leaves=100)
    assert p.size_limit(10 * LEAF_SIZE) == 35 * LEAF_SIZE
    assert p.size_limit(0) == 5 * LEAF_SIZE
    assert p.size_limit(50 * LEAF_SIZE) == 100 * LEAF_SIZE  # never above max_leaves
