"""Domain XML from the template, and a clone's identity rewrite (no libvirt needed)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from replay_migrate.errors import ImageError, UsageError
from vm.spec import (
    RECORDER_CHANNEL,
    DomainSpec,
    GuestImage,
    VirtType,
    check_kernel_args,
    clone_xml,
    domain_name,
)


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


def test_kernel_args_are_appended_to_the_command_line(tmp_path: Path) -> None:
    plain = ET.fromstring(spec(tmp_path).xml()).findtext("os/cmdline")
    assert plain is not None and plain.startswith("root=/dev/vda ")
    s = DomainSpec(name="rm-x", image=GuestImage(tmp_path / "img", "abc"), disk=tmp_path / "d.qcow2",
                   run_dir=tmp_path / "run", kernel_args=("norandmaps", "init_on_free=1"))
    assert ET.fromstring(s.xml()).findtext("os/cmdline") == plain + " norandmaps init_on_free=1"


@pytest.mark.parametrize("arg", ["", "a b", "x</cmdline>", "'q'", '"q"', "a&b", "-x", "a" * 65, "\n"])
def test_kernel_args_that_could_change_the_xml_or_split_are_refused(arg: str) -> None:
    with pytest.raises(UsageError, match="not a plain kernel argument"):
        check_kernel_args(["quiet", arg])
    with pytest.raises(UsageError, match="at most"):
        check_kernel_args(["quiet"] * 17)
    assert check_kernel_args(["norandmaps", "init_on_free=1", "a.b-c:d,e_f"]) == (
        "norandmaps", "init_on_free=1", "a.b-c:d,e_f")


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


def test_clone_xml_rejects_garbage(tmp_path: Path) -> None:
    with pytest.raises(ImageError):
        clone_xml("<domain", "x", tmp_path, tmp_path)
    with pytest.raises(ImageError, match="no uuid"):
        clone_xml("<domain><name>a</name></domain>", "x", tmp_path, tmp_path)


def test_guest_image_check_names_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"base\.qcow2"):
        GuestImage(tmp_path, "x").check()
