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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from replay_migrate.errors import ImageError, UsageError

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "vm-images" / "domain.xml"
RECORDER_CHANNEL = "org.replaymigrate.log.0"
"""virtio-serial port name of the recorder agent (``/dev/virtio-ports/<name>`` in the guest)."""
AGENT_CHANNEL = "org.qemu.guest_agent.0"
SCREEN = (1280, 800)
"""The guest's fixed screen size (vm-images/overlay/etc/X11/xorg.conf.d/10-guest.conf)."""
KERNEL_ARG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.,:=-]{0,63}")
"""One extra kernel command-line argument (``norandmaps``, ``init_on_free=1``): no spaces, quotes or
XML metacharacters, so it cannot change the domain XML or split into two arguments."""
MAX_KERNEL_ARGS = 16


def check_kernel_args(args: Sequence[str]) -> tuple[str, ...]:
    """``args`` as a tuple, each a plain ``KEY`` or ``KEY=VALUE`` (UsageError otherwise)."""
    if len(args) > MAX_KERNEL_ARGS:
        raise UsageError(f"at most {MAX_KERNEL_ARGS} extra kernel arguments, got {len(args)}")
    for a in args:
        if not KERNEL_ARG.fullmatch(a):
            raise UsageError(f"not a plain kernel argument: {a!r} (letters, digits, _ . , : = -)")
    return tuple(args)


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
class Boot:
    """What a domain boots (``<os><kernel>``, ``<os><initrd>``: absent is None) when it is not a
    guest image of ours: a user's domain, checkpointed at this site (``store.fromdomain``)."""

    kernel: Path | None
    initrd: Path | None

    @classmethod
    def of(cls, xml: str) -> Boot:
        """The boot of domain XML ``xml``."""
        root = ET.fromstring(xml)
        kernel, initrd = root.findtext("os/kernel"), root.findtext("os/initrd")
        return cls(Path(kernel) if kernel else None, Path(initrd) if initrd else None)


def emulator_path() -> str:
    """The QEMU binary the domains of this host run (the one on ``$PATH``)."""
    return shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"


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
    kernel_args: tuple[str, ...] = ()
    """Appended to the guest kernel's command line (checked by :func:`check_kernel_args`)."""

    @property
    def serial_log(self) -> Path:
        return self.run_dir / "serial.log"

    @property
    def recorder_socket(self) -> Path:
        return self.run_dir / "recorder.sock"

    def xml(self) -> str:
        emulator = emulator_path()
        text = TEMPLATE.read_text()
        text = re.sub(r"<!--.*?-->\s*", "", text, flags=re.S)
        return string.Template(text).substitute(
            virt_type=self.virt.value, name=self.name, memory_mib=self.memory_mib,
            vcpus=self.vcpus, kernel=self.image.kernel, initrd=self.image.initrd,
            cpu=self.virt.cpu_xml(), emulator=emulator, disk=self.disk,
            serial_log=self.serial_log, recorder_socket=self.recorder_socket,
            recorder_channel=RECORDER_CHANNEL,
            kernel_args="".join(f" {a}" for a in check_kernel_args(self.kernel_args)))


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
    for console in root.findall("devices/console/source"):
        console.set("path", str(spec.serial_log))    # the alias libvirt keeps of the serial port
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


# ---- what a saved domain may be -------------------------------------------------------------------
TOP_LEVEL = frozenset({"name", "uuid", "memory", "currentMemory", "vcpu", "resource", "os", "features", "cpu",
                       "clock", "on_poweroff", "on_reboot", "on_crash", "devices"})
"""The elements of a domain this project defines (the template plus what libvirt adds)."""
OS_ELEMENTS = frozenset({"type", "kernel", "initrd", "cmdline", "boot"})
DEVICE_CHILDREN: dict[str, frozenset[str]] = {
    "emulator": frozenset(),
    "disk": frozenset({"driver", "source", "target", "address", "alias", "backingStore", "boot"}),
    "controller": frozenset({"model", "target", "address", "alias", "driver"}),
    "serial": frozenset({"source", "target", "alias", "address"}),
    "console": frozenset({"source", "target", "alias"}),
    "channel": frozenset({"source", "target", "address", "alias"}),
    "input": frozenset({"address", "alias"}),
    "graphics": frozenset({"listen"}),
    "video": frozenset({"model", "address", "alias", "driver"}),
    "memballoon": frozenset({"address", "alias", "stats"}),
    "rng": frozenset({"backend", "address", "alias", "rate"}),
    "audio": frozenset(),
}
"""Each device this project's domains have, and the child elements it may carry."""
PATH_ATTRIBUTES = frozenset({"file", "path", "dir", "socket", "filename", "dev"})
"""Attributes that name a file of the host (``dev`` also names guest disks: only in disk/target)."""
REWRITTEN_PATHS = frozenset({("disk", "source", "file"), ("serial", "source", "path"), ("console", "source", "path"),
                             ("channel", "source", "path"), ("disk", "target", "dev")})
"""(device, element, attribute) naming a host path that :func:`clone_xml` rewrites (or, for the
console, libvirt copies from the serial port); no other may appear."""
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
RANDOM_SOURCES = frozenset({"/dev/urandom", "/dev/random"})


def refuse_doctype(xml: str) -> None:
    """ImageError if domain XML from elsewhere has a DOCTYPE or entities (libvirt never writes one):
    before anything parses it."""
    if "<!DOCTYPE" in xml.upper() or "<!ENTITY" in xml.upper():
        raise ImageError("the saved domain XML has a DOCTYPE (libvirt never writes one)")


def check_saved_domain(xml: str, image: GuestImage | Boot, *, emulator: str | None = None) -> None:
    """Refuse (ImageError) a saved domain unless it is one this project would define: a domain
    from another site's checkpoint is restored by libvirt as root, so its XML decides which
    program runs (``<emulator>``), which kernel boots, and which host files the guest reads or
    writes. Accepted: the template's elements and devices (and what libvirt adds to them), the
    emulator of this host, the kernel and initrd of ``image`` (a :class:`Boot`: those a user's
    domain had when this site checkpointed it, or none), the disk, serial log and channels
    that :func:`clone_xml` rewrites, VNC on loopback, ``/dev/urandom`` as the entropy source. Not:
    a DOCTYPE, elements of other XML namespaces (``qemu:commandline``), firmware, host devices,
    file systems, other disks or ports, any other host path."""
    refuse_doctype(xml)
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise ImageError(f"the saved domain XML does not parse: {e}") from None

    def refuse(why: str) -> ImageError:
        return ImageError(f"the saved domain is not one replay-migrate defines: {why}")

    if root.tag != "domain" or root.get("type") not in ("qemu", "kvm"):
        raise refuse("the root is not <domain type='qemu'|'kvm'>")
    for el in root.iter():
        if not isinstance(el.tag, str) or el.tag.startswith("{") or any(a.startswith("{") for a in el.attrib):
            raise refuse(f"an element or attribute of another XML namespace ({str(el.tag)[:80]})")
    extra = sorted({el.tag for el in root} - TOP_LEVEL)
    if extra:
        raise refuse(f"<{extra[0]}> is not an element of ours")
    partition = root.findtext("resource/partition")
    if partition not in (None, "/machine") or [c.tag for c in root.iterfind("resource/*")] not in ([], ["partition"]):
        raise refuse("a resource partition other than /machine")
    os_el = root.find("os")
    if os_el is None:
        raise refuse("no <os>")
    extra = sorted({el.tag for el in os_el} - OS_ELEMENTS)
    if os_el.attrib:
        raise refuse("<os> with attributes (firmware selection)")
    if extra:
        raise refuse(f"<os><{extra[0]}> (only kernel, initrd, cmdline, boot)")
    for tag, want in (("kernel", image.kernel), ("initrd", image.initrd)):
        if os_el.findtext(tag) != (None if want is None else str(want)):
            raise refuse(f"its {tag} is {str(os_el.findtext(tag))[:200]!r}, not this site's {want} (the guest "
                         "image must be at the same path on both sites)")
    devices = root.find("devices")
    if devices is None:
        raise refuse("no <devices>")
    counts: dict[str, int] = {}
    for dev in devices:
        allowed = DEVICE_CHILDREN.get(dev.tag)
        if allowed is None:
            raise refuse(f"a <{dev.tag}> device")
        counts[dev.tag] = counts.get(dev.tag, 0) + 1
        extra = sorted({c.tag for c in dev} - allowed)
        if extra:
            raise refuse(f"<{dev.tag}><{extra[0]}>")
        _check_device(dev, refuse)
        _check_paths(dev, refuse)
    if counts.get("emulator") != 1 or devices.findtext("emulator") != (emulator or emulator_path()):
        raise refuse(f"its emulator is {str(devices.findtext('emulator'))[:200]!r}, not this host's "
                     f"{emulator or emulator_path()}")
    for tag, low, high in (("disk", 1, 1), ("serial", 1, 1), ("console", 0, 1), ("channel", 0, 2)):
        if not low <= counts.get(tag, 0) <= high:
            raise refuse(f"{counts.get(tag, 0)} <{tag}> devices")
    names = [c.find("target").get("name") for c in devices.iter("channel")]  # type: ignore[union-attr]
    if len(set(names)) != len(names):
        raise refuse("two channels of one name")
    serial = devices.find("serial/source")
    console = devices.find("console/source")
    if console is not None and (serial is None or console.get("path") != serial.get("path")):
        raise refuse("a console that is not the serial port")


def _check_paths(dev: ET.Element, refuse: Callable[[str], ImageError]) -> None:
    """Only the host paths :func:`clone_xml` rewrites: on a device's own child (the saved chain
    under ``<backingStore>`` is dropped by it, so its paths are never used)."""
    for attr in PATH_ATTRIBUTES & set(dev.attrib):
        raise refuse(f"<{dev.tag}> names a host file ({attr}=...)")
    for child in dev:
        if child.tag == "backingStore":
            continue
        for attr in PATH_ATTRIBUTES & set(child.attrib):
            if (dev.tag, child.tag, attr) not in REWRITTEN_PATHS:
                raise refuse(f"<{dev.tag}><{child.tag}> names a host file ({attr}=...)")
        for el in child.iter():
            if el is not child and PATH_ATTRIBUTES & set(el.attrib):
                raise refuse(f"<{dev.tag}><{child.tag}><{el.tag}> names a host file")


def _check_device(dev: ET.Element, refuse: Callable[[str], ImageError]) -> None:
    """The per-device rules of :func:`check_saved_domain`."""
    kind = dev.get("type")
    if dev.tag == "disk":
        if kind != "file" or dev.get("device") != "disk":
            raise refuse("a disk that is not a file-backed disk")
        for src in dev.iter("source"):
            if len(src):
                raise refuse("a disk source with children (data store, reservations)")
    elif dev.tag == "serial":
        if kind != "file":
            raise refuse("a serial port that is not a file")
    elif dev.tag == "console":
        if kind not in ("file", "pty") or dev.find("target") is None or dev.find("target").get("type") != "serial":  # type: ignore[union-attr]
            raise refuse("a console other than the serial port")
    elif dev.tag == "channel":
        target = dev.find("target")
        if kind != "unix" or target is None or target.get("type") != "virtio" or \
                target.get("name") not in (RECORDER_CHANNEL, AGENT_CHANNEL):
            raise refuse("a channel other than the recorder's and the guest agent's")
    elif dev.tag == "input":
        if kind not in ("tablet", "mouse", "keyboard") or dev.get("bus") not in ("ps2", "virtio", "usb"):
            raise refuse(f"an input device of type {str(kind)[:40]!r}")
    elif dev.tag == "graphics":
        listens = [dev.get("listen")] + [el.get("address") for el in dev.iter("listen")]
        if kind != "vnc" or any(a not in LOOPBACK for a in listens if a is not None) or \
                any(el.get("type") != "address" for el in dev.iter("listen")):
            raise refuse("graphics other than VNC on the loopback address")
    elif dev.tag == "rng":
        backend = dev.find("backend")
        if backend is None or backend.get("model") != "random" or (backend.text or "").strip() not in RANDOM_SOURCES:
            raise refuse("an entropy source other than /dev/urandom")
    elif dev.tag == "audio":
        if kind != "none":
            raise refuse("an audio back-end other than none")
    elif dev.tag == "emulator" and len(dev):
        raise refuse("an emulator element with children")
