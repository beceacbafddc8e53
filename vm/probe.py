"""Does KVM really run our guest here, or must we use TCG?

``/dev/kvm`` existing proves little: on this kind of host it is a software-nested KVM on which a
stock Debian kernel dies with an emulation failure or crawls. So the probe boots the guest's own
kernel with no root device under ``-accel kvm`` and waits for it to reach its "cannot mount root"
panic: a kernel that gets there in time has run its whole early boot on KVM. The verdict is cached
per kernel, so the probe runs once per host and image: under a file lock beside the cache (two
commands starting at once on a fresh host probe once), written whole (a reader never sees half).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from replay_migrate.files import atomic_write, locked
from vm.spec import VirtType

PROBE_TIMEOUT_S = 25.0
"""How long the probe kernel may take to reach its root-mount panic under KVM."""
PANIC_MARKERS = (b"Unable to mount root fs", b"Kernel panic")
ENV_OVERRIDE = "REPLAY_MIGRATE_VIRT"
"""Set to ``kvm`` or ``tcg`` to skip the probe."""


def probe_kvm(kernel: Path, timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Boot ``kernel`` under KVM; (usable, why)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "no usable /dev/kvm"
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return False, "qemu-system-x86_64 is not installed"
    with tempfile.TemporaryDirectory() as tmp:
        console = Path(tmp) / "console"
        argv = [qemu, "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", "256",
                "-display", "none", "-no-reboot", "-nodefaults", "-serial", f"file:{console}",
                "-kernel", str(kernel), "-append", "console=ttyS0 root=/dev/null panic=-1 quiet"]
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            while time.monotonic() - t0 < timeout:
                out = console.read_bytes() if console.exists() else b""
                if any(m in out for m in PANIC_MARKERS):
                    return True, f"guest kernel booted under KVM in {time.monotonic() - t0:.1f} s"
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    return False, f"QEMU exited under KVM: {err.strip()[-200:] or 'no output'}"
                time.sleep(0.2)
            return False, f"guest kernel did not boot under KVM within {timeout:.0f} s"
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _cached(cache: Path) -> tuple[VirtType, str] | None:
    """A cached verdict, or None if there is none or it is not one (then the probe runs again)."""
    try:
        verdict, _, why = cache.read_text().partition("\n")
        return VirtType(verdict), why + " (cached)"
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def choose_virt(kernel: Path, cache_dir: Path) -> tuple[VirtType, str]:
    """KVM where the probe shows it works, else TCG; the answer is cached per kernel."""
    forced = os.environ.get(ENV_OVERRIDE, "").lower()
    if forced in ("kvm", "tcg"):
        return (VirtType.KVM if forced == "kvm" else VirtType.TCG), f"forced by ${ENV_OVERRIDE}"
    digest = hashlib.sha256(kernel.read_bytes()).hexdigest()[:16]
    cache = cache_dir / f"virt-{digest}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with locked(cache_dir / f".virt-{digest}.lock"):
        known = _cached(cache)
        if known is not None:
            return known
        ok, why = probe_kvm(kernel)
        virt = VirtType.KVM if ok else VirtType.TCG
        atomic_write(cache, f"{virt.value}\n{why}".encode())
        return virt, why


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Probe whether KVM can run the guest kernel")
    ap.add_argument("kernel", type=Path)
    ap.add_argument("--timeout", type=float, default=PROBE_TIMEOUT_S)
    args = ap.parse_args(argv)
    ok, why = probe_kvm(args.kernel, args.timeout)
    print(("KVM" if ok else "TCG") + ": " + why)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
