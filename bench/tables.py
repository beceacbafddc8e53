"""The migration benchmark's results as a markdown report and PNG plots (pure: a results dict in,
text and files out, so they are tested without VMs).

The results dict is what ``bench/bench_migration.py`` writes as ``migration.json``: ``meta`` and,
per workload, ``bytes``/``prep_s`` per method, ``runs`` of replay-migrate per link, ``timing`` per
link and method, and ``divergence``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cli.report import human_bytes

METHODS: tuple[tuple[str, str], ...] = (
    ("replay-migrate", "replay-migrate (replay + Merkle diff)"),
    ("no-replay", "Merkle diff without replay"),
    ("plain", "plain state transfer (ISR-style)"),
    ("rsync", "rsync --no-whole-file, zstd"),
    ("full", "full image (memory + disk), zstd"),
    ("native-precopy", "libvirt live migration, pre-copy (--copy-storage-inc), site A -> site B"),
    ("native-compressed", "libvirt live migration, pre-copy compressed, site B -> site A"),
    ("native-postcopy", "libvirt live migration, post-copy, site A -> site B"),
)
NATIVE = ("native-precopy", "native-compressed", "native-postcopy")
"""libvirt's own migrations (``bench/bench_native.py``): measured between two libvirt hosts."""
BASELINES = ("plain", "full", "rsync", "no-replay")
GOAL_SHARE_OF_PLAIN = 0.10
"""Issue 6's goal: replay-migrate ships at most this share of the plain transfer (notes, shell)."""
GOAL_WORKLOADS = ("notes", "shell")
STATE_GOAL_OF_PLAIN = 0.05
STATE_GOAL_OF_NO_REPLAY = 0.20
"""Issue 13's goals for the workloads where the user makes state: replay-migrate ships at most
these shares of the plain transfer and of the Merkle diff without replay."""
STATE_WORKLOADS = ("unpack", "build", "generate")
TOP_PAIRS = 8
"""``source kind -> target kind`` pairs of the residue listed per workload."""
GOAL_LINK = "10M-40ms"
UNSHAPED = "unshaped"
SHAPED_PRECOPY_JSON = Path(__file__).resolve().parent / "results" / "precopy-shaped.json"
"""libvirt's pre-copy measured on the shaped veth (``bench/bench_precopy.py``, ``make bench-precopy``):
where it has the workload and the link's rate, its times replace the model's."""
GOAL_DOWNTIME_VS_PRECOPY = 10.0
"""Issue 13: replay-migrate's downtime within this factor of libvirt's pre-copy downtime (same
workload and link)."""


human = human_bytes
"""Bytes as people read them (powers of 1024)."""


def saving(bytes_: float, baseline: float) -> str:
    """1 - bytes/baseline as a percentage (negative: more bytes than the baseline)."""
    if not baseline:
        return "-"
    return f"{100 * (1 - bytes_ / baseline):.1f} %"


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} s"


def by_count(d: Mapping[str, int]) -> list[tuple[str, int]]:
    """Largest first (the JSON may hold them in any order)."""
    return sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def bytes_rows(results: Mapping[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    for wl, w in results["workloads"].items():
        b = w.get("bytes", {})
        for key, label in METHODS:
            if key not in b:
                continue
            rows.append([wl, label, human(b[key]), f"{b[key]:,}",
                         *(("" if base == key else saving(b[key], b.get(base, 0))) for base in BASELINES)])
    return rows


def measured_precopy_timing(run: Mapping[str, Any], date: str) -> dict[str, Any]:
    """One pre-copy of ``bench/bench_precopy.py`` as a timing entry of the report: its measured time
    and downtime, or none when it did not converge (aborted after its timeout)."""
    head = (f"measured on the shaped link, {date} (`make bench-precopy`: the veth limited to "
            f"{float(run['rate_mbit']):g} Mbit/s each way by tbf, no added delay; libvirt's bandwidth "
            f"{run.get('bandwidth', '?')})")
    dirty = (f"dirty rate {8 * int(run['dirty_bytes_s']) / 1e6:.2f} Mbit/s (at most "
             f"{8 * int(run.get('dirty_bytes_s_max', run['dirty_bytes_s'])) / 1e6:.2f})")
    left = int(run.get("memory_remaining_bytes", 0)) / (1 << 20)
    if run["converged"]:
        return {"e2e_s": float(run["total_s"]), "downtime_s": float(run["downtime_s"]), "measured": True,
                "how": f"{head}: {int(run['iterations'])} memory passes, {dirty}"}
    if run.get("finish") == "suspended":
        return {"e2e_s": float(run["total_s"]), "downtime_s": float(run["downtime_s"]), "measured": True,
                "converges": False, "forced": True,
                "how": (f"{head}: did not converge in {float(run['suspended_after_s']):.0f} s ({left:.1f} MiB still to "
                        f"send, {dirty}); finished as `virsh migrate --timeout-suspend` does: the guest paused, "
                        "the rest sent in the pause, which is the downtime")}
    return {"e2e_s": None, "downtime_s": None, "measured": True, "converges": False,
            "how": (f"{head}: did not converge in {float(run['aborted_after_s']):.0f} s ({int(run['iterations'])} "
                    f"memory passes, {left:.1f} MiB still to send, {dirty}); aborted")}


def load_shaped_precopy(path: Path = SHAPED_PRECOPY_JSON) -> dict[str, Any] | None:
    """``precopy-shaped.json``, or None when there is none; one that is not such a file is refused."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a bench_precopy result: {e}") from e
    if (not isinstance(data, dict) or not isinstance(data.get("runs"), list)
            or not isinstance(data.get("meta", {}).get("date"), str)
            or not all(isinstance(r, dict) for r in data["runs"])):
        raise ValueError(f"{path}: not a bench_precopy result (no meta.date or runs)")
    return data


def shaped_precopy_note(shaped: Mapping[str, Any]) -> str:
    """The report's note on where the measured pre-copy rows come from."""
    return (f"libvirt's pre-copy rows whose \"how\" says *measured on the shaped link* are `make bench-precopy`'s "
            f"({shaped['meta']['date']}, commit {shaped['meta'].get('commit', '?')}: the veth between the sites "
            "limited to the link's rate, [precopy-shaped.md](precopy-shaped.md)); libvirt's other shaped-link rows "
            "are modelled.")


def apply_shaped_precopy(results: Mapping[str, Any], shaped: Mapping[str, Any] | None) -> int:
    """Put measured shaped-link pre-copy times in place of the modelled ones: for every workload and
    link of ``results`` that has a modelled ``native-precopy`` timing and a run in ``shaped`` of the
    same workload at the link's rate (the last such run). Returns how many were replaced; the
    others keep the model."""
    if not shaped:
        return 0
    rates = {s["key"]: float(s["rate_mbit"]) for s in results["meta"].get("link", {}).get("shapes", [])
             if "rate_mbit" in s}
    n = 0
    for wl, w in results["workloads"].items():
        for link, per_method in w.get("timing", {}).items():
            if link not in rates or "native-precopy" not in per_method:
                continue
            runs = [r for r in shaped["runs"]
                    if r.get("workload") == wl and float(r.get("rate_mbit", -1)) == rates[link]]
            if runs:
                per_method["native-precopy"] = measured_precopy_timing(runs[-1],
                                                                       runs[-1].get("date", shaped["meta"]["date"]))
                n += 1
    return n


def time_rows(results: Mapping[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    for wl, w in results["workloads"].items():
        for link, per_method in w.get("timing", {}).items():
            for key, label in METHODS:
                t = per_method.get(key)
                if t is None:
                    continue
                how = t.get("how", "")
                run = w.get("runs", {}).get(link)
                if key == "replay-migrate" and run is not None:
                    how += (f"; the target was saved {run['replay_lag_s']:.1f} s after the source paused "
                            f"(replay catching up, settle, save); restore {run['restore_s']:.1f} s")
                rows.append([wl, label, _link_name(results, link), _secs(t.get("e2e_s")),
                             _secs(t.get("downtime_s")), how])
    return rows


def _link_name(results: Mapping[str, Any], key: str) -> str:
    for s in results["meta"].get("link", {}).get("shapes", []):
        if s["key"] == key:
            return str(s["name"])
    return "unshaped veth" if key == UNSHAPED else key


def divergence_rows(results: Mapping[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    for wl, w in results["workloads"].items():
        d = w.get("divergence")
        if not d:
            continue
        mem, disk = d["memory"], d["disk"]
        blocks = ", ".join(f"{k} {v}" for k, v in by_count(mem["by_block"]))
        classes = ", ".join(f"{k} {v}" for k, v in by_count(disk["by_class"]))
        nr = w.get("details", {}).get("no-replay", {}).get("divergent", {})
        without = f"{nr['memory']} / {nr['disk']}" if nr else "-"
        rows.append([wl, str(mem["total"]), blocks or "-", str(disk["total"]), classes or "-", without])
    return rows


CAUSE_SHORT = (
    ("content present elsewhere", "moved"),
    ("zero on one side", "one side zero"),
    ("<= ", "<= 8 B differ"),
    ("9-", "9-64 B differ"),
    ("> ", "> 64 B differ"),
    ("random content", "random"),
    ("device state", "non-RAM"),
)
"""Column headers for the memory causes of ``bench.divergence`` (matched by prefix)."""


def short_cause(cause: str) -> str:
    for prefix, short in CAUSE_SHORT:
        if cause.startswith(prefix):
            return short
    return cause


def _count_table(headers: Sequence[str], counts: Mapping[str, int]) -> str:
    return md_table(headers, [[k, v] for k, v in by_count(counts)])


def _owner_cause_table(mem: Mapping[str, Any]) -> str:
    causes = [c for c, _ in by_count(mem["by_cause"])]
    rows = [[owner, n, *(mem["owner_cause"].get(owner, {}).get(c, "") for c in causes)]
            for owner, n in by_count(mem["by_owner"])]
    return md_table(["page looks like", "pages", *map(short_cause, causes)], rows)


def _cause_section(wl: str, d: Mapping[str, Any]) -> str:
    mem, disk = d["memory"], d["disk"]
    out = [f"### {wl}\n"]
    if mem["by_cause"]:
        out.append(_count_table(["memory: how the two pages differ", "pages"], mem["by_cause"]))
        if mem.get("by_owner"):
            out.append("\nBy what the page holds (content heuristic, no guest symbols), split by how it differs:\n")
            out.append(_owner_cause_table(mem))
        ranges = sorted(mem["gpa_mib"].items(), key=lambda kv: int(kv[0].split("-")[0]))
        gpa = ", ".join(f"{k} MiB: {v}" for k, v in ranges)
        out.append(f"\npc.ram pages by guest-physical range: {gpa or '-'}; median bytes differing per page "
                   f"{mem['median_bytes_differing']:.0f}.\n")
    if disk["by_class"]:
        out.append("\n" + _count_table(["disk: ext4 role", "4 KiB blocks"], disk["by_class"]))
    if disk.get("files"):
        out.append("\n" + _count_table(["file (data blocks)", "blocks"], disk["files"]))
    if disk.get("inodes"):
        out.append("\n" + _count_table(["file whose inode record differs", "inodes"], disk["inodes"]))
    if disk.get("note"):
        out.append(f"\n{disk['note']}\n")
    return "\n".join(out) + "\n"


SESSION_PARTS: tuple[str, ...] = ("log_envelopes", "diff_envelopes", "acks", "replayed", "control")
"""The session's own bytes on the source's socket (``SessionClient.wire_detail``): the envelopes of
log frames and diff messages, acks, the target's replay progress, every other session message."""


def breakdown_rows(results: Mapping[str, Any]) -> list[list[str]]:
    """Where replay-migrate's bytes go (first run of each workload): log, walk hashes, delta
    fingerprints, blocks, the diff's per-leaf kinds and its messages' envelopes, the session's
    envelopes and messages (from the source's ``wire_detail``, when the run has it), and whatever
    none of these accounts for."""
    rows: list[list[str]] = []
    for wl, w in results["workloads"].items():
        runs = w.get("runs", {})
        if not runs:
            continue
        run = next(iter(runs.values()))
        s, t = run["report"], run.get("target_report", {})
        log = s.get("log_bytes", 0)
        hashes = s.get("hash_bytes", 0) + t.get("hash_bytes", 0)
        fps = s.get("fingerprint_bytes", 0) + t.get("fingerprint_bytes", 0)
        blocks = s.get("block_bytes", 0) + t.get("block_bytes", 0)
        kinds = s.get("kind_bytes", 0) + t.get("kind_bytes", 0)
        framing = s.get("framing_bytes", 0) + t.get("framing_bytes", 0)
        detail = s.get("wire_detail") or {}
        session = {k: detail.get(k, 0) for k in SESSION_PARTS}
        if detail:
            log = detail.get("log_data", log)
        wire = s.get("wire_bytes", 0)
        div = t.get("divergent_blocks") or s.get("divergent_blocks", {})
        rest = wire - log - hashes - fps - blocks - kinds - framing - sum(session.values())
        rows.append([wl, human(wire), human(log), human(hashes), human(fps), human(blocks), human(kinds),
                     human(framing),
                     " / ".join(human(v) for v in session.values()) if detail else "-",
                     human(rest) if rest >= 0 else f"-{human(-rest)}",
                     f"{div.get('memory', 0)} / {div.get('disk', 0)}",
                     f"{t.get('referenced_blocks', 0)} / {t.get('delta_blocks', 0)} / {t.get('full_blocks', 0)}",
                     str(t.get("round_trips", 0))])
    return rows


def mark_rows(results: Mapping[str, Any]) -> list[list[str]]:
    """Sync marks per workload and link: how many the target met and which it did not (a failed
    mark is a replay that drifted from the source's screen, or one the agent took of a transient
    screen: it costs the replay its wait, never correctness). *Passed*: a mark of a screen the source
    showed while a command ran, which the target had left when it looked, and the region's next mark
    (before any input) was met."""
    rows: list[list[str]] = []
    for wl, w in results["workloads"].items():
        for link, run in w.get("runs", {}).items():
            rep = run.get("replay") or {}
            if "sync_met" not in rep:
                continue
            failed = list(rep.get("sync_failed", []))
            rows.append([wl, _link_name(results, link), str(rep["sync_met"]), str(rep.get("sync_passed", 0)),
                         str(len(failed)),
                         "; ".join(failed) if failed else "-"])
    return rows


PHASE_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("target tail", ("target replay", "target settle", "target freeze", "target pause")),
    ("save", ("source drain", "source save", "source screenshot", "target save", "source save end",
              "target save end")),
    ("hash", ("source open", "source hash", "source checkpoint trees", "target open", "target hash",
              "target checkpoint trees", "target copy")),
    ("walk", ("target walk", "source walk")),
    ("blocks", ("target blocks", "target read", "source blocks", "source read")),
    ("patch", ("target patch", "target setsize")),
    ("verify", ("target verify", "target commit", "target verified")),
    ("restore", ("target restore", "target agent", "target thaw")),
)
"""The phases of ``migration.timeline`` in the groups issue 13 names (anything else: "other"):
the target's tail (replay catching up, settle, freeze), the saves (the source's drain too, and the
rest of the save call after the image was whole when the hashing ended before it), the
hashing (opening the images, the trees), the walk, the blocks (the source's reads in them),
the patch writes, the verification (read-back, commit, telling the session), the restore (the
guest agent answering and the file systems thawed: the user's programs wait until then)."""
GROUP_ORDER = (*(g for g, _ in PHASE_GROUPS), "gaps", "other")


def phase_group(key: str) -> str:
    for group, keys in PHASE_GROUPS:
        if key in keys:
            return group
    return "gaps" if key.endswith(" gap") else "other"


def grouped(breakdown: Mapping[str, float]) -> dict[str, float]:
    """A run's breakdown summed by :data:`PHASE_GROUPS`, in their order."""
    out: dict[str, float] = {}
    for k, v in breakdown.items():
        out[phase_group(k)] = out.get(phase_group(k), 0.0) + v
    return {g: out[g] for g in GROUP_ORDER if g in out}


def downtime_tables(results: Mapping[str, Any]) -> str:
    """Per workload, the downtime's critical path by group of phases (``migration.timeline``), one
    column per link, and the phases of each group on the first link; the plain transfer's downtime
    on that link below, for scale."""
    out: list[str] = []
    for wl, w in results["workloads"].items():
        runs = {link: r for link, r in w.get("runs", {}).items() if r.get("downtime_breakdown")}
        if not runs:
            continue
        groups = {link: grouped(r["downtime_breakdown"]) for link, r in runs.items()}
        first = next(iter(runs.values()))["downtime_breakdown"]
        rows: list[list[str]] = []
        for g in GROUP_ORDER:
            if not any(g in gs for gs in groups.values()):
                continue
            detail = ", ".join(f"{k} {v:.2f}" for k, v in first.items() if phase_group(k) == g)
            rows.append([g, *(f"{gs[g]:.2f}" if g in gs else "" for gs in groups.values()), detail])
        rows.append(["**downtime**", *(f"**{r['downtime_s']:.2f}**" for r in runs.values()), ""])
        plain = [w.get("timing", {}).get(link, {}).get("plain", {}).get("downtime_s") for link in runs]
        if any(p is not None for p in plain):
            rows.append(["plain transfer's downtime (same link, modelled)",
                         *("" if p is None else f"{p:.2f}" for p in plain), ""])
        out.append(f"### {wl}\n")
        out.append(md_table(["phase", *(f"{_link_name(results, k)} (s)" for k in runs),
                             f"on the critical path ({_link_name(results, next(iter(runs)))}, s)"], rows))
    return "\n".join(out)


def break_even_mbit(w: Mapping[str, Any], rate_mbit: float) -> float | None:
    """The link rate below which replay-migrate beats the plain transfer end to end, by a linear
    model through one run: each method's fixed time (its end-to-end time on the goal link minus its
    bytes at that rate) plus its bytes at the rate. None: not measured, or it never does; inf: at
    every rate."""
    t = w.get("timing", {}).get(GOAL_LINK, {})
    rm, plain = t.get("replay-migrate"), t.get("plain")
    if not rm or not plain or plain.get("link_s") is None or rm.get("e2e_s") is None:
        return None
    saved_bits = 8 * (w["bytes"]["plain"] - w["bytes"]["replay-migrate"])
    extra_s = (rm["e2e_s"] - 8 * w["bytes"]["replay-migrate"] / (rate_mbit * 1e6)) - (plain["e2e_s"] - plain["link_s"])
    if saved_bits <= 0:
        return None
    return math.inf if extra_s <= 0 else saved_bits / extra_s / 1e6


def checks_rows(results: Mapping[str, Any]) -> list[list[str]]:
    """Every check of every run: workload, link, the command, passed or the failure's output."""
    rows: list[list[str]] = []
    for wl, w in results["workloads"].items():
        for link, run in w.get("runs", {}).items():
            for c in run.get("checks", []):
                verdict = "passed" if c["exit_code"] == 0 else f"FAILED (exit {c['exit_code']}): {c['output'][-200:]}"
                rows.append([wl, _link_name(results, link), f"`{c['command']}`", verdict])
    return rows


def residue_section(wl: str, r: Mapping[str, Any]) -> str:
    """Where one workload's residue goes (:mod:`bench.residue`): where the target holds each
    divergent leaf, how the transfer got them, and what the leaves held nowhere are and cost."""
    mem, disk = r["images"].get("memory", {}), r["images"].get("disk", {})
    sent = r.get("sent", {})
    out = [f"### {wl}: where the residue goes\n"]
    held_rows = []
    for where in sorted({*mem.get("held", {}), *disk.get("held", {})},
                        key=lambda k: -(mem.get("held", {}).get(k, 0) + disk.get("held", {}).get(k, 0))):
        held_rows.append([where, mem.get("held", {}).get(where, 0), disk.get("held", {}).get(where, 0)])
    out.append(f"Divergent leaves: memory {mem.get('divergent', 0)}, disk {disk.get('divergent', 0)}. The target "
               f"holds {r.get('held_anywhere', 0)} of them somewhere; the transfer took "
               f"{r.get('sent_as_held', 0)} from what it holds (references, its checkpoint's leaf, duplicates, "
               f"zeros) and sent the rest as bytes.\n")
    out.append(md_table(["the source's content is in", "memory leaves", "disk leaves"], held_rows))
    if sent:
        kinds = ("referenced", "duplicate", "base", "zero", "xbase", "xsim", "full", "delta")
        out.append("\n" + md_table(["image", *kinds], [[name, *(v.get(k, 0) for k in kinds)]
                                                        for name, v in sent.items()]))
    kinds_bytes = mem.get("nowhere_kind_bytes", {})
    total = sum(kinds_bytes.values()) + disk.get("nowhere_bytes", 0)
    if mem.get("nowhere_kinds"):
        out.append(f"\nThe memory leaves held nowhere by the source page's kind ({r.get('kinds_from', '')}); "
                   "bytes: zstd of each leaf alone, whole or XOR the checkpoint's (what they cost):\n")
        out.append(md_table(["source page", "leaves", "bytes", "share of the residue's bytes"],
                            [[k, n, human(kinds_bytes.get(k, 0)),
                              f"{100 * kinds_bytes.get(k, 0) / total:.0f} %" if total else "-"]
                             for k, n in by_count(mem["nowhere_kinds"])]))
    if disk.get("nowhere_bytes"):
        out.append(f"\nDisk leaves held nowhere: {sum(disk.get('nowhere_kinds', {}).values())}, "
                   f"{human(disk['nowhere_bytes'])}.\n")
    pairs = by_count(mem.get("pairs", {}))[:TOP_PAIRS]
    if pairs:
        out.append("\nWhat the target holds at the same page instead (source kind -> target kind):\n")
        out.append(md_table(["source -> target", "leaves"], pairs))
    like = mem.get("nowhere_like_target", {})
    if like:
        out.append("\nBytes that differ from the target's page at the same place: "
                   + ", ".join(f"{k}: {v}" for k, v in by_count(like)) + ".\n")
    return "\n".join(out) + "\n"


def downtime_vs_precopy(w: Mapping[str, Any], link: str = GOAL_LINK) -> str | None:
    """replay-migrate's downtime against libvirt's pre-copy's on ``link`` (issue 13's goal: within
    :data:`GOAL_DOWNTIME_VS_PRECOPY` x), saying whether the latter was measured there or modelled."""
    t = w.get("timing", {}).get(link, {})
    rm, pre = t.get("replay-migrate"), t.get("native-precopy")
    if not rm or not pre or rm.get("downtime_s") is None:
        return None
    how = "measured on the shaped link" if pre.get("measured") else "modelled"
    if pre.get("forced"):
        how += ", not converging: the guest paused to finish"
    if pre.get("downtime_s") is None:
        if pre.get("converges") is False:
            return (f"downtime {rm['downtime_s']:.1f} s; libvirt's pre-copy did not converge on this link ({how}): "
                    "no downtime of its own to compare")
        return None
    ratio = rm["downtime_s"] / pre["downtime_s"] if pre["downtime_s"] > 0 else math.inf
    verdict = "met" if ratio <= GOAL_DOWNTIME_VS_PRECOPY else "NOT met"
    return (f"downtime {rm['downtime_s']:.2f} s vs libvirt pre-copy's {pre['downtime_s']:.2f} s ({how}): "
            f"{ratio:.1f}x (goal <= {GOAL_DOWNTIME_VS_PRECOPY:g}x): {verdict}")


def goal_lines(results: Mapping[str, Any]) -> list[str]:
    """Issues 6's and 13's goals, reported (never asserted)."""
    lines = []
    for wl in GOAL_WORKLOADS:
        w = results["workloads"].get(wl)
        if not w or "plain" not in w.get("bytes", {}):
            lines.append(f"- {wl}: not measured")
            continue
        share = w["bytes"]["replay-migrate"] / w["bytes"]["plain"]
        verdict = "met" if share <= GOAL_SHARE_OF_PLAIN else "NOT met"
        lines.append(f"- {wl}: replay-migrate ships {100 * share:.1f} % of the plain transfer's bytes "
                     f"(goal <= {100 * GOAL_SHARE_OF_PLAIN:.0f} %): {verdict}")
    for wl in STATE_WORKLOADS:
        w = results["workloads"].get(wl)
        if not w or "plain" not in w.get("bytes", {}) or "no-replay" not in w.get("bytes", {}):
            continue
        b = w["bytes"]
        share, vs_nr = b["replay-migrate"] / b["plain"], b["replay-migrate"] / b["no-replay"]
        ok = share <= STATE_GOAL_OF_PLAIN and vs_nr <= STATE_GOAL_OF_NO_REPLAY
        lines.append(f"- {wl}: replay-migrate ships {100 * share:.1f} % of the plain transfer's bytes (goal <= "
                     f"{100 * STATE_GOAL_OF_PLAIN:.0f} %) and {100 * vs_nr:.1f} % of the diff without replay's "
                     f"(goal <= {100 * STATE_GOAL_OF_NO_REPLAY:.0f} %): {'met' if ok else 'NOT met'}")
    for wl in results["workloads"]:
        t = results["workloads"][wl].get("timing", {}).get(GOAL_LINK, {})
        rm, plain = t.get("replay-migrate"), t.get("plain")
        if rm is None or plain is None or rm.get("e2e_s") is None or plain.get("e2e_s") is None:
            continue
        faster = rm["e2e_s"] < plain["e2e_s"]
        line = (f"- {wl} at 10 Mbit/s: end to end {rm['e2e_s']:.1f} s vs plain transfer "
                f"{plain['e2e_s']:.1f} s: {'faster (met)' if faster else 'NOT faster'}")
        rate = next((s["rate_mbit"] for s in results["meta"].get("link", {}).get("shapes", [])
                     if s.get("key") == GOAL_LINK), None)
        b = break_even_mbit(results["workloads"][wl], rate) if rate else None
        if b is not None and not faster:
            line += (f"; by this run's fixed times and bytes it is faster below ~{b:.1f} Mbit/s" if b != math.inf
                     else "")
        lines.append(line)
    for wl, w in results["workloads"].items():
        for s in results["meta"].get("link", {}).get("shapes", []):
            vs = downtime_vs_precopy(w, s["key"])
            if vs:
                lines.append(f"- {wl} at {_link_name(results, s['key'])}: {vs}")
    for wl, w in results["workloads"].items():
        reps = [r["replay"] for r in w.get("runs", {}).values() if "sync_met" in (r.get("replay") or {})]
        if reps:
            failed = sum(len(r.get("sync_failed", [])) for r in reps)
            met = sum(int(r["sync_met"]) + int(r.get("sync_passed", 0)) for r in reps)
            lines.append(f"- {wl}: {failed} of {met + failed} sync marks failed over {len(reps)} run(s) "
                         f"(goal: none): {'met' if failed == 0 else 'NOT met'}")
    if not any(w.get("timing", {}).get(GOAL_LINK) for w in results["workloads"].values()):
        lines.append("- faster end to end than the plain transfer at 10 Mbit/s: not measured "
                     "(no shaped link on this host, see above)")
    return lines


def native_rows(results: Mapping[str, Any]) -> list[list[str]]:
    """libvirt's migrations as measured (unshaped veth between the two hosts), or why one could not run."""
    rows: list[list[str]] = []
    for wl, w in results["workloads"].items():
        for key in NATIVE:
            r = w.get("native", {}).get(key)
            if r is None:
                continue
            if "error" in r:
                rows.append([wl, key, "could not run: " + r["error"], "", "", "", "", ""])
                continue
            stats = (f"{human(r['wire_bytes'])} (memory {human(r['memory_bytes'])}, disk {human(r['disk_bytes'])})"
                     if r["wire_bytes"] else "unknown (no statistics after post-copy)")
            down = "unknown" if r["downtime_s"] is None else f"{1000 * r['downtime_s']:.0f} ms"
            rows.append([wl, key + (f" ({r['compression']})" if r.get("compression") else ""),
                         stats, human(r["veth_bytes"]), f"{r['total_s']:.1f} s", down,
                         str(r["iterations"]),
                         str(r["postcopy_requests"]) + ("" if r.get("postcopy_switched", True) else
                                                        " (finished in pre-copy before the switch)")])
    return rows


def native_section(results: Mapping[str, Any]) -> list[str]:
    rows = native_rows(results)
    if not rows:
        return []
    return ["\n## libvirt's own live migration between two libvirt hosts\n",
            "Site A (this machine's libvirtd) and site B (a second libvirtd in its own network and mount "
            "namespaces, `bench/sites.py`), joined by a veth; each holds its own copy of the checkpoint. One clone "
            "per workload, driven by the workload at site A, then moved A -> B (pre-copy), B -> A (pre-copy "
            "compressed), A -> B (post-copy, switched after the first pass). Measured on the unshaped veth: bytes "
            "from libvirt's job statistics and counted on the veth, time and downtime from the job statistics. "
            "libvirt's completed statistics leave the overlay's NBD copy out, so the bytes above (and the model) "
            "are the veth's count. Their shaped-link times above are modelled from these (bytes / rate; "
            "downtime at most the measured one plus QEMU's 300 ms downtime limit), not measured: libvirt's "
            "migration ports are not behind the bench's link shaper; except the pre-copy rows whose \"how\" says "
            "*measured on the shaped link*: those are `make bench-precopy`'s (`bench/bench_precopy.py`, the veth "
            "limited to the link's rate, [precopy-shaped.md](precopy-shaped.md)).\n",
            md_table(["workload", "variant", "bytes (job statistics)", "bytes on the veth", "time", "downtime",
                      "memory passes", "post-copy page requests"], rows)]


def render_markdown(results: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    meta = results["meta"]
    link = meta.get("link", {})
    out = ["# Migration benchmark: replay-migrate against the baselines\n",
           f"Run {meta.get('date', '?')} on {meta.get('host', '?')}; checkpoint `{meta.get('checkpoint', '?')}` "
           f"({meta.get('virt', '?')}, {meta.get('memory_mib', '?')} MiB guest, kernel arguments "
           f"{' '.join(f'`{a}`' for a in meta.get('kernel_args', [])) or 'none'}); this benchmark took "
           f"{meta.get('elapsed_s', 0) / 60:.1f} min. Every method is measured on the same source state "
           "(the one replay-migrate's source saved at suspend).\n"]
    shaper = link.get("shaper") or ("tc netem" if link.get("netem") and link.get("shapes") else None)
    if link.get("message"):
        out.append(f"**Shaped link: not available.** {link['message']}\n")
    elif shaper:
        out.append(f"**Shaped link:** {shaper}.\n")
    for note in meta.get("notes", []):
        out.append(f"- {note}")
    out.append("\n## Bytes on the wire\n")
    out.append("Savings columns: 1 - bytes / that baseline's bytes (negative: more than the baseline).\n")
    out.append(md_table(["workload", "method", "bytes", "exact", "vs plain", "vs full", "vs rsync",
                         "vs no-replay"], bytes_rows(results)))
    rows = breakdown_rows(results)
    if rows:
        out.append("\nWhere replay-migrate's bytes go (wire = everything on the source's socket; *leaf kinds*: "
                   "the diff's per-leaf request and answer kinds; *diff envelopes*: its messages' msgpack "
                   "envelopes; *session*: log-frame envelopes / diff-frame envelopes / acks / the target's "
                   "replay progress / other session messages; *rest*: what none of these accounts for):\n")
        out.append(md_table(["workload", "wire", "input log", "walk hashes", "delta fingerprints", "blocks",
                             "leaf kinds", "diff envelopes", "session: log / diff / acks / replayed / control",
                             "rest", "divergent leaves mem / disk",
                             "sent as reference / delta / full", "round trips"], rows))
    out.append("\n## Time: end to end (migrate requested -> VM running at the target) and downtime "
               "(source paused -> target running)\n")
    rows = time_rows(results)
    out.append(md_table(["workload", "method", "link", "end to end", "downtime", "how"], rows)
               if rows else "No times measured.\n")
    rows = mark_rows(results)
    if rows:
        out.append("\n## Sync marks (the target's replay waiting on the source's settled screens)\n")
        out.append("A mark *passed*: the source showed it while a command ran, the target had left it when it "
                   "looked, and the region's next mark, before any input, was met.\n\n")
        out.append(md_table(["workload", "link", "met", "passed", "failed", "failed marks"], rows))
    downtime = downtime_tables(results)
    if downtime:
        out.append("\n## Where the downtime goes\n")
        out.append("Each side notes its phases on the host's monotonic clock; before the walk the side that was "
                   "ready last is the critical path (the other ran in its shadow), from the walk on the target "
                   "(`migration/timeline.py`). A gap is time no phase of that side covers (messages in flight, "
                   "waiting on the other side). The benchmark's own hooks are left out.\n")
        out.append(downtime)
    out += native_section(results)
    out.append("\n## Divergence left after replay (source vs the replayed target, before patching)\n")
    out.append("The last column, for comparison, is what differs without replay (the source vs the checkpoint).\n")
    out.append(md_table(["workload", "memory leaves", "by RAM block", "disk leaves", "by ext4 role",
                         "without replay: mem / disk"], divergence_rows(results)))
    out.append("")
    for wl, w in results["workloads"].items():
        if w.get("divergence"):
            out.append(_cause_section(wl, w["divergence"]))
    if any(w.get("residue") for w in results["workloads"].values()):
        out.append("## Where the residue goes\n")
        out.append("Every leaf where the replayed target differs from the source, looked up in everything the "
                   "target holds (its memory at any page, its disk as the guest sees it, the checkpoint's "
                   "memory and disk): what it holds travels as a reference; what it holds nowhere is the "
                   "residue's bytes, named by the guest's own page flags where they were read.\n")
        for wl, w in results["workloads"].items():
            if w.get("residue"):
                out.append(residue_section(wl, w["residue"]))
    rows = checks_rows(results)
    if rows:
        out.append("## Checks in the migrated VM\n")
        out.append("Run after each migration through the guest agent (not typed); the user's checksums were "
                   "computed at the source, in the session.\n")
        out.append(md_table(["workload", "link", "check", "result"], rows))
    out.append("## Goals (issues 6 and 13)\n")
    out += goal_lines(results)
    if plots:
        out.append("\n## Plots\n")
        out += [f"![{Path(p).stem}]({Path(p).name})\n" for p in plots]
    return "\n".join(out) + "\n"


# ---- plots -----------------------------------------------------------------------------------------
def plot_bytes(results: Mapping[str, Any], path: Path) -> Path:
    """Grouped bars: bytes per method per workload (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(results["workloads"])
    present = {k for w in results["workloads"].values() for k in w.get("bytes", {})}
    methods = [(k, label) for k, label in METHODS if k in present]
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for j, (key, label) in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(workloads))]
        ys = [results["workloads"][wl].get("bytes", {}).get(key, 0) for wl in workloads]
        ax.bar(xs, ys, width, label=label)
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_yscale("log")
    ax.set_ylabel("bytes on the wire")
    ax.set_title("Bytes per method (same source state)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_time(results: Mapping[str, Any], path: Path) -> Path | None:
    """End-to-end time against link rate, one panel per workload; None when no link was shaped."""
    shapes = {s["key"]: s for s in results["meta"].get("link", {}).get("shapes", [])}
    series: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for wl, w in results["workloads"].items():
        for link, per_method in w.get("timing", {}).items():
            if link not in shapes:
                continue
            for key, t in per_method.items():
                if t.get("e2e_s") is not None:
                    series.setdefault(wl, {}).setdefault(key, []).append((shapes[link]["rate_mbit"], t["e2e_s"]))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 4), squeeze=False)
    labels = dict(METHODS)
    for ax, (wl, per_method) in zip(axes[0], series.items(), strict=True):
        for key, _label in METHODS:
            pts = sorted(per_method.get(key, []))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=labels[key])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link rate (Mbit/s)")
        ax.set_title(wl)
    axes[0][0].set_ylabel("end to end (s)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_downtime(results: Mapping[str, Any], path: Path) -> Path | None:
    """Stacked bars: the downtime of each workload and link by group of phases."""
    bars: dict[str, dict[str, float]] = {}
    for wl, w in results["workloads"].items():
        for link, r in w.get("runs", {}).items():
            if r.get("downtime_breakdown"):
                bars[f"{wl}\n{_link_name(results, link)}"] = grouped(r["downtime_breakdown"])
    if not bars:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = GROUP_ORDER
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(bars)), 4.8))
    bottom = [0.0] * len(bars)
    for group in order:
        ys = [b.get(group, 0.0) for b in bars.values()]
        if any(ys):
            ax.bar(list(bars), ys, bottom=bottom, label=group)
            bottom = [a + y for a, y in zip(bottom, ys, strict=True)]
    ax.set_ylabel("seconds of downtime (critical path)")
    ax.set_title("Where the downtime goes")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_divergence(results: Mapping[str, Any], path: Path) -> Path | None:
    """Stacked bars: the divergent memory pages of each workload by cause."""
    data = {wl: w["divergence"]["memory"]["by_cause"] for wl, w in results["workloads"].items()
            if w.get("divergence")}
    if not data:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    causes = sorted({c for d in data.values() for c in d})
    fig, ax = plt.subplots(figsize=(9, 4.8))
    bottom = [0.0] * len(data)
    for cause in causes:
        ys = [float(d.get(cause, 0)) for d in data.values()]
        ax.bar(list(data), ys, bottom=bottom, label=cause)
        bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    ax.set_ylabel("divergent 4 KiB leaves of the memory image")
    ax.set_title("What replay leaves different in memory")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
