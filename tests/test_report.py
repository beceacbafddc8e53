"""Tables and the terminal progress line."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from cli.report import Progress, human_bytes, progress_line, table

REPO = Path(__file__).resolve().parent.parent


def test_table_aligns_columns() -> None:
    out = io.StringIO()
    table([["a", 1], ["longer", 22]], ["name", "n"], out=out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "| name   | n  |"
    assert lines[1].startswith("|---") and lines[3] == "| longer | 22 |"


def test_human_bytes() -> None:
    assert human_bytes(512) == "512 B"
    assert human_bytes(3 * 1024 * 1024) == "3.0 MiB"


def test_progress_only_on_a_terminal() -> None:
    out = io.StringIO()            # not a TTY
    p = Progress(out)
    p("replay", 5)
    p.tick()
    p.close()
    assert out.getvalue() == ""
    out = io.StringIO()
    p = Progress(out, enabled=True, interval_s=0)
    p("transfer", 15, 30)
    assert "transfer" in out.getvalue() and "15 of 30 blocks" in out.getvalue() and " 50%" in out.getvalue()
    p.close()
    assert out.getvalue().endswith("\r")


def test_the_line_shows_phase_amount_share_rate_and_time_like_rsync() -> None:
    """Issue 12 item 5: a bare counter (`replay 449`) and nothing during the suspend before."""
    assert progress_line("hashing", 3 << 20, 0, 65.0, 1.5 * (1 << 20)) == \
        f"hashing   {'3.0 MiB':>24}      {'1.5 MiB/s':>11} 0:01:05"
    line = progress_line("replay", 449, 512, 12.0, 37.4, "63 events behind the source")
    assert line.startswith("replay ") and "449 of 512 events" in line and " 87%" in line and "37.4/s" in line
    assert line.endswith("0:00:12  63 events behind the source")
    assert progress_line("restore", 0, 0, 3661.0, None).endswith("1:01:01")


def test_a_phase_redraws_one_line_and_a_new_phase_restarts_its_rate_and_time() -> None:
    now = [100.0]
    out = io.StringIO()
    p = Progress(out, enabled=True, interval_s=0.5, clock=lambda: now[0])
    p("recording", 1000)
    now[0] += 0.1
    p("recording", 2000)                       # throttled
    assert out.getvalue().count("\r") == 1 and "\n" not in out.getvalue()
    now[0] += 1.9
    p.note("12 frames; the target is 1 KiB behind")
    p("recording", 5096)
    last = out.getvalue().split("\r")[-1]
    assert "5.0 KiB" in last and "2.0 KiB/s" in last and "0:00:02" in last and "1 KiB behind" in last
    p("saving", 0)                              # at once, its own time, no note
    last = out.getvalue().split("\r")[-1]
    assert last.startswith("saving") and "0:00:00" in last and "behind" not in last
    assert len(last) >= len(out.getvalue().split("\r")[-2])   # the longer line before is blanked out
    now[0] += 7
    p.tick()                                    # a save reports nothing: its time goes on
    assert "0:00:07" in out.getvalue().split("\r")[-1]


def test_progress_goes_to_a_terminal_and_nowhere_else() -> None:
    """The commands' Progress() draws on stderr when it is a terminal (a pty here) and writes
    nothing at all when it is a pipe or a file."""
    for terminal in (True, False):
        rd, wr = os.openpty() if terminal else os.pipe()
        try:
            code = ("from cli.report import Progress\np = Progress(interval_s=0)\n"
                    "p('hashing', 1 << 20, 0)\np('walk', 3, 0)\np.close()\nprint('done', flush=True)\n")
            subprocess.run([sys.executable, "-c", code], stderr=wr, stdout=subprocess.DEVNULL, check=True,
                           timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
            os.close(wr)
            got = b""
            while True:
                try:
                    chunk = os.read(rd, 4096)
                except OSError:                 # a pty whose other end closed
                    break
                if not chunk:
                    break
                got += chunk
        finally:
            os.close(rd)
        if terminal:
            assert b"\rhashing" in got and b"1.0 MiB" in got and b"\rwalk" in got and got.endswith(b"\r"), got
            assert b"\n" not in got.replace(b"\r\n", b""), got
        else:
            assert got == b"", got
