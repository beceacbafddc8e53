"""A VM of the user's, end to end (store.fromdomain, vm.install, cli.agent, store.chain): a domain the
clone machinery never defined (plain libvirt XML, booted, over a copy of the guest image's disk
whose baked-in agent and its autostart entry are deleted) gets `agent install`, `checkpoint create
--domain`, migrates A → B with its capture through pynput, works a little, and migrates B → A
against the next common checkpoint; both verified. The way back is measured against what the same
migration would have cost against the first checkpoint: a clone of it replays both logs (what a
target holding only that checkpoint would do) and the protocol runs dry against its state."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import CLONE_PREFIX

from cli.main import main
from cli.migrate import migrate_embedded, state_comparison
from migration.sides import SourceSide, TargetSide
from recorder.logformat import LogDecoder
from replayer.drive import drive
from replayer.link import RecorderLink
from replayer.logfeed import EventFeed, LogPump
from replayer.replay import ReplayConfig, Replayer
from replayer.workload import parse_workload
from store import chain
from store import checkpoint as ckpt
from store.vmstate import DISK, VmState, checkpoint_trees, sync_states
from vm import install
from vm.machine import Hypervisor, MachineState, create_overlay
from vm.spec import VirtType

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

AT_A = """
click 250 400
type "echo from-a > /root/trip.txt && seq 1 500 > /root/a.txt; sync\\n"
wait 2
"""
AT_B = """
click 250 400
type "echo from-b >> /root/trip.txt; sync\\n"
wait 2
"""


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


def keep_log(frames: list[bytes]) -> Callable[[SourceSide, TargetSide], None]:
    """An ``on_started`` hook that keeps a copy of every log frame the source sends."""
    def hook(src: SourceSide, tgt: TargetSide) -> None:
        send = src.client.send_log

        async def copy(data: bytes) -> int:
            frames.append(bytes(data))
            return await send(data)

        src.client.send_log = copy        # type: ignore[method-assign]
    return hook


def keep_state(kept: dict[str, Any], folder: Path) -> Callable[[SourceSide, VmState], None]:
    """An ``on_verified`` hook that also keeps the source's saved state (hard links: it is moved into the
    next checkpoint and its overlay deleted at release) and the verified trees."""
    same, compare = state_comparison()
    kept["same"] = same

    def hook(src: SourceSide, state: VmState) -> None:
        compare(src, state)
        assert src.state_files is not None
        for what, p in (("memory", src.state_files.memory), ("disk", src.state_files.disk)):
            link = folder / f"kept-{what}{p.suffix}"
            os.link(p, link)
            kept[what] = link
    return hook


def back_against_first(hv: Hypervisor, first: ckpt.Checkpoint, logs: list[list[bytes]], state_b: VmState,
                       trees_b: dict[str, Any], folder: Path) -> int:
    """What the way back would have cost against ``first``: its clone replays both logs as a target
    would (the log since the first checkpoint), and the protocol runs dry from B's saved state (its disk
    rebuilt over the first checkpoint's) to that clone's: walk and blocks, plus both logs."""
    m0 = first.manifest
    log = [*logs[0][:-1], *[f for f in logs[1][1:-1]], logs[1][-1]]      # one log: header .. both .. end
    # the second log's end frame follows the first's frames: renumber nothing, the seqs already join
    pump = LogPump(decoder=LogDecoder(resume_at=m0.log_resume, origin_us=m0.log_origin_us))
    feed = EventFeed(pump)
    for data in log:
        feed.put(data)
    feed.end()
    name = f"{CLONE_PREFIX}own-c0"
    m = ckpt.start_clone(hv, first, name)
    try:
        with RecorderLink(m) as link:
            link.open()
            Replayer(m, link, ReplayConfig(sync_timeout_s=20)).replay(feed)
        m.fsfreeze()
        m.pause()
        image = ckpt.clone_dir(name) / "suspend.sav"
        m.save(image)
        replayed = VmState(image, ckpt.clone_dir(name) / "disk.qcow2", first)
        flat = folder / "b-over-first.qcow2"
        create_overlay(flat, first.disk)
        first_trees = checkpoint_trees(first)
        c1 = ckpt.get(state_b.checkpoint.name)
        chain._write_differing(flat, state_b.disk, trees_b[DISK], first_trees.disk, checkpoint_trees(c1))
        stats, _ = sync_states(VmState(state_b.memory, flat, first), replayed, dry_run=True)
    finally:
        ckpt.remove_clone(hv, name)
    return stats.wire_total + sum(len(f) for f in log)


@pytest.mark.vm
def test_own_vm_installed_checkpointed_and_migrated_there_and_back(
        hv: Hypervisor, checkpoint: ckpt.Checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = checkpoint.image
    virt = VirtType(checkpoint.manifest.virt)
    disk = users_disk(image.base, tmp_path)
    dom = hv.conn.defineXML(XML.format(virt=virt.value, name=DOMAIN, kernel=image.kernel, initrd=image.initrd,
                                       cpu=virt.cpu_xml(), disk=disk))
    names = [DOMAIN, f"{DOMAIN}-b", f"{DOMAIN}-a"]
    try:
        dom.create()
        m = hv.lookup(DOMAIN)
        m.wait_agent(timeout=BOOT_S)
        r = m.exec("xdotool search --sync --onlyvisible --class Notepad >/dev/null && echo up", timeout=BOOT_S)
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

        # 3. A → B, verified, the capture through pynput
        logs: list[list[bytes]] = [[], []]
        kept: list[dict[str, Any]] = [{}, {}]
        with Hypervisor() as hv2:
            hello: list[str] = []

            def started(src: SourceSide, tgt: TargetSide, n: int) -> None:
                keep_log(logs[n])(src, tgt)

            async def at_a() -> None:
                await asyncio.to_thread(drive, m, parse_workload(AT_A))

            (tmp_path / "a").mkdir()
            report1, src1, _ = asyncio.run(migrate_embedded(
                hv, hv2, m, ck0, names[1], user=at_a, replay=ReplayConfig(sync_timeout_s=20),
                on_verified=keep_state(kept[0], tmp_path / "a"), on_started=lambda s, t: started(s, t, 0)))
            assert src1.link.hello is not None
            hello.append(src1.link.hello.backend)
            r1 = report1.as_dict()
            assert r1["verified"] and kept[0]["same"] == [True, True], r1
            assert hello == ["pynput-xorg"]
            c1 = ckpt.get(r1["next_checkpoint"])
            assert c1.manifest.parent == CHECKPOINT and c1.manifest.log_resume > man.log_resume
            m_b = hv.lookup(names[1])
            assert (ckpt.clone_dir(names[1]) / "checkpoint").read_text().strip() == c1.name
            assert m_b.exec("cat /root/trip.txt").stdout == "from-a\n"

            # 4. B works a little, then B → A against the next common checkpoint
            async def at_b() -> None:
                await asyncio.to_thread(drive, m_b, parse_workload(AT_B))

            (tmp_path / "b").mkdir()
            report2, src2, _ = asyncio.run(migrate_embedded(
                hv, hv2, m_b, c1, names[2], user=at_b, replay=ReplayConfig(sync_timeout_s=20),
                on_verified=keep_state(kept[1], tmp_path / "b"), on_started=lambda s, t: started(s, t, 1)))
        r2 = report2.as_dict()
        assert r2["verified"] and kept[1]["same"] == [True, True], r2
        m_a = hv.lookup(names[2])
        assert m_a.exec("cat /root/trip.txt").stdout == "from-a\nfrom-b\n"
        # the way back replayed only what was done at B: its log starts after the first one's frames
        assert len(logs[1]) < len(logs[0]) + len(logs[1]) - 1
        c2 = ckpt.get(r2["next_checkpoint"])
        assert c2.manifest.backing == c1.name and c2.manifest.depth == 2

        # 5. what the way back would have cost against the first checkpoint
        assert src2._verified is not None
        state_b = VmState(kept[1]["memory"], kept[1]["disk"], c1)
        against_first = back_against_first(hv, ck0, logs, state_b, src2._verified[1], tmp_path)
        print(f"\nthere: {r1['wire_bytes']} wire bytes; back against {c1.name}: {r2['wire_bytes']}; "
              f"back against {CHECKPOINT} would have been {against_first}")
        assert r2["wire_bytes"] < against_first

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
