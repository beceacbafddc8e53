"""What a domain is made of, as data: the guest image, the virtualisation type, a domain spec.

The XML template lives in ``vm-images/domain.xml``; this module fills it and edits the XML of a
saved domain for a clone. Kept free of libvirt calls so it is tested without a daemon.
"""

from __future__ import annotations

import enum
import re
import shutil
import string
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from replay_migrate.errors import ImageError

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "vm-images" / "domain.xml"
RECORDER_CHANNEL = "org.replaymigrate.log.0"
"""virtio-serial port name of the recorder agent (``/dev/virtio-ports/<name>`` in the guest)."""
AGENT_CHANNEL = "org.qemu.guest_agent.0"
SCREEN = (1280, 800)
"""The guest's fixed screen size (vm-images/overlay/etc/X11/xorg.conf.d/10-guest.conf)."""


class VirtType(enum.Enum):
    """How the guest's CPU runs: hardware KVM, or QEMU's TCG emulator where KVM cannot run it."""

    KVM = "kvm"
    TCG = "qemu"

    def cpu_xml(self) -> str:
        if self is VirtType.KVM:
            # arch-capabilities is refused by some nested KVMs and is not needed by the guest
            return ("<cpu mode='host-passthrough'>"
                    "<feature policy='disable' name='arch-capabilities'/></cpu>")
        return "<cpu mode='maximum'/>"


@dataclass(frozen=True)
class GuestImage:
    """A built guest image folder: base.qcow2, vmlinuz, initrd.img (see vm-images/build-image.sh)."""

    dir: Path
    recipe_hash: str

    @property
    def base(self) -> Path:
        return self.dir / "base.qcow2"

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    def check(self) -> None:
        """Raise ImageError unless every file of the image is there."""
        for p in (self.base, self.kernel, self.initrd):
            if not p.is_file():
                raise ImageError(f"guest image {self.dir}: {p.name} is missing")


@dataclass(frozen=True)
class DomainSpec:
    """Everything needed to define one domain of ours; per-domain files live in ``run_dir``."""

    name: str
    image: GuestImage
    disk: Path
    run_dir: Path
    virt: VirtType = VirtType.TCG
    memory_mib: int = 1024
    vcpus: int = 1

    @property
    def serial_log(self) -> Path:
        return self.run_dir / "serial.log"

    @property
    def recorder_socket(self) -> Path:
        return self.run_dir / "recorder.sock"

    def xml(self) -> str:
        emulator = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
        text = TEMPLATE.read_text()
        text = re.sub(r"<!--.*?-->\s*", "", text, flags=re.S)
        return string.Template(text).substitute(
            virt_type=self.virt.value, name=self.name, memory_mib=self.memory_mib,
            vcpus=self.vcpus, kernel=self.image.kernel, initrd=self.image.initrd,
            cpu=self.virt.cpu_xml(), emulator=emulator, disk=self.disk,
            serial_log=self.serial_log, recorder_socket=self.recorder_socket,
            recorder_channel=RECORDER_CHANNEL)


def clone_xml(saved_xml: str, name: str, disk: Path, run_dir: Path, *, uuid_: str | None = None) -> str:
    """The saved domain's XML with a clone's identity: name, a new UUID (or ``uuid_``: a user's
    domain restarted as a clone keeps its own), its own disk overlay, serial log and recorder
    socket; the guest agent's socket path is dropped so libvirt makes a new one. Everything the
    guest sees (devices, CPU, memory) stays as saved. The first serial port becomes a log file in
    the clone's folder (a user's domain may have a pty there: the folder is how a clone is known)."""
    try:
        root = ET.fromstring(saved_xml)
    except ET.ParseError as e:
        raise ImageError(f"the saved domain XML does not parse: {e}") from e
    spec = DomainSpec(name=name, image=GuestImage(run_dir, ""), disk=disk, run_dir=run_dir)

    def one(path: str) -> ET.Element:
        el = root.find(path)
        if el is None:
            raise ImageError(f"the saved domain XML has no {path}")
        return el

    one("name").text = name
    one("uuid").text = uuid_ or str(uuid.uuid4())
    disk_el = one("devices/disk[@device='disk']")
    one("devices/disk[@device='disk']/source").set("file", str(disk))
    for bs in disk_el.findall("backingStore"):
        disk_el.remove(bs)
    devices = one("devices")
    serial = root.find("devices/serial")
    if serial is None:
        serial = ET.SubElement(devices, "serial")
        ET.SubElement(serial, "target", port="0")
    if serial.get("type") != "file":
        serial.set("type", "file")
        for console in root.findall("devices/console"):
            target = console.find("target")
            if target is None or target.get("type", "serial") == "serial":
                devices.remove(console)      # libvirt makes it again from the serial port
    source = serial.find("source")
    if source is None:
        source = ET.Element("source")
        serial.insert(0, source)
    source.attrib.clear()
    source.set("path", str(spec.serial_log))
    for ch in root.findall("devices/channel"):
        target = ch.find("target")
        src = ch.find("source")
        tname = target.get("name") if target is not None else None
        if tname == RECORDER_CHANNEL and src is not None:
            src.set("path", str(spec.recorder_socket))
        elif tname == AGENT_CHANNEL and src is not None:
            ch.remove(src)
    return ET.tostring(root, encoding="unicode")


def domain_name(xml: str) -> str:
    """The <name> of a domain XML."""
    el = ET.fromstring(xml).find("name")
    if el is None or not el.text:
        raise ImageError("domain XML has no name")
    return el.text
