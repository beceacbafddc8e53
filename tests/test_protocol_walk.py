"""differ.protocol.walk: the ping-pong walk, one level per message, base-relative where both sides
hold the checkpoint's trees."""

from __future__ import annotations

import numpy as np
import pytest
from diffpair import PAGE, one, rand, replayed

from differ.merkle import MerkleTree
from differ.protocol import ProtocolParams, TransferStats
from differ.protocol.walk import Walk, children, first_level, walk_bytes
from replay_migrate.errors import ProtocolError


def test_ping_pong_walk_round_trips() -> None:
    """One changed leaf at depth 5 (fan-out 4, 1024 leaves): hello, 2 walks, want = 4 round trips
    (a walk answering with bitmaps only would need 7)."""
    b = rand(1024 * PAGE)
    a = bytearray(b)
    a[500 * PAGE] ^= 1
    stats = one(bytes(a), b).run()
    assert stats.round_trips == 4 and stats.images["disk"].divergent == 1
    assert stats.walk_digest_bytes == 5 * 4 * ProtocolParams().digest_bytes  # four children per level


def test_base_relative_walk_costs_bits_where_both_kept_the_base() -> None:
    base = rand(1024 * PAGE, seed=7)
    a, b = replayed(base, same=(1, 100, 500), differ=(3, 300, 900), target_only=(40, 640), source_only=(70,))
    plain = one(a, b, fanout=16)
    plain_stats = plain.run()
    pair = one(a, b, fanout=16, bases={"disk": base})
    stats = pair.run()
    assert pair.data() == a and pair.sinks["disk"].committed and plain.data() == a
    img = stats.images["disk"]
    assert img.divergent == plain_stats.images["disk"].divergent == 6
    assert img.base == 2   # the target's own changes are undone from its copy of the base: no bytes
    assert stats.walk_digest_bytes < plain_stats.walk_digest_bytes / 4
    assert stats.wire_total < plain_stats.wire_total


def test_a_base_the_sides_do_not_share_is_not_used() -> None:
    base = rand(32 * PAGE, seed=9)
    a, b = replayed(base, same=(), differ=(2,), target_only=(5,))
    other = rand(32 * PAGE, seed=10)
    pair = one(a, b, bases={"disk": base}, target_bases={"disk": (other, MerkleTree.from_bytes(other))})
    stats = pair.run()
    assert pair.data() == a and stats.images["disk"].base == 0 and stats.images["disk"].divergent == 2


def test_two_walks_find_the_differing_leaves() -> None:
    """The walk alone, both sides' Walk objects passing parts: the leaves found are the ones that
    differ, one level per part, parities alternating."""
    b = rand(300 * PAGE)
    a = bytearray(b)
    for i in (0, 77, 299):
        a[i * PAGE] ^= 1
    ta, tb = MerkleTree.from_bytes(bytes(a), 4), MerkleTree.from_bytes(b, 4)
    src, tgt = Walk(ta, 8), Walk(tb, 8)
    stats = TransferStats()
    part = src.start(stats)
    assert part["l"] == first_level(ta.depth) and part["l"] % 2 == 0
    level = part["l"]
    nodes = np.arange(tgt.sizes[level], dtype=np.int64)
    for walker, other in ((tgt, src), (src, tgt)) * 10:
        diff, _, _ = walker.compare(level, nodes, part, "walk")
        if level == 0:
            assert walker is tgt and nodes[diff].tolist() == [0, 77, 299]
            break
        reply = walker.reply(level, nodes, diff, stats)
        assert reply is not None
        level -= 1
        nodes = other.nodes_for(reply, level, "walk")
        part = reply
    else:
        raise AssertionError("the walk did not reach the leaves")
    with pytest.raises(ProtocolError, match="expected"):
        src.nodes_for(part, 3, "walk")


def test_walk_helpers() -> None:
    assert children(np.array([0, 2], dtype=np.int64), 4, 10).tolist() == [0, 1, 2, 3, 8, 9]
    assert (first_level(5), first_level(4), first_level(0)) == (4, 4, 0)
    assert walk_bytes(1000, 8, 2) == 3 * 1024 + 9000
