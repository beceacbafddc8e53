"""bench/bench_savepath.py without a VM: each method's libvirt parameters, the watchers on a file and
a process of this test's own, and the report's table."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_savepath import (
    METHODS,
    Method,
    Result,
    Run,
    SaveWatcher,
    _running,
    libvirtd_reaper,
    report,
    save_params,
    table,
)
from replay_migrate import savefmt


def test_each_method_sets_the_libvirt_parameters_it_names(tmp_path: Path) -> None:
    image = tmp_path / "x.sav"
    one = save_params(image, METHODS["tmpfs"])
    assert one == {libvirt.VIR_DOMAIN_SAVE_PARAM_FILE: str(image), libvirt.VIR_DOMAIN_SAVE_PARAM_IMAGE_FORMAT: "sparse"}
    two = save_params(image, METHODS["tmpfs-2ch"])
    assert two[libvirt.VIR_DOMAIN_SAVE_PARAM_PARALLEL_CHANNELS] == 2
    assert {m.where for m in METHODS.values()} == {"tmpfs", "disk"}
    assert any(m.bypass_cache for m in METHODS.values())


def test_the_save_watcher_sees_the_final_magic_and_the_process_exit(tmp_path: Path) -> None:
    image = tmp_path / "x.sav"
    image.write_bytes(savefmt.PARTIAL_MAGIC)
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    watch = SaveWatcher(image, child.pid, time.monotonic())
    watch.start()
    assert _running(child.pid)
    image.write_bytes(savefmt.MAGIC)
    assert child.stdin is not None
    child.stdin.close()
    child.wait()
    watch.join(timeout=10)
    assert not watch.is_alive()
    assert watch.final is not None and watch.exited is not None
    assert not _running(child.pid)


def test_running_is_false_for_a_pid_that_does_not_exist() -> None:
    assert _running(os.getpid())
    assert not _running(2**22 + 12345)      # above pid_max's default ceiling


def test_the_table_has_a_row_per_measured_method_with_medians() -> None:
    runs = [Run(0.0, s, 0.3, 0.35, r, 0.02, 0.1, 1 << 30, 320 << 20) for s, r in ((2.0, 1.2), (1.0, 0.4), (3.0, 0.8))]
    rows = table([Result(METHODS["tmpfs"], runs), Result(Method("none", "disk"))])
    assert len(rows) == 3                   # header, rule, one row: a method without runs has none
    cells = [c.strip() for c in rows[2].strip("|").split("|")]
    assert cells[0] == "tmpfs" and cells[1] == "3"
    assert cells[2] == "2.00 (1.00-3.00)"   # the save call: median (range)
    assert cells[5] == "1.65"               # libvirt after QEMU: median of 1.65, 0.65, 2.65
    assert cells[6] == "0.80 (0.40-1.20)"
    assert cells[9] == "1024 / 320"
    failed = table([Result(METHODS["disk"], [], error="run 1: Unable to read from monitor")])
    assert len(failed) == 3 and "failed: run 1: Unable to read from monitor" in failed[2]
    text = report([Result(METHODS["tmpfs"], runs)], [1.9, 1.7, 2.0], "bench")
    assert "| tmpfs | 3 |" in text and "1.90 s (median of 3" in text


def test_the_reaper_is_libvirtds_parent_when_it_is_not_pid_1(tmp_path: Path) -> None:
    def proc(pid: int, comm: str, ppid: int) -> None:
        d = tmp_path / str(pid)
        d.mkdir()
        (d / "comm").write_text(comm + "\n")
        (d / "stat").write_text(f"{pid} ({comm}) S {ppid} 1 1 0\n")
    proc(1, "process_api", 0)
    proc(40, "libvirtd", 1)
    assert libvirtd_reaper(tmp_path) == "PID 1 (`process_api`)"
    (tmp_path / "40" / "stat").write_text("40 (libvirtd) S 30 1 1 0\n")
    proc(30, "tini", 1)
    assert libvirtd_reaper(tmp_path).startswith("its parent `tini` (a subreaper")
    text = report([], [1.9], "bench", libvirtd_reaper(tmp_path))
    assert "when PID 1 reaps it" in text and "reaped by its parent `tini`" in text
