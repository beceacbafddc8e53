"""vm/native.py without a second host: the flags and parameters each variant gives libvirt, the
choice of compression, the post-copy check, the target's XML, and the parsing of libvirt's job
statistics (peer-ish input: bounded). The migration itself is tested against two real libvirt
hosts in tests/test_migration_native.py (libvirt's test driver does not migrate)."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import libvirt
import pytest

from replay_migrate.errors import UsageError
from vm.native import (
    MAX_STAT_BYTES,
    NativeError,
    NativeParams,
    NativeStats,
    Variant,
    choose_compression,
    dest_xml,
    disk_target,
    migrate_flags,
    migrate_params,
    postcopy_unavailable,
)
from vm.spec import AGENT_CHANNEL, RECORDER_CHANNEL, DomainSpec, GuestImage

BASE = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_NON_SHARED_INC


def test_every_variant_is_live_peer_to_peer_and_copies_the_overlay_only() -> None:
    pre = migrate_flags(NativeParams(), None)
    assert pre & BASE == BASE
    assert not pre & libvirt.VIR_MIGRATE_NON_SHARED_DISK           # never the whole chain: the base is at both
    assert not pre & (libvirt.VIR_MIGRATE_POSTCOPY | libvirt.VIR_MIGRATE_COMPRESSED)
    post = migrate_flags(NativeParams(variant=Variant.POSTCOPY), None)
    assert post & libvirt.VIR_MIGRATE_POSTCOPY and post & BASE == BASE
    zstd = migrate_flags(NativeParams(variant=Variant.COMPRESSED), "zstd")
    assert zstd & libvirt.VIR_MIGRATE_COMPRESSED and zstd & libvirt.VIR_MIGRATE_PARALLEL   # multifd
    xbzrle = migrate_flags(NativeParams(variant=Variant.COMPRESSED), "xbzrle")
    assert xbzrle & libvirt.VIR_MIGRATE_COMPRESSED and not xbzrle & libvirt.VIR_MIGRATE_PARALLEL
    with pytest.raises(UsageError):
        migrate_flags(NativeParams(variant=Variant.COMPRESSED), None)
    assert not migrate_flags(NativeParams(peer_to_peer=False), None) & libvirt.VIR_MIGRATE_PEER2PEER


def test_the_parameters_name_the_target_and_the_one_disk() -> None:
    p = migrate_params(NativeParams(), None, dest_name="rm-b", dest_xml="<domain/>", disk_target="vda")
    assert p == {libvirt.VIR_MIGRATE_PARAM_DEST_NAME: "rm-b", libvirt.VIR_MIGRATE_PARAM_DEST_XML: "<domain/>",
                 libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: ["vda"]}
    z = migrate_params(NativeParams(variant=Variant.COMPRESSED, bandwidth_mib_s=12, parallel_connections=3), "zstd",
                       dest_name="b", dest_xml="x", disk_target="vda")
    assert z[libvirt.VIR_MIGRATE_PARAM_COMPRESSION] == ["zstd"]
    assert z[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] == 3
    assert z[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] == 12
    u = migrate_params(NativeParams(migrate_uri="tcp://10.232.0.1:49152"), None, dest_name="b", dest_xml="x",
                       disk_target="vda")
    assert u[libvirt.VIR_MIGRATE_PARAM_URI] == "tcp://10.232.0.1:49152"
    assert u[libvirt.VIR_MIGRATE_PARAM_DISKS_URI] == "tcp://10.232.0.1"       # NBD: the same host, its own port
    x = migrate_params(NativeParams(variant=Variant.COMPRESSED), "xbzrle", dest_name="b", dest_xml="x",
                       disk_target="vda")
    assert x[libvirt.VIR_MIGRATE_PARAM_COMPRESSION] == ["xbzrle"]
    assert libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS not in x


@pytest.mark.parametrize("kw", [{"compression": "lz4", "variant": Variant.COMPRESSED},
                                {"compression": "zstd"},                  # compression without the variant
                                {"timeout_s": 0}, {"poll_s": -1}, {"bandwidth_mib_s": -1},
                                {"parallel_connections": 0}, {"postcopy_after_iterations": 0},
                                {"migrate_uri": "rdma://h"}, {"migrate_uri": "tcp://h/x"}, {"migrate_uri": "tcp://-h"}])
def test_bad_parameters_are_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        NativeParams(**kw)


def test_compression_prefers_multifd_zstd_then_xbzrle() -> None:
    assert choose_compression({"xbzrle", "multifd"}, zstd=True) == "zstd"
    assert choose_compression({"xbzrle", "multifd"}, zstd=False) == "xbzrle"
    assert choose_compression({"xbzrle"}, zstd=True) == "xbzrle"
    with pytest.raises(NativeError, match="neither"):
        choose_compression({"multifd"}, zstd=False)


def test_postcopy_says_why_it_cannot_run(tmp_path: Path) -> None:
    caps = {"postcopy-ram"}
    assert postcopy_unavailable(caps) is None                              # QEMU runs as root here
    assert "postcopy-ram" in str(postcopy_unavailable(set()))
    sysctl = tmp_path / "unprivileged_userfaultfd"
    sysctl.write_text("0\n")
    why = postcopy_unavailable(caps, userfaultfd=tmp_path / "none", unprivileged=sysctl, qemu_is_root=False)
    assert why is not None and "userfaultfd is not allowed" in why
    sysctl.write_text("1\n")
    assert postcopy_unavailable(caps, userfaultfd=tmp_path / "none", unprivileged=sysctl, qemu_is_root=False) is None
    (tmp_path / "dev").write_text("")
    assert postcopy_unavailable(caps, userfaultfd=tmp_path / "dev", unprivileged=tmp_path / "x",
                                qemu_is_root=False) is None


def _domain_xml(tmp_path: Path) -> str:
    spec = DomainSpec(name="rm-a", image=GuestImage(tmp_path / "img", "0" * 16), disk=tmp_path / "a" / "disk.qcow2",
                      run_dir=tmp_path / "a")
    root = ET.fromstring(spec.xml())
    ET.SubElement(root, "uuid").text = str(uuid.uuid4())
    agent = ET.SubElement(root.find("devices"), "channel", type="unix")  # type: ignore[arg-type]
    ET.SubElement(agent, "source", mode="bind", path="/var/lib/libvirt/qemu/channel/target/x/agent")
    ET.SubElement(agent, "target", type="virtio", name=AGENT_CHANNEL)
    return ET.tostring(root, encoding="unicode")


def test_the_target_xml_moves_the_files_and_keeps_the_machine(tmp_path: Path) -> None:
    xml = _domain_xml(tmp_path)
    out = ET.fromstring(dest_xml(xml, tmp_path / "b"))
    src = ET.fromstring(xml)
    assert out.findtext("name") == "rm-a"               # libvirt refuses another name here: DEST_NAME renames
    assert out.findtext("uuid") == src.findtext("uuid")                   # the same machine, moved
    assert out.find("devices/disk[@device='disk']/source").get("file") == str(tmp_path / "b" / "disk.qcow2")  # type: ignore[union-attr]
    assert out.find("devices/serial/source").get("path") == str(tmp_path / "b" / "serial.log")  # type: ignore[union-attr]
    paths = {ch.find("target").get("name"): ch.find("source") for ch in out.findall("devices/channel")}  # type: ignore[union-attr]
    assert paths[RECORDER_CHANNEL].get("path") == str(tmp_path / "b" / "recorder.sock")  # type: ignore[union-attr]
    assert paths[AGENT_CHANNEL] is None                                     # libvirt makes the target's own
    assert str(tmp_path / "a") + "/" not in ET.tostring(out, encoding="unicode")   # nothing of the source
    assert ET.tostring(out.find("memory"), encoding="unicode") == ET.tostring(src.find("memory"), encoding="unicode")  # type: ignore[arg-type]
    assert disk_target(xml) == "vda"


COMPLETED = {"type": 3, "operation": 6, "time_elapsed": 2612, "downtime": 159, "downtime_net": 150,
             "data_processed": 338_000_000, "data_total": 1_400_000_000, "memory_processed": 330_000_000,
             "memory_total": 1_090_000_000, "disk_processed": 8_000_000, "memory_iteration": 3,
             "memory_dirty_rate": 120, "memory_page_size": 4096, "memory_postcopy_requests": 0,
             "setup_time": 12}


def test_the_completed_job_statistics_give_bytes_time_and_downtime() -> None:
    s = NativeStats.from_job_stats(COMPLETED)
    assert (s.total_s, s.downtime_s) == (2.612, 0.159)
    assert (s.memory_bytes, s.disk_bytes, s.data_bytes) == (330_000_000, 8_000_000, 338_000_000)
    assert s.iterations == 3 and s.dirty_rate_pages_s * s.page_bytes == 120 * 4096
    assert s.setup_s == 0.012                       # before the first pass: not downtime, but in the time
    # a libvirt that reports no data_processed still counts memory and disk
    s2 = NativeStats.from_job_stats({k: v for k, v in COMPLETED.items() if k != "data_processed"})
    assert s2.data_bytes == 338_000_000
    assert s.as_dict()["total_s"] == 2.612
    # after a post-copy switch the target's statistics had no time_elapsed: this process's clock then
    s3 = NativeStats.from_job_stats({k: v for k, v in COMPLETED.items() if k != "time_elapsed"}, wall_s=1.25)
    assert s3.total_s == 1.25 and s3.data_bytes == 338_000_000


@pytest.mark.parametrize("bad", [{"time_elapsed": None}, {"downtime": -1}, {"memory_processed": MAX_STAT_BYTES + 1},
                                 {"disk_processed": "12"}, {"memory_iteration": True}, {"time_elapsed": 2.5},
                                 {"setup_time": -3}])
def test_job_statistics_that_make_no_sense_are_refused(bad: dict[str, Any]) -> None:
    stats = {**COMPLETED, **bad}
    if bad.get("time_elapsed", 0) is None:
        del stats["time_elapsed"]
    with pytest.raises(NativeError):
        NativeStats.from_job_stats(stats)
