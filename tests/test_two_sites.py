"""A migration between two libvirt hosts: site A (this machine's libvirtd) and site B (a second
libvirtd in namespaces of its own, ``bench/sites.py``), joined by a veth.

The checkpoint travels first (``checkpoint export`` at A piped into ``checkpoint import`` at B,
verified there). Then each side runs as its own process against its own daemon, as two hosts run
them: the handoff service at A on the veth address, the source at A on ``qemu:///system``, the
target inside site B's namespaces (``nsenter``) on ``qemu+tcp://10.232.0.2/system``, writing into
site B's state folder. Both keep their state (``bench/sides.py``: the source's as it saved it, the
target's as it verified it, before it resumed) and the test compares them; the migrated VM must
run under site B's daemon and not under site A's, and the bytes that crossed the veth must match
what the target's report counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import libvirt
import pytest

from bench.sides import KEPT_DISK, KEPT_MEMORY
from bench.sites import SiteB
from server.credentials import CREDENTIAL_ENV, TOKEN_ENV
from store import checkpoint as ckpt
from store.vmstate import VmState, same_state
from vm.machine import Hypervisor

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
STEP_S = 300.0
"""Bound on one step of the test (a migration on a loaded 2-core TCG host takes ~1 min)."""
# the user starts typing once the target's clone runs (~5 s under TCG), as in a real session: the
# downtime then measures the suspend, not a target that never caught up with a 10-second session
WORKLOAD = """
wait 6
click 250 400
type "echo migrated between two hosts > /root/sites.txt; sync\\n"
wait 2
"""
VETH_OVERHEAD = 1.5
"""The veth carries more than the websocket payloads the report counts (TCP/IP and Ethernet
headers, acknowledgements, websocket framing, the HTTP upgrade): at most half as much again."""


def _wait(p: subprocess.Popen[str], what: str) -> str:
    """An empty string if ``p`` ended well within :data:`STEP_S`, else what went wrong (both sides
    are waited for before the test fails, so it shows the error of the side that failed first)."""
    try:
        _, err = p.communicate(timeout=STEP_S)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
        return f"{what} did not end in {STEP_S:.0f} s:\n{err[-3000:]}"
    return f"{what} failed ({p.returncode}):\n{err[-3000:]}" if p.returncode else ""


@pytest.mark.vm
def test_a_migration_between_two_libvirt_hosts(hv: Hypervisor, checkpoint: ckpt.Checkpoint, site_b: SiteB,
                                               tmp_path: Path) -> None:
    t0 = time.monotonic()
    # 1. site B gets its own copy of the checkpoint, verified there (roots recomputed at import)
    sent, got = site_b.copy_checkpoint(checkpoint.name)
    roots = checkpoint.manifest.roots
    assert sent["roots"] == got["roots"] == roots
    assert got["stream_bytes"] == sent["stream_bytes"] < sent["allocated_bytes"] < sent["apparent_bytes"]
    copied = site_b.cfg.folder("state") / "checkpoints" / checkpoint.name
    assert json.loads((copied / "manifest.json").read_text())["roots"] == roots
    assert copied.stat().st_ino != checkpoint.dir.stat().st_ino               # a copy, not site A's folder
    t_copy = time.monotonic() - t0

    # 2. the user's VM at site A
    source = ckpt.start_clone(hv, checkpoint, f"rm-test-{os.getpid()}-sites", replace=True)
    target = f"{source.name}-b"
    source.wait_agent()
    (tmp_path / "work.wl").write_text(WORKLOAD)
    token = os.urandom(12).hex()
    serve = subprocess.Popen([PY, "-m", "cli.main", "serve", "--listen", f"{site_b.cfg.host_addr}:0"], cwd=REPO,
                             env=site_b.env(**{TOKEN_ENV: token}), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    target_vm: libvirt.virDomain | None = None
    conn_b = libvirt.open(site_b.uri)
    try:
        assert serve.stdout is not None
        url = serve.stdout.readline().split()[-1]                            # serving on ws://10.232.0.1:PORT
        assert url.startswith(f"ws://{site_b.cfg.host_addr}:"), url
        creds = {role: tmp_path / role for role in ("source", "target")}
        subprocess.run([PY, "-m", "cli.main", "session", "new", "--to", url, "--source-credential",
                        str(creds["source"]), "--target-credential", str(creds["target"])],
                       cwd=REPO, env=site_b.env(**{TOKEN_ENV: token}), check=True, capture_output=True, timeout=60)
        # the target's state is kept in site B's state folder (a hard link cannot leave its mount)
        kept_a, kept_b = tmp_path / "kept-a", site_b.cfg.folder("state") / f"kept-{os.getpid()}"
        rx0, tx0 = site_b.counters()
        # 3. the target inside site B's namespaces, on site B's daemon; the source here, on site A's
        tgt = subprocess.Popen(site_b.enter([PY, "-m", "bench.sides", "target", "--connect", site_b.uri, "--url", url,
                                             "--checkpoint", checkpoint.name, "--name", target,
                                             "--keep-verified", str(site_b.cfg.state / kept_b.name),
                                             "--out", str(tmp_path / "target.json")]),
                               cwd=REPO, env=site_b.env(**{CREDENTIAL_ENV: creds["target"].read_text().strip()}),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        src = subprocess.Popen([PY, "-m", "bench.sides", "source", "--connect", "qemu:///system", "--url", url,
                                "--domain", source.name, "--checkpoint", checkpoint.name,
                                "--workload", str(tmp_path / "work.wl"), "--keep", str(kept_a),
                                "--out", str(tmp_path / "source.json")],
                               cwd=REPO, env=site_b.env(**{CREDENTIAL_ENV: creds["source"].read_text().strip()}),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        errors = [_wait(p, what) for p, what in ((src, "the source side (site A)"), (tgt, "the target side (site B)"))]
        assert not any(errors), "\n\n".join(e for e in errors if e)
        rx1, tx1 = site_b.counters()
        rs, rt = (json.loads((tmp_path / f"{side}.json").read_text())["report"] for side in ("source", "target"))
        assert rs["verified"] is True and rt["verified"] is True, (rs, rt)

        # 4. the migrated VM runs under site B's daemon, and nowhere at site A
        state = subprocess.run(["virsh", "-c", site_b.uri, "domstate", target], capture_output=True, text=True)
        assert state.stdout.strip() == "running", state
        target_vm = conn_b.lookupByName(target)
        assert not hv.exists(target) and not hv.exists(source.name)
        assert target not in ckpt.clone_names()                               # its files are site B's
        assert (site_b.cfg.folder("state") / "clones" / target / "disk.qcow2").is_file()
        out = subprocess.run(["virsh", "-c", site_b.uri, "domtime", target], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr                                 # its guest agent answers there

        # 5. both states: the source's as saved, the target's as verified, equal as the guests see them
        same = same_state(VmState(kept_a / KEPT_MEMORY, kept_a / KEPT_DISK, checkpoint),
                          VmState(kept_b / KEPT_MEMORY, kept_b / KEPT_DISK, checkpoint))
        assert same == (True, True)

        # 6. what crossed the veth: the target's traffic (the service and the source are at site A)
        veth = (rx1 - rx0) + (tx1 - tx0)
        assert rt["wire_bytes"] <= veth <= VETH_OVERHEAD * rt["wire_bytes"] + (256 << 10), (veth, rt["wire_bytes"])
        print(f"\ntwo sites: checkpoint copy {t_copy:.1f} s (stream {sent['stream_bytes']} B, allocated "
              f"{sent['allocated_bytes']} B, apparent {sent['apparent_bytes']} B); migration wire bytes "
              f"source {rs['wire_bytes']}, target {rt['wire_bytes']}, veth {veth} (rx {rx1 - rx0}, tx {tx1 - tx0}); "
              f"downtime {rs['downtime_s']:.1f} s; whole test {time.monotonic() - t0:.0f} s")
    finally:
        serve.terminate()
        serve.communicate(timeout=30)
        if target_vm is not None:
            target_vm.destroy()
        conn_b.close()
        ckpt.remove_clone(hv, source.name)
