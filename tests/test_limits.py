"""The service's bounds (server/limits.py): checked at start, and their worst case adds up every
queue and fits the memory budget."""

from __future__ import annotations

import pytest

from server.limits import Limits, MiB

pytestmark = pytest.mark.timeout(30)


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_buffered_bytes"):
        Limits(max_message_size=4096, max_buffered_bytes=1024)


def test_the_worst_case_memory_counts_every_queue_and_fits_the_budget() -> None:
    d = Limits()
    per_connection = (d.max_queue + 1) * d.max_message_size + 256 * 1024 \
        + d.max_outgoing_bytes + d.max_message_size + d.write_limit
    assert d.connection_memory == per_connection
    reports = d.max_sessions * 2 * 8192                          # each session keeps both sides' report
    assert d.worst_case_memory == (d.max_sessions * 3 * d.max_buffered_bytes + d.max_connections * per_connection
                                   + 2 * d.max_message_size + d.max_tombstones * 512 + reports)
    assert d.worst_case_memory <= d.memory_budget == 512 * MiB
    assert d.worst_case_memory // MiB == 444                     # what the README states
    with pytest.raises(ValueError, match="memory_budget"):
        Limits(max_connections=64)
    with pytest.raises(ValueError, match="max_connections_per_address"):
        Limits(max_connections=4, max_connections_per_address=5)
    with pytest.raises(ValueError, match="max_queue"):
        Limits(max_queue=0)
    assert Limits(max_connections=64, memory_budget=2048 * MiB).max_connections == 64
