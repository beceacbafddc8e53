"""cli/cleanup.py (``make clean-vms``): every domain of ours goes, at the daemon ``--connect`` names."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.cleanup import main


def test_cleanup_removes_our_domains_at_the_daemon_it_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("REPLAY_MIGRATE_STATE", str(tmp_path / "state"))
    node = tmp_path / "node.xml"
    node.write_text("<node>" + "".join(f"<domain type='test'><name>{n}</name><memory>1024</memory><os><type>hvm"
                                       "</type></os></domain>" for n in ("rm-zz", "someone-elses")) + "</node>")
    assert main(["--connect", f"test://{node}"]) == 0
    assert capsys.readouterr().out.split() == ["removed", "rm-zz"]
