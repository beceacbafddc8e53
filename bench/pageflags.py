"""What kind of page each guest page frame is in a saved state, by the guest kernel's own flags.

The host sees a memory image as bytes. The guest knows what each page is (page cache, anonymous
process memory, slab, page table, free): ``/proc/kpageflags`` has one 64-bit word of flags per page
frame. Reading it inside the *measured* VM would change what is measured (a probe there dirties
thousands of pages), so :func:`read_page_flags` restores a throwaway copy of the saved state (its
own copy of the memory image, an overlay over its disk), reads the flags there, and removes it.
The copy runs for the few seconds the read takes: pages that change kind meanwhile (the guest
agent's own work) are noise of a few hundred pages against the thousands counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from replay_migrate.errors import VMError
from store import checkpoint as ckpt
from store.vmstate import VmState
from vm.machine import Hypervisor, create_overlay

KPAGEFLAGS = "/proc/kpageflags"
MAX_FLAGS_BYTES = 64 << 20
"""Largest ``/proc/kpageflags`` read (8 bytes per page frame: 32 GiB of guest memory)."""
AGENT_WAIT_S = 60.0

# include/uapi/linux/kernel-page-flags.h
KPF_LOCKED, KPF_DIRTY, KPF_LRU, KPF_ACTIVE, KPF_SLAB = 0, 4, 5, 6, 7
KPF_BUDDY, KPF_MMAP, KPF_ANON, KPF_SWAPCACHE, KPF_SWAPBACKED = 10, 11, 12, 13, 14
KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL, KPF_HUGE, KPF_NOPAGE, KPF_KSM, KPF_THP = 15, 16, 17, 20, 21, 22
KPF_OFFLINE, KPF_ZERO_PAGE, KPF_PGTABLE = 23, 24, 26

KIND_NOPAGE = "no page frame"
KIND_FREE = "free (buddy allocator)"
KIND_PGTABLE = "page table"
KIND_SLAB = "kernel slab"
KIND_ANON = "anonymous (process heap, stacks)"
KIND_SHMEM = "shmem / tmpfs"
KIND_FILE = "page cache (file data)"
KIND_TAIL = "tail of a compound page"
KIND_KERNEL = "kernel, no flags (vmalloc, stacks, per-cpu free lists, reserved)"
KIND_OTHER = "other"


def _bit(flags: int, bit: int) -> bool:
    return bool(flags >> bit & 1)


def page_kind(flags: int) -> str:
    """One page frame's kind from its ``kpageflags`` word (the first rule that applies)."""
    if _bit(flags, KPF_NOPAGE):
        return KIND_NOPAGE
    if _bit(flags, KPF_BUDDY):
        return KIND_FREE
    if _bit(flags, KPF_PGTABLE):
        return KIND_PGTABLE
    if _bit(flags, KPF_SLAB):
        return KIND_SLAB
    if _bit(flags, KPF_ANON):
        return KIND_ANON
    if _bit(flags, KPF_SWAPBACKED):
        return KIND_SHMEM
    if _bit(flags, KPF_LRU) or _bit(flags, KPF_MMAP):
        return KIND_FILE
    if _bit(flags, KPF_COMPOUND_TAIL):
        return KIND_TAIL
    if flags == 0:
        return KIND_KERNEL
    return KIND_OTHER


def parse_kpageflags(data: bytes) -> npt.NDArray[np.uint64]:
    """One flags word per page frame (native little-endian ``u64``s); ValueError if torn."""
    if len(data) % 8:
        raise ValueError(f"{KPAGEFLAGS}: {len(data)} bytes is not a whole number of 8-byte words")
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)


def kinds_of(flags: npt.NDArray[np.uint64], pfns: Iterable[int]) -> dict[int, str]:
    """The kind of each page frame in ``pfns`` (a frame past the table: :data:`KIND_NOPAGE`)."""
    return {p: page_kind(int(flags[p])) if 0 <= p < len(flags) else KIND_NOPAGE for p in pfns}


def read_page_flags(hv: Hypervisor, state: VmState, name: str) -> npt.NDArray[np.uint64]:
    """``/proc/kpageflags`` of ``state``'s guest, read in a throwaway clone ``name`` restored from a
    copy of it (``state`` is only read); the clone is removed whatever happens."""
    run_dir = ckpt.clone_dir(name)
    ckpt.remove_clone(hv, name)
    run_dir.mkdir(parents=True)
    try:
        disk = run_dir / "disk.qcow2"
        create_overlay(disk, Path(state.disk))
        m = hv.restore_clone(state.memory, name=name, disk=disk, run_dir=run_dir)
        m.wait_agent(AGENT_WAIT_S)
        m.fsthaw()      # a migration's source state is saved frozen; the agent reads no file until thawed
        data = m.read_file(KPAGEFLAGS, max_bytes=MAX_FLAGS_BYTES)
    finally:
        ckpt.remove_clone(hv, name)
    if not data:
        raise VMError(f"{name}: {KPAGEFLAGS} read empty (CONFIG_PROC_PAGE_MONITOR off?)")
    return parse_kpageflags(data)
