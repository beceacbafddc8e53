"""Guest-agent replies, checked: what a guest's qemu-guest-agent answers is hostile input.

The guest decides what its agent says: a reply may carry more bytes than asked for, fields of the
wrong type, or output without end. Every function here takes one reply (already JSON-decoded:
libvirt bounds the reply it reads) and checks types and sizes *before* decoding anything, with
the limit the caller expects; :class:`vm.machine.Machine` uses them for ``guest-exec`` output and
``guest-file-read``, and ``vm.install`` for everything it reads back from a guest.

Kept free of libvirt calls so it is tested without a daemon (``tests/test_guest.py``).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from replay_migrate.errors import VMError

DEFAULT_MAX_OUTPUT = 1 << 20
"""Largest stdout (and stderr) taken from a ``guest-exec`` by default; more is refused."""
DEFAULT_MAX_FILE = 16 << 20
"""Largest file read through ``guest-file-read`` by default."""
READ_CHUNK = 1 << 20
"""What one ``guest-file-read`` asks for."""
WRITE_CHUNK = 192 << 10
"""What one ``guest-file-write`` carries (256 KiB of base64 in one agent command)."""


def b64_bounded(value: object, max_bytes: int, what: str) -> bytes:
    """Decode base64 ``value`` (a str from the guest) if it can hold at most ``max_bytes``: the length
    is checked before anything is decoded."""
    if value is None:
        return b""
    if not isinstance(value, str):
        raise VMError(f"{what}: the guest agent sent {type(value).__name__}, not base64 text")
    if len(value) > 4 * (-(-max_bytes // 3)):
        raise VMError(f"{what}: the guest agent sent more than {max_bytes} bytes")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise VMError(f"{what}: the guest agent sent malformed base64") from None
    if len(data) > max_bytes:
        raise VMError(f"{what}: the guest agent sent more than {max_bytes} bytes")
    return data


def _field(reply: object, name: str, kind: type, what: str) -> Any:
    if not isinstance(reply, dict) or not isinstance(reply.get(name), kind) or (isinstance(reply.get(name), bool) \
            and kind is int):
        raise VMError(f"{what}: the guest agent's reply has no {kind.__name__} {name!r}")
    return reply[name]


@dataclass
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str


def exec_pid(reply: object) -> int:
    """The pid a ``guest-exec`` reply names."""
    pid: int = _field(reply, "pid", int, "guest-exec")
    return pid


def exec_status(reply: object, max_output: int = DEFAULT_MAX_OUTPUT) -> ExecResult | None:
    """A ``guest-exec-status`` reply: None while the command runs, else its exit code and output
    (each stream at most ``max_output`` bytes, else VMError; ``out-truncated`` too: the guest's agent
    cut it, so it is not the whole output)."""
    if not isinstance(reply, dict):
        raise VMError("guest-exec-status: the guest agent's reply is not an object")
    exited = reply.get("exited")
    if not isinstance(exited, bool):
        raise VMError("guest-exec-status: the guest agent's reply has no boolean 'exited'")
    if not exited:
        return None
    for stream in ("out", "err"):
        if reply.get(f"{stream}-truncated"):
            raise VMError(f"guest-exec: the guest agent cut the command's std{stream} (more than it keeps)")
    out = b64_bounded(reply.get("out-data"), max_output, "guest-exec stdout")
    err = b64_bounded(reply.get("err-data"), max_output, "guest-exec stderr")
    code = reply.get("exitcode")
    if code is None and isinstance(reply.get("signal"), int):
        code = 128 + reply["signal"]
    if not isinstance(code, int) or isinstance(code, bool):
        raise VMError("guest-exec-status: the guest agent's reply has no exit code")
    return ExecResult(code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))


def file_handle(reply: object) -> int:
    """The handle a ``guest-file-open`` reply gives (the reply *is* the integer)."""
    if not isinstance(reply, int) or isinstance(reply, bool) or reply < 0:
        raise VMError("guest-file-open: the guest agent did not answer with a handle")
    return reply


def read_chunk(reply: object, asked: int) -> tuple[bytes, bool]:
    """One ``guest-file-read`` reply: (data, eof); never more than the ``asked`` bytes."""
    data = b64_bounded(_field(reply, "buf-b64", str, "guest-file-read"), asked, "guest-file-read")
    eof = reply.get("eof") if isinstance(reply, dict) else None
    if not isinstance(eof, bool):
        raise VMError("guest-file-read: the guest agent's reply has no boolean 'eof'")
    return data, eof


def written(reply: object, sent: int) -> None:
    """Check a ``guest-file-write`` reply: all ``sent`` bytes were written."""
    count = _field(reply, "count", int, "guest-file-write")
    if count != sent:
        raise VMError(f"guest-file-write: the guest wrote {count} of {sent} bytes")
