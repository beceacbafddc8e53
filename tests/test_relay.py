"""One relayed stream (server/relay.py): sequence, duplicates and gaps, the window counted with
FRAME_COST per frame, cumulative acks, rewinds on re-attach and the claims of a restored session."""

from __future__ import annotations

import pytest
from sessionkit import (
    assert_failed,
    pair,
)

from server.limits import Limits
from server.wire import (
    FRAME_COST,
    Reason,
    State,
    Stream,
)

pytestmark = pytest.mark.timeout(30)


def test_empty_frames_count_against_the_window() -> None:
    limits = Limits(max_message_size=1024, max_buffered_bytes=1024 + FRAME_COST)
    _, s, src, tgt = pair(limits)
    for seq in range(1, 18):
        src.send("log", seq=seq, data=b"")
    assert s.buffered(Stream.LOG) == 17 * FRAME_COST and s.state is State.RECORDING
    src.send("log", seq=18, data=b"")
    assert_failed(s, src, tgt, Reason.BUFFER_FULL)
