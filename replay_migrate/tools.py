"""Host tools (qemu-img, qemu-io, cp, the image build script): one runner for every caller.

Every run is bounded and says what went wrong in the caller's terms:

- no shell: ``argv`` is executed as given, so a path with blanks or ``;`` is one argument;
- stdin is ``/dev/null``: a tool that asks a question gets end-of-file instead of waiting forever;
- a ``timeout``: the tool is killed and the caller's ``error`` class names what did not finish;
- bounded output: stdout beyond ``max_output`` bytes kills the tool and is an error (its output
  is parsed: cutting it short silently would parse something else); stderr keeps its last
  ``max_stderr`` bytes (the message is at the end);
- a tool that is not installed is a :class:`HostError` (the host lacks it, not the image), with
  the Debian package that brings it when known;
- a failure (non-zero exit, unless ``check=False``) is the caller's ``error`` with the tool's
  last line of output.

The tool stays in this process's group, so a Ctrl-C at the terminal reaches it as before.
Standard library only (the shared root).
"""

from __future__ import annotations

import os
import selectors
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from replay_migrate.errors import HostError, ReplayMigrateError

ErrorClass = type[ReplayMigrateError]

DEFAULT_TIMEOUT_S = 600.0
"""Seconds a tool may run (a full ``qemu-img convert`` of a multi-GiB image included)."""
DEFAULT_MAX_OUTPUT = 64 << 20
"""Bytes of stdout a tool may print (``qemu-img info`` prints a few KiB; ``qemu-img map`` of a
fragmented multi-GiB overlay, some MiB)."""
DEFAULT_MAX_STDERR = 64 << 10
"""Bytes of stderr kept, the last ones (what a failure's message is taken from)."""
MAX_DETAIL_CHARS = 500
"""Longest piece of a tool's output put into an error message."""
READ_BYTES = 1 << 16
PACKAGES = {"qemu-img": "qemu-utils", "qemu-io": "qemu-utils", "qemu-system-x86_64": "qemu-system-x86",
            "mmdebstrap": "mmdebstrap", "cp": "coreutils", "bash": "bash", "debugfs": "e2fsprogs",
            "dumpe2fs": "e2fsprogs", "rsync": "rsync", "b3sum": "b3sum"}
"""The Debian package of each tool the project runs (for the message when one is missing)."""


@dataclass(frozen=True)
class ToolResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    """The last ``max_stderr`` bytes of it."""
    seconds: float


def _missing(tool: str, e: OSError) -> HostError:
    name = os.path.basename(tool)
    if isinstance(e, FileNotFoundError):
        package = PACKAGES.get(name)
        hint = f"the {package} package; " if package else ""
        return HostError(f"{tool} is not installed ({hint}scripts/setup-host.sh installs what this project needs)")
    return HostError(f"{tool} cannot be run: {e.strerror or e}")


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:MAX_DETAIL_CHARS] if lines else ""


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def run_tool(argv: Sequence[str | os.PathLike[str]], *, what: str, error: ErrorClass,
             timeout: float = DEFAULT_TIMEOUT_S, check: bool = True, cwd: str | os.PathLike[str] | None = None,
             env: Mapping[str, str] | None = None, max_output: int = DEFAULT_MAX_OUTPUT,
             max_stderr: int = DEFAULT_MAX_STDERR, pass_fds: Sequence[int] = ()) -> ToolResult:
    """Run ``argv`` and return its output; ``what`` says what it does for the messages
    ("{path}: qemu-img info": "... failed: <the tool's last line>"). See the module's docstring.
    ``pass_fds``: descriptors the tool (and whatever it starts) inherits, e.g. a held ``flock`` that
    must stay held while any process of the tool lives, this one killed or not."""
    args = tuple(os.fspath(a) for a in argv)
    if not args:
        raise ValueError("run_tool needs a command")
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=cwd, env=None if env is None else dict(env), close_fds=True,
                                pass_fds=tuple(pass_fds))
    except OSError as e:
        if isinstance(e, FileNotFoundError) and cwd is not None and not os.path.isdir(cwd):
            raise error(f"{what}: the working folder {os.fspath(cwd)} does not exist") from None
        raise _missing(args[0], e) from None
    out = bytearray()
    err = bytearray()
    assert proc.stdout is not None and proc.stderr is not None
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, out)
            sel.register(proc.stderr, selectors.EVENT_READ, err)
            deadline = t0 + timeout
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise error(f"{what} did not finish within {timeout:g} s")
                for key, _ in sel.select(left):
                    chunk = os.read(key.fd, READ_BYTES)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    buf: bytearray = key.data
                    buf += chunk
                    if buf is out and len(out) > max_output:
                        raise error(f"{what}: {args[0]} printed more than {max_output} bytes")
                    if buf is err and len(err) > max_stderr:
                        del err[: len(err) - max_stderr]
            try:
                returncode = proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise error(f"{what} did not finish within {timeout:g} s") from None
    except BaseException:
        _kill(proc)
        raise
    finally:
        proc.stdout.close()
        proc.stderr.close()
    result = ToolResult(args, returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
                        time.monotonic() - t0)
    if check and returncode != 0:
        detail = _last_line(result.stderr) or _last_line(result.stdout) or f"exit status {returncode}"
        raise error(f"{what} failed: {detail}")
    return result
