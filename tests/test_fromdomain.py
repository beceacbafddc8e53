"""A VM of the user's, end to end (store.fromdomain, vm.install, cli.agent, store.chain): a domain the
clone machinery never defined (plain libvirt XML, booted, over a copy of the guest image's disk
whose baked-in agent and its autostart entry are deleted) gets `agent install`, `checkpoint create
--domain`, migrates A → B with its capture through pynput, works a little, and migrates B → A
against the next common checkpoint; both verified. The way back is measured against what the same
migration would have cost against the first checkpoint (``bench.roundtrip``, which ``make bench``
runs on a clone of the project's image)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import CLONE_PREFIX

from bench.roundtrip import round_trip
from cli.main import main
from cli.migrate import state_comparison
from migration.sides import SourceSide
from replay_migrate.errors import CheckpointError
from store import checkpoint as ckpt
from store.fromdomain import check_clonable, saved_xml
from store.vmstate import VmState
from vm import install
from vm.machine import Hypervisor, Machine, MachineState
from vm.spec import VirtType, emulator_path

DOMAIN = f"{CLONE_PREFIX}own"
CHECKPOINT = f"{CLONE_PREFIX}own-ck"
BOOT_S = 300.0
"""A TCG boot to the desktop on a loaded 2-core host (~35-75 s alone)."""

XML = """<domain type='{virt}'>
  <name>{name}</name>
  <memory unit='MiB'>1024</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>root=/dev/vda ro console=ttyS0 video=1280x800 quiet</cmdline>
  </os>
  <features><acpi/></features>
  {cpu}
  <clock offset='utc'/>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <input type='keyboard' bus='ps2'/>
    <input type='tablet' bus='virtio'/>
    <graphics type='vnc' listen='127.0.0.1' autoport='yes'/>
    <video><model type='vga' vram='16384' heads='1'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""
"""A domain as a user would define it: a pty console, libvirt's own socket paths, no recorder channel."""

def debugfs_rm_tree(image: Path, path: str) -> list[str]:
    """debugfs commands that delete ``path`` (a file or a folder, recursively) in an ext4 image."""
    out = subprocess.run(["debugfs", "-R", f"ls -p {path}", str(image)], capture_output=True, text=True,
                         check=True).stdout
    cmds: list[str] = []
    entries = [line.split("/") for line in out.splitlines() if line.startswith("/")]
    if not entries:
        return [f"rm {path}"]
    for e in entries:
        name, mode = e[5], int(e[2], 8)
        if name in (".", ".."):
            continue
        child = f"{path}/{name}"
        cmds += debugfs_rm_tree(image, child) if mode & 0o040000 else [f"rm {child}"]
    return [*cmds, f"rmdir {path}"]


def users_disk(base: Path, folder: Path) -> Path:
    """A copy of the image's disk (one standalone qcow2, as a user's is) without the baked-in agent:
    its files and its XDG autostart entry deleted (debugfs on a raw copy, nothing mounted)."""
    raw = folder / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(base), str(raw)], check=True)
    cmds = [f"rm {install.AUTOSTART}", *debugfs_rm_tree(raw, install.GUEST_LIB)]
    (folder / "rm.cmds").write_text("\n".join(cmds) + "\n")
    r = subprocess.run(["debugfs", "-w", "-f", str(folder / "rm.cmds"), str(raw)], capture_output=True, text=True)
    assert r.returncode == 0 and "not found" not in r.stderr, r.stderr
    disk = folder / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(disk)], check=True)
    raw.unlink()
    return disk


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.mark.vm
@pytest.mark.timeout(1800)
def test_own_vm_installed_checkpointed_and_migrated_there_and_back(
        hv: Hypervisor, checkpoint: ckpt.Checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = checkpoint.image
    virt = VirtType(checkpoint.manifest.virt)
    disk = users_disk(image.base, tmp_path)
    dom = hv.conn.defineXML(XML.format(virt=virt.value, name=DOMAIN, kernel=image.kernel, initrd=image.initrd,
                                       cpu=virt.cpu_xml(), disk=disk))
    names = [DOMAIN, f"{DOMAIN}-b", f"{DOMAIN}-a", f"{DOMAIN}-c0"]
    try:
        dom.create()
        m = hv.lookup(DOMAIN)
        m.wait_agent(timeout=BOOT_S)
        # the guest agent answers before X is up: wait for the display, then for the session's apps
        r = m.exec("until xdotool getdisplaygeometry >/dev/null 2>&1; do sleep 0.5; done; "
                   "xdotool search --sync --onlyvisible --class Notepad >/dev/null && echo up", timeout=BOOT_S)
        assert r.stdout == "up\n", r
        before = install.probe(m)
        assert before.agent_pids == [] and m.recorder_channel() is None     # no agent, no channel
        assert m.exec(f"test -e {install.AUTOSTART} || test -e {install.GUEST_LIB}").exit_code == 1

        # 1. agent install: files, autostart, channel hot-plugged, started in the session now
        out = cli_json(capsys, "agent", "install", DOMAIN)
        assert out["agent"]["connected"] and out["agent"]["backend"] == "pynput-xorg", out
        assert out["channel"] == {"live": True, "persistent": True} and out["user"] == "root", out
        assert m.exec(f"test -e {install.AUTOSTART}").exit_code == 0
        status = cli_json(capsys, "agent", "status", DOMAIN)
        assert status["installed"]["version"] == out["version"] and len(status["running_pids"]) == 1, status

        # 2. checkpoint create --domain: saved, restarted as its clone under its own name and UUID
        uuid = m.dom.UUIDString()
        assert main(["checkpoint", "create", CHECKPOINT, "--domain", DOMAIN]) == 0, capsys.readouterr().err
        ck0 = ckpt.get(CHECKPOINT)
        man = ck0.manifest
        assert (man.origin, man.base["path"], man.virt) == ("domain", str(disk), virt.value)
        assert len(man.base["blake3"]) == 64 and man.log_resume >= 1 and man.log_origin_us > 0
        m = hv.lookup(DOMAIN)
        assert m.state is MachineState.RUNNING and m.dom.UUIDString() == uuid and not m.persistent
        assert ckpt.clones_of(CHECKPOINT) == [DOMAIN] and (ck0.dir / "domain.xml").is_file()

        # 3. A → B, verified, the capture through pynput; B works a little; B → A against the next
        # common checkpoint, verified; the way back measured against the first checkpoint too
        same, compare = state_comparison()
        backends: list[str] = []

        def then(src: SourceSide, state: VmState) -> None:
            compare(src, state)
            assert src.link.hello is not None
            backends.append(src.link.hello.backend)

        def at_b(m_b: Machine) -> None:
            c1 = ckpt.get((ckpt.clone_dir(names[1]) / "checkpoint").read_text().strip())
            assert c1.manifest.parent == CHECKPOINT and c1.manifest.log_resume > man.log_resume
            assert m_b.exec("cat /root/trip.txt").stdout == "from-a\n"

        rt, m_a = round_trip(hv, ck0, m, tmp_path, names[1:], at_b=at_b, then=then)
        with capsys.disabled():     # the measurement, in the test's output
            print(f"\nthere: {rt.there} wire bytes; back against {rt.next_checkpoint}: {rt.back}; "
                  f"back against {CHECKPOINT} would have been {rt.back_against_first}")
        assert same == [True, True, True, True] and backends == ["pynput-xorg", "pynput-xorg"]
        assert m_a.exec("cat /root/trip.txt").stdout == "from-a\nfrom-b\n"
        c2 = ckpt.get((ckpt.clone_dir(names[2]) / "checkpoint").read_text().strip())
        assert c2.manifest.parent == rt.next_checkpoint and c2.manifest.depth == 2
        assert rt.back < rt.back_against_first

        # 6. agent remove undoes the install
        assert main(["agent", "remove", names[2]]) == 0
        st = cli_json(capsys, "agent", "status", names[2])
        assert st["installed"] is None and st["running_pids"] == [] and not st["channel"]["live"], st
    finally:
        for n in names:
            ckpt.remove_clone(hv, n)
        if hv.exists(DOMAIN):
            hv.lookup(DOMAIN).remove()
        for ck in sorted(ckpt.list_all(), key=lambda c: -len(c.name)):
            if ck.name.startswith(CHECKPOINT[:-3]):
                shutil.rmtree(ck.dir, ignore_errors=True)


def test_the_test_disk_loses_exactly_the_agent(tmp_path: Path) -> None:
    """debugfs_rm_tree deletes a folder bottom up (what users_disk relies on), on a small ext4."""
    img = tmp_path / "fs.img"
    tree = tmp_path / "tree"
    (tree / "usr/local/lib/rm/sub").mkdir(parents=True)
    (tree / "usr/local/lib/rm/sub/a.py").write_text("a")
    (tree / "usr/local/lib/rm/b.py").write_text("b")
    (tree / "keep").write_text("k")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(img), "8M"], check=True)
    cmds = debugfs_rm_tree(img, "/usr/local/lib/rm")
    assert cmds[-1] == "rmdir /usr/local/lib/rm" and "rm /usr/local/lib/rm/sub/a.py" in cmds
    (tmp_path / "c").write_text("\n".join(cmds) + "\n")
    subprocess.run(["debugfs", "-w", "-f", str(tmp_path / "c"), str(img)], check=True, capture_output=True)
    listing = subprocess.run(["debugfs", "-R", "ls -p /usr/local/lib", str(img)], capture_output=True,
                             text=True, check=True).stdout
    assert not re.search(r"/rm/", listing)
    assert "keep" in subprocess.run(["debugfs", "-R", "ls -p /", str(img)], capture_output=True, text=True).stdout


LIVE = XML.format(virt="kvm", name=DOMAIN, kernel="/srv/img/vmlinuz", initrd="/srv/img/initrd.img",
                  cpu="<cpu mode='host-passthrough'/>", disk="/srv/vms/desktop.qcow2").replace(
    "<channel type='unix'><target", "<channel type='unix'><source mode='bind' path='/run/libvirt/qemu/ga.sock'/><target"
).replace("<devices>", f"<devices><emulator>{emulator_path()}</emulator>").replace(
    "</name>", "</name><uuid>0761aacb-5b2d-4e8f-bf94-2e3365633b0b</uuid>").replace(
    "</devices>", "</devices><seclabel type='dynamic' model='dac' relabel='yes'><label>+64:+64</label></seclabel>")
"""The test's domain as libvirt shows it running: its emulator, the agent socket it made, a label."""


def test_a_domain_whose_clone_restores_is_accepted(tmp_path: Path) -> None:
    check_clonable(LIVE, DOMAIN, tmp_path / "d.qcow2")


@pytest.mark.parametrize(("change", "why"), [
    (("<memballoon", "<interface type='network'><source network='default'/></interface><memballoon"), "interface"),
    (("<os>", "<os firmware='efi'>"), "firmware"),
    (("<input type='keyboard'", "<hostdev mode='subsystem' type='usb'/><input type='keyboard'"), "hostdev"),
])
def test_a_domain_whose_clone_would_be_refused_is_refused_before_it_stops(
        tmp_path: Path, change: tuple[str, str], why: str) -> None:
    with pytest.raises(CheckpointError, match=f"cannot run as a clone here: .*{why}"):
        check_clonable(LIVE.replace(*change, 1), DOMAIN, tmp_path / "d.qcow2")


def test_the_saved_xml_has_no_dynamic_label() -> None:
    assert "seclabel" in LIVE and "seclabel" not in saved_xml(LIVE)
    static = LIVE.replace("type='dynamic'", "type='static'")
    assert "seclabel" in saved_xml(static)
