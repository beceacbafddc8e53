"""libvirt's own live migration of one of our domains to another libvirt host (``--strategy native``,
and the bench's peer to beat).

What replay-migrate is measured against is what a user would run instead: ``virsh migrate --live
--copy-storage-inc``. Here it is done through libvirt-python, checked on this machine (libvirt 11.3,
QEMU 10.0, two libvirt hosts joined by a veth, ``bench/sites.py``):

* ``migrateToURI3`` with ``VIR_MIGRATE_LIVE | PEER2PEER``: the source's daemon connects to the
  target's and drives the whole migration, so a client that dies mid-way leaves no half-done job;
* ``VIR_MIGRATE_NON_SHARED_INC``: the clone's qcow2 overlay is local to each site and is copied
  (QEMU's drive-mirror over NBD, top layer only); the checkpoint's overlay and the base image under
  it are already at both sites, at the same paths. The target's overlay is made beforehand through
  the target daemon's storage API (:func:`prepare_target`), so nothing but libvirt is needed there;
* the domain gets its target name and its own clone folder there (``DEST_NAME`` and ``DEST_XML``:
  disk, serial log and recorder socket under the target's clone folder; the UUID stays: QEMU's
  migration keeps the machine's identity).

Three variants (:class:`Variant`): pre-copy (Clark et al. 2005), pre-copy compressed (multifd
with zstd where this QEMU offers it, else XBZRLE: :func:`choose_compression` on what
:func:`probe_compression` finds), and post-copy (``VIR_MIGRATE_POSTCOPY``, switched over with
``migrateStartPostCopy`` once the first pass is done, so post-copy itself runs: a lightly dirtied
guest otherwise converges in pre-copy first). Post-copy needs userfaultfd at the *target*: QEMU
there fails the migration if the kernel refuses it, and :func:`postcopy_unavailable` says why
before trying where it can tell. A post-copy that fails after the switch loses the VM (neither
side holds all of its memory): that is the technique's own risk, said so in the README.

Bytes, time and downtime come from libvirt's job statistics of the completed job
(:meth:`NativeStats.from_job_stats`, checked and bounded like any peer input).
"""

from __future__ import annotations

import enum
import logging
import re
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import libvirt

from replay_migrate.errors import HostError, UsageError, VMError
from vm.machine import Hypervisor, Machine, MachineState
from vm.spec import AGENT_CHANNEL, RECORDER_CHANNEL

log = logging.getLogger("replay_migrate.vm.native")

MIGRATE_TIMEOUT_S = 600.0
"""Longest a live migration may run before it is aborted (the source then runs on): a 1 GiB
guest takes ~3 s on the unshaped veth here, ~5 min at 10 Mbit/s."""
POLL_S = 0.2
"""How often the running job's statistics are read (progress, the post-copy switch, the timeout)."""
ABORT_WAIT_S = 60.0
"""How long an aborted job gets to end before the migration is given up on (the daemon's problem then)."""
POSTCOPY_AFTER_ITERATIONS = 1
"""Ask for the switch to post-copy once pre-copy's memory pass has begun (after the disk copy got
going; asked earlier, QEMU refuses and it is asked again at the next poll). Waiting for pass 2 missed
it: an idle 1 GiB guest's later passes take milliseconds and the job converged in pre-copy."""
POSTCOPY_SWITCH_S = 30.0
"""Switch to post-copy after this long in pre-copy even if the iteration count was not seen."""
PARALLEL_CONNECTIONS = 2
"""multifd channels for the compressed variant (one per core here)."""
ZSTD_LEVEL = 1
"""multifd's zstd level: 1 is QEMU's default and keeps one core per channel from being the bottleneck."""
XBZRLE_CACHE_BYTES = 64 << 20
"""XBZRLE's page cache (QEMU's default): pages re-sent are delta-encoded against it."""
MAX_STAT_BYTES = 1 << 44
"""Largest byte count accepted from the job statistics (16 TiB): a larger one is a bug or garbage."""
MAX_STAT_MS = 7 * 24 * 3600 * 1000
"""Largest duration accepted from the job statistics (a week, in ms)."""
USERFAULTFD = Path("/dev/userfaultfd")
UNPRIVILEGED_UFFD = Path("/proc/sys/vm/unprivileged_userfaultfd")
MIGRATE_URI = re.compile(r"tcp://([A-Za-z0-9][A-Za-z0-9.-]*)(?::[0-9]{1,5})?")
MARKER_VOLUME = "checkpoint"
"""The clone folder's file that names its checkpoint (``store.checkpoint.start_clone`` writes it)."""


class Variant(enum.Enum):
    """Which of libvirt's live migrations."""

    PRECOPY = "precopy"
    COMPRESSED = "precopy-compressed"
    POSTCOPY = "postcopy"


class NativeError(VMError):
    """libvirt's migration failed; the source runs on unless post-copy had already switched over."""


class PostcopyUnavailableError(NativeError):
    """Post-copy cannot run here (userfaultfd refused, or QEMU lacks postcopy-ram)."""


@dataclass(frozen=True)
class NativeParams:
    """Every knob of a native migration, with the defaults above."""

    variant: Variant = Variant.PRECOPY
    compression: str | None = None
    """For COMPRESSED: "zstd" (multifd) or "xbzrle"; None: what :func:`probe_compression` offers."""
    bandwidth_mib_s: int = 0
    """QEMU's own rate cap (MiB/s) for memory and disk; 0: none (the link decides)."""
    timeout_s: float = MIGRATE_TIMEOUT_S
    poll_s: float = POLL_S
    postcopy_after_iterations: int = POSTCOPY_AFTER_ITERATIONS
    postcopy_switch_s: float = POSTCOPY_SWITCH_S
    parallel_connections: int = PARALLEL_CONNECTIONS
    zstd_level: int = ZSTD_LEVEL
    xbzrle_cache_bytes: int = XBZRLE_CACHE_BYTES
    peer_to_peer: bool = True
    """The source's daemon connects to the target's (``--target-connect`` must work from there); False:
    this process drives both daemons (for a target URI only this process can reach, e.g. a daemon
    that listens on its unix socket alone)."""
    migrate_uri: str | None = None
    """``tcp://HOST[:PORT]`` where the source's QEMU reaches the target's, for the memory stream and
    the disk copy alike; None: what the target's libvirt announces (``migration_host`` in its
    qemu.conf, else its host name, which must then resolve to an address the source reaches)."""

    def __post_init__(self) -> None:
        if self.compression not in (None, "zstd", "xbzrle"):
            raise UsageError(f"compression {self.compression!r}: zstd or xbzrle")
        if self.compression is not None and self.variant is not Variant.COMPRESSED:
            raise UsageError("compression applies to the precopy-compressed variant only")
        if self.timeout_s <= 0 or self.poll_s <= 0 or self.bandwidth_mib_s < 0:
            raise UsageError("timeout and poll interval must be positive, bandwidth not negative")
        if self.parallel_connections < 1 or self.postcopy_after_iterations < 1:
            raise UsageError("parallel connections and post-copy iterations must be at least 1")
        if self.migrate_uri is not None and MIGRATE_URI.fullmatch(self.migrate_uri) is None:
            raise UsageError(f"migration URI {self.migrate_uri!r}: tcp://HOST[:PORT] (a host name or IPv4 address)")


def migrate_flags(params: NativeParams, compression: str | None) -> int:
    """libvirt's flags for ``params`` (``compression``: the method chosen for COMPRESSED)."""
    flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_NON_SHARED_INC | libvirt.VIR_MIGRATE_ABORT_ON_ERROR
    if params.peer_to_peer:
        flags |= libvirt.VIR_MIGRATE_PEER2PEER
    if params.variant is Variant.COMPRESSED:
        if compression is None:
            raise UsageError("the compressed variant needs a compression method (zstd or xbzrle)")
        flags |= libvirt.VIR_MIGRATE_COMPRESSED
        if compression == "zstd":
            flags |= libvirt.VIR_MIGRATE_PARALLEL
    elif params.variant is Variant.POSTCOPY:
        flags |= libvirt.VIR_MIGRATE_POSTCOPY
    return int(flags)


def migrate_params(params: NativeParams, compression: str | None, *, dest_name: str, dest_xml: str,
                   disk_target: str) -> dict[str, Any]:
    """libvirt's typed parameters for ``params``: the target's name and XML, the one disk to copy."""
    out: dict[str, Any] = {libvirt.VIR_MIGRATE_PARAM_DEST_NAME: dest_name,
                           libvirt.VIR_MIGRATE_PARAM_DEST_XML: dest_xml,
                           libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: [disk_target]}
    if params.bandwidth_mib_s:
        out[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = params.bandwidth_mib_s
    if params.migrate_uri is not None:
        match = MIGRATE_URI.fullmatch(params.migrate_uri)
        assert match is not None                                     # checked in NativeParams
        host = match.group(1)
        out[libvirt.VIR_MIGRATE_PARAM_URI] = params.migrate_uri
        out[libvirt.VIR_MIGRATE_PARAM_DISKS_URI] = f"tcp://{host}"    # the NBD server: its own port
    if params.variant is Variant.COMPRESSED:
        out[libvirt.VIR_MIGRATE_PARAM_COMPRESSION] = [compression]
        if compression == "zstd":
            out[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = params.parallel_connections
            out[libvirt.VIR_MIGRATE_PARAM_COMPRESSION_ZSTD_LEVEL] = params.zstd_level
        else:
            out[libvirt.VIR_MIGRATE_PARAM_COMPRESSION_XBZRLE_CACHE] = params.xbzrle_cache_bytes
    return out


# ---- what this host offers ---------------------------------------------------------------------------
def choose_compression(capabilities: set[str], zstd: bool) -> str:
    """multifd with zstd compresses every page (the most a thin link gains); XBZRLE only pages sent
    again. Raises if QEMU offers neither."""
    if "multifd" in capabilities and zstd:
        return "zstd"
    if "xbzrle" in capabilities:
        return "xbzrle"
    raise NativeError("this QEMU offers neither multifd with zstd nor XBZRLE: no compressed live migration")


def probe_compression(m: Machine) -> str:
    """Ask the source's QEMU (``query-migrate-capabilities``; zstd by setting multifd's compression
    to it and back, which a QEMU built without zstd refuses) and choose."""
    caps = {str(c.get("capability")) for c in m.qmp("query-migrate-capabilities") or []}
    zstd = False
    if "multifd" in caps:
        try:
            m.qmp("migrate-set-parameters", **{"multifd-compression": "zstd"})
            zstd = True
        except VMError:
            zstd = False
        finally:
            try:
                m.qmp("migrate-set-parameters", **{"multifd-compression": "none"})
            except VMError:
                pass
    return choose_compression(caps, zstd)


def postcopy_unavailable(capabilities: set[str], *, userfaultfd: Path = USERFAULTFD,
                         unprivileged: Path = UNPRIVILEGED_UFFD, qemu_is_root: bool = True) -> str | None:
    """Why post-copy cannot run on this host, or None. Post-copy's page faults are served by
    userfaultfd at the target: QEMU needs the ``userfaultfd`` syscall or ``/dev/userfaultfd``
    (root QEMU may use either; an unprivileged one needs ``vm.unprivileged_userfaultfd = 1`` or the
    device). This looks at *this* kernel: for another host QEMU there says so itself."""
    if "postcopy-ram" not in capabilities:
        return "this QEMU has no postcopy-ram migration capability"
    if qemu_is_root or userfaultfd.exists():
        return None
    try:
        if unprivileged.read_text().strip() == "1":
            return None
    except OSError:
        pass
    return (f"userfaultfd is not allowed: no {userfaultfd} and vm.unprivileged_userfaultfd is not 1, and QEMU "
            "does not run as root")


# ---- the target's side, through its daemon -----------------------------------------------------------
def dest_xml(migratable_xml: str, run_dir: Path) -> str:
    """The source's migratable XML with the target's clone folder: its disk overlay,
    serial log (and its console alias) and recorder socket there; the guest agent's socket is left
    for libvirt to make. Devices, CPU, memory and UUID stay: the running machine moves as it is."""
    root = ET.fromstring(migratable_xml)

    def one(path: str) -> ET.Element:
        el = root.find(path)
        if el is None:
            raise VMError(f"the domain's XML has no {path}")
        return el

    one("name")              # the name stays: libvirt checks it against the source's, DEST_NAME renames
    one("devices/disk[@device='disk']/source").set("file", str(run_dir / "disk.qcow2"))
    one("devices/serial/source").set("path", str(run_dir / "serial.log"))
    for console in root.findall("devices/console/source"):
        console.set("path", str(run_dir / "serial.log"))
    for ch in root.findall("devices/channel"):
        target, src = ch.find("target"), ch.find("source")
        tname = target.get("name") if target is not None else None
        if tname == RECORDER_CHANNEL and src is not None:
            src.set("path", str(run_dir / "recorder.sock"))
        elif tname == AGENT_CHANNEL and src is not None:
            ch.remove(src)
    return ET.tostring(root, encoding="unicode")


def disk_target(xml: str) -> str:
    """The guest's name of the domain's one disk (``vda``): the only one copied."""
    el = ET.fromstring(xml).find("devices/disk[@device='disk']/target")
    if el is None or not el.get("dev"):
        raise VMError("the domain's XML names no disk target")
    return str(el.get("dev"))


def _pool_xml(name: str, path: Path) -> str:
    root = ET.Element("pool", type="dir")
    ET.SubElement(root, "name").text = name
    ET.SubElement(ET.SubElement(root, "target"), "path").text = str(path)
    return ET.tostring(root, encoding="unicode")


def _overlay_xml(capacity: int, backing: Path) -> str:
    root = ET.Element("volume", type="file")
    ET.SubElement(root, "name").text = "disk.qcow2"
    ET.SubElement(root, "capacity", unit="bytes").text = str(capacity)
    ET.SubElement(ET.SubElement(root, "target"), "format", type="qcow2")
    bs = ET.SubElement(root, "backingStore")
    ET.SubElement(bs, "path").text = str(backing)
    ET.SubElement(bs, "format", type="qcow2")
    return ET.tostring(root, encoding="unicode")


class TargetFolder:
    """The target clone's folder, made through the target's libvirt (a transient ``dir`` storage
    pool over it): its qcow2 overlay over the checkpoint's (which must be there already) and the
    file naming its checkpoint. Nothing but the target's daemon is needed, wherever it runs;
    :meth:`remove` deletes what was made if the migration fails."""

    def __init__(self, hv: Hypervisor, run_dir: Path) -> None:
        self.hv = hv
        self.run_dir = run_dir
        self._pool: Any = None

    def make(self, *, backing: Path, capacity: int, checkpoint: str) -> None:
        """The folder, the overlay and the checkpoint file; a folder that holds anything already
        (another clone's) is refused and left as it is."""
        conn = self.hv.conn
        name = f"rm-native-{self.run_dir.name}"
        try:
            try:                                 # ours, left by a killed run (transient: gone when it stops)
                conn.storagePoolLookupByName(name).destroy()
            except libvirt.libvirtError:
                pass
            self._pool = conn.storagePoolCreateXML(_pool_xml(name, self.run_dir),
                                                   libvirt.VIR_STORAGE_POOL_CREATE_WITH_BUILD)
            there = [vol.name() for vol in self._pool.listAllVolumes(0)]
        except libvirt.libvirtError as e:
            self.release()
            raise NativeError(f"making {self.run_dir} at {self.hv.uri}: {e.get_error_message()}") from e
        if there:
            self.release()                       # not ours to delete
            raise VMError(f"{self.run_dir} at {self.hv.uri} is not empty ({', '.join(sorted(there))}): another "
                          "clone's folder")
        try:
            self._pool.createXML(_overlay_xml(capacity, backing), 0)
            self._write(MARKER_VOLUME, f"{checkpoint}\n".encode())
        except libvirt.libvirtError as e:
            self.remove()
            raise NativeError(f"making {self.run_dir} at {self.hv.uri}: {e.get_error_message()} (the target needs "
                              f"checkpoint {checkpoint}: replay-migrate checkpoint export | checkpoint import)") from e
        except BaseException:
            self.remove()
            raise

    def _write(self, name: str, data: bytes) -> None:
        root = ET.Element("volume", type="file")
        ET.SubElement(root, "name").text = name
        ET.SubElement(root, "capacity", unit="bytes").text = str(len(data))
        ET.SubElement(ET.SubElement(root, "target"), "format", type="raw")
        vol = self._pool.createXML(ET.tostring(root, encoding="unicode"), 0)
        stream = self.hv.conn.newStream(0)
        vol.upload(stream, 0, len(data), 0)
        stream.send(data)
        stream.finish()

    def release(self) -> None:
        """Keep the files, drop the transient pool (the migrated domain uses them now)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                pool.destroy()
            except libvirt.libvirtError as e:
                log.warning("dropping the storage pool over %s: %s", self.run_dir, e.get_error_message())

    def remove(self) -> None:
        """Delete every file made, then the folder: an active pool cannot delete its own folder,
        so that is done as a volume (a directory) of a second transient pool over its parent."""
        pool = self._pool
        if pool is None:
            return
        try:
            pool.refresh(0)
            for vol in pool.listAllVolumes(0):
                vol.delete(0)
        except libvirt.libvirtError as e:
            log.warning("cleaning %s at %s: %s", self.run_dir, self.hv.uri, e.get_error_message())
        self.release()
        parent = None
        try:
            parent = self.hv.conn.storagePoolCreateXML(
                _pool_xml(f"rm-native-parent-{self.run_dir.name}", self.run_dir.parent), 0)
            parent.storageVolLookupByName(self.run_dir.name).delete(0)
        except libvirt.libvirtError as e:
            log.warning("deleting %s at %s: %s", self.run_dir, self.hv.uri, e.get_error_message())
        finally:
            if parent is not None:
                try:
                    parent.destroy()
                except libvirt.libvirtError as e:
                    log.warning("dropping the storage pool over %s: %s", self.run_dir.parent, e.get_error_message())


# ---- the job's figures --------------------------------------------------------------------------------
def _count(stats: Mapping[str, Any], key: str, bound: int) -> int:
    v = stats.get(key, 0)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= bound:
        raise NativeError(f"libvirt's job statistics: {key}={v!r} is not a count in [0, {bound}]")
    return v


@dataclass(frozen=True)
class NativeStats:
    """One completed live migration, as libvirt's job statistics report it."""

    total_s: float
    downtime_s: float
    memory_bytes: int
    """Memory transferred (after compression: what went on the wire for memory)."""
    disk_bytes: int
    data_bytes: int
    """Everything the job transferred (memory + disk)."""
    memory_total_bytes: int
    iterations: int
    dirty_rate_pages_s: int
    page_bytes: int
    postcopy_requests: int
    compression_bytes: int
    setup_s: float = 0.0
    """QEMU's setup before the first pass (``setup_time``; 0 when libvirt does not report it): part
    of the time, not of the downtime."""

    @classmethod
    def from_job_stats(cls, stats: Mapping[str, Any], *, wall_s: float | None = None) -> NativeStats:
        """Parse ``virDomainGetJobStats(COMPLETED)``; every count is checked against
        :data:`MAX_STAT_BYTES` / :data:`MAX_STAT_MS`. After a post-copy switch the target's
        statistics came without ``time_elapsed`` here: then ``wall_s`` (this process's clock) is
        the time, and without either the statistics are refused."""
        if "time_elapsed" not in stats:
            if wall_s is None:
                raise NativeError("libvirt's job statistics have no time_elapsed: no completed migration")
            stats = {**stats, "time_elapsed": round(wall_s * 1000)}
        mem = _count(stats, "memory_processed", MAX_STAT_BYTES)
        disk = _count(stats, "disk_processed", MAX_STAT_BYTES)
        return cls(
            total_s=_count(stats, "time_elapsed", MAX_STAT_MS) / 1000,
            downtime_s=_count(stats, "downtime", MAX_STAT_MS) / 1000,
            memory_bytes=mem, disk_bytes=disk,
            data_bytes=max(_count(stats, "data_processed", 2 * MAX_STAT_BYTES), mem + disk),
            memory_total_bytes=_count(stats, "memory_total", MAX_STAT_BYTES),
            iterations=_count(stats, "memory_iteration", 1 << 32),
            dirty_rate_pages_s=_count(stats, "memory_dirty_rate", 1 << 40),
            page_bytes=_count(stats, "memory_page_size", 1 << 30) or 4096,
            postcopy_requests=_count(stats, "memory_postcopy_requests", 1 << 40),
            compression_bytes=_count(stats, "compression_bytes", MAX_STAT_BYTES),
            setup_s=_count(stats, "setup_time", MAX_STAT_MS) / 1000,
        )

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


# ---- the migration --------------------------------------------------------------------------------------
Progress = Callable[[str, int, int], None]


def live_migrate(m: Machine, target: Hypervisor, name: str, run_dir: Path, params: NativeParams, *,
                 compression: str | None = None, progress: Progress | None = None,
                 on_switch: Callable[[], None] | None = None,
                 stop: threading.Event | None = None) -> tuple[Machine, NativeStats]:
    """Move running ``m`` to ``target`` as ``name`` with its files in ``run_dir`` there (made by
    :class:`TargetFolder`); returns the migrated machine and the job's figures. The migration runs
    in a thread (``migrateToURI3`` blocks) while this one watches the job: progress, the post-copy
    switch, the timeout and ``stop`` (a cancelled command; either way ``abortJob``, and the source
    runs on). ``on_switch`` is called once post-copy has begun: from then on the migration can be
    neither aborted nor undone, and a failure loses the VM."""
    if m.state is not MachineState.RUNNING:
        raise VMError(f"{m.name!r} is {m.state.value}: a live migration needs it running")
    xml = m.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE)
    flags = migrate_flags(params, compression)
    typed = migrate_params(params, compression, dest_name=name, dest_xml=dest_xml(xml, run_dir),
                           disk_target=disk_target(xml))
    failure: list[BaseException] = []

    def run() -> None:
        try:
            if params.peer_to_peer:
                m.dom.migrateToURI3(target.uri, typed, flags)
            else:
                m.dom.migrate3(target.conn, typed, flags)
        except BaseException as e:  # handed to the watching thread
            failure.append(e)

    worker = threading.Thread(target=run, name=f"migrate-{m.name}", daemon=True)
    t0 = time.monotonic()
    worker.start()
    switched = aborted = cancelled = False
    t_abort = 0.0
    while worker.is_alive():
        worker.join(params.poll_s)
        if not worker.is_alive():
            break
        try:
            st = m.dom.jobStats(0)
        except libvirt.libvirtError:
            continue                                    # the job is finishing or gone
        if progress is not None and st.get("data_total"):
            progress(f"native {params.variant.value}", int(st.get("data_processed", 0)), int(st["data_total"]))
        waited = time.monotonic() - t0
        if (params.variant is Variant.POSTCOPY and not switched
                and (int(st.get("memory_iteration", 0)) >= params.postcopy_after_iterations
                     or waited >= params.postcopy_switch_s)):
            try:
                m.dom.migrateStartPostCopy(0)
                switched = True
                log.info("%s: post-copy started after %.1f s", m.name, waited)
                if on_switch is not None:
                    on_switch()
            except libvirt.libvirtError as e:           # not yet in the migration phase: next poll
                log.debug("migrateStartPostCopy: %s", e.get_error_message())
        cancelled = stop is not None and stop.is_set()
        if aborted and waited > t_abort + ABORT_WAIT_S:
            raise NativeError(f"the live migration of {m.name!r} was aborted but libvirt's job did not end in "
                              f"{ABORT_WAIT_S:.0f} s: see `virsh domjobinfo {m.name}` at {m.hv.uri}")
        if (waited > params.timeout_s or cancelled) and not aborted and not switched:
            aborted, t_abort = True, waited
            try:
                m.dom.abortJob()
            except libvirt.libvirtError as e:
                log.warning("aborting the migration of %s: %s", m.name, e.get_error_message())
    if failure:
        err = failure[0]
        msg = err.get_error_message() if isinstance(err, libvirt.libvirtError) else str(err)
        if aborted:
            why = "was cancelled" if cancelled else f"did not finish in {params.timeout_s:.0f} s"
            raise NativeError(f"the live migration of {m.name!r} {why} and was aborted; it runs on at the source")
        if params.variant is Variant.POSTCOPY and not switched and ("postcopy" in msg.lower()
                                                                   or "userfault" in msg.lower()):
            raise PostcopyUnavailableError(f"post-copy of {m.name!r} to {target.uri} refused: {msg}") from err
        where = "post-copy had begun: the VM is lost" if switched else "it runs on at the source"
        raise NativeError(f"the live migration of {m.name!r} to {target.uri} failed ({where}): {msg}") from err
    if progress is not None:
        progress(f"native {params.variant.value}", 1, 1)
    migrated = target.lookup(name)
    try:
        stats = migrated.dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    except libvirt.libvirtError as e:
        raise NativeError(f"{name} runs at {target.uri}, but its job statistics are unreadable: "
                          f"{e.get_error_message()}") from e
    return migrated, NativeStats.from_job_stats(stats, wall_s=time.monotonic() - t0)


def check_not_same_host(source: Hypervisor, target: Hypervisor) -> None:
    """libvirt refuses a migration to the host it runs on (same ``host_uuid``): say so first."""
    try:
        same = source.conn.getHostname() == target.conn.getHostname() and \
            ET.fromstring(source.conn.getCapabilities()).findtext("host/uuid") == \
            ET.fromstring(target.conn.getCapabilities()).findtext("host/uuid")
    except libvirt.libvirtError as e:
        raise HostError(f"reading the hosts' identities: {e.get_error_message()}") from e
    if same:
        raise UsageError(f"--target-connect {target.uri} is the source's own libvirt host: a native migration "
                         "needs another host (another daemon with its own host_uuid)")
