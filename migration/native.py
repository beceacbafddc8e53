"""``--strategy native``: a migration by libvirt's own live migration instead of replay, with the
same report, and the sentence that says which strategy suits the link.

Replay wins where the link is thin: it ships what replay could not reproduce (hundreds of KiB to a
few MiB here), where a live migration ships the guest's whole used memory and its disk changes
(hundreds of MiB for a 1 GiB desktop guest). Live migration wins where the link is fat, or when the
sites share no checkpoint older than the user's session... except that here its disk copy is
incremental over the checkpoint's overlay, which the target must hold (``checkpoint export`` |
``checkpoint import``). It needs no recording, no handoff service and no replay: the source's
clone moves as it runs, paused only for the last pass.

:func:`migrate_native` is the orchestration (both hosts' daemons, the target clone's folder, the
source clone's folder deleted once the target runs); the libvirt calls are in :mod:`vm.native`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from migration.sides import Report
from store import checkpoint as ckpt
from vm.machine import Hypervisor, Machine, remove_run_dir
from vm.native import (
    NativeParams,
    NativeStats,
    PostcopyUnavailableError,
    TargetFolder,
    Variant,
    check_not_same_host,
    live_migrate,
    postcopy_unavailable,
    probe_compression,
)

log = logging.getLogger("replay_migrate.migration.native")

FAT_LINK_BYTES_S = 100e6 / 8
"""From this rate up (100 Mbit/s) a live migration of a desktop guest takes seconds: it suits."""
THIN_LINK_BYTES_S = 10e6 / 8
"""The thin link the advice quotes times for (10 Mbit/s, the bench's first link)."""
NATIVE_SUITS_S = 10.0
"""A live migration whose transfer would take longer than this is worth replacing by replay."""


def _mbit(rate: float) -> str:
    return f"{rate * 8 / 1e6:.0f} Mbit/s"


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def advice(strategy: str, wire_bytes: int, *, link_bytes_s: float | None = None,
           native_bytes: int | None = None) -> str:
    """Which strategy suits this link and why, in one sentence. ``link_bytes_s``: the rate the
    transfer ran at (native: libvirt's bytes over its time), when known; ``native_bytes``: what a
    live migration of this guest moves (for a replay migration: the guest's used memory and its
    disk changes, an estimate), when known."""
    if strategy == "native":
        thin_s = wire_bytes / THIN_LINK_BYTES_S
        if link_bytes_s is not None and link_bytes_s >= FAT_LINK_BYTES_S:
            return (f"native suits this link: {_mib(wire_bytes)} moved at {_mbit(link_bytes_s)} in seconds with "
                    f"nothing recorded or replayed; on a {_mbit(THIN_LINK_BYTES_S)} link the same bytes would take "
                    f"{thin_s:.0f} s, and replay, which ships only what replay left different, would suit better.")
        rate = f" at {_mbit(link_bytes_s)}" if link_bytes_s else ""
        return (f"replay would likely suit this link better: native moved {_mib(wire_bytes)}{rate}, "
                f"{wire_bytes / (link_bytes_s or THIN_LINK_BYTES_S):.0f} s of transfer, where replay ships a few MiB "
                "when both sites hold the checkpoint; native suits fat links (100 Mbit/s and up).")
    if native_bytes is not None:
        thin_s, fat_s = native_bytes / THIN_LINK_BYTES_S, native_bytes / FAT_LINK_BYTES_S
        head = (f"replay suits thin links: it shipped {_mib(wire_bytes)} where a live migration moves about "
                f"{_mib(native_bytes)} ({thin_s:.0f} s at {_mbit(THIN_LINK_BYTES_S)})")
        if fat_s <= NATIVE_SUITS_S:
            return (f"{head}; on a link of {_mbit(FAT_LINK_BYTES_S)} or more `--strategy native` takes ~{fat_s:.0f} s "
                    "without recording or replaying.")
        return f"{head}; even at {_mbit(FAT_LINK_BYTES_S)} that is {fat_s:.0f} s, so replay suits both."
    return (f"replay suits thin links: it shipped {_mib(wire_bytes)}, what replay left different; on a fat link "
            "(100 Mbit/s and up), or with no checkpoint at the target, `--strategy native` needs no replay.")


def native_report(stats: NativeStats, params: NativeParams, compression: str | None) -> dict[str, Any]:
    """The replay strategy's report fields (:class:`migration.sides.Report`) for a native migration,
    and its own figures under ``native``. Replay's figures are 0 because nothing was recorded or
    replayed; the plain-transfer baseline and the savings against it are unknown (``None``): no
    state was saved to compare; ``verified`` is None: libvirt checks no root hashes."""
    report = Report().as_dict()
    report.update({
        "strategy": "native",
        "wire_bytes": stats.data_bytes,
        "block_bytes": stats.data_bytes,
        "baseline_bytes": None,
        "savings": None,
        "divergent_blocks": {},
        "transfer_s": round(stats.total_s, 3),
        "total_s": round(stats.total_s, 3),
        "downtime_s": round(stats.downtime_s, 3),
        "verified": None,
        "native": {"variant": params.variant.value, "compression": compression, **stats.as_dict()},
    })
    rate = stats.data_bytes / stats.total_s if stats.total_s > 0 else None
    report["advice"] = advice("native", stats.data_bytes, link_bytes_s=rate)
    return report


def migrate_native(source: Hypervisor, target: Hypervisor, m: Machine, ck: ckpt.Checkpoint, target_name: str,
                   params: NativeParams, *, progress: Callable[[str, int, int], None] | None = None,
                   source_local: bool = True, stop: threading.Event | None = None,
                   on_switch: Callable[[], None] | None = None) -> tuple[Machine, dict[str, Any]]:
    """Live-migrate clone ``m`` of ``ck`` from ``source`` to ``target`` as ``target_name``: the
    target's clone folder (its overlay over the target's copy of the checkpoint) is made through the
    target's daemon, the migration runs, and the source's folder is deleted once the target runs it
    (the source's domain ended with the migration: nothing is left to restore or boot by accident).
    A failure before post-copy's switch leaves the source running and removes the target's folder.
    ``source_local``: the source's daemon is this host's, so its folder is here to delete (the
    command line's case; the bench also migrates back from site B and cleans that folder itself).
    ``stop`` aborts the migration (before post-copy's switch, which ``on_switch`` reports)."""
    check_not_same_host(source, target)
    compression = None
    if params.variant is Variant.COMPRESSED:
        compression = params.compression or probe_compression(m)
    elif params.variant is Variant.POSTCOPY:
        caps = {str(c.get("capability")) for c in m.qmp("query-migrate-capabilities") or []}
        reason = postcopy_unavailable(caps)
        if reason is not None:
            raise PostcopyUnavailableError(f"post-copy cannot run: {reason}")
    run_dir = ckpt.clone_dir(target_name)
    source_dir = ckpt.run_dir_of(m) if source_local else m.run_dir
    disk = source_dir / "disk.qcow2"
    capacity = int(m.dom.blockInfo(str(disk), 0)[0])
    folder = TargetFolder(target, run_dir)
    folder.make(backing=ck.disk, capacity=capacity, checkpoint=ck.name)
    switched: list[bool] = []

    def switch() -> None:
        switched.append(True)
        if on_switch is not None:
            on_switch()

    try:
        migrated, stats = live_migrate(m, target, target_name, run_dir, params, compression=compression,
                                       progress=progress, on_switch=switch, stop=stop)
    except BaseException:
        if not switched:
            folder.remove()
        raise
    folder.release()
    if source.exists(m.name):
        log.warning("%s still exists at %s after its migration", m.name, source.uri)
    elif source_local:
        remove_run_dir(source_dir)
    log.info("%s: %s migrated in %.1f s, %d bytes, downtime %.3f s", target_name, params.variant.value,
             stats.total_s, stats.data_bytes, stats.downtime_s)
    report = native_report(stats, params, compression)
    report["native"]["postcopy_switched"] = bool(switched)
    return migrated, report
