"""The KVM/TCG probe: real QEMU runs, on a kernel that cannot boot (so it must say TCG)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from vm import probe
from vm.spec import VirtType


def test_a_kernel_that_is_not_one_gives_tcg(tmp_path: Path) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: run scripts/setup-host.sh")
    fake = tmp_path / "vmlinuz"
    fake.write_bytes(b"not a kernel" * 100)
    ok, why = probe.probe_kvm(fake, timeout=10)
    assert not ok
    assert why


def test_verdict_is_cached_per_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_probe(kernel: Path, timeout: float = 0) -> tuple[bool, str]:
        calls.append(kernel)
        return False, "probe said no"

    monkeypatch.setattr(probe, "probe_kvm", fake_probe)
    monkeypatch.delenv(probe.ENV_OVERRIDE, raising=False)
    k = tmp_path / "k"
    k.write_bytes(b"kernel-1")
    assert probe.choose_virt(k, tmp_path / "c") == (VirtType.TCG, "probe said no")
    assert probe.choose_virt(k, tmp_path / "c") == (VirtType.TCG, "probe said no (cached)")
    k.write_bytes(b"kernel-2")
    probe.choose_virt(k, tmp_path / "c")
    assert len(calls) == 2


def test_environment_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(probe.ENV_OVERRIDE, "kvm")
    assert probe.choose_virt(tmp_path / "absent", tmp_path)[0] is VirtType.KVM


def test_the_probe_runs_once_when_callers_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two commands starting at once on a fresh host (a real QEMU probe each, on a kernel that is
    not one): one probes and caches, the other waits for the verdict."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: run scripts/setup-host.sh")
    monkeypatch.delenv(probe.ENV_OVERRIDE, raising=False)
    fake = tmp_path / "vmlinuz"
    fake.write_bytes(b"not a kernel" * 100)
    barrier = threading.Barrier(3)
    answers: list[tuple[VirtType, str]] = []

    def choose() -> None:
        barrier.wait()
        answers.append(probe.choose_virt(fake, tmp_path / "cache"))

    threads = [threading.Thread(target=choose) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 3 and {v for v, _ in answers} == {VirtType.TCG}
    assert sum(1 for _, why in answers if not why.endswith("(cached)")) == 1, answers
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]) == 1


def test_a_damaged_cached_verdict_is_probed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(probe.ENV_OVERRIDE, raising=False)
    fake = tmp_path / "vmlinuz"
    fake.write_bytes(b"not a kernel" * 100)
    probe.choose_virt(fake, tmp_path)
    [cached] = tmp_path.glob("virt-*")
    cached.write_text("")                           # as a writer that died half-way left it
    virt, why = probe.choose_virt(fake, tmp_path)
    assert virt is VirtType.TCG and not why.endswith("(cached)")
