"""replay_migrate.tools: the one runner of host tools (real processes: sh, cat, yes, sleep)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from replay_migrate.errors import HostError, ImageError, VMError
from replay_migrate.tools import run_tool

pytestmark = pytest.mark.timeout(60)


def test_output_and_exit_status() -> None:
    r = run_tool(["sh", "-c", "echo out; echo err >&2"], what="a test", error=ImageError)
    assert (r.returncode, r.stdout, r.stderr) == (0, "out\n", "err\n")
    assert r.argv == ("sh", "-c", "echo out; echo err >&2")


def test_no_shell_between_the_caller_and_the_tool(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("kept")
    r = run_tool(["echo", f"a; rm {victim}", "$(id)", "*"], what="a test", error=ImageError)
    assert r.stdout == f"a; rm {victim} $(id) *\n" and victim.exists()


def test_a_failure_is_the_callers_error_with_the_tools_last_line() -> None:
    with pytest.raises(VMError, match=r"^x\.img: qemu-img info failed: the last line$"):
        run_tool(["sh", "-c", "echo noise >&2; echo 'the last line' >&2; exit 3"], what="x.img: qemu-img info",
                 error=VMError)
    with pytest.raises(ImageError, match="failed: exit status 4"):
        run_tool(["sh", "-c", "exit 4"], what="quiet", error=ImageError)
    r = run_tool(["sh", "-c", "echo why >&2; exit 1"], what="compare", error=ImageError, check=False)
    assert (r.returncode, r.stderr) == (1, "why\n")


def test_a_missing_tool_is_a_host_error_naming_its_package(tmp_path: Path) -> None:
    with pytest.raises(HostError, match=r"qemu-img is not installed \(the qemu-utils package"):
        run_tool(["qemu-img", "info", "x"], what="x", error=ImageError, env={"PATH": str(tmp_path)})
    with pytest.raises(HostError, match="no-such-tool is not installed"):
        run_tool([str(tmp_path / "no-such-tool")], what="x", error=ImageError)
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(HostError, match="cannot be run"):
        run_tool([str(script)], what="x", error=ImageError)


def test_a_tool_that_runs_too_long_is_killed() -> None:
    t0 = time.monotonic()
    with pytest.raises(ImageError, match=r"^slow did not finish within 0\.3 s$"):
        run_tool(["sleep", "30"], what="slow", error=ImageError, timeout=0.3)
    assert time.monotonic() - t0 < 10


def test_a_tool_that_prints_too_much_is_stopped_and_refused() -> None:
    with pytest.raises(ImageError, match="yes printed more than 65536 bytes"):
        run_tool(["yes"], what="chatty", error=ImageError, max_output=1 << 16)


def test_stderr_keeps_its_last_bytes() -> None:
    r = run_tool(["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' a >&2; echo THE-END >&2"], what="x",
                 error=ImageError, max_stderr=1000)
    assert len(r.stderr) == 1000 and r.stderr.endswith("THE-END\n")


def test_stdin_is_empty_so_a_question_gets_no_answer() -> None:
    assert run_tool(["cat"], what="x", error=ImageError, timeout=20).stdout == ""


def test_working_folder(tmp_path: Path) -> None:
    assert run_tool(["pwd"], what="x", error=ImageError, cwd=tmp_path).stdout.strip() == str(tmp_path)
    with pytest.raises(ImageError, match="working folder"):
        run_tool(["pwd"], what="x", error=ImageError, cwd=tmp_path / "gone")


def test_no_process_is_left_behind(tmp_path: Path) -> None:
    """A tool killed for its timeout is reaped: no zombie of it stays a child of this process."""
    pidfile = tmp_path / "pid"
    with pytest.raises(ImageError):
        run_tool(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"], what="x", error=ImageError, timeout=2)
    pid = int(pidfile.read_text())
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


LONG_LIVED = {
    "vm/probe.py": "a KVM boot watched through its console file until a panic line, then killed",
}
"""The modules that may start processes themselves: none of them runs a tool and reads its output."""


def test_one_runner_for_every_tool() -> None:
    """Issue 11 finding 4: ``run_tool`` was written twice (vm.machine, differ.blocks), and store's
    image build and state comparison called ``subprocess`` directly, each bounded (or not) its own
    way. Every package module but the long-lived workers above goes through this runner."""
    root = Path(__file__).resolve().parent.parent
    users = set()
    for pkg in ("replay_migrate", "recorder", "vm", "differ", "replayer", "server", "store", "migration", "cli"):
        for path in (root / pkg).rglob("*.py"):
            text = path.read_text()
            if "import subprocess" in text or "from subprocess" in text:
                users.add(str(path.relative_to(root)))
    assert users == {"replay_migrate/tools.py", *LONG_LIVED}


def test_a_passed_descriptor_reaches_the_tool_and_no_other_does() -> None:
    r, w = os.pipe()
    try:
        run_tool(["bash", "-c", f"echo passed >&{w}"], what="bash", error=ImageError, pass_fds=(w,))
        assert os.read(r, 100) == b"passed\n"
        with pytest.raises(ImageError, match="Bad file descriptor"):
            run_tool(["bash", "-c", f"echo leaked >&{w}"], what="bash", error=ImageError)
    finally:
        os.close(r)
        os.close(w)
