"""bench/pageflags.py: the guest's page-frame kinds from /proc/kpageflags words (no VM), and the
read of a saved state's flags in a throwaway restored copy (vm)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pageflags import (
    KIND_ANON,
    KIND_FILE,
    KIND_FREE,
    KIND_KERNEL,
    KIND_NOPAGE,
    KIND_OTHER,
    KIND_PGTABLE,
    KIND_SHMEM,
    KIND_SLAB,
    KIND_TAIL,
    KPF_ACTIVE,
    KPF_ANON,
    KPF_BUDDY,
    KPF_COMPOUND_TAIL,
    KPF_DIRTY,
    KPF_LOCKED,
    KPF_LRU,
    KPF_MMAP,
    KPF_NOPAGE,
    KPF_PGTABLE,
    KPF_SLAB,
    KPF_SWAPBACKED,
    kinds_of,
    page_kind,
    parse_kpageflags,
    read_page_flags,
)
from store import checkpoint as ckpt
from store.vmstate import VmState
from vm.machine import Hypervisor, Machine


def f(*bits: int) -> int:
    return sum(1 << b for b in bits)


@pytest.mark.parametrize(("flags", "kind"), [
    (0, KIND_KERNEL),
    (f(KPF_BUDDY), KIND_FREE),
    (f(KPF_NOPAGE), KIND_NOPAGE),
    (f(KPF_PGTABLE), KIND_PGTABLE),
    (f(KPF_SLAB, KPF_LOCKED), KIND_SLAB),
    (f(KPF_ANON, KPF_SWAPBACKED, KPF_LRU, KPF_MMAP, KPF_ACTIVE), KIND_ANON),
    (f(KPF_SWAPBACKED, KPF_LRU, KPF_DIRTY), KIND_SHMEM),       # tmpfs: swap-backed, not anonymous
    (f(KPF_LRU, KPF_DIRTY), KIND_FILE),
    (f(KPF_MMAP), KIND_FILE),                                  # a mapped file page off the LRU
    (f(KPF_COMPOUND_TAIL), KIND_TAIL),
    (f(KPF_DIRTY), KIND_OTHER),
])
def test_page_kind(flags: int, kind: str) -> None:
    assert page_kind(flags) == kind


def test_parse_and_look_up() -> None:
    words = np.array([0, f(KPF_BUDDY), f(KPF_LRU)], dtype="<u8")
    flags = parse_kpageflags(words.tobytes())
    assert flags.tolist() == words.tolist()
    assert kinds_of(flags, [2, 0, 1, 3, -1]) == {2: KIND_FILE, 0: KIND_KERNEL, 1: KIND_FREE, 3: KIND_NOPAGE,
                                                 -1: KIND_NOPAGE}
    with pytest.raises(ValueError, match="whole number"):
        parse_kpageflags(b"\0" * 12)


@pytest.mark.vm
def test_flags_of_a_saved_state_come_from_a_copy_that_is_removed(hv: Hypervisor,
                                                                  checkpoint: ckpt.Checkpoint) -> None:
    """The checkpoint's own state, read in a throwaway clone: the guest has free pages, page cache,
    anonymous memory and slab, and the copy is gone afterwards; the state's files are untouched."""
    before = checkpoint.memory.stat().st_mtime_ns, checkpoint.disk.stat().st_mtime_ns
    name = "rm-test-pageflags"
    flags = read_page_flags(hv, VmState(checkpoint.memory, checkpoint.disk, checkpoint), name)
    assert len(flags) >= checkpoint.manifest.memory_mib * 256
    kinds = set(kinds_of(flags, range(len(flags))).values())
    assert {KIND_FREE, KIND_FILE, KIND_ANON, KIND_SLAB} <= kinds
    assert not hv.exists(name) and not ckpt.clone_dir(name).exists()
    assert (checkpoint.memory.stat().st_mtime_ns, checkpoint.disk.stat().st_mtime_ns) == before


@pytest.mark.vm
def test_flags_of_a_state_saved_with_frozen_file_systems_are_read(hv: Hypervisor, checkpoint: ckpt.Checkpoint,
                                                                   make_clone: Callable[..., Machine]) -> None:
    """A migration's source state is saved with its file systems frozen: the restored copy comes
    back frozen, and the agent refuses file reads until they are thawed."""
    m = make_clone()
    run_dir = m.run_dir                                 # (from the domain's XML: gone after the save)
    m.fsfreeze()
    m.save(run_dir / "frozen.sav")
    flags = read_page_flags(hv, VmState(run_dir / "frozen.sav", run_dir / "disk.qcow2", checkpoint),
                            "rm-test-pageflags-frozen")
    assert len(flags) >= checkpoint.manifest.memory_mib * 256
