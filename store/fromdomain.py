"""A checkpoint of a running domain of the user's, which then runs on as a clone of it.

``create_from_domain(hv, NAME, DOMAIN)``:

1. checks what it can take: one disk, a qcow2 file (not raw, not a block device or network disk,
   not two disks), no UEFI variable store, no snapshots, a guest agent that answers, the recorder
   channel in the running domain (``replay-migrate agent install``), no job (a libvirt migration or
   save) and no ``record --to`` running (the caller checks the agent answers), and only devices a
   clone's restore accepts (``vm.spec.check_saved_domain``: no network interface, host device or
   firmware yet);
2. quiesces and saves it: ``sync``, a freeze/thaw (file systems flushed, journal clean), a pause,
   where its recorder agent's log stands (``LogCut``: the frames so far are in the state, and a
   migration from the checkpoint must not replay them again), then the sparse save of its memory,
   which stops it;
3. makes the checkpoint: the domain's disk image becomes the read-only base (identified in the
   manifest by its path, size, mtime and the blake3 of its bytes), the checkpoint's ``disk.qcow2`` an
   empty overlay over it, ``memory.sav`` the save (its header holds the domain's machine XML: the
   clone machinery rewrites identities there), the virt type and memory size from the XML, the
   persistent definition kept as ``domain.xml``;
4. undefines the old persistent definition, which names the disk that must never be written again
   (``domain.xml`` has it), and restarts the VM as a clone of the checkpoint under its own name and
   UUID (restore, seconds), so it runs on and records against the checkpoint.

If the clone does not start, the VM is defined again and restored from its save as it was (its disk
untouched), and the checkpoint removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Protocol

import blake3
import libvirt

from replay_migrate.errors import CheckpointError, ImageError, ReplayMigrateError, VMError
from replay_migrate.files import atomic_write
from replay_migrate.sparse import sparse_copy
from store import checkpoint as ckpt
from store.paths import checkpoint_path
from vm.machine import Hypervisor, Machine, MachineState, create_overlay, file_allocated
from vm.spec import Boot, VirtType, check_saved_domain, clone_xml

log = logging.getLogger("replay_migrate.fromdomain")
HASH_CHUNK = 8 << 20


def base_digest(path: Path) -> str:
    """blake3 of a file's bytes (the base image's identity; ~1 s per GiB here)."""
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return str(h.hexdigest())


def the_disk(xml: str, domain: str) -> Path:
    """The domain's one disk, if it is a qcow2 file; CheckpointError naming what it cannot take."""
    root = ET.fromstring(xml)
    disks = root.findall("devices/disk[@device='disk']")
    if len(disks) != 1:
        raise CheckpointError(f"{domain!r} has {len(disks)} disks: a checkpoint takes a domain with exactly one")
    d = disks[0]
    driver = d.find("driver")
    fmt = (driver.get("type") if driver is not None else None) or "raw"
    src = d.find("source")
    if d.get("type") != "file" or src is None or not src.get("file"):
        raise CheckpointError(f"{domain!r}'s disk is a {d.get('type')} disk: a checkpoint takes a qcow2 file")
    if fmt != "qcow2":
        raise CheckpointError(f"{domain!r}'s disk {src.get('file')} is {fmt}, not qcow2: convert it "
                              "(qemu-img convert -O qcow2) and point the domain at the copy")
    if root.find("os/nvram") is not None:
        raise CheckpointError(f"{domain!r} keeps UEFI variables in an NVRAM file, which a checkpoint does not "
                              "carry yet")
    return Path(str(src.get("file")))


def saved_xml(live: str) -> str:
    """A running domain's migratable XML as its save image's header will have it: without the
    dynamic security labels, which libvirt leaves out of a save."""
    root = ET.fromstring(live)
    for label in root.findall("seclabel"):
        if label.get("type") == "dynamic":
            root.remove(label)
    return ET.tostring(root, encoding="unicode")


def check_domain(hv: Hypervisor, m: Machine) -> Path:
    """Everything ``create_from_domain`` refuses, before anything is touched; the disk's path."""
    if m.state is not MachineState.RUNNING:
        raise VMError(f"{m.name!r} is {m.state.value}: a checkpoint is taken of a running domain")
    disk = the_disk(m.xml, m.name)
    try:
        job = m.dom.jobInfo()[0]
        snapshots = m.dom.snapshotNum(0)
    except libvirt.libvirtError as e:
        raise VMError(f"{m.name!r}: {e.get_error_message()}") from e
    if job != libvirt.VIR_DOMAIN_JOB_NONE:
        raise CheckpointError(f"{m.name!r} has a job running (a migration or a save): wait for it to end")
    if snapshots:
        raise CheckpointError(f"{m.name!r} has {snapshots} libvirt snapshots: a checkpoint takes a domain without")
    try:
        m.wait_agent(timeout=10)
    except VMError:
        raise CheckpointError(f"{m.name!r} has no QEMU guest agent answering (the checkpoint freezes its file "
                              "systems through it): install qemu-guest-agent in the guest") from None
    if m.recorder_channel() is None:
        raise CheckpointError(f"{m.name!r} has no recorder channel: `replay-migrate agent install {m.name}` first")
    check_clonable(str(m.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE)),
                   m.name, disk)
    return disk


def check_clonable(live: str, domain: str, disk: Path) -> None:
    """CheckpointError unless a clone of the domain (its running XML ``live``) passes what its
    restore checks (``vm.spec.check_saved_domain``): said before the domain is stopped."""
    saved = saved_xml(live)
    try:
        check_saved_domain(clone_xml(saved, domain, disk, ckpt.clone_dir(domain)), Boot.of(saved))
    except ImageError as e:
        raise CheckpointError(f"{domain!r} cannot run as a clone here: {e}") from None


class LogCut(Protocol):
    """Where the recorder agent's log stands in the saved state (the caller reads the recorder channel:
    ``cli`` does, with ``replayer.link``)."""

    def open(self, m: Machine) -> None:
        """Attach to the agent while the domain runs (before it is frozen)."""
        ...

    def cut(self) -> tuple[int, int]:
        """With the domain paused: (first log frame the agent has not made, the log's clock origin)."""
        ...


def create_from_domain(hv: Hypervisor, name: str, domain: str, agent_log: LogCut) -> tuple[ckpt.Checkpoint, Machine]:
    """Checkpoint ``name`` of running domain ``domain``, which then runs on as a clone of it (see the
    module docstring). Returns the checkpoint and the running clone. ``agent_log`` says where the agent's
    log stands when it is saved (the frames before are in the checkpoint: ``Manifest.log_resume``)."""
    ck = ckpt.Checkpoint(checkpoint_path(name))
    if ck.dir.exists():
        raise CheckpointError(f"checkpoint {name!r} exists already (checkpoint rm {name})")
    m = hv.lookup(domain)
    disk = check_domain(hv, m)
    ckpt.clone_dir(domain)                 # the clone keeps the domain's name: it must be a plain one
    root = ET.fromstring(m.xml)
    uuid_ = (root.findtext("uuid") or "").strip()
    virt = VirtType.KVM if root.get("type") == "kvm" else VirtType.TCG
    memory_mib = int(root.findtext("memory") or 0) // 1024    # libvirt's XML says KiB
    persistent = m.persistent
    inactive = str(m.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) if persistent else ""
    partial = ck.dir.with_name(name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    log.info("checkpoint %s of %s: quiescing and saving it", name, domain)
    try:
        agent_log.open(m)
        m.exec("sync", timeout=60)
        with m.frozen():
            pass
        (partial / "screen.png").write_bytes(m.screenshot().png())
        m.pause()
        try:
            log_resume, log_origin = agent_log.cut()
        except BaseException:
            m.resume()
            raise
        t0 = time.monotonic()
        m.save(partial / "memory.sav")
        save_s = time.monotonic() - t0
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    # from here the user's VM is stopped, its state in partial/memory.sav: put it back on any failure
    try:
        if inactive:
            atomic_write(partial / "domain.xml", inactive.encode())
        st = disk.stat()
        base = {"path": str(disk), "format": "qcow2", "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "blake3": base_digest(disk)}
        create_overlay(partial / "disk.qcow2", disk)
        os.chmod(disk, st.st_mode & 0o444)    # read-only from now on (root ignores it: a reminder)
        mem_path = partial / "memory.sav"
        ckpt.Manifest(name=name, image_recipe="", image_dir="", virt=virt.value, memory_mib=memory_mib,
                      created=time.time(), boot_to_desktop_s=0.0, save_s=round(save_s, 2),
                      memory_apparent_bytes=mem_path.stat().st_size, memory_allocated_bytes=file_allocated(mem_path),
                      disk_allocated_bytes=file_allocated(partial / "disk.qcow2"), origin=ckpt.ORIGIN_DOMAIN,
                      base=base, log_resume=log_resume, log_origin_us=log_origin).save(partial / "manifest.json")
        partial.rename(ck.dir)
        if persistent and hv.exists(domain):
            # the definition names the base disk, which must never be written again (it is in
            # domain.xml), and the clone takes its name
            hv.lookup(domain).undefine()
        clone = ckpt.start_clone(hv, ck, domain, uuid_=uuid_ or None)
    except BaseException as e:
        _put_back(hv, domain, ck.dir if ck.dir.exists() else partial, e)
        raise
    return ck, clone


def _put_back(hv: Hypervisor, domain: str, folder: Path, why: BaseException) -> None:
    """The clone did not start: restore the user's VM from its save as it was, remove the checkpoint."""
    log.error("checkpoint of %s failed (%s): restoring the VM as it was", domain, why)
    try:
        if hv.exists(domain) and hv.lookup(domain).state is not MachineState.SHUTOFF:
            hv.lookup(domain).destroy()     # a half-started clone
        ckpt.remove_run_dir_of(domain)
        disk_base = ckpt.Manifest.load(folder / "manifest.json").base.get("path") \
            if (folder / "manifest.json").is_file() else None
        if disk_base:
            os.chmod(disk_base, 0o644)
        if (folder / "domain.xml").is_file() and not hv.exists(domain):
            hv.conn.defineXML((folder / "domain.xml").read_text())
        copy = folder / "restore.sav"
        sparse_copy(folder / "memory.sav", copy, replace=True)
        hv.restore(copy, consume=True)
    except ReplayMigrateError as e:
        log.error("could not restore %s: %s (its state is in %s)", domain, e, folder / "memory.sav")
        return
    shutil.rmtree(folder, ignore_errors=True)
