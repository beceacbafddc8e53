"""differ.protocol.events: every request is answered by one result type, built from the request."""

from __future__ import annotations

import typing

from differ.protocol import (
    Abort,
    Commit,
    Done,
    Hashed,
    HashImage,
    Holding,
    LeafWrite,
    LeavesRead,
    Of,
    ReadLeaves,
    Request,
    SetSize,
    WriteLeaves,
)
from differ.protocol.events import RESULT_OF


def test_every_request_has_its_result() -> None:
    assert set(RESULT_OF) == set(typing.get_args(Request))
    read = ReadLeaves(Holding(Of.BASE, "disk"), (1, 2), id=7)
    assert read.answer([b"a", b"b"]) == LeavesRead(7, (b"a", b"b"))
    assert HashImage("disk", 16, id=8).answer(b"r" * 32) == Hashed(8, b"r" * 32)
    for req in (SetSize("disk", 1, id=9), WriteLeaves((LeafWrite("disk", 0, None),), id=9), Commit(("disk",), id=9),
                Abort(("disk",), id=9)):
        assert req.done() == Done(9) and isinstance(req.done(), RESULT_OF[type(req)])
