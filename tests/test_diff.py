"""`replay-migrate diff` and `sync` on image files (synthetic memory images, real qcow2 overlays)."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
from pathlib import Path

import pytest
from test_patch import changed
from test_saveimage import build_save_image, default_blocks

from cli.main import main
from replay_migrate.errors import ImageError, UsageError


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    assert main([*argv, "--json"]) == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out)
    return out


def test_memory_diff_is_a_dry_run_and_sync_makes_b_equal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = default_blocks()
    a = build_save_image(tmp_path / "a.sav", changed(base, seed=1, n=200)).path
    b = build_save_image(tmp_path / "b.sav", changed(base, seed=2, n=200)).path
    before = b.read_bytes()
    d = run_json(capsys, "diff", str(a), str(b))
    assert d["kind"] == "memory" and d["dry_run"] is True
    assert d["divergent_memory"] == d["divergent_blocks"] and isinstance(d["divergent_blocks"], int)
    assert d["divergent_blocks"] > 0
    wire, trips = d["wire_bytes"], d["round_trips"]
    assert isinstance(wire, int) and isinstance(trips, int) and 0 < wire and trips >= 2
    assert b.read_bytes() == before
    s = run_json(capsys, "sync", str(a), str(b))
    assert s["verified"] is True
    assert filecmp.cmp(a, b, shallow=False)
    again = run_json(capsys, "diff", str(a), str(b))
    assert again["divergent_blocks"] == 0 and again["block_bytes"] == 0


def _qemu(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def test_qcow2_overlays_on_one_backing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base.qcow2"
    _qemu("qemu-img", "create", "-q", "-f", "qcow2", str(base), "8M")
    _qemu("qemu-io", "-f", "qcow2", "-c", "write -q -P 0x11 0 4M", str(base))
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    for p in (a, b):
        _qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(p))
    _qemu("qemu-io", "-f", "qcow2", "-c", "write -q -P 0x22 64k 128k", "-c", "write -q -z 1M 64k", str(a))
    _qemu("qemu-io", "-f", "qcow2", "-c", "write -q -P 0x33 2M 64k", str(b))
    d = run_json(capsys, "diff", str(a), str(b))
    assert d["kind"] == "disk" and d["divergent_disk"] == 32 + 16 + 16   # 4 KiB leaves
    run_json(capsys, "sync", str(a), str(b))
    assert subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)]).returncode == 0


def test_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mem = build_save_image(tmp_path / "m.sav", default_blocks()).path
    raw = tmp_path / "r.raw"
    raw.write_bytes(b"x" * 8192)
    assert main(["diff", str(mem), str(raw)]) == UsageError.exit_code
    assert "different kinds" in capsys.readouterr().err
    for name, size in (("b1", "1M"), ("b2", "1M")):
        _qemu("qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / f"{name}.qcow2"), size)
        _qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(tmp_path / f"{name}.qcow2"), "-F", "qcow2",
              str(tmp_path / f"o{name}.qcow2"))
    assert main(["sync", str(tmp_path / "ob1.qcow2"), str(tmp_path / "ob2.qcow2")]) == ImageError.exit_code
    assert "different backing files" in capsys.readouterr().err
    assert main(["diff", str(tmp_path / "none.sav"), str(mem)]) == ImageError.exit_code


@pytest.mark.timeout(60)
def test_sync_refuses_a_link_a_fifo_and_a_folder_it_cannot_write(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 10 finding 8: a FIFO hung `diff`/`sync`, a read-only folder gave a PermissionError
    traceback, a link was replaced by a plain file (its target left as it was)."""
    from cli.fileargs import set_immutable

    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    a.write_bytes(b"\x01" * 16384)
    b.write_bytes(b"\x02" * 16384)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert main(["diff", str(a), str(fifo)]) == ImageError.exit_code
    assert "is a FIFO" in capsys.readouterr().err
    assert main(["sync", str(fifo), str(b)]) == ImageError.exit_code
    assert "is a FIFO" in capsys.readouterr().err

    link = tmp_path / "link.raw"
    link.symlink_to(b)
    assert main(["sync", str(a), str(link)]) == ImageError.exit_code
    assert "is a symbolic link (to " in capsys.readouterr().err
    assert link.is_symlink() and b.read_bytes() == b"\x02" * 16384
    assert main(["diff", str(a), str(link)]) == 0           # reading through a link is fine
    capsys.readouterr()

    os.link(b, tmp_path / "b-again.raw")
    assert main(["sync", str(a), str(b)]) == ImageError.exit_code
    assert "2 hard links" in capsys.readouterr().err
    os.unlink(tmp_path / "b-again.raw")

    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "b.raw").write_bytes(b"\x02" * 16384)
    set_immutable(ro, True)
    try:
        assert main(["sync", str(a), str(ro / "b.raw")]) == ImageError.exit_code
        assert "cannot write in the folder" in capsys.readouterr().err
    finally:
        set_immutable(ro, False)
    assert (ro / "b.raw").read_bytes() == b"\x02" * 16384 and os.listdir(ro) == ["b.raw"]

    assert main(["sync", str(a), str(b)]) == 0                # the file itself: patched in place
    assert b.read_bytes() == a.read_bytes()
