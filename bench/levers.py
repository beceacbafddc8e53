"""Issue 13's bytes levers, each measured on real migrations against a baseline of the same run.

    python -m bench.levers migrate --variant base --workloads build notes shell [--round r1] [--lock F]
    python -m bench.levers migrate --variant iof --kernel-arg init_on_free=1 --workloads build ...
    python -m bench.levers zstd --variant base --workloads build notes shell --levels 3 6 9 12 19
    python -m bench.levers cost --variant base --variant iof [--lock F]
    python -m bench.levers residue --variant both --round r1 --workloads notes shell   # on `migrate --keep` states
    python -m bench.levers render [--out bench/results]
    python -m bench.levers all          # what `make bench BENCH=levers` runs (~50 min; opt-in)

A *variant* is a checkpoint of the project's guest image booted with some kernel arguments
(``VARIANTS``; each its own checkpoint ``lev-<variant>``, so the variants never remake each other's).
``migrate`` runs ``bench/bench_migration.py --migrations-only --keep-work`` per workload (one real
migration over the 10 Mbit/s link), then measures on the kept states, off the VM lock, what the
plain state transfer and the Merkle diff without replay would send from that same source state: the
percentages are each variant's against its own baselines, as in ``migration.md``. ``zstd`` re-runs
the transfer between the kept source and target states in memory (``store.vmstate.sync_states``,
a dry run: the migration's own choices) at each zstd level, with the CPU time it took. ``cost``
times a guest-side compile (``COST_COMMAND``) in a clone of each variant's checkpoint: what a kernel
argument costs the user. ``residue`` says where the residue of kept states is (off the VM lock: the
page kinds by content, :func:`bench.divergence.owner_hint`) and how many of the differing 8-byte words
are user-space addresses (what address-space randomisation moves), kernel addresses or neither.
Every result is appended to ``<root>/levers.json``; ``render`` writes
``levers.md`` and ``levers.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VARIANTS: dict[str, tuple[str, ...]] = {
    "base": (),
    "iof": ("init_on_free=1",),
    "norandmaps": ("norandmaps",),
    "both": ("init_on_free=1", "norandmaps"),
}
"""Variant name -> the guest kernel arguments its checkpoint is booted with."""
CHECKPOINT_PREFIX = "lev-"
ZSTD_LEVELS = (3, 6, 9, 12, 19)
ZSTD_WORKLOADS = ("notes", "shell", "build")
SLOW_LINK_BPS = 10e6
"""The bench's first link (10 Mbit/s): what a byte saved is worth in seconds there."""
FAST_LINK_BPS = 100e6
COST_COMMAND = ("cd /usr/local/src/lua/src && t0=$(date +%s%N) && gcc -O2 -c lvm.c -o /tmp/lev.o "
                "&& gcc -O2 -c lparser.c -o /tmp/lev2.o && t1=$(date +%s%N) && echo $(( (t1 - t0) / 1000000 ))")
"""What the user pays for a kernel argument, timed in the guest: two of the build workload's compiles
(gcc allocates and frees its heap, the kernel its slabs and page cache: what init_on_free zeroes)."""
COST_REPEATS = 3
ALL_PLAN: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("build", "notes", "shell")),
    ("iof", ("build", "notes", "shell")),
    ("norandmaps", ("build", "notes", "shell")),
    ("both", ("build", "notes", "shell")),
)
"""``all``: each variant on these workloads, one variant after the other (the zstd levels on the
default's, ``iof``, kept states; the guest compile timed on ``base`` and ``iof``)."""
ZSTD_VARIANT = "iof"
COST_VARIANTS = ("base", "iof")


def log(msg: str) -> None:
    print(f"[levers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class MigrationRow:
    """One real migration of one workload from one variant's checkpoint, with its own baselines."""

    variant: str
    kernel_args: list[str]
    workload: str
    round: str
    wire_bytes: int
    downtime_s: float
    e2e_s: float
    plain_bytes: int
    no_replay_bytes: int
    checks_passed: bool
    date: str = ""

    @property
    def of_plain(self) -> float:
        return self.wire_bytes / self.plain_bytes if self.plain_bytes else float("nan")

    @property
    def of_no_replay(self) -> float:
        return self.wire_bytes / self.no_replay_bytes if self.no_replay_bytes else float("nan")


@dataclass
class ZstdRow:
    """The transfer between one kept pair of states at one zstd level (a dry run, in memory)."""

    variant: str
    workload: str
    level: int
    wire_bytes: int
    block_bytes: int
    cpu_s: float


@dataclass
class CostRow:
    """Milliseconds of ``COST_COMMAND`` in a clone of one variant's checkpoint, each repeat."""

    variant: str
    kernel_args: list[str]
    ms: list[int] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return float(statistics.median(self.ms)) if self.ms else float("nan")


@dataclass
class ResidueRow:
    """Where one kept migration's memory residue is: its divergent leaves, the ones the target holds
    nowhere (by page kind from their content, and what they cost), and every differing 8-byte word of
    the divergent leaves by what it holds on either side (:func:`word_census`)."""

    variant: str
    workload: str
    round: str
    divergent: int
    nowhere: int
    nowhere_bytes: int
    kinds: dict[str, int] = field(default_factory=dict)
    kind_bytes: dict[str, int] = field(default_factory=dict)
    words: dict[str, int] = field(default_factory=dict)


WORD_MOVED = "user-space address, moved"
WORD_USER = "user-space address, other"
WORD_KERNEL = "kernel address"
WORD_OTHER = "neither"
WORD_KINDS = (WORD_MOVED, WORD_USER, WORD_KERNEL, WORD_OTHER)


def word_census(a: bytes, b: bytes) -> dict[str, int]:
    """The 8-byte words at which pages ``a`` and ``b`` differ, by what they hold: a user-space
    address on both sides at the same offset within a page (:data:`WORD_MOVED`: one pointer
    relocated by whole pages, what address-space randomisation does to a process started after the
    checkpoint), else a user-space address on either side (the range
    :func:`bench.divergence.owner_hint` takes for one: a pointer to another object, mostly), else
    a kernel address (top 16 bits set), else neither (data, counters, random bytes)."""
    import numpy as np

    from bench.divergence import _USER_HI, _USER_LO
    n = min(len(a), len(b)) // 8 * 8
    wa, wb = np.frombuffer(a[:n], "<u8"), np.frombuffer(b[:n], "<u8")
    diff = wa != wb
    wa, wb = wa[diff], wb[diff]
    ua, ub = (wa >= _USER_LO) & (wa < _USER_HI), (wb >= _USER_LO) & (wb < _USER_HI)
    moved = ua & ub & ((wa & np.uint64(0xFFF)) == (wb & np.uint64(0xFFF)))
    user = ~moved & (ua | ub)
    kernel = ~(ua | ub) & (((wa >> np.uint64(48)) == 0xFFFF) | ((wb >> np.uint64(48)) == 0xFFFF))
    counts = {WORD_MOVED: int(moved.sum()), WORD_USER: int(user.sum()), WORD_KERNEL: int(kernel.sum())}
    return {**counts, WORD_OTHER: int(diff.sum()) - sum(counts.values())}


@dataclass
class Results:
    migrations: list[MigrationRow] = field(default_factory=list)
    zstd: list[ZstdRow] = field(default_factory=list)
    cost: list[CostRow] = field(default_factory=list)
    residue: list[ResidueRow] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> Results:
        if not path.exists():
            return cls()
        d = json.loads(path.read_text())
        return cls([MigrationRow(**r) for r in d.get("migrations", [])], [ZstdRow(**r) for r in d.get("zstd", [])],
                   [CostRow(**r) for r in d.get("cost", [])], [ResidueRow(**r) for r in d.get("residue", [])])

    def save(self, path: Path) -> None:
        from replay_migrate.files import atomic_write

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, (json.dumps({"migrations": [asdict(r) for r in self.migrations],
                                        "zstd": [asdict(r) for r in self.zstd],
                                        "cost": [asdict(r) for r in self.cost],
                                        "residue": [asdict(r) for r in self.residue]}, indent=2) + "\n").encode(),
                     durable=False)


# ---- rendering (pure) ------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f} %"


def migration_table(rows: Sequence[MigrationRow], cost: Sequence[CostRow]) -> str:
    """Workload x variant, every run in the order it ran (a variant beside the baseline it ran after)."""
    base_cost = {c.variant: c.median_ms for c in cost}
    ref = base_cost.get("base", float("nan"))
    out = ["| workload | variant | kernel args | round | bytes | % of plain | % of no-replay | plain | no-replay "
           "| downtime | end to end | checks | guest compile (cost) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {w: i for i, w in enumerate(dict.fromkeys(r.workload for r in rows))}
    for r in sorted(rows, key=lambda r: order[r.workload]):
        c = base_cost.get(r.variant, float("nan"))
        if c != c:
            cost_s = "-"
        elif r.variant == "base" or ref != ref:
            cost_s = f"{c / 1000:.1f} s"
        else:
            cost_s = f"{c / 1000:.1f} s ({100 * (c / ref - 1):+.1f} %)"
        out.append(f"| {r.workload} | {r.variant} | {' '.join(r.kernel_args) or '-'} | {r.round} | "
                   f"{r.wire_bytes:,} | {_pct(r.of_plain)} | {_pct(r.of_no_replay)} | {r.plain_bytes:,} | "
                   f"{r.no_replay_bytes:,} | {r.downtime_s:.1f} s | {r.e2e_s:.1f} s | "
                   f"{'pass' if r.checks_passed else 'FAIL'} | {cost_s} |")
    return "\n".join(out)


def summary_table(rows: Sequence[MigrationRow]) -> str:
    """Per workload and variant the mean over its rounds (the variance between rounds is in the table above)."""
    groups: dict[tuple[str, str], list[MigrationRow]] = {}
    for r in rows:
        groups.setdefault((r.workload, r.variant), []).append(r)
    out = ["| workload | variant | runs | mean % of plain | mean % of no-replay | mean bytes | mean downtime |",
           "|---|---|---|---|---|---|---|"]
    for (wl, v), rs in groups.items():
        out.append(f"| {wl} | {v} | {len(rs)} | {_pct(statistics.fmean(r.of_plain for r in rs))} | "
                   f"{_pct(statistics.fmean(r.of_no_replay for r in rs))} | "
                   f"{statistics.fmean(r.wire_bytes for r in rs):,.0f} | "
                   f"{statistics.fmean(r.downtime_s for r in rs):.1f} s |")
    return "\n".join(out)


def zstd_table(rows: Sequence[ZstdRow]) -> str:
    """Per kept state and level: bytes, CPU, and the net seconds against level 3 at each link rate
    (negative: the level pays)."""
    out = ["| workload | variant | zstd level | wire bytes | block bytes | transfer CPU | vs level 3: bytes "
           "| vs level 3: CPU | net at 10 Mbit/s | net at 100 Mbit/s | net at 10 Mbit/s, overlapped |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    ref = {(r.variant, r.workload): r for r in rows if r.level == 3}
    for r in rows:
        b = ref.get((r.variant, r.workload))
        if b is None:
            d_bytes, d_cpu, net10, net100, over10 = "-", "-", "-", "-", "-"
        else:
            saved = b.wire_bytes - r.wire_bytes
            extra = r.cpu_s - b.cpu_s
            d_bytes = f"{-saved:+,}"
            d_cpu = f"{extra:+.2f} s"
            net10 = f"{extra - saved * 8 / SLOW_LINK_BPS:+.2f} s"
            net100 = f"{extra - saved * 8 / FAST_LINK_BPS:+.2f} s"
            # a source that compresses while earlier batches are on the wire pays max(CPU, link)
            overlapped = (max(r.cpu_s, r.wire_bytes * 8 / SLOW_LINK_BPS)
                          - max(b.cpu_s, b.wire_bytes * 8 / SLOW_LINK_BPS))
            over10 = f"{overlapped:+.2f} s"
        out.append(f"| {r.workload} | {r.variant} | {r.level} | {r.wire_bytes:,} | {r.block_bytes:,} | "
                   f"{r.cpu_s:.2f} s | {d_bytes} | {d_cpu} | {net10} | {net100} | {over10} |")
    return "\n".join(out)


def cost_table(rows: Sequence[CostRow]) -> str:
    ref = next((c.median_ms for c in rows if c.variant == "base"), float("nan"))
    out = ["| variant | kernel args | compile times (ms) | median | vs base |", "|---|---|---|---|---|"]
    for c in rows:
        vs = "-" if c.variant == "base" or ref != ref else f"{100 * (c.median_ms / ref - 1):+.1f} %"
        out.append(f"| {c.variant} | {' '.join(c.kernel_args) or '-'} | {', '.join(map(str, c.ms))} | "
                   f"{c.median_ms / 1000:.2f} s | {vs} |")
    return "\n".join(out)


def residue_table(rows: Sequence[ResidueRow]) -> str:
    """Per kept migration: divergent memory leaves, those held nowhere at the target and their cost,
    the largest page kinds among them, and the differing words by what they hold."""
    out = ["| workload | variant | round | divergent leaves | held nowhere | their bytes | held nowhere, by kind "
           "(content) | differing words: user-space address, moved | user-space address, other | kernel address "
           "| neither |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(r.kinds.items(), key=lambda kv: -kv[1])[:4])
        total = sum(r.words.values()) or 1
        words = " | ".join(f"{r.words.get(k, 0):,} ({100 * r.words.get(k, 0) / total:.0f} %)" for k in WORD_KINDS)
        out.append(f"| {r.workload} | {r.variant} | {r.round} | {r.divergent:,} | {r.nowhere:,} | "
                   f"{r.nowhere_bytes:,} | {kinds} | {words} |")
    return "\n".join(out)


def render(res: Results, verdict: str = "") -> str:
    parts = ["# Bytes levers of issue 13, measured on real migrations",
             "",
             "Generated by `make bench BENCH=levers` (`python -m bench.levers all`; opt-in, ~50 min); the "
             "tables come from `bench/results/levers.json`. Each variant is a checkpoint of the project's "
             "guest image booted with its kernel arguments; each migration is one real migration "
             "(`bench/bench_migration.py --migrations-only --keep-work`, 10 Mbit/s, 40 ms RTT), and its "
             "plain transfer and diff without replay are measured on the same kept source state, so "
             "every percentage is against the baselines of its own run. A variant ran right after its "
             "baseline (`round`), on the same code and the same machine load.",
             ""]
    if verdict:
        parts += ["## What was adopted", "", verdict, ""]
    if res.migrations:
        parts += ["## Migrations", "", migration_table(res.migrations, res.cost), "",
                  "Means per workload and variant:", "", summary_table(res.migrations), ""]
    if res.residue:
        parts += ["## Where the residue is", "",
                  "On the states a migration kept (`residue`, off the VM lock): the memory leaves where the "
                  "replayed target differs from the source, the ones it holds nowhere (not as a zero page, at "
                  "another page of its memory or disk, or in the checkpoint) with their cost (zstd of each, "
                  "whole or XOR the checkpoint's page), their kinds named from their content "
                  "(`bench.divergence.owner_hint`), and every 8-byte word at which the divergent leaves "
                  "differ: a user-space address on both sides at the same offset within a page (moved: one "
                  "pointer relocated by whole pages, what address-space randomisation does to a process "
                  "started after the checkpoint), another user-space address on either side (a pointer to "
                  "another object, mostly), a kernel address, or neither (data).", "",
                  residue_table(res.residue), ""]
    if res.cost:
        parts += ["## What a kernel argument costs the user", "",
                  f"`{COST_COMMAND}` in a clone of each variant's checkpoint (TCG), {COST_REPEATS} times:", "",
                  cost_table(res.cost), ""]
    if res.zstd:
        parts += ["## The blocks' zstd level", "",
                  "The transfer re-run in memory between each kept source state and the target's state "
                  "before patching (`store.vmstate.sync_states`, dry run: the migration's own choices), once "
                  "per level; CPU is the process time of the whole in-memory transfer (both sides; the "
                  "difference between levels is the source's compression, trial compressions of the "
                  "similar-page candidates included; tree builds too, so it bounds the compression from above). "
                  "Net: extra CPU minus the link time of the bytes saved (negative: the level shortens the "
                  "downtime); overlapped: max(CPU, link time) against level 3's, for a source whose "
                  "compression runs while earlier batches are on the wire (the blocks window).", "",
                  zstd_table(res.zstd), ""]
    return "\n".join(parts)


# ---- measuring -------------------------------------------------------------------------------------
def _root() -> Path:
    from store.paths import checkpoints_dir
    return checkpoints_dir().parent / "levers"


def _locked(argv: list[str], lock: Path | None) -> list[str]:
    return ["flock", str(lock), *argv] if lock is not None else argv


def baselines_of(ck_name: str, wdir: Path) -> tuple[int, int]:
    """(plain transfer bytes, diff-without-replay wire bytes) of the source state kept in ``wdir``."""
    from bench.baselines import source_costs
    from bench.sides import KEPT_DISK, KEPT_MEMORY
    from store import checkpoint as ckpt
    from store.vmstate import VmState, checkpoint_trees
    ck = ckpt.get(ck_name)
    state = VmState(wdir / "source" / KEPT_MEMORY, wdir / "source" / KEPT_DISK, ck)
    costs = source_costs(state, ck, checkpoint_trees(ck), wdir)
    return costs.plain_bytes, costs.no_replay.wire_total


def zstd_sweep(variant: str, workload: str, ck_name: str, wdir: Path, levels: Sequence[int]) -> list[ZstdRow]:
    from bench.sides import KEPT_DISK, KEPT_MEMORY
    from differ.protocol.params import ProtocolParams
    from store import checkpoint as ckpt
    from store.vmstate import VmState, sync_states
    ck = ckpt.get(ck_name)
    src = VmState(wdir / "source" / KEPT_MEMORY, wdir / "source" / KEPT_DISK, ck)
    tgt = VmState(wdir / "target" / KEPT_MEMORY, wdir / "target" / KEPT_DISK, ck)
    rows = []
    for level in levels:
        t0 = time.process_time()
        stats, _ = sync_states(src, tgt, params=ProtocolParams(zstd_level=level), dry_run=True)
        cpu = time.process_time() - t0
        rows.append(ZstdRow(variant, workload, level, stats.wire_total, stats.block_bytes, round(cpu, 3)))
        log(f"zstd {variant}/{workload} level {level}: {stats.wire_total:,} B, {cpu:.2f} s CPU")
    return rows


def migrate(args: argparse.Namespace) -> int:
    """One ``bench_migration.py`` run per variant (all its workloads in one hold of ``--lock``), then
    each workload's baselines on its kept states, off the lock."""
    root: Path = args.root
    kernel_args = list(VARIANTS[args.variant]) if args.kernel_arg is None else args.kernel_arg
    ck_name = CHECKPOINT_PREFIX + args.variant
    work = root / "work" / f"{args.variant}-{args.round}"
    out = root / "out" / f"{args.variant}-{args.round}"
    argv = [sys.executable, str(HERE / "bench_migration.py"), "--workloads", *args.workloads, "--migrations-only",
            "--keep-work", "--first-link-only", "--no-native", "--checkpoint", ck_name, "--work", str(work),
            "--out", str(out), "--no-default-kernel-args", *(f"--kernel-arg={a}" for a in kernel_args)]
    rc = 0
    if not args.analyse_only:
        log(f"{args.variant} {' '.join(args.workloads)} ({args.round}): migrating")
        rc = subprocess.run(_locked(argv, args.lock), cwd=REPO, check=False).returncode
    mj = out / "migration.json"
    ran = json.loads(mj.read_text())["workloads"] if mj.exists() else {}
    failed = rc != 0
    for wl in args.workloads:
        if wl not in ran:
            log(f"{args.variant} {wl}: the migration benchmark wrote nothing for it (exit {rc})")
            failed = True
            continue
        w = ran[wl]
        run = next(iter(w["runs"].values()))
        log(f"{args.variant} {wl}: baselines on the kept states")
        plain, no_replay = baselines_of(ck_name, work / wl)
        res = Results.load(root / "levers.json")
        res.migrations.append(MigrationRow(
            args.variant, kernel_args, wl, args.round, int(w["bytes"]["replay-migrate"]), float(run["downtime_s"]),
            float(run["e2e_s"]), plain, no_replay, all(c["exit_code"] == 0 for c in run.get("checks", [])),
            datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")))
        if args.zstd_levels:
            res.zstd.extend(zstd_sweep(args.variant, wl, ck_name, work / wl, args.zstd_levels))
        res.save(root / "levers.json")
        m = res.migrations[-1]
        log(f"{args.variant} {wl}: {m.wire_bytes:,} B = {_pct(m.of_plain)} of plain, {_pct(m.of_no_replay)} of "
            f"no-replay, downtime {m.downtime_s:.1f} s")
        if not args.keep:
            shutil.rmtree(work / wl, ignore_errors=True)
    return 1 if failed else 0


def zstd(args: argparse.Namespace) -> int:
    root: Path = args.root
    res = Results.load(root / "levers.json")
    for wl in args.workloads:
        wdir = root / "work" / f"{args.variant}-{args.round}" / wl
        res.zstd.extend(zstd_sweep(args.variant, wl, CHECKPOINT_PREFIX + args.variant, wdir, args.levels))
        res.save(root / "levers.json")
    return 0


def cost(args: argparse.Namespace) -> int:
    """Time ``COST_COMMAND`` in a clone of each variant's checkpoint (made if missing). Run under
    the VM lock as a whole (``--lock``: this re-runs itself under it)."""
    if args.lock is not None:
        argv = [sys.executable, "-m", "bench.levers", "--root", str(args.root), "cost",
                *(f"--variant={v}" for v in args.variant)]
        return subprocess.run(_locked(argv, args.lock), cwd=REPO, check=False).returncode
    from store import checkpoint as ckpt
    from vm.machine import Hypervisor
    res = Results.load(args.root / "levers.json")
    with Hypervisor() as hv:
        for v in args.variant:
            ck, _ = ckpt.ensure(hv, CHECKPOINT_PREFIX + v, kernel_args=VARIANTS[v])
            name = f"{ckpt.DOMAIN_PREFIX}lev-cost-{v}"
            ckpt.remove_clone(hv, name)
            try:
                m = ckpt.start_clone(hv, ck, name)
                row = CostRow(v, list(VARIANTS[v]))
                for _ in range(COST_REPEATS):
                    r = m.exec(COST_COMMAND, timeout=900)
                    if r.exit_code != 0:
                        raise SystemExit(f"cost command failed in {name}: {r.stderr[-400:]}")
                    row.ms.append(int(r.stdout.strip()))
                log(f"cost {v}: {row.ms} ms")
            finally:
                ckpt.remove_clone(hv, name)
            res.cost = [c for c in res.cost if c.variant != v] + [row]
            res.save(args.root / "levers.json")
    return 0


def residue_of_kept(variant: str, workload: str, rnd: str, wdir: Path) -> ResidueRow:
    """:class:`ResidueRow` of the source and target states a ``migrate --keep`` left in ``wdir``."""
    from collections import Counter

    from bench.residue import HELD_NOWHERE, residue
    from bench.sides import KEPT_DISK, KEPT_MEMORY
    from differ.blocks import MemoryImageSource
    from differ.merkle import MerkleTree
    from store import checkpoint as ckpt
    from store.vmstate import FANOUT, VmState, checkpoint_trees
    ck = ckpt.get(CHECKPOINT_PREFIX + variant)
    src = VmState(wdir / "source" / KEPT_MEMORY, wdir / "source" / KEPT_DISK, ck)
    tgt = VmState(wdir / "target" / KEPT_MEMORY, wdir / "target" / KEPT_DISK, ck)
    mem = residue(src, tgt, checkpoint_trees(ck)).images["memory"]
    words: Counter[str] = Counter()
    with MemoryImageSource(src.memory) as s_mem, MemoryImageSource(tgt.memory) as t_mem:
        ts, tt = MerkleTree.build(s_mem, FANOUT), MerkleTree.build(t_mem, FANOUT)
        leaves = ts.differing_leaves(tt)
        for leaf in leaves[leaves < min(ts.leaf_count, tt.leaf_count)].tolist():
            words.update(word_census(s_mem.read(leaf, 1), t_mem.read(leaf, 1)))
    return ResidueRow(variant, workload, rnd, mem.divergent, mem.held.get(HELD_NOWHERE, 0),
                      mem.nowhere_bytes, mem.nowhere_kinds, mem.nowhere_kind_bytes,
                      {k: words.get(k, 0) for k in WORD_KINDS})


def residue_cmd(args: argparse.Namespace) -> int:
    """Where the residue is, on the states of an earlier ``migrate --keep`` (no VM: off the lock)."""
    res = Results.load(args.root / "levers.json")
    for wl in args.workloads:
        wdir = args.root / "work" / f"{args.variant}-{args.round}" / wl
        if not (wdir / "source").is_dir():
            log(f"residue {args.variant}/{wl} ({args.round}): no kept states in {wdir}")
            return 1
        row = residue_of_kept(args.variant, wl, args.round, wdir)
        res.residue = [r for r in res.residue if (r.variant, r.workload, r.round) != (args.variant, wl, args.round)]
        res.residue.append(row)
        res.save(args.root / "levers.json")
        log(f"residue {args.variant}/{wl}: {row.divergent} divergent, {row.nowhere} held nowhere "
            f"({row.nowhere_bytes:,} B); words {row.words}")
    return 0


def render_cmd(args: argparse.Namespace) -> int:
    res = Results.load(args.root / "levers.json")
    args.out.mkdir(parents=True, exist_ok=True)
    verdict = args.verdict.read_text().strip() if args.verdict and args.verdict.exists() else ""
    (args.out / "levers.md").write_text(render(res, verdict) + "\n")
    res.save(args.out / "levers.json")
    print(render(res, verdict))
    return 0


def all_cmd(args: argparse.Namespace) -> int:
    rc = 0
    for variant, workloads in ALL_PLAN:
        ns = argparse.Namespace(root=args.root, variant=variant, kernel_arg=None, workloads=list(workloads),
                                round="all", lock=args.lock, keep=False, analyse_only=False,
                                zstd_levels=list(ZSTD_LEVELS) if variant == ZSTD_VARIANT else [])
        rc |= migrate(ns)
    rc |= cost(argparse.Namespace(root=args.root, lock=args.lock, variant=list(COST_VARIANTS)))
    shutil.rmtree(args.root / "work", ignore_errors=True)
    rc |= render_cmd(argparse.Namespace(root=args.root, out=args.out, verdict=HERE / "levers-verdict.md"))
    return rc


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=None,
                    help="kept states and levers.json (default: levers/ in the state root, beside checkpoints/)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("migrate", help="real migrations of one variant, with their baselines")
    m.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    m.add_argument("--kernel-arg", action="append", default=None, metavar="ARG",
                   help="override the variant's kernel arguments (default: VARIANTS)")
    m.add_argument("--workloads", nargs="+", required=True)
    m.add_argument("--round", default="r1", help="a label pairing a variant with the baseline run next to it")
    m.add_argument("--lock", type=Path, default=None, help="run each migration under flock on this file")
    m.add_argument("--keep", action="store_true", help="keep the states (for `zstd` later)")
    m.add_argument("--zstd-levels", type=int, nargs="*", default=[])
    m.add_argument("--analyse-only", action="store_true",
                   help="no migration: measure the states an earlier run kept in <root>/work/<variant>-<round>")
    z = sub.add_parser("zstd", help="the zstd levels on kept states of an earlier `migrate --keep`")
    z.add_argument("--variant", choices=sorted(VARIANTS), default="base")
    z.add_argument("--round", default="r1")
    z.add_argument("--workloads", nargs="+", default=list(ZSTD_WORKLOADS))
    z.add_argument("--levels", type=int, nargs="+", default=list(ZSTD_LEVELS))
    c = sub.add_parser("cost", help="a guest compile timed in a clone of each variant's checkpoint")
    c.add_argument("--variant", action="append", choices=sorted(VARIANTS), required=True)
    c.add_argument("--lock", type=Path, default=None)
    d = sub.add_parser("residue", help="where the residue is, on the kept states of an earlier `migrate --keep`")
    d.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    d.add_argument("--round", default="r1")
    d.add_argument("--workloads", nargs="+", required=True)
    r = sub.add_parser("render", help="levers.md and levers.json from the results so far")
    r.add_argument("--out", type=Path, default=HERE / "results")
    r.add_argument("--verdict", type=Path, default=HERE / "levers-verdict.md",
                   help="markdown of what was adopted, put at the top (if it exists)")
    a = sub.add_parser("all", help="every variant, the zstd levels, the cost, rendered (~50 min)")
    a.add_argument("--out", type=Path, default=HERE / "results")
    a.add_argument("--lock", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.root is None:
        args.root = _root()
    return {"migrate": migrate, "zstd": zstd, "cost": cost, "render": render_cmd, "residue": residue_cmd,
            "all": all_cmd}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
