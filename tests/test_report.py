"""Tables and the terminal progress line."""

from __future__ import annotations

import io

from cli.report import Progress, human_bytes, table


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
    p.close()
    assert out.getvalue() == ""
    out = io.StringIO()
    p = Progress(out, enabled=True, interval_s=0)
    p("transfer", 15, 30)
    assert "transfer" in out.getvalue() and "15/30" in out.getvalue() and "#" * 15 in out.getvalue()
    p.close()
    assert out.getvalue().endswith("\r")
