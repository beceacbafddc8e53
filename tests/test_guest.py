"""vm.guest: every guest-agent reply is hostile until checked (sizes before decoding, types)."""

from __future__ import annotations

import base64

import pytest

from replay_migrate.errors import VMError
from vm import guest


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_exec_output_is_bounded_before_it_is_decoded() -> None:
    ok = guest.exec_status({"exited": True, "exitcode": 3, "out-data": b64(b"x" * 10), "err-data": b64(b"e")}, 10)
    assert ok == guest.ExecResult(3, "x" * 10, "e")
    assert guest.exec_status({"exited": False}) is None
    with pytest.raises(VMError, match="more than 10 bytes"):
        guest.exec_status({"exited": True, "exitcode": 0, "out-data": b64(b"x" * 11)}, 10)
    with pytest.raises(VMError, match="more than 10 bytes"):   # refused by its length, not decoded
        guest.exec_status({"exited": True, "exitcode": 0, "out-data": "A" * 1000}, 10)
    with pytest.raises(VMError, match="cut the command's stdout"):
        guest.exec_status({"exited": True, "exitcode": 0, "out-truncated": True})
    assert guest.exec_status({"exited": True, "signal": 9}) == guest.ExecResult(137, "", "")


@pytest.mark.parametrize("reply", [None, [], {"exited": "yes"}, {"exited": True},
                                   {"exited": True, "exitcode": True}, {"exited": True, "exitcode": 0, "out-data": 5},
                                   {"exited": True, "exitcode": 0, "out-data": "!!!!"}])
def test_malformed_exec_status_is_refused(reply: object) -> None:
    with pytest.raises(VMError):
        guest.exec_status(reply)


def test_file_reads_never_take_more_than_asked() -> None:
    assert guest.read_chunk({"buf-b64": b64(b"abc"), "eof": True, "count": 3}, 3) == (b"abc", True)
    with pytest.raises(VMError, match="more than 2 bytes"):
        guest.read_chunk({"buf-b64": b64(b"abc"), "eof": False}, 2)
    with pytest.raises(VMError, match="eof"):
        guest.read_chunk({"buf-b64": b64(b"a")}, 2)
    for bad in (-1, True, "3", None):
        with pytest.raises(VMError):
            guest.file_handle(bad)
    assert guest.file_handle(1000) == 1000
    guest.written({"count": 5}, 5)
    with pytest.raises(VMError, match="wrote 4 of 5"):
        guest.written({"count": 4}, 5)
    assert guest.exec_pid({"pid": 42}) == 42
    with pytest.raises(VMError):
        guest.exec_pid({"pid": "42"})
