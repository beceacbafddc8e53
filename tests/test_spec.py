"""Domain XML from the template, and a clone's identity rewrite (no libvirt needed)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from replay_migrate.errors import ImageError
from vm.spec import RECORDER_CHANNEL, DomainSpec, GuestImage, VirtType, check_saved_domain, clone_xml, domain_name


def attr(parent: ET.Element, path: str, name: str) -> str | None:
    """Attribute ``name`` of the element at ``path`` under ``parent``, which must be there."""
    el = parent.find(path)
    assert el is not None, f"no {path} in <{parent.tag}>"
    return el.get(name)


def spec(tmp_path: Path, virt: VirtType = VirtType.TCG) -> DomainSpec:
    return DomainSpec(name="rm-x", image=GuestImage(tmp_path / "img", "abc"),
                      disk=tmp_path / "d.qcow2", run_dir=tmp_path / "run", virt=virt)


def test_template_fills_every_field(tmp_path: Path) -> None:
    root = ET.fromstring(spec(tmp_path).xml())
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "rm-x"
    assert root.findtext("os/kernel") == str(tmp_path / "img" / "vmlinuz")
    assert attr(root, "devices/disk/source", "file") == str(tmp_path / "d.qcow2")
    chans = {attr(c, "target", "name"): c for c in root.findall("devices/channel")}
    assert attr(chans[RECORDER_CHANNEL], "source", "path") == str(tmp_path / "run" / "recorder.sock")
    assert attr(root, "cpu", "mode") == "maximum"
    assert "$" not in spec(tmp_path).xml()


def test_kvm_uses_host_cpu_without_arch_capabilities(tmp_path: Path) -> None:
    root = ET.fromstring(spec(tmp_path, VirtType.KVM).xml())
    assert root.get("type") == "kvm"
    cpu = root.find("cpu")
    assert cpu is not None and cpu.get("mode") == "host-passthrough"
    assert attr(cpu, "feature", "name") == "arch-capabilities"


def test_clone_xml_changes_identity_only(tmp_path: Path) -> None:
    saved = spec(tmp_path).xml().replace("<name>", "<uuid>1b4e28ba-2fa1-11d2-883f-0016d3cca427</uuid><name>")
    saved = saved.replace("<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/>",
                          "<channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/channel/"
                          "target/domain-1-rm-x/org.qemu.guest_agent.0'/><target type='virtio' "
                          "name='org.qemu.guest_agent.0'/>")
    out = clone_xml(saved, "rm-y", tmp_path / "c.qcow2", tmp_path / "crun")
    root = ET.fromstring(out)
    assert domain_name(out) == "rm-y"
    assert root.findtext("uuid") not in (None, "1b4e28ba-2fa1-11d2-883f-0016d3cca427")
    assert attr(root, "devices/disk/source", "file") == str(tmp_path / "c.qcow2")
    assert attr(root, "devices/serial/source", "path") == str(tmp_path / "crun" / "serial.log")
    for ch in root.findall("devices/channel"):
        name = attr(ch, "target", "name")
        src = ch.find("source")
        if name == RECORDER_CHANNEL:
            assert src is not None and src.get("path") == str(tmp_path / "crun" / "recorder.sock")
        else:
            assert src is None   # libvirt makes a fresh agent socket path
    assert root.findtext("memory") == ET.fromstring(saved).findtext("memory")
    cloned = clone_xml(LIVE, "rm-y", tmp_path / "c.qcow2", tmp_path / "crun")
    console = ET.fromstring(cloned).find("devices/console/source")
    assert console is not None and console.get("path") == str(tmp_path / "crun" / "serial.log")


def test_clone_xml_rejects_garbage(tmp_path: Path) -> None:
    with pytest.raises(ImageError):
        clone_xml("<domain", "x", tmp_path, tmp_path)
    with pytest.raises(ImageError, match="no uuid"):
        clone_xml("<domain><name>a</name></domain>", "x", tmp_path, tmp_path)


def test_guest_image_check_names_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"base\.qcow2"):
        GuestImage(tmp_path, "x").check()


# ---- check_saved_domain: what a checkpoint from another site may ask libvirt to run ---------------
IMAGE = GuestImage(Path("/cache/images/0123456789abcdef"), "0123456789abcdef")
EMULATOR = "/usr/bin/qemu-system-x86_64"
LIVE = """<domain type='qemu'>
  <name>rm-ckpt-c</name><uuid>0761aacb-5b2d-4e8f-bf94-2e3365633b0b</uuid>
  <memory unit='KiB'>1048576</memory><currentMemory unit='KiB'>1048576</currentMemory>
  <vcpu placement='static'>1</vcpu><resource><partition>/machine</partition></resource>
  <os><type arch='x86_64' machine='pc-q35-10.0'>hvm</type>
    <kernel>/cache/images/0123456789abcdef/vmlinuz</kernel><initrd>/cache/images/0123456789abcdef/initrd.img</initrd>
    <cmdline>root=/dev/vda ro console=ttyS0</cmdline><boot dev='hd'/></os>
  <features><acpi/></features><cpu mode='maximum' check='none'/><clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/state/checkpoints/c.partial/disk.qcow2'/>
      <backingStore type='file'><format type='qcow2'/><source file='/cache/images/0123456789abcdef/base.qcow2'/>
      </backingStore>
      <target dev='vda' bus='virtio'/><address type='pci' domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></disk>
    <controller type='usb' index='0' model='qemu-xhci'><address type='pci' domain='0x0000' bus='0x01'/></controller>
    <controller type='pci' index='1' model='pcie-root-port'><model name='pcie-root-port'/>
      <target chassis='1' port='0x10'/></controller>
    <controller type='virtio-serial' index='0'/>
    <serial type='file'><source path='/state/checkpoints/c.partial/boot/serial.log'/>
      <target type='isa-serial' port='0'><model name='isa-serial'/></target></serial>
    <console type='file'><source path='/state/checkpoints/c.partial/boot/serial.log'/><target type='serial' port='0'/>
    </console>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/></channel>
    <channel type='unix'><source mode='bind' path='/state/checkpoints/c.partial/boot/recorder.sock'/>
      <target type='virtio' name='org.replaymigrate.log.0'/></channel>
    <input type='tablet' bus='virtio'><address type='pci' domain='0x0000' bus='0x05'/></input>
    <input type='mouse' bus='ps2'/>
    <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'><listen type='address' address='127.0.0.1'/>
    </graphics>
    <video><model type='vga' vram='16384' heads='1' primary='yes'/></video>
    <memballoon model='none'/>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
  </devices>
</domain>"""


def test_a_domain_of_ours_passes(tmp_path: Path) -> None:
    check_saved_domain(LIVE, IMAGE, emulator=EMULATOR)
    fresh = DomainSpec(name="rm-x", image=IMAGE, disk=tmp_path / "d.qcow2", run_dir=tmp_path / "run")
    check_saved_domain(fresh.xml(), IMAGE)          # the template, with this host's emulator
    check_saved_domain(clone_xml(LIVE, "rm-y", tmp_path / "c.qcow2", tmp_path / "crun"), IMAGE, emulator=EMULATOR)


@pytest.mark.parametrize(("old", "new", "words"), [
    ("<emulator>/usr/bin/qemu-system-x86_64", "<emulator>/tmp/evil", "emulator is '/tmp/evil'"),
    ("/cache/images/0123456789abcdef/vmlinuz", "/boot/vmlinuz", "kernel is '/boot/vmlinuz'"),
    ("/cache/images/0123456789abcdef/initrd.img<", "/x<", "initrd"),
    ("<domain type='qemu'>", "<!DOCTYPE d [<!ENTITY e 'x'>]><domain type='qemu'>", "DOCTYPE"),
    ("<domain type='qemu'>", "<domain type='xen'>", "root"),
    ("<devices>", "<devices><hostdev mode='subsystem' type='pci'/>", "<hostdev> device"),
    ("<devices>", "<devices><filesystem type='mount'><source dir='/'/><target dir='r'/></filesystem>",
     "<filesystem> device"),
    ("<devices>", "<devices><disk type='file' device='cdrom'><source file='/etc/shadow'/></disk>",
     "not a file-backed disk"),
    ("<disk type='file' device='disk'>", "<disk type='block' device='disk'>", "file-backed disk"),
    ("<source file='/state/checkpoints/c.partial/disk.qcow2'/>",
     "<source file='/x'><dataStore type='file'><source file='/dev/sda'/></dataStore></source>", "data store"),
    ("<serial type='file'>", "<serial type='tcp'>", "serial port that is not a file"),
    ("<target type='isa-serial' port='0'>", "<log file='/etc/cron.d/x'/><target type='isa-serial' port='0'>",
     "<serial><log>"),
    ("<console type='file'><source path='/state/checkpoints/c.partial/boot/serial.log'/>",
     "<console type='file'><source path='/root/.ssh/authorized_keys'/>", "console that is not the serial"),
    ("name='org.qemu.guest_agent.0'", "name='org.replaymigrate.log.0'", "two channels of one name"),
    ("name='org.qemu.guest_agent.0'", "name='com.redhat.spice.0'", "channel other than"),
    ("listen='127.0.0.1'>", "listen='0.0.0.0'>", "VNC on the loopback"),
    ("<listen type='address' address='127.0.0.1'/>", "<listen type='network' network='default'/>",
     "VNC on the loopback"),
    ("<graphics type='vnc'", "<graphics type='vnc' socket='/tmp/s'", "host file"),
    ("/dev/urandom", "/dev/sda", "entropy source"),
    ("<memballoon model='none'/>", "<memballoon model='none'/><audio id='1' type='file' path='/tmp/a.wav'/>",
     "audio"),
    ("<input type='mouse' bus='ps2'/>", "<input type='passthrough' bus='virtio'/>", "input device"),
    ("<boot dev='hd'/>", "<boot dev='hd'/><loader>/tmp/fw.bin</loader>", "<os><loader>"),
    ("<os>", "<os firmware='efi'>", "firmware"),
    ("<vcpu placement='static'>1</vcpu>", "<vcpu>1</vcpu><memoryBacking><source type='file'/></memoryBacking>",
     "<memoryBacking>"),
    ("<partition>/machine</partition>", "<partition>/../../x</partition>", "partition"),
    ("<clock offset='utc'/>", "<clock offset='utc'/><q:commandline xmlns:q='http://libvirt.org/schemas/domain/"
     "qemu/1.0'><q:arg value='-x'/></q:commandline>", "namespace"),
    ("<controller type='virtio-serial' index='0'/>", "<controller type='virtio-serial' index='0'/><serial "
     "type='file'><source path='/x'/></serial>", "2 <serial>"),
])
def test_anything_else_is_refused(old: str, new: str, words: str) -> None:
    assert old in LIVE
    with pytest.raises(ImageError, match=words.replace("(", r"\(")):
        check_saved_domain(LIVE.replace(old, new, 1), IMAGE, emulator=EMULATOR)


def test_garbage_is_an_image_error() -> None:
    for junk in ("", "<domain", "\0"):
        with pytest.raises(ImageError):
            check_saved_domain(junk, IMAGE, emulator=EMULATOR)
