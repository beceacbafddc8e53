"""bench/downtime_cpu.py: the per-phase clock of an in-process diff and its table (the run on kept
states needs a bench checkpoint: ``python bench/downtime_cpu.py --kept DIR``)."""

from __future__ import annotations

import hashlib

from diffpair import PAGE, one, rand

from bench.downtime_cpu import Clock, _instrument, table


def test_instrumented_transfer_splits_walk_blocks_patch_verify_and_digests_the_wire() -> None:
    b = rand(64 * PAGE)
    a = bytearray(b)
    a[5 * PAGE : 5 * PAGE + 9] = b"different"
    a[40 * PAGE : 42 * PAGE] = rand(2 * PAGE, seed=9)
    digests = []
    for _ in range(2):
        pair = one(bytes(a), b, verify_written=True)
        clock, wire = Clock(), hashlib.sha256()
        _instrument("source", pair.source, clock, wire)
        _instrument("target", pair.target, clock, wire)
        pair.run()
        assert pair.data() == bytes(a)
        assert clock.stage == "blocks"                      # the target's want switched it
        phases = {phase for (_, phase) in clock.s}
        assert {"walk", "blocks", "patch", "verify"} <= phases
        assert all(v >= 0 for v in clock.s.values())
        digests.append(wire.hexdigest())
    assert digests[0] == digests[1]                          # the key is fixed: the same bytes


def test_table_gives_medians_per_side_and_the_sum_from_walk_to_verify() -> None:
    runs = [{("source", "walk"): 0.01, ("target", "walk"): 0.2, ("target", "verify"): 0.05, ("target", "hash"): 9.0},
            {("source", "walk"): 0.03, ("target", "walk"): 0.1, ("target", "verify"): 0.07, ("target", "hash"): 9.0},
            {("source", "walk"): 0.02, ("target", "walk"): 0.3, ("target", "verify"): 0.06, ("target", "hash"): 9.0}]
    lines = table(runs).splitlines()
    assert "| walk | 0.020 | 0.200 |" in lines and "| verify | 0.000 | 0.060 |" in lines
    assert "| hash | 0.000 | 9.000 |" in lines
    assert lines[-1] == "| walk to verify | 0.020 | 0.250 |"     # median of the sums; open and hash left out
