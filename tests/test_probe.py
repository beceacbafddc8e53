"""The KVM/TCG probe: real QEMU runs, on a kernel that cannot boot (so it must say TCG)."""

from __future__ import annotations

import shutil
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
